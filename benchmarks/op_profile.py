"""Where a trainer's time goes, operator by operator: torch.profiler self-times summed by kind of operator.

bench_vs_trl's `--profile` runs this around one extra process of each framework, so both trainers get the same
breakdown. Every ATen operator's self-time (CPU time on a CPU, device time on a GPU) falls into one kind:

- matrix products: mm, addmm, bmm, baddbmm (the projections, the LM head, the decode-step attention);
- attention kernels: scaled_dot_product_attention's fused kernels, forward and backward;
- copies and allocation: copy_, fills, cat, indexing, empty tensors, dtype conversions;
- elementwise and reductions: every other ATen operator (norms, rotary, activations, softmax, sampling).

`outside operators` is the profiled seconds minus the operators' self-times: on a CPU, the Python and dispatch
time of the trainer's own code; on a GPU, the time the device is idle waiting for the host. Self-times exclude
children, so nothing is counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl_linear"}
ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")
COPIES = {
    "aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::cat", "aten::index",
    "aten::index_select", "aten::index_put_", "aten::_index_put_impl_", "aten::clone", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::contiguous", "aten::masked_scatter", "aten::stack",
    "aten::repeat_interleave", "aten::gather", "aten::scatter", "aten::scatter_add_", "aten::resize_",
}  # fmt: skip
KINDS = ("matrix products", "attention kernels", "copies and allocation", "elementwise and reductions")


def kind_of(name: str) -> str | None:
    """The kind of the operator called `name`; None for events that are not ATen operators (autograd nodes,
    user ranges), whose time is the framework's."""
    if not name.startswith("aten::"):
        return None
    if name in MATRIX_PRODUCTS:
        return "matrix products"
    if name.startswith(ATTENTION_PREFIXES):
        return "attention kernels"
    if name in COPIES:
        return "copies and allocation"
    return "elementwise and reductions"


def seconds_by_kind(events: Iterable[tuple[str, float]], total_s: float) -> dict[str, float]:
    """{kind: seconds} from (operator name, self seconds) pairs, plus `outside operators`: `total_s` (the
    profiled wall time) minus every operator's time, never below 0."""
    out = dict.fromkeys(KINDS, 0.0)
    for name, seconds in events:
        kind = kind_of(name)
        if kind is not None:
            out[kind] += seconds
    out["outside operators"] = max(0.0, total_s - sum(out.values()))
    return out


class OpProfile:
    """torch.profiler over a trainer's steps after the first `warmup`: the trainer calls `step_end()` at the
    end of every step, and `stop()` once training returns; `seconds_per_step()` then gives the kinds."""

    def __init__(self, cuda: bool, warmup: int) -> None:
        import torch.profiler

        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.cuda, self.warmup = cuda, warmup
        self.profiler = torch.profiler.profile(activities=activities)
        self.ends: list[float] = []  # perf_counter at the end of every step
        self.opened = 0.0  # when the profiled window opened
        if warmup == 0:
            self._open()

    def _open(self) -> None:
        self.opened = time.perf_counter()
        self.profiler.start()

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:
            self._open()

    def stop(self) -> None:
        if self.opened:
            self.profiler.stop()

    def seconds_per_step(self) -> dict[str, float]:
        """{kind: seconds per profiled step}; empty when no step ended after the warm-up."""
        steps = len(self.ends) - self.warmup
        if steps < 1:
            return {}

        def self_us(e: Any) -> float:  # on a GPU, the kernels' device time
            return e.self_device_time_total if self.cuda else e.self_cpu_time_total

        events = [(e.key, self_us(e) / 1e6) for e in self.profiler.key_averages()]
        by_kind = seconds_by_kind(events, self.ends[-1] - self.opened)
        return {k: v / steps for k, v in by_kind.items()}
