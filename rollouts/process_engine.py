"""A rollout engine in its own process, so sampling overlaps the policy update (`rollout.max_staleness >= 1`).

The trainer keeps a copy of the policy's weights in shared memory. The engine process (spawned, with its own
torch threads) builds the inner engine (`transformers`, or vLLM) on a model whose weights it copies from
that shared copy, and serves requests in order over a pipe:

    ("generate", id, prompts, params)  ->  ("result", id, version, groups)
    ("load", version)                  ->  ("loaded", version)      copy the shared weights in, sync the engine
    ("label", version)                 the version the current weights are (a resumed run's)
    ("stop",)

Requests are served one at a time, in the order sent, so a weight load never falls inside a generation: every
sequence of a batch comes from one version, which the result carries. The trainer writes the shared copy only
after the engine has acknowledged loading the previous version, so the engine never reads half-written
weights, and on a GPU it synchronises its copies before it sends "load".

On a GPU the engine process has a device of its own (`engine_device`: by default the next visible GPU after the
trainer's; refused when there is none; the trainer's own only when the memory plan fits with the engine awake,
since an engine sampling ahead never sleeps). The shared copy is in host shared memory in the engine's dtype
(bf16 for a bf16 vLLM: half the bytes of the policy's float32, and nothing extra on the trainer's GPU), so the
child can see only its own GPU (CUDA_VISIBLE_DEVICES) and vLLM lands there. A vLLM child builds no model of
its own: each version goes from the shared copy straight into vLLM's weights on its GPU. Tested on CPU; the
device choice and the synchronisation with stand-ins (tests/test_async.py); the GPU run itself: not measured.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.multiprocessing as mp

from rl.errors import AhaError
from rollouts.base import Completion, EngineError, SamplingParams


class ProcessEngine:
    """The rollout protocol on an engine in another process, with `submit`/`collect` for overlapping."""

    shares_policy = False
    batch_size = None
    standalone: dict = {}

    def __init__(
        self,
        inner: str,
        policy: torch.nn.Module,
        model_path: str,
        weights: Iterator[tuple[str, torch.Tensor]],
        threads: int = 1,
        compute_dtype: str | None = None,
        options: dict | None = None,
        device: str = "cpu",
    ) -> None:
        options = dict(options or {})
        # vLLM keeps its own copy in its dtype: share that (bf16 from an fp32 policy); the transformers
        # engine's model takes the policy's own dtype (it samples under autocast in compute_dtype).
        dtype = getattr(torch, options["dtype"]) if inner == "vllm" and options.get("dtype") else None
        if inner == "vllm":
            options["sleep_level"] = 0  # sampling ahead, it never sleeps (on its own GPU it need not)
        self.shared = {
            name: torch.empty(t.shape, dtype=dtype or t.dtype).copy_(t.detach()).share_memory_()
            for name, t in weights
        }  # host shared memory, whatever the policy's device
        self.version, self._unacked, self._next_id = 0, 0, 0
        self._waiting: dict[int, tuple[int, list[list[Completion]]]] = {}
        # Thread-safe: the trainer and a worker thread (rl/schedule.py) call it at once. One thread at a time
        # reads the pipe, and only what is there to read; whatever it reads for another thread's request waits
        # in _waiting. Waiting for a message takes no lock.
        self._lock = threading.RLock()
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        config = getattr(policy, "config", None)
        self._process = context.Process(
            target=_serve,
            args=(child, inner, model_path, config, self.shared, threads, compute_dtype, options, device),
            daemon=True,
        )
        self._process.start()
        child.close()
        self.summary = (
            f"rollout engine ({inner}) in its own process (pid {self._process.pid}, {threads} thread(s), "
            f"{device})"
        )

    # ----------------------------------------------------------------------------------- overlapping

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> int:
        """Queue a generation; returns its id for `collect`. It runs after everything sent before it."""
        with self._lock:
            self._next_id += 1
            self._send(("generate", self._next_id, prompts, params))
            return self._next_id

    def collect(self, request: int) -> tuple[int, list[list[Completion]]]:
        """(the weights version that sampled it, its groups), waiting for it if need be. The wait holds no
        lock: the trainer may publish and submit while a worker thread waits here for a batch."""
        while True:
            with self._lock:
                if request in self._waiting:
                    return self._waiting.pop(request)
                if self._conn.poll(0):
                    self._receive()
                    continue
            self._await_message()

    def _await_message(self) -> None:
        """Wait, without the lock, until there is a message to read (another thread may read it first)."""
        while not self._conn.poll(0.05):
            if not self._process.is_alive():
                raise EngineError(f"the rollout engine process died (exit code {self._process.exitcode})")

    def publish(self, policy_weights: Iterator[tuple[str, torch.Tensor]], version: int) -> None:
        """Make `version` the weights of every generation submitted from now on: written into the shared copy
        once the engine has loaded the previous one, then loaded by the engine in request order."""
        with self._lock:
            while self._unacked:
                self._receive()
            with torch.no_grad():
                for name, tensor in policy_weights:
                    self.shared[name].copy_(tensor.detach())
            if torch.cuda.is_available():  # every copy (and cast) out of the trainer's GPU has landed
                torch.cuda.synchronize()
            self.version = version
            self._unacked += 1
            self._send(("load", version))

    def label(self, version: int) -> None:
        """Call the engine's current weights `version` (a resumed run starts from version = its step)."""
        with self._lock:
            self.version = version
            self._send(("label", version))

    # -------------------------------------------------------------------------------------- protocol

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return self.collect(self.submit(prompts, params))[1]

    def update_weights(self, policy: torch.nn.Module) -> None:
        from rl.weights import merged_weights

        self.publish(merged_weights(policy), self.version + 1)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(("stop",))
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()

    # ------------------------------------------------------------------------------------------ pipe

    def _send(self, message: tuple) -> None:
        if not self._process.is_alive():
            raise EngineError(f"the rollout engine process has exited (exit code {self._process.exitcode})")
        self._conn.send(message)

    def _receive(self) -> None:
        while not self._conn.poll(1.0):
            if not self._process.is_alive():
                raise EngineError(f"the rollout engine process died (exit code {self._process.exitcode})")
        message = self._conn.recv()
        if message[0] == "result":
            self._waiting[message[1]] = (message[2], message[3])
        elif message[0] == "loaded":
            self._unacked -= 1
        elif message[0] == "error":
            raise EngineError(f"the rollout engine process failed: {message[1]}")


