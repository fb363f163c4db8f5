"""Toy rewards a tiny random model can learn in a few steps, for end-to-end tests (`tests.toy_rewards:...`)."""

from __future__ import annotations


def letter_a(prompts: list, completions: list[str], **columns) -> list[float]:
    """Fraction of the completion's characters that are 'a': dense, so a random model climbs it quickly."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def has_a(prompts: list, completions: list[str], **columns) -> list[float]:
    """1 if the completion contains an 'a': binary, so whole groups often score the same."""
    return [float("a" in c) for c in completions]


def no_score(prompts: list, completions: list[str], **columns) -> list[None]:
    """Scores nothing (None for every completion), like a reward whose answer column is missing."""
    return [None for _ in completions]
