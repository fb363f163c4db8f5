"""The loss menu (GSPO, CISPO, high-entropy tokens, mismatch masking, pass@k, REINFORCE++-baseline, KL-Cov
and Clip-Cov, dual clip) against hand-computed literals, loop references, and the peers' formulas as they
write them.

Each `_verl_*` / `_trl_*` / `_authors_*` function re-types a peer's formula from its source (file and function
in its docstring; verl at commit b178a3cd, TRL at f2cd5771) so the parity tests compare against the peer's
convention, not ours; where the conventions differ, a test pins the difference.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from rl.batch import Round, StepBatch, rank_advantages
from rl.config import load_config
from rl.distributed import Distributed
from rl.errors import ConfigError
from rl.grpo import aggregate_loss, group_advantages, passk_advantages, policy_loss, token_whiten
from rl.losses import (
    cispo_loss,
    clip_cov_loss,
    gspo_loss,
    kl_cov_loss,
    mismatch_correction,
    sequence_log_ratio,
    top_entropy_mask,
)
from rl.trajectory import Trajectory
from rl.update import MicroBatch, micro_batch_loss

D = torch.float64
# 2 sequences x 3 tokens; the first has 2 completion tokens and one pad
LOG_RATIO = torch.tensor([[0.1, 0.3, 5.0], [-0.3, 0.0, 0.6]], dtype=D)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def _logps(log_ratio: torch.Tensor, base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs with grad, old_logprobs) whose difference is log_ratio."""
    base = torch.full_like(log_ratio, -1.0) if base is None else base
    return (base + log_ratio).clone().requires_grad_(True), base.clone()


def _grad(loss: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, logp)
    return g


# ---------------------------------------------------------------- GSPO


def test_sequence_log_ratio_is_the_mean_over_completion_tokens():
    logp, old = _logps(LOG_RATIO)
    got = sequence_log_ratio(logp, old, MASK)
    torch.testing.assert_close(
        got, torch.tensor([0.2, 0.1], dtype=D)
    )  # (0.1 + 0.3) / 2, (-0.3 + 0 + 0.6) / 3
    # d log s_i / d logp_it = 1 / |y_i| on the sequence's tokens, 0 on padding
    torch.testing.assert_close(_grad(got.sum(), logp), torch.tensor([[0.5, 0.5, 0], [1 / 3] * 3], dtype=D))
    empty = sequence_log_ratio(torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    assert empty.tolist() == [0.0]


def test_gspo_clips_whole_sequences_at_hand_computed_values():
    logp, old = _logps(LOG_RATIO)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    loss, low, high = gspo_loss(logp, old, adv, MASK, clip_low=0.2, clip_high=0.2)
    # s = [e^0.2, e^0.1] = [1.221403, 1.105171]: the first above 1.2 with A > 0 -> -1.2 on each token
    torch.testing.assert_close(loss, torch.tensor([[-1.2] * 3, [1.105171] * 3], dtype=D), atol=1e-6, rtol=0)
    assert high.tolist() == [[True] * 3, [False] * 3]
    assert not low.any()
    total = aggregate_loss(loss, MASK, "seq_mean_token_mean")
    assert total.item() == pytest.approx((-1.2 + 1.105171) / 2, abs=1e-6)
    # clipped sequence: no gradient; the other: -(1/B) A s / |y| = 1.105171 / 6 per token
    torch.testing.assert_close(
        _grad(total, logp), torch.tensor([[0, 0, 0], [0.1841952] * 3], dtype=D), atol=1e-6, rtol=0
    )


def test_gspo_paper_clip_range_hits_both_bounds():
    # paper values 3e-4 / 4e-4: mean log-ratios 6e-4 (s = 1.00060018) and -5e-4 (s = 0.99950012)
    logp, old = _logps(torch.tensor([[5e-4, 7e-4], [-4e-4, -6e-4]], dtype=D))
    loss, low, high = gspo_loss(logp, old, torch.tensor([1.0, -1.0], dtype=D), torch.ones(2, 2))
    torch.testing.assert_close(loss, torch.tensor([[-1.0004] * 2, [0.9997] * 2], dtype=D))
    assert high[:, 0].tolist() == [True, False] and low[:, 0].tolist() == [False, True]


def test_gspo_token_has_gspo_values_and_gradients_with_sequence_advantages():
    torch.manual_seed(0)
    log_ratio, mask = torch.randn(4, 5, dtype=D) * 0.2, (torch.rand(4, 5) > 0.3).int()
    mask[:, 0] = 1
    adv = torch.randn(4, dtype=D)
    for agg in ("seq_mean_token_mean", "token_mean"):
        logp_s, old = _logps(log_ratio)
        logp_t, _ = _logps(log_ratio)
        seq, lo_s, hi_s = gspo_loss(logp_s, old, adv, mask, 0.05, 0.05)
        tok, lo_t, hi_t = gspo_loss(logp_t, old, adv, mask, 0.05, 0.05, token_level=True)
        torch.testing.assert_close(seq, tok)
        assert torch.equal(lo_s, lo_t) and torch.equal(hi_s, hi_t)
        g_seq = _grad(aggregate_loss(seq, mask, agg), logp_s)
        g_tok = _grad(aggregate_loss(tok, mask, agg), logp_t)
        torch.testing.assert_close(g_seq, g_tok)


def test_gspo_token_gives_each_token_its_own_gradient_with_token_advantages():
    # one sequence, ratio 1: GSPO-token's token t gets -A_t / |y| (seq mean); GSPO's gets -mean(A) / |y|
    logp, old = _logps(torch.zeros(1, 2, dtype=D))
    adv = torch.tensor([[1.0, -3.0]], dtype=D)
    mask = torch.ones(1, 2)
    tok, _, _ = gspo_loss(logp, old, adv, mask, token_level=True)
    torch.testing.assert_close(
        _grad(aggregate_loss(tok, mask, "seq_mean_token_mean"), logp), torch.tensor([[-0.5, 1.5]], dtype=D)
    )
    logp2, _ = _logps(torch.zeros(1, 2, dtype=D))
    seq, _, _ = gspo_loss(logp2, old, adv, mask)
    torch.testing.assert_close(
        _grad(aggregate_loss(seq, mask, "seq_mean_token_mean"), logp2), torch.tensor([[0.5, 0.5]], dtype=D)
    )


def _verl_gspo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high):
    """verl/trainer/ppo/core_algos.py::compute_policy_loss_gspo (GSPO-token, advantages [B, T]), then agg_loss
    with the "seq-mean-token-mean" it forces. Differs: clamps log s_it at 10; drops empty sequences from B."""
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    seq_mask = torch.sum(response_mask, dim=-1)
    seq_losses = torch.sum(pg_losses * response_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).float()
    pg_loss = (seq_losses * seq_mask).sum() / seq_mask.sum()
    pg_clipfrac = ((pg_losses2 > pg_losses1).float() * response_mask).sum() / response_mask.sum()
    return pg_losses, pg_loss, pg_clipfrac


