"""The benchmark's efficiency figures, checked by hand (benchmarks/bench_vs_trl.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_vs_trl  # noqa: E402
import op_profile  # noqa: E402


def test_efficiency_reports_mfu_and_the_decode_floor_by_hand():
    w = bench_vs_trl.Workload(prompts=4, group=8, max_new_tokens=128, prompt_tokens=32)
    size = {"params": 1_000_000, "weight_bytes": 4_000_000}
    figures = {"update_tok_per_s": 1000.0, "rollout_s": 0.256}
    # Reading 4 MB at 4 GB/s takes 1 ms, more than the 0.64 ms of 2 x 1e6 x 32 FLOPs at 1e11 FLOP/s.
    eff = bench_vs_trl.efficiency(figures, w, size, peak_flops=1e11, bandwidth=4e9)
    assert eff["mfu"] == pytest.approx(6 * 1e6 * 1000 * 1.25 / 1e11)  # prompt tokens counted: 1 + 32/128
    assert eff["decode_step_s"] == pytest.approx(0.002)
    assert eff["decode_step_bound_s"] == pytest.approx(0.001)
    assert eff["decode_fraction"] == pytest.approx(0.5)
    assert eff["rollout_tok_s_bound"] == pytest.approx(32 / 0.001)
    # When the products take longer than the reads, the floor is the compute.
    eff = bench_vs_trl.efficiency(figures, w, size, peak_flops=1e10, bandwidth=4e9)
    assert eff["decode_step_bound_s"] == pytest.approx(2 * 1e6 * 32 / 1e10)


def test_cpu_limits_are_measured_as_positive_rates():
    w = bench_vs_trl.Workload(hidden=64, intermediate=128, micro_batch=4, max_new_tokens=16, threads=1)
    limits = bench_vs_trl.measure_cpu_limits(w, seconds=0.05)
    assert limits["matmul_gflops"] > 0.1 and limits["read_gbs"] > 0.1 and limits["threads"] == 1


def test_operator_time_is_summed_by_kind_and_the_rest_is_outside_operators():
    events = [
        ("aten::mm", 0.5),
        ("aten::addmm", 0.25),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 0.125),
        ("aten::copy_", 0.0625),
        ("aten::mul", 0.03125),
        ("autograd::engine::evaluate_function: MmBackward0", 9.0),  # not an operator: the framework's time
    ]
    got = op_profile.seconds_by_kind(events, total_s=1.0)
    assert got == {
        "matrix products": 0.75,
        "attention kernels": 0.125,
        "copies and allocation": 0.0625,
        "elementwise and reductions": 0.03125,
        "outside operators": 1.0 - 0.96875,
    }
    assert op_profile.seconds_by_kind([("aten::mm", 2.0)], total_s=1.0)["outside operators"] == 0.0


def test_op_profile_covers_the_steps_after_the_warm_up():
    import torch

    a = torch.randn(256, 256)
    prof = op_profile.OpProfile(cuda=False, warmup=1)
    for step in range(3):
        for _ in range(4 if step == 0 else 1):  # the warm-up step does 4 products, the others 1 each
            a @ a
        prof.step_end()
    prof.stop()
    got = prof.seconds_per_step()
    assert got["matrix products"] > 0
    assert prof.ends[0] <= prof.opened <= prof.ends[1]  # the window opens when the warm-up step ends
    assert sum(got.values()) == pytest.approx((prof.ends[-1] - prof.opened) / 2)
    products = [e for e in prof.profiler.key_averages() if e.key == "aten::mm"]
    assert products[0].count == 2  # the profiled steps' products only
