"""Multi-turn rollouts (tool calls, environments), on any engine of the protocol, exact to the token.

Each sample has an `Episode`: what decides, at the end of each model turn, whether the sample goes on and what
is inserted before it does. `ToolEpisode` (below) is the tool rollout of `tools:`; rollouts/environments.py
holds the episode of a user's environment. The turn loop, token budgets and exactness are this module's.

`ToolRollout` wraps an engine. A completion is sampled until it closes a call (`call_end`, a stop string), the
call is run (rollouts/tools.py), the observation is appended between `output_start` and `output_end` as
tokens, and the same sequence continues from its exact token prefix (prompt + every token so far, never
decoded and re-encoded: the bug behind verl #3720, #6719), until it ends, runs out of its token budget, or has
made `max_calls` calls. The engine continues from the token prefix: vLLM reuses the prefix's KV cache
(prefix caching), the transformers engine prefills it again.

What comes out is one `Completion` per sample: `token_ids` are the model's tokens and the inserted ones in
order; `tool_mask` marks the inserted ones (their `logprobs` are 0.0 and the loss, KL and entropy leave them
out); `max_new_tokens` bounds the model's tokens only (observations count toward the context, not the budget).
Calls run in threads, all at once. With an engine that reports each sample as it stops (`on_stop`: the
transformers engine), a call starts the moment its sample closes it, while the other samples of the batch keep
decoding; with one that returns whole batches (vLLM's `LLM.generate`), the turn's calls start when it returns.
Either way the next turn waits for the turn's calls.

Defined behaviour at the edges: a call that is never closed is text (the completion ends as it ends); an
empty call is run as such (the tool's error is the observation); a stop at `call_end` with no open
`call_start` before it is not a call: the sequence continues with nothing inserted; every call after
`max_calls` gets the observation "error: no more tool calls" (counted as an error) and the sequence continues.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rollouts.base import Completion, RolloutEngine, SamplingParams
from rollouts.tools import Observation, PendingCall, Toolbox, collect


@dataclass(frozen=True)
class Markers:
    call_start: str
    call_end: str
    output_start: str
    output_end: str


class Episode(Protocol):
    """One sample's side of a multi-turn rollout: it decides, at each model turn's end, what comes next."""

    stop: tuple[str, ...]
    """Strings that end a model turn (beside EOS and the run's own stop strings)."""

    def continues(self, segment: str, finish: str) -> bool:
        """Whether the sample may go on after a turn that produced `segment` (its text, special tokens kept)
        and ended by `finish` with budget left; False ends it with no call made."""
        ...

    def start(self, text: str, segment: str, calls: int) -> PendingCall | None:
        """The turn `segment` ended the completion's `text` so far (both with special tokens), after `calls`
        earlier observations: start what answers it (a tool call, the environment's reply). None: nothing to
        insert, the sample goes on; an observation with `end` set ends the sample instead."""
        ...

    def format(self, observation: Observation) -> str:
        """The text inserted for an observation (its tokens are out of the loss)."""
        ...


@dataclass
class ToolEpisode:
    """The tool rollout of `tools:`: a call between a tool's markers, run by the toolbox, its output between
    the output markers. `markers`: one set for every tool, or each tool's own (several tools in a run)."""

    toolbox: Toolbox
    markers: Markers | dict[str, Markers]
    max_calls: int
    columns: dict

    def _by_tool(self) -> dict[str, Markers]:
        if isinstance(self.markers, Markers):
            return dict.fromkeys(self.toolbox.tools, self.markers)
        return self.markers

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.call_end for m in self._by_tool().values()))

    def continues(self, segment: str, finish: str) -> bool:
        return finish == "stop" and any(segment.endswith(m.call_end) for m in self._by_tool().values())

    def start(self, text: str, segment: str, calls: int) -> PendingCall | None:
        found = _closed_call(text, self._by_tool())
        if found is None:
            return None  # a stop at call_end with no open call: not a call, the sequence just continues
        if calls >= self.max_calls:
            return PendingCall.ready(
                Observation(f"error: no more tool calls (at most {self.max_calls})", True)
            )
        name, call = found
        return self.toolbox.start(call, self.columns, name)

    def format(self, observation: Observation) -> str:
        markers = next(iter(self._by_tool().values()))
        return markers.output_start + observation.text + markers.output_end


