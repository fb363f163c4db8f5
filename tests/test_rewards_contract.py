"""The reward-function contract every built-in keeps: TRL's signature, picklable, extra columns ignored,
strings and chat messages alike, None for "no score"."""

import ast
import functools
import os
import pickle
import shutil
from pathlib import Path

import pytest

from rewards import get_reward, registered_names
from rewards.text import as_text

BUILTINS = ["code", "countdown", "format", "math"]
HAS_BWRAP = shutil.which("bwrap") is not None or bool(os.environ.get("CI"))

# name -> (completions, columns, expected scores); the completions are right, wrong, and without an answer.
CASES = {
    "math": (
        ["<think>x</think><answer>\\frac{1}{2}</answer>", "\\boxed{3}", "no idea"],
        {"answer": ["0.5", "4", "1"]},
        [1.0, 0.0, 0.0],
    ),
    "format": (
        ["<think>x</think><answer>1</answer>", "<answer>1</answer>", "plain"],
        {},
        [1.0, 0.0, 0.0],
    ),
    "countdown": (
        ["<answer>(6 - 2) * 5</answer>", "<answer>6 + 2 + 5</answer>", "20"],
        {"target": [20, 20, 20], "numbers": [[2, 5, 6]] * 3},
        [1.0, 0.0, 0.0],
    ),
    "code": (
        ["```python\nx = 1\n```", "```python\nx = 2\n```", "no code"],
        {"tests": ["assert x == 1"] * 3},
        [1.0, 0.0, 0.0],
    ),
}


def call(name, completions, columns, **options):
    if name == "code" and not HAS_BWRAP:
        pytest.skip("bwrap is not installed")
    return get_reward(name)(["prompt"] * len(completions), completions, **columns, **options)


def test_the_builtins_are_registered():
    assert set(BUILTINS) <= set(registered_names())
    # model-based and environment rewards: their own tests (test_rewards_judge, test_reward_model,
    # test_environments) score them against a real server, a local model and environments
    assert {"judge", "reward_model", "environment"} <= set(registered_names())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_is_picklable(name):
    fn = get_reward(name)
    assert pickle.loads(pickle.dumps(fn)) is fn
    bound = functools.partial(fn, workers=1) if name in ("math", "code") else functools.partial(fn)
    assert pickle.loads(pickle.dumps(bound)).func is fn


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_scores_strings(name):
    completions, columns, expected = CASES[name]
    assert call(name, completions, columns) == expected


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_accepts_chat_message_lists(name):
    completions, columns, expected = CASES[name]
    messages = [[{"role": "assistant", "content": c}] for c in completions]
    assert call(name, messages, columns) == expected


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_ignores_extra_columns(name):
    completions, columns, expected = CASES[name]
    extra = {"problem_id": [1, 2, 3], "source": ["a", "b", "c"], "solution": ["x", "y", "z"]}
    assert call(name, completions, {**columns, **extra}) == expected


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_returns_one_score_per_completion_for_an_empty_batch(name):
    _, columns, _ = CASES[name]
    assert call(name, [], {k: [] for k in columns}) == []


@pytest.mark.parametrize(
    ("item", "text"),
    [
        ("plain", "plain"),
        ([{"role": "assistant", "content": "a"}], "a"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "a"),
        (
            [
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "ab",
        ),
        ({"role": "assistant", "content": "a"}, "a"),
        (None, ""),
    ],
)
def test_as_text_reads_strings_and_messages(item, text):
    assert as_text(item) == text


def test_rewards_never_import_the_trainer():  # layering: rl imports rewards, never the reverse
    for path in Path(__file__).resolve().parent.parent.joinpath("rewards").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in ("rl", "rollouts")], path
