"""The format reward: R1-Zero's think-then-answer layout, strict and lenient."""

import pytest

from rewards.format import format_reward, has_format

# (text, strict, lenient)
CASES = [
    ("<think>2+2 is 4</think>\n<answer>4</answer>", True, True),
    ("<think>\nstep\n</think>\n<answer>\n4\n</answer>\n", True, True),
    ("  <think>a</think><answer>4</answer>  ", True, True),
    ("<think></think><answer>4</answer>", True, True),  # an empty think is still the layout
    ("<think>a</think><answer>  </answer>", False, True),  # empty answer
    ("Sure! <think>a</think><answer>4</answer>", False, True),  # text before
    ("<think>a</think><answer>4</answer> Hope this helps", False, True),  # text after
    ("<think>a</think> aside <answer>4</answer>", False, True),  # text between
    ("<think>a</think><answer>4</answer><answer>5</answer>", False, True),  # two answers
    ("<think>a<think>b</think><answer>4</answer>", False, True),  # nested think
    ("<answer>4</answer><think>a</think>", False, False),  # wrong order
    ("<think>a</think>", False, False),  # no answer
    ("<answer>4</answer>", False, False),  # no think
    ("<think>a<answer>4</answer>", False, False),  # unclosed think
    ("", False, False),
]


@pytest.mark.parametrize(("text", "strict", "lenient"), CASES)
def test_has_format(text, strict, lenient):
    assert has_format(text, strict=True) == strict
    assert has_format(text, strict=False) == lenient


def test_format_reward_scores_strict_by_default_and_lenient_on_request():
    completions = ["<think>a</think><answer>4</answer>", "ok <think>a</think><answer>4</answer>", "4"]
    assert format_reward(["q"] * 3, completions) == [1.0, 0.0, 0.0]
    assert format_reward(["q"] * 3, completions, strict=False) == [1.0, 1.0, 0.0]


def test_prefilled_think_in_the_prompt_counts():
    prompt = "User: what is 2+2?\nAssistant: <think>"
    completion = "2+2 is 4</think>\n<answer>4</answer>"
    assert format_reward([prompt, "no prefill"], [completion, completion]) == [1.0, 0.0]
