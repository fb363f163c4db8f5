"""The rollout stage: rows of a prompt set -> trajectories (rl/trajectory.py) -> scored trajectories.

    generate           G completions of each row from the engine, as groups of trajectories; each row's
                       columns go with its own request (a tool sees the row it was called for, even where two
                       rows share a prompt), and with an environment, one instance per trajectory
    score              the reward functions over trajectories: each one's scores, the total, the verdict
    sample_and_score   both: the one path of a training round, the in-run evaluation and `aha eval`
    with_tools         the engine with multi-turn tool calls, as the config's `tools` section says
    with_environment   the engine with the config's environment (rollouts/environments.py)

Used by the training loop (rl/batch.py, rl/schedule.py), rl/run.py and rl/evaluate.py; it imports neither of
the last two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rewards import RewardResult, RewardScorer
from rewards.scoring import Scope
from rl.data import PromptSet
from rl.trajectory import Trajectory, flatten
from rollouts.base import Completion, RolloutEngine, SamplingParams
from rollouts.environments import EnvironmentRollout, environment_reward
from rollouts.multiturn import ToolRollout
from rollouts.tools import Toolbox

if TYPE_CHECKING:
    from rl.config import Config


def trajectory(
    prompts: PromptSet, row: int, completion: Completion, version: int | None = None
) -> Trajectory:
    """A fresh (unscored) trajectory of row `row` from the engine's completion."""
    return Trajectory(
        group=0,
        prompt_ids=prompts.ids[row],
        completion_ids=completion.token_ids,
        logprobs=completion.logprobs,
        inserted=completion.tool_mask,
        row_index=row,
        row=prompts.rows[row],
        prompt=prompts.texts[row],
        text=completion.text,
        finish_reason=completion.finish_reason,
        version=version,
        turns=1 + completion.tool_calls,
        tool_calls=completion.tool_calls,
        tool_errors=completion.tool_errors,
        error=completion.error,
    )


def columns(prompts: PromptSet, row: int) -> dict[str, Any]:
    """The fields of a row that reward functions and tools receive: every field but the prompt."""
    return {k: prompts.rows[row].get(k) for k in prompts.columns}


def _engine_generate(
    engine: RolloutEngine, prompts: PromptSet, rows: list[int], params: SamplingParams
) -> list[list[Trajectory]]:
    ids = [prompts.ids[r] for r in rows]
    if isinstance(engine, EnvironmentRollout):
        return _with_environments(engine, prompts, rows, params)
    if isinstance(engine, ToolRollout):  # its tools are called with each row's own columns
        sampled = engine.generate(ids, params, [columns(prompts, r) for r in rows])
    else:
        sampled = engine.generate(ids, params)
    return [[trajectory(prompts, r, c) for c in group] for r, group in zip(rows, sampled, strict=True)]


def _with_environments(
    engine: EnvironmentRollout, prompts: PromptSet, rows: list[int], params: SamplingParams
) -> list[list[Trajectory]]:
    """Trajectories of `rows`, one environment instance each: its prompt (with reset()'s text), its episode,
    and its own score (get_reward) once finished."""
    sampled = engine.sample(
        [prompts.ids[r] for r in rows], [prompts.rows[r] for r in rows], params, prompts.encode
    )
    groups: list[list[Trajectory]] = []
    for i, row in enumerate(rows):
        group = []
        for j in range(i * params.n, (i + 1) * params.n):
            t = trajectory(prompts, row, sampled.completions[j])
            t.prompt_ids, t.environment = sampled.prompts[j], sampled.environments[j]
            if t.error is None:
                t.env_reward, t.error = environment_reward(t.environment, engine.timeout_s)
            group.append(t)
        groups.append(group)
    return groups


