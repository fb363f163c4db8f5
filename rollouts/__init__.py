"""Rollout engines behind one small protocol (`rollouts.base.RolloutEngine`).

Engines are looked up by name and imported lazily, so the transformers engine never imports vLLM:

    engine = build_engine("transformers", policy=model, tokenizer=tok, model_path="...")
"""

from __future__ import annotations

import importlib
from typing import Any

from rollouts.base import Completion, EngineError, RolloutEngine, SamplingParams

ENGINES: dict[str, str] = {
    "transformers": "rollouts.hf_engine:TransformersEngine",
    "vllm": "rollouts.vllm_engine:VLLMEngine",
}


def engine_class(name: str) -> type:
    """The engine class registered as `name`, imported now (vLLM only when asked for)."""
    if name not in ENGINES:
        raise EngineError(f"unknown rollout engine {name!r}; choose one of: {', '.join(ENGINES)}")
    module_name, class_name = ENGINES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """Import the engine class registered as `name` and build it with `kwargs`."""
    return engine_class(name)(**kwargs)


__all__ = [
    "Completion",
    "EngineError",
    "RolloutEngine",
    "SamplingParams",
    "build_engine",
    "ENGINES",
    "engine_class",
]
