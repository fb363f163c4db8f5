"""The countdown reward and its safe arithmetic evaluator."""

from fractions import Fraction

import pytest

from rewards.countdown import MAX_EXPRESSION_CHARS, countdown_reward, safe_eval, score_countdown


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2", 3),
        ("(6 - 2) * 5", 20),
        ("100 / 4 - 3", 22),
        ("1 / 3 * 3", 1),  # exact rationals, no float error
        ("((((7))))", 7),
        ("8 / 3", Fraction(8, 3)),
    ],
)
def test_safe_eval_computes_exactly(expression, value):
    assert safe_eval(expression)[0] == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('rm -rf /')",  # names and calls
        "2 ** 10",  # powers
        "-3 + 5",  # unary minus
        "2.5 * 2",  # floats
        "1e3",
        "0x10",
        "1_000",
        "[1, 2]",
        "1 // 2",  # floor division
        "7 % 3",
        "5 / (3 - 3)",  # division by zero
        "(" * 300 + "1" + ")" * 300,  # too long / too deep
        "1 +",
        "",
    ],
)
def test_safe_eval_rejects_everything_else(expression):
    with pytest.raises(ValueError):
        safe_eval(expression)


def test_safe_eval_limits_length():
    with pytest.raises(ValueError, match="longer"):
        safe_eval("1+" * MAX_EXPRESSION_CHARS + "1")


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("<think>...</think><answer>(6 - 2) * 5</answer>", 1.0),
        ("<answer>5 * (6 - 2)</answer>", 1.0),  # any order of the numbers
        ("<answer>(6 - 2) * 5 = 20</answer>", 1.0),  # a trailing "= target" is ignored
        ("<answer>6 * 5 - 2</answer>", 0.0),  # uses each number once but misses the target
        ("<answer>(6 - 2) * 5 + 0</answer>", 0.0),  # an extra number
        ("<answer>4 * 5</answer>", 0.0),  # reaches the target without using all numbers
        ("<answer>(6 - 2) * 5 * 1</answer>", 0.0),
        ("<answer>(6 - 2) * 5</answer><answer>6 + 5</answer>", 0.0),  # the last answer counts
        ("(6 - 2) * 5", 0.0),  # no answer tags
        ("<answer>20</answer>", 0.0),
        ("<answer>__import__('os')</answer>", 0.0),
    ],
)
def test_score_countdown(completion, score):
    assert score_countdown(completion, 20, [2, 5, 6]) == score


def test_repeated_numbers_must_each_be_used():
    assert score_countdown("<answer>3 * 3 + 1</answer>", 10, [3, 3, 1]) == 1.0
    assert score_countdown("<answer>3 * 3 + 1</answer>", 10, [3, 1, 1]) == 0.0


def test_countdown_reward_scores_rows_and_skips_rows_without_a_target():
    completions = ["<answer>1 + 2</answer>", "<answer>1 + 2</answer>", "<answer>1 + 2</answer>"]
    scores = countdown_reward(["q"] * 3, completions, target=[3, 4, None], numbers=[[1, 2], [1, 2], [1, 2]])
    assert scores == [1.0, 0.0, None]