def generate(
    prompts: PromptSet,
    engine: RolloutEngine,
    rows: list[int],
    params: SamplingParams,
    *,
    per_call: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[list[Trajectory]]:
    """`params.n` trajectories of each of `rows`, one group per row (`parts`, joined)."""
    return [g for part in parts(prompts, engine, rows, params, per_call, advance) for g in part]


def parts(
    prompts: PromptSet,
    engine: RolloutEngine,
    rows: list[int],
    params: SamplingParams,
    per_call: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> Iterator[list[list[Trajectory]]]:
    """The groups of `rows`, `per_call` rows at a time as the engine finishes them (None: all in one call),
    the seed moved on by each call's offset, so row i keeps the stream `seed + i` the protocol promises;
    `advance(n)` hears of each call's n rows (a progress bar)."""
    step = per_call or max(len(rows), 1)
    for start in range(0, len(rows), step):
        part = rows[start : start + step]
        seed = None if params.seed is None else params.seed + start
        yield _engine_generate(engine, prompts, part, dataclasses.replace(params, seed=seed))
        if advance is not None:
            advance(len(part))


def score(
    scorer: RewardScorer, trajectories: list[Trajectory], names: list[str], scope: Scope | None = None
) -> RewardResult:
    """Score trajectories with the reward functions (TRL's contract: prompts, completions, a list per column
    in `names`; with an environment also `environments` and its own scores, `environment_reward`) and fill
    each one's `scores`, `reward` (the weighted total) and `correct` (`fill`). With a `scope` (rewards/scoring.py:
    the per-group or the batch-level rewards only) the result is a part, for `RewardScorer.combine`, and
    nothing is filled."""
    values = {k: [t.row.get(k) for t in trajectories] for k in names}
    if any(t.environment is not None for t in trajectories):
        values["environments"] = [t.environment for t in trajectories]
        values["environment_reward"] = [t.env_reward for t in trajectories]
    result = scorer([t.prompt for t in trajectories], [t.text for t in trajectories], values, scope=scope)
    if scope is None:
        fill(trajectories, result)
    return result


def fill(trajectories: list[Trajectory], result: RewardResult) -> None:
    """Each trajectory's scores, total and verdict from the result; one whose environment failed is left
    unscored (NaN), whatever the functions said."""
    for i, t in enumerate(trajectories):
        t.scores = {name: scores[i] for name, scores in result.per_function.items()}
        t.reward = result.total[i]
        t.correct = None if result.correct is None else result.correct[i]
        if t.error is not None:
            t.scores, t.reward, t.correct = dict.fromkeys(t.scores), math.nan, None


@dataclass
class Rollout:
    """Trajectories of some rows, scored, with the reward result (its metrics) and the seconds each part took."""

    groups: list[list[Trajectory]]  # [P][G]
    scores: RewardResult
    sample_s: float
    score_s: float

    @property
    def trajectories(self) -> list[Trajectory]:
        return flatten(self.groups)


def sample_and_score(
    prompts: PromptSet,
    engine: RolloutEngine,
    scorer: RewardScorer,
    rows: list[int],
    params: SamplingParams,
    *,
    generation: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    per_call: int | None = None,
    advance: Callable[[int], None] | None = None,
    overlap: bool = False,
) -> Rollout:
    """`parts` inside `generation()` (the loop's: a sharded policy gathered whole, mixed precision), then
    `score`. With `overlap`, each part's groups are scored by the per-group rewards as soon as the engine
    returns them, while the next part is generated; the batch-level rewards then score the whole batch.
    `score_s` is the scoring left after generation: what rewards add to the step."""
    start = time.perf_counter()
    groups: list[list[Trajectory]] = []
    scored: list[Future[RewardResult]] = []
    with generation():
        for part in parts(prompts, engine, rows, params, per_call, advance):
            groups += part
            if overlap:
                scored.append(_scoring().submit(score, scorer, flatten(part), prompts.columns, "group"))
    sample_s = time.perf_counter() - start
    start = time.perf_counter()
    if overlap:
        batch = score(scorer, flatten(groups), prompts.columns, "batch") if scorer.batch_level else None
        result = scorer.combine([f.result() for f in scored], batch)
        fill(flatten(groups), result)
    else:
        result = score(scorer, flatten(groups), prompts.columns)
    return Rollout(groups, result, sample_s, time.perf_counter() - start)


_SCORER: ThreadPoolExecutor | None = None


def _scoring() -> ThreadPoolExecutor:
    """One long-lived worker thread scoring parts beside generation (the math reward's processes live as long
    as the thread that started them)."""
    global _SCORER
    if _SCORER is None:
        _SCORER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aha-score")
    return _SCORER


def tool_context(config: Config) -> int:
    """Context what tools or an environment insert may take (it does not count toward max_new_tokens)."""
    if config.environment.name:
        return config.environment.max_turns * config.environment.max_output_tokens
    return config.tools.max_calls * config.tools.max_output_tokens if config.tools.use else 0


def with_tools(engine: RolloutEngine, tokenizer: Any, config: Config) -> ToolRollout | EnvironmentRollout:
    """The engine with multi-turn tool calls: every tool of `tools.use`, called between its own markers (the
    section's where it sets none; rollouts/multiturn.py), or in the JSON function-calling format
    (`tools.format: json`: the tools as an environment's methods, rollouts/environments.py)."""
    from rollouts.multiturn import Markers
    from rollouts.tools import Toolbox, resolve_tool

    tools = config.tools
    _check_tools(tools.use)
    toolbox = Toolbox(
        {spec.name: resolve_tool(spec.name) for spec in tools.use},
        {spec.name: dict(spec.kwargs) for spec in tools.use},
        tools.timeout_s,
        tools.max_output_chars,
    )
    if tools.format == "json":
        return EnvironmentRollout(
            engine, tokenizer, functools.partial(ToolsEnvironment, toolbox), max_turns=tools.max_calls + 1,
            timeout_s=tools.timeout_s, max_chars=tools.max_output_chars,
        )  # fmt: skip
    markers = {
        spec.name: Markers(
            spec.call_start or tools.call_start, spec.call_end or tools.call_end, tools.output_start,
            tools.output_end,
        )
        for spec in tools.use
    }  # fmt: skip
    return ToolRollout(engine, tokenizer, toolbox, markers, tools.max_calls)


def _check_tools(specs: list) -> None:
    """What a tool needs, checked when the run starts rather than at every call: the `python` tool's sandbox
    (bwrap, and its read_only_paths)."""
    from rewards.sandbox import check_sandbox

    for spec in specs:
        if spec.name == "python":
            check_sandbox(read_only_paths=spec.kwargs.get("read_only_paths"))


class ToolsEnvironment:
    """The tools of `tools:` as an environment's methods, for the JSON function-calling format: the model
    calls `{"name": TOOL, "arguments": {ARG: ...}}`, ARG the tool's first parameter (`call` for the
    built-ins); the tool gets its options and the row's columns, as in the marker format."""

    def __init__(self, toolbox: Toolbox) -> None:
        self._row: dict = {}
        for name, fn in toolbox.tools.items():
            setattr(self, name, types.MethodType(_tool_method(fn, toolbox.options.get(name, {})), self))

    def reset(self, **row: Any) -> None:
        self._row = row


def _tool_method(fn: Callable[..., Any], options: dict) -> Callable[..., Any]:
    first = _first_parameter(fn)

    def method(self: ToolsEnvironment, **arguments: Any) -> str:
        if set(arguments) != {first}:
            raise TypeError(f"takes one argument, {first!r}; got {sorted(arguments)}")
        return fn(arguments[first], **options, **self._row)

    return method


def _first_parameter(fn: Callable[..., Any]) -> str:
    return next(iter(inspect.signature(fn).parameters), "call")


def tool_schemas(specs: list) -> list[dict]:
    """JSON schemas of `tools:` tools for a chat template: each one's name, its docstring's first paragraph,
    and its one string argument."""
    from rollouts.tools import resolve_tool

    schemas = []
    for spec in specs:
        fn = resolve_tool(spec.name)
        doc = (inspect.getdoc(fn) or spec.name).split("\n\n")[0].replace("\n", " ")
        arg = _first_parameter(fn)
        parameters = {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}
        schemas.append(
            {
                "type": "function",
                "function": {"name": spec.name, "description": doc, "parameters": parameters},
            }
        )
    return schemas


def prompt_tools(config: Config) -> list | None:
    """What a chat template renders into each prompt for the model to call: an environment's tool methods,
    or the JSON schemas of `tools:` with `tools.format: json`; None otherwise."""
    from rollouts.environments import tool_methods

    if config.environment.name:
        env = resolve_environment(config.environment.name)(**config.environment.kwargs)
        return list(tool_methods(env).values()) or None
    if config.tools.use and config.tools.format == "json":
        return tool_schemas(config.tools.use)
    return None


def with_environment(engine: RolloutEngine, tokenizer: Any, config: Config) -> EnvironmentRollout:
    """The engine with the config's environment: one instance of its class per trajectory."""
    env = config.environment
    return EnvironmentRollout(
        engine, tokenizer, resolve_environment(env.name), env.kwargs, env.max_turns, env.timeout_s
    )


def resolve_environment(name: str) -> Callable[..., object]:
    """The environment class named `module:Class` (imported as reward paths are), checked for a reset method."""
    from rewards.registry import RewardError, import_object
    from rollouts.environments import EnvironmentSetupError

    try:
        obj = import_object(name, "environment")
    except RewardError as err:
        raise EnvironmentSetupError(str(err)) from None
    if not callable(getattr(obj, "reset", None)):
        raise EnvironmentSetupError(
            f"environment {name!r} has no reset method: an environment needs reset(**row) -> str | None "
            "(docs/environments.md)"
        )
    return obj
