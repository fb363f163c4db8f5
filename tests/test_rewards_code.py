"""The code reward: code extraction, test formats, scoring, and the refusal to run without a sandbox."""

import json
import os
import shutil

import pytest

from rewards import RewardError, RewardScorer, RewardSpec
from rewards.code import code_reward, extract_code, outputs_match, parse_tests

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("CI"),
    reason="bwrap is not installed (apt-get install -y bubblewrap); in CI these tests always run",
)
FAST = {"timeout": 5.0, "memory_mb": 512}


def fenced(code: str, tag: str = "python") -> str:
    return f"Let me write it.\n```{tag}\n{code}\n```\nDone."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (fenced("print(1)"), "print(1)\n"),
        (fenced("print(1)", "py"), "print(1)\n"),
        (fenced("a = 1") + fenced("a = 2"), "a = 2\n"),  # the last block
        (fenced("a = 1") + fenced("echo hi", "bash"), "a = 1\n"),  # other languages are skipped
        (fenced("a = 3", ""), "a = 3\n"),  # an untagged block when there is no python block
        (fenced("a = 1") + fenced("a = 3", ""), "a = 1\n"),  # a tagged block wins
        ("```python\nprint(1)\n", None),  # unclosed fence: a truncated completion
        ("no code at all", None),
    ],
)
def test_extract_code(text, expected):
    assert extract_code(text) == expected


def test_parse_tests_splits_top_level_asserts_into_cases():
    suite = parse_tests(
        "import math\ndef helper(x):\n    return x\nassert helper(1) == 1\nassert math.pi > 3"
    )
    assert suite.n_cases == 2
    assert [is_case for _, is_case in suite.steps] == [False, False, True, True]


def test_parse_tests_without_top_level_asserts_is_one_case():
    assert parse_tests("def check(f):\n    assert f(1) == 2\ncheck(inc)").n_cases == 1


@pytest.mark.parametrize(
    "tests",
    [
        [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"}],
        {"inputs": ["1 2\n", "2 2\n"], "outputs": ["3\n", "4\n"]},
        json.dumps({"inputs": ["1 2\n", "2 2\n"], "outputs": ["3\n", "4\n"]}),
        [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "2 2\n", "stdout": "4\n"}],
    ],
)
def test_parse_tests_reads_stdio_formats(tests):
    assert parse_tests(tests).cases == (("1 2\n", "3\n"), ("2 2\n", "4\n"))


@pytest.mark.parametrize("tests", [None, "", [], {}])
def test_no_tests_means_no_suite(tests):
    assert parse_tests(tests) is None


@pytest.mark.parametrize("tests", ["assert (", 42, [{"input": "1"}]])
def test_malformed_tests_raise(tests):
    with pytest.raises(RewardError):
        parse_tests(tests)


def test_outputs_match_ignores_trailing_whitespace_only():
    assert outputs_match("3  \n4\n\n", "3\n4")
    assert outputs_match("3\r\n4\r\n", "3\n4\n")
    assert not outputs_match("3 4", "3\n4")
    assert not outputs_match(" 3", "3")


@needs_bwrap
def test_score_is_the_fraction_of_asserts_passed():
    program = fenced("def double(x):\n    return 2 * x if x != 3 else 0")
    tests = "assert double(1) == 2\nassert double(2) == 4\nassert double(3) == 6\nassert double(4) == 8"
    assert code_reward(["q"], [program], tests=[tests], **FAST) == [0.75]
    assert code_reward(["q"], [program], tests=[tests], all_or_nothing=True, **FAST) == [0.0]


@needs_bwrap
def test_score_is_the_fraction_of_stdio_cases_passed():
    program = fenced("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)")
    tests = [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "2 2", "output": "4"},
        {"input": "5 5", "output": "10"},
    ]
    assert code_reward(["q"], [program], tests=[tests], **FAST) == [pytest.approx(2 / 3)]


@needs_bwrap
def test_a_crashing_program_fails_its_stdio_case_even_with_the_right_output():
    program = fenced("print(3)\nraise ValueError('late')")
    assert code_reward(["q"], [program], tests=[[{"input": "", "output": "3"}]], **FAST) == [0.0]


@needs_bwrap
def test_list_of_test_strings_are_cases_and_failures_do_not_stop_later_cases():
    program = fenced("def inc(x):\n    return x + 1")
    tests = ["assert inc(1) == 2", "assert inc(1) == 3", "raise RuntimeError", "assert inc(2) == 3"]
    assert code_reward(["q"], [program], tests=[tests], **FAST) == [0.5]


@needs_bwrap
def test_batch_scores_each_row_and_rows_without_tests_get_none():
    completions = [fenced("x = 1"), "no code", fenced("x = 2"), fenced("x = ")]
    tests = ["assert x == 1", "assert x == 1", None, "assert x == 1"]
    assert code_reward(["q"] * 4, completions, tests=tests, **FAST) == [1.0, 0.0, None, 0.0]


@needs_bwrap
def test_solution_main_block_does_not_run_under_assert_tests():
    program = fenced("def f():\n    return 1\nif __name__ == '__main__':\n    input()")
    assert code_reward(["q"], [program], tests=["assert f() == 1"], **FAST) == [1.0]


def test_missing_bwrap_refuses_with_install_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without bwrap
    with pytest.raises(RewardError, match="apt-get install -y bubblewrap"):
        code_reward(["q"], [fenced("x = 1")], tests=["assert x == 1"])
    with pytest.raises(RewardError, match="unsandboxed: true"):
        RewardScorer([RewardSpec("code")])  # refused when the scorer is built, before any training


def test_unsandboxed_mode_runs_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path) + ":/usr/bin:/bin")
    with pytest.warns(UserWarning, match="WITHOUT a sandbox"):
        scores = code_reward(["q"], [fenced("x = 1")], tests=["assert x == 1"], unsandboxed=True, **FAST)
    assert scores == [1.0]


def test_unsandboxed_mode_still_times_out():
    with pytest.warns(UserWarning):
        scores = code_reward(
            ["q"], [fenced("while True: pass")], tests=["assert True"], unsandboxed=True, timeout=1
        )
    assert scores == [0.0]


def test_missing_tests_column_is_a_clear_error():
    with pytest.raises(RewardError, match="needs a 'tests' column"):
        code_reward(["q"], [fenced("x = 1")], answer=["1"])
