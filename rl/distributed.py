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
A single process (no launcher) uses none of this: every call below degenerates to a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch

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

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.accelerator = None
        if self.world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=device.type == "cpu")
            self.rank = self.accelerator.process_index

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        return self.accelerator.device if self.accelerator else None

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global list (its length must divide by the world size)."""
        if not self.enabled:
            return items
        per_rank = len(items) // self.world
        return items[self.rank * per_rank : (self.rank + 1) * per_rank]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel through accelerate (gradients averaged over ranks in backward)."""
        return self.accelerator.prepare_model(model) if self.enabled else model

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

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()
