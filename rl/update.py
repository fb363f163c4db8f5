"""The policy update of one step: epochs x mini-batches of optimizer steps, each accumulated over micro-batches.

    update_policy        the schedule: old log-probs when the batch is reused, then for each mini-batch the
                         micro-batches' forward/backward, NaN guard, gradient clipping and the optimizer step
    micro_batch_loss     the loss of one micro-batch, a pure function of its tensors and the loss knobs
                         (policy loss, mismatch correction, token selection, KL; rl/grpo.py, rl/losses.py)
    lockstep_chunks      micro-batches in the order that pads least, padded with zero-weight repeats so every
                         rank runs as many forward/backward passes (DDP and FSDP passes are collective)
Loss normalisers count the whole mini-batch over all ranks, so micro-batch losses (and DDP's averaged,
world-size-scaled gradients) add up to the one-process loss. Also the learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from rl import metrics as M
from rl.config import AlgorithmConfig, Config
from rl.distributed import Distributed
from rl.grpo import aggregate_loss, kl_penalty, policy_loss
from rl.logprobs import PackedBatch, completion_logprobs, pack
from rl.losses import (
    cispo_loss,
    clip_cov_loss,
    gspo_loss,
    kl_cov_loss,
    mismatch_correction,
    sequence_log_ratio,
    top_entropy_mask,
)
from rl.models import autocast
from rl.trajectory import Trajectory
from rl.weights import is_sharded

COV_FRAC = {"kl_cov": 2e-3, "clip_cov": 2e-4}
"""The fraction of tokens KL-Cov / Clip-Cov act on by default (Cui et al. 2025; verl's recipe/entropy)."""


@dataclass
class MicroBatch:
    """The tensors of one micro-batch's loss, all [b, T] but `advantages` [b]; `mask` marks completion tokens."""

    logprobs: torch.Tensor  # current policy, with gradient
    old_logprobs: torch.Tensor  # the policy that sampled the batch (trainer's numerics)
    rollout_logprobs: torch.Tensor  # the engine's
    advantages: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor | None = None  # with algorithm.kl_coef > 0
    old_is_rollout: bool = False  # sampled ahead (async): old_logprobs are the engine's, the behaviour policy

    @property
    def trainer_side(self) -> torch.Tensor:
        """The trainer-side log-probs the mismatch correction compares with the engine's: the policy that
        sampled, as the trainer computes it; when batches are sampled ahead, the current policy's."""
        return self.logprobs.detach() if self.old_is_rollout else self.old_logprobs


@dataclass
class LossParts:
    """A micro-batch's loss and what it did, for the step's metrics (rl/metrics.py UpdateAccumulator)."""

    loss: torch.Tensor  # scalar: this micro-batch's share of the mini-batch loss
    pg_loss: torch.Tensor  # scalar: its policy-gradient part
    kl: torch.Tensor | None  # [b, T] per-token KL estimate
    clip_low: torch.Tensor  # [b, T] bool
    clip_high: torch.Tensor  # [b, T] bool
    counts: dict[str, tuple[float, float]]  # metric -> (numerator, denominator), summed over micro-batches
    ranges: dict[str, tuple[float, float]]  # metric prefix -> (min, max) over the step


def micro_batch_loss(mb: MicroBatch, algo: AlgorithmConfig, norm: dict[str, int]) -> LossParts:
    """The loss of one micro-batch:

        L = agg( w_t * keep_t * l_t ) + kl_coef * agg( KL_t )
    l_t the per-token policy loss (ppo_clip with ratio_level token | sequence | sequence_token, cispo, kl_cov,
    clip_cov), w_t the mismatch correction (tis, token_mask, sequence_mask; 1 when none), keep_t the
    high-entropy token selection (1 when off), agg `algo.loss_agg` with the mini-batch normalisers `norm`
    (max_len, num_seqs, num_tokens): masked tokens count in the normaliser, so micro-batches still add up.
    """
    logp, mask = mb.logprobs, mb.mask
    counts: dict[str, tuple[float, float]] = {}
    ranges: dict[str, tuple[float, float]] = {}
    per_token, clip_low, clip_high = _policy_loss(mb, algo, counts, ranges)
    if algo.mismatch != "none":
        fix = mismatch_correction(
            mb.trainer_side, mb.rollout_logprobs, mask, algo.mismatch, algo.mismatch_low, algo.mismatch_high
        )
        per_token = per_token * fix.weights
        tokens = float(mask.sum())
        counts["rollout/mismatch_masked_frac"] = (tokens - float(fix.kept.sum()), tokens)
        if algo.mismatch == "tis":
            counts["rollout/tis_capped_frac"] = (
                float((fix.ratio > algo.mismatch_high)[mask.bool()].sum()),
                tokens,
            )
    if algo.entropy_top_frac is not None:
        keep = top_entropy_mask(mb.entropy, mask, algo.entropy_top_frac)  # [b, T]
        per_token = per_token * keep
        counts["policy/entropy_kept_frac"] = (float(keep.sum()), float(mask.sum()))
    pg_loss = aggregate_loss(per_token, mask, algo.loss_agg, **norm)
    loss, kl = pg_loss, None
    if algo.kl_coef:
        kl = kl_penalty(logp, mb.ref_logprobs, algo.kl_estimator)  # [b, T]
        loss = loss + algo.kl_coef * aggregate_loss(kl, mask, algo.loss_agg, **norm)
    return LossParts(loss, pg_loss, kl, clip_low, clip_high, counts, ranges)


def _policy_loss(
    mb: MicroBatch, algo: AlgorithmConfig, counts: dict, ranges: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token policy loss [b, T] the knobs choose, with its clip flags; records what it did."""
    logp, old, adv, mask = mb.logprobs, mb.old_logprobs, mb.advantages, mb.mask
    if algo.ratio_level != "token":
        out = gspo_loss(
            logp, old, adv, mask, algo.clip_low, algo.clip_high, algo.ratio_level == "sequence_token"
        )
        seq_ratio = torch.exp(sequence_log_ratio(logp.detach(), old, mask))  # [b]
        ranges["policy/seq_ratio"] = (float(seq_ratio.min()), float(seq_ratio.max()))
        return out
    if algo.policy_loss == "cispo":
        return cispo_loss(logp, old, adv, algo.clip_low, algo.clip_high)
    if algo.policy_loss == "kl_cov":
        loss, penalised = kl_cov_loss(
            logp, old, adv, mask, algo.cov_frac or COV_FRAC["kl_cov"], algo.kl_cov_coef
        )
        counts["policy/cov_frac"] = (float(penalised.sum()), float(mask.sum()))
        none = torch.zeros_like(penalised)
        return loss, none, none
    if algo.policy_loss == "clip_cov":
        loss, low, high, dropped = clip_cov_loss(
            logp, old, adv, mask, algo.clip_low, algo.clip_high, algo.cov_frac or COV_FRAC["clip_cov"]
        )
        counts["policy/cov_frac"] = (float(dropped.sum()), float(mask.sum()))
        return loss, low, high
    return policy_loss(logp, old, adv, algo.clip_low, algo.clip_high, algo.dual_clip)


@dataclass
class Trainee:
    """What the update trains: the policy, the module its forward runs through, the reference model."""

    trainer: torch.nn.Module  # CompletionLogprobs(policy), DDP-wrapped or FSDP-sharded with several ranks
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # a frozen CompletionLogprobs, or None (no KL, or LoRA: adapters off)
    pad_id: int


def update_policy(
    model: Trainee,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    samples: list[Trajectory],
    config: Config,
    dist: Distributed,
) -> dict[str, float]:
    """epochs x mini-batches optimizer steps over one generation batch; returns the update's metrics.

    `model.trainer` computes the log-probs in its forward and, with several ranks, averages gradients over
    them in its backward.
    """
    algo = config.algorithm
    # The behaviour policy the ratio is taken against: the engine's own log-probs when batches are sampled
    # ahead by older weights (rollout.max_staleness >= 1); else the trainer's, recorded before the first step
    # when several steps reuse the batch, or (one step) the current log-probs themselves.
    behaviour = config.rollout.max_staleness > 0
    single_update = algo.epochs == 1 and algo.minibatches == 1
    old = None if single_update or behaviour else old_logprobs(model, samples, config, dist)
    sums = M.UpdateAccumulator()
    model.policy.train()
    for _ in range(algo.epochs):
        for mini in split_minibatches(samples, algo.minibatches):
            mini = [s for s in mini if s.trainable]
            norm = {
                "max_len": config.rollout.max_new_tokens,
                "num_seqs": int(dist.sum(len(mini))),
                "num_tokens": int(dist.sum(sum(s.model_tokens for s in mini))),
            }
            if norm["num_seqs"] == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            chunks = lockstep_chunks(mini, config.train.micro_batch_size, dist, filler=(mini or samples)[0])
            results = [
                _backward(model, chunk, real, last, old, config, norm, dist, sums)
                for chunk, real, last in chunks
            ]
            finite = dist.max(0.0 if all(results) else 1.0) == 0.0  # one rank's NaN skips the step everywhere
            grad_norm = _clip_grad(model.policy, config.optim.grad_clip) if finite else float("nan")
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                sums.skip_step()
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # freed now: a colocated engine needs the memory next
            scheduler.step()
            sums.add_step(grad_norm, scheduler.get_last_lr()[0])
    return sums.metrics()


def _backward(
    model: Trainee,
    chunk: list[Trajectory],
    real: bool,
    last: bool,
    old: dict[int, torch.Tensor] | None,
    config: Config,
    norm: dict[str, int],
    dist: Distributed,
    sums: M.UpdateAccumulator,
) -> bool:
    """Forward and backward of one micro-batch (a zero-weight repeat when not `real`); False for a NaN/inf loss.
    Gradients sync across ranks at the mini-batch's `last` micro-batch only."""
    device = next(model.policy.parameters()).device
    temperature, weight = config.rollout.temperature, float(dist.world) if real else 0.0
    with contextlib.nullcontext() if last or not dist.enabled else dist.no_sync(model.trainer):
        batch = _pack(chunk, model.pad_id)
        with autocast(config.model, device):  # mixed precision: the forward only
            logprobs, entropy = model.trainer(batch, temperature, with_entropy=True)  # [b, T]
        # One update per batch: the weights that sampled it are the current ones, so old log-probs equal these
        # (detached: ratio 1, gradient grad(logp) * A), and a forward is saved.
        rollout_logprobs = _stack([torch.tensor(s.logprobs) for s in chunk], logprobs)
        if config.rollout.max_staleness > 0:
            old_logprobs = (
                rollout_logprobs  # sampled ahead by older weights: the engine's are the behaviour's
            )
        elif old is None:
            old_logprobs = logprobs.detach()
        else:
            old_logprobs = _stack([old[id(s)] for s in chunk], logprobs)
        mb = MicroBatch(
            logprobs=logprobs,
            old_logprobs=old_logprobs,
            rollout_logprobs=rollout_logprobs,
            advantages=torch.tensor([s.advantage for s in chunk], device=device),  # [b]
            mask=_model_token_mask(chunk, batch.completion_mask).to(device),
            entropy=entropy,
            old_is_rollout=config.rollout.max_staleness > 0,
        )
        if config.algorithm.kl_coef:
            with autocast(config.model, device):
                mb.ref_logprobs = reference_logprobs(model.policy, model.reference, batch, temperature)
        parts = micro_batch_loss(mb, config.algorithm, norm)
        finite = bool(torch.isfinite(parts.loss))
        loss = parts.loss if finite else logprobs.nan_to_num(0.0, 0.0, 0.0).sum()  # finite, for DDP's sync
        (loss * (weight if finite else 0.0)).backward()
    if real and finite:
        ratio = torch.exp(logprobs.detach() - old_logprobs)  # [b, T]
        sums.add(mb.mask, parts.pg_loss, entropy, parts.clip_low, parts.clip_high, ratio, parts.kl)
        sums.add_mismatch(mb.mask, mb.trainer_side, mb.rollout_logprobs)
        sums.add_counts(parts.counts, parts.ranges)
    return finite


def old_logprobs(
    model: Trainee, samples: list[Trajectory], config: Config, dist: Distributed
) -> dict[int, torch.Tensor]:
    """The log-probs of the policy that sampled the batch, recorded before the first optimizer step changes it
    (needed when several optimizer steps reuse the batch). Through the trainer, and as many forwards on every
    rank (its forward is collective: DDP's buffer broadcast, FSDP's all-gathers)."""
    device = next(model.policy.parameters()).device
    old: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for chunk, real, _ in lockstep_chunks(
            samples, config.train.micro_batch_size, dist, filler=samples[0]
        ):
            with autocast(config.model, device):
                lp, _ = model.trainer(_pack(chunk, model.pad_id), config.rollout.temperature)
            for j, s in enumerate(chunk if real else []):
                old[id(s)] = lp[j, : len(s.completion_ids)].cpu()
    return old


def split_minibatches(samples: list[Trajectory], count: int) -> list[list[Trajectory]]:
    """`count` mini-batches of whole groups (no group is cut), in group order."""
    groups = max((s.group for s in samples), default=-1) + 1  # < prompts_per_step after dynamic sampling
    bounds = [k * groups // count for k in range(count + 1)]
    return [[s for s in samples if bounds[k] <= s.group < bounds[k + 1]] for k in range(count)]


def lockstep_chunks(
    samples: list[Trajectory], micro: int, dist: Distributed, filler: Trajectory
) -> list[tuple[list[Trajectory], bool, bool]]:
    """(micro-batch, is it real, is it the last) in `micro_batch_order`, padded with `[filler]` repeats (real
    False: zero weight) up to the busiest rank's count, so every rank runs as many collective passes."""
    ordered = micro_batch_order(samples, micro)
    chunks = [ordered[i : i + micro] for i in range(0, len(ordered), micro)]
    total = int(dist.max(len(chunks)))
    padded = [(c, True) for c in chunks] + [([filler], False)] * (total - len(chunks))
    return [(c, real, k == len(padded) - 1) for k, (c, real) in enumerate(padded)]


def micro_batch_order(samples: list[Trajectory], micro: int) -> list[Trajectory]:
    """`samples` in the order that pads the fewest tokens when cut into micro-batches of `micro`: as they come
    (a group's samples together, so that each micro-batch runs few distinct prompts) or sorted by completion
    length (each micro-batch pads its completions to similar lengths). The loss is the same in any order (its
    normalisers count the whole mini-batch); only the order in which gradients are summed changes.

    Cost of an order: over its micro-batches, the distinct prompts' tokens plus rows x longest completion.
    """

    def padded_tokens(order: list[Trajectory]) -> int:
        total = 0
        for i in range(0, len(order), micro):
            chunk = order[i : i + micro]
            prompts = {tuple(s.prompt_ids) for s in chunk}
            total += sum(map(len, prompts)) + len(chunk) * max(len(s.completion_ids) for s in chunk)
        return total

    by_length = sorted(samples, key=lambda s: len(s.completion_ids))
    return by_length if padded_tokens(by_length) < padded_tokens(samples) else samples


@torch.no_grad()
def reference_logprobs(
    policy: torch.nn.Module, reference: torch.nn.Module | None, batch: PackedBatch, temperature: float
) -> torch.Tensor:
    """Log-probs under the reference policy: the frozen copy (a `CompletionLogprobs`), or for LoRA the policy
    with adapters off."""
    if reference is not None:
        return reference(batch, temperature)[0]
    with policy.disable_adapter():
        return completion_logprobs(policy, batch, temperature)[0]


def _pack(samples: list[Trajectory], pad_id: int) -> PackedBatch:
    return pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], pad_id)


def _model_token_mask(chunk: list[Trajectory], completion_mask: torch.Tensor) -> torch.Tensor:
    """[b, T] 1 for the completion tokens the model sampled: padding and tool-inserted tokens are 0."""
    if not any(s.inserted for s in chunk):
        return completion_mask
    inserted = torch.zeros_like(completion_mask)
    for i, s in enumerate(chunk):
        if s.inserted:
            inserted[i, : len(s.inserted)] = torch.tensor(s.inserted, dtype=inserted.dtype)
    return completion_mask * (1 - inserted)


def _stack(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)  # [b, T]
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.to(like.device)
    return out


def _clip_grad(policy: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in policy.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(norm.full_tensor() if is_sharded(norm) else norm)  # sharded: the global norm


def lr_factor(update: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `update` (0-based)."""
    if warmup and update < warmup:
        return (update + 1) / warmup
    progress = (update - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0
