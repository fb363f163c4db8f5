"""The GRPO math: advantages, the clipped policy loss, KL estimators and loss aggregation.

Every function here is pure: tensors and explicit scalars in, tensors out. No config object, no trainer.
Shapes use these names:
    P  prompts (groups) in the batch         G  samples per prompt (group size)
    B  sequences (B = P * G, or a micro-batch of them)     T  completion tokens (padded)

Variants are independent knobs (see docs/papers.md for which paper sets which):
    advantage            grpo (group_advantages) | passk (passk_advantages: Chen et al. 2025, pass@k training)
    advantage baseline   mean (GRPO) | loo (RLOO, leave-one-out)
    advantage scale      group (GRPO: / group std) | batch (/ batch std of the rewards: Lite PPO, TRL "batch")
                         | batch_centered (the centred rewards whitened over the batch's tokens:
                         REINFORCE++-baseline)
                         | none (Dr. GRPO)
    clip range           clip_low, clip_high (DAPO "clip-higher" when clip_high > clip_low), dual_clip
    loss aggregation     token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_mean_token_sum_norm (Dr. GRPO)
    KL estimator         k1 | k2 | k3 (Schulman 2020, "Approximating KL divergence")
The policy-loss menu beyond the clipped surrogate (GSPO, CISPO, KL-Cov, Clip-Cov), token selection by entropy
and rollout-mismatch corrections are in rl/losses.py.
"""

from __future__ import annotations

from typing import Literal

import torch

Baseline = Literal["mean", "loo"]
Scale = Literal["group", "batch", "batch_centered", "none"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]


