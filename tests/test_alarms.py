"""The alarms for runs that look healthy by reward while they degenerate (repetition loops, reward hacking,
entropy collapse, ratio blow-ups): metric rows built to trip each one and rows that must not, then end to end,
a run on a reward that can be gamed raises the hacking alarm and the default run raises none."""

from __future__ import annotations

import json
import math

import pytest

from rl.cli import resolve_recipe
from rl.config import load_config
from rl.errors import ConfigError
from rl.tracking import Alarms, rise
from rl.train import train


def _row(step: int = 1, **values: float) -> dict[str, float]:
    """A healthy step: nothing truncated or looping, entropy 0.5, ratio 1."""
    row = {
        "step": step,
        "reward/mean": 0.5,
        "reward/std": 0.5,
        "rollout/truncated_frac": 0.0,
        "rollout/repetition_frac": 0.0,
        "policy/entropy": 0.5,
        "policy/ratio_max": 1.0,
    }
    row.update({key.replace("__", "/"): value for key, value in values.items()})
    return row


def _alarms(**thresholds) -> Alarms:
    return Alarms(max_new_tokens=64, **thresholds)


def _fired(alarms: Alarms, rows: list[dict]) -> list[list[str]]:
    return [alarms.check(row) for row in rows]


def test_rise_is_the_least_squares_trend_over_the_window():
    assert rise([0.0, 1.0, 2.0]) == pytest.approx(2.0)
    assert rise([1.0, 0.0, 1.0]) == pytest.approx(0.0)
    assert rise([0.2, 0.1, 0.3, 0.6]) == pytest.approx(0.42)  # covariance 0.7 / 5 * 3


# ---------------------------------------------------------------------------------------------- repetition


def test_repetition_alarm_fires_past_its_threshold_once_and_marks_every_step():
    alarms = _alarms(repetition_frac=0.3)
    looping = [_row(step, rollout__repetition_frac=0.5) for step in (1, 2)]
    first, second = _fired(alarms, looping)
    (message,) = first
    assert "50% of the completions repeat the same span" in message and "aha samples" in message
    assert second == [] and all(r["alarm/repetition"] == 1.0 for r in looping)  # said once, marked twice
    assert alarms.check(_row(3, rollout__repetition_frac=0.3)) == []  # at the threshold: not past it
    assert len(alarms.check(_row(4, rollout__repetition_frac=0.9))) == 1  # again after a step without it


def test_repetition_alarm_can_be_switched_off():
    row = _row(rollout__repetition_frac=1.0)
    assert _alarms(repetition_frac=None).check(row) == [] and "alarm/repetition" not in row


# ------------------------------------------------------------------------------------------ reward hacking


def _hacking_rows(shaping: list[float], accuracy: list[float]) -> list[dict]:
    return [
        _row(step, reward__format__mean=s, reward__math__mean=a, reward__accuracy=a)
        for step, (s, a) in enumerate(zip(shaping, accuracy, strict=True), start=1)
    ]


def test_hacking_alarm_fires_when_a_shaping_reward_rises_while_accuracy_stays_flat():
    rows = _hacking_rows([0.1, 0.2, 0.3, 0.4], [0.30, 0.31, 0.29, 0.30])
    fired = _fired(_alarms(hacking_window=4, hacking_rise=0.1, flat_gain=0.02), rows)
    assert fired[:3] == [[], [], []]  # the window is not full yet
    (message,) = fired[3]
    assert "reward format by +0.30" in message and "reward/accuracy moved by" in message
    assert "--best" in message and rows[3]["alarm/reward_hacking"] == 1.0


def test_hacking_alarm_fires_when_accuracy_falls():
    rows = _hacking_rows([0.1, 0.15, 0.2, 0.25], [0.5, 0.4, 0.3, 0.2])
    assert _fired(_alarms(hacking_window=4, hacking_rise=0.1), rows)[3]


