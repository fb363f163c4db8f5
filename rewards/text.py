"""Text helpers shared by the built-in rewards: completions as text, tag contents.

Completions reach a reward function either as strings or as chat messages
(``[{"role": "assistant", "content": "..."}]``); ``as_text`` makes both a string.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import RewardError


def as_text(item: Any) -> str:
    """A completion or prompt as plain text.

    Strings pass through; a message dict gives its ``content``; a list of messages gives the contents of
    its assistant messages (all messages if none has a role), joined by newlines. Multi-part contents
    (``[{"type": "text", "text": ...}]``) are joined.

    Example: ``as_text([{"role": "assistant", "content": "<answer>4</answer>"}])`` -> ``"<answer>4</answer>"``.
    """
    if item is None:
        return ""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return _content_text(item.get("content", ""))
    if isinstance(item, list | tuple):
        messages = [m for m in item if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        chosen = assistant or messages
        if chosen:
            return "\n".join(_content_text(m.get("content", "")) for m in chosen)
        return "".join(as_text(x) for x in item)
    return str(item)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def prompt_text(prompt: Any) -> str:
    """A prompt as text: a string as is, a message list as its last message's content."""
    if isinstance(prompt, list | tuple) and prompt and isinstance(prompt[-1], dict):
        return _content_text(prompt[-1].get("content", ""))
    return as_text(prompt)


def prompt_opens_think(prompt: Any) -> bool:
    """Whether the prompt ends with an open ``<think>`` (R1-Zero's template prefills it), so that the
    completion starts inside a think block.

    Example: ``prompt_opens_think("User: 1+1?\\nAssistant: <think>")`` -> ``True``.
    """
    return prompt_text(prompt).rstrip().endswith("<think>")


def last_tag_content(text: str, tag: str) -> str | None:
    """Content of the last complete ``<tag>...</tag>`` (stripped), or None.

    Example: ``last_tag_content("<answer>1</answer> <answer> 2 </answer>", "answer")`` -> ``"2"``.
    """
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def render_template(template: str, prompt: Any, completion: Any, row: dict[str, Any], who: str) -> str:
    """`template` filled with `{prompt}` (the prompt's text), `{completion}` and the row's columns (model-based
    rewards' request text); a field that is none of these is a RewardError naming `who` and the columns.

    Example: ``render_template("{prompt} -> {completion} (gold {answer})", "1+1?", "2", {"answer": "2"}, "judge")``
    -> ``"1+1? -> 2 (gold 2)"``.
    """
    try:
        return template.format_map({**row, "prompt": prompt_text(prompt), "completion": as_text(completion)})
    except (KeyError, AttributeError, IndexError) as e:
        raise RewardError(
            f"{who}: the template names {e}, which is neither prompt, completion nor a dataset column "
            f"(columns: {sorted(row)})"
        ) from None
