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
weights. On a GPU the same protocol carries CUDA tensors, which torch shares between processes by CUDA IPC
(docs/async.md); only the CPU path is tested here.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.multiprocessing as mp

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
    ) -> None:
        self.shared = {name: tensor.detach().clone().share_memory_() for name, tensor in weights}
        self.version, self._unacked, self._next_id = 0, 0, 0
        self._waiting: dict[int, tuple[int, list[list[Completion]]]] = {}
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        config = getattr(policy, "config", None)
        self._process = context.Process(
            target=_serve,
            args=(child, inner, model_path, config, self.shared, threads, compute_dtype, options or {}),
            daemon=True,
        )
        self._process.start()
        child.close()
        self.summary = (
            f"rollout engine ({inner}) in its own process (pid {self._process.pid}, {threads} thread(s))"
        )

    # ----------------------------------------------------------------------------------- overlapping

    def submit(self, prompts: list[list[int]], params: SamplingParams) -> int:
        """Queue a generation; returns its id for `collect`. It runs after everything sent before it."""
        self._next_id += 1
        self._send(("generate", self._next_id, prompts, params))
        return self._next_id

    def collect(self, request: int) -> tuple[int, list[list[Completion]]]:
        """(the weights version that sampled it, its groups), waiting for it if need be."""
        while request not in self._waiting:
            self._receive()
        return self._waiting.pop(request)

    def publish(self, policy_weights: Iterator[tuple[str, torch.Tensor]], version: int) -> None:
        """Make `version` the weights of every generation submitted from now on: written into the shared copy
        once the engine has loaded the previous one, then loaded by the engine in request order."""
        while self._unacked:
            self._receive()
        with torch.no_grad():
            for name, tensor in policy_weights:
                self.shared[name].copy_(tensor.detach())
        self.version = version
        self._unacked += 1
        self._send(("load", version))

    def label(self, version: int) -> None:
        """Call the engine's current weights `version` (a resumed run starts from version = its step)."""
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
) -> None:
    """The engine process: build the model and engine, then serve requests in order until ("stop",)."""
    try:
        torch.set_num_threads(threads)
        engine, model = _build(inner, model_path, config, shared, options)
        version = 0
        autocast = (
            torch.autocast("cpu", dtype=getattr(torch, compute_dtype))
            if compute_dtype
            else contextlib.nullcontext()
        )
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            if message[0] == "label":
                version = message[1]
            elif message[0] == "load":
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
        with contextlib.suppress(Exception):
            engine.close()
        conn.close()


def _build(
    inner: str, model_path: str, config: Any, shared: dict, options: dict
) -> tuple[Any, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from rl.models import load_tokenizer
    from rollouts import build_engine

    tokenizer = load_tokenizer(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = next(iter(shared.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    _load(model, shared)
    engine = build_engine(inner, policy=model, tokenizer=tokenizer, model_path=model_path, **options)
    return engine, model


@torch.no_grad()
def _load(model: torch.nn.Module, shared: dict[str, torch.Tensor]) -> None:
    """Copy the shared weights into the model's own (by name; a tied embedding arrives under both names)."""
    own = model.state_dict()
    missing = [name for name in own if name not in shared]
    if missing:
        raise EngineError(f"the shared weights lack {missing[:5]}")
    for name, tensor in own.items():
        tensor.copy_(shared[name])
