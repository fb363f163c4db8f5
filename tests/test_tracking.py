"""Run tracking: metric values on a hand-made batch, alarms that fire, the dashboard and the samples views."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rl.metrics import (
    UpdateAccumulator,
    length_metrics,
    reflection_frac,
    repeated_ngram_share,
    repetition_frac,
    reward_metrics,
    rollout_metrics,
)
from rl.report import plot_runs, select_samples, write_samples_html
from rl.tracking import Alarms, Loggers, sample_records
from rl.trajectory import Trajectory


@dataclass
class FakeScores:
    correct: list[bool | None] | None
    metrics: dict


def test_length_metrics_on_a_hand_made_batch():
    got = length_metrics([2, 4, 6, 8], [False, False, False, True], [True, False, True, None])
    assert got == pytest.approx(
        {
            "rollout/len_mean": 5.0,
            "rollout/len_median": 5.0,
            "rollout/len_p90": 7.4,  # linear interpolation between 6 and 8
            "rollout/len_max": 8.0,
            "rollout/truncated_frac": 0.25,
            "rollout/len_correct": 4.0,  # (2 + 6) / 2
            "rollout/len_incorrect": 4.0,
        }
    )


def test_reflection_rate_counts_whole_words_case_insensitively():
    texts = ["Wait, 3+4=7", "so 7", "let me check: 7", "awaiting nothing", "VERIFY it"]
    assert reflection_frac(texts) == pytest.approx(3 / 5)  # "awaiting" is not "wait"
    assert reflection_frac(texts, ["nothing"]) == pytest.approx(1 / 5)


def test_rollout_metrics_include_reflection_and_throughput():
    trajectories = [
        Trajectory(0, [9], [1, 2], [0.0] * 2, text="wait", finish_reason="stop", correct=True),
        Trajectory(0, [9], [1, 2, 3, 4], [0.0] * 4, text="no", finish_reason="length", correct=False),
    ]
    got = rollout_metrics(trajectories, True, rollout_s=2.0, reflection_words=["wait"])
    assert got["rollout/reflection_frac"] == 0.5
    assert got["perf/rollout_tok_s"] == 3.0
    assert got["rollout/truncated_frac"] == 0.5
    assert got["rollout/len_correct"] == 2 and got["rollout/len_incorrect"] == 4


def test_repeated_ngram_share_is_welleck_seq_rep_n():
    assert repeated_ngram_share([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(0.6)  # 5 bigrams, 2 distinct
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_share([7, 7, 7]) == 0.0  # shorter than n: nothing to repeat


def test_repetition_frac_counts_completions_stuck_in_a_loop():
    loop = [5, 6, 7, 8] * 4  # 13 4-grams, 4 distinct: share 9/13
    prose = list(range(40))
    half = [1, 2, 3, 4, 9, 1, 2, 3, 4]  # 6 4-grams, 5 distinct: share 1/6
    assert repetition_frac([loop, prose, half, []]) == 0.25
    assert repetition_frac([]) == 0.0
    got = rollout_metrics(
        [Trajectory(0, [1], loop, [0.0] * 16), Trajectory(0, [1], prose, [0.0] * 40)], False, 1.0, []
    )
    assert got["rollout/repetition_frac"] == 0.5


def test_reward_metrics_zero_variance_groups_and_accuracy():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    got = reward_metrics(
        rewards, valid, FakeScores([True, True, True, True, False, False], {"reward/math/mean": 4 / 6})
    )
    assert got["reward/zero_std_frac"] == 0.5
    assert got["reward/accuracy"] == pytest.approx(4 / 6)
    assert got["reward/mean"] == pytest.approx(4 / 6)
    assert got["reward/math/mean"] == pytest.approx(4 / 6)


def test_update_accumulator_weights_statistics_by_tokens():
    acc = UpdateAccumulator()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ratio = torch.tensor([[1.0, 2.0, 9.0], [0.5, 9.0, 9.0]])
    low = torch.tensor([[False, False, False], [True, False, False]])
    high = torch.tensor([[False, True, True], [False, True, False]])
    acc.add(mask, torch.tensor(0.5), torch.ones(2, 3), low, high, ratio, None)
    acc.add_step(grad_norm=2.0, lr=1e-3)
    got = acc.metrics()
    assert got["policy/ratio_mean"] == pytest.approx(3.5 / 3)
    assert got["policy/ratio_max"] == 2.0  # padding (9.0) ignored
    assert got["policy/clip_frac_low"] == pytest.approx(1 / 3)
    assert got["policy/clip_frac_high"] == pytest.approx(1 / 3)
    assert got["loss/policy"] == 0.5 and got["optim/grad_norm"] == 2.0 and got["optim/lr"] == 1e-3


def test_update_accumulator_logs_nan_not_zero_when_every_update_was_skipped():
    acc = UpdateAccumulator()
    mask = torch.tensor([[1, 1]])
    acc.add(
        mask,
        torch.tensor(0.7),
        torch.ones(1, 2),
        mask.bool() & False,
        mask.bool() & False,
        torch.ones(1, 2),
        None,
    )
    acc.skip_step()  # a later micro-batch's loss was NaN: the optimizer step is skipped
    got = acc.metrics()
    assert got["optim/skipped_updates"] == 1.0 and got["optim/updates"] == 0.0
    for key in ("loss/policy", "optim/grad_norm", "optim/lr"):
        assert math.isnan(got[key]), key  # a fake 0.0 would plot as a real loss
    acc.add(
        mask,
        torch.tensor(0.25),
        torch.ones(1, 2),
        mask.bool() & False,
        mask.bool() & False,
        torch.ones(1, 2),
        None,
    )
    acc.add_step(grad_norm=1.0, lr=1e-3)
    assert acc.metrics()["loss/policy"] == 0.25  # the skipped step's partial loss is not carried over


def _row(**overrides):
    row = {"step": 1, "reward/mean": 0.5, "reward/std": 0.5, "rollout/truncated_frac": 0.0}
    row.update(overrides)
    return row


def test_zero_reward_alarm_fires_after_n_steps_in_a_row():
    alarms = Alarms(max_new_tokens=64, zero_reward_steps=3)
    fired = [alarms.check(_row(**{"reward/mean": 0.0, "reward/std": 0.0})) for _ in range(3)]
    assert fired[0] == [] and fired[1] == []
    assert "every reward has been 0 for 3 steps" in fired[2][0]
    assert alarms.check(_row()) == []  # a non-zero step resets the count


def test_truncation_alarm_says_the_limit_and_what_to_raise_it_to():
    row = _row(**{"rollout/truncated_frac": 1.0})
    (message,) = Alarms(max_new_tokens=64).check(row)
    assert "100% of the completions hit rollout.max_new_tokens=64" in message
    assert "rollout.max_new_tokens=128" in message
    assert row["alarm/truncation"] == 1.0


def test_reward_collapse_and_nonfinite_loss_alarms():
    alarms = Alarms(max_new_tokens=64, collapse_steps=2)
    assert alarms.check(_row(**{"reward/zero_std_frac": 1.0})) == []
    row = _row(**{"reward/zero_std_frac": 1.0, "optim/skipped_updates": 1.0})
    messages = alarms.check(row)
    assert any("identical rewards" in m for m in messages)
    assert any("NaN/inf" in m for m in messages)
    assert row["alarm/reward_collapse"] == 1.0 and row["alarm/nonfinite_loss"] == 1.0


def test_a_reward_that_scores_nothing_is_said_at_once_and_again_only_after_it_recovered():
    alarms = Alarms(max_new_tokens=64)
    unscored = {"reward/math/none_frac": 1.0, "reward/format/none_frac": 0.0, "reward/unscored_frac": 1.0}
    row = _row(**unscored)
    (message,) = alarms.check(row)
    assert "reward math returned None for every completion of step 1" in message
    assert "nothing trains" in message and row["alarm/unscored"] == 1.0
    again = _row(**unscored)
    assert alarms.check(again) == [] and again["alarm/unscored"] == 1.0  # still flagged, said once
    assert alarms.check(_row(**{"reward/math/none_frac": 0.5})) == []
    assert len(alarms.check(_row(**unscored))) == 1
    restored = Alarms(max_new_tokens=64)
    restored.load_state_dict(alarms.state_dict())  # a resumed run does not say it twice
    assert restored.check(_row(**unscored)) == []


def _fake_run(tmp_path, name="run", steps=6):
    run = tmp_path / name
    run.mkdir()
    with (run / "metrics.jsonl").open("w") as f:
        f.write(json.dumps({"step": 0, "eval/accuracy": 0.3, "eval/len_mean": 10}) + "\n")
        for s in range(1, steps + 1):
            f.write(
                json.dumps(
                    {
                        "step": s,
                        "reward/mean": s / steps,
                        "reward/accuracy": s / steps,
                        "rollout/len_mean": 10 + s,
                        "rollout/len_p90": 14 + s,
                        "rollout/truncated_frac": 0.1,
                        "rollout/reflection_frac": 0.02 * s,
                        "policy/entropy": 1.0 / s,
                    }
                )
                + "\n"
            )
    texts, rewards, verdicts = ["good <b>", "bad", "x", "y"], [1.0, 0.0, 0.0, 0.5], [True, False, False, None]
    groups = [
        [
            Trajectory(0, [9], [1] * (3 - 2 * i if g == 0 else 2), [], prompt=f"p{g + 1}", text=texts[2 * g + i],
                       reward=rewards[2 * g + i], correct=verdicts[2 * g + i])
            for i in range(2)
        ]
        for g in range(2)
    ]  # fmt: skip
    records = sample_records(3, groups, True, num_prompts=2, seed=0)
    (run / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return run


def test_plot_writes_a_png_dashboard_for_one_and_several_runs(tmp_path):
    one = plot_runs([_fake_run(tmp_path, "a")], tmp_path / "one.png")
    two = plot_runs([tmp_path / "a", _fake_run(tmp_path, "b", steps=4)], tmp_path / "two.png")
    for png in (one, two):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def _png_width(png: Path) -> int:
    return int.from_bytes(png.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_dashboard_adds_the_tool_panels_when_a_run_called_tools(tmp_path):
    plain = plot_runs([_fake_run(tmp_path, "plain")], tmp_path / "plain.png")
    run = _fake_run(tmp_path, "tools")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        row.update({"tools/call_frac": row["step"] / 10, "tools/accuracy_with_call": 0.9})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tools = plot_runs([run], tmp_path / "tools.png")
    assert _png_width(plain) == 1500 and _png_width(tools) == 2000  # 3 columns of panels, then 4


def test_aha_plot_and_samples_commands(tmp_path):
    run = _fake_run(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "rl.cli", "plot", str(run)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (run / "dashboard.png").is_file()
    result = subprocess.run(
        [sys.executable, "-m", "rl.cli", "samples", str(run), "--best"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.index("good <b>") < result.stdout.index("bad")
    result = subprocess.run(
        [sys.executable, "-m", "rl.cli", "samples", str(run), "--step", "99"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "no samples at step 99; steps with samples: 3" in result.stderr


def test_samples_selection_orders_by_reward_and_html_escapes(tmp_path):
    run = _fake_run(tmp_path)
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    step, worst = select_samples(records, None, "worst")
    assert step == 3 and [r["reward"] for r in worst] == [0.0, 0.0, 0.5, 1.0]
    page = write_samples_html(run).read_text()
    assert "good &lt;b&gt;" in page and "good <b>" not in page


def test_best_samples_show_each_distinct_completion_once_with_its_count(tmp_path):
    same = [Trajectory(0, [9], [1, 2], [], prompt="p", text="42", reward=1.0) for _ in range(5)]
    other = [Trajectory(0, [9], [1], [], prompt="p", text=t, reward=r) for t, r in (("41", 0.0), ("40", 0.5))]
    records = sample_records(3, [same + other], True, num_prompts=1, seed=0)
    _, best = select_samples(records, None, "best")
    assert [(r["completion"], r["copies"]) for r in best] == [("42", 5), ("40", 1), ("41", 1)]
    _, worst = select_samples(records, None, "worst")
    assert [r["completion"] for r in worst] == ["41", "40", "42"]
    _, unsorted = select_samples(records, None, None)
    assert len(unsorted) == 7  # the plain view keeps every sample of the group
    run = tmp_path / "run"
    run.mkdir()
    (run / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    result = subprocess.run(
        [sys.executable, "-m", "rl.cli", "samples", str(run), "--best"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("42") == 1 and "sampled 5 times" in result.stdout


def test_loggers_write_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    loggers = Loggers(tmp_path, {}, tensorboard=True, wandb=False, trackio=False, project="aha")
    loggers.log({"step": 1, "reward/mean": 0.5})
    loggers.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "reward/mean": 0.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_asking_for_a_missing_logger_is_a_clear_error(tmp_path, monkeypatch):
    from rl.errors import AhaError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(AhaError, match="track.wandb=true but wandb is not installed: pip install wandb"):
        Loggers(tmp_path, {}, tensorboard=False, wandb=True, trackio=False, project="aha")
