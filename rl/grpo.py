"""The GRPO math: advantages, the clipped policy loss, KL estimators and loss aggregation.

Every function here is pure: tensors and explicit scalars in, tensors out. No config object, no trainer.
Shapes use these names:
    P  prompts (groups) in the batch         G  samples per prompt (group size)
    B  sequences (B = P * G, or a micro-batch of them)     T  completion tokens (padded)

Variants are independent knobs (see docs/papers.md for which paper sets which):
    advantage baseline   mean (GRPO) | loo (RLOO, leave-one-out)
    advantage scale      group (GRPO: / group std) | batch (/ batch std) | none (Dr. GRPO)
    clip range           clip_low, clip_high (DAPO "clip-higher" when clip_high > clip_low), dual_clip
    loss aggregation     token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_mean_token_sum_norm (Dr. GRPO)
    KL estimator         k1 | k2 | k3 (Schulman 2020, "Approximating KL divergence")
"""

from __future__ import annotations

from typing import Literal

import torch

Baseline = Literal["mean", "loo"]
Scale = Literal["group", "batch", "none"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]


def group_advantages(
    rewards: torch.Tensor,
    baseline: Baseline = "mean",
    scale: Scale = "group",
    eps: float = 1e-6,
    scored: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages, one per sample.

    A_i = (r_i - b_i) / s, with, inside the group of G samples of one prompt,
        b_i = mean_j r_j                      baseline="mean"   (GRPO, Shao et al. 2024, DeepSeekMath)
        b_i = (sum_j r_j - r_i) / (G - 1)     baseline="loo"    (RLOO, Ahmadian et al. 2024)
        s   = std_j r_j + eps                 scale="group"     (GRPO)
        s   = std of all rewards + eps        scale="batch"     (e.g. REINFORCE++ style)
        s   = 1                               scale="none"      (Dr. GRPO, Liu et al. 2025: std scaling biases
                                                                 toward too-easy and too-hard questions)
    std is the unbiased sample std (torch.std), as in the GRPO reference code.

    Unscored samples (`scored` False: no reward function scored them) take no part: j runs over the group's
    scored samples only, G is their count, the batch std is over scored rewards, and an unscored sample's
    advantage is 0. A group with fewer than 2 scored samples has no baseline to compare with: all 0.

    Args:
        rewards: [P, G] scalar reward of each sample, grouped by prompt (any value where unscored).
        scored: [P, G] bool, optional (default: all scored).
    Returns:
        [P, G] advantages.

    Example: rewards [[1, 0, 0]] with mean/none -> [[2/3, -1/3, -1/3]];
    rewards [[1, 0, ?, ?]] with scored [[T, T, F, F]], mean/group -> [[0.7071, -0.7071, 0, 0]].
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    if baseline not in ("mean", "loo"):
        raise ValueError(f"unknown baseline {baseline!r}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"unknown scale {scale!r}")
    if scored is not None and not bool(scored.all()):
        return _masked_group_advantages(rewards, scored, baseline, scale, eps)
    group_size = rewards.shape[1]
    if baseline == "mean":
        centered = rewards - rewards.mean(dim=1, keepdim=True)  # [P, G]
    else:
        if group_size < 2:
            raise ValueError("the leave-one-out baseline needs a group size of at least 2")
        loo_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)  # [P, G]
        centered = rewards - loo_mean
    if scale == "group":
        if group_size < 2:
            raise ValueError(
                "scale='group' needs a group size of at least 2 (std of one sample is undefined)"
            )
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        if rewards.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards")
        return centered / (rewards.std() + eps)
    return centered


def _masked_group_advantages(
    rewards: torch.Tensor, scored: torch.Tensor, baseline: Baseline, scale: Scale, eps: float
) -> torch.Tensor:
    """`group_advantages` over the scored samples only (see there); 0 where unscored or where the group has
    fewer than 2 scored samples."""
    r = torch.where(scored, rewards, torch.zeros_like(rewards))  # [P, G]
    n = scored.sum(dim=1, keepdim=True).to(rewards.dtype)  # [P, 1] scored samples per group
    total = r.sum(dim=1, keepdim=True)  # [P, 1]
    mean = total / n.clamp(min=1)  # [P, 1]
    b = mean if baseline == "mean" else (total - r) / (n - 1).clamp(min=1)  # [P, 1] or [P, G]
    usable = scored & (n >= 2)  # [P, G]
    centered = torch.where(usable, r - b, torch.zeros_like(r))  # [P, G]
    if scale == "none":
        return centered
    if scale == "group":
        var = (torch.where(scored, r - mean, torch.zeros_like(r)) ** 2).sum(dim=1, keepdim=True)
        std = (var / (n - 1).clamp(min=1)).sqrt()  # [P, 1] unbiased
        return centered / (std + eps)
    values = rewards[scored]  # [scored samples]
    std = values.std() if values.numel() >= 2 else torch.zeros((), dtype=rewards.dtype)
    return centered / (std + eps)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate loss with an asymmetric clip range.

    r_t = exp(logp_t - old_logp_t)
    L_t = -min(r_t * A, clip(r_t, 1 - clip_low, 1 + clip_high) * A)          (PPO, Schulman et al. 2017)
    clip_high > clip_low is DAPO's "clip-higher" (Yu et al. 2025): lets low-probability tokens grow.
    dual_clip = c > 1 bounds the loss of negative-advantage tokens: for A < 0, L_t = min(L_t, -c * A)
    (dual-clip PPO, Ye et al. 2020), so a huge ratio on a bad token cannot blow up the update.

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: [B, T] log-probs under the policy that sampled the batch (no grad).
        advantages: [B] per-sequence or [B, T] per-token advantages.
    Returns:
        (loss [B, T], clipped_low [B, T] bool, clipped_high [B, T] bool). clipped_low marks tokens where
        the lower bound removed the gradient (r < 1 - clip_low, A < 0), clipped_high where the upper bound
        did (r > 1 + clip_high, A > 0): their means are the clip fractions.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1], broadcast over tokens
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    unclipped = ratio * advantages  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages  # [B, T]
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bounded = torch.minimum(loss, -dual_clip * advantages)  # [B, T]
        loss = torch.where(advantages < 0, bounded, loss)
    clipped_low = (ratio < 1.0 - clip_low) & (advantages < 0)
    clipped_high = (ratio > 1.0 + clip_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020).

    With log r = ref_logp - logp (r = pi_ref / pi):
        k1 = -log r               unbiased, high variance, can be negative
        k2 = (log r)^2 / 2        biased, low variance
        k3 = r - 1 - log r        unbiased, low variance, always >= 0 (GRPO's choice, DeepSeekMath eq. 4)
    Args:
        logprobs, ref_logprobs: [B, T].
    Returns:
        [B, T] per-token KL estimate.
    """
    log_r = ref_logprobs - logprobs  # [B, T]
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}")


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg,
    max_len: int | None = None,
    num_seqs: int | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

        token_mean               sum_{i,t} L_it / sum_i |o_i|          (DAPO, Yu et al. 2025: every token counts
                                                                       equally, long answers are not diluted)
        seq_mean_token_mean      1/B sum_i (1/|o_i|) sum_t L_it        (GRPO, Shao et al. 2024)
        seq_mean_token_sum_norm  1/B sum_i (1/max_len) sum_t L_it      (Dr. GRPO, Liu et al. 2025: a constant
                                                                       instead of |o_i| removes the length bias)

    Gradient accumulation: when this call sees one micro-batch of a larger mini-batch, pass the mini-batch's
    totals as num_seqs (B) and num_tokens (sum_i |o_i|); then summing the micro-batch results gives exactly
    the loss of the whole mini-batch. They default to this call's own counts.

    Args:
        per_token: [B, T] loss per token.  mask: [B, T] 1 for completion tokens, 0 for padding.
    Returns:
        scalar loss.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask  # [B, T]
    if num_seqs is None:
        num_seqs = per_token.shape[0]
    if mode == "token_mean":
        if num_tokens is None:
            num_tokens = int(mask.sum().item())
        return masked.sum() / max(num_tokens, 1)
    if mode == "seq_mean_token_mean":
        seq_len = mask.sum(dim=1).clamp(min=1)  # [B]
        return (masked.sum(dim=1) / seq_len).sum() / max(num_seqs, 1)
    if mode == "seq_mean_token_sum_norm":
        if max_len is None or max_len <= 0:
            raise ValueError(
                "seq_mean_token_sum_norm needs max_len, the constant normaliser (max response length)"
            )
        return masked.sum() / (max_len * max(num_seqs, 1))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def truncated_is_weight(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance-sampling weight for rollout/trainer mismatch (TIS, Yao et al. 2025).

    w_t = min(exp(logp_t - rollout_logp_t), cap), detached. The rollout engine (e.g. vLLM, other kernels,
    other precision) samples from a slightly different distribution than the trainer computes; weighting
    each token's loss by w_t corrects the gradient, and the cap bounds its variance.
    Args:
        logprobs: [B, T] trainer log-probs of the sampled tokens.  rollout_logprobs: [B, T] engine log-probs.
    Returns:
        [B, T] weights, no gradient.
    """
    return torch.exp(logprobs.detach() - rollout_logprobs).clamp(max=cap)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward.

        0                                   if |y| <= max_len - buffer
        factor * (max_len - buffer - |y|) / buffer   inside the buffer (linear, from 0 down to -factor)
        -factor                             if |y| >= max_len (truncated)
    Args:
        lengths: [B] completion lengths in tokens.
    Returns:
        [B] penalties (<= 0).

    Example: max_len 10, buffer 4: lengths [6, 8, 10] -> [0, -0.5, -1].
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"the overlong buffer must be in [1, max_len={max_len}], got {buffer}")
    over = (lengths.float() - (max_len - buffer)).clamp(min=0, max=buffer)  # [B] tokens into the buffer
    return -factor * over / buffer


def informative_groups(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Groups whose rewards are not all equal: the only ones with a non-zero advantage (DAPO's dynamic
    sampling keeps these and samples more prompts to replace the rest).

    Args:
        rewards: [P, G].  valid: [P, G] optional mask of scored samples.
    Returns:
        [P] bool.
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    high = torch.where(valid, rewards, torch.full_like(rewards, -torch.inf)).max(dim=1).values
    low = torch.where(valid, rewards, torch.full_like(rewards, torch.inf)).min(dim=1).values
    return high > low


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution, H = logsumexp(z) - sum softmax(z) * z.

    Args:
        logits: [..., V]
    Returns:
        [...] entropy in nats.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
