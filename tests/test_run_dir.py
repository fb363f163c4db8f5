"""A run is never lost: same names, failed starts, damaged checkpoints, full disks, torn logs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rewards import RewardError
from rl.checkpoint import MANIFEST, checkpoint_problem, list_checkpoints
from rl.config import load_config
from rl.errors import AhaError
from rl.train import train
from tests.test_checkpoint import _metrics, _overrides


@pytest.fixture
def workdir(tmp_path, toy_data):
    return tmp_path


def _config(workdir: Path, model_dir: Path, name: str, steps: int, *extra: str):
    return load_config(None, [*_overrides(workdir, model_dir, name, steps), "track.console=quiet", *extra])


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory with its bytes (what must not change)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 3-step run with a checkpoint per step (copy it before changing it)."""
    from tests.conftest import TOY_PROMPTS

    workdir = tmp_path_factory.mktemp("three")
    (workdir / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p, "answer": "a"}) for p in TOY_PROMPTS)
    )
    train(_config(workdir, tiny_model_dir, "base", 3, "run.keep_last=3"))
    return workdir


def _copy_of(three_steps: Path, workdir: Path) -> Path:
    """A copy of the 3-step run in `workdir` (continue it with `_continue`)."""
    shutil.copytree(three_steps / "runs", workdir / "runs")
    return workdir / "runs" / "base"


def _continue(workdir: Path, three_steps: Path, model_dir: Path, steps: int, *extra: str):
    """The config that continues the copy of the 3-step run: its data file is where that run had it."""
    return _config(workdir, model_dir, "base", steps, f"data.source={three_steps / 'prompts.jsonl'}", *extra)


# ------------------------------------------------------------------------------------ 1. same name twice
def test_a_new_run_under_the_name_of_a_finished_one_is_refused_and_changes_nothing(workdir, tiny_model_dir):
    first = train(_config(workdir, tiny_model_dir, "aha", 2))
    before = _snapshot(first)
    with pytest.raises(
        AhaError, match=r"(?s)already holds a run \(2 of 2 steps logged.*run.name=NEW.*resume=auto.*overwrite"
    ):
        train(_config(workdir, tiny_model_dir, "aha", 3, "train.seed=7"))
    assert _snapshot(first) == before


def test_overwrite_replaces_the_previous_run_and_its_checkpoints(workdir, tiny_model_dir):
    first = train(_config(workdir, tiny_model_dir, "aha", 3))
    run_dir = train(_config(workdir, tiny_model_dir, "aha", 2, "train.seed=7", "run.overwrite=true"))
    assert run_dir == first
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2]
    assert [p.name for p in list_checkpoints(run_dir)] == [
        "step-000001",
        "step-000002",
    ]  # the old step 3 is gone
    state = json.loads((run_dir / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["config"]["train"]["seed"] == 7


def test_resume_refuses_a_checkpoint_of_another_config_naming_the_keys(workdir, tiny_model_dir):
    run_dir = train(_config(workdir, tiny_model_dir, "aha", 2))
    before = _snapshot(run_dir)
    with pytest.raises(AhaError, match=r"another config \(optim.lr: 0.01 -> 0.02; train.seed: 0 -> 7\)"):
        train(_config(workdir, tiny_model_dir, "aha", 3, "train.seed=7", "optim.lr=0.02", "run.resume=auto"))
    assert _snapshot(run_dir) == before


def test_resume_may_raise_the_step_count_and_change_how_the_run_is_shown(workdir, tiny_model_dir):
    run_dir = train(_config(workdir, tiny_model_dir, "aha", 2))
    train(
        _config(
            workdir, tiny_model_dir, "aha", 3, "run.resume=auto", "track.console=plain", "run.keep_last=5"
        )
    )
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]


# ----------------------------------------------------------------------------- 2. a failed start writes nothing
@pytest.mark.parametrize(
    "bad",
    [
        "rewards=[{name: 'my_mod:fn'}]",  # a typo in a reward path
        "data.source=missing.jsonl",
        "model.path=/nonexistent/model",
    ],
)
@pytest.mark.parametrize("how", ["run.overwrite=true", "run.resume=auto"])
def test_a_start_that_fails_leaves_the_earlier_run_as_it_was(workdir, tiny_model_dir, bad, how):
    run_dir = train(_config(workdir, tiny_model_dir, "x", 2))
    before = _snapshot(run_dir)
    with pytest.raises((AhaError, RewardError)):
        train(_config(workdir, tiny_model_dir, "x", 3, how, bad))
    assert _snapshot(run_dir) == before


def test_a_start_that_fails_creates_no_run_directory(workdir, tiny_model_dir):
    with pytest.raises(RewardError, match="my_mod"):
        train(_config(workdir, tiny_model_dir, "new", 2, "rewards=[{name: 'my_mod:fn'}]"))
    assert not (workdir / "runs" / "new").exists()


# ------------------------------------------------------------------------------ 3. damaged checkpoints
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    path.write_bytes(bytes(data))


CHECKPOINT_FILES = [
    "model/model.safetensors",
    "optimizer.pt",
    "rng.safetensors",
    "state.json",
    "scheduler.json",
    "model/tokenizer.json",
    "model/config.json",
    MANIFEST,
]


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_falls_back_past_a_damaged_checkpoint(
    workdir, three_steps, tiny_model_dir, name, damage, capsys
):
    run_dir = _copy_of(three_steps, workdir)
    newest = run_dir / "checkpoints" / "step-000003"
    damage(newest / name)
    assert checkpoint_problem(newest) is not None
    train(_continue(workdir, three_steps, tiny_model_dir, 4, "run.resume=auto", "run.keep_last=3"))
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "step-000003 is damaged" in line]
    assert len(warning) == 1 and "moved to damaged-step-000003" in warning[0]
    assert "resuming from" in out and "step-000002 at step 3" in out
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000002", "step-000003", "step-000004"]
    assert (run_dir / "checkpoints" / "damaged-step-000003").is_dir()  # kept for inspection
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(run_dir))