def group_advantages(
    rewards: torch.Tensor,
    baseline: Baseline = "mean",
    scale: Scale = "group",
    eps: float = 1e-6,
    scored: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages, one per sample.

    A_i = (r_i - b_i) / s, with, inside the group of G samples of one prompt,
        b_i = mean_j r_j                      baseline="mean"   (GRPO, Shao et al. 2024, DeepSeekMath)
        b_i = (sum_j r_j - r_i) / (G - 1)     baseline="loo"    (RLOO, Ahmadian et al. 2024)
        s   = std_j r_j + eps                 scale="group"     (GRPO)
        s   = std of all rewards + eps        scale="batch"     (Lite PPO, Liu et al. 2025; TRL's "batch")
        c_i = r_i - b_i, whitened over the batch's tokens    scale="batch_centered"  (REINFORCE++-baseline,
                                                                 Hu et al. 2025; token_whiten: see below)
        s   = 1                               scale="none"      (Dr. GRPO, Liu et al. 2025: std scaling biases
                                                                 toward too-easy and too-hard questions)
    std is the unbiased sample std (torch.std), as in the GRPO reference code.

    scale="batch_centered" is REINFORCE++-baseline as the paper writes it and verl computes it
    (core_algos.py::compute_reinforce_plus_plus_baseline_outcome_advantage with masked_whiten): the centred
    rewards, one per token, are whitened over the batch's tokens, each sequence counted |o_i| = `lengths`
    times (token_whiten). `lengths` None counts each sample once (then the token statistics are the sequence
    statistics). One difference is left: a group with fewer than 2 scored samples gets 0 here, where verl
    keeps a lone sample's raw reward. scale="batch" is not REINFORCE++: its std also holds the spread between
    prompts, so its advantages are smaller.

    Unscored samples (`scored` False: no reward function scored them) take no part: j runs over the group's
    scored samples only, G is their count, the batch std is over scored rewards, and an unscored sample's
    advantage is 0. A group with fewer than 2 scored samples has no baseline to compare with: all 0.

    Args:
        rewards: [P, G] scalar reward of each sample, grouped by prompt (any value where unscored).
        scored: [P, G] bool, optional (default: all scored).
        lengths: [P, G] completion tokens of each sample, for scale="batch_centered" (default: 1 each).
    Returns:
        [P, G] advantages.

    Example: rewards [[1, 0, 0]] with mean/none -> [[2/3, -1/3, -1/3]];
    rewards [[1, 0, ?, ?]] with scored [[T, T, F, F]], mean/group -> [[0.7071, -0.7071, 0, 0]].
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    if baseline not in ("mean", "loo"):
        raise ValueError(f"unknown baseline {baseline!r}")
    if scale not in ("group", "batch", "batch_centered", "none"):
        raise ValueError(f"unknown scale {scale!r}")
    if scored is not None and not bool(scored.all()):
        return _masked_group_advantages(rewards, scored, baseline, scale, eps, lengths)
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
    if scale == "batch_centered":
        if rewards.numel() < 2:
            raise ValueError("scale='batch_centered' needs at least 2 rewards")
        return token_whiten(centered, torch.ones_like(centered) if lengths is None else lengths)
    return centered


def _masked_group_advantages(
    rewards: torch.Tensor,
    scored: torch.Tensor,
    baseline: Baseline,
    scale: Scale,
    eps: float,
    lengths: torch.Tensor | None = None,
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
    if scale == "batch_centered":
        weights = torch.ones_like(r) if lengths is None else lengths.to(r.dtype)  # [P, G]
        whitened = token_whiten(centered, torch.where(usable, weights, torch.zeros_like(weights)))
        return torch.where(usable, whitened, torch.zeros_like(whitened))
    values = rewards[scored]  # [scored samples]
    std = values.std() if values.numel() >= 2 else torch.zeros((), dtype=rewards.dtype)
    return centered / (std + eps)


def token_whiten(values: torch.Tensor, tokens: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whiten one value per sequence over the batch's tokens: REINFORCE++'s batch normalisation of the
    advantage (Hu et al. 2025), as verl's masked_whiten computes it on a value repeated over each sequence.

        N = sum_i n_i,   m = (1/N) sum_i n_i v_i,   var = (1/(N - 1)) sum_i n_i (v_i - m)^2
        out_i = (v_i - m) / sqrt(var + eps)
    n_i = `tokens`, the sequence's completion tokens: a sequence counts once per token, so long ones weigh
    more; the token-weighted mean is subtracted again; Bessel's correction counts tokens (N - 1, at least 1).
    verl adds 1e-8 to N in its means as well (a difference below 1e-8 relative).

    Args:
        values: [P, G] one value per sequence.  tokens: [P, G] its token count (0: takes no part).
    Returns:
        [P, G] whitened values.

    Example: values [[1, -1]], tokens [[1, 3]]: N 4, m -0.5, var (2.25 + 3 * 0.25) / 3 = 1 -> [[1.5, -0.5]].
    """
    n = tokens.to(values.dtype)  # [P, G]
    total = n.sum()
    mean = (n * values).sum() / total.clamp(min=eps)
    var = (n * (values - mean) ** 2).sum() / (total - 1).clamp(min=1)
    return (values - mean) / torch.sqrt(var + eps)


def passk_advantages(
    rewards: torch.Tensor, k: int, eps: float = 1e-6, scored: torch.Tensor | None = None
) -> torch.Tensor:
    """Pass@k training's analytic advantages (Chen et al. 2025, "Pass@k Training for Adaptively Balancing
    Exploration and Exploitation of Large Reasoning Models", the analytical derivation).

    The reward of a k-subset of the group is 1 if it holds a correct answer. Over all C(N, k) subsets of a
    group of N binary rewards, N_neg of them 0, that reward has
        mean  R = 1 - C(N_neg, k) / C(N, k)          std  s = sqrt(R (1 - R))
    and each response's advantage is the mean reward of the subsets holding it, minus R, over s:
        correct    A = (1 - R) / (s + eps)
        incorrect  A = (1 - R - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / (s + eps)
    k = 1 is GRPO with the population std: sqrt(G / (G - 1)) times scale="group" here. This is the authors'
    code (RUCAIBox/Passk_Training, code/passk_adv.py::calc_adv). verl's "grpo_passk" is another estimator
    (from arXiv 2503.19595, which it cites): only the group's best sample gets (r_max - r_second_max) /
    (std + eps), a pass@G signal. With binary rewards and k = G both give 0 unless exactly one sample is
    correct: then this gives 0 (every G-subset passes, s = 0) and verl gives the correct one 1 / (std + eps).

    Unscored samples (`scored` False) take no part: N counts the scored ones; their advantage is 0, and so is
    every advantage of a group with fewer than k scored samples (it has no k-subset).

    Args:
        rewards: [P, G] rewards in {0, 1} (any value where unscored).  k: 1 <= k <= G.
        scored: [P, G] bool, optional (default: all scored).
    Returns:
        [P, G] advantages.

    Example: rewards [[1, 0, 0, 0]], k 2: R = 1 - C(3,2)/C(4,2) = 1/2, s = 1/2 -> [[1, -1/3, -1/3, -1/3]].
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    if scored is None:
        if not 1 <= k <= rewards.shape[1]:
            raise ValueError(f"pass@k needs 1 <= k <= group size {rewards.shape[1]}, got k={k}")
        scored = torch.ones_like(rewards, dtype=torch.bool)
    elif k < 1:
        raise ValueError(f"pass@k needs k >= 1, got {k}")
    r = torch.where(scored, rewards, torch.zeros_like(rewards))  # [P, G]
    if not bool(((r == 0) | (r == 1)).all()):
        raise ValueError("pass@k advantages need binary rewards (0 or 1)")
    n = scored.sum(dim=1, keepdim=True).to(rewards.dtype)  # [P, 1] scored samples per group
    n_neg = n - r.sum(dim=1, keepdim=True)  # [P, 1]
    mean = 1.0 - _binom_ratio(n_neg, n, k)  # [P, 1] expected pass@k of a k-subset
    std = (mean * (1.0 - mean)).sqrt()  # [P, 1]
    correct = (1.0 - mean) / (std + eps)  # [P, 1]
    incorrect = (1.0 - mean - _binom_ratio(n_neg - 1, n - 1, k - 1)) / (std + eps)  # [P, 1]
    adv = torch.where(r == 1, correct, incorrect)  # [P, G]
    return torch.where(scored & (n >= k), adv, torch.zeros_like(adv))


def _binom_ratio(a: torch.Tensor, n: torch.Tensor, k: int) -> torch.Tensor:
    """C(a, k) / C(n, k) = prod_{i<k} (a - i) / (n - i), elementwise; 0 where a < k (a <= n).

    Example: a 3, n 4, k 2 -> (3 * 2) / (4 * 3) = 1/2.
    """
    out = torch.ones_like(n)
    for i in range(k):
        out = out * (a - i).clamp(min=0) / (n - i).clamp(min=1)
    return out


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
    The log-ratio is clamped to +-LOG_RATIO_CLAMP (20) before exp, as verl does: a token whose log-prob moved
    by more (a diverging run, engine/trainer drift) gets r = e^+-20 and no gradient through r, not inf/NaN.

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
    ratio = torch.exp(clamped_log_ratio(logprobs, old_logprobs))  # [B, T]
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


LOG_RATIO_CLAMP = 20.0
"""|log r| past which the importance ratio stops growing (verl's compute_policy_loss_* clamp at +-20)."""


def clamped_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """log r_t = logp_t - old_logp_t clamped to [-20, 20], so exp(log r_t) is finite in float32 and bfloat16.

    Example: log-ratios [[0.5, 50, -50]] -> [[0.5, 20, -20]].
    """
    return (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


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
