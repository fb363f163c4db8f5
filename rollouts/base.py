"""The rollout-engine protocol: what the training loop needs from whatever samples completions.

An engine takes prompts as token ids and returns, per prompt, n completions with the sampled token ids,
the log-prob of each sampled token under the engine's (temperature-scaled) policy and a finish reason.
After each policy update the loop calls `update_weights(policy)`; engines that share the policy module
(the transformers engine) have nothing to copy, engines with their own copy (vLLM) load the new weights.
`sleep()`/`wake()` bracket the update so a colocated engine can give its memory back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """A rollout engine that cannot start or failed while sampling; the message says why."""


@dataclass(frozen=True)
class SamplingParams:
    n: int
    """Completions per prompt (the group size)."""
    max_new_tokens: int
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Stop strings; a completion ends with (and includes) the first one it produces."""
    seed: int | None = None
    """Prompt i of a `generate` call is sampled from a stream determined by `seed + i` alone: reproducible,
    and independent of the other prompts in the call. None = unseeded."""
    logprobs: bool = True
    """Return each sampled token's log-prob (`Completion.logprobs`). Evaluation does not use them, and vLLM's
    throughput halves when it computes them at a 152k vocabulary (measured on an H100): ask only when used.
    An engine may return [] when False."""


@dataclass
class Completion:
    token_ids: list[int]
    """Sampled tokens, including the EOS token when the completion ended with one."""
    logprobs: list[float]
    """Log-prob of each sampled token under the engine's policy at the sampling temperature."""
    finish_reason: FinishReason
    """`stop`: ended by EOS or a stop string; `length`: hit max_new_tokens (truncated)."""
    text: str
    """Decoded completion, special tokens removed."""


class RolloutEngine(Protocol):
    summary: str
    """One line on what the engine set itself up with (e.g. vLLM's KV-cache size), printed at start-up."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt (token ids), `params.n` completions."""
        ...

    def update_weights(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from the policy's current weights."""
        ...

    def sleep(self) -> None:
        """Release memory the engine does not need during the policy update."""
        ...

    def wake(self) -> None:
        """Undo `sleep` before the next `generate`."""
        ...

    def close(self) -> None: ...


@torch.no_grad()
def is_sharded(tensor: torch.Tensor) -> bool:
    """An FSDP2 shard (a DTensor): its whole value needs `full_tensor()`, a collective."""
    return hasattr(tensor, "full_tensor")


def has_sharded_parameters(module: torch.nn.Module) -> bool:
    return any(is_sharded(p) for p in module.parameters())


def merged_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as (name, tensor) pairs named like the base HF model, for engines that keep their
    own copy. For a PEFT LoRA policy each adapted weight is computed out of place as W + B A * alpha / r, so
    the engine samples from exactly the policy being trained while the trainer's W is never touched (merging
    and unmerging in place would drift W by rounding error every step).

    Lazy: each merged tensor (and a sharded tensor's gathered whole) is made only when the consumer asks for
    it, so a sync holds about one extra tensor at a time, never a second copy of the adapted weights.

        engine_model.load_weights(merged_weights(policy))
    """
    is_peft = hasattr(policy, "peft_config")
    adapted = _adapted_layers(policy) if is_peft else {}
    for name, tensor in policy.state_dict().items():
        if is_sharded(tensor):  # gathered whole, on every rank
            tensor = tensor.full_tensor()
        if is_peft:
            if "lora_" in name:
                continue
            if name in adapted:
                module, active = adapted[name]
                tensor = tensor + sum(module.get_delta_weight(a) for a in active).to(tensor.dtype)
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, tensor


def _adapted_layers(policy: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """State-dict name of each LoRA-adapted base weight -> (its LoRA layer, the active adapters); references
    only, no tensor is computed."""
    layers = {}
    for name, module in policy.named_modules():
        if (
            hasattr(module, "get_delta_weight")
            and hasattr(module, "base_layer")
            and not module.disable_adapters
        ):
            active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
            if active:
                layers[f"{name}.base_layer.weight"] = (module, active)
    return layers
