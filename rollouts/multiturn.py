"""Multi-turn rollouts with tool calls, on any engine of the protocol, exact to the token.

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
from typing import Any

import torch

from rollouts.base import Completion, RolloutEngine, SamplingParams
from rollouts.tools import Observation, PendingCall, Toolbox


@dataclass(frozen=True)
class Markers:
    call_start: str
    call_end: str
    output_start: str
    output_end: str


@dataclass
class _Sequence:
    """One sample being built turn by turn."""

    prompt: list[int]
    columns: dict
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tool_mask: list[bool] = field(default_factory=list)
    model_tokens: int = 0
    calls: int = 0
    errors: int = 0
    finish: str = "stop"
    done: bool = False
    pending: PendingCall | None = None  # its call, started while the other sequences were still decoding


class ToolRollout:
    """The rollout protocol with tool calls, around an engine (see the module docstring)."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Any,
        toolbox: Toolbox,
        markers: Markers,
        max_calls: int,
    ) -> None:
        self.engine, self.tokenizer, self.toolbox, self.markers = engine, tokenizer, toolbox, markers
        self.max_calls = max_calls
        self.shares_policy, self.batch_size = engine.shares_policy, engine.batch_size
        self.standalone, self.summary = engine.standalone, engine.summary

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, columns: list[dict] | None = None
    ) -> list[list[Completion]]:
        """The protocol's `generate`; `columns[i]`: the dataset row's fields that prompt i's tool calls receive
        (none when None)."""
        columns = columns if columns is not None else [{} for _ in prompts]
        sequences = [
            _Sequence(list(p), c) for p, c in zip(prompts, columns, strict=True) for _ in range(params.n)
        ]
        first = self._params(params, params.n, params.max_new_tokens, sequences)
        out = self.engine.generate(prompts, first)
        self._extend(sequences, [c for group in out for c in group], params.max_new_tokens)
        turn = 0
        while live := [s for s in sequences if not s.done]:
            turn += 1
            self._insert_observations(live)
            # one batch for the turn, with the largest budget left; each sequence is cut to its own after
            budget = max(params.max_new_tokens - s.model_tokens for s in live)
            continuation = dataclasses.replace(
                self._params(params, 1, budget, live),
                seed=None if params.seed is None else params.seed + turn * 1_000_003,
            )
            out = self.engine.generate([s.prompt + s.tokens for s in live], continuation)
            self._extend(live, [group[0] for group in out], params.max_new_tokens)
        flat = [self._completion(s) for s in sequences]
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _params(
        self, params: SamplingParams, n: int, budget: int, sequences: list[_Sequence]
    ) -> SamplingParams:
        """The engine's parameters for a turn: stop at call_end too, and start each call as soon as the
        engine reports its sample stopped (`on_stop`), while the other samples decode."""
        stop = (*params.stop, self.markers.call_end)
        on_stop = functools.partial(self._start_call, sequences, params.max_new_tokens)
        return dataclasses.replace(params, n=n, max_new_tokens=budget, stop=stop, on_stop=on_stop)

    def _start_call(self, sequences: list[_Sequence], max_new_tokens: int, i: int, ids: list[int]) -> None:
        """Sample i stopped at `ids`: when that closes a call it may make (within its budget and max_calls),
        start the call now; `_insert_observations` collects it."""
        s = sequences[i]
        if len(ids) >= max_new_tokens - s.model_tokens or s.calls >= self.max_calls:
            return  # the budget ends here (no call is run), or past max_calls (answered in _insert_observations)
        if not self._ends_at_call_end(ids):
            return
        call = self._closed_call(s.tokens + ids)
        if call is not None:
            s.pending = self.toolbox.start(call, s.columns)

    def _ends_at_call_end(self, segment: list[int]) -> bool:
        """Whether a sampled segment stopped at `call_end` (rather than at EOS or a user's stop string)."""
        return self.tokenizer.decode(segment).endswith(self.markers.call_end)

    def _closed_call(self, tokens: list[int]) -> str | None:
        """The call a completion's tokens end by closing (see `_open_call`)."""
        return _open_call(self.tokenizer.decode(tokens, skip_special_tokens=False), self.markers)

    def _extend(self, sequences: list[_Sequence], segments: list[Completion], max_new_tokens: int) -> None:
        """Append each sequence's new segment (cut to its own token budget) and decide whether it goes on: it
        does when the segment ended at `call_end` with budget left."""
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
            s.logprobs += logprobs
            s.tool_mask += [False] * len(ids)
            s.model_tokens += len(ids)
            s.finish = finish
            at_call_end = finish == "stop" and self._ends_at_call_end(ids)
            s.done = not at_call_end or s.model_tokens >= max_new_tokens

    def _insert_observations(self, live: list[_Sequence]) -> None:
        """Run the calls the live sequences just closed, at once; append their observations as tokens."""
        started, callers = [], []
        for s in live:
            pending, s.pending = s.pending, None
            if pending is None:  # not started while decoding (an engine without on_stop): start it now
                call = self._closed_call(s.tokens)
                if call is None:
                    continue  # a stop at call_end with no open call: not a call, the sequence just continues
                if s.calls >= self.max_calls:
                    self._append(
                        s, Observation(f"error: no more tool calls (at most {self.max_calls})", True)
                    )
                    continue
                pending = self.toolbox.start(call, s.columns)
            started.append(pending)
            callers.append(s)
        for s, observation in zip(callers, self.toolbox.finish(started), strict=True):
            self._append(s, observation)

    def _append(self, s: _Sequence, observation: Observation) -> None:
        m = self.markers
        ids = self.tokenizer(m.output_start + observation.text + m.output_end, add_special_tokens=False)[
            "input_ids"
        ]
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
        )

    # the rest of the protocol is the engine's
    def update_weights(self, policy: torch.nn.Module) -> None:
        self.engine.update_weights(policy)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()


def _open_call(text: str, markers: Markers) -> str | None:
    """The call the text just closed: what follows the last `call_start` before the final `call_end`, when
    that call_start is not already closed; None when the text ends at a call_end that closes nothing."""
    body = text[: -len(markers.call_end)]
    start = body.rfind(markers.call_start)
    if start < 0 or markers.call_end in body[start + len(markers.call_start) :]:
        return None
    return body[start + len(markers.call_start) :]
