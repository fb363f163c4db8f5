"""The GRPO math against hand-computed literals (2 groups x 3 samples) and against plain-Python loops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rl.grpo import aggregate_loss, group_advantages, kl_penalty, policy_loss
from rl.logprobs import entropy_from_logits

REWARDS = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # 2 groups x 3 samples
S = 1 / math.sqrt(3)  # unbiased std of {1, 0, 0} and of {1, 1, 0}


@pytest.mark.parametrize(
    ("baseline", "scale", "expected"),
    [
        ("mean", "group", [[2 * S, -S, -S], [S, S, -2 * S]]),
        ("mean", "none", [[2 / 3, -1 / 3, -1 / 3], [1 / 3, 1 / 3, -2 / 3]]),
        # batch std of [1,0,0,1,1,0] = sqrt(0.3)
        (
            "mean",
            "batch",
            [
                [x / math.sqrt(0.3) for x in (2 / 3, -1 / 3, -1 / 3)],
                [x / math.sqrt(0.3) for x in (1 / 3, 1 / 3, -2 / 3)],
            ],
        ),
        ("loo", "none", [[1.0, -0.5, -0.5], [0.5, 0.5, -1.0]]),
    ],
)
def test_advantages_match_hand_computed_values(baseline, scale, expected):
    got = group_advantages(REWARDS, baseline=baseline, scale=scale)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


def test_equal_rewards_in_a_group_give_zero_advantage():
    got = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.all(got == 0)


def test_group_scaling_rejects_groups_of_one():
    with pytest.raises(ValueError, match="group size"):
        group_advantages(torch.tensor([[1.0], [0.0]]), scale="group")


def _loop_advantages(rewards: list[list[float]], baseline: str, scale: str) -> list[list[float]]:
    flat = [r for g in rewards for r in g]
    batch_mean = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in flat) / (len(flat) - 1))
    out = []
    for group in rewards:
        n = len(group)
        mean = sum(group) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        row = []
        for r in group:
            b = mean if baseline == "mean" else (sum(group) - r) / (n - 1)
            s = {"group": std + 1e-6, "batch": batch_std + 1e-6, "none": 1.0}[scale]
            row.append((r - b) / s)
        out.append(row)
    return out


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_vectorized_advantages_match_loop_reference(baseline, scale):
    rng = random.Random(0)
    rewards = [[rng.choice([0.0, 0.5, 1.0]) + rng.random() for _ in range(5)] for _ in range(4)]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), baseline, scale)
    torch.testing.assert_close(
        got, torch.tensor(_loop_advantages(rewards, baseline, scale), dtype=torch.float64)
    )


NAN = float("nan")


@pytest.mark.parametrize(
    "baseline, scale, expected",
    [
        # scored pair [1, 0]: mean 0.5, unbiased std 0.7071 -> +-0.7071 (filling the unscored with the group
        # mean and keeping them in the std gave +-1.22)
        ("mean", "group", [[0.70711, -0.70711, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        ("mean", "none", [[0.5, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        ("loo", "none", [[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        # batch std over the scored rewards [1, 0, 1]: 0.57735 -> (1 - 0.5) / 0.57735 = 0.86603
        ("mean", "batch", [[0.86603, -0.86603, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
    ],
)
def test_unscored_samples_take_no_part_in_the_group_statistics(baseline, scale, expected):
    rewards = torch.tensor([[1.0, 0.0, NAN, NAN], [NAN, 1.0, NAN, NAN]])  # the 2nd group: one scored sample
    got = group_advantages(rewards, baseline, scale, scored=~rewards.isnan())
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


def _loop_masked_advantages(rewards, scored, baseline: str, scale: str) -> list[list[float]]:
    """The plain reading of 'unscored samples take no part': every statistic over the scored samples only."""
    flat = [r for g, m in zip(rewards, scored, strict=True) for r, s in zip(g, m, strict=True) if s]
    batch_mean = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in flat) / (len(flat) - 1))
    out = []
    for group, mask in zip(rewards, scored, strict=True):
        kept = [r for r, s in zip(group, mask, strict=True) if s]
        n = len(kept)
        if n < 2:
            out.append([0.0] * len(group))
            continue
        mean = sum(kept) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in kept) / (n - 1))
        row = []
        for r, s in zip(group, mask, strict=True):
            b = mean if baseline == "mean" else (sum(kept) - r) / (n - 1)
            div = {"group": std + 1e-6, "batch": batch_std + 1e-6, "none": 1.0}[scale]
            row.append((r - b) / div if s else 0.0)
        out.append(row)
    return out


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_masked_advantages_match_loop_reference(baseline, scale):
    rng = random.Random(1)
    rewards = [[rng.random() for _ in range(6)] for _ in range(5)]
    scored = [[rng.random() < 0.6 for _ in range(6)] for _ in range(5)]
    scored[0], scored[1] = [True] * 6, [False, True, False, False, False, False]  # all scored; one scored
    got = group_advantages(
        torch.tensor(rewards, dtype=torch.float64), baseline, scale, scored=torch.tensor(scored)
    )
    want = _loop_masked_advantages(rewards, scored, baseline, scale)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def _ratios_to_logprobs(ratios):
    ratios = torch.tensor(ratios)
    return torch.log(ratios), torch.zeros_like(ratios)


def test_policy_loss_clips_at_hand_computed_values():
    logp, old = _ratios_to_logprobs([[1.5, 0.9], [0.5, 1.1]])
    loss, low, high = policy_loss(logp, old, torch.tensor([1.0, -1.0]), clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.9], [0.8, 1.1]]))
    assert high.tolist() == [[True, False], [False, False]]
    assert low.tolist() == [[False, False], [True, False]]


def test_clip_higher_raises_only_the_upper_bound():
    logp, old = _ratios_to_logprobs([[1.5, 0.5]])
    loss, _, _ = policy_loss(logp, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.28)
    # upper bound 1.28 for the growing token; the shrinking token is not clipped for A > 0 (min picks 0.5)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.5]]))


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    logp, old = _ratios_to_logprobs([[5.0, 5.0]])
    plain, _, _ = policy_loss(logp, old, torch.tensor([[-1.0, 1.0]]))
    dual, _, _ = policy_loss(logp, old, torch.tensor([[-1.0, 1.0]]), dual_clip=3.0)
    torch.testing.assert_close(plain, torch.tensor([[5.0, -1.2]]))
    torch.testing.assert_close(dual, torch.tensor([[3.0, -1.2]]))


def test_policy_loss_matches_loop_reference():
    torch.manual_seed(0)
    logp, old = torch.randn(4, 6) * 0.3, torch.randn(4, 6) * 0.3
    adv = torch.randn(4)
    loss, _, _ = policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    for i in range(4):
        for t in range(6):
            r, a = math.exp(logp[i, t] - old[i, t]), float(adv[i])
            ref = -min(r * a, min(max(r, 0.8), 1.28) * a)
            if a < 0:
                ref = min(ref, -3.0 * a)
            assert loss[i, t].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_kl_estimators_match_hand_computed_values():
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[math.log(0.5)]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2), rel=1e-6)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2, rel=1e-6)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2), rel=1e-6)
    same = torch.tensor([[-1.3]])
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(same, same, est).item() == 0.0


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("token_mean", 10 / 4), ("seq_mean_token_mean", (2 + 4) / 2), ("seq_mean_token_sum_norm", 10 / (4 * 2))],
)
def test_loss_aggregation_matches_hand_computed_values(mode, expected):
    assert aggregate_loss(PER_TOKEN, MASK, mode, max_len=4).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_with_global_counts_sum_to_the_full_batch_loss(mode):
    torch.manual_seed(1)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).int()
    mask[:, 0] = 1
    full = aggregate_loss(loss, mask, mode, max_len=5)
    counts = {"num_seqs": 6, "num_tokens": int(mask.sum())}
    parts = sum(
        aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, max_len=5, **counts) for i in (0, 2, 4)
    )
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_entropy_of_uniform_and_peaked_distributions():
    assert entropy_from_logits(torch.zeros(1, 8)).item() == pytest.approx(math.log(8), rel=1e-6)
    assert entropy_from_logits(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_overlong_penalty_matches_hand_computed_values():
    from rl.grpo import overlong_penalty

    got = overlong_penalty(torch.tensor([6, 8, 10, 3]), max_len=10, buffer=4, factor=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, -0.5, -1.0, 0.0]))
    torch.testing.assert_close(overlong_penalty(torch.tensor([9]), 10, 4, factor=0.5), torch.tensor([-0.375]))


def test_informative_groups_are_those_with_unequal_rewards():
    from rl.grpo import informative_groups

    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.2, 0.2]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]
    valid = torch.tensor([[True] * 3, [True, False, True], [True] * 3, [True] * 3])
    assert informative_groups(rewards, valid).tolist() == [False, False, False, True]
