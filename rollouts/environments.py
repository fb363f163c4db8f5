"""Environments: one instance per trajectory owns that trajectory's interaction (docs/environments.md).

An environment is a class, named in the recipe by import path (`environment: {name: my_pkg.envs:Game}`); aha
builds one instance per trajectory with the recipe's kwargs, so concurrent trajectories never share state.
Its methods follow TRL's `environment_factory` contract where it fits; each may be plain or `async def`:

    reset(**row) -> str | None        called once before the first turn with every column of the dataset row;
                                      a string is appended to the question (before the prompt template)
    <public methods>                  tools the model calls in its function-calling format,
                                      `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; what a method
                                      returns is the observation (TRL: the same)
    respond(turn: str) -> str | None  (aha's) answer a model turn that called no tool: the text inserted before
                                      the model's next turn, or None to end the episode
    get_reward() -> float | None      score the finished trajectory: the `environment` reward (TRL: a reward
                                      named after the class)

Inserted text (observations, replies) becomes tokens out of the loss, as tool outputs do. An environment that
raises, hangs past `timeout_s` or answers with something other than text (or None) ends its trajectory as an
error: counted (`env/error_frac`), shown in the samples, unscored; the run goes on. A malformed tool call (bad
JSON, an unknown tool, wrong arguments) or a tool method that raises is an error observation the model reads
(counted in `tools/error_frac`), as for `tools:`.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollouts.base import Completion, EngineError, RolloutEngine, SamplingParams
from rollouts.multiturn import EngineWrapper, ToolRollout
from rollouts.tools import Observation, PendingCall, collect, cut, start_call

RESERVED = ("reset", "respond", "get_reward", "close")
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_SENTINEL = "\u2063aha-sentinel\u2063"


class EnvironmentSetupError(EngineError):
    """An environment that cannot be set up (not importable, no reset), or a method that failed; says why."""


def tool_methods(env: object) -> dict[str, Callable[..., Any]]:
    """The environment's tools, as TRL finds them: its public methods other than the contract's own."""
    return {
        name: member
        for name, member in inspect.getmembers(env, predicate=inspect.ismethod)
        if not name.startswith("_") and name not in RESERVED
    }


def call_now(fn: Callable[..., Any], kwargs: dict, timeout_s: float, what: str) -> Any:
    """`fn(**kwargs)` waited for (at most `timeout_s`); raises EnvironmentSetupError naming `what` on an exception
    or a timeout."""
    box: dict[str, Any] = {}

    def keep(value: Any) -> Observation:
        box["value"] = value
        return Observation("")

    late = Observation(f"error: {what} took over {timeout_s:g} s", True, True)
    (observation,) = collect([start_call(fn, kwargs, timeout_s, keep, late)])
    if observation.error:
        raise EnvironmentSetupError(f"{what}: {observation.text.removeprefix('error: ')}")
    return box.get("value")


# ---------------------------------------------------------------------------------------------- one episode
def parse_tool_call(text: str) -> tuple[str, dict] | str:
    """The last `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` of `text` as (name, arguments), or
    an error message saying what is wrong with it."""
    start = text.rfind(CALL_START)
    end = text.rfind(CALL_END)
    if start < 0 or end < start:
        return "no <tool_call> ... </tool_call> in the turn"
    body = text[start + len(CALL_START) : end].strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return f"the tool call is not JSON ({err.msg})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'the tool call needs {"name": ..., "arguments": {...}}'
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some templates write the arguments as a JSON string
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            return "the tool call's arguments are not JSON"
    if not isinstance(arguments, dict):
        return "the tool call's arguments must be an object"
    return call["name"], arguments


def tool_response(tokenizer: Any, text: str) -> str:
    """The text that follows a model turn ending at `</tool_call>`, in the chat template's own format: the end
    of the assistant turn, the tool turn holding `text`, and the start of the next assistant turn. Without a
    chat template (a base model): `<tool_response>` tags."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": _SENTINEL},
            {"role": "tool", "content": text},
        ]
        try:
            full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template without a tool role
            full = ""
        if _SENTINEL in full:
            return full[full.index(_SENTINEL) + len(_SENTINEL) :]
    return f"\n<tool_response>\n{text}\n</tool_response>\n"


