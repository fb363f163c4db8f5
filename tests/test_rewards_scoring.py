"""RewardScorer and the registry: weights, None, metrics, accuracy, user functions, and loud errors."""

import math
import sys
import textwrap
import uuid

import pytest

from rewards import RewardError, RewardScorer, RewardSpec, get_reward, register_reward
from rewards.math import get_pool

USER_MODULE = """
from rewards import register_reward

CALLS = []

def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def half_none(prompts, completions, **columns):
    return [None if i % 2 else 1.0 for i in range(len(completions))]

def all_none(prompts, completions, **columns):
    return [None] * len(completions)

def boom_on_b(prompts, completions, **columns):
    return [1 / 0 if c == "b" else 1.0 for c in completions]

def nan_on_b(prompts, completions, **columns):
    return [float("nan") if c == "b" else 1.0 for c in completions]

def text_score(prompts, completions, **columns):
    return ["high" for c in completions]

def too_few(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)

def scaled(prompts, completions, *, scale=1.0, **columns):
    return [scale] * len(completions)

def uses_answer(prompts, completions, answer, **columns):
    return [float(c == a) for c, a in zip(completions, answer)]

@register_reward("{exact}", accuracy=True)
def exact(prompts, completions, answer, **columns):
    return [float(c == a) for c, a in zip(completions, answer)]
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module on sys.path, named uniquely so that its registration is fresh."""
    name = f"aha_user_rewards_{uuid.uuid4().hex[:8]}"
    exact = f"exact_{name}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE).replace("{exact}", exact))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, exact
    sys.modules.pop(name, None)


def score(specs, completions, columns=None):
    with RewardScorer(specs) as scorer:
        return scorer(["p"] * len(completions), completions, columns or {})


def test_weighted_total_and_per_function_scores(user_module):
    mod, _ = user_module
    result = score(
        [RewardSpec(f"{mod}:length", weight=0.5), RewardSpec("format", weight=2.0)], ["ab", "abcd"]
    )
    assert result.per_function == {f"{mod}:length": [2.0, 4.0], "format": [0.0, 0.0]}
    assert result.total == [1.0, 2.0]
    assert result.metrics[f"reward/{mod}:length/mean"] == 3.0
    assert result.metrics[f"reward/{mod}:length/std"] == 1.0


def test_none_is_excluded_from_the_mean_not_counted_as_zero(user_module):
    mod, _ = user_module
    result = score([RewardSpec(f"{mod}:half_none"), RewardSpec(f"{mod}:all_none")], ["a", "b", "c", "d"])
    assert result.metrics[f"reward/{mod}:half_none/mean"] == 1.0
    assert result.metrics[f"reward/{mod}:half_none/none_frac"] == 0.5
    assert math.isnan(result.metrics[f"reward/{mod}:all_none/mean"])
    assert result.total[0] == 1.0 and math.isnan(result.total[1])


def test_metrics_are_namespaced_per_reward():
    result = score([RewardSpec("format")], ["<think>a</think><answer>1</answer>"])
    assert sorted(result.metrics) == ["perf/reward/format_s"] + [
        f"reward/format/{k}" for k in ("errors", "mean", "none_frac", "std")
    ]


def test_correct_comes_from_the_first_accuracy_reward():
    completions = ["<answer>(6 - 2) * 5</answer>", "<answer>6 + 2 + 5</answer>"]
    columns = {"target": [20, 20], "numbers": [[2, 5, 6]] * 2}
    result = score([RewardSpec("format", weight=0.1), RewardSpec("countdown")], completions, columns)
    assert result.correct == [True, False]
    assert score([RewardSpec("format")], completions).correct is None


def test_registered_user_function_keeps_its_accuracy_flag(user_module):
    mod, exact = user_module
    by_path = score([RewardSpec(f"{mod}:exact")], ["1", "2"], {"answer": ["1", "1"]})
    assert by_path.correct == [True, False]
    by_name = score([RewardSpec(exact)], ["1", "2"], {"answer": ["1", "1"]})
    assert by_name.correct == [True, False]
    assert score([RewardSpec(f"{mod}:uses_answer")], ["1"], {"answer": ["1"]}).correct is None


def test_options_are_bound_to_the_function(user_module):
    mod, _ = user_module
    result = score([RewardSpec(f"{mod}:scaled", kwargs={"scale": 3.0})], ["a"])
    assert result.per_function[f"{mod}:scaled"] == [3.0]
    lenient = score(
        [RewardSpec("format", kwargs={"strict": False})], ["x <think>a</think><answer>1</answer>"]
    )
    assert lenient.total == [1.0]


