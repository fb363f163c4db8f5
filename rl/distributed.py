"""Data parallelism on accelerate: which groups a rank owns, gradient averaging through DDP, metric reduction.

Launched with `accelerate launch --num_processes N -m rl.cli train RECIPE ...` (or torchrun), each rank:
    - takes the same global batch of prompts from an identically seeded sampler and keeps its contiguous slice,
      so a group (all G samples of a prompt) never spans ranks and group advantages stay exact;
    - samples its groups with its own rollout engine (TP=1, colocated), seeded per global prompt position, so
      what a prompt gets does not depend on how many ranks there are;
    - runs forward/backward through a DistributedDataParallel wrapper; loss normalisers (tokens, sequences) are
      global sums, and the loss is scaled by the world size so DDP's gradient mean equals the one-process
      gradient of the whole batch;
    - logs and checkpoints on rank 0 only, after metrics are reduced over ranks.
With `train.sharding: fsdp` the DDP wrapper is replaced by FSDP2 (`torch.distributed.fsdp.fully_shard`, one
group per decoder layer plus a root group for embeddings, final norm and LM head): each rank keeps 1/N of the
weights, gradients and AdamW state, all-gathers a layer for its forward and backward, and reduce-scatters
gradients with the same mean as DDP's all-reduce. Everything that needs whole weights gathers them:
generation from the policy module (`full_weights`, once around a whole generation batch), the weight push to
a vLLM engine (`rl.weights.merged_weights`, one parameter at a time), and checkpoints (`full_state_dict`,
`full_optimizer_state`: rank 0 writes exactly what a single process writes, so a checkpoint resumes on any
number of ranks, sharded or not).
A single process (no launcher) uses none of this: every call below degenerates to a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from rl.errors import AhaError

# How a per-rank metric is combined into the logged one; anything not listed is averaged.
SUMMED = (
    "loss/policy",  # each rank's loss is its share of the global loss
    "rollout/dropped_groups",
    "rollout/trained_groups",
    "perf/rollout_tokens",
    "perf/update_tokens",
)
MAXED_SUFFIXES = ("_max", "_gib")


class Distributed:
    """World size, rank and the few collectives the loop needs. `Distributed()` in a single process is inert."""

    def __init__(self, device: torch.device, sharding: str = "ddp") -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.sharding = sharding
        self.compute_dtype: torch.dtype | None = None
        """FSDP2 gathers weights in this dtype for the forward and backward, and reduces gradients in float32
        (model.compute_dtype; None: in the weights' own dtype). Set before `wrap`."""
        self.accelerator = None
        if self.world > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs, DistributedType

            # The .grad tensors as views into DDP's flat buckets: 4 bytes a parameter for both, not 8
            # (rl/gpu_memory.py); the buckets are allocated after vLLM has sized itself, and stay.
            buckets = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
            self.accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[buckets])
            self.rank = self.accelerator.process_index
            # aha shards the model itself (below), so an accelerate config that asks for FSDP must agree with
            # train.sharding rather than silently train unsharded.
            if self.accelerator.distributed_type == DistributedType.FSDP and sharding != "fsdp":
                raise AhaError(
                    "the accelerate config asks for FSDP (distributed_type: FSDP) but train.sharding is "
                    f"{sharding!r}: add train.sharding=fsdp, or launch with a MULTI_GPU config for DDP"
                )

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Weights, gradients and optimizer state are split over ranks (FSDP2)."""
        return self.enabled and self.sharding == "fsdp"

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global list (its length must divide by the world size)."""
        if not self.enabled:
            return items
        per_rank = len(items) // self.world
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def wrap(self, model: torch.nn.Module, trains: bool = True) -> torch.nn.Module:
        """The module the loop runs forward through: DistributedDataParallel through accelerate (gradients
        averaged over ranks in backward), or sharded in place with FSDP2. A frozen module (`trains=False`,
        the reference model) is only sharded, never DDP-wrapped. Build the optimizer after this call: FSDP2
        replaces the parameters by sharded DTensors."""
        if self.sharded:
            return self._fully_shard(model)
        return self.accelerator.prepare_model(model) if self.enabled and trains else model

    def _fully_shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 on the process group accelerate started: one group per transformer layer (the classes that
        HF models list in `_no_split_modules`), then `model` itself as the root group, which takes what is
        left (embeddings, tied LM head, final norm). `model` must be the module whose forward the loop calls
        (`CompletionLogprobs`), so that FSDP's root hooks run around every forward."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        # Mixed precision: gathered in the compute dtype (half the traffic and memory of float32 gathers, and
        # what autocast would cast to anyway), gradients reduced in float32; the shards stay float32.
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        options = {"mesh": mesh, "mp_policy": policy} if self.compute_dtype else {"mesh": mesh}
        layer_names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
        for module in list(model.modules()):
            if type(module).__name__ in layer_names:
                fully_shard(module, **options)
        fully_shard(model, **options)
        # FSDP2 picks its root at the first forward it sees. Generation calls the HF model, not this wrapper,
        # and would make the first layer a root of its own; initialise from the real root now instead.
        model._get_fsdp_state()._lazy_init()
        return model

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Every rank holds `model`'s whole weights inside the block (sharded models only; a no-op otherwise).

        For sampling from the trainer's own module: one all-gather per layer for the whole generation batch,
        instead of one per layer and per token (FSDP would reshard each layer after each forward). Every rank
        must enter the block, even one that then generates nothing (all-gathers are collective).
        """
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
        layers = [m for m in groups if m is not model]  # the root keeps its own (no reshard after forward)
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
        for m in groups:
            m.unshard()
        try:
            yield
        finally:
            for m in groups:
                m.reshard()
            for m in layers:
                m.set_reshard_after_forward(True, recurse=False)

    def no_sync(self, trainer: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce of a micro-batch that is not the mini-batch's last (DDP). FSDP reduces
        every micro-batch: keeping unsharded gradients until the last one would cost a full gradient copy."""
        return contextlib.nullcontext() if self.sharded or not self.enabled else trainer.no_sync()

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole weights of a sharded model as CPU tensors on rank 0 ({} on the others; every rank must call
        it); None when the model is not sharded (its own state_dict is already whole). Tied weights stay one
        tensor under both names, as in the model."""
        if not self.sharded:
            return None
        from torch.distributed.tensor import DTensor

        first: dict[int, str] = {}
        alias = {  # a tied weight's names -> the first one (the same on every rank)
            name: first.setdefault(id(param), name)
            for name, param in model.named_parameters(remove_duplicate=False)
        }
        full: dict[str, torch.Tensor] = {}
        for name, tensor in model.state_dict().items():
            key = alias.get(name, name)
            if key not in full:  # one all-gather per parameter, in the same order on every rank
                whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                full[key] = whole.detach().cpu() if self.is_main else torch.empty(0)
            full[name] = full[key]
        return full if self.is_main else {}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`optimizer.state_dict()` with sharded state (AdamW's moments) gathered whole, on rank 0: the same
        dict a single process saves. Every rank must call it; the others get empty tensors."""
        state = optimizer.state_dict()
        if not self.sharded:
            return state
        from torch.distributed.tensor import DTensor

        def whole(value: Any) -> Any:
            if not isinstance(value, DTensor):
                return value
            value = value.full_tensor()
            return value.cpu() if self.is_main else torch.empty(0)

        # new dicts: state_dict() shares the per-parameter dicts with the live optimizer
        return {**state, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in state["state"].items()}}

    def shard_optimizer_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """The inverse of `full_optimizer_state`: a saved, whole optimizer state laid out like this rank's
        sharded parameters (each rank loaded the whole file and keeps its shard; no communication)."""
        if not self.sharded:
            return state
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        out = {}
        for i, values in state["state"].items():
            param = params[int(i)]
            out[i] = {
                k: distribute_tensor(
                    v.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                )
                if isinstance(param, DTensor) and torch.is_tensor(v) and v.shape == param.shape
                else v
                for k, v in values.items()
            }
        return {**state, "state": out}

    def sum(self, value: float) -> float:
        return self._reduce(value, "sum")

    def max(self, value: float) -> float:
        return self._reduce(value, "max")

    def _reduce(self, value: float, op: str) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], device=self.accelerator.device)
        return (
            float(self.accelerator.reduce(tensor, reduction="sum"))
            if op == "sum"
            else float(self.accelerator.gather(tensor).max())
        )

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def reduce_metrics(self, row: dict[str, float]) -> dict[str, float]:
        """One logged row from every rank's row: sums for counts, max for maxima, mean for the rest."""
        if not self.enabled:
            return row
        rows = self.gather_objects(row)
        out: dict[str, float] = {}
        for key in rows[0]:
            values = [r[key] for r in rows if key in r]
            if key == "step" or key.startswith("eval/"):
                out[key] = values[0]
            elif key in SUMMED or key.endswith("_tok_s"):
                out[key] = sum(values)
            elif key == "optim/skipped_updates" or key.startswith("alarm/"):
                out[key] = max(values)
            elif key.endswith(MAXED_SUFFIXES) or key.startswith("perf/") and key.endswith("_s"):
                out[key] = max(values)  # a step takes as long as its slowest rank
            else:
                out[key] = sum(values) / len(values)
        return out

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """A phase that may fail on some ranks only (engine start-up, a weight sync, sampling and scoring):
        at its end every rank votes, and if any failed, every rank stops with that news instead of waiting in
        the next collective until the process group times out. A failing rank joins the vote, then raises its
        own error; the others raise AhaError naming it.

        Collectives inside the phase (FSDP's gathers in a weight sync, vLLM's start-up) would pair with a
        failed rank's vote: code that runs them calls `vote_before_collectives()` first, an early vote that
        a rank failing before it meets with its failure vote. Each rank then votes once (failed before the
        early vote, or stopped by it) or twice (the early vote, then at the end or on a later failure)."""
        if not self.enabled:
            yield
            return
        phase = _Phase(self, what)
        _PHASES.append(phase)
        try:
            yield
        except BaseException:
            if not phase.stopped:  # an early vote that saw a failure was this rank's last vote of the phase
                self.gather_objects(self.rank)  # this rank failed
            raise
        finally:
            _PHASES.remove(phase)
        phase.vote()

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()


class _Phase:
    """A `together` phase in progress: its votes (a gather of each rank's failure or None)."""

    def __init__(self, dist: Distributed, what: str) -> None:
        self.dist, self.what, self.stopped = dist, what, False

    def vote(self) -> None:
        failed = [r for r in self.dist.gather_objects(None) if r is not None]
        if failed:
            self.stopped = True
            raise AhaError(
                f"rank {failed[0]} failed while {self.what} (its error is in its output); stopping rank "
                f"{self.dist.rank} too"
            )


_PHASES: list[_Phase] = []  # the `together` phases in progress in this process, innermost last


def vote_before_collectives() -> None:
    """Inside a `together` phase on several ranks, before collectives that a rank which failed earlier in the
    phase would never join (FSDP's per-parameter gathers of a weight sync, vLLM's start-up): every rank votes
    now, and if one failed, the others raise AhaError here instead of blocking in a gather that would pair
    with its vote. A no-op outside a phase or in a single process."""
    if _PHASES:
        _PHASES[-1].vote()
