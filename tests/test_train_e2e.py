"""End to end: GRPO on a tiny random Qwen2 (built and tokenized locally) learns a learnable reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from rl.config import load_config
from rl.train import train


def test_mean_reward_rises_on_a_learnable_reward(tmp_path, toy_data, tiny_model_dir):
    data = toy_data
    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.source={data}",
            "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
            "train.steps=12",
            "train.prompts_per_step=4",
            "train.micro_batch_size=16",
            "rollout.group_size=8",
            "rollout.max_new_tokens=8",
            "optim.lr=1e-2",
            f"run.dir={tmp_path / 'runs'}",
            "run.name=e2e",
            "track.console=quiet",
            "eval.size=0",
        ],
    )
    run_dir = train(config)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("reward/mean", "reward/std", "rollout/len_mean", "loss/policy", "perf/step_s"):
        assert all(key in r for r in rows), key
    first = sum(r["reward/mean"] for r in rows[:3]) / 3
    last = sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert last > first + 0.15, (first, last)

    documented = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for key in {k for r in rows for k in r} - {"step"}:
        generic = key
        if key.startswith("reward/tests.toy_rewards"):
            generic = "reward/<name>/" + key.split("/")[-1]
        elif key.startswith("perf/reward/"):
            generic = "perf/reward/<name>_s"
        assert f"`{generic}`" in documented, f"{key} is logged but not documented in docs/metrics.md"

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 12 and resolved["rewards"][0]["name"] == "tests.toy_rewards:letter_a"
    AutoModelForCausalLM.from_pretrained(run_dir / "model")  # loads directly with transformers


def test_kl_and_multiple_updates_per_batch_run_and_log_their_metrics(tmp_path, toy_data, tiny_model_dir):
    data = toy_data
    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.source={data}",
            "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
            "train.steps=2",
            "train.prompts_per_step=4",
            "train.micro_batch_size=5",
            "rollout.group_size=4",
            "rollout.max_new_tokens=6",
            "algorithm.kl_coef=0.05",
            "algorithm.epochs=2",
            "algorithm.minibatches=2",
            "algorithm.loss_agg=seq_mean_token_sum_norm",
            "algorithm.scale=none",
            "optim.lr=1e-3",
            "optim.schedule=cosine",
            "optim.warmup_steps=2",
            f"run.dir={tmp_path / 'runs'}",
            "run.save_model=false",
            "track.console=quiet",
            "eval.size=0",
            "track.dashboard=false",
        ],
    )
    run_dir = train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["optim/updates"] == 4 for r in rows)  # 2 epochs x 2 mini-batches
    assert all(r["loss/kl"] >= 0 for r in rows)
    # after the first optimizer step the policy moved, so the importance ratio is no longer exactly 1
    assert any(abs(r["policy/ratio_mean"] - 1) > 1e-6 or r["policy/ratio_max"] > 1 for r in rows)
    assert not (run_dir / "model").exists()


def _dapo_run(tmp_path, data, tiny_model_dir, name, extra):
    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.source={data}",
            "rewards=[{name: 'tests.toy_rewards:has_a'}]",
            "train.steps=2",
            "train.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            f"run.dir={tmp_path / 'runs'}",
            f"run.name={name}",
            "run.save_model=false",
            "track.console=quiet",
            "track.dashboard=false",
            "eval.size=0",
            *extra,
        ],
    )
    run_dir = train(config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dynamic_sampling_drops_uninformative_groups_and_samples_more(tmp_path, toy_data, tiny_model_dir):
    rows = _dapo_run(
        tmp_path,
        toy_data,
        tiny_model_dir,
        "dyn",
        ["algorithm.dynamic_sampling=true", "algorithm.dynamic_max_rounds=4"],
    )
    assert any(r["rollout/dropped_groups"] > 0 for r in rows)  # a random model often writes no 'a' at all
    assert all(r["rollout/sampling_rounds"] > 1 for r in rows if r["rollout/dropped_groups"] > 0)
    assert all(r["rollout/trained_groups"] <= 4 for r in rows)


def test_overlong_filter_keeps_truncated_completions_out_of_the_loss(tmp_path, toy_data, tiny_model_dir):
    rows = _dapo_run(tmp_path, toy_data, tiny_model_dir, "filter", ["algorithm.overlong_filter=true"])
    for r in rows:  # the random model almost never samples EOS within 4 tokens
        expected_tokens = r["rollout/len_mean"] * 16 * (1 - r["rollout/truncated_frac"])
        assert r["perf/update_tokens"] <= expected_tokens + 1e-6


def test_soft_overlong_punishment_lowers_the_reward_of_truncated_completions(
    tmp_path, toy_data, tiny_model_dir
):
    plain = _dapo_run(tmp_path, toy_data, tiny_model_dir, "plain", [])
    shaped = _dapo_run(tmp_path, toy_data, tiny_model_dir, "shaped", ["algorithm.overlong_buffer=1"])
    # same seeds, same first-step samples; with a 1-token buffer only truncated completions lose (all of) 1
    first_plain, first_shaped = plain[0], shaped[0]
    assert first_shaped["reward/mean"] == pytest.approx(
        first_plain["reward/mean"] - first_plain["rollout/truncated_frac"], abs=1e-6
    )


def test_nonfinite_steps_log_nan_and_stop_the_run_after_max_skipped_steps(tmp_path):
    from rl.errors import AhaError

    config = load_config(
        None,
        [
            "model.path=aha-tiny",  # the shipped model, on its own task (the defaults)
            "train.steps=10",
            "train.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=16",
            "optim.lr=1e4",  # the first update blows the weights up; every later loss is NaN/inf
            "train.max_skipped_steps=2",
            f"run.dir={tmp_path / 'runs'}",
            "track.console=quiet",
            "eval.size=0",
        ],
    )
    with pytest.raises(AhaError, match="NaN/inf in 2 steps in a row"):
        train(config)
    rows = [
        json.loads(line) for line in (tmp_path / "runs" / "aha" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["optim/skipped_updates"] for r in rows] == [0.0, 1.0, 1.0]
    for r in rows[1:]:
        assert math.isnan(r["loss/policy"]) and math.isnan(r["optim/grad_norm"]), r
        assert r["alarm/nonfinite_loss"] == 1.0
    assert math.isfinite(rows[0]["loss/policy"])


def test_a_reward_that_scores_nothing_is_reported_at_the_first_step(
    tmp_path, toy_data, tiny_model_dir, capsys
):
    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.source={toy_data}",
            "rewards=[{name: 'tests.toy_rewards:no_score'}]",
            "train.steps=1",
            "train.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            f"run.dir={tmp_path / 'runs'}",
            "track.console=quiet",
            "eval.size=0",
        ],
    )
    train(config)
    out = capsys.readouterr().out
    assert "reward tests.toy_rewards:no_score returned None for every completion of step 1" in out
