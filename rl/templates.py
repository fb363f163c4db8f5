"""Prompt templates: how a dataset question becomes the text the policy continues.

plain    the question as is (the tiny arithmetic model was pretrained on raw prompts)
r1_zero  the DeepSeek-R1-Zero template: the model thinks in <think> tags and answers in <answer> tags
boxed    a math instruction asking for the final answer in \\boxed{} (Qwen2.5-Math style)
chat     the tokenizer's own chat template, with the question as the user turn
chat_boxed  the chat template with the \\boxed{} instruction appended to the user turn (instruct models)
"""

from __future__ import annotations

from typing import Any

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)

BOXED = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n"


def apply_template(name: str, question: str, tokenizer: Any = None, tools: list | None = None) -> str:
    """Render one question with the named template. `tools` (functions or JSON schemas): the tools the model
    may call, rendered by a chat template in its own function-calling format (other templates ignore them).

    Example: apply_template("boxed", "1+1?") -> "1+1?\\nPlease reason step by step, ... \\boxed{}.\\n"
    """
    if name == "plain":
        return question
    if name == "r1_zero":
        return R1_ZERO.format(question=question)
    if name == "boxed":
        return BOXED.format(question=question)
    if name in ("chat", "chat_boxed"):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"template {name!r} needs a tokenizer with a chat template; use r1_zero or boxed"
            )
        content = BOXED.format(question=question).strip() if name == "chat_boxed" else question
        messages = [{"role": "user", "content": content}]
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    raise ValueError(f"unknown template {name!r}")
