"""Fault injection: SIGKILL at random points (rollout, update, checkpoint writing), a damaged checkpoint, and
resume after each; the run that comes out equals the uninterrupted run, metrics and weights bit for bit.

The points are drawn from a seeded generator, so a failure names its seed and replays exactly.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.checkpoint import list_checkpoints
from tests.conftest import REPO
from tests.test_checkpoint import _metrics, _overrides

# Where a launch kills itself: (module, function) whose n-th call sends SIGKILL, and whether before or after
# the real call. The update's point is after the backward passes and before the optimizer step.
POINTS = {
    "rollout": ("rollouts.hf_engine", "TransformersEngine.generate", "after"),
    "update": ("rl.update", "_clip_grad", "before"),
    "checkpoint-files": ("rl.checkpoint", "save_file", "after"),  # rng.safetensors written, no manifest
    "checkpoint-manifest": ("rl.checkpoint", "write_manifest", "before"),
}

KILLER = """
import importlib, os, signal, sys
module_name, qualname, when, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
module = importlib.import_module(module_name)
owner, _, name = qualname.rpartition(".")
target = getattr(module, owner) if owner else module
real, calls = getattr(target, name), []

def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(target, name, dying)
from rl.cli import main
sys.exit(main(["train", *sys.argv[5:]]))
"""


def _launch(workdir: Path, args: list[str], point: tuple[str, int] | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if point is None:
        argv = [sys.executable, "-m", "rl.cli", "train", *args]
    else:
        (workdir / "killer.py").write_text(KILLER)
        module, qualname, when = POINTS[point[0]]
        argv = [sys.executable, str(workdir / "killer.py"), module, qualname, when, str(point[1]), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def _damage(checkpoint: Path, rng: random.Random) -> str:
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    victim = rng.choice(files)
    data = bytearray(victim.read_bytes())
    if rng.random() < 0.5 and len(data) > 1:
        victim.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    else:
        data[rng.randrange(len(data))] ^= 0xFF  # bytes flipped in place
        victim.write_bytes(bytes(data))
    return str(victim.relative_to(checkpoint))


@pytest.mark.parametrize("seed", [1, 2])
def test_random_kills_and_a_damaged_checkpoint_resume_to_the_uninterrupted_run(
    tmp_path, toy_data, tiny_model_dir, seed
):
    straight = _launch(tmp_path, _overrides(tmp_path, tiny_model_dir, "straight"), None)
    assert straight.returncode == 0, straight.stderr

    rng = random.Random(seed)
    args = _overrides(tmp_path, tiny_model_dir, "faulty")
    run_dir = tmp_path / "runs" / "faulty"
    history, damaged, how = [], False, []
    for attempt in range(8):
        point = (rng.choice(sorted(POINTS)), rng.randint(1, 3)) if attempt < 4 else None
        done = _launch(tmp_path, args + how, point)
        history.append((point, done.returncode))
        if done.returncode == 0:
            break
        assert done.returncode == -signal.SIGKILL, (seed, history, done.stderr[-2000:])
        checkpoints = list_checkpoints(run_dir)
        # killed before the first checkpoint: start again (the run may have logged a step already)
        how = ["resume=auto"] if checkpoints else ["run.overwrite=true"]
        if not damaged and len(checkpoints) >= 2:
            history.append(("damaged", checkpoints[-1].name, _damage(checkpoints[-1], rng)))
            damaged = True
    assert done.returncode == 0, (seed, history)

    a, b = tmp_path / "runs" / "straight", run_dir
    assert [r["step"] for r in _metrics(b)] == [1, 2, 3, 4, 5, 6], (seed, history)
    assert _metrics(a) == _metrics(b), (seed, history)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (seed, history)
