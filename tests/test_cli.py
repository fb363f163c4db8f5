"""The `aha` command as a user meets it: bad input is a one-line error and a non-zero exit, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def aha(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rl.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _assert_clean_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


def test_unknown_key_in_recipe_exits_with_a_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stpes: 3\n")
    _assert_clean_error(
        aha("train", str(recipe)), "unknown config key 'train.stpes'; did you mean 'train.steps'?"
    )


def test_missing_recipe_file_exits_with_an_error(tmp_path):
    _assert_clean_error(aha("train", str(tmp_path / "missing.yaml")), "recipe file not found")


def test_override_with_wrong_type_exits_with_an_error():
    _assert_clean_error(aha("train", "train.steps=many"), "train.steps: expected an integer, got 'many'")


def test_dataset_without_prompt_column_exits_naming_the_columns(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "1"}) for i in range(4)))
    result = aha(
        "train",
        f"model.path={tiny_model_dir}",
        f"data.source={data}",
        f"run.dir={tmp_path / 'runs'}",
    )
    _assert_clean_error(result, "has no column 'prompt' (its columns: answer, question)")


def test_model_path_that_does_not_exist_exits_with_an_error(tmp_path):
    _assert_clean_error(
        aha("train", f"model.path={tmp_path / 'nowhere'}", f"run.dir={tmp_path}"), "model path does not exist"
    )


def test_recipes_lists_the_shipped_recipes_with_descriptions():
    result = aha("recipes")
    assert result.returncode == 0
    assert any(line.startswith("default ") and len(line.split()) > 2 for line in result.stdout.splitlines())


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_works(args):
    assert aha(*args).returncode == 0


def test_aha_eval_offers_every_template_the_config_offers():
    import typing

    from rl.cli import TEMPLATES
    from rl.config import DataConfig

    assert set(TEMPLATES) == set(typing.get_args(typing.get_type_hints(DataConfig)["template"]))


def test_aha_eval_offers_every_registered_engine():
    from rl.cli import ENGINE_NAMES
    from rollouts import ENGINES

    assert set(ENGINE_NAMES) == set(ENGINES)
