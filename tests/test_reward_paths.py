"""A user's reward module in the current directory (`rewards: [{name: my_rewards:fn}]`) is found when aha runs as
its console script, whose sys.path[0] is its bin/ directory and not the current one, as `python -m` finds it;
errors raised inside the module still read as themselves, and a module found nowhere says where aha looked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewards import RewardError
from rewards.registry import resolve_reward

REPO = Path(__file__).resolve().parent.parent
USER_MODULES = (
    "aha_cwd_rewards",
    "aha_cwd_pkg",
    "aha_cwd_broken_import",
    "aha_cwd_broken_syntax",
    "rewards_x",
)
REWARD = "def brevity(prompts, completions, **columns):\n    return [-len(c) / 10 for c in completions]\n"


@pytest.fixture
def cwd_off_path(tmp_path, monkeypatch):
    """tmp_path as the current directory, and neither it nor '' on sys.path: the console script's view."""
    monkeypatch.chdir(tmp_path)
    here = os.path.realpath(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and os.path.realpath(p) != here])
    yield tmp_path
    for name in list(sys.modules):
        if name.partition(".")[0] in USER_MODULES:
            del sys.modules[name]


def _is_cwd(entry: str) -> bool:
    return os.path.realpath(entry) == os.path.realpath(os.getcwd())


def test_a_module_in_the_current_directory_is_imported_from_there(cwd_off_path):
    (cwd_off_path / "aha_cwd_rewards.py").write_text(REWARD)
    (cwd_off_path / "aha_cwd_pkg").mkdir()
    (cwd_off_path / "aha_cwd_pkg" / "__init__.py").write_text("")
    (cwd_off_path / "aha_cwd_pkg" / "scores.py").write_text(REWARD)
    assert resolve_reward("aha_cwd_rewards:brevity").fn(["p"], ["abcde"]) == [-0.5]
    assert resolve_reward("aha_cwd_pkg.scores:brevity").fn(["p"], ["ab"]) == [-0.2]
    # appended once, at the end: installed and standard modules come first, so a file here cannot shadow them
    assert _is_cwd(sys.path[-1]) and sum(map(_is_cwd, sys.path)) == 1


def test_a_file_named_like_an_installed_module_does_not_replace_it_and_the_error_says_so(cwd_off_path):
    (cwd_off_path / "rewards.py").write_text(REWARD)
    with pytest.raises(RewardError) as err:
        resolve_reward("rewards:brevity")
    assert "module 'rewards' has no attribute 'brevity'" in str(err.value)
    assert "which comes before ./rewards.py on sys.path: rename your file" in str(err.value)


def test_a_module_found_nowhere_says_where_aha_looked(cwd_off_path):
    with pytest.raises(RewardError) as err:
        resolve_reward("aha_cwd_nowhere:fn")
    assert str(err.value) == (
        f"reward 'aha_cwd_nowhere:fn': cannot import module 'aha_cwd_nowhere': there is no module "
        f"'aha_cwd_nowhere' in the current directory ({os.getcwd()}) nor on sys.path. Run aha from the "
        "directory that holds aha_cwd_nowhere.py (or the package aha_cwd_nowhere/), or make that directory "
        "importable: PYTHONPATH=/path/to/it aha ..."
    )
    assert not any(map(_is_cwd, sys.path))  # the failed look leaves sys.path as it was


@pytest.mark.parametrize(
    "module, source, message",
    [
        (
            "aha_cwd_broken_import",
            "import aha_not_installed_anywhere\n",
            "ModuleNotFoundError: No module named 'aha_not_installed_anywhere'",
        ),
        ("aha_cwd_broken_syntax", "def f(:\n", "SyntaxError: "),
    ],
)
def test_an_error_inside_the_module_is_reported_as_itself(cwd_off_path, module, source, message):
    (cwd_off_path / f"{module}.py").write_text(source)
    with pytest.raises(RewardError) as err:
        resolve_reward(f"{module}:f")
    assert str(err.value).startswith(f"reward '{module}:f': cannot import module '{module}': {message}")
    assert "current directory" not in str(err.value)


def test_aha_train_run_as_its_console_script_finds_a_reward_module_in_the_current_directory(tmp_path):
    """The console script's sys.path[0] is bin/; a stand-in for it in its own folder has the same view.
    The run resolves its rewards before it loads the model, so reaching the missing model proves the reward
    was imported."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    script = bin_dir / "aha"
    script.write_text(
        "import sys\nfrom rl.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n"
    )
    (work / "aha_cwd_rewards.py").write_text(REWARD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # rl itself, and not the working directory
    args = ["train", "rewards=[{name: 'aha_cwd_rewards:brevity'}]", "model.path=/nonexistent"]
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "aha: error: model path does not exist: /nonexistent"
