"""Checkpoints and resume: exact resume after SIGKILL, crashes while saving, full disks, signals, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.checkpoint import list_checkpoints, save_checkpoint
from rl.config import load_config
from rl.errors import AhaError, DataError
from rl.train import train
from tests.conftest import REPO


@pytest.fixture
def workdir(tmp_path, toy_data):
    return tmp_path  # holds prompts.jsonl (toy_data) and the runs


def _overrides(workdir: Path, model_dir: Path, name: str, steps: int = 6) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"data.source={workdir / 'prompts.jsonl'}",
        "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
        f"train.steps={steps}",
        "train.prompts_per_step=2",
        "train.micro_batch_size=8",
        "train.deterministic=true",
        "train.threads=1",
        "rollout.group_size=4",
        "rollout.max_new_tokens=6",
        "optim.lr=1e-2",
        "run.checkpoint_every=1",
        f"run.dir={workdir / 'runs'}",
        f"run.name={name}",
        "track.console=plain",
        "track.tensorboard=false",
        "track.dashboard=false",
        "eval.size=0",
    ]


def _aha(workdir: Path, args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "rl.cli", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # timings differ


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_resume_after_sigkill_reproduces_metrics_and_weights_bit_for_bit(workdir, tiny_model_dir):
    straight = _aha(workdir, _overrides(workdir, tiny_model_dir, "straight"))
    assert straight.wait(timeout=300) == 0, straight.communicate()

    killed = _aha(workdir, _overrides(workdir, tiny_model_dir, "killed"))
    _wait_for(workdir / "runs" / "killed" / "checkpoints" / "step-000003" / "state.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _aha(
        workdir, _overrides(workdir, tiny_model_dir, "killed") + ["resume=auto"]
    )  # the CLI shortcut
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from" in out

    a, b = workdir / "runs" / "straight", workdir / "runs" / "killed"
    assert [r["step"] for r in _metrics(b)] == [1, 2, 3, 4, 5, 6]  # no step logged twice
    assert _metrics(a) == _metrics(b)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(workdir, tiny_model_dir):
    # A wrapper that kills the trainer with SIGKILL halfway through writing the second checkpoint.
    (workdir / "crash_on_save.py").write_text(
        "import os, signal, sys, torch\n"
        "real_save, calls = torch.save, []\n"
        "def dying_save(obj, path, *args, **kwargs):  # the 2nd call writes checkpoint 2's optimizer.pt\n"
        "    calls.append(path)\n"
        "    if len(calls) == 2:\n"
        "        open(path, 'wb').write(b'half a file')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_save(obj, path, *args, **kwargs)\n"
        "torch.save = dying_save\n"
        "from rl.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = _overrides(workdir, tiny_model_dir, "crash", steps=4)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(workdir / "crash_on_save.py"), "train", *args], env=env)
    assert proc.returncode == -signal.SIGKILL

    run_dir = workdir / "runs" / "crash"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-000001"]
    assert (run_dir / "checkpoints" / ".tmp-step-000002").exists()  # the half-written one, never renamed
    resumed = _aha(workdir, args + ["run.resume=auto"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "step-000001" in out and "at step 2" in out
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3, 4]
    assert not (run_dir / "checkpoints" / ".tmp-step-000002").exists()


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_a_checkpoint_and_exits_non_zero_saying_stopped(
    workdir, tiny_model_dir, sig, status
):
    args = _overrides(workdir, tiny_model_dir, "term", steps=200)
    args = [a for a in args if not a.startswith("run.checkpoint_every")]  # only the signal saves
    proc = _aha(workdir, args)
    _wait_for(workdir / "runs" / "term" / "metrics.jsonl", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err  # 128 + the signal: a scheduler sees an unfinished run
    assert f"{sig.name}: saving a checkpoint" in out
    assert f"stopped by {sig.name} after step" in err and "resume=auto" in err
    assert "run written" not in out
    (checkpoint,) = list_checkpoints(workdir / "runs" / "term")
    last_logged = _metrics(workdir / "runs" / "term")[-1]["step"]
    assert checkpoint.name == f"step-{last_logged:06d}"


def test_sigterm_during_the_last_step_finishes_the_run(workdir, tiny_model_dir):
    (workdir / "term_in_last_step.py").write_text(
        "import os, signal, sys\n"
        "import rl.train\n"
        "real, calls = rl.train.update_policy, []\n"
        "def update(*args, **kwargs):  # SIGTERM arrives during the update of the last (3rd) step\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*args, **kwargs)\n"
        "rl.train.update_policy = update\n"
        "from rl.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [a for a in _overrides(workdir, tiny_model_dir, "last", steps=3) if a != "track.dashboard=false"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(workdir / "term_in_last_step.py"), "train", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "during the last step: finishing the run" in proc.stdout and "run written" in proc.stdout
    run_dir = workdir / "runs" / "last"
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "dashboard.png").is_file()
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]


def _tiny_run(workdir, model_dir, name, extra=()):
    return load_config(None, _overrides(workdir, model_dir, name, steps=2) + ["track.console=quiet", *extra])


def test_keep_last_and_keep_best_rotation(tmp_path, tiny_model, tokenizer):
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    for step, acc in enumerate([0.1, 0.9, 0.2, 0.3], start=1):
        state = {"best_value": acc, "sampler": {}, "alarms": {}, "skipped_in_a_row": 0}
        save_checkpoint(
            tmp_path, step, tiny_model, tokenizer, optimizer, scheduler, state, 2, "eval/accuracy"
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003", "step-000004"]


def test_checkpoint_files_load_without_unpickling(tmp_path, tiny_model, tokenizer):
    optimizer = torch.optim.AdamW(tiny_model.parameters())
    tiny_model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    state = {"sampler": {}, "alarms": {}, "skipped_in_a_row": 0}
    path = save_checkpoint(tmp_path, 1, tiny_model, tokenizer, optimizer, scheduler, state, 2)
    torch.load(path / "optimizer.pt", weights_only=True)  # raises if anything but tensors and plain data
    assert {p.name for p in path.iterdir()} == {
        "model",
        "optimizer.pt",
        "scheduler.json",
        "rng.safetensors",
        "state.json",
        "manifest.json",
    }


def test_resume_auto_without_checkpoints_is_a_clear_error(workdir, tiny_model_dir):
    with pytest.raises(
        AhaError, match="holds no complete checkpoint: start the run again with run.overwrite"
    ):
        train(_tiny_run(workdir, tiny_model_dir, "none", ["run.resume=auto"]))


# ----------------------------------------------------------------------------------------------- bad input
def _write_rows(workdir: Path, rows: list[dict]) -> Path:
    path = workdir / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


BAD_ROWS = [
    {"prompt": "abc", "answer": "a"},
    {"prompt": "", "answer": "a"},  # empty prompt
    {"prompt": "cab", "answer": None},  # missing answer
    {"prompt": "The", "answer": "a"},
]


def test_rows_with_empty_fields_stop_the_run_naming_row_and_field(workdir, tiny_model_dir):
    data = _write_rows(workdir, BAD_ROWS)
    with pytest.raises(
        DataError, match=r"row 1 of .*field 'prompt' is missing or empty.*data.on_bad_row=skip"
    ):
        train(_tiny_run(workdir, tiny_model_dir, "bad", [f"data.source={data}"]))


def test_rows_with_empty_fields_are_skipped_and_counted_when_asked(workdir, tiny_model_dir, capsys):
    data = _write_rows(workdir, BAD_ROWS)
    run_dir = train(
        _tiny_run(workdir, tiny_model_dir, "skip", [f"data.source={data}", "data.on_bad_row=skip"])
    )
    assert "skipped 2 bad training rows" in capsys.readouterr().out
    prompts = {json.loads(line)["prompt"] for line in (run_dir / "samples.jsonl").read_text().splitlines()}
    assert prompts <= {"abc", "The"}  # only the good rows are used


def test_prompt_longer_than_the_limit_is_an_error(workdir, tiny_model_dir):
    data = _write_rows(workdir, [{"prompt": "word " * 200, "answer": "a"}])
    with pytest.raises(DataError, match=r"row 0 .*over data.max_prompt_tokens=64"):
        train(
            _tiny_run(workdir, tiny_model_dir, "long", [f"data.source={data}", "data.max_prompt_tokens=64"])
        )


def test_tokenizer_without_pad_token_falls_back_to_eos(workdir, tmp_path):
    from tests.conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    model = build_model(len(tokenizer), 0, tokenizer.eos_token_id, tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "nopad")
    tokenizer.save_pretrained(tmp_path / "nopad")
    run_dir = train(_tiny_run(workdir, tmp_path / "nopad", "nopad"))
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2]


def test_tokenizer_without_pad_or_eos_token_is_a_clear_error(workdir, tmp_path):
    from tests.conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    build_model(len(tokenizer)).save_pretrained(tmp_path / "noeos")
    tokenizer.save_pretrained(tmp_path / "noeos")
    with pytest.raises(AhaError, match="neither a pad token nor an eos token"):
        train(_tiny_run(workdir, tmp_path / "noeos", "noeos"))