@pytest.mark.parametrize(
    "shaping, accuracy",
    [
        ([0.1, 0.2, 0.3, 0.4], [0.30, 0.35, 0.40, 0.45]),  # both rise: learning, not hacking
        ([0.40, 0.42, 0.41, 0.43], [0.3, 0.3, 0.3, 0.3]),  # shaping flat
        ([0.1, 0.6, 0.1, 0.6], [0.3, 0.3, 0.3, 0.3]),  # one noisy jump is no trend: rise 0.3, not >= 0.4
    ],
)
def test_hacking_alarm_stays_quiet_when_accuracy_keeps_up_or_nothing_rises(shaping, accuracy):
    rows = _hacking_rows(shaping, accuracy)
    assert _fired(_alarms(hacking_window=4, hacking_rise=0.4 if shaping[1] == 0.6 else 0.1), rows)[3] == []
    assert not any("alarm/reward_hacking" in r for r in rows)


def test_hacking_alarm_reads_the_named_correctness_reward_and_needs_one():
    rows = [_row(s, reward__length__mean=0.1 * s, reward__passes__mean=0.2) for s in range(1, 5)]
    assert _fired(_alarms(hacking_window=4), [dict(r) for r in rows])[3] == []  # no correctness signal
    fired = _fired(_alarms(hacking_window=4, correctness_reward="passes"), rows)
    assert "reward length by +0.30" in fired[3][0] and "reward/passes/mean moved by +0.000" in fired[3][0]


def test_hacking_alarm_waits_for_a_window_without_nan():
    rows = _hacking_rows([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.3, math.nan, 0.3, 0.3, 0.3, 0.3])
    fired = _fired(_alarms(hacking_window=4), rows)
    assert fired[3] == fired[4] == [] and fired[5]  # steps 3-6 are the first window without the NaN


# ---------------------------------------------------------------------------------------- entropy collapse


def test_entropy_collapse_fires_after_n_low_steps_while_accuracy_is_flat():
    rows = [_row(s, policy__entropy=0.005, reward__accuracy=0.6) for s in range(1, 4)]
    fired = _fired(_alarms(entropy_floor=0.01, entropy_steps=3), rows)
    assert fired[:2] == [[], []]
    (message,) = fired[2]
    assert "policy/entropy has been below 0.01 for 3 steps" in message and "reward/accuracy" in message
    assert "clip_high" in message and rows[2]["alarm/entropy_collapse"] == 1.0


def test_entropy_collapse_stays_quiet_while_accuracy_improves_or_entropy_recovers():
    improving = [_row(s, policy__entropy=0.005, reward__accuracy=0.5 + 0.1 * s) for s in range(1, 4)]
    assert _fired(_alarms(entropy_floor=0.01, entropy_steps=3), improving)[2] == []
    interrupted = [
        _row(s, policy__entropy=e, reward__accuracy=0.6) for s, e in enumerate((0.005, 0.5, 0.005))
    ]
    assert _fired(_alarms(entropy_floor=0.01, entropy_steps=3), interrupted) == [[], [], []]
    nan_entropy = [_row(s, policy__entropy=math.nan, reward__accuracy=0.6) for s in range(1, 4)]
    assert _fired(_alarms(entropy_floor=0.01, entropy_steps=3), nan_entropy)[2] == []  # no update measured


def test_entropy_collapse_falls_back_on_the_mean_reward_without_a_correctness_signal():
    rows = [_row(s, policy__entropy=0.001) for s in range(1, 4)]
    (message,) = _fired(_alarms(entropy_floor=0.01, entropy_steps=3), rows)[2]
    assert "reward/mean moved by +0.000" in message


# ------------------------------------------------------------------------------------------ ratio blow-up


def test_ratio_blowup_fires_on_a_huge_ratio_or_a_large_masked_fraction():
    row = _row(policy__ratio_max=50.0)
    (message,) = _alarms(ratio_max=20.0).check(row)
    assert "policy/ratio_max reached 50" in message and "max_staleness" in message
    assert row["alarm/ratio_blowup"] == 1.0
    row = _row(rollout__mismatch_masked_frac=0.2)
    (message,) = _alarms(mismatch_frac=0.05).check(row)
    assert "dropped 20.0% of the completion tokens" in message and "algorithm.mismatch" in message


