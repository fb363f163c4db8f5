"""The GRPO math: advantages, the clipped policy loss, KL estimators and loss aggregation.

Every function here is pure: tensors and explicit scalars in, tensors out. No config object, no trainer.
Shapes use these names:
    P  prompts (groups) in the batch         G  samples per prompt (group size)
    B  sequences (B = P * G, or a micro-batch of them)     T  completion tokens (padded)

Variants are independent knobs (see docs/papers.md for which paper sets which):
    advantage            grpo (group_advantages) | passk (passk_advantages: Chen et al. 2025, pass@k training)
    advantage baseline   mean (GRPO) | loo (RLOO, leave-one-out)
    advantage scale      group (GRPO: / group std) | batch (/ batch std of the rewards: Lite PPO, TRL "batch")
                         | batch_centered (/ batch std of the centred rewards: REINFORCE++-baseline)
                         | none (Dr. GRPO)
    ratio level          token (policy_loss) | sequence (gspo_loss: GSPO; token_level=True is GSPO-token)
    policy loss          ppo_clip (policy_loss) | cispo (cispo_loss: MiniMax-M1's clipped, detached IS weight)
                         | kl_cov, clip_cov (kl_cov_loss, clip_cov_loss: Cui et al. 2025, on high-Cov tokens)
    clip range           clip_low, clip_high (DAPO "clip-higher" when clip_high > clip_low), dual_clip
    token selection      entropy_top_frac (top_entropy_mask: only the highest-entropy "forking" tokens train)
    rollout mismatch     none | tis | token_mask | sequence_mask (mismatch_correction: TIS, MIS / IcePop)
    loss aggregation     token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_mean_token_sum_norm (Dr. GRPO)
    KL estimator         k1 | k2 | k3 (Schulman 2020, "Approximating KL divergence")
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Baseline = Literal["mean", "loo"]
Scale = Literal["group", "batch", "batch_centered", "none"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]
Mismatch = Literal["none", "tis", "token_mask", "sequence_mask"]


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
        s   = std of all rewards + eps        scale="batch"     (Lite PPO, Liu et al. 2025; TRL's "batch")
        s   = std_batch (r_j - b_j) + eps     scale="batch_centered"  (REINFORCE++-baseline, Hu et al. 2025:
                                                                 the spread left once group means are gone)
        s   = 1                               scale="none"      (Dr. GRPO, Liu et al. 2025: std scaling biases
                                                                 toward too-easy and too-hard questions)
    std is the unbiased sample std (torch.std), as in the GRPO reference code.

    REINFORCE++-baseline in verl (core_algos.py::compute_reinforce_plus_plus_baseline_outcome_advantage) is
    scale="batch_centered" with three differences: its batch mean and std are over tokens (a sequence counts
    |o_i| times; with equal lengths L, Bessel's factor counts B*L tokens instead of B sequences), it
    re-subtracts that token-weighted mean (0 here, and 0 there when lengths are equal), and a group with one
    sample keeps its raw reward (0 here). scale="batch" is not REINFORCE++: its std also holds the spread
    between prompts, so its advantages are smaller.

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
    if scale not in ("group", "batch", "batch_centered", "none"):
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
    if scale == "batch_centered":
        if rewards.numel() < 2:
            raise ValueError("scale='batch_centered' needs at least 2 rewards")
        return centered / (centered.std() + eps)
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
    values = centered[usable] if scale == "batch_centered" else rewards[scored]  # [scored samples]
    std = values.std() if values.numel() >= 2 else torch.zeros((), dtype=rewards.dtype)
    return centered / (std + eps)


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


def sequence_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's length-normalised log importance ratio of each sequence (Zheng et al. 2025).

        log s_i = (1/|y_i|) sum_t (logp_it - old_logp_it),    s_i = (pi(y_i | x) / pi_old(y_i | x))^(1/|y_i|)

    Padding (mask 0) takes no part; a sequence without tokens gets 0 (ratio 1).
    Args:
        logprobs: [B, T] current log-probs (with grad).  old_logprobs: [B, T].  mask: [B, T] 1 for completion.
    Returns:
        [B] log s_i, differentiable through logprobs.

    Example: log-ratios [[0.1, 0.3, (pad)]] -> [0.2], so s = exp(0.2) = 1.2214.
    """
    diff = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))  # [B, T]
    return diff.sum(dim=1) / mask.to(logprobs.dtype).sum(dim=1).clamp(min=1)


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    token_level: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO: one importance ratio per sequence, clipped per sequence (Zheng et al. 2025, "Group Sequence
    Policy Optimization", Qwen3).

        s_i = exp(sequence_log_ratio)                      the geometric mean of the token ratios
        L_i = -min(s_i * A_i, clip(s_i, 1 - clip_low, 1 + clip_high) * A_i), written on every token of y_i

    With aggregate_loss(..., "seq_mean_token_mean") the result is the paper's 1/G sum_i L_i (verl forces that
    aggregation for GSPO; TRL warns for the token-sum ones, which weight a sequence by its length).
    token_level=True is GSPO-token: s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)] has the value s_i but
    the gradient s_i * grad logp_it of token t alone, so per-token advantages A_it can be used; with one A_i
    per sequence its gradient equals GSPO's exactly.
    Clip range: s_i is a per-token geometric mean, so it stays within ~1e-3 of 1: the paper uses clip_low
    3e-4, clip_high 4e-4 (sec. 5.1), as do verl's examples/gspo_trainer and TRL's GSPO docs, with no KL and
    several minibatches per rollout. With one update per rollout s_i = 1, and GSPO's gradient is GRPO's
    (under seq_mean_token_mean): the clip only acts off-policy.
    Conventions: verl clamps log s_it at 10 before exp (not here, as policy_loss does not clamp); TRL's
    importance_sampling_level="sequence" is token_level=False.

    Args:
        logprobs, old_logprobs: [B, T].  advantages: [B] or [B, T].  mask: [B, T] 1 for completion tokens.
    Returns:
        (loss [B, T], clipped_low [B, T] bool, clipped_high [B, T] bool), as policy_loss, the flags of a
        sequence on each of its tokens.

    Example: log-ratios [[0.1, 0.3]], A [1], clip 0.2 / 0.2 -> s = 1.2214 > 1.2: loss [[-1.2, -1.2]],
    clipped_high [[T, T]].
    """
    log_s = sequence_log_ratio(logprobs, old_logprobs, mask).unsqueeze(1)  # [B, 1]
    if token_level:
        log_s = log_s.detach() + (logprobs - logprobs.detach())  # [B, T] value log s_i, gradient of logp_it
    log_s = log_s.expand_as(logprobs)  # [B, T]
    return policy_loss(log_s, torch.zeros_like(log_s), advantages, clip_low, clip_high)


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float | None = None,
    clip_high: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO: REINFORCE weighted by a clipped, detached importance ratio (MiniMax-M1, MiniMax 2025).

        r_t = exp(logp_t - old_logp_t),   w_t = sg[clip(r_t, 1 - clip_low, 1 + clip_high)]
        L_t = -w_t * A * logp_t           gradient -w_t * A * grad logp_t

    Where PPO's clipped surrogate gives a clipped token no gradient at all, CISPO keeps it, only bounds its
    weight. The loss value is not PPO's (it carries logp_t); at r = 1 the gradients are equal.
    Clip convention: the bounds are 1 - clip_low and 1 + clip_high, as clip_low/clip_high mean in policy_loss.
    MiniMax sets no lower bound (eps_low large) and tunes the upper one: clip_low=None. verl (core_algos.py::
    compute_policy_loss_cispo) clamps to [1 - clip_ratio_low, 1 + clip_ratio_high] with the actor's PPO clip
    values (0.2 unless set); TRL (loss_type="cispo") clamps r at epsilon_high itself, with no lower bound, and
    recommends epsilon_high = 5 (ScaleRL's eps_max): that is clip_high=4 here, the default.

    Args:
        logprobs: [B, T] (with grad).  old_logprobs: [B, T].  advantages: [B] or [B, T].
    Returns:
        (loss [B, T], clipped_low [B, T] bool, clipped_high [B, T] bool): where the weight was bounded
        (r < 1 - clip_low, r > 1 + clip_high), whatever the sign of A: these tokens still get a gradient.

    Example: r [[2.0, 0.5]], logp [[-1, -1]], A [1], clip_high 0.2 -> weights [1.2, 0.5], loss [[1.2, 0.5]].
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1]
    ratio = torch.exp(logprobs.detach() - old_logprobs)  # [B, T], no gradient
    low = 0.0 if clip_low is None else 1.0 - clip_low
    weight = ratio.clamp(min=low, max=1.0 + clip_high)  # [B, T]
    loss = -weight * advantages * logprobs  # [B, T]
    return loss, ratio < low, ratio > 1.0 + clip_high


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


class MismatchCorrection(NamedTuple):
    """What mismatch_correction returns; each field is per token, so micro-batch sums of its counts add up.

    weights: [B, T] detached, multiplies the per-token policy loss (0 where masked).
    kept: [B, T] bool, completion tokens left in the loss: 1 - kept.sum() / mask.sum() is the masked fraction.
    ratio: [B, T] the rollout/trainer ratio each token was judged by: its own, or its sequence's.
    """

    weights: torch.Tensor
    kept: torch.Tensor
    ratio: torch.Tensor


def mismatch_correction(
    logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: Mismatch,
    low: float | None = None,
    high: float | None = None,
    seq_agg: Literal["sum", "mean"] = "sum",
) -> MismatchCorrection:
    """Correct for the rollout engine sampling from other probabilities than the trainer computes (vLLM,
    other kernels or precision): weight or drop tokens by rho = pi_trainer / pi_rollout (Yao et al. 2025).

        r_t = exp(logp_t - rollout_logp_t)                   token ratio (logp: the trainer's, at theta_old)
        R_i = exp(sum_t log r_t)    seq_agg="sum"            sequence ratio, the product of the token ones
        R_i = exp(mean_t log r_t)   seq_agg="mean"           its geometric mean (verl's "Geo-RS")
        none           w_t = 1
        tis            w_t = clip(r_t, low, high)            TIS; low=None is truncated_is_weight(cap=high)
        token_mask     w_t = r_t * 1[low <= r_t <= high]     token MIS; IcePop (Ring-1T, 2025): [alpha, beta]
        sequence_mask  w_t = R_i * 1[low <= R_i <= high]     sequence MIS: a whole sequence kept or dropped
    A bound left None is not applied. Kept tokens keep their importance weight, as in TRL's *_mask modes and
    IcePop; verl's rejection sampling (rollout_rs) drops without weighting: use `kept` alone for that.
    Recommended: TRL's default is sequence_mask, seq_agg="sum", high 3, no low; verl's Seq-MIS preset is
    sequence IS truncated at 2 times rollout_rs="seq_sum_k1" in [0.5, 2], which is sequence_mask [0.5, 2]
    here; verl's Geo-RS keeps seq_agg="mean" ratios in [0.999, 1.001]; TIS caps at 2 (verl's default).
    verl reads a k1 range [lo, hi] on -log r, so it keeps r in [1/hi, 1/lo]: the same only for lo = 1/hi.

    Args:
        logprobs: [B, T] trainer log-probs (detached here).  rollout_logprobs: [B, T] engine log-probs.
        mask: [B, T] 1 for completion tokens.
    Returns:
        MismatchCorrection(weights, kept, ratio).

    Example: token log-ratios [[0, ln 2], [ln 3, 0]], sequence_mask, high 2.5: R = [2, 3] ->
    weights [[2, 2], [0, 0]], kept [[T, T], [F, F]].
    """
    if seq_agg not in ("sum", "mean"):
        raise ValueError(f"unknown seq_agg {seq_agg!r}")
    valid = mask.bool()
    log_r = torch.where(valid, logprobs.detach() - rollout_logprobs, torch.zeros_like(logprobs))  # [B, T]
    if mode == "sequence_mask":
        n = valid.sum(dim=1, keepdim=True).clamp(min=1) if seq_agg == "mean" else 1  # [B, 1] or 1
        log_r = (log_r.sum(dim=1, keepdim=True) / n).expand_as(log_r)  # [B, T] the sequence's log ratio
    ratio = torch.exp(log_r)  # [B, T]
    if mode == "none":
        return MismatchCorrection(torch.ones_like(ratio), valid, ratio)
    if mode == "tis":
        if high is None:
            raise ValueError("mismatch 'tis' needs high, the cap on the weight (e.g. 2)")
        weights = truncated_is_weight(logprobs, rollout_logprobs, high)  # [B, T]
        return MismatchCorrection(weights if low is None else weights.clamp(min=low), valid, ratio)
    if mode not in ("token_mask", "sequence_mask"):
        raise ValueError(f"unknown mismatch mode {mode!r}")
    inside = torch.ones_like(valid)
    if low is not None:
        inside &= ratio >= low
    if high is not None:
        inside &= ratio <= high
    kept = valid & inside  # [B, T]
    return MismatchCorrection(torch.where(kept, ratio, torch.zeros_like(ratio)), kept, ratio)


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


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, frac: float) -> torch.Tensor:
    """The batch's highest-entropy completion tokens, the "forking tokens" that alone get a policy gradient
    (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
    Learning for LLM Reasoning"; the paper keeps the top 20%: frac=0.2).

        keep_t = H_t >= q,   q = quantile({H_s : s a completion token in the batch}, 1 - frac)

    q is torch.quantile's (linear interpolation) and ties at q are kept: TRL's get_high_entropy_mask with
    top_entropy_quantile = frac, exactly, so about frac of the tokens are kept, never none: frac=0 keeps the
    maximum (and its ties), frac=1 every completion token. "The batch" is the tokens passed in: TRL passes
    one micro-batch (gathered over ranks); pass the whole mini-batch's entropies for a mask that does not
    depend on the micro-batch split. torch.quantile takes at most 2^24 tokens.

    Args:
        entropy: [B, T] per-token entropy (detached here).  mask: [B, T] 1 for completion tokens.
        frac: in [0, 1].
    Returns:
        [B, T] bool, False on padding; multiply the policy-gradient loss by it.

    Example: entropies [[0.1, 2.0, 0.5], [1.0, 0.2, (pad)]], frac 0.4: q = 0.7 -> [[F, T, F], [T, F, F]].
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"the kept entropy fraction must be in [0, 1], got {frac}")
    valid = mask.bool()
    values = entropy.detach().float()  # [B, T]
    if not bool(valid.any()):
        return valid.clone()
    threshold = torch.quantile(values[valid], 1.0 - frac)
    return (values >= threshold) & valid


def _token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (logp_t - mean logp) * (A_t - mean A), the means over the batch's completion tokens, detached
    (Cui et al. 2025): the token's share of the covariance that drives entropy down. 0 on padding."""
    valid = mask.bool()
    logp = logprobs.detach()
    adv = advantages.unsqueeze(1).expand_as(logp) if advantages.dim() == 1 else advantages  # [B, T]
    n = valid.sum().clamp(min=1)
    centred_logp = logp - torch.where(valid, logp, torch.zeros_like(logp)).sum() / n
    centred_adv = adv - torch.where(valid, adv, torch.zeros_like(adv)).sum() / n
    return torch.where(valid, centred_logp * centred_adv, torch.zeros_like(logp))  # [B, T]


def kl_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    frac: float = 2e-3,
    coef: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models"): no clipping; the top frac of the batch's completion tokens by _token_covariance get a
    penalty on |log r|, which holds back the updates that collapse entropy.

        L_t = -r_t * A_t + coef * |logp_t - old_logp_t| * 1[t among the max(1, floor(frac * N)) largest Cov_t]

    Recommended (verl recipe/entropy, Qwen2.5-7B): frac 2e-3, coef 1; verl's config defaults are 2e-4 and 0.1.
    Same as verl's compute_policy_loss_kl_cov; the covariance and the count are over the tokens passed in (one
    micro-batch in verl too).

    Args:
        logprobs: [B, T] (with grad).  old_logprobs: [B, T].  advantages: [B] or [B, T].  mask: [B, T].
    Returns:
        (loss [B, T], penalised [B, T] bool).

    Example: logp [[-0.5, -1, -1.5]], r [[2, 1, 1]], A [[1, 0, 0]], frac 0.4: Cov [[1/3, 0, 1/6]], one token
    penalised, the first: loss [[-2 + ln 2, 0, 0]].
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    log_ratio = logprobs - old_logprobs  # [B, T]
    cov = _token_covariance(logprobs, advantages, mask)  # [B, T]
    count = max(1, int(frac * int(mask.bool().sum())))
    ranked = torch.where(mask.bool(), cov, torch.full_like(cov, -torch.inf)).flatten()  # [B * T]
    penalised = torch.zeros_like(ranked, dtype=torch.bool)
    penalised[torch.topk(ranked, min(count, int(mask.bool().sum()))).indices] = True
    penalised = penalised.view_as(cov)  # [B, T]
    loss = -torch.exp(log_ratio) * adv + coef * log_ratio.abs() * penalised  # [B, T]
    return loss, penalised


