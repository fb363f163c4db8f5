"""The vLLM engine's GPU path, on CPU: a stand-in `vllm` module records what the engine asks of vLLM.

What only a GPU shows (placement, sleep memory, CUDA graphs) is `benchmarks/gpu_check.py`'s; here the logic
that decides it: one engine per rank with vLLM's external launcher and a per-rank seed, the batch limits and
float32 logits passed through, FlashInfer's sampler off, log-probs asked for only when used.
"""

from __future__ import annotations

import sys
import threading
import types
from types import SimpleNamespace

import pytest
import torch

from rollouts.base import SamplingParams


class FakeLLM:
    """Records its constructor's kwargs and the sampling params of each generate call."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        FakeLLM.made.append(kwargs)
        self.kwargs, self.sampled = kwargs, []
        cache = SimpleNamespace(num_gpu_blocks=100, block_size=16)
        scheduler = SimpleNamespace(
            max_num_running_reqs=kwargs["max_num_seqs"], max_num_active_reqs=kwargs["max_num_seqs"]
        )
        self.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(dtype=torch.bfloat16),
            vllm_config=SimpleNamespace(cache_config=cache),
            engine_core=SimpleNamespace(engine_core=SimpleNamespace(scheduler=scheduler)),
        )

    def generate(self, requests, sampling, use_tqdm=False):
        self.sampled += sampling

        def logprobs(p):
            if p.logprobs is None:
                return None
            if getattr(
                p, "flat_logprobs", False
            ):  # vLLM's FlatLogprobs: flat lists, one entry a position here
                return FakeFlatLogprobs(start_indices=[0], end_indices=[1], token_ids=[7], logprobs=[-0.5])
            return [{7: SimpleNamespace(logprob=-0.5)}]

        return [
            SimpleNamespace(
                outputs=[
                    SimpleNamespace(index=0, token_ids=[7], finish_reason="length", logprobs=logprobs(p))
                ]
            )
            for p in sampling
        ]


class FakeFlatLogprobs(SimpleNamespace):
    def __len__(self) -> int:
        return len(self.start_indices)


class FakeSamplingParams(SimpleNamespace):
    """vLLM >= 0.26's SamplingParams (a msgspec Struct) lists flat_logprobs among its fields."""

    __struct_fields__ = ("n", "max_tokens", "temperature", "logprobs", "flat_logprobs")


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` package with LLM, SamplingParams, TokensPrompt and a GPU platform."""
    FakeLLM.made = []
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = FakeSamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: False)
    for name, module in (("vllm", vllm), ("vllm.inputs", inputs), ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return vllm


def _engine(tokenizer, **overrides):
    from rollouts.vllm_engine import VLLMEngine

    options = dict(
        policy=torch.nn.Linear(1, 1), tokenizer=tokenizer, model_path="m", dtype="bfloat16", context_len=64,
        seed=3, gpu_memory_utilization=0.3, sleep_level=1, max_model_len=None, enforce_eager=False,
        cpu_kv_cache_gib=1,
    )  # fmt: skip
    return VLLMEngine(**{**options, **overrides})


def test_one_process_builds_one_engine_with_rl_batch_limits_and_float32_logits(fake_vllm, tokenizer):
    engine = _engine(tokenizer)
    (kwargs,) = FakeLLM.made
    assert kwargs["max_num_seqs"] == 256 and kwargs["max_num_batched_tokens"] == 4096  # no loop: vLLM's 256
    assert kwargs["hf_overrides"] == {"head_dtype": "float32"}  # the trainer's logits are float32
    assert "distributed_executor_backend" not in kwargs and kwargs["seed"] == 3
    assert kwargs["enable_sleep_mode"] and kwargs["gpu_memory_utilization"] == 0.3
    assert engine.summary.startswith("vLLM engine: KV cache 1600 tokens (25 sequences of 64 tokens)")


def test_model_dtype_logits_and_other_batch_limits_reach_vllm(fake_vllm, tokenizer):
    _engine(tokenizer, logits_dtype="model", max_num_seqs=64, max_num_batched_tokens=8192)
    (kwargs,) = FakeLLM.made
    assert "hf_overrides" not in kwargs and (kwargs["max_num_seqs"], kwargs["max_num_batched_tokens"]) == (
        64,
        8192,
    )
    _engine(tokenizer, dtype="float32")  # a float32 engine needs no override
    assert "hf_overrides" not in FakeLLM.made[-1]


def test_each_rank_gets_its_own_engine_through_the_external_launcher(fake_vllm, tokenizer, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "5")
    _engine(tokenizer)
    (kwargs,) = FakeLLM.made
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["tensor_parallel_size"] == 1 and kwargs["seed"] == 3 + 5


def test_a_rank_whose_engine_took_another_gpu_fails_at_start_up(fake_vllm, tokenizer, monkeypatch):
    from rollouts import EngineError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # what vLLM's in-process executor did
    with pytest.raises(EngineError, match="left cuda:0 as the current device of the rank with LOCAL_RANK=1"):
        _engine(tokenizer)


def test_flashinfer_sampler_is_off_unless_the_user_set_it(fake_vllm, tokenizer, monkeypatch):
    import os

    _engine(tokenizer)
    assert os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    _engine(tokenizer)
    assert os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "1"


def test_log_probs_are_asked_of_vllm_only_when_used(fake_vllm, tokenizer):
    engine = _engine(tokenizer)
    with_lp = engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=1, seed=0))
    without = engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=1, seed=0, logprobs=False))
    asked = [p.logprobs for p in engine.llm.sampled[-2:]]
    assert asked == [0, None]
    assert with_lp[0][0].logprobs == [-0.5] and without[0][0].logprobs == []


def test_max_num_seqs_defaults_to_a_steps_sequences_per_rank_capped_by_the_kv_cache(fake_vllm, tokenizer):
    from rl.config import load_config
    from rl.distributed import Distributed
    from rl.run import _build_engine

    config = load_config(None, ["rollout.engine=vllm", "train.prompts_per_step=64", "rollout.group_size=8"])
    engine = _build_engine(config, torch.nn.Linear(1, 1), tokenizer, "m", Distributed(torch.device("cpu")))
    assert FakeLLM.made[-1]["max_num_seqs"] == 512  # one wave for the step's 64 x 8 sequences
    # 100 blocks x 16 tokens hold 1600 / 64 = 25 full-length sequences: the scheduler runs at most 25
    engine = _engine(tokenizer, max_num_seqs=512)
    assert (
        engine.running_limit == 25
        and engine.llm.llm_engine.engine_core.engine_core.scheduler.max_num_running_reqs == 25
    )
    assert engine.summary.endswith("decoding at most 25 at once")
    engine = _engine(tokenizer, max_num_seqs=16, context_len=32)  # fewer than fit: as asked
    assert engine.running_limit == 16


def test_log_probs_come_flat_where_vllm_has_flat_logprobs(fake_vllm, tokenizer, monkeypatch):
    engine = _engine(tokenizer)
    got = engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=1, seed=0))
    assert engine.llm.sampled[-1].flat_logprobs is True and got[0][0].logprobs == [-0.5]
    without = engine.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=1, seed=0, logprobs=False))
    assert not hasattr(engine.llm.sampled[-1], "flat_logprobs") and without[0][0].logprobs == []
    monkeypatch.setattr(FakeSamplingParams, "__struct_fields__", ("n", "logprobs"))  # a vLLM before 0.26
    older = _engine(tokenizer)
    got = older.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=1, seed=0))
    assert not hasattr(older.llm.sampled[-1], "flat_logprobs") and got[0][0].logprobs == [-0.5]


def test_the_default_sleep_level_drops_the_weights_as_trls_colocate_mode_does(fake_vllm, tokenizer):
    from rl.config import load_config

    vllm = load_config(None, ["rollout.engine=vllm"]).rollout.vllm
    assert vllm.sleep_level == 2 and vllm.max_num_seqs is None
    engine = _engine(tokenizer, sleep_level=vllm.sleep_level)
    assert FakeLLM.made[-1]["enable_sleep_mode"] and engine.sleep_level == 2


# ---------------------------------------------------------------- the asynchronous engine process on a GPU


def _meta_policy(params: int) -> torch.nn.Module:
    """A policy of `params` parameters that allocates nothing (meta tensors): for the memory plan."""
    policy = torch.nn.Module()
    policy.weight = torch.nn.Parameter(torch.empty(params, device="meta"))
    return policy


def test_the_engine_process_gets_the_next_gpu_or_a_clear_error(monkeypatch):
    from rl.errors import AhaError
    from rollouts.process_engine import engine_device

    plan = dict(dtype="float32", reference=True, lora=False, vllm_utilization=0.3, compute_dtype="bfloat16")
    policy = _meta_policy(494_032_768)  # Qwen2.5-0.5B
    assert engine_device(torch.device("cpu"), None, policy, plan) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert engine_device(torch.device("cuda:0"), None, policy, plan) == "cuda:1"
    with pytest.raises(AhaError, match="trainer is on cuda:1 and no later GPU is visible"):
        engine_device(torch.device("cuda:1"), None, policy, plan)
    with pytest.raises(AhaError, match="expected cuda:N with N < 2"):
        engine_device(torch.device("cuda:0"), "cuda:2", policy, plan)


def test_a_colocated_engine_process_is_refused_when_the_memory_plan_does_not_fit(monkeypatch):
    from rl.errors import AhaError
    from rollouts.process_engine import engine_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=79.6 * 2**30)
    )
    plan = dict(dtype="float32", reference=True, lora=False, vllm_utilization=0.3, compute_dtype="bfloat16")
    # 0.5B: the update (~8 GiB) beside an awake vLLM (23.9 GiB) fits an 80 GB GPU
    assert engine_device(torch.device("cuda:0"), "cuda:0", _meta_policy(494_032_768), plan) == "cuda:0"
    # 3B: the update's 58 GiB with vLLM's 23.9 awake does not: refused, with the arithmetic
    with pytest.raises(AhaError, match=r"never asleep.*do not: weights 11.5"):
        engine_device(torch.device("cuda:0"), "cuda:0", _meta_policy(3_085_938_688), plan)


def test_the_engine_process_sees_its_own_gpu_in_the_parents_numbering(monkeypatch):
    from rollouts.process_engine import _physical_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _physical_gpu(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert _physical_gpu(1) == "5"


def test_publish_synchronises_the_gpu_before_the_engine_loads(monkeypatch):
    from rollouts.process_engine import ProcessEngine

    events = []
    engine = ProcessEngine.__new__(ProcessEngine)
    engine.shared = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    engine.version, engine._unacked = 0, 0
    engine._lock = threading.RLock()  # ProcessEngine's pipe lock (its __init__ is skipped)
    monkeypatch.setattr(engine, "_send", lambda message: events.append(message[0]), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    engine.publish(iter([("w", torch.ones(3))]), 1)
    assert events == ["synchronize", "load"]  # the copies have landed before the engine reads them
    assert engine.shared["w"].dtype == torch.bfloat16 and engine.shared["w"].tolist() == [1, 1, 1]


def test_a_lora_run_asks_vllm_for_lora_and_falls_back_to_merged_weights(fake_vllm, tokenizer, monkeypatch):
    from rl.config import load_config
    from rl.distributed import Distributed
    from rl.run import _build_engine

    def built(*overrides: str):
        config = load_config(None, ["rollout.engine=vllm", *overrides])
        return _build_engine(config, torch.nn.Linear(1, 1), tokenizer, "m", Distributed(torch.device("cpu")))

    engine = built("model.lora.r=12")
    assert engine.lora_adapter and FakeLLM.made[-1]["enable_lora"] and FakeLLM.made[-1]["max_lora_rank"] == 16
    engine = built("model.lora.r=12", "rollout.vllm.lora_sync=merged")
    assert not engine.lora_adapter and "enable_lora" not in FakeLLM.made[-1]
    engine = built()  # no LoRA
    assert not engine.lora_adapter and "enable_lora" not in FakeLLM.made[-1]

    def no_lora(**kwargs):  # a model vLLM cannot apply LoRA to
        if kwargs.get("enable_lora"):
            raise ValueError("Qwen2ForCausalLM does not support LoRA yet.")
        return FakeLLM(**kwargs)

    monkeypatch.setattr(fake_vllm, "LLM", no_lora)
    engine = built("model.lora.r=8")
    assert not engine.lora_adapter and "enable_lora" not in FakeLLM.made[-1]  # merged weights, as before
