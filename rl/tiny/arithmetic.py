"""Synthetic arithmetic for the tiny model: sums of a few two-digit numbers, with two completion styles.

A problem is a raw prompt such as "12+35+48+23+67=" whose answer is the sum, as a string ("185"). Its
completion takes one of two styles (pretraining appends the tokenizer's EOS token to either):

    direct     "<answer>185</answer>"
    reasoning  "<think>12+35=47 47+48=95 95+23=118 118+67=185</think><answer>185</answer>"

Why this task: one step (a number below 500 plus a two-digit number) is easy for a ~1M-parameter model, while
the whole sum in one go (every carry of every column at once) is not, at the same training budget. So the
pretrained model guesses badly when it answers directly and is nearly always right when it reasons, and RL with
a correctness reward can move it toward reasoning (docs/tiny-model.md has the measurements).

Train and test never overlap, whatever the seeds: a problem's split is a hash of its canonical text, the
sorted terms ("12+23+35+48+67"), so every reordering of a test problem is a test problem too.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Split = Literal["train", "test"]

N_TERMS = 6
"""Terms in a problem."""
MIN_TERM, MAX_TERM = 10, 99
"""Range of each term (inclusive)."""
TEST_PERCENT = 10
"""Percent of the problem space (by hash of the canonical text) held out as the test split."""


@dataclass(frozen=True)
class Problem:
    """A sum of terms. Example: Problem((12, 35, 8)).prompt == "12+35+8=", .answer == 55."""

    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.terms)) + "="

    @property
    def answer(self) -> int:
        return sum(self.terms)

    @property
    def split(self) -> Split:
        """The split this problem belongs to: a hash of its canonical text (the sorted terms)."""
        canonical = "+".join(map(str, sorted(self.terms)))
        digest = hashlib.blake2b(canonical.encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "big") % 100 < TEST_PERCENT else "train"


_PROMPT = re.compile(r"\d+(?:\+\d+)+=")


def parse(prompt: str) -> Problem:
    """The problem of a prompt. Example: parse("12+35+8=") -> Problem(terms=(12, 35, 8))."""
    if not _PROMPT.fullmatch(prompt):
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return Problem(tuple(int(term) for term in prompt[:-1].split("+")))


def solve(problem: Problem | str) -> list[tuple[int, int, int]]:
    """The derivation: one (running total, term, new total) per addition; the last total is the answer.

    Example: solve("12+35+8=") -> [(12, 35, 47), (47, 8, 55)]
    """
    terms = parse(problem).terms if isinstance(problem, str) else problem.terms
    steps, total = [], terms[0]
    for term in terms[1:]:
        steps.append((total, term, total + term))
        total += term
    return steps


def format_direct(problem: Problem | str) -> str:
    """The short completion, the answer alone. Example: "12+35+8=" -> "<answer>55</answer>"."""
    answer = solve(problem)[-1][2]
    return f"<answer>{answer}</answer>"


def format_reasoning(problem: Problem | str) -> str:
    """The long completion, one addition per step, then the answer.

    Example: "12+35+8=" -> "<think>12+35=47 47+8=55</think><answer>55</answer>"
    """
    steps = solve(problem)
    think = " ".join(f"{total}+{term}={new}" for total, term, new in steps)
    return f"<think>{think}</think><answer>{steps[-1][2]}</answer>"


def random_problem(rng: random.Random, split: Split) -> Problem:
    """One problem drawn uniformly from the split (rejection sampling on the split hash)."""
    while True:
        problem = Problem(tuple(rng.randint(MIN_TERM, MAX_TERM) for _ in range(N_TERMS)))
        if problem.split == split:
            return problem


def make_problems(split: Split, n: int, seed: int = 0) -> list[dict[str, str]]:
    """n distinct problems of the split, seeded, as rows {"prompt": "12+35+48+23+67=", "answer": "185"}.

    Any seed's train problems are disjoint from any seed's test problems (the split is a hash of the problem).
    """
    return distinct_rows(random_problem, split, n, random.Random(f"{split}-{seed}"))


def distinct_rows(
    draw: Callable[[random.Random, Split], Any], split: Split, n: int, rng: random.Random
) -> list[dict]:
    """n problems of distinct prompts drawn by `draw(rng, split)`, as rows {"prompt": ..., "answer": ...}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        problem = draw(rng, split)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            rows.append({"prompt": problem.prompt, "answer": str(problem.answer)})
    return rows
