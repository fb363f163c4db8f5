"""Data parallel on accelerate: one step split over 2 CPU ranks (gloo) equals the same step in one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file


def test_two_ranks_give_the_same_update_as_one_process(tmp_path, toy_data, subprocess_env, tiny_model_dir):
    data, env = toy_data, subprocess_env
    args = [
        "train",
        f"model.path={tiny_model_dir}",
        f"data.source={data}",
        "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
        "train.steps=1",
        "train.prompts_per_step=4",
        "train.micro_batch_size=3",  # uneven micro-batches: rank-local accumulation must still add up
        "train.threads=1",
        "rollout.group_size=4",
        "rollout.max_new_tokens=6",
        "optim.lr=1e-2",
        f"run.dir={tmp_path / 'runs'}",
        "track.console=plain",
        "track.tensorboard=false",
        "track.dashboard=false",
        "eval.size=0",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "rl.cli", *args, "run.name=one"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    ]
    two = subprocess.run(
        [*launcher, "-m", "rl.cli", *args, "run.name=two"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    runs = tmp_path / "runs"
    (a,) = [json.loads(line) for line in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    (b,) = [
        json.loads(line) for line in (runs / "two" / "metrics.jsonl").read_text().splitlines()
    ]  # logged once
    # same samples (seeded by global prompt position), same global loss, same clipped gradient
    for key in ("reward/mean", "rollout/len_mean", "perf/rollout_tokens", "loss/policy", "optim/grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    wa, wb = (
        load_file(runs / "one" / "model" / "model.safetensors"),
        load_file(runs / "two" / "model" / "model.safetensors"),
    )
    for name in wa:
        assert (wa[name] - wb[name]).abs().max() < 1e-4, name
    assert any(
        (wa[n] - load_file(tiny_model_dir / "model.safetensors")[n]).abs().max() > 1e-4 for n in wa
    )  # it moved
