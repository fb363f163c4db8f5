"""The policy-loss menu beyond GRPO's clipped surrogate, and what selects or reweights the tokens it trains on.

Each variant is one pure function (tensors and explicit scalars in, tensors out), chosen by one knob of
`algorithm` in rl/update.py `micro_batch_loss`; docs/papers.md maps each to its paper:
    ratio_level      token (rl/grpo.py policy_loss) | sequence | sequence_token     gspo_loss (GSPO, GSPO-token)
    policy_loss      ppo_clip (policy_loss) | cispo | kl_cov | clip_cov             cispo_loss, kl_cov_loss,
                                                                                     clip_cov_loss
    entropy_top_frac the highest-entropy "forking" tokens alone train                top_entropy_mask
    mismatch         none | tis | token_mask | sequence_mask                        mismatch_correction
Shapes as in rl/grpo.py: B sequences, T completion tokens (padded).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from rl.grpo import clamped_log_ratio, policy_loss

Mismatch = Literal["none", "tis", "token_mask", "sequence_mask"]


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

    With aggregate_loss(..., "seq_mean_token_mean") the result is the paper's 1/G sum_i L_i. token_mean and
    seq_mean_token_sum_norm weight a sequence by its length instead (|y_i| / sum_j |y_j|, |y_i| / max_len):
    rl/config.py warns at start, as TRL does. verl 0.9.1 aggregates GSPO by its loss_agg_mode too (its
    values differ by mode; its 0.8 line forced seq-mean-token-mean).
    token_level=True is GSPO-token: s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)] has the value s_i but
    the gradient s_i * grad logp_it of token t alone, so per-token advantages A_it can be used; with one A_i
    per sequence its gradient equals GSPO's exactly.
    Clip range: s_i is a per-token geometric mean, so it stays within ~1e-3 of 1: the paper uses clip_low
    3e-4, clip_high 4e-4 (sec. 5.1), as do verl's examples/gspo_trainer and TRL's GSPO docs, with no KL and
    several minibatches per rollout. With one update per rollout s_i = 1, and GSPO's gradient is GRPO's
    (under seq_mean_token_mean): the clip only acts off-policy.
    Conventions: log s_it is clamped to +-20 before exp (policy_loss's clamp; verl clamps it at 10 above, a
    ratio GSPO's clip bounds either way); TRL's importance_sampling_level="sequence" is token_level=False.

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
    Clip convention: the bounds are 1 - clip_low and 1 + clip_high, as clip_low/clip_high mean in policy_loss;
    clip_low=None (or >= 1) is no lower bound. MiniMax sets none (eps_low large) and tunes the upper one.
    verl (core_algos.py::compute_policy_loss_cispo) clamps to [1 - clip_ratio_low, 1 + clip_ratio_high] with
    the actor's clips, and its examples/cispo_trainer sets clip_ratio_low 10 (no lower bound) and
    clip_ratio_high 0.2; TRL (loss_type="cispo") clamps r at epsilon_high itself, with no lower bound, and
    recommends epsilon_high = 5 (ScaleRL's eps_max): that is clip_high=4 here, the default, and
    algorithm.policy_loss=cispo's when the recipe sets no clip. The log-ratio is clamped to +-20 before exp.

    Args:
        logprobs: [B, T] (with grad).  old_logprobs: [B, T].  advantages: [B] or [B, T].
    Returns:
        (loss [B, T], clipped_low [B, T] bool, clipped_high [B, T] bool): where the weight was bounded
        (r < 1 - clip_low, r > 1 + clip_high), whatever the sign of A: these tokens still get a gradient.

    Example: r [[2.0, 0.5]], logp [[-1, -1]], A [1], clip_high 0.2 -> weights [1.2, 0.5], loss [[1.2, 0.5]].
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1]
    ratio = torch.exp(clamped_log_ratio(logprobs.detach(), old_logprobs))  # [B, T], no gradient
    low = 0.0 if clip_low is None else max(1.0 - clip_low, 0.0)
    weight = ratio.clamp(min=low, max=1.0 + clip_high)  # [B, T]
    loss = -weight * advantages * logprobs  # [B, T]
    return loss, ratio < low, ratio > 1.0 + clip_high


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

    Recommended (verl recipe/entropy, Qwen2.5-7B): frac 2e-3, coef 1 (algorithm.kl_cov_coef); verl's config
    defaults are kl_cov_ratio 2e-4 and ppo_kl_coef 0.1. Same as verl's compute_policy_loss_kl_cov; the
    covariance and the count are over the tokens passed in (one micro-batch in verl too). r_t is
    exp(clamped_log_ratio), clamped to +-20 as verl's other losses are; the penalty takes the raw |log r_t|.

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
    ratio = torch.exp(clamped_log_ratio(logprobs, old_logprobs))  # [B, T]
    loss = -ratio * adv + coef * log_ratio.abs() * penalised  # [B, T]
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
