"""The ``reward_model`` reward: a sequence-classification model scores each (prompt, completion) pair.

Why score this: a trained reward model carries preferences no rule can write down (helpfulness, harmlessness,
style), and it scores a batch in one forward pass on the run's own device, with no server. Like any learned
reward it can be hacked by the policy; pair it with a rule-based reward where one exists.

The model is any ``transformers.AutoModelForSequenceClassification`` checkpoint (a local directory or a hub id
already in the cache), loaded once per process and device. Each pair is the tokenizer's chat template applied
to ``[user: prompt, assistant: completion]`` when the tokenizer has one (a chat prompt keeps its messages),
else ``prompt + completion``; ``template`` (a format string over ``{prompt}``, ``{completion}`` and the dataset
columns) overrides both. Pairs longer than ``max_length`` tokens lose their beginning, so the model always
sees the end of the completion. Pairs are scored ``batch_size`` at a time, sorted by length, padded on the
right (the padded positions change no real token's position, so a batch scores what each pair scores alone).

The score is the model's logit when it has one label, else the softmax probability of ``label`` (a name from
the config's ``id2label`` or an index).

Options: ``model`` (required), ``batch_size`` (16), ``device`` (``auto``: the current CUDA device if there is
one, else CPU), ``dtype`` (``auto``: bfloat16 on CUDA, float32 elsewhere), ``max_length`` (the model's
maximum positions), ``template``, ``label``.

Example: ``reward_model_reward(["2+2?"], ["4"], model="path/to/rm")`` -> ``[1.83]`` (the model's logit).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rewards.registry import RewardError, register_reward
from rewards.text import as_text, prompt_text, render_template

_MODELS: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def _device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def load(model: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """The model (in eval mode, on ``device``) and its tokenizer, loaded once per process; RewardError if the
    checkpoint cannot be loaded as a sequence classifier.

    Example: ``load("path/to/rm", "cpu")[0].config.num_labels`` -> ``1``.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    where = _device(device)
    if dtype == "auto":
        dtype = "bfloat16" if where.startswith("cuda") else "float32"
    key = (model, where, dtype)
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            net = AutoModelForSequenceClassification.from_pretrained(model, dtype=getattr(torch, dtype))
        except Exception as e:  # noqa: BLE001 - OSError for a missing path, ValueError for a wrong model type
            local = " (no such directory)" if not Path(model).exists() and "/" in model else ""
            raise RewardError(
                f"reward_model: cannot load {model!r}{local} as a sequence-classification model: "
                f"{type(e).__name__}: {str(e)[:300]}"
            ) from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if net.config.pad_token_id is None:  # the classifier reads the last token that is not padding
            net.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        _MODELS[key] = (net.to(where).eval(), tokenizer)
        return _MODELS[key]


def _label_index(config: Any, label: str | int | None) -> int | None:
    """None for a one-label model (its logit is the score), else the index of ``label``."""
    if config.num_labels == 1:
        return None
    if label is None:
        raise RewardError(
            f"reward_model: the model has {config.num_labels} labels {config.id2label}; set label to the one "
            "whose probability is the reward"
        )
    names = {str(v): int(k) for k, v in config.id2label.items()}
    if isinstance(label, int) and 0 <= label < config.num_labels:
        return label
    if str(label) in names:
        return names[str(label)]
    raise RewardError(f"reward_model: label {label!r} is not one of {config.id2label}")


def pair_text(tokenizer: Any, prompt: Any, completion: Any, template: str | None, row: dict[str, Any]) -> str:
    """The text the model reads for one pair (see the module docstring).

    Example (no chat template, no ``template``): ``pair_text(tok, "2+2=", "4", None, {})`` -> ``"2+2=4"``.
    """
    if template is not None:
        return render_template(template, prompt, completion, row, "reward_model")
    if not getattr(tokenizer, "chat_template", None):
        return prompt_text(prompt) + as_text(completion)
    chat = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt_text(prompt)}]
    return tokenizer.apply_chat_template(
        [*chat, {"role": "assistant", "content": as_text(completion)}], tokenize=False
    )


def score_texts(
    net: Any,
    tokenizer: Any,
    texts: list[str],
    batch_size: int,
    max_length: int,
    index: int | None,
    special: bool,
) -> list[float]:
    """The model's score of each text, ``batch_size`` texts per forward pass (shortest first). ``special``:
    whether the tokenizer adds its special tokens (not to chat-template text, which has them already)."""
    import torch

    encode = {"truncation": True, "max_length": max_length, "add_special_tokens": special}
    lengths = [len(ids) for ids in tokenizer(texts, **encode)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    scores: list[float] = [0.0] * len(texts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, **encode).to(
            net.device
        )
        with torch.no_grad():
            logits = net(**batch).logits.float()  # [batch, num_labels]
        values = logits[:, 0] if index is None else logits.softmax(-1)[:, index]  # [batch]
        for i, value in zip(chunk, values.tolist(), strict=True):
            scores[i] = value
    return scores


def _preflight(options: dict[str, Any]) -> None:
    """Load the model when the run starts, so a wrong path or label fails before anything is written."""
    if not options.get("model"):
        raise RewardError("reward_model: set model (a local directory or a hub id) in its kwargs")
    net, _ = load(options["model"], options.get("device", "auto"), options.get("dtype", "auto"))
    _label_index(net.config, options.get("label"))


@register_reward("reward_model", preflight=_preflight)
def reward_model_reward(
    prompts: list,
    completions: list,
    *,
    model: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int | None = None,
    template: str | None = None,
    label: str | int | None = None,
    **columns,
) -> list[float | None]:
    """The reward model's score of each (prompt, completion) pair (see the module docstring)."""
    if not model:
        raise RewardError("reward_model: set model (a local directory or a hub id) in its kwargs")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RewardError(f"reward_model: batch_size must be a positive integer, not {batch_size!r}")
    net, tokenizer = load(model, device, dtype)
    index = _label_index(net.config, label)
    limit = max_length or getattr(net.config, "max_position_embeddings", None) or 2048
    rows = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
    texts = [
        pair_text(tokenizer, p, c, template, row)
        for p, c, row in zip(prompts, completions, rows, strict=True)
    ]
    special = template is not None or not getattr(tokenizer, "chat_template", None)
    return score_texts(net, tokenizer, texts, batch_size, limit, index, special)