def _serve(
    conn: Any,
    inner: str,
    model_path: str,
    config: Any,
    shared: dict[str, torch.Tensor],
    threads: int,
    compute_dtype: str | None,
    options: dict,
    device: str = "cpu",
) -> None:
    """The engine process: build the model and engine, then serve requests in order until ("stop",)."""
    engine = None
    try:
        if device.startswith("cuda"):  # before anything touches CUDA: this process sees its GPU only
            os.environ["CUDA_VISIBLE_DEVICES"] = _physical_gpu(int(device.split(":")[1]))
            os.environ.pop("LOCAL_RANK", None)
        torch.set_num_threads(threads)
        engine, model = _build(inner, model_path, config, shared, options, device)
        version = 0
        kind = "cuda" if device.startswith("cuda") else "cpu"
        autocast = (
            torch.autocast(kind, dtype=getattr(torch, compute_dtype))
            if compute_dtype and inner != "vllm"
            else contextlib.nullcontext()
        )
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            if message[0] == "label":
                version = message[1]
            elif message[0] == "load":
                if not isinstance(model, _SharedWeights):
                    _load(model, shared)
                engine.update_weights(model)
                version = message[1]
                conn.send(("loaded", version))
            else:
                _, request, prompts, params = message
                with autocast:
                    groups = engine.generate(prompts, params)
                conn.send(("result", request, version, groups))
    except Exception:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc(limit=8)))
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.close()
        conn.close()


