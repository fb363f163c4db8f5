"""The math reward: answer extraction, symbolic equivalence through the real worker pool, and hard timeouts."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rewards.math import close_pools, extract_answer, get_pool, last_boxed, math_reward

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _stop_workers():
    yield
    close_pools()


# (gold, predicted answer, equal?). Run as one batch through the worker pool.
EQUIVALENCE = [
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac12", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\frac{1}{2}", "\\tfrac{1}{2}", True),
    ("1/3", "0.3333333", True),
    ("\\frac{1}{3}", "0.3", False),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("3", "3.0", True),
    ("7", "7.01", False),
    # radicals and constants
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("\\sqrt{2}", "2\\sqrt{2}", False),
    ("\\pi/2", "\\frac{\\pi}{2}", True),
    ("2\\pi", "6.28", False),
    # expressions
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2-1", "(x-1)^2", False),
    ("-3", "- 3", True),
    ("-3", "3", False),
    # intervals
    ("[1,2)", "[1, 2)", True),
    ("[1,2)", "[1,2]", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty, 3]", "(-\\infty, 3)", False),
    ("x \\in [1,2]", "[1,2]", True),
    # tuples and sets
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("1, 2", "2, 1", True),
    # percentages
    ("50\\%", "0.5", True),
    ("0.5", "50\\%", True),
    ("25\\%", "0.5", False),
    # \text{} wrappers and units
    ("\\text{5}", "5", True),
    ("7", "7\\text{ cm}", True),
    ("7 \\text{cm}", "7", True),
    ("\\text{(A)}", "A", True),
    ("A", "\\text{(B)}", False),
    # degrees
    ("30^\\circ", "30", True),
    ("30", "30^{\\circ}", True),
    ("30^\\circ", "60^\\circ", False),
    # numbers with separators, currency, equations
    ("1000", "1,000", True),
    ("1,000", "1000", True),
    ("\\$5", "5", True),
    ("5", "\\$5.00", True),
    ("x=2", "2", True),
    ("2", "x=3", False),
    # matrices
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", False),
]


def test_equivalence_table_has_at_least_40_pairs_both_ways():
    assert len(EQUIVALENCE) >= 40
    assert sum(eq for *_, eq in EQUIVALENCE) >= 15 and sum(not eq for *_, eq in EQUIVALENCE) >= 15


def test_math_reward_matches_the_equivalence_table():
    golds = [g for g, _, _ in EQUIVALENCE]
    completions = [f"Work... so the answer is $\\boxed{{{p}}}$." for _, p, _ in EQUIVALENCE]
    scores = math_reward([""] * len(golds), completions, answer=golds)
    wrong = [(g, p, eq, s) for (g, p, eq), s in zip(EQUIVALENCE, scores, strict=True) if s != float(eq)]
    assert wrong == []


EXTRACTION = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # deeper nesting
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not nest
    ("First \\boxed{1}, then corrected: \\boxed{2}", "2"),  # several boxed: the last
    ("\\boxed{3} and a truncated \\boxed{\\frac{1", "3"),  # last complete one
    ("\\boxed {7}", "7"),
    ("\\fbox{8}", "8"),
    ("<think>x</think><answer> 12 </answer>", "12"),
    ("<answer>1</answer> <answer>2</answer>", "2"),
    ("<answer>\\boxed{5}</answer> <answer>6</answer>", "5"),  # boxed wins over answer tags
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1\nmore text\n####  1,000  \n", "1,000"),
    ("no answer here", None),
    ("", None),
    ("<answer>unclosed", None),
    ("\\boxed{unclosed", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_ignores_braces_outside_the_box():
    assert last_boxed("{a} \\boxed{b{c}} {d}") == "b{c}"


def test_gold_answer_may_be_a_boxed_or_gsm8k_solution():
    golds = ["So we get $\\boxed{\\frac{1}{2}}$.", "He has 3 + 4 = 7.\n#### 7", "\\frac{1}{2}"]
    completions = ["<answer>0.5</answer>", "\\boxed{7}", "\\boxed{0.5}"]
    assert math_reward([""] * 3, completions, answer=golds) == [1.0, 1.0, 1.0]


# --- what a final answer is: after the thinking, without a sentence period, without unit words ---------------


def _score(completion: str, gold: str, prompt: str = "") -> float | None:
    return math_reward([prompt], [completion], answer=[gold])[0]


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("#### 42.", "42"),
        ("<answer>42.</answer>", "42"),
        ("\\boxed{42.}", "42"),
        ("So the answer is $\\boxed{42.}$", "42"),
        ("\\boxed{3.}", "3"),
        ("<answer>42.5.</answer>", "42.5"),
    ],
)
def test_a_trailing_sentence_period_is_not_part_of_the_answer(completion, gold):
    assert _score(completion, gold) == 1.0


@pytest.mark.parametrize("gold", ["42.", "#### 42.", "So $\\boxed{42.}$"])
def test_a_gold_answer_with_a_trailing_period_means_the_number(gold):
    assert _score("\\boxed{42}", gold) == 1.0


def test_a_decimal_point_inside_the_number_is_kept():
    assert extract_answer("\\boxed{42.5}") == "42.5"
    assert math_reward(["", ""], ["\\boxed{42.5}", "<answer>42.5</answer>"], answer=["42", "42.5"]) == [
        0.0,
        1.0,
    ]


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("#### 42 dollars", "42"),
        ("<answer>42 cookies</answer>", "42"),
        ("\\boxed{42 apples each}", "42"),
        ("<answer>42 dollars.</answer>", "42"),
        ("<answer>1,000 dollars</answer>", "1000"),
        ("\\boxed{42}", "42 dollars"),  # the gold answer is read the same way
    ],
)
def test_a_number_followed_by_unit_words_is_the_number(completion, gold):
    assert _score(completion, gold) == 1.0


def test_unit_words_do_not_make_a_wrong_number_right():
    assert _score("<answer>42 cookies</answer>", "43") == 0.0


@pytest.mark.parametrize(
    "answer",
    [
        "2x",
        "2 x",
        "x + 1",
        "\\pi r^2",
        "2 pi",
        "3\\sqrt{2}",
        "\\frac{1}{2}",
        "[1, 2)",
        "7\\text{ cm}",
        "42 \\pm 1",
    ],
)
def test_symbolic_answers_are_not_read_as_a_number_with_units(answer):
    assert extract_answer(f"\\boxed{{{answer}}}") == answer


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{41, 42, 43}",
        "<answer>41, 42, 43</answer>",
        "<answer>43 or 42</answer>",
        "<answer>42 or 43</answer>",
        "\\boxed{42 \\pm 1}",
        "#### 42 or more",
        "<answer>42 or more cookies.</answer>",
    ],
)
def test_hedged_answers_score_zero(completion):
    assert _score(completion, "42") == 0.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>maybe \\boxed{42}?</think><answer>43</answer>", 0.0),  # a hedge in the thinking is not paid
        ("<think>maybe \\boxed{42}</think>So \\boxed{43}.", 0.0),
        ("<think>a</think><think>\\boxed{42}</think><answer>43</answer>", 0.0),
        ("thinking \\boxed{42}</think><answer>43</answer>", 0.0),  # the prompt opened the think block
        ("<think>\\boxed{43}</think><answer>42</answer>", 1.0),  # the final answer counts, not the draft
        ("<think>\\boxed{43}</think>\n#### 42", 1.0),
    ],
)
def test_only_the_text_after_the_last_think_block_is_graded(completion, expected):
    assert _score(completion, "42") == expected


@pytest.mark.parametrize(
    ("prompt", "completion"),
    [
        ("", "<think>I guess \\boxed{42}"),  # truncated, or never closed: no final answer
        ("", "<think>a</think>\\boxed{43}<think>no, \\boxed{42}"),  # the unclosed think block is cut
        ("Assistant: <think>", "I guess \\boxed{42}"),  # the prompt prefilled <think>, never closed
    ],
)
def test_unclosed_thinking_is_not_a_final_answer(prompt, completion):
    assert _score(completion, "42", prompt) == 0.0


def test_a_prefilled_think_block_closes_in_the_completion():
    assert _score("draft \\boxed{43}</think> <answer>42</answer>", "42", "Assistant: <think>") == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\\boxed{1}</think><answer>2</answer>", "2"),
        ("<think>\\boxed{1}", None),
        ("Natalia sold 48/2 = 24 clips.\n#### 72.", "72"),
        ("<answer>$42 dollars</answer>", "42"),
        ("<answer>.</answer>\n#### 5", "5"),  # an answer that cleans to nothing is no answer
    ],
)
def test_extract_answer_reads_the_final_part_and_cleans_it(text, expected):
    assert extract_answer(text) == expected


def test_math500_reference_solutions_score_one():
    rows = [
        json.loads(line) for line in (ROOT / "tests/fixtures/math500_test.jsonl").read_text().splitlines()
    ]
    scores = math_reward([""] * len(rows), [r["solution"] for r in rows], answer=[r["answer"] for r in rows])
    assert scores == [1.0] * len(rows)


def test_no_answer_scores_zero_and_missing_gold_scores_none():
    scores = math_reward(["", "", ""], ["I give up", "\\boxed{3}", "\\boxed{3}"], answer=["3", None, ""])
    assert scores == [0.0, None, None]


def test_unparsable_gold_scores_none_not_zero():
    assert math_reward([""], ["\\boxed{5}"], answer=["\\frac{"]) == [None]


def test_pathological_answer_times_out_and_the_pool_recovers():
    start = time.monotonic()
    scores = math_reward(
        ["", ""], ["\\boxed{10^{10^{10^{10}}}}", "\\boxed{4}"], answer=["1", "4"], timeout=1.0
    )
    assert scores == [0.0, 1.0]
    assert time.monotonic() - start < 10
    assert math_reward([""], ["\\boxed{2}"], answer=["2.0"]) == [1.0]  # replaced worker works


def test_time_limit_works_off_the_main_thread():
    out = {}

    def run():
        out["scores"] = math_reward([""], ["\\boxed{9^{9^{9^{9}}}}"], answer=["1"], timeout=1.0)

    t = threading.Thread(target=run)
    start = time.monotonic()
    t.start()
    t.join(timeout=30)
    assert out["scores"] == [0.0]
    assert time.monotonic() - start < 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_close_leaves_no_worker_processes():
    pool = get_pool(2)
    pool.check([("1", "2"), ("3", "4")], timeout=60)
    pids = [w.proc.pid for w in pool._workers]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    close_pools()
    assert _wait_gone(pids) == []


@pytest.mark.parametrize("ending", ["exits normally", "is killed"])
def test_workers_do_not_outlive_the_trainer(ending):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from rewards.math import get_pool
        pool = get_pool(2)
        pool.check([("1", "2"), ("3", "4")], timeout=60)
        print(*[w.proc.pid for w in pool._workers], flush=True)
        if {ending == "is killed"}:
            time.sleep(60)
        """
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in trainer.stdout.readline().split()]
    assert len(pids) == 2
    if ending == "is killed":
        trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=60)
    assert _wait_gone(pids) == []
