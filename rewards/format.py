"""The ``format`` reward: R1-Zero's ``<think>...</think>`` then ``<answer>...</answer>`` layout.

Why score this: R1-Zero's accuracy rewards read the answer from ``<answer>`` tags, and a small format
reward teaches the layout early, before the model is right often enough for accuracy to do it. Keep its
weight small (e.g. 0.1): the model can satisfy it without being right, which is why it is a separate,
non-accuracy reward.

- ``strict=True`` (default): the whole completion is exactly one ``<think>...</think>``, then whitespace,
  then exactly one non-empty ``<answer>...</answer>``, and nothing else.
- ``strict=False`` (lenient): a ``<think>...</think>`` block followed, anywhere later, by an
  ``<answer>...</answer>`` block; other text may surround them.

When the prompt already ends with ``<think>`` (R1-Zero's template prefills it), the completion is read as
if it began with ``<think>``.

Example: ``format_reward(["Q"], ["<think>2+2</think>\\n<answer>4</answer>"])`` -> ``[1.0]``.
"""

from __future__ import annotations

import re

from rewards.registry import register_reward
from rewards.text import as_text, prompt_text

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_STRICT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL)
_LENIENT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)


def has_format(text: str, strict: bool = True) -> bool:
    """Whether ``text`` follows the think-then-answer layout (see the module docstring)."""
    if not strict:
        return _LENIENT.search(text) is not None
    m = _STRICT.match(text)
    if m is None or not m["answer"].strip():
        return False
    return not any(tag in m["think"] or tag in m["answer"] for tag in _TAGS)


@register_reward("format")
def format_reward(prompts: list, completions: list, *, strict: bool = True, **columns) -> list[float | None]:
    """1.0 when the completion follows the think-then-answer layout, else 0.0. Ignores other columns."""
    scores: list[float | None] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prefill = "<think>" if prompt_text(prompt).rstrip().endswith("<think>") else ""
        scores.append(1.0 if has_format(prefill + as_text(completion), strict) else 0.0)
    return scores