def _trl_gspo(per_token_logps, old_per_token_logps, advantages, mask, epsilon_low, epsilon_high):
    """trl/trainer/grpo_trainer.py::GRPOTrainer._compute_loss with importance_sampling_level="sequence" and
    loss_type="grpo" (the GSPO setup of TRL's docs); advantages [B, 1]. The ratio keeps its gradient."""
    log_ratio = per_token_logps - old_per_token_logps
    log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    coef_1 = torch.exp(log_importance_weights.unsqueeze(-1))
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def test_gspo_matches_verl_and_trl_as_they_write_it():
    torch.manual_seed(1)
    log_ratio, mask = torch.randn(6, 5, dtype=D) * 0.02, (torch.rand(6, 5) > 0.3).to(D)
    mask[:, 0] = 1
    adv = torch.tensor([-0.7, 0.5, -1.2, 0.9, -0.4, 1.1], dtype=D)
    clip_low, clip_high = 1e-3, 1.5e-3  # s - 1 ~ [-8.5, 3.2, -3.3, -6.6, 4.0, 31] e-3: 4 sequences clipped
    base = torch.randn(6, 5, dtype=D) - 2

    logp, old = _logps(log_ratio, base)
    ours, low, high = gspo_loss(logp, old, adv, mask, clip_low, clip_high, token_level=True)
    ours_total = aggregate_loss(ours, mask, "seq_mean_token_mean")
    logp_v, _ = _logps(log_ratio, base)
    verl_mat, verl_total, verl_clipfrac = _verl_gspo(
        old, logp_v, adv.unsqueeze(1).expand(6, 5), mask, clip_low, clip_high
    )
    torch.testing.assert_close(ours * mask, verl_mat * mask)
    torch.testing.assert_close(ours_total, verl_total)
    torch.testing.assert_close(_grad(ours_total, logp), _grad(verl_total, logp_v))
    assert 0 < verl_clipfrac.item() < 1  # the case clips something; verl's fraction is ours, token-weighted
    assert verl_clipfrac.item() == pytest.approx(((low | high) * mask).sum().item() / mask.sum().item())

    logp_s, _ = _logps(log_ratio, base)
    ours_seq = aggregate_loss(
        gspo_loss(logp_s, old, adv, mask, clip_low, clip_high)[0], mask, "seq_mean_token_mean"
    )
    logp_t, _ = _logps(log_ratio, base)
    trl_total = _trl_gspo(logp_t, old, adv.unsqueeze(1), mask, clip_low, clip_high)
    torch.testing.assert_close(ours_seq, trl_total)
    torch.testing.assert_close(_grad(ours_seq, logp_s), _grad(trl_total, logp_t))


# ---------------------------------------------------------------- CISPO

CISPO_LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -0.3, -1.2]], dtype=D)
CISPO_RATIO = torch.tensor([[2.0, 0.5, 1.0], [1.1, 3.0, 0.7]], dtype=D)
CISPO_ADV = torch.tensor([1.0, -1.0], dtype=D)


