"""What the vLLM engine (`rollouts.vllm_engine`) needs around `vllm.LLM`: reading its outputs (flat or per-token
log-probs, the KV-cache summary), checking a weight sync (fused shards, vLLM's "not loaded" log), capping the
scheduler, seeds, platform bits and log filters. Kept apart so the engine class reads on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from rollouts.base import EngineError


def request_amx_permission() -> None:
    """Let this process use Intel AMX tiles, which vLLM's bfloat16 CPU attention kernel runs on.

    Linux hands AMX state to a process only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM). vLLM 0.32 run
    in-process does not ask, and its first bfloat16 attention call died with SIGILL (measured on a Xeon with
    AMX). Asking twice is harmless; where AMX does not exist the call just fails.
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts (its max_lora_rank choices) that holds `rank`."""
    return next((r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def prompt_seed(seed: int | None, index: int) -> int | None:
    """The request seed of prompt `index`: a hash of seed + index, the protocol's per-prompt seed.

    Hashing (not seed + index itself) because vLLM seeds the j-th of a request's n samples with seed + j:
    consecutive seeds would make prompts share random streams. Hashing the sum keeps what the protocol
    promises: prompt i's samples depend only on seed + i, so a data-parallel rank whose call starts at
    global position k (seed + k) samples what one process would.
    """
    if seed is None:
        return None
    return int(np.random.SeedSequence(seed + index).generate_state(1)[0])


def describe(err: BaseException) -> str:
    """`Type: message` on one line, cut at 500 characters (vLLM's messages can run to pages)."""
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text[:500]}{'...' if len(text) > 500 else ''}"


def fused_shard_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Run inside vLLM (`LLM.apply_model`): each parameter of a fused layer (the model's
    `packed_modules_mapping`, e.g. qkv_proj -> q_proj, k_proj, v_proj) -> its shards' checkpoint names.

        {"model.layers.0.self_attn.qkv_proj.weight": ["model.layers.0.self_attn.q_proj.weight", ...]}
    """
    packed = getattr(model, "packed_modules_mapping", None) or {}
    fused = {}
    for name, _ in model.named_parameters():
        module, _, leaf = name.replace(".base_layer.", ".").rpartition(".")
        prefix, _, layer = module.rpartition(".")
        if layer in packed:
            fused[name] = [
                f"{prefix}.{shard}.{leaf}" if prefix else f"{shard}.{leaf}" for shard in packed[layer]
            ]
    return fused


def missing_shards(fused: dict[str, list[str]], sent: set[str]) -> list[str]:
    """The shards of fused parameters that received some shards but not all (`sent`: the names the sync
    sent). A fused parameter that received none is in vLLM's own list of weights not loaded."""
    missing = []
    for shards in fused.values():
        if any(s in sent for s in shards):
            missing += [s for s in shards if s not in sent]
    return sorted(missing)


class WeightStream:
    """The sync's (name, tensor) iterator: each tensor made (gathered, merged) when vLLM asks for it and cast
    to the engine's dtype; `names` records what was sent. `drain()` makes the rest, each with its errors
    caught: a rank whose sync failed still joins the other ranks' gathers."""

    def __init__(self, makers: Iterator[tuple[str, Callable[[], torch.Tensor]]], dtype: torch.dtype) -> None:
        self.makers, self.dtype, self.names = iter(makers), dtype, set()

    def __iter__(self) -> WeightStream:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        name, make = next(self.makers)
        tensor = make().detach().to(self.dtype)
        self.names.add(name)
        return name, tensor

    def drain(self) -> None:
        for _, make in self.makers:
            with contextlib.suppress(Exception):
                make()


class UnloadedWeights(logging.Handler):
    """Catches vLLM's "Following weights were not loaded from checkpoint: {...}" during a reload: vLLM only
    logs it, and after a level-2 sleep such a weight holds garbage."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.names: set[str] = set()
        self.logger = logging.getLogger("vllm")

    def emit(self, record: logging.LogRecord) -> None:
        if "were not loaded" in str(record.msg) and record.args:
            names = record.args[0] if isinstance(record.args, tuple) else record.args
            self.names |= {str(n) for n in names} if isinstance(names, set | list | tuple) else {str(names)}

    def __enter__(self) -> UnloadedWeights:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def sampled_logprobs(logprobs: Any, ids: list[int]) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position output: a `FlatLogprobs` (flat lists, each
    position's entries from start_indices[i]; with logprobs=0 the sampled token is the only one) or a list of
    {token id: Logprob} dicts."""
    if hasattr(logprobs, "start_indices"):
        starts, tokens, values = logprobs.start_indices, logprobs.token_ids, logprobs.logprobs
        if any(tokens[s] != t for s, t in zip(starts, ids, strict=True)):
            raise EngineError("vLLM's flat log-probs do not start with the sampled tokens")
        return [float(values[s]) for s in starts]
    return [float(step[tok].logprob) for step, tok in zip(logprobs, ids, strict=True)]


def cap_running_sequences(llm: Any, kwargs: dict[str, Any]) -> int:
    """Decode at most as many sequences at once as the KV cache holds at full length (`max_model_len`), and
    at most `max_num_seqs`: more would only be preempted and recomputed. Sets the in-process scheduler's
    limit (vLLM v1's `Scheduler.max_num_running_reqs`); returns the limit in force."""
    limit = kwargs["max_num_seqs"]
    cache = llm.llm_engine.vllm_config.cache_config
    tokens = (getattr(cache, "num_gpu_blocks", None) or 0) * cache.block_size
    fits = tokens // kwargs["max_model_len"] if kwargs.get("max_model_len") else 0
    if not 0 < fits < limit:
        return limit
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        scheduler.max_num_running_reqs = fits
        if hasattr(scheduler, "max_num_active_reqs"):
            scheduler.max_num_active_reqs = min(scheduler.max_num_active_reqs, fits)
    except AttributeError:  # another vLLM layout: it preempts instead
        return limit
    return fits


def kv_cache_summary(llm: Any, kwargs: dict[str, Any]) -> str:
    """What vLLM made of its memory budget: the KV cache in tokens (and so how many full-length sequences
    fit), with the batch limits that shape its memory profile."""
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None) or 0
    tokens = blocks * cache.block_size
    seqs = tokens / kwargs["max_model_len"] if kwargs.get("max_model_len") else float("nan")
    return (
        f"vLLM engine: KV cache {tokens} tokens ({seqs:.0f} sequences of {kwargs.get('max_model_len')} tokens), "
        f"max_num_seqs {kwargs.get('max_num_seqs')}, max_num_batched_tokens {kwargs.get('max_num_batched_tokens')}"
    )


class DropRotaryReloadWarning(logging.Filter):
    """vLLM warns on every reload that the rotary embedding 'failed to load': it has no weights to load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.getMessage().startswith("RotaryEmbedding") and "Failed to load" in record.getMessage()
        )


def quiet_reload_warnings() -> None:
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, DropRotaryReloadWarning) for f in reload_logger.filters):
        reload_logger.addFilter(DropRotaryReloadWarning())
