"""Checkpoints that survive crashes, and exact resume.

A checkpoint is a directory `runs/<name>/checkpoints/step-000042/` holding:
    model/             the policy in HF format (safetensors) with its tokenizer: transformers and vLLM load it
    optimizer.pt       AdamW state, loaded with torch.load(weights_only=True): tensors and numbers only
    scheduler.json     LR-scheduler state
    rng.safetensors    torch CPU (and CUDA) generator states
    state.json         step, data-loader position, python and numpy RNG states, guard counters, best metric,
                       and the run's resolved config (resume compares it with the requested one)
    manifest.json      size and SHA-256 of every other file, written last

It is written to a hidden temporary directory, flushed to disk, then renamed into place: a rename is atomic,
so a crash (or a full disk) while saving leaves the previous checkpoints intact and no half-written
`step-*` directory; a failed save removes its temporary directory. On resume every file is checked against
the manifest: a truncated or altered file makes the checkpoint damaged, and `resume=auto` falls back to the
newest intact one. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rl.errors import AhaError, write_error

PREFIX = "step-"
MANIFEST = "manifest.json"
DAMAGED_PREFIX = "damaged-"  # where resume moves a checkpoint that failed verification (kept for inspection)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted saves excluded)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name.removeprefix(PREFIX).isdigit()
        and ((p / MANIFEST).is_file() or (p / "state.json").is_file())
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.removeprefix(PREFIX))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: Path) -> None:
    """Size and SHA-256 of every file of the checkpoint directory `path`, as its manifest.json."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(path).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files
    }
    (path / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (a missing, truncated or altered file, an unreadable
    manifest), or None when every file matches its manifest.

    Example: ``checkpoint_problem(ckpt)`` -> ``"optimizer.pt has 1200 bytes, the manifest says 5120"``.
    """
    try:
        entries = json.loads((Path(path) / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (an interrupted save, or a checkpoint of an older aha)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    for name, want in entries.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']}"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its checksum (altered since it was saved)"
    return None


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
        write_manifest(tmp)  # last: a checkpoint with a manifest was completely written
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. resumed and stopped at once): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)  # atomic: readers see the whole checkpoint or none
        _fsync_dir(root)
    except Exception as err:  # a full disk surfaces as OSError, RuntimeError (torch.save) or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_error(err, root, f"the checkpoint of step {step}", _size_of_last(root))
        if failure is None:
            raise
        raise AhaError(
            f"{failure} The partial checkpoint was removed; the previous checkpoints are intact (a checkpoint "
            "only appears once it is completely written): free disk space and resume with resume=auto"
        ) from None
    _rotate(run_dir, keep_last, keep_best, best_mode)
    return final


def _size_of_last(root: Path) -> int | None:
    """Bytes of the newest complete checkpoint under `root` (what the next one will about need), or None."""
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / MANIFEST).is_file())
    return sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file()) if done else None


def _best_value(path: Path) -> float | None:
    try:
        return json.loads((path / "state.json").read_text()).get("best_value")
    except (OSError, ValueError):
        return None  # a damaged checkpoint is never the best


def _rotate(run_dir: Path, keep_last: int, keep_best: str | None, best_mode: str) -> None:
    checkpoints = list_checkpoints(run_dir)
    keep = set(checkpoints[-keep_last:]) if keep_last > 0 else set(checkpoints)
    if keep_best:
        scored = [(p, _best_value(p)) for p in checkpoints]
        scored = [(p, v) for p, v in scored if v is not None]
        if scored:
            pick = max if best_mode == "max" else min
            keep.add(pick(scored, key=lambda pv: pv[1])[0])
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def find_resume_point(run_dir: Path, resume: str) -> tuple[Path, list[tuple[Path, str]]]:
    """The checkpoint to resume from, and the newer ones that failed verification (with why).

    `auto`: the newest intact checkpoint of this run (damaged newer ones are passed over); otherwise
    `resume` is a checkpoint directory, which must be intact. A checkpoint written before aha wrote
    manifests is loaded unverified, when named by path only.
    """
    if resume != "auto":
        path = Path(resume)
        if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
            raise AhaError(f"resume={resume}: not a checkpoint directory (no state.json in it)")
        problem = checkpoint_problem(path)
        if problem is not None and (path / MANIFEST).exists():
            raise AhaError(f"resume={resume}: the checkpoint is damaged: {problem}")
        return path, []
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise AhaError(
            f"resume=auto but {checkpoint_dir(run_dir)} holds no complete checkpoint: start the run again "
            "with run.overwrite=true, or under another run.name"
        )
    damaged = []
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    listing = "; ".join(f"{p.name}: {why}" for p, why in damaged)
    raise AhaError(
        f"resume=auto: no intact checkpoint in {checkpoint_dir(run_dir)} ({listing}). Start a new run "
        "(run.name=...), or resume=PATH to a checkpoint you trust"
    )


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the `step-*` namespace (kept for inspection, never resumed from,
    never outranking newer checkpoints in rotation); returns where it went."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
    return target


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
    """Drop lines logged after `after_step` (they are recomputed on resume), so no step appears twice; a
    torn line (the process died while writing it) is dropped too. Kept lines stay byte for byte."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn or empty line
        if isinstance(row, dict) and row.get("step", after_step + 1) <= after_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary directory beside `path` to write into; on success it replaces `path` (a crash while writing
    leaves the old directory, or none, never a half-written one). A full disk is one clear AhaError."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.with_name(f".old-{path.name}")
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_error(err, path.parent, path.name)
        if failure is None:
            raise
        raise failure from None


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
