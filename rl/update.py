"""The policy update of one step: epochs x mini-batches of optimizer steps, each accumulated over micro-batches.

For every micro-batch: the log-probs of the sampled tokens under the current policy (rl/logprobs.py), the
clipped surrogate with the advantages, optional truncated importance weights and KL to the reference
(rl/grpo.py), aggregated with the global normalisers so that micro-batches and ranks add up to the
one-process loss; then gradient clipping and the optimizer step. Micro-batches take the samples as they come or
in order of completion length, whichever pads fewer tokens (`micro_batch_order`). Also the learning-rate
schedule.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from rl import metrics as M
from rl.config import Config
from rl.distributed import Distributed
from rl.grpo import aggregate_loss, kl_penalty, policy_loss, truncated_is_weight
from rl.logprobs import PackedBatch, completion_logprobs, pack
from rl.models import autocast
from rollouts.base import is_sharded


@dataclass
class Sample:
    """One completion with everything the update needs. `group` indexes the prompt within the step."""

    group: int
    prompt_ids: list[int]
    completion_ids: list[int]
    rollout_logprobs: list[float]  # the engine's log-probs of completion_ids
    advantage: float
    valid: bool  # False when no reward function scored it: kept out of the loss


def update_policy(
    trainer: torch.nn.Module,
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    samples: list[Sample],
    config: Config,
    pad_id: int,
    dist: Distributed,
) -> dict[str, float]:
    """epochs x mini-batches optimizer steps over one generation batch; returns the update's metrics.

    `trainer` is `CompletionLogprobs(policy)`, wrapped in DDP or sharded with FSDP2 when several ranks train:
    its forward computes the log-probs, and its backward averages gradients over ranks.
    """
    algo, temperature, micro = config.algorithm, config.rollout.temperature, config.train.micro_batch_size
    num_groups = max((s.group for s in samples), default=-1) + 1  # < prompts_per_step after dynamic sampling
    # Whole groups per mini-batch, so no group is cut.
    bounds = [k * num_groups // algo.minibatches for k in range(algo.minibatches + 1)]
    minibatches = [
        [s for s in samples if bounds[k] <= s.group < bounds[k + 1]] for k in range(algo.minibatches)
    ]
    single_update = algo.epochs == 1 and algo.minibatches == 1
    device = next(policy.parameters()).device
    old: dict[int, torch.Tensor] = {}
    if not single_update:
        # Several optimizer steps reuse this batch: the ratio needs the log-probs of the policy that sampled
        # it, recorded once before the first step changes the weights.
        # Through the trainer, and as many forwards on every rank (its forward is collective: DDP's buffer
        # broadcast, FSDP's all-gathers); the extra ones repeat a sample.
        with torch.no_grad():
            ordered = micro_batch_order(samples, micro)
            chunks = [ordered[i : i + micro] for i in range(0, len(ordered), micro)]
            for k in range(int(dist.max(len(chunks)))):
                chunk = chunks[k] if k < len(chunks) else samples[:1]
                with autocast(config.model, device):
                    lp, _ = trainer(_pack(chunk, pad_id), temperature)
                for j, s in enumerate(chunk if k < len(chunks) else []):
                    old[id(s)] = lp[j, : len(s.completion_ids)].cpu()

    sums = M.UpdateAccumulator()
    policy.train()
    for _ in range(algo.epochs):
        for mini in minibatches:
            mini = [s for s in mini if s.valid]
            # Loss normalisers count the whole mini-batch over all ranks, so that summing micro-batch losses
            # (and DDP averaging world-size-scaled gradients) gives exactly the one-process loss.
            norm = {
                "max_len": config.rollout.max_new_tokens,
                "num_seqs": int(dist.sum(len(mini))),
                "num_tokens": int(dist.sum(sum(len(s.completion_ids) for s in mini))),
            }
            if norm["num_seqs"] == 0:
                continue
            # Every rank runs as many forward/backward passes as the busiest one (DDP syncs in each backward);
            # the extra ones are zero-weighted repeats of a sample.
            ordered = micro_batch_order(mini, micro)
            chunks = [ordered[i : i + micro] for i in range(0, len(ordered), micro)]
            real_chunks = len(chunks)
            filler = [(mini or [s for s in samples if s.valid] or samples)[0]]
            chunks += [filler] * (int(dist.max(real_chunks)) - real_chunks)
            optimizer.zero_grad(set_to_none=True)
            finite = True
            for k, chunk in enumerate(chunks):
                weight = float(dist.world) if k < real_chunks else 0.0
                sync = k == len(chunks) - 1 or not dist.enabled
                with contextlib.nullcontext() if sync else dist.no_sync(trainer):
                    batch = _pack(chunk, pad_id)
                    mask = batch.completion_mask.to(device)  # [b, T]
                    with autocast(config.model, device):  # mixed precision: the forward only
                        logprobs, entropy = trainer(batch, temperature, with_entropy=True)  # [b, T]
                    if single_update:
                        # One update per batch: the weights that sampled this batch are exactly the current
                        # weights (nothing changed them since generation), so old log-probs equal these
                        # log-probs. Detaching gives ratio 1 with gradient grad(logp) * A, and saves a forward.
                        old_logprobs = logprobs.detach()
                    else:
                        old_logprobs = _stack([old[id(s)] for s in chunk], logprobs)
                    rollout_logprobs = _stack([torch.tensor(s.rollout_logprobs) for s in chunk], logprobs)
                    adv = torch.tensor([s.advantage for s in chunk], device=device)  # [b]
                    per_token, clip_low, clip_high = policy_loss(
                        logprobs, old_logprobs, adv, algo.clip_low, algo.clip_high, algo.dual_clip
                    )  # [b, T]
                    if algo.tis_cap is not None:
                        per_token = per_token * truncated_is_weight(
                            old_logprobs, rollout_logprobs, algo.tis_cap
                        )
                    pg_loss = aggregate_loss(per_token, mask, algo.loss_agg, **norm)
                    loss, kl = pg_loss, None
                    if algo.kl_coef:
                        with autocast(config.model, device):
                            ref_logprobs = reference_logprobs(policy, reference, batch, temperature)
                        kl = kl_penalty(logprobs, ref_logprobs, algo.kl_estimator)  # [b, T]
                        loss = loss + algo.kl_coef * aggregate_loss(kl, mask, algo.loss_agg, **norm)
                    if not torch.isfinite(loss):  # the update is skipped; the run stops after repeated skips
                        finite, weight = False, 0.0
                        loss = logprobs.nan_to_num(0.0, 0.0, 0.0).sum()  # a finite stand-in for DDP's sync
                    (loss * weight).backward()
                if weight:
                    ratio = torch.exp(logprobs.detach() - old_logprobs)
                    sums.add(mask, pg_loss, entropy, clip_low, clip_high, ratio, kl)
                    sums.add_mismatch(mask, old_logprobs, rollout_logprobs)
            finite = dist.max(0.0 if finite else 1.0) == 0.0  # one rank's NaN skips the step everywhere
            grad_norm = _clip_grad(policy, config.optim.grad_clip) if finite else float("nan")
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                sums.skip_step()
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # freed now: a colocated engine needs the memory next
            scheduler.step()
            sums.add_step(grad_norm, scheduler.get_last_lr()[0])
    return sums.metrics()


def micro_batch_order(samples: list[Sample], micro: int) -> list[Sample]:
    """`samples` in the order that pads the fewest tokens when cut into micro-batches of `micro`: as they come
    (a group's samples together, so that each micro-batch runs few distinct prompts) or sorted by completion
    length (each micro-batch pads its completions to similar lengths). The loss is the same in any order (its
    normalisers count the whole mini-batch); only the order in which gradients are summed changes.

    Cost of an order: over its micro-batches, the distinct prompts' tokens plus rows x longest completion.
    """

    def padded_tokens(order: list[Sample]) -> int:
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


def _pack(samples: list[Sample], pad_id: int) -> PackedBatch:
    return pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], pad_id)


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