def test_cispo_matches_hand_computed_values_and_keeps_gradient_on_clipped_tokens():
    logp, old = _logps(torch.log(CISPO_RATIO), CISPO_LOGP - torch.log(CISPO_RATIO))
    loss, low, high = cispo_loss(logp, old, CISPO_ADV, clip_low=None, clip_high=0.2)
    # weights [[1.2, 0.5, 1.0], [1.1, 1.2, 0.7]]; L = -w * A * logp
    torch.testing.assert_close(loss, torch.tensor([[1.2, 1.0, 0.5], [-1.1, -0.36, -0.84]], dtype=D))
    assert high.tolist() == [[True, False, False], [False, True, False]] and not low.any()
    # gradient -w * A: the clipped tokens (ratio 2 and 3) keep -1.2 * A, where PPO gives them none
    g = _grad(loss.sum(), logp)
    torch.testing.assert_close(g, torch.tensor([[-1.2, -0.5, -1.0], [1.1, 1.2, 0.7]], dtype=D))
    ppo, _, _ = policy_loss(logp, old, CISPO_ADV)
    assert _grad(ppo.sum(), logp)[0, 0].item() == 0.0

    loss2, low2, _ = cispo_loss(logp, old, CISPO_ADV, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(loss2, torch.tensor([[1.2, 1.6, 0.5], [-1.1, -0.36, -0.96]], dtype=D))
    assert low2.tolist() == [[False, True, False], [False, False, True]]


def test_cispo_gradient_equals_ppo_gradient_on_policy():
    torch.manual_seed(2)
    logp = (torch.randn(3, 4, dtype=D) - 1).requires_grad_(True)
    adv = torch.randn(3, dtype=D)
    cispo, _, _ = cispo_loss(logp, logp.detach(), adv)
    ppo, _, _ = policy_loss(logp, logp.detach(), adv)
    torch.testing.assert_close(_grad(cispo.sum(), logp), _grad(ppo.sum(), logp))


def _verl_cispo(old_log_prob, log_prob, advantages, clip_ratio_low, clip_ratio_high):
    """verl/trainer/ppo/core_algos.py::compute_policy_loss_cispo, per-token losses before agg_loss: clamps the
    ratio to [1 - clip_ratio_low, 1 + clip_ratio_high] (the actor's PPO clips), the log-ratio to +-20."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    return -clipped_ratio.detach() * advantages * log_prob, (ratio != clipped_ratio).float()


def _trl_cispo(per_token_logps, old_per_token_logps, advantages, epsilon_high):
    """trl/trainer/grpo_trainer.py::GRPOTrainer._compute_loss, loss_type="cispo", token level: the ratio is
    capped at epsilon_high itself (not 1 + epsilon_high), no lower bound."""
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
    return -clamped_ratios * advantages * per_token_logps


def test_cispo_matches_verl_and_trl_as_they_write_it():
    torch.manual_seed(3)
    base, log_ratio = torch.randn(4, 6, dtype=D) - 1, torch.randn(4, 6, dtype=D) * 0.5
    adv = torch.randn(4, 1, dtype=D)
    logp, old = _logps(log_ratio, base)
    ours, low, high = cispo_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    logp_v, _ = _logps(log_ratio, base)
    verl, verl_clipped = _verl_cispo(old, logp_v, adv, 0.2, 0.28)
    torch.testing.assert_close(ours, verl)
    torch.testing.assert_close(_grad(ours.sum(), logp), _grad(verl.sum(), logp_v))
    assert torch.equal((low | high).to(D), verl_clipped)

    # TRL's epsilon_high = 5 (its recommendation) is our clip_high = 4, with clip_low None
    logp, _ = _logps(log_ratio * 4, base)
    ours, _, high = cispo_loss(logp, old, adv, clip_low=None, clip_high=4.0)
    assert high.any()
    logp_t, _ = _logps(log_ratio * 4, base)
    trl = _trl_cispo(logp_t, old, adv, epsilon_high=5.0)
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(_grad(ours.sum(), logp), _grad(trl.sum(), logp_t))


# ---------------------------------------------------------------- high-entropy tokens

ENTROPY = torch.tensor([[0.1, 2.0, 0.5], [1.0, 0.2, 9.9]])
ENT_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # 9.9 is padding


def test_top_entropy_mask_matches_hand_computed_values():
    # completion entropies sorted [0.1, 0.2, 0.5, 1.0, 2.0]; quantile 0.6 at 2.4: 0.5 + 0.4 * 0.5 = 0.7
    got = top_entropy_mask(ENTROPY, ENT_MASK, 0.4)
    assert got.tolist() == [[False, True, False], [True, False, False]]
    assert top_entropy_mask(ENTROPY, ENT_MASK, 0.0).tolist() == [[False, True, False], [False] * 3]
    assert top_entropy_mask(ENTROPY, ENT_MASK, 1.0).tolist() == [[True] * 3, [True, True, False]]
    ties = top_entropy_mask(torch.ones(2, 3), torch.ones(2, 3), 0.2)
    assert ties.all()  # ties at the threshold are kept, as in TRL
    assert not top_entropy_mask(ENTROPY, torch.zeros(2, 3), 0.2).any()
    with pytest.raises(ValueError, match="fraction"):
        top_entropy_mask(ENTROPY, MASK, 1.5)


def _trl_high_entropy_mask(entropies, mask, threshold):
    """trl/trainer/grpo_trainer.py::GRPOTrainer.get_high_entropy_mask on one process (the gather is the
    identity), called with threshold = 1 - top_entropy_quantile."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, threshold)
    masked_entropies = entropies * mask.float()
    entropy_mask = masked_entropies >= entropy_threshold
    return entropy_mask & mask.bool()


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_top_entropy_mask_matches_trl(frac):
    torch.manual_seed(4)
    entropy, mask = torch.rand(8, 16) * 3, (torch.rand(8, 16) > 0.25).int()
    got = top_entropy_mask(entropy, mask, frac)
    assert torch.equal(got, _trl_high_entropy_mask(entropy, mask, 1 - frac))
    assert abs(got.sum().item() - frac * mask.sum().item()) <= 1  # about frac of the tokens, at least one


# ---------------------------------------------------------------- rollout/trainer mismatch

LN = math.log
MIS_LOG_RATIO = torch.tensor([[0.0, LN(2), LN(0.4)], [LN(3), 0.0, 0.0]], dtype=D)
MIS_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _mis(mode, **kw):
    rollout = torch.full((2, 3), -1.0, dtype=D)
    return mismatch_correction(rollout + MIS_LOG_RATIO, rollout, MIS_MASK, mode, **kw)


def test_mismatch_correction_matches_hand_computed_values():
    none = _mis("none")
    assert none.weights.tolist() == [[1.0] * 3] * 2 and torch.equal(none.kept, MIS_MASK.bool())
    torch.testing.assert_close(_mis("tis", high=2.0).weights, torch.tensor([[1, 2, 0.4], [2, 1, 1]], dtype=D))
    torch.testing.assert_close(
        _mis("tis", low=0.5, high=2.0).weights, torch.tensor([[1, 2, 0.5], [2, 1, 1]], dtype=D)
    )
    token = _mis("token_mask", low=0.5, high=2.5)  # ratios [[1, 2, 0.4], [3, 1, pad]]
    torch.testing.assert_close(token.weights, torch.tensor([[1, 2, 0], [0, 1, 0]], dtype=D))
    assert token.kept.tolist() == [[True, True, False], [False, True, False]]
    seq = _mis("sequence_mask", high=2.5)  # products R = [1 * 2 * 0.4, 3 * 1] = [0.8, 3]
    torch.testing.assert_close(seq.weights, torch.tensor([[0.8] * 3, [0] * 3], dtype=D))
    assert seq.kept.tolist() == [[True] * 3, [False] * 3]
    torch.testing.assert_close(seq.ratio[:, 0], torch.tensor([0.8, 3.0], dtype=D))
    geo = _mis("sequence_mask", low=0.95, high=2.0, seq_agg="mean")  # R = [0.8^(1/3), 3^(1/2)]
    r2 = math.sqrt(3)
    torch.testing.assert_close(geo.ratio[:, 0], torch.tensor([0.8 ** (1 / 3), r2], dtype=D))
    torch.testing.assert_close(geo.weights, torch.tensor([[0] * 3, [r2, r2, 0]], dtype=D))
    masked_frac = 1 - geo.kept.sum() / MIS_MASK.sum()  # the metric: 3 of 5 completion tokens dropped
    assert masked_frac.item() == pytest.approx(0.6)


def test_mismatch_weights_carry_no_gradient_and_survive_overflow():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    rollout = torch.tensor([[-60.0, -60.0]])  # sequence log-ratio 120: exp overflows float32
    out = mismatch_correction(logp, rollout, torch.ones(1, 2), "sequence_mask", high=3.0)
    assert not out.weights.requires_grad
    assert out.weights.tolist() == [[0.0, 0.0]] and not out.kept.any()  # dropped, not NaN
    with pytest.raises(ValueError, match="mode"):
        mismatch_correction(logp, rollout, torch.ones(1, 2), "sequence_truncate")  # type: ignore[arg-type]


def _trl_vllm_importance_sampling(
    old_per_token_logps, sampling_per_token_logps, mask, mode, clip_min, clip_max
):
    """trl/trainer/grpo_trainer.py::GRPOTrainer._generate_and_score_completions, the
    vllm_importance_sampling_correction block: (B, T) for token_* modes, (B, 1) for sequence_* ones."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)


@pytest.mark.parametrize(
    ("ours", "trl", "low", "high"),
    [
        ("tis", "token_truncate", None, 2.0),
        ("tis", "token_truncate", 0.5, 2.0),
        ("token_mask", "token_mask", 0.5, 2.0),
        ("sequence_mask", "sequence_mask", None, 3.0),  # TRL's default
        ("sequence_mask", "sequence_mask", 0.5, 2.0),
    ],
)
def test_mismatch_correction_matches_trl(ours, trl, low, high):
    torch.manual_seed(5)
    rollout, mask = torch.randn(16, 6, dtype=D) - 1, (torch.rand(16, 6) > 0.2).to(D)
    old = rollout + torch.randn(16, 6, dtype=D) * 0.4
    got = mismatch_correction(old, rollout, mask, ours, low=low, high=high)
    want = _trl_vllm_importance_sampling(old, rollout, mask, trl, low, high).expand(16, 6)
    torch.testing.assert_close(got.weights * mask, want * mask)
    assert 0 < got.kept.sum() < mask.sum() or ours == "tis"  # the case drops some tokens, not all


def _verl_rejection_keep(log_ratio, response_mask, option, lower, upper):
    """verl/trainer/ppo/rollout_corr_helper.py::compute_rollout_rejection_mask for the k1 options, threshold
    "lower_upper": note the bounds apply to -log r (k1), so r is kept in [1/upper, 1/lower]."""
    token_k1 = -torch.clamp(log_ratio, min=-20.0, max=20.0)
    if option == "token_k1":
        stat = token_k1
    elif option == "seq_sum_k1":
        stat = (token_k1 * response_mask).sum(-1, keepdim=True)
    else:  # seq_mean_k1
        stat = (token_k1 * response_mask).sum(-1, keepdim=True) / (response_mask.sum(-1, keepdim=True) + 1e-8)
    keep = (stat >= math.log(lower)) & (stat <= math.log(upper))
    return keep.expand_as(log_ratio) & response_mask.bool()


def _verl_sequence_is_weights(log_ratio, response_mask, rollout_is_threshold):
    """verl/trainer/ppo/rollout_corr_helper.py::compute_rollout_correction_weights, rollout_is="sequence"."""
    log_ratio_sum = (log_ratio * response_mask).sum(-1, keepdim=True)
    weights = torch.exp(torch.clamp(log_ratio_sum, min=-20.0, max=20.0)).expand_as(log_ratio) * response_mask
    return weights.clamp(max=rollout_is_threshold).detach()


def test_sequence_mask_matches_verl_seq_mis_and_geo_rs_presets():
    torch.manual_seed(6)
    rollout, mask = torch.randn(32, 6, dtype=D) - 1, (torch.rand(32, 6) > 0.2).to(D)
    old = rollout + torch.randn(32, 6, dtype=D) * 0.3
    # RolloutCorrectionConfig.decoupled_seq_is_rs(): sequence IS truncated at 2, rollout_rs seq_sum_k1 0.5_2.0
    ours = mismatch_correction(old, rollout, mask, "sequence_mask", low=0.5, high=2.0)
    verl_keep = _verl_rejection_keep(old - rollout, mask, "seq_sum_k1", 0.5, 2.0)
    verl = _verl_sequence_is_weights(old - rollout, mask, 2.0) * verl_keep
    torch.testing.assert_close(ours.weights * mask, verl)
    assert torch.equal(ours.kept, verl_keep) and 0 < ours.kept.sum() < mask.sum()
    # decoupled_geo_rs(): seq_mean_k1 "0.999_1.001", rejection only (weights 1): our `kept`
    near = rollout + torch.randn(32, 6, dtype=D) * 2e-3
    geo = mismatch_correction(near, rollout, mask, "sequence_mask", low=0.999, high=1.001, seq_agg="mean")
    assert torch.equal(geo.kept, _verl_rejection_keep(near - rollout, mask, "seq_mean_k1", 0.999, 1.001))
    assert 0 < geo.kept.sum() < mask.sum()


def test_verl_reads_asymmetric_k1_bounds_on_the_inverse_ratio():
    # token ratios [1.8, 0.6] with bounds [0.5, 1.5]: we keep 0.6 and drop 1.8; verl keeps r in [1/1.5, 1/0.5]
    log_ratio = torch.log(torch.tensor([[1.8, 0.6]], dtype=D))
    ours = mismatch_correction(
        log_ratio, torch.zeros(1, 2, dtype=D), torch.ones(1, 2), "token_mask", 0.5, 1.5
    )
    assert ours.kept.tolist() == [[False, True]]
    assert _verl_rejection_keep(log_ratio, torch.ones(1, 2), "token_k1", 0.5, 1.5).tolist() == [[True, False]]


# ---------------------------------------------------------------- pass@k advantages

P2 = 1 / math.sqrt(2)


@pytest.mark.parametrize(
    ("rewards", "k", "expected"),
    [
        # R = 1 - C(3,2)/C(4,2) = 1/2, s = 1/2: (1 - 1/2) / s = 1; (1 - 1/2 - C(2,1)/C(3,1)) / s = -1/3
        ([[1, 0, 0, 0]], 2, [[1, -1 / 3, -1 / 3, -1 / 3]]),
        # R = 5/6, s = sqrt(5)/6: +-1/sqrt(5)
        ([[1, 1, 0, 0]], 2, [[0.447214, 0.447214, -0.447214, -0.447214]]),
        # group 1: R = 2/3, s = sqrt(2)/3 -> 1/sqrt(2), -1/(2 sqrt(2)); group 2: 1 miss < k, all pairs pass
        ([[1, 0, 0], [1, 1, 0]], 2, [[P2, -P2 / 2, -P2 / 2], [0, 0, 0]]),
        ([[0, 0, 0], [1, 1, 1]], 2, [[0, 0, 0], [0, 0, 0]]),
    ],
)
def test_passk_advantages_match_hand_computed_values(rewards, k, expected):
    got = passk_advantages(torch.tensor(rewards, dtype=D), k)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=D), atol=1e-5, rtol=0)


def test_passk_with_k1_is_grpo_with_the_population_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=D)
    grpo = group_advantages(rewards, "mean", "group", eps=0.0) * math.sqrt(3 / 2)
    torch.testing.assert_close(passk_advantages(rewards, 1, eps=0.0), grpo)


def test_passk_ignores_unscored_samples_and_groups_smaller_than_k():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.0, 0.0, nan], [1.0, nan, nan, nan]], dtype=D)
    got = passk_advantages(rewards, 2, scored=~rewards.isnan())
    torch.testing.assert_close(
        got, torch.tensor([[P2, -P2 / 2, -P2 / 2, 0], [0, 0, 0, 0]], dtype=D), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="binary"):
        passk_advantages(torch.tensor([[0.5, 1.0]]), 1)
    with pytest.raises(ValueError, match="k <= group size"):
        passk_advantages(torch.tensor([[0.0, 1.0]]), 3)


def _loop_passk(group: list[int], k: int, eps: float = 1e-6) -> list[float]:
    """The definition: enumerate every k-subset; a sample's advantage is the mean pass@k of the subsets
    holding it, minus the mean over all subsets, over the (population) std over all subsets."""
    subsets = list(itertools.combinations(range(len(group)), k))
    reward = {s: float(any(group[i] for i in s)) for s in subsets}
    mean = sum(reward.values()) / len(subsets)
    std = math.sqrt(sum((v - mean) ** 2 for v in reward.values()) / len(subsets))
    out = []
    for i in range(len(group)):
        mine = [reward[s] for s in subsets if i in s]
        out.append((sum(mine) / len(mine) - mean) / (std + eps))
    return out


def _authors_calc_adv(val: list[int], k: int) -> list[float]:
    """RUCAIBox/Passk_Training, code/passk_adv.py::calc_adv (scipy.special.comb -> math.comb, 0 for n < k)."""

    def comb(n, r):
        return math.comb(n, r) if 0 <= r <= n else 0

    c, n = sum(1 for v in val if v == 1), len(val)
    rho = 1 - comb(n - c, k) / comb(n, k)
    sigma = math.sqrt(rho * (1 - rho))
    adv_p = (1 - rho) / (sigma + 1e-6)
    adv_n = (1 - rho - comb(n - c - 1, k - 1) / comb(n - 1, k - 1)) / (sigma + 1e-6)
    new_val = [adv_p if v == 1 else v for v in val]  # np.where(val == 1, adv_p, val)
    return [adv_n if v == 0 else v for v in new_val]  # np.where(new_val == 0, adv_n, new_val)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_passk_matches_the_subset_loop_and_the_authors_code(k):
    gen = torch.Generator().manual_seed(k)
    groups = (torch.rand(12, 6, generator=gen) < 0.35).to(D)
    got = passk_advantages(groups, k)
    for row, group in zip(got.tolist(), groups.int().tolist(), strict=True):
        assert row == pytest.approx(_loop_passk(group, k), abs=1e-5)
        assert row == pytest.approx(_authors_calc_adv(group, k), abs=1e-9)


def _verl_grpo_passk(scores: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """verl/trainer/ppo/core_algos.py::compute_grpo_passk_outcome_advantage with norm_adv_by_std_in_grpo, one
    group per row: only the best sample gets (r_max - r_second_max) / (std + eps)."""
    advantages = torch.zeros_like(scores)
    for g, rewards in enumerate(scores):
        topk, topk_idx = torch.topk(rewards, 2)
        advantages[g, topk_idx[0]] = (topk[0] - topk[1]) / (torch.std(rewards) + epsilon)
    return advantages


def test_passk_and_verl_grpo_passk_agree_only_off_single_correct_groups():
    rewards = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=D)
    ours, verl = passk_advantages(rewards, k=4), _verl_grpo_passk(rewards)
    torch.testing.assert_close(ours[:3], verl[:3])  # no correct, several correct, all correct: all 0
    assert ours[3].tolist() == [0.0] * 4  # one correct and k = G: every 4-subset passes, nothing to learn
    assert verl[3].tolist() == pytest.approx([0, 0, 1 / (0.5 + 1e-6), 0])  # std of [0, 0, 1, 0] is 0.5


# ---------------------------------------------------------------- REINFORCE++-baseline

REWARDS = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=D)


def test_batch_centered_scale_matches_hand_computed_values():
    # centred [[2/3, -1/3, -1/3], [1/3, 1/3, -2/3]], sum of squares 4/3, unbiased std sqrt(4/15) = 0.516398
    got = group_advantages(REWARDS, "mean", "batch_centered")
    want = [[1.290994, -0.645497, -0.645497], [0.645497, 0.645497, -1.290994]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=D), atol=1e-5, rtol=0)
    # scale="batch" divides by the std of the raw rewards, sqrt(0.3) = 0.547723: smaller advantages
    assert group_advantages(REWARDS, "mean", "batch")[0, 0].item() == pytest.approx(1.217161, abs=1e-5)
    nan = float("nan")
    masked = torch.tensor([[1.0, 0.0, nan, nan], [nan, 1.0, nan, nan]], dtype=D)
    got = group_advantages(masked, "mean", "batch_centered", scored=~masked.isnan())
    torch.testing.assert_close(got, torch.tensor([[P2, -P2, 0, 0], [0, 0, 0, 0]], dtype=D), atol=1e-5, rtol=0)


def _verl_reinforce_pp_baseline(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """verl/trainer/ppo/core_algos.py::compute_reinforce_plus_plus_baseline_outcome_advantage, groups as rows
    (all of size > 1), with verl/utils/torch_functional.py::masked_whiten (token-weighted mean and unbiased
    variance over the tokens, the mean re-subtracted, rsqrt(var + 1e-8))."""
    scores = scores - scores.mean(dim=1, keepdim=True)
    flat = scores.reshape(-1, 1)
    values = flat.tile([1, response_mask.shape[-1]]) * response_mask
    mean = (values * response_mask).sum() / (response_mask.sum() + 1e-8)
    var = ((values - mean) ** 2 * response_mask).sum() / (response_mask.sum() + 1e-8)
    var = var * response_mask.sum() / (response_mask.sum() - 1)
    return ((values - mean) * torch.rsqrt(var + 1e-8) * response_mask)[:, 0].reshape(scores.shape)


def test_batch_centered_is_verl_reinforce_pp_baseline():
    torch.manual_seed(7)
    rewards = torch.randn(4, 5, dtype=D)
    ours = group_advantages(rewards, "mean", "batch_centered")
    # one token per response: verl's token statistics are the sequence statistics
    torch.testing.assert_close(
        ours, _verl_reinforce_pp_baseline(rewards, torch.ones(20, 1, dtype=D)), atol=1e-5, rtol=0
    )
    # equal lengths L, ours told only one token each: verl's Bessel factor counts B * L tokens, so
    # verl = ours * sqrt((B L - 1) / (L (B - 1))); told the lengths, ours is verl's
    b, length = 20, 3
    verl = _verl_reinforce_pp_baseline(rewards, torch.ones(b, length, dtype=D))
    factor = math.sqrt((b * length - 1) / (length * (b - 1)))
    torch.testing.assert_close(verl, ours * factor, atol=1e-5, rtol=0)
    told = group_advantages(rewards, "mean", "batch_centered", lengths=torch.full((4, 5), 3.0, dtype=D))
    torch.testing.assert_close(told, verl, atol=1e-6, rtol=0)


def test_token_whiten_counts_each_sequence_once_per_token():
    # N 4, token-weighted mean (1 - 3) / 4 = -0.5, var (1.5^2 + 3 * 0.5^2) / 3 = 1
    got = token_whiten(torch.tensor([[1.0, -1.0]], dtype=D), torch.tensor([[1, 3]]))
    torch.testing.assert_close(got, torch.tensor([[1.5, -0.5]], dtype=D), atol=1e-7, rtol=0)


def test_batch_centered_whitens_over_tokens_as_verl_does_with_unequal_lengths():
    # REWARDS centred [[2/3, -1/3, -1/3], [1/3, 1/3, -2/3]], lengths [[1, 2, 3], [4, 5, 6]]: N 21,
    # token mean (2/3 - 2/3 - 1 + 4/3 + 5/3 - 4) / 21 = -2/21; centred again [[16, -5, -5], [9, 9, -12]] / 21;
    # unbiased token variance (256 + 2 * 25 + 3 * 25 + 4 * 81 + 5 * 81 + 6 * 144) / 441 / 20 = 47/210
    lengths = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=D)
    got = group_advantages(REWARDS, "mean", "batch_centered", lengths=lengths)
    want = torch.tensor([[16, -5, -5], [9, 9, -12]], dtype=D) / 21 / math.sqrt(47 / 210 + 1e-8)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    assert got[0].tolist() == pytest.approx([1.6105, -0.5033, -0.5033], abs=1e-4)
    torch.manual_seed(11)
    rewards, lengths = torch.randn(4, 5, dtype=D), torch.randint(1, 9, (4, 5))
    mask = (torch.arange(8) < lengths.reshape(-1, 1)).to(D)  # [20, 8], a ragged batch
    verl = _verl_reinforce_pp_baseline(rewards, mask)
    torch.testing.assert_close(
        group_advantages(rewards, "mean", "batch_centered", lengths=lengths), verl, atol=1e-6, rtol=0
    )
    sequence_level = group_advantages(rewards, "mean", "batch_centered")  # each sample counted once
    assert (sequence_level - verl).abs().max() > 0.05  # what token weighting changes


def test_batch_centered_leaves_unscored_samples_and_lone_groups_out_of_the_token_statistics():
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.0, nan], [nan, 1.0, nan], [0.0, 1.0, 1.0]], dtype=D)
    lengths = torch.tensor([[2, 2, 50], [40, 40, 40], [1, 1, 1]], dtype=D)
    got = group_advantages(rewards, "mean", "batch_centered", scored=~rewards.isnan(), lengths=lengths)
    # usable: group 0 (centred 0.5, -0.5, 2 tokens each) and group 2 (-2/3, 1/3, 1/3, 1 token each)
    centred = torch.tensor([0.5, -0.5, -2 / 3, 1 / 3, 1 / 3], dtype=D)
    tokens = torch.tensor([2, 2, 1, 1, 1], dtype=D)
    expected = token_whiten(centred.unsqueeze(0), tokens.unsqueeze(0))[0]
    torch.testing.assert_close(got[0, :2], expected[:2])
    torch.testing.assert_close(got[2], expected[2:])
    assert got[0, 2].item() == 0.0 and got[1].tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- dual clip


def _verl_vanilla(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c):
    """verl/trainer/ppo/core_algos.py::compute_policy_loss_vanilla, per-token losses and the two clip
    fractions (log-ratio clamped to +-20)."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = ((pg_losses2 > pg_losses1).float() * response_mask).sum() / response_mask.sum()
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    lower = (torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float() * response_mask).sum()
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return pg_losses, pg_clipfrac, lower / response_mask.sum()


def test_dual_clip_bounds_ratios_above_c_and_matches_verl():
    ratios = torch.tensor([[0.5, 1.0, 2.9, 3.5, 10.0]] * 2, dtype=D)
    adv = torch.tensor([[-1.0], [1.0]], dtype=D)
    logp, old = _logps(torch.log(ratios))
    loss, low, high = policy_loss(logp, old, adv, 0.2, 0.2, dual_clip=3.0)
    # A < 0: max(r, clip(r)), then at most c = 3; A > 0: -min(r, clip(r))
    want = [[0.8, 1.0, 2.9, 3.0, 3.0], [-0.5, -1.0, -1.2, -1.2, -1.2]]
    torch.testing.assert_close(loss, torch.tensor(want, dtype=D))
    # gradient -A r where the surrogate is live; 0 where clipped or dual-clipped (r = 3.5 and 10 on A < 0)
    want_grad = [[0.0, 1.0, 2.9, 0.0, 0.0], [-0.5, -1.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(_grad(loss.sum(), logp), torch.tensor(want_grad, dtype=D))
    mask = torch.ones(2, 5, dtype=D)
    verl, clipfrac, clipfrac_lower = _verl_vanilla(old, logp.detach(), adv, mask, 0.2, 0.2, 3.0)
    torch.testing.assert_close(loss.detach(), verl)
    assert clipfrac.item() == pytest.approx((low | high).sum().item() / 10)  # 1 low (0.5, A<0) + 3 high
    assert clipfrac_lower.item() == pytest.approx(2 / 10)  # the dual-clipped tokens


# ---------------------------------------------------------------- KL-Cov and Clip-Cov


def test_kl_cov_penalises_the_highest_covariance_token():
    logp, old = _logps(
        torch.tensor([[LN(2), 0.0, 0.0]], dtype=D), torch.tensor([[-0.5 - LN(2), -1.0, -1.5]], dtype=D)
    )
    adv = torch.tensor([[1.0, 0.0, 0.0]], dtype=D)
    # Cov = (logp - (-1)) * (A - 1/3) = [0.5 * 2/3, 0, -0.5 * -1/3] = [1/3, 0, 1/6]; floor(0.4 * 3) = 1 token
    loss, penalised = kl_cov_loss(logp, old, adv, torch.ones(1, 3), frac=0.4, coef=1.0)
    torch.testing.assert_close(loss, torch.tensor([[-2 + LN(2), 0.0, 0.0]], dtype=D))
    assert penalised.tolist() == [[True, False, False]]
    # d/dlogp of -r A + |log r| at r = 2, A = 1: -2 + 1
    assert _grad(loss.sum(), logp)[0, 0].item() == pytest.approx(-1.0)


def _verl_kl_cov(old_log_prob, log_prob, advantages, response_mask, kl_cov_ratio, ppo_kl_coef):
    """verl/trainer/ppo/core_algos.py::compute_policy_loss_kl_cov, per-token losses before agg_loss."""
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1
    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1).cpu()
    all_valid_logp = log_prob[all_valid].detach().reshape(-1).cpu()
    cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
    k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
    large_cov_idxs = all_valid_idx[torch.topk(cov_lst_all, k_percent_nums, largest=True).indices]
    rows, cols = large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]
    pg_losses[rows, cols] = pg_losses_kl[rows, cols]
    return pg_losses


def test_kl_cov_matches_verl():
    torch.manual_seed(8)
    base, log_ratio = torch.randn(6, 8, dtype=D) - 1, torch.randn(6, 8, dtype=D) * 0.1
    mask = (torch.rand(6, 8) > 0.2).to(D)
    adv = torch.randn(6, 1, dtype=D).expand(6, 8)
    logp, old = _logps(log_ratio, base)
    ours, penalised = kl_cov_loss(logp, old, adv, mask, frac=0.1, coef=0.5)
    logp_v, _ = _logps(log_ratio, base)
    verl = _verl_kl_cov(old, logp_v, adv, mask, 0.1, 0.5)
    assert penalised.sum().item() == int(0.1 * mask.sum().item())
    torch.testing.assert_close(ours * mask, verl * mask)
    torch.testing.assert_close(_grad((ours * mask).sum(), logp), _grad((verl * mask).sum(), logp_v))


def test_clip_cov_detaches_the_tokens_in_the_covariance_band():
    # r = 1; Cov = (logp + 1) * A = [1 * 2, 0, 0, -3 * -2] = [2, 0, 0, 6]: only the first lies in (1, 5)
    logp = torch.tensor([[0.0, 0.0, 0.0, -4.0]], dtype=D, requires_grad=True)
    adv = torch.tensor([[2.0, 0.0, 0.0, -2.0]], dtype=D)
    loss, low, high, cov_clipped = clip_cov_loss(logp, logp.detach(), adv, torch.ones(1, 4), frac=0.25)
    torch.testing.assert_close(loss, torch.tensor([[0.0, 0.0, 0.0, 2.0]], dtype=D))
    assert cov_clipped.tolist() == [[True, False, False, False]] and not (low | high).any()
    torch.testing.assert_close(_grad(loss.sum(), logp), torch.tensor([[0.0, 0.0, 0.0, 2.0]], dtype=D))


def _verl_clip_cov(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, ratio_, lb, ub):
    """verl/trainer/ppo/core_algos.py::compute_policy_loss_clip_cov, per-token losses before agg_loss; the
    random draw (torch.randperm) only matters when there are more candidates than clip_num."""
    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
    mean_adv = (advantages * response_mask).sum() / (response_mask.sum() + 1e-8)
    mean_logp = (log_prob.detach() * response_mask).sum() / (response_mask.sum() + 1e-8)
    cov_all = (advantages - mean_adv) * (log_prob - mean_logp)
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(ratio_ * response_mask.sum().item()), 1)
    top_k_idx = torch.nonzero((cov_all < ub) & (cov_all > lb) & (response_mask > 0))
    top_k_idx = top_k_idx[torch.randperm(len(top_k_idx))[: min(clip_num, len(top_k_idx))]]
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    return torch.maximum(pg_losses1, pg_losses2) * corr, corr == 0


