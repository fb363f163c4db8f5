"""Sharing the CPU (rl/cpu.py): the thread count from the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rl import cpu
from rl.cpu import CpuShare, family_seconds, threads_for


@pytest.mark.parametrize(
    "others, cores, threads",
    [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (2.0, 2, 1), (3.5, 2, 1), (1.0, 8, 7), (2.6, 8, 5)],
)
def test_threads_are_the_cores_others_leave_free_at_least_one(others, cores, threads):
    assert threads_for(others, cores) == threads


def test_others_busy_is_the_machines_busy_time_less_this_process_family(monkeypatch):
    samples = iter([(0.0, 100.0, 5.0), (2.0, 104.0, 7.0)])  # 2 s: machine busy 4 s, of which ours 2 s
    monkeypatch.setattr(CpuShare, "_sample", lambda self: next(samples))
    share = CpuShare()
    assert share.others_busy() == pytest.approx(1.0)  # one core's worth of other work


def test_adjust_sets_torchs_threads_and_a_fixed_count_never_moves(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu, "MIN_INTERVAL_S", 0.0)
    share = CpuShare()
    share.limit, share.cores = 4, 4
    monkeypatch.setattr(CpuShare, "others_busy", lambda self: 3.0)
    assert share.adjust() == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(CpuShare, "others_busy", lambda self: 0.0)
    assert share.adjust() == 4  # back up, but never past torch's own count (limit)
    fixed = CpuShare(fixed=threads)
    assert not fixed.active and fixed.adjust() == threads


def test_family_seconds_counts_the_cpu_time_of_live_children():
    burn = "import time\nwhile time.process_time() < 0.5: pass\nprint('done', flush=True)\ntime.sleep(60)"
    before = family_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"  # the child has used 0.5 s of CPU and now sleeps
        assert family_seconds() - before >= 0.4
    finally:
        child.kill()
        child.wait()