def _closed_call(text: str, by_tool: dict[str, Markers]) -> tuple[str, str] | None:
    """(tool, call) for the call the text just closed: among the tools whose call_end ends the text, the one
    whose open call_start comes last; None when it closes none."""
    best: tuple[int, str, str] | None = None
    for name, markers in by_tool.items():
        if not text.endswith(markers.call_end):
            continue
        call = _open_call(text, markers)
        if call is not None and (best is None or len(text) - len(call) > best[0]):
            best = (len(text) - len(call), name, call)
    return None if best is None else (best[1], best[2])


@dataclass
class _Sequence:
    """One sample being built turn by turn."""

    prompt: list[int]
    episode: Episode
    tokens: list[int] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)  # the last turn's tokens
    logprobs: list[float] = field(default_factory=list)
    tool_mask: list[bool] = field(default_factory=list)
    model_tokens: int = 0
    calls: int = 0  # observations inserted
    errors: int = 0
    finish: str = "stop"
    done: bool = False
    pending: PendingCall | None = None  # its call, started while the other sequences were still decoding
    started: bool = (
        False  # whether the answer to its last turn was started while decoding (pending may be None)
    )
    failure: str | None = (
        None  # why its episode failed (an environment that raised, hung or answered nonsense)
    )


class EngineWrapper:
    """The engine protocol around an engine: what a wrapper (tool calls, environments) does not change is
    the engine's."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.shares_policy, self.batch_size = engine.shares_policy, engine.batch_size
        self.standalone, self.summary = engine.standalone, engine.summary

    def update_weights(self, policy: torch.nn.Module) -> None:
        self.engine.update_weights(policy)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()


class ToolRollout(EngineWrapper):
    """The rollout protocol with multi-turn episodes around an engine (see the module docstring): tool calls as
    `tools:` configures them (`generate`), or any episodes (`run`, used for environments)."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        toolbox: Toolbox | None = None,
        markers: Markers | None = None,
        max_calls: int = 0,
    ) -> None:
        super().__init__(engine)
        self.tokenizer, self.toolbox, self.markers, self.max_calls = tokenizer, toolbox, markers, max_calls

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, columns: list[dict] | None = None
    ) -> list[list[Completion]]:
        """The protocol's `generate` with the configured tool; `columns[i]`: the dataset row's fields that
        prompt i's tool calls receive (none when None)."""
        if self.toolbox is None or self.markers is None:
            raise ValueError("ToolRollout.generate needs a toolbox and markers; use run() with episodes")
        columns = columns if columns is not None else [{} for _ in prompts]
        episodes = [
            ToolEpisode(self.toolbox, self.markers, self.max_calls, c)
            for c in columns
            for _ in range(params.n)
        ]
        flat = self.run(prompts, episodes, params)
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def run(
        self, prompts: list[list[int]], episodes: list[Episode], params: SamplingParams
    ) -> list[Completion]:
        """One completion per episode, prompt-major: `params.n` episodes per prompt when the samples of a prompt
        share it, or one prompt per episode (then each is sampled alone, n=1, seed + its index)."""
        n = params.n if len(episodes) == len(prompts) * params.n else 1
        if len(episodes) != len(prompts) * n:
            raise ValueError(f"{len(episodes)} episodes for {len(prompts)} prompts of {params.n} samples")
        each = [p for p in prompts for _ in range(n)]
        sequences = [_Sequence(list(p), e) for p, e in zip(each, episodes, strict=True)]
        out = self.engine.generate(prompts, self._params(params, n, params.max_new_tokens, sequences))
        self._extend(sequences, [c for group in out for c in group], params.max_new_tokens)
        turn = 0
        while live := [s for s in sequences if not s.done]:
            turn += 1
            self._insert_observations(live)
            if not (live := [s for s in live if not s.done]):
                break
            # one batch for the turn, with the largest budget left; each sequence is cut to its own after
            budget = max(params.max_new_tokens - s.model_tokens for s in live)
            continuation = dataclasses.replace(
                self._params(params, 1, budget, live),
                seed=None if params.seed is None else params.seed + turn * 1_000_003,
            )
            out = self.engine.generate([s.prompt + s.tokens for s in live], continuation)
            self._extend(live, [group[0] for group in out], params.max_new_tokens)
        return [self._completion(s) for s in sequences]

    def _params(
        self, params: SamplingParams, n: int, budget: int, sequences: list[_Sequence]
    ) -> SamplingParams:
        """The engine's parameters for a turn: stop where the episodes end a turn too, and start each one's
        answer as soon as the engine reports its sample stopped (`on_stop`), while the other samples decode."""
        extra = dict.fromkeys(stop for s in sequences for stop in s.episode.stop)
        stop = (*params.stop, *(x for x in extra if x not in params.stop))
        on_stop = functools.partial(self._start_early, sequences, params.max_new_tokens)
        return dataclasses.replace(params, n=n, max_new_tokens=budget, stop=stop, on_stop=on_stop)

    def _start_early(self, sequences: list[_Sequence], max_new_tokens: int, i: int, ids: list[int]) -> None:
        """Sample i stopped at `ids`: when its episode goes on (within its budget), start what answers the turn
        now; `_insert_observations` collects it."""
        s = sequences[i]
        if len(ids) >= max_new_tokens - s.model_tokens:
            return  # the budget ends here: nothing is run
        if s.episode.continues(self.tokenizer.decode(ids), "stop"):
            s.pending = s.episode.start(self._text(s.tokens + ids), self._text(ids), s.calls)
            s.started = True

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _extend(self, sequences: list[_Sequence], segments: list[Completion], max_new_tokens: int) -> None:
        """Append each sequence's new segment (cut to its own token budget) and decide whether it goes on: it
        does when its episode says so (a tool episode: the segment ended at `call_end`) with budget left."""
        for s, c in zip(sequences, segments, strict=True):
            room = max_new_tokens - s.model_tokens
            ids, logprobs, finish = (
                c.token_ids[:room],
                (c.logprobs or [0.0] * len(c.token_ids))[:room],
                c.finish_reason,
            )
            if len(c.token_ids) > room:
                finish = "length"
            s.tokens += ids
            s.segment = ids
            s.logprobs += logprobs
            s.tool_mask += [False] * len(ids)
            s.model_tokens += len(ids)
            s.finish = finish
            goes_on = finish == "stop" and s.episode.continues(self.tokenizer.decode(ids), finish)
            s.done = not goes_on or s.model_tokens >= max_new_tokens

    def _insert_observations(self, live: list[_Sequence]) -> None:
        """Collect what answers the live sequences' turns (started while decoding, or now), at once; append
        each observation as tokens, or end the sequence where its episode ends."""
        started, callers = [], []
        for s in live:
            pending, was_started, s.pending, s.started = s.pending, s.started, None, False
            if not was_started:  # not started while decoding (an engine without on_stop): start it now
                pending = s.episode.start(self._text(s.tokens), self._text(s.segment), s.calls)
            if pending is not None:
                started.append(pending)
                callers.append(s)
        for s, observation in zip(callers, collect(started), strict=True):
            if observation.end:
                s.done, s.errors = True, s.errors + observation.error
                s.failure = observation.text if observation.error else s.failure
            else:
                self._append(s, observation)

    def _append(self, s: _Sequence, observation: Observation) -> None:
        text = s.episode.format(observation)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        s.tokens += ids
        s.logprobs += [0.0] * len(ids)
        s.tool_mask += [True] * len(ids)
        s.calls += 1
        s.errors += observation.error

    def _completion(self, s: _Sequence) -> Completion:
        return Completion(
            token_ids=s.tokens,
            logprobs=s.logprobs,
            finish_reason=s.finish,
            text=self.tokenizer.decode(s.tokens, skip_special_tokens=True),
            tool_mask=s.tool_mask if any(s.tool_mask) else None,
            tool_calls=s.calls,
            tool_errors=s.errors,
            error=s.failure,
        )


def _open_call(text: str, markers: Markers) -> str | None:
    """The call the text just closed: what follows the last `call_start` before the final `call_end`, when
    that call_start is not already closed; None when the text ends at a call_end that closes nothing."""
    body = text[: -len(markers.call_end)]
    start = body.rfind(markers.call_start)
    if start < 0 or markers.call_end in body[start + len(markers.call_start) :]:
        return None
    return body[start + len(markers.call_start) :]