@dataclass
class EnvEpisode:
    """One trajectory's environment in the turn loop (rollouts/multiturn.py's Episode)."""

    env: object
    tokenizer: Any
    max_turns: int
    timeout_s: float
    max_chars: int = 2000
    tools: dict[str, Callable[..., Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.tools = tool_methods(self.env)
        self.responds = callable(getattr(self.env, "respond", None))
        self.tool_turn = False  # whether the turn being answered called a tool (its output is a tool turn)

    @property
    def stop(self) -> tuple[str, ...]:
        own = tuple(getattr(self.env, "stop", ()) or ())
        return (*own, CALL_END) if self.tools else own

    def continues(self, segment: str, finish: str) -> bool:
        return self.responds or (bool(self.tools) and segment.rstrip().endswith(CALL_END))

    def start(self, text: str, segment: str, calls: int) -> PendingCall | None:
        if calls >= self.max_turns - 1:
            return PendingCall.ready(Observation("", end=True))  # the turn limit: the episode ends, no error
        self.tool_turn = bool(self.tools) and segment.rstrip().endswith(CALL_END)
        if self.tool_turn:
            return self._call_tool(segment)
        late = Observation(f"error: respond took over {self.timeout_s:g} s", True, True)
        return start_call(self.env.respond, {"turn": segment}, self.timeout_s, _reply, late)

    def _call_tool(self, segment: str) -> PendingCall:
        parsed = parse_tool_call(segment)
        if isinstance(parsed, str):
            return PendingCall.ready(Observation(f"error: {parsed}", True))
        name, arguments = parsed
        if name not in self.tools:
            known = ", ".join(sorted(self.tools))
            return PendingCall.ready(Observation(f"error: unknown tool {name!r} (tools: {known})", True))
        late = Observation(f"error: the {name} tool took over {self.timeout_s:g} s", True)
        wrap = lambda value: Observation(cut(str(value), self.max_chars))  # noqa: E731
        return start_call(self.tools[name], arguments, self.timeout_s, wrap, late)

    def format(self, observation: Observation) -> str:
        """A tool's output in the chat template's tool turn; a reply to a plain turn as it is."""
        return tool_response(self.tokenizer, observation.text) if self.tool_turn else observation.text


def _reply(value: Any) -> Observation:
    """An environment's answer to a turn: text to insert, or None to end the episode; anything else fails it."""
    if value is None:
        return Observation("", end=True)
    if not isinstance(value, str):
        return Observation(f"error: respond returned {type(value).__name__}, not text or None", True, True)
    return Observation(value)


# ---------------------------------------------------------------------------------------------- the rollout
@dataclass
class Sampled:
    """Each trajectory's completion and environment instance, prompt-major ([P * G])."""

    completions: list[Completion]
    environments: list[object]
    prompts: list[list[int]]  # each trajectory's prompt ids (the row's, or with reset()'s text)


class EnvironmentRollout(EngineWrapper):
    """An engine with one environment instance per trajectory (see the module docstring)."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        factory: Callable[..., object],
        kwargs: dict | None = None,
        max_turns: int = 4,
        timeout_s: float = 30.0,
        max_chars: int = 2000,
    ) -> None:
        super().__init__(engine)
        self.tokenizer, self.factory = tokenizer, factory
        self.kwargs = dict(kwargs or {})
        self.max_turns, self.timeout_s, self.max_chars = max_turns, timeout_s, max_chars
        self.turns = ToolRollout(engine, tokenizer)

    def sample(
        self,
        prompts: list[list[int]],
        rows: list[dict],
        params: SamplingParams,
        reprompt: Callable[[dict, str], list[int]],
    ) -> Sampled:
        """`params.n` trajectories per prompt: a fresh environment each, reset with its row; `reprompt(row,
        text)` gives the prompt ids when reset() returns text to append to the question."""
        envs, failures, ids = [], [], []
        for prompt, row in zip(prompts, rows, strict=True):
            for _ in range(params.n):
                env, suffix, failure = self._reset(row)
                envs.append(env)
                failures.append(failure)
                ids.append(reprompt(row, suffix) if suffix else list(prompt))
        shared = all(ids[i] == prompts[i // params.n] for i in range(len(ids)))
        episodes = [
            EnvEpisode(e, self.tokenizer, self.max_turns, self.timeout_s, self.max_chars) for e in envs
        ]
        completions = self.turns.run(prompts if shared else ids, episodes, params)
        for c, failure in zip(completions, failures, strict=True):
            c.error = failure or c.error
        return Sampled(completions, envs, ids)

    def _reset(self, row: dict) -> tuple[object, str | None, str | None]:
        """(a new environment, the text reset() returned, why it failed); a failed one answers nothing."""
        try:
            env = self.factory(**self.kwargs)
            suffix = call_now(env.reset, dict(row), self.timeout_s, "reset")
        except Exception as err:  # noqa: BLE001 - a user's class may raise anything
            return _Ended(), None, f"{type(err).__name__}: {str(err)[:300]}"
        if suffix is not None and not isinstance(suffix, str):
            return _Ended(), None, f"reset returned {type(suffix).__name__}, not text or None"
        return env, suffix, None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """The protocol's `generate`, with rows of no columns (rl/rollout.py calls `sample` with the rows)."""
        sampled = self.sample(prompts, [{} for _ in prompts], params, lambda row, text: [])
        flat = sampled.completions
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]


class _Ended:
    """The stand-in for an environment that failed to start: its trajectory ends after the first turn."""

    def reset(self, **row: Any) -> None:
        return None

    def respond(self, turn: str) -> None:
        return None


def environment_reward(env: object, timeout_s: float) -> tuple[float | None, str | None]:
    """(get_reward()'s score, or None; why it failed) for a finished trajectory's environment."""
    get_reward = getattr(env, "get_reward", None)
    if not callable(get_reward):
        return None, None
    try:
        value = call_now(get_reward, {}, timeout_s, "get_reward")
    except EnvironmentSetupError as err:
        return None, str(err)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        return None, f"get_reward returned {type(value).__name__}, not a number or None"
    if value is not None and not math.isfinite(value):
        return None, f"get_reward returned {value}"
    return None if value is None else float(value), None
