"""The run directory: what a start may do to `<run.dir>/<run.name>`, decided before anything is written.

Guarantees (docs/reliability.md):
- A run directory that holds a run is never overwritten. A new start there is refused with the choices
  (another `run.name`, `resume=auto`, or `run.overwrite=true`, which deletes that run's records first).
- A resume continues the same run: the checkpoint's config must equal the requested one, except for keys
  that do not change what the run computes (`RESUMABLE_CHANGES`); otherwise it is refused, naming the keys.
- A start that fails writes nothing: `plan_run` only reads; `open_run_dir` is the first write, called once
  the model, data, rewards and engine are built.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rl.checkpoint import (
    atomic_write_text,
    checkpoint_dir,
    find_resume_point,
    list_checkpoints,
    set_aside,
    truncate_log,
)
from rl.errors import AhaError

RECORDS = (
    "config.yaml",
    "metrics.jsonl",
    "samples.jsonl",
    "samples.html",
    "dashboard.png",
    "checkpoints",
    "model",
    "adapter",
    "tensorboard",
    "eval",
)
"""What aha writes in a run directory; `run.overwrite=true` deletes these and nothing else."""

RESUMABLE_CHANGES = (
    "description",
    "train.steps",
    "train.threads",
    "train.device",
    "train.sharding",
    "run.",
    "track.",
)
"""Config keys (or prefixes) a resume may change: the length of the run, where and how it runs (threads,
device, sharding: the same update), where it is written and what is displayed or logged. Anything else
(model, data, rewards, rollout, algorithm, optimizer, seed, batch sizes, evaluation) would make the resumed
run another run."""


@dataclass
class RunPlan:
    """What a start will do to the run directory, decided without writing anything."""

    run_dir: Path
    resume_from: Path | None = None
    damaged: list[tuple[Path, str]] = field(
        default_factory=list
    )  # newer checkpoints that failed verification
    replace: bool = False  # delete a previous run's records (run.overwrite=true)


def plan_run(config_dict: dict, run_dir: Path, resume: str | None, overwrite: bool) -> RunPlan:
    """Decide, reading only, where the run starts: a fresh directory, a resumed checkpoint (verified, and of
    the same config) or a replaced run. Raises AhaError with the choices when the start would lose data."""
    if resume:
        resume_from, damaged = find_resume_point(run_dir, resume)
        saved = saved_config(resume_from, run_dir)
        if saved is not None:
            check_same_run(saved, config_dict, resume_from)
        return RunPlan(run_dir, resume_from, damaged)
    held = describe_run(run_dir)
    if held and not overwrite:
        raise AhaError(
            f"{run_dir} already holds a run ({held}); a new run never overwrites it. Choose one:\n"
            f"  run.name=NEW          start this run in {run_dir.parent / 'NEW'}\n"
            "  resume=auto           continue that run (the same config; train.steps may grow)\n"
            "  run.overwrite=true    delete that run's records and start again here"
        )
    return RunPlan(run_dir, replace=bool(held))


def describe_run(run_dir: Path) -> str | None:
    """A short description of the run held in `run_dir` (`"3 steps logged, checkpoints up to step 3"`), or
    None when it holds none: no logged training step, no checkpoint, no saved model. A directory left by a
    start that died before its first step holds nothing to lose."""
    steps = [row["step"] for row in _rows(run_dir / "metrics.jsonl") if row.get("step", 0) >= 1]
    checkpoints = list_checkpoints(run_dir)
    parts = [f"{len(steps)}{_of_total(run_dir)} steps logged"] if steps else []
    if checkpoints:
        parts.append(f"checkpoints up to {checkpoints[-1].name}")
    if (run_dir / "model").is_dir():
        parts.append("a saved model")
    return ", ".join(parts) or None


def _of_total(run_dir: Path) -> str:
    try:
        return f" of {yaml.safe_load((run_dir / 'config.yaml').read_text())['train']['steps']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""


def _rows(path: Path) -> list[dict]:
    from rl.tracking import read_jsonl

    return read_jsonl(path) if path.is_file() else []


def saved_config(checkpoint: Path, run_dir: Path) -> dict | None:
    """The config the checkpoint was trained with: its state.json's copy, else (a checkpoint of an older aha)
    the run directory's config.yaml when the checkpoint lies in it; None when neither is there."""
    state = json.loads((checkpoint / "state.json").read_text())
    if "config" in state:
        return state["config"]
    config_file = run_dir / "config.yaml"
    if checkpoint.parent == checkpoint_dir(run_dir) and config_file.is_file():
        return yaml.safe_load(config_file.read_text())
    return None


def config_differences(saved: dict, requested: dict) -> list[str]:
    """`key: saved -> requested` for every dotted config key that differs, except RESUMABLE_CHANGES. The saved
    config is read as a config file would be (defaults filled in for knobs added since it was written)."""
    old, new = _flatten(_plain(_completed(saved))), _flatten(_plain(requested))
    return [
        f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not _resumable(key)
    ]


def _completed(saved: dict) -> dict:
    from rl.config import config_from_dict, to_dict
    from rl.errors import ConfigError

    try:
        return to_dict(config_from_dict(saved))
    except ConfigError:  # written by an aha whose keys this one does not know: compare as saved
        return saved


def check_same_run(saved: dict, requested: dict, checkpoint: Path) -> None:
    differences = config_differences(saved, requested)
    if differences:
        raise AhaError(
            f"cannot resume from {checkpoint}: it was trained with another config ({'; '.join(differences)}). "
            "A resume continues the same run (only train.steps, and where and how it runs, may change): "
            "resume with the checkpoint's settings, or start a new run with run.name=NEW"
        )


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def _plain(config: dict) -> dict:
    return json.loads(json.dumps(config))  # tuples -> lists, as the saved copy has them


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def open_run_dir(
    plan: RunPlan, config_yaml: str, resumed_step: int | None, say: Callable[[str], None]
) -> None:
    """The start's first write: create the directory, delete a replaced run's records, set damaged
    checkpoints aside, write config.yaml, and cut the logs back to the resumed step (or start them empty)."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.replace:
        for name in RECORDS:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        say(f"run.overwrite=true: deleted the previous run's records in {run_dir}")
    for path, problem in plan.damaged:
        say(
            f"checkpoint {path.name} is damaged ({problem}); moved to {set_aside(path).name}, resuming from an older one"
        )
    for tmp in checkpoint_dir(run_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was interrupted
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    for log in ("metrics.jsonl", "samples.jsonl"):
        if resumed_step is not None:
            truncate_log(run_dir / log, resumed_step)  # steps logged after the checkpoint are redone
        else:
            (run_dir / log).unlink(missing_ok=True)
