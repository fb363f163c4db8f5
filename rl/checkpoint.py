"""Checkpoints that survive crashes, and exact resume.

A checkpoint is a directory `runs/<name>/checkpoints/step-000042/` holding:
    model/             the policy in HF format (safetensors) with its tokenizer: transformers and vLLM load it
    optimizer.pt       AdamW state, loaded with torch.load(weights_only=True): tensors and numbers only
    scheduler.json     LR-scheduler state
    rng.safetensors    torch CPU (and CUDA) generator states
    state.json         step, data-loader position, python and numpy RNG states, guard counters, best metric

It is written to a hidden temporary directory, flushed to disk, then renamed into place: a rename is atomic,
so a crash (or a full disk) while saving leaves the previous checkpoints intact and no half-written
`step-*` directory. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rl.errors import AhaError

PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted saves excluded)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-safe python/numpy states, torch generator states as tensors)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    plain = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    keep_last: int,
    keep_best: str | None = None,
    best_mode: str = "max",
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete old ones beyond the last `keep_last` (and the best).

    `state` is JSON-safe trainer state (sampler position, counters, the metric value for keep_best).
    `model_state` / `optimizer_state`: whole state dicts gathered from a sharded policy and optimizer (None: the
    policy's and optimizer's own), so the files are the same as a single process writes.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        policy.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)
        tokenizer.save_pretrained(tmp / "model")
        torch.save(
            optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt"
        )
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        plain, tensors = rng_state()
        save_file(tensors, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": plain}))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. resumed and stopped at once): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)  # atomic: readers see the whole checkpoint or none
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AhaError(
            f"could not save the checkpoint of step {step} in {root}: {err}. The previous checkpoints are intact "
            "(a checkpoint only appears once it is completely written); free disk space and resume with "
            "resume=auto"
        ) from None
    _rotate(run_dir, keep_last, keep_best, best_mode)
    return final


def _rotate(run_dir: Path, keep_last: int, keep_best: str | None, best_mode: str) -> None:
    checkpoints = list_checkpoints(run_dir)
    keep = set(checkpoints[-keep_last:]) if keep_last > 0 else set(checkpoints)
    if keep_best:
        scored = [(p, json.loads((p / "state.json").read_text()).get("best_value")) for p in checkpoints]
        scored = [(p, v) for p, v in scored if v is not None]
        if scored:
            pick = max if best_mode == "max" else min
            keep.add(pick(scored, key=lambda pv: pv[1])[0])
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def find_resume_point(run_dir: Path, resume: str) -> Path:
    """`auto`: the latest complete checkpoint of this run; otherwise a checkpoint directory path."""
    if resume == "auto":
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise AhaError(f"resume=auto but {checkpoint_dir(run_dir)} holds no complete checkpoint")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise AhaError(f"resume={resume}: not a checkpoint directory (no state.json in it)")
    return path


def load_training_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    optimizer_layout: Callable[[dict], dict] | None = None,
) -> dict:
    """Restore optimizer, scheduler and RNG states in place; returns state.json (step, sampler, counters).

    The policy weights are loaded separately, from `path / "model"`, when the policy is built.
    `optimizer_layout` maps the saved (whole) optimizer state to this optimizer's layout, e.g. its shard.
    """
    saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(optimizer_layout(saved) if optimizer_layout else saved)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    state = json.loads((path / "state.json").read_text())
    set_rng_state(state["rng"], load_file(path / "rng.safetensors"))
    return state


def truncate_log(path: Path, after_step: int) -> None:
    """Drop lines logged after `after_step` (they are recomputed on resume), so no step appears twice."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= after_step
    ]
    path.write_text("".join(line + "\n" for line in kept))
