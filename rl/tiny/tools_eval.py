"""Measure the tools model (rl/tiny/tools_model) on held-out problems, with the calculator simulated.

    python -m rl.tiny.pretrain --task tools --eval rl/tiny/tools_model

A completion that starts with <calc> is a tool call. Generation stops at </calc> (or EOS); the simulated
calculator evaluates the expression the model wrote (`rl.tiny.tools_task.calculate`), appends
"<out>VALUE</out>", and the model continues to EOS, as a multi-turn rollout will at RL time. A malformed
expression gets no output and counts as wrong. `generate` and `final_answer` also serve aha-tiny's measurement
(`rl.tiny.pretrain.evaluate_styles`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rl.models import load_tokenizer
from rl.tiny import tools_task


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
) -> list[list[int]]:
    """New token ids for each text (left-padded batch), each cut after its first stop token (kept).

    temperature 0 means greedy; else plain sampling at that temperature (no top-k or top-p).
    """
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        **(sampling if temperature > 0 else {"do_sample": False}),
    )
    completions = []
    for ids in out[:, batch["input_ids"].shape[1] :].tolist():  # [N, new]
        stops = [i for i, token in enumerate(ids) if token in stop_ids]
        completions.append(ids[: stops[0] + 1] if stops else ids)
    return completions


def final_answer(text: str) -> str | None:
    """The last <answer>...</answer>'s content. Example: "<answer>12</answer>" -> "12"."""
    if "</answer>" not in text:
        return None
    return text.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0]


@dataclass
class Tally:
    """Counts over completions; `summary` turns them into the reported fractions."""

    completions: int = 0
    calls: int = 0
    calls_exact: int = 0
    calls_computable: int = 0
    calls_correct: int = 0
    copies_correct: int = 0
    direct_correct: int = 0
    tokens: int = 0
    truncated: int = 0

    def summary(self) -> dict[str, float]:
        def ratio(a: int, b: int) -> float:
            return a / b if b else float("nan")

        return {
            "tool_fraction": ratio(self.calls, self.completions),
            "call_exact": ratio(self.calls_exact, self.calls),
            "tool_accuracy": ratio(self.calls_correct, self.calls),
            "copy_accuracy": ratio(self.copies_correct, self.calls_computable),
            "direct_accuracy": ratio(self.direct_correct, self.completions - self.calls),
            "accuracy": ratio(self.calls_correct + self.direct_correct, self.completions),
            "length": ratio(self.tokens, self.completions),
            "truncated_fraction": ratio(self.truncated, self.completions),
        }


def evaluate_tools(
    model_dir: str | Path,
    n: int = 200,
    seed: int = 0,
    samples: int = 4,
    temperature: float = 1.0,
    prefix: str = "",
) -> dict[str, float]:
    """Sample `samples` completions for each of n held-out problems, run their tool calls, and describe them.

    `prefix` is forced at the start of every completion ("<calc>" measures the tool path alone). Returns:
    tool_fraction (completions that start with <calc>), call_exact (of those, the written expression equals
    the prompt's), tool_accuracy (of those, the final answer is right after the simulated calculator),
    copy_accuracy (of the calls with a computable expression, the answer equals the calculator's output),
    direct_accuracy (of the other completions), accuracy (all), length (mean tokens the model wrote, EOS
    counted, the inserted output not), truncated_fraction (no EOS within the token budget).

    Example: evaluate_tools("rl/tiny/tools_model") -> {"tool_fraction": 0.1, "call_exact": 0.97, ...}
    """
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = tools_task.make_problems("test", n, seed=seed)
    prompts = [row["prompt"] for row in rows for _ in range(samples)]
    answers = [row["answer"] for row in rows for _ in range(samples)]
    eos, call_close = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(tools_task.CALL_CLOSE)
    torch.manual_seed(seed)
    firsts = generate(model, tokenizer, [p + prefix for p in prompts], [eos, call_close], 32, temperature)
    firsts = [tokenizer.encode(prefix) + ids for ids in firsts]
    tally, resumed = Tally(completions=len(prompts)), []  # resumed: (index, text so far, calculator value)
    for i, (prompt, ids) in enumerate(zip(prompts, firsts, strict=True)):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        tally.tokens += len(ids)
        tally.truncated += ids[-1] not in (eos, call_close)
        if not text.startswith(tools_task.CALL_OPEN):
            tally.direct_correct += final_answer(text) == answers[i]
            continue
        tally.calls += 1
        expression = text.removeprefix(tools_task.CALL_OPEN).removesuffix(tools_task.CALL_CLOSE)
        tally.calls_exact += ids[-1] == call_close and expression == prompt.removesuffix("=")
        value = tools_task.calculate(expression) if ids[-1] == call_close else None
        if value is not None:
            tally.calls_computable += 1
            resumed.append((i, prompt + text + tools_task.format_tool_output(value), str(value)))
    texts = [text for _, text, _ in resumed]
    seconds = generate(model, tokenizer, texts, [eos], 16, temperature) if texts else []
    for (i, _, value), ids in zip(resumed, seconds, strict=True):
        answer = final_answer(tokenizer.decode(ids, skip_special_tokens=True))
        tally.tokens += len(ids)
        tally.truncated += eos not in ids
        tally.calls_correct += answer == answers[i]
        tally.copies_correct += answer == value
    return tally.summary()
