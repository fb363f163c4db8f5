"""One step's training batch: prompts -> G trajectories each -> rewards -> group-relative advantages.

    sample_batch        sampling rounds (DAPO's dynamic sampling may take several) over whole groups, with
                        overlong shaping and filtering
    rank_advantages     each group's advantages (over its scored samples only)
    assign_advantages   the advantages into the trajectories, which the update then reads (rl/trajectory.py)

Masks, one vocabulary: `scored` (a reward function scored the sample: its reward is not NaN) and `trainable`
(scored, and not dropped by overlong filtering: it enters the loss). Token masks are the update's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from rewards import RewardResult, RewardScorer
from rl.config import AlgorithmConfig, Config
from rl.data import PromptSampler, PromptSet
from rl.distributed import Distributed
from rl.errors import AhaError
from rl.grpo import group_advantages, informative_groups, overlong_penalty, passk_advantages
from rl.rollout import Rollout, sample_and_score
from rl.trajectory import Trajectory, flatten
from rollouts import RolloutEngine, SamplingParams

Groups = list[list[Trajectory]]  # [P][G]: each prompt's G trajectories


def group_tensor(groups: Groups, field: str, size: int) -> torch.Tensor:
    """[P, G] of a trajectory field over groups: `reward` (float, NaN unscored), `scored` or `trainable`
    (bool). `size` (G) gives the shape when there are no groups."""
    if field == "reward":
        return torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float32).view(-1, size)
    return torch.tensor([[getattr(t, field) for t in g] for g in groups], dtype=torch.bool).view(-1, size)


@dataclass
class Round:
    """One sampling round: every group it sampled (an unfiltered view), scored and shaped."""

    groups: Groups
    scores: RewardResult  # the reward functions' result over the round (its metrics)

    def tensor(self, field: str) -> torch.Tensor:
        return group_tensor(self.groups, field, len(self.groups[0]) if self.groups else 0)


@dataclass
class StepBatch:
    """The groups one step trains on, and the first sampling round (for the step's reward metrics)."""

    groups: Groups
    first_round: Round
    rounds: int
    dropped_groups: int
    rollout_s: float
    reward_s: float

    @property
    def trajectories(self) -> list[Trajectory]:
        return flatten(self.groups)

    def stacked(self, field: str) -> torch.Tensor:
        """[P, G] of a trajectory field (`reward`, `scored`, `trainable`) over the kept groups."""
        first = self.first_round.groups
        return group_tensor(self.groups, field, len(first[0]) if first else 0)

    def metrics(self, policy_version: int | None = None) -> dict[str, float]:
        """Rounds and groups; with `policy_version` (the version being trained, asynchronous rollouts) also the
        staleness of the trained groups: how many versions older the weights that sampled them are."""
        out = {
            "rollout/sampling_rounds": float(self.rounds),
            "rollout/dropped_groups": float(self.dropped_groups),
            "rollout/trained_groups": float(len(self.groups)),
        }
        if policy_version is not None:
            versions = [g[0].version for g in self.groups]
            lag = [policy_version - (policy_version if v is None else v) for v in versions]
            out["rollout/staleness_mean"] = sum(lag) / len(lag) if lag else 0.0
            out["rollout/staleness_max"] = float(max(lag, default=0))
        return out


@dataclass
class Sampler:
    """What sampling a batch needs: the engine and rewards, the prompts and their order, the ranks."""

    engine: RolloutEngine
    scorer: RewardScorer
    prompts: PromptSet
    order: PromptSampler
    dist: Distributed
    generation: Callable[[], AbstractContextManager]  # entered around every generate (rl/run.py)


def round_seed(seed: int, step: int, round_index: int) -> int:
    """The sampling seed of a step's round: prompt i of the round (its global position) draws from the stream
    seed + i (rollouts.base.SamplingParams), so the three are spread far apart: 2^16 positions per round,
    1009 rounds per step, a million steps per seed (all prime-ish strides, never colliding in practice)."""
    return (seed * 1_000_003 + step * 1_009 + round_index) * 65_536


def sample_batch(
    source: Sampler,
    config: Config,
    params: SamplingParams,
    step: int,
    prefetched: tuple[Round, tuple[float, float]] | None = None,
) -> StepBatch:
    """Prompts -> G completions each -> rewards, with DAPO's options.

    Overlong shaping adds a penalty to completions that run into the token-limit buffer; overlong filtering
    keeps truncated completions out of the loss. Dynamic sampling drops groups whose rewards are all equal
    and samples more prompts, for at most algorithm.dynamic_max_rounds extra rounds. With several ranks,
    every rank draws the same global prompts and keeps its slice; prompt i of a round is sampled with seed
    base + i (its global position), so what a prompt gets is the same on any number of ranks. `prefetched`:
    the first round, already sampled and scored (asynchronous rollouts), with its seconds.
    """
    algo, dist = config.algorithm, source.dist
    wanted = config.train.prompts_per_step // dist.world
    max_rounds = 1 + (algo.dynamic_max_rounds if algo.dynamic_sampling else 0)
    kept: Groups = []
    first, rounds, dropped, rollout_s, reward_s = None, 0, 0, 0.0, 0.0
    while rounds < max_rounds:
        missing = int(dist.max(wanted - len(kept)))  # ranks draw in lockstep, so their samplers stay equal
        if missing == 0:
            break
        if rounds == 0 and prefetched is not None:
            this, seconds = prefetched
        else:
            rows = dist.shard(source.order.next_batch(missing * dist.world))[: wanted - len(kept)]
            base = round_seed(config.train.seed, step, rounds) + dist.rank * missing
            this, seconds = _sample_round(source, rows, dataclasses.replace(params, seed=base), config)
        rollout_s, reward_s = rollout_s + seconds[0], reward_s + seconds[1]
        first = first or this
        keep = (
            informative_groups(this.tensor("reward"), this.tensor("scored"))
            if algo.dynamic_sampling
            else torch.ones(len(this.groups), dtype=torch.bool)
        )
        dropped += int((~keep).sum())
        kept += [this.groups[g] for g in keep.nonzero().flatten().tolist()]
        rounds += 1
    return StepBatch(kept, first, rounds, dropped, rollout_s, reward_s)


def _sample_round(
    source: Sampler, rows: list[int], params: SamplingParams, config: Config
) -> tuple[Round, tuple[float, float]]:
    """One round: generate and score `rows` (every rank together), then shape and mask the rewards. An engine
    that decodes in batches (the transformers engine) is given one at a time, and each batch's groups are
    scored while the next is generated."""
    size = source.engine.batch_size
    per_call = max(1, size // params.n) if size else None  # the engine's own batches: the same samples
    with source.dist.together("sampling and scoring"):
        sampled = sample_and_score(
            source.prompts, source.engine, source.scorer, rows, params, generation=source.generation,
            per_call=per_call, overlap=True,
        )  # fmt: skip
    return shape_round(sampled, config), (sampled.sample_s, sampled.score_s)


def shape_round(sampled: Rollout, config: Config) -> Round:
    """A round from scored trajectories: overlong shaping of each reward, and which enter the loss."""
    algo, trajectories = config.algorithm, sampled.trajectories
    if algo.overlong_buffer and trajectories:
        lengths = torch.tensor([t.model_tokens for t in trajectories])
        penalties = overlong_penalty(
            lengths, config.rollout.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty
        ).tolist()
        for t, penalty in zip(trajectories, penalties, strict=True):
            t.reward += penalty
    for t in trajectories:
        t.trainable = t.scored and not (algo.overlong_filter and t.finish_reason == "length")
    return Round(sampled.groups, sampled.scores)


def rank_advantages(batch: StepBatch, algo: AlgorithmConfig, dist: Distributed) -> torch.Tensor:
    """Advantages [P, G] of this rank's groups, over scored samples only (an unscored one gets 0 and moves no
    statistic). Groups never span ranks, so only the batch scales need the other ranks' rewards."""
    rewards, scored = batch.stacked("reward"), batch.stacked("scored")
    if algo.advantage == "passk":
        if bool(((rewards != 0) & (rewards != 1) & scored).any()):
            raise AhaError(
                "algorithm.advantage=passk needs rewards of 0 or 1 (one accuracy reward, no shaping); this "
                "step's rewards hold other values"
            )
        return passk_advantages(rewards, algo.passk_k, scored=scored)
    tokens = torch.tensor([[t.model_tokens for t in g] for g in batch.groups], dtype=torch.float32)
    tokens = tokens.view(rewards.shape)  # [P, G] what REINFORCE++'s token whitening weighs each sample by
    if not algo.scale.startswith("batch") or not dist.enabled:
        return group_advantages(rewards, algo.baseline, algo.scale, scored=scored, lengths=tokens)  # [P, G]
    per_rank = dist.gather_objects((rewards.cpu(), scored.cpu(), tokens))
    all_rewards, all_scored, all_tokens = (torch.cat(parts) for parts in zip(*per_rank, strict=True))
    everything = group_advantages(
        all_rewards, algo.baseline, algo.scale, scored=all_scored, lengths=all_tokens
    )  # [P * world, G]
    offset = sum(len(r) for r, _, _ in per_rank[: dist.rank])
    return everything[offset : offset + len(rewards)]


def assign_advantages(batch: StepBatch, advantages: torch.Tensor) -> list[Trajectory]:
    """Write each group's advantages [P, G] and its index into its trajectories; returns them, prompt-major:
    what the update trains on."""
    for g, (group, row) in enumerate(zip(batch.groups, advantages.tolist(), strict=True)):
        for t, a in zip(group, row, strict=True):
            t.group, t.advantage = g, float(a)
    return batch.trajectories
