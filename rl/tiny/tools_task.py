"""Synthetic arithmetic that pays to hand to a calculator: sums of three 4-5 digit numbers, three completion styles.

A problem is a raw prompt such as "12345+6789+54321=" whose answer is the sum, as a string ("73455"). Its
completion takes one of three styles (pretraining appends the tokenizer's EOS token to each):

    direct     "<answer>73455</answer>"
    worked     "<think>12345+6789+54321</think><answer>73455</answer>"   (restates the sum, then answers)
    tool call  "<calc>12345+6789+54321</calc><out>73455</out><answer>73455</answer>"

In a tool call the model writes the expression between <calc> and </calc> and stops; the calculator (the
rollout, at RL time) evaluates it and appends "<out>N</out>"; the model then copies N into the answer. The
model never writes the <out> span, it only reads it, so pretraining leaves it out of the loss
(`rl.tiny.pretrain.encode_example`).

Why this task: a ~1M-parameter model cannot add three five-digit numbers in one go at a small budget (every
carry of every column at once), but copying the prompt's expression and then the calculator's output is easy.
So the base model mostly guesses wrong when it answers directly and is nearly always right when it calls the
tool, and RL with a correctness reward alone can teach it to call the tool (docs/tiny-model.md has the
measurements).

Train and test never overlap, whatever the seeds: a problem's split is a hash of its canonical text, the
sorted terms, so every reordering of a test problem is a test problem too.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal

from rl.tiny.arithmetic import distinct_rows

Split = Literal["train", "test"]

N_TERMS = 3
"""Terms in a problem."""
DIGITS = (4, 5)
"""Each term has one of these digit counts (equally likely), then is uniform among such numbers."""
TEST_PERCENT = 10
"""Percent of the problem space (by hash of the canonical text) held out as the test split."""
CALL_OPEN, CALL_CLOSE, OUT_OPEN, OUT_CLOSE = "<calc>", "</calc>", "<out>", "</out>"
"""The tool-call markers (single tokens of the tools model's tokenizer)."""
TOOL_TAGS = (CALL_OPEN, CALL_CLOSE, OUT_OPEN, OUT_CLOSE)

_PROMPT = re.compile(r"\d+(?:\+\d+)+=")
_EXPRESSION = re.compile(r"\d{1,9}(?:\+\d{1,9}){0,9}")


@dataclass(frozen=True)
class Problem:
    """A sum of terms. Example: Problem((12345, 6789, 54321)).prompt == "12345+6789+54321=", .answer == 73455."""

    terms: tuple[int, ...]

    @property
    def expression(self) -> str:
        return "+".join(map(str, self.terms))

    @property
    def prompt(self) -> str:
        return self.expression + "="

    @property
    def answer(self) -> int:
        return sum(self.terms)

    @property
    def split(self) -> Split:
        """The split this problem belongs to: a hash of its canonical text (the sorted terms)."""
        canonical = "tools:" + "+".join(map(str, sorted(self.terms)))
        digest = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") % 100 < TEST_PERCENT else "train"


def parse(prompt: str) -> Problem:
    """The problem of a prompt. Example: parse("12345+6789+54321=") -> Problem(terms=(12345, 6789, 54321))."""
    if not _PROMPT.fullmatch(prompt):
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return Problem(tuple(int(term) for term in prompt[:-1].split("+")))


def calculate(expression: str) -> int | None:
    """The calculator: the value of a sum of up to ten non-negative integers, None if it is not one.

    Example: calculate("12345+6789+54321") -> 73455; calculate("12+") -> None
    """
    if not _EXPRESSION.fullmatch(expression):
        return None
    return sum(int(term) for term in expression.split("+"))


def format_direct(problem: Problem | str) -> str:
    """The short completion, the answer alone. Example: "1+2+3=" -> "<answer>6</answer>"."""
    problem = parse(problem) if isinstance(problem, str) else problem
    return f"<answer>{problem.answer}</answer>"


def format_worked(problem: Problem | str) -> str:
    """The worked completion: the sum restated, then the answer. It teaches copying the prompt's expression
    without calling the tool. Example: "1+2+3=" -> "<think>1+2+3</think><answer>6</answer>"."""
    problem = parse(problem) if isinstance(problem, str) else problem
    return f"<think>{problem.expression}</think><answer>{problem.answer}</answer>"


def format_tool_output(value: int | str) -> str:
    """What the calculator inserts after </calc>. Example: format_tool_output(73455) -> "<out>73455</out>"."""
    return f"{OUT_OPEN}{value}{OUT_CLOSE}"


def format_tool_call(problem: Problem | str) -> str:
    """The tool-call completion: the call, the calculator's output, the answer copied from it.

    Example: "1+2+3=" -> "<calc>1+2+3</calc><out>6</out><answer>6</answer>"
    """
    problem = parse(problem) if isinstance(problem, str) else problem
    call = f"{CALL_OPEN}{problem.expression}{CALL_CLOSE}"
    return call + format_tool_output(problem.answer) + f"<answer>{problem.answer}</answer>"


def random_problem(rng: random.Random, split: Split) -> Problem:
    """One problem drawn from the split (rejection sampling on the split hash)."""
    while True:
        terms = []
        for _ in range(N_TERMS):
            digits = rng.choice(DIGITS)
            terms.append(rng.randint(10 ** (digits - 1), 10**digits - 1))
        problem = Problem(tuple(terms))
        if problem.split == split:
            return problem


def make_problems(split: Split, n: int, seed: int = 0) -> list[dict[str, str]]:
    """n distinct problems of the split, seeded, as rows {"prompt": "12345+6789+54321=", "answer": "73455"}.

    Any seed's train problems are disjoint from any seed's test problems (the split is a hash of the problem).
    """
    return distinct_rows(random_problem, split, n, random.Random(f"tools-{split}-{seed}"))
