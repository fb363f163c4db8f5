"""The policy's weights as whole, base-named tensors: what a rollout engine with its own copy (vLLM) loads.

Two things stand between the trained module and those tensors: FSDP2 shards (DTensors, gathered with
`full_tensor()`, a collective) and PEFT LoRA adapters (merged out of place, W + B A * alpha / r). The helpers
that tell a sharded tensor or module apart live here too; the loop (rl/update.py, rl/logprobs.py) and the
transformers engine's decoder use them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch


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
    for name, make in weight_makers(policy):
        yield name, make()


def weight_makers(
    policy: torch.nn.Module, dtype: torch.dtype | None = None, merge: bool = True
) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """`merged_weights` as (name, function that makes the tensor) pairs: listing the names runs no collective,
    each call gathers (FSDP2) and merges (LoRA) one tensor. A rank whose sync failed half-way calls the rest,
    each with its errors caught, so that the other ranks' gathers complete (`rollouts.vllm_engine`).
    `dtype`: the consumer's dtype; a sharded weight without adapters is cast before its gather (a bf16
    engine's sync moves half the bytes of a float32 gather). `merge=False`: a LoRA policy's base weights alone
    (an engine that applies the adapter itself)."""
    is_peft = hasattr(policy, "peft_config")
    adapted = _adapted_layers(policy) if is_peft else {}
    for name, tensor in policy.state_dict().items():
        if is_peft and "lora_" in name:
            continue
        base = name.removeprefix("base_model.model.").replace(".base_layer.", ".") if is_peft else name
        yield base, functools.partial(_whole, tensor, adapted.get(name) if merge else None, dtype)


def _whole(
    tensor: torch.Tensor, adapter: tuple[torch.nn.Module, list[str]] | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    if is_sharded(tensor):  # gathered whole, on every rank
        if dtype is not None and adapter is None:
            tensor = tensor.to(dtype)  # this rank's shard, cast before the gather
        tensor = tensor.full_tensor()
    if adapter is not None:
        module, active = adapter
        tensor = tensor + sum(module.get_delta_weight(a) for a in active).to(tensor.dtype)
    return tensor


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