def test_resume_fails_clearly_when_no_checkpoint_is_intact(workdir, three_steps, tiny_model_dir):
    run_dir = _copy_of(three_steps, workdir)
    for checkpoint in list_checkpoints(run_dir):
        _flip(checkpoint / "optimizer.pt")
    before = _snapshot(run_dir)
    with pytest.raises(
        AhaError, match=r"(?s)no intact checkpoint .*step-000003: optimizer.pt does not match"
    ):
        train(_continue(workdir, three_steps, tiny_model_dir, 4, "run.resume=auto"))
    assert _snapshot(run_dir) == before


def test_resume_by_path_refuses_a_damaged_checkpoint(workdir, three_steps, tiny_model_dir):
    run_dir = _copy_of(three_steps, workdir)
    _truncate(run_dir / "checkpoints" / "step-000002" / "model" / "model.safetensors")
    with pytest.raises(AhaError, match=r"damaged: model/model.safetensors has \d+ bytes"):
        train(
            _config(
                workdir, tiny_model_dir, "other", 4, f"run.resume={run_dir / 'checkpoints' / 'step-000002'}"
            )
        )


def test_a_torn_last_line_of_the_logs_does_not_stop_resume(workdir, three_steps, tiny_model_dir):
    run_dir = _copy_of(three_steps, workdir)
    for log in ("metrics.jsonl", "samples.jsonl"):
        with (run_dir / log).open("a") as f:
            f.write('{"step": 4, "reward/me')  # power loss while writing step 4
    train(_continue(workdir, three_steps, tiny_model_dir, 4, "run.resume=auto"))
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3, 4]
    assert all(json.loads(line)["step"] <= 4 for line in (run_dir / "samples.jsonl").read_text().splitlines())


# ------------------------------------------------------------------------------------------ 4. full disk
FULL_DISK = [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's
]


@pytest.mark.parametrize("error", FULL_DISK, ids=["ENOSPC", "torch-unexpected-pos"])
def test_a_full_disk_while_saving_is_one_clear_error_and_keeps_the_last_checkpoint(
    workdir, tiny_model_dir, monkeypatch, error
):
    import rl.checkpoint as ckpt

    real_save, calls = ckpt.torch.save, []

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            real_save(obj, path, *args, **kwargs)  # a partial file is left behind, as on a real disk
            raise error
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(
        AhaError,
        match=r"(?s)no space left to write the checkpoint of step 2 in .* MiB free on that disk, and it needs about .* MiB.*previous checkpoints are intact",
    ):
        train(_config(workdir, tiny_model_dir, "full", 3))
    run_dir = workdir / "runs" / "full"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000001"]
    assert checkpoint_problem(run_dir / "checkpoints" / "step-000001") is None
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the partial checkpoint is removed
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    train(_config(workdir, tiny_model_dir, "full", 3, "run.resume=auto"))
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]


@pytest.mark.parametrize("log", ["metrics.jsonl", "samples.jsonl"])
def test_a_full_disk_while_logging_is_one_clear_error(workdir, tiny_model_dir, monkeypatch, log):
    import builtins

    real_open = builtins.open

    class FullFile:
        def __init__(self, handle):
            self.handle, self.name = handle, handle.name

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def opener(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullFile(handle) if str(file).endswith(log) and "a" in mode else handle

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: opener(self, mode, *a, **k))
    with pytest.raises(AhaError, match=rf"no space left to write {log} in .*MiB free on that disk"):
        train(_config(workdir, tiny_model_dir, "full", 2, "track.samples_every=1"))


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def test_a_real_full_disk_stops_with_a_clear_error_and_leaves_an_intact_checkpoint(workdir, tiny_model_dir):
    disk = workdir / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "3m"):  # the simulated tests above run everywhere
        pytest.skip("mounting a small tmpfs needs root and a kernel that lets this process mount")
    try:
        data = disk / "prompts.jsonl"
        shutil.copy(workdir / "prompts.jsonl", data)
        config = _config(workdir, tiny_model_dir, "full", 50, f"run.dir={disk / 'runs'}", "run.keep_last=0")
        with pytest.raises(AhaError, match=r"no space left to write .* MiB free on that disk"):
            train(config)
        run_dir = disk / "runs" / "full"
        checkpoints = list_checkpoints(run_dir)
        assert checkpoints and checkpoint_problem(checkpoints[-1]) is None
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))
        assert torch.load(checkpoints[-1] / "optimizer.pt", weights_only=True)["state"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