def test_clip_cov_matches_verl_when_every_candidate_is_drawn():
    torch.manual_seed(9)
    base, log_ratio = torch.randn(6, 8, dtype=D) * 2 - 2, torch.randn(6, 8, dtype=D) * 0.3
    mask = (torch.rand(6, 8) > 0.2).to(D)
    adv = (torch.randn(6, 1, dtype=D) * 2).expand(6, 8)
    logp, old = _logps(log_ratio, base)
    ours, _, _, cov_clipped = clip_cov_loss(
        logp, old, adv, mask, 0.2, 0.2, frac=1.0, cov_low=0.5, cov_high=5.0
    )
    logp_v, _ = _logps(log_ratio, base)
    verl, verl_clipped = _verl_clip_cov(old, logp_v, adv, mask, 0.2, 0.2, 1.0, 0.5, 5.0)
    assert 0 < cov_clipped.sum() < mask.sum() and torch.equal(cov_clipped, verl_clipped)
    torch.testing.assert_close(ours * mask, verl * mask)
    torch.testing.assert_close(_grad((ours * mask).sum(), logp), _grad((verl * mask).sum(), logp_v))


def test_clip_cov_draw_is_repeatable_with_a_seeded_generator():
    torch.manual_seed(10)
    logp, adv, mask = torch.randn(8, 8) * 2 - 2, (torch.randn(8, 1) * 3).expand(8, 8), torch.ones(8, 8)
    draws = [
        clip_cov_loss(
            logp, logp, adv, mask, frac=0.05, cov_low=0.1, generator=torch.Generator().manual_seed(0)
        )[3]
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1]) and draws[0].sum().item() == 3  # floor(0.05 * 64)


