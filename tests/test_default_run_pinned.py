"""The default run, pinned: a short deterministic `aha train` must log what it logged when the pin was taken.

Every new knob defaults to today's behaviour, and a refactor must not change what the default run computes.
This test runs the default recipe for a few steps (1 thread, deterministic algorithms) and compares its
metrics and samples with `tests/fixtures/default_run_pinned.json`:

- what is counted from the sampled tokens (rewards, lengths, accuracies, clip and group counts) and the
  sampled texts must be equal: a change in sampling, scoring or the update shows up here at once;
- what is a float32 reduction (loss, gradient norm, entropy, log-prob differences) must agree to float32
  rounding (another CPU sums in another order), far below what any change of the algorithm moves.

A deliberate change of the default run's behaviour re-takes the pin, and says so in its commit:
    AHA_PIN_UPDATE=1 pytest tests/test_default_run_pinned.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rl.cli import resolve_recipe
from rl.config import load_config
from rl.train import train

PIN = Path(__file__).parent / "fixtures" / "default_run_pinned.json"
OVERRIDES = [
    "train.steps=3",
    "eval.size=8",
    "eval.every=2",
    "track.samples_every=1",
    "train.threads=1",
    "train.deterministic=true",
    "track.console=quiet",
    "track.tensorboard=false",
    "track.dashboard=false",
    "run.save_model=false",
]
# Float32 reductions: equal up to rounding, not bit for bit, across machines. Everything else is exact.
ROUNDED = (
    "loss/",
    "policy/entropy",
    "policy/ratio_",
    "optim/grad_norm",
    "rollout/logprob_diff",
    "rollout/is_ratio",
)
ROUNDING = {"rel": 1e-4, "abs": 1e-4}  # float32 sums of ~3k terms of magnitude <= 10 in another order


def _default_run(tmp_path: Path) -> dict:
    config = load_config(resolve_recipe("default"), [*OVERRIDES, f"run.dir={tmp_path}"])
    run_dir = train(config)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {
        "metrics": [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in metrics],
        "samples": [[s["step"], s["completion"], s["reward"]] for s in samples],
    }


def test_default_run_logs_the_pinned_metrics_and_samples(tmp_path):
    got = _default_run(tmp_path)
    if os.environ.get("AHA_PIN_UPDATE"):
        PIN.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"pin re-taken: {PIN}")
    pinned = json.loads(PIN.read_text())
    assert got["samples"] == pinned["samples"]
    assert [sorted(row) for row in got["metrics"]] == [sorted(row) for row in pinned["metrics"]]
    for row, want in zip(got["metrics"], pinned["metrics"], strict=True):
        for key, value in want.items():
            if key.startswith(ROUNDED):
                assert row[key] == pytest.approx(value, **ROUNDING), (row["step"], key)
            else:
                assert row[key] == value, (row["step"], key)
