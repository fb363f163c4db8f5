"""When each step's batch is sampled: on-policy (`rollout.max_staleness: 0`) or ahead, with bounded staleness.

    OnPolicy       step s samples its batch with the weights after update s-1, then trains and syncs (today's
                   loop, unchanged)
    Ahead          the batch of step s is sampled by an engine in its own process (rollouts/process_engine.py)
                   from policy version max(0, s-1-k), k = max_staleness, while the trainer updates on earlier
                   batches: after update s the trainer publishes version s and submits the batch of step
                   s+k+1. The schedule of versions is fixed by the step numbers alone, so a run is
                   reproducible and a resume exact: a checkpoint holds the batches still in flight.
                   Each batch is collected and scored by a worker thread as soon as the engine returns it,
                   beside generation and the trainer's update: a slow reward (an HTTP judge) is off the
                   trainer's path unless it takes longer than a step.
Version v is the policy after v updates; a batch trained at step s with version v has staleness s-1-v <= k.
The update corrects for it with the engine's own log-probs of the sampled tokens as the behaviour policy
(rl/update.py), the same ratio the mismatch knobs act on (docs/async.md).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from rl.batch import Groups, Sampler, StepBatch, round_seed, sample_batch, shape_round
from rl.config import Config
from rl.data import PromptSet
from rl.rollout import Rollout, score, trajectory
from rl.trajectory import Trajectory, flatten
from rl.weights import merged_weights
from rollouts import SamplingParams
from rollouts.process_engine import ProcessEngine


class Schedule(Protocol):
    def batch(self, step: int) -> StepBatch:
        """The batch step `step` trains on."""
        ...

    def after_update(self, step: int, policy: torch.nn.Module) -> None:
        """The policy was updated at `step`: make the engine sample from it (now, or for later batches)."""
        ...

    def in_flight(self) -> list[dict]:
        """The batches sampled ahead and not yet trained on, collected, for a checkpoint ([] on-policy)."""
        ...


class OnPolicy:
    """Sample, train, sync, in turn."""

    def __init__(self, source: Sampler, config: Config, params: SamplingParams) -> None:
        self.source, self.config, self.params = source, config, params

    def batch(self, step: int) -> StepBatch:
        return sample_batch(self.source, self.config, self.params, step)

    def after_update(self, step: int, policy: torch.nn.Module) -> None:
        with self.source.dist.together("syncing the weights into the rollout engine"):
            self.source.engine.wake()
            self.source.engine.update_weights(policy)

    def in_flight(self) -> list[dict]:
        return []


@dataclasses.dataclass
class _Sampled:
    """A batch's first round, collected from the engine (and scored, once `scores` is set)."""

    groups: Groups
    wait_s: float
    scores: Rollout | None = None


class Ahead:
    """Batches sampled up to k steps ahead by an engine in another process (see the module docstring)."""

    def __init__(
        self, source: Sampler, engine: ProcessEngine, config: Config, params: SamplingParams, start_step: int,
        saved: list[dict],
    ) -> None:  # fmt: skip
        self.source, self.engine, self.config, self.params = source, engine, config, params
        self.k = config.rollout.max_staleness
        self.collected = {s["step"]: _restore(s, source.prompts) for s in saved}
        # One worker collects and scores each batch as the engine returns it (the math reward's processes live
        # as long as the thread that started them: one long-lived worker); the engine is thread-safe.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aha-collect")
        self.ready: dict[int, Future[_Sampled]] = {}
        engine.label(start_step - 1)  # the weights it was built from: the policy after start_step - 1 updates
        self._fill(start_step + self.k)

    def _fill(self, up_to: int) -> None:
        """Submit the batches of every step up to `up_to` (and the run's last) not yet submitted, and have the
        worker collect and score each."""
        last = max([0, *self.collected, *self.ready])
        for step in range(last + 1, min(up_to, self.config.train.steps) + 1):
            rows = self.source.order.next_batch(self.config.train.prompts_per_step)
            params = dataclasses.replace(self.params, seed=round_seed(self.config.train.seed, step, 0))
            request = self.engine.submit([self.source.prompts.ids[r] for r in rows], params)
            self.ready[step] = self.worker.submit(self._collect_and_score, rows, request)

    def _collect_and_score(self, rows: list[int], request: int) -> _Sampled:
        start = time.perf_counter()
        version, sampled = self.engine.collect(request)
        groups = [
            [trajectory(self.source.prompts, row, c, version) for c in group]
            for row, group in zip(rows, sampled, strict=True)
        ]
        got = _Sampled(groups, time.perf_counter() - start)
        got.scores = self._score(got)
        return got

    def _score(self, got: _Sampled) -> Rollout:
        start = time.perf_counter()
        scores = score(self.source.scorer, flatten(got.groups), self.source.prompts.columns)
        return Rollout(got.groups, scores, got.wait_s, time.perf_counter() - start)

    def _take(self, step: int) -> _Sampled:
        """The batch of `step`, collected and scored (waiting for the worker if need be)."""
        if step in self.collected:  # restored from a checkpoint (scored now), or collected for one
            got = self.collected.pop(step)
            got.scores = got.scores or self._score(got)
            return got
        start = time.perf_counter()
        got = self.ready.pop(step).result()
        got.wait_s = time.perf_counter() - start  # what the trainer waited for it
        return got

    def batch(self, step: int) -> StepBatch:
        got = self._take(step)
        first = shape_round(got.scores, self.config)
        seconds = (got.wait_s, got.scores.score_s)
        return sample_batch(self.source, self.config, self.params, step, prefetched=(first, seconds))

    def after_update(self, step: int, policy: torch.nn.Module) -> None:
        self.engine.publish(merged_weights(policy), step)
        self._fill(step + self.k + 1)

    def in_flight(self) -> list[dict]:
        for step in sorted(self.ready):
            self.collected[step] = self.ready.pop(step).result()
        return [_saved(step, got) for step, got in sorted(self.collected.items())]


def _saved(step: int, got: _Sampled) -> dict:
    return {"step": step, "groups": [[t.to_dict() for t in group] for group in got.groups]}


def _restore(saved: dict, prompts: PromptSet) -> _Sampled:
    """A saved in-flight batch; one saved before trajectories (rows and completions) is read too."""
    if "groups" in saved:
        return _Sampled([[Trajectory.from_dict(t) for t in group] for group in saved["groups"]], 0.0)
    from rollouts import Completion

    n = len(saved["completions"]) // len(saved["rows"])
    completions = [Completion(list(t), list(lp), f, text) for t, lp, f, text in saved["completions"]]
    groups = [
        [trajectory(prompts, row, c, int(saved["version"])) for c in completions[i * n : (i + 1) * n]]
        for i, row in enumerate(saved["rows"])
    ]
    return _Sampled(groups, 0.0)