# ---------------------------------------------------------------- the log-ratio clamp (+-20, as verl)


def test_log_ratios_of_50_give_the_clipped_value_not_inf_or_nan():
    # float32: exp(50) = 5e21 and exp(100) = inf; inf * A = 0 gives NaN. Clamped at +-20 before exp:
    log_ratio = torch.tensor([[50.0, -50.0, 100.0], [50.0, -50.0, 100.0]])
    adv = torch.tensor([[1.0], [-1.0]])
    logp, old = _logps(log_ratio, torch.full((2, 3), -1.0))
    loss, low, high = policy_loss(logp, old, adv)
    e20 = math.exp(20.0)
    # A > 0: r past 1.2 is clipped, r = e^-20 is the unclipped min; A < 0: r = e^20 is the max, e^-20 clipped
    want = torch.tensor([[-1.2, -math.exp(-20.0), -1.2], [e20, 0.8, e20]])
    torch.testing.assert_close(loss, want)
    assert high[0].tolist() == [True, False, True] and low[1].tolist() == [False, True, False]
    assert torch.isfinite(_grad(loss.sum(), logp)).all()
    zero_adv, _, _ = policy_loss(logp, old, torch.zeros(2, 1))  # inf * 0 would be NaN
    assert zero_adv.abs().sum().item() == 0.0