def test_ratio_blowup_stays_quiet_on_policy_and_below_its_thresholds():
    for row in (_row(), _row(policy__ratio_max=19.0, rollout__mismatch_masked_frac=0.01)):
        assert _alarms().check(row) == [] and not any(k.startswith("alarm/") for k in row)
    assert _alarms().check(_row(policy__ratio_max=math.nan)) == []  # every update skipped: no ratio


# ------------------------------------------------------------------------------------- config and resume


def test_track_settings_reach_the_alarms_and_bad_ones_are_config_errors():
    track = load_config(
        None, ["track.repetition_alarm=0.5", "track.entropy_floor=null", "track.correctness_reward=passes"]
    ).track
    alarms = Alarms.from_track(track, 96)
    assert (alarms.repetition_frac, alarms.entropy_floor, alarms.correctness_reward) == (0.5, None, "passes")
    assert (alarms.hacking_window, alarms.ratio_max, alarms.mismatch_frac) == (10, 20.0, 0.05)
    for bad, match in (
        ("track.repetition_alarm=2", "repetition_alarm is a fraction"),
        ("track.hacking_window=1", "hacking_window must be 0"),
        ("track.ratio_alarm=0.5", "ratio_alarm > 1"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])


def test_alarm_state_survives_a_resume():
    rows = _hacking_rows([0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.3, 0.3])
    alarms = _alarms(hacking_window=4)
    _fired(alarms, rows[:3])
    resumed = _alarms(hacking_window=4)
    resumed.load_state_dict(json.loads(json.dumps(alarms.state_dict())))  # a checkpoint's state, JSON-ready
    assert resumed.check(rows[3]) and alarms.check(dict(rows[3]))
    old = {"zero_run": 0, "collapse_run": 0, "unscored": [], "failed": []}  # a checkpoint from before
    _alarms().load_state_dict(old)


# ---------------------------------------------------------------------------------------------- end to end


def never_right(prompts: list, completions: list[str], **columns) -> list[float]:
    """A correctness reward a tiny random model never earns: accuracy stays flat at 0."""
    return [float("The answer is 42" in c) for c in completions]


def test_a_run_on_a_reward_that_can_be_gamed_raises_the_hacking_alarm(
    tmp_path, toy_data, tiny_model_dir, capsys
):
    # letter_a, a dense bonus the model climbs in a few steps, outweighs a correctness it never earns
    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            f"data.source={toy_data}",
            "rewards=[{name: 'tests.test_alarms:never_right', weight: 1.0},"
            " {name: 'tests.toy_rewards:letter_a', weight: 2.0}]",
            "track.correctness_reward=tests.test_alarms:never_right",
            "track.hacking_window=6",
            "track.hacking_rise=0.05",
            "train.steps=16",
            "train.prompts_per_step=4",
            "train.micro_batch_size=16",
            "rollout.group_size=8",
            "rollout.max_new_tokens=8",
            "optim.lr=1e-2",
            f"run.dir={tmp_path / 'runs'}",
            "track.console=quiet",
            "track.dashboard=false",
            "track.tensorboard=false",
            "run.save_model=false",
            "eval.size=0",
        ],
    )
    rows = [json.loads(line) for line in (train(config) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert all(r["reward/tests.test_alarms:never_right/mean"] == 0 for r in rows)
    hacked = [r["step"] for r in rows if "alarm/reward_hacking" in r]
    assert hacked and hacked[0] >= 6, hacked
    printed = capsys.readouterr().out
    assert "reward tests.toy_rewards:letter_a by +" in printed and "reward hacking" in printed


def test_the_default_run_raises_no_alarm(tmp_path):
    overrides = ["train.steps=3", "eval.size=0", "track.console=quiet", "track.tensorboard=false"]
    overrides += ["track.dashboard=false", "run.save_model=false", f"run.dir={tmp_path}"]
    run_dir = train(load_config(resolve_recipe("default"), overrides))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("rollout/repetition_frac" in r for r in rows)
    assert not [key for r in rows for key in r if key.startswith("alarm/")]
