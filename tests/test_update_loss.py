"""The update's loss, `micro_batch_loss`, by hand, and every knob of the loss menu wired end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.errors import ConfigError
from rl.train import train
from rl.update import MicroBatch, micro_batch_loss

# 2 sequences x 3 tokens; the first has 2 completion tokens and one pad
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
NORM = {"max_len": 4, "num_seqs": 2, "num_tokens": 5}


def _micro_batch(log_ratio=((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)), rollout_shift=((0.0,) * 3, (0.0,) * 3)):
    old = torch.full((2, 3), -1.0)
    logprobs = (old + torch.tensor(log_ratio)).requires_grad_()
    return MicroBatch(
        logprobs=logprobs,
        old_logprobs=old,
        rollout_logprobs=old - torch.tensor(rollout_shift),  # trainer / engine ratio exp(shift)
        advantages=torch.tensor([1.0, -2.0]),
        mask=MASK,
        entropy=torch.tensor([[0.1, 2.0, 9.0], [1.0, 0.2, 0.5]]),
    )


def _algo(*overrides: str):
    return load_config(None, list(overrides)).algorithm


def test_the_default_loss_is_grpos_token_mean_of_minus_advantages_on_policy():
    # ratio 1: per-token loss -A; token_mean over the 5 completion tokens: (2 * -1 + 3 * 2) / 5 = 0.8
    parts = micro_batch_loss(_micro_batch(), _algo("algorithm.loss_agg=token_mean"), NORM)
    assert parts.loss.item() == pytest.approx(0.8) and parts.pg_loss.item() == pytest.approx(0.8)
    assert parts.counts == {} and parts.kl is None


def test_the_default_gradient_is_minus_the_advantage_over_the_token_count():
    mb = _micro_batch()
    micro_batch_loss(mb, _algo("algorithm.loss_agg=token_mean"), NORM).loss.backward()
    expected = torch.tensor([[-1 / 5, -1 / 5, 0.0], [2 / 5, 2 / 5, 2 / 5]])
    torch.testing.assert_close(mb.logprobs.grad, expected)


def test_entropy_top_frac_keeps_only_the_highest_entropy_tokens_in_the_loss():
    # entropies of the 5 completion tokens: 0.1, 2.0 | 1.0, 0.2, 0.5; top 40%: q = quantile(0.6) = 0.8 ->
    # 2.0 and 1.0 kept: loss (-1 + 2) / 5 = 0.2 (the normaliser still counts every token)
    parts = micro_batch_loss(
        _micro_batch(), _algo("algorithm.loss_agg=token_mean", "algorithm.entropy_top_frac=0.4"), NORM
    )
    assert parts.loss.item() == pytest.approx(0.2)
    assert parts.counts["policy/entropy_kept_frac"] == (2.0, 5.0)


def test_sequence_mask_drops_a_whole_sequence_whose_ratio_leaves_the_bounds():
    # the second sequence's token ratios multiply to e^(0.5 + 0.5 + 0.5) = 4.48 > 3: dropped; the first, 1: kept
    mb = _micro_batch(rollout_shift=((0.0,) * 3, (0.5,) * 3))
    algo = _algo(
        "algorithm.loss_agg=token_mean", "algorithm.mismatch=sequence_mask", "algorithm.mismatch_high=3"
    )
    parts = micro_batch_loss(mb, algo, NORM)
    assert parts.loss.item() == pytest.approx(-2 / 5)  # only the first sequence's -1 per token
    assert parts.counts["rollout/mismatch_masked_frac"] == (3.0, 5.0)


def test_tis_cap_is_mismatch_tis_and_weights_each_token():
    algo = _algo("algorithm.loss_agg=token_mean", "algorithm.tis_cap=2.0")
    assert (algo.mismatch, algo.mismatch_high) == ("tis", 2.0)
    # token ratios trainer/engine: first sequence e^1 = 2.72 capped at 2; second e^-1 = 0.37
    mb = _micro_batch(rollout_shift=((1.0,) * 3, (-1.0,) * 3))
    parts = micro_batch_loss(mb, algo, NORM)
    assert parts.loss.item() == pytest.approx((2 * -1 * 2.0 + 3 * 2 * math.exp(-1)) / 5, rel=1e-6)
    assert parts.counts["rollout/tis_capped_frac"] == (2.0, 5.0)


def test_gspo_records_the_sequence_ratio_range():
    mb = _micro_batch(log_ratio=((0.1, 0.3, 0.0), (0.0, 0.0, 0.3)))
    parts = micro_batch_loss(mb, _algo("algorithm.ratio_level=sequence"), NORM)
    low, high = parts.ranges["policy/seq_ratio"]
    assert (low, high) == pytest.approx((math.exp(0.1), math.exp(0.2)))


def test_cispo_clipped_tokens_keep_their_gradient():
    mb = _micro_batch(log_ratio=((1.0, 1.0, 0.0), (0.0, 0.0, 0.0)))  # the first sequence's ratio e > 1.2
    parts = micro_batch_loss(mb, _algo("algorithm.policy_loss=cispo", "algorithm.clip_high=0.2"), NORM)
    parts.loss.backward()
    assert bool(parts.clip_high[0, :2].all()) and bool((mb.logprobs.grad[0, :2] != 0).all())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["algorithm.tis_cap=2", "algorithm.mismatch=token_mask"], "short for mismatch=tis"),
        (["algorithm.mismatch=token_mask"], "needs mismatch_low and/or mismatch_high"),
        (["algorithm.mismatch_high=3"], "algorithm.mismatch is none"),
        (
            ["algorithm.ratio_level=sequence", "algorithm.policy_loss=cispo"],
            "cannot combine with policy_loss",
        ),
        (["algorithm.dual_clip=3", "algorithm.policy_loss=cispo"], "dual_clip bounds PPO"),
        (["algorithm.advantage=passk", "algorithm.passk_k=9"], "between 1 and rollout.group_size=8"),
        (["algorithm.entropy_top_frac=0"], "entropy_top_frac must be in"),
        (["algorithm.cov_frac=0.1"], "cov_frac is for policy_loss kl_cov or clip_cov"),
    ],
)
def test_combinations_that_cannot_work_are_config_errors_that_say_why(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


# ---------------------------------------------------------------------------------------------- end to end
KNOBS = {
    "gspo": [
        "algorithm.ratio_level=sequence",
        "algorithm.minibatches=2",
        "algorithm.clip_low=3e-4",
        "algorithm.clip_high=4e-4",
    ],
    "gspo_token": ["algorithm.ratio_level=sequence_token", "algorithm.minibatches=2"],
    "cispo": ["algorithm.policy_loss=cispo", "algorithm.clip_high=4.0"],
    "kl_cov": ["algorithm.policy_loss=kl_cov", "algorithm.cov_frac=0.1", "algorithm.epochs=2"],
    "clip_cov": ["algorithm.policy_loss=clip_cov", "algorithm.cov_frac=0.1"],
    "entropy": ["algorithm.entropy_top_frac=0.2"],
    "token_mask": [
        "algorithm.mismatch=token_mask",
        "algorithm.mismatch_low=0.5",
        "algorithm.mismatch_high=2",
    ],
    "sequence_mask": ["algorithm.mismatch=sequence_mask", "algorithm.mismatch_high=3"],
    "passk": [
        "algorithm.advantage=passk",
        "algorithm.passk_k=2",
        "rewards=[{name: 'tests.toy_rewards:has_a'}]",
    ],
    "reinforce_pp": ["algorithm.scale=batch_centered"],
}
LOGGED = {
    "gspo": ["policy/seq_ratio_min", "policy/seq_ratio_max"],
    "gspo_token": ["policy/seq_ratio_max"],
    "kl_cov": ["policy/cov_frac"],
    "clip_cov": ["policy/cov_frac"],
    "entropy": ["policy/entropy_kept_frac"],
    "token_mask": ["rollout/mismatch_masked_frac"],
    "sequence_mask": ["rollout/mismatch_masked_frac"],
}


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_each_loss_knob_trains_and_logs_what_it_does(tmp_path, toy_data, tiny_model_dir, knob):
    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.source={toy_data}",
            "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
            "train.steps=2",
            "train.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=6",
            "optim.lr=1e-2",
            f"run.dir={tmp_path / 'runs'}",
            "track.console=quiet",
            "track.dashboard=false",
            "run.save_model=false",
            "eval.size=0",
            *KNOBS[knob],
        ],
    )
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/policy"]) for r in rows)
    documented = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for key in LOGGED.get(knob, []):
        assert all(key in r for r in rows), key
        assert f"`{key}`" in documented or f"`{key.rsplit('_', 1)[0]}_min`" in documented, key
