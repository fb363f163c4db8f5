"""Rollout engines behind one small protocol (`rollouts.base.RolloutEngine`).

Engines are looked up by name and imported lazily, so the transformers engine never imports vLLM:

    engine = build_engine("transformers", policy=model, tokenizer=tok, model_path="...")
"""

from __future__ import annotations

import importlib
from typing import Any

from rollouts.base import Completion, EngineError, RolloutEngine, SamplingParams, merged_weights

ENGINES: dict[str, str] = {
    "transformers": "rollouts.hf_engine:TransformersEngine",
    "vllm": "rollouts.vllm_engine:VLLMEngine",
}
# Engines that sample from the trainer's own policy module rather than a copy: with a sharded policy the loop
# gathers its weights around their `generate`.
SHARES_POLICY = ("transformers",)


def build_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """Import the engine class registered as `name` and build it with `kwargs`."""
    if name not in ENGINES:
        raise EngineError(f"unknown rollout engine {name!r}; choose one of: {', '.join(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(**kwargs)


__all__ = [
    "Completion",
    "EngineError",
    "RolloutEngine",
    "SamplingParams",
    "build_engine",
    "merged_weights",
    "ENGINES",
    "SHARES_POLICY",
]