def clip_cov_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    frac: float = 2e-4,
    cov_low: float = 1.0,
    cov_high: float = 5.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip-Cov (Cui et al. 2025): policy_loss, with max(1, floor(frac * N)) tokens drawn at random
    among those PPO did not clip and whose Cov_t (_token_covariance) lies in (cov_low, cov_high) removed from
    the loss (value and gradient 0).

    Recommended (verl recipe/entropy, also verl's defaults): frac 2e-4, cov_low 1, cov_high 5, PPO clip 0.2.
    verl's compute_policy_loss_clip_cov does the same, on the plain PPO loss (no dual clip) as here. The draw
    uses `generator` (torch.randperm): a seeded one makes it repeatable.

    Args:
        logprobs: [B, T] (with grad).  old_logprobs: [B, T].  advantages: [B] or [B, T].  mask: [B, T].
    Returns:
        (loss [B, T], clipped_low, clipped_high, cov_clipped [B, T] bool): the first three as policy_loss.

    Example: logp [[0, 0, 0, -4]], r 1, A [[2, 0, 0, -2]], frac 0.25: Cov [[2, 0, 0, 6]], only the first in
    (1, 5): cov_clipped [[T, F, F, F]], loss [[0, 0, 0, 2]] (policy_loss alone: [[-2, 0, 0, 2]]).
    """
    loss, clipped_low, clipped_high = policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)
    cov = _token_covariance(logprobs, advantages, mask)  # [B, T]
    candidates = mask.bool() & ~(clipped_low | clipped_high) & (cov > cov_low) & (cov < cov_high)  # [B, T]
    index = candidates.flatten().nonzero().squeeze(1)  # [candidates]
    count = max(1, int(frac * int(mask.bool().sum())))
    chosen = index[torch.randperm(index.numel(), generator=generator)[:count]]
    cov_clipped = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    cov_clipped[chosen] = True
    cov_clipped = cov_clipped.view_as(cov)  # [B, T]
    return loss * ~cov_clipped, clipped_low, clipped_high, cov_clipped