def test_a_raising_reward_fails_the_step_naming_function_sample_and_exception(user_module):
    mod, _ = user_module
    with pytest.raises(RewardError) as err:
        score([RewardSpec(f"{mod}:boom_on_b")], ["a", "a", "b"])
    message = str(err.value)
    assert f"{mod}:boom_on_b" in message and "boom_on_b" in message
    assert "sample 2 of 3" in message
    assert "ZeroDivisionError" in message
    assert "on_error: zero" in message


def test_on_error_zero_scores_failing_samples_zero_and_counts_them(user_module):
    mod, _ = user_module
    result = score([RewardSpec(f"{mod}:boom_on_b", on_error="zero")], ["a", "b", "b"])
    assert result.per_function[f"{mod}:boom_on_b"] == [1.0, 0.0, 0.0]
    assert result.metrics[f"reward/{mod}:boom_on_b/errors"] == 2.0


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("nan_on_b", "returned nan .* on sample 1 of 2"),
        ("text_score", "returned a non-number .*str.* on sample 0 of 2"),
        ("too_few", "returned 1 scores for 2 completions"),
    ],
)
def test_invalid_scores_are_errors_that_say_so(user_module, function, expected):
    mod, _ = user_module
    with pytest.raises(RewardError, match=expected):
        score([RewardSpec(f"{mod}:{function}")], ["a", "b"])


def test_nan_with_on_error_zero_is_counted(user_module):
    mod, _ = user_module
    result = score([RewardSpec(f"{mod}:nan_on_b", on_error="zero")], ["a", "b"])
    assert result.per_function[f"{mod}:nan_on_b"] == [1.0, 0.0]
    assert result.metrics[f"reward/{mod}:nan_on_b/errors"] == 1.0


def test_configuration_errors_are_never_zeroed():
    with pytest.raises(RewardError, match="needs an 'answer' column"):
        score([RewardSpec("math", on_error="zero")], ["\\boxed{1}"], {"solution": ["1"]})


def test_unknown_reward_lists_the_builtins():
    with pytest.raises(
        RewardError,
        match=r"unknown reward 'maths'\. Built-in rewards: code, countdown, environment, format, judge, math, reward_model[ .]",
    ):
        RewardScorer([RewardSpec("maths")])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        ("rewards.format:no_such_fn", "has no attribute 'no_such_fn'"),
        ("rewards.format:_TAGS", "not a function"),
    ],
)
def test_bad_user_paths_are_clear_errors(name, expected):
    with pytest.raises(RewardError, match=expected):
        get_reward(name)


def test_user_function_by_module_path_is_the_function_itself(user_module):
    mod, _ = user_module
    assert get_reward(f"{mod}:length") is sys.modules[mod].length


def test_registering_a_name_twice_is_an_error():
    name = f"twice_{uuid.uuid4().hex[:8]}"
    register_reward(name)(lambda prompts, completions, **columns: [0.0] * len(completions))
    with pytest.raises(RewardError, match="already registered"):
        register_reward(name)(lambda prompts, completions, **columns: [1.0] * len(completions))
    with pytest.raises(RewardError, match="already registered"):
        register_reward("math")(lambda prompts, completions, **columns: [])


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([RewardSpec("format"), RewardSpec("format")], "listed twice"),
        ([RewardSpec("format", kwargs={"strictt": True})], r"unknown option\(s\) \['strictt'\].*strict"),
        ([RewardSpec("math", kwargs={"timeout_s": 1})], r"unknown option.*timeout, workers"),
        ([RewardSpec("format", on_error="ignore")], "on_error must be"),
        ([RewardSpec("format", weight=float("nan"))], "weight must be a finite number"),
        ([], "empty"),
    ],
)
def test_bad_specs_fail_when_the_scorer_is_built(specs, expected):
    with pytest.raises(RewardError, match=expected):
        RewardScorer(specs)


def test_misaligned_columns_are_an_error():
    with RewardScorer([RewardSpec("format")]) as scorer, pytest.raises(RewardError, match="column 'answer'"):
        scorer(["p", "p"], ["a", "b"], {"answer": ["1"]})


def test_close_stops_math_workers():
    with RewardScorer([RewardSpec("math", kwargs={"workers": 1})]) as scorer:
        result = scorer(["p"], ["\\boxed{0.5}"], {"answer": ["\\frac12"]})
        workers = list(get_pool(1)._workers)
    assert result.correct == [True]
    assert workers and get_pool(1)._workers == []
    assert all(w.proc.returncode is not None for w in workers)  # killed and reaped