def _build(
    inner: str, model_path: str, config: Any, shared: dict, options: dict, device: str = "cpu"
) -> tuple[Any, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from rl.models import load_tokenizer
    from rollouts import build_engine

    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if inner == "vllm":  # vLLM loads its own weights; each version goes from the shared copy into them
        model: torch.nn.Module = _SharedWeights(shared, config)
    else:
        dtype = next(iter(shared.values())).dtype
        own = "cuda:0" if device.startswith("cuda") else "cpu"  # the one GPU this process sees
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(own).eval()
        _load(model, shared)
    engine = build_engine(inner, policy=model, tokenizer=tokenizer, model_path=model_path, **options)
    return engine, model


class _SharedWeights(torch.nn.Module):
    """The shared copy as the policy a vLLM engine syncs from: `state_dict()` is the shared tensors (no
    parameters of its own, nothing copied), `config` the model's."""

    def __init__(self, shared: dict[str, torch.Tensor], config: Any) -> None:
        super().__init__()
        self._shared, self.config = shared, config

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._shared)


def _physical_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's GPU `index` (the parent's numbering)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def engine_device(trainer: torch.device, setting: str | None, policy: torch.nn.Module, plan: dict) -> str:
    """Where the engine process runs: "cpu" beside a CPU trainer; on a GPU, `setting` ("cuda:N") or by default
    the next visible GPU after the trainer's. No other GPU is an error that says what to do; the trainer's own
    GPU (colocated) only if the memory plan fits with the engine awake through the update (it samples ahead
    and never sleeps). `plan`: plan_memory's arguments for this run other than the parameter counts."""
    if trainer.type != "cuda":
        return "cpu"
    own = trainer.index if trainer.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if setting is None:
        if own + 1 >= count:
            raise AhaError(
                f"rollout.max_staleness >= 1 on a GPU runs the engine process on a GPU of its own, but the trainer "
                f"is on cuda:{own} and no later GPU is visible ({count} visible): make one visible "
                "(CUDA_VISIBLE_DEVICES), set rollout.vllm.process_device=cuda:N, or use max_staleness=0 (the "
                "colocated on-policy loop, where vLLM sleeps during the update)"
            )
        return f"cuda:{own + 1}"
    if not setting.startswith("cuda:") or not setting[5:].isdigit() or int(setting[5:]) >= count:
        raise AhaError(
            f"rollout.vllm.process_device={setting!r}: expected cuda:N with N < {count} (visible GPUs)"
        )
    if int(setting[5:]) == own:
        _check_colocated(policy, trainer, plan)
    return setting


def _check_colocated(policy: torch.nn.Module, trainer: torch.device, plan: dict) -> None:
    from rl.gpu_memory import GIB, HEADROOM_FRACTION, plan_memory

    params = [p for p in policy.parameters()]
    total = torch.cuda.get_device_properties(trainer).total_memory / GIB
    lora = sum(p.numel() for p in params if p.requires_grad) if plan.get("lora") else 0
    memory = plan_memory(
        sum(p.numel() for p in params) - lora, total, lora_params=lora, sleep_level=0,
        largest=max(p.numel() for p in params), **{k: v for k, v in plan.items() if k != "lora"},
    )  # fmt: skip
    if not memory.fits:
        raise AhaError(
            f"rollout.vllm.process_device is the trainer's GPU, where the engine process (never asleep) and the "
            f"update must fit together, and they do not: {memory.describe()} (more than "
            f"{1 - HEADROOM_FRACTION:.0%}). Give the engine its own GPU, lower rollout.vllm.gpu_memory_utilization, "
            "or use max_staleness=0"
        )


@torch.no_grad()
def _load(model: torch.nn.Module, shared: dict[str, torch.Tensor]) -> None:
    """Copy the shared weights into the model's own (by name; a tied embedding arrives under both names)."""
    own = model.state_dict()
    missing = [name for name in own if name not in shared]
    if missing:
        raise EngineError(f"the shared weights lack {missing[:5]}")
    for name, tensor in own.items():
        tensor.copy_(shared[name])