def test_gspo_cispo_and_kl_cov_stay_finite_at_log_ratios_of_50():
    log_ratio = torch.tensor([[50.0, 50.0], [-50.0, -50.0]])
    logp, old = _logps(log_ratio, torch.full((2, 2), -1.0))
    adv, mask = torch.tensor([-1.0, 1.0]), torch.ones(2, 2)
    gspo, _, _ = gspo_loss(logp, old, adv, mask, 0.2, 0.2)  # s = e^+-50 -> e^+-20
    torch.testing.assert_close(gspo, torch.tensor([[math.exp(20.0)] * 2, [-math.exp(-20.0)] * 2]))
    cispo, low, high = cispo_loss(logp, old, adv, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(cispo, torch.tensor([[1.2 * 49.0] * 2, [0.8 * 51.0] * 2]))
    assert high[0].all() and low[1].all()
    kl_cov, penalised = kl_cov_loss(logp, old, adv, mask, frac=0.25, coef=0.1)
    exp_part = torch.tensor([[math.exp(20.0)] * 2, [-math.exp(-20.0)] * 2])
    torch.testing.assert_close(kl_cov, exp_part + 0.1 * 50.0 * penalised)  # the penalty keeps the raw |log r|
    for loss in (gspo, cispo, kl_cov):
        assert torch.isfinite(_grad(loss.sum(), logp)).all()


# ---------------------------------------------------------------- the knobs in the config


def _algorithm(*overrides: str):
    return load_config(None, list(overrides)).algorithm


def test_cispo_without_clips_takes_no_lower_bound_and_a_weight_cap_of_5():
    algo = _algorithm("algorithm.policy_loss=cispo")
    assert (algo.clip_low, algo.clip_high) == (None, 4.0)
    assert (_algorithm().clip_low, _algorithm().clip_high) == (0.2, 0.2)  # PPO keeps 0.2 / 0.2
    # verl's example (clip_ratio_low 10, high 0.2) and an explicit bound of 0 are accepted for cispo only
    assert _algorithm("algorithm.policy_loss=cispo", "algorithm.clip_low=10").clip_low == 10
    assert _algorithm("algorithm.policy_loss=cispo", "algorithm.clip_low=1.0").clip_low == 1.0
    assert _algorithm("algorithm.policy_loss=cispo", "algorithm.clip_low=null").clip_low is None
    with pytest.raises(ConfigError, match="only cispo takes no lower bound"):
        _algorithm("algorithm.clip_low=1.0")
    with pytest.raises(ConfigError, match="clip_low and clip_high must be >= 0"):
        _algorithm("algorithm.policy_loss=cispo", "algorithm.clip_high=-1")


def test_cispo_with_a_lower_bound_of_1_or_more_bounds_nothing():
    logp, old = _logps(torch.log(CISPO_RATIO), CISPO_LOGP - torch.log(CISPO_RATIO))
    none, low_none, _ = cispo_loss(logp, old, CISPO_ADV, clip_low=None, clip_high=0.2)
    for clip_low in (1.0, 10.0):
        loss, low, _ = cispo_loss(logp, old, CISPO_ADV, clip_low=clip_low, clip_high=0.2)
        torch.testing.assert_close(loss, none)
        assert not low.any() and not low_none.any()


def test_kl_cov_coefficient_is_a_setting_defaulting_to_verls_recipe_value():
    assert _algorithm().kl_cov_coef == 1.0
    assert _algorithm("algorithm.policy_loss=kl_cov", "algorithm.kl_cov_coef=0.1").kl_cov_coef == 0.1
    with pytest.raises(ConfigError, match="kl_cov_coef must be >= 0"):
        _algorithm("algorithm.kl_cov_coef=-1")


def test_kl_cov_coefficient_reaches_the_loss():
    logp, old = _logps(torch.tensor([[LN(2), 0.0, 0.0]]), torch.tensor([[-0.5 - LN(2), -1.0, -1.5]]))
    mb = MicroBatch(logp, old, old, torch.tensor([1.0]), torch.ones(1, 3), torch.zeros(1, 3))
    norm = {"max_len": 3, "num_seqs": 1, "num_tokens": 3}
    losses = [
        micro_batch_loss(mb, _algorithm("algorithm.policy_loss=kl_cov", f"algorithm.kl_cov_coef={c}"), norm)
        for c in (1.0, 0.1)
    ]
    # token_mean of -r A (+ coef |log r| on the one penalised token, log r = ln 2): the coefficient's share
    diff = (losses[0].loss - losses[1].loss).item()
    assert diff == pytest.approx(0.9 * LN(2) / 3, rel=1e-5)


def test_gspo_with_a_length_weighted_aggregation_warns_at_start():
    with pytest.warns(UserWarning, match="weights each sequence by its length"):
        _algorithm("algorithm.ratio_level=sequence", "algorithm.loss_agg=token_mean")
    with pytest.warns(UserWarning, match="not by the paper's 1/G"):
        _algorithm("algorithm.ratio_level=sequence_token", "algorithm.loss_agg=seq_mean_token_sum_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _algorithm("algorithm.ratio_level=sequence", "algorithm.loss_agg=seq_mean_token_mean")
        _algorithm("algorithm.loss_agg=token_mean")  # the token ratio: token_mean is DAPO's choice


def test_the_step_batch_whitens_reinforce_pp_advantages_by_each_samples_model_tokens():
    groups = [
        [Trajectory(0, [1], [5] * n, [0.0] * n, reward=r) for n, r in zip(ns, rs, strict=True)]
        for ns, rs in (((1, 2, 3), (1.0, 0.0, 0.0)), ((4, 5, 6), (1.0, 1.0, 0.0)))
    ]
    batch = StepBatch(groups, Round(groups, None), 1, 0, 0.0, 0.0)
    algo = _algorithm("algorithm.scale=batch_centered")
    got = rank_advantages(batch, algo, Distributed(torch.device("cpu")))
    lengths = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.float32)
    want = group_advantages(REWARDS.float(), "mean", "batch_centered", lengths=lengths)
    torch.testing.assert_close(got, want)
