"""Sharing the CPU: torch's threads follow the cores other processes leave free, re-checked every step.

On a machine where other processes want the cores (a test suite, a second run, a notebook), a trainer that
keeps as many threads as cores slows down far more than its fair share: OpenMP's threads spin while they wait
for each other, and a thread that loses its core holds up the rest at every parallel region. Measured on 2
cores (`benchmarks/under_load.py`, docs/benchmarks.md): with 2 fixed threads a step took 3.7x the quiet step
next to one busy process and 5.1x next to two; with the thread count below, 1.5x and 2.0x, at no cost when quiet.

`CpuShare` picks the count from the cores actually free: over the last step, the busy time of the whole machine
(/proc/stat) minus the CPU time of this process and its children (reward workers, an engine process) is what
others used; the threads are the cores left, at least 1 and at most torch's own count. One thread has no
OpenMP team to wait for, so nothing spins. `train.threads` set, or `train.deterministic=true` (whose results
depend on the thread count), fixes the count instead. Tried and dropped: OMP_WAIT_POLICY=PASSIVE, which cost
30-60% of the quiet step (threads sleep and wake at every one of a step's many small parallel regions).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
MIN_INTERVAL_S = 0.2


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores, not idle or waiting for I/O), or None where
    /proc/stat is not there (not Linux)."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is counted in user


def family_seconds(root: int | None = None) -> float:
    """CPU seconds used by process `root` (default: this one) and every live process below it: the reward
    workers and an engine process are this run's own work, not another process's."""
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it exited while we looked
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    family, frontier = set(), [root or os.getpid()]
    while frontier:
        pid = frontier.pop()
        family.add(pid)
        frontier += [child for child, parent in parents.items() if parent == pid and child not in family]
    return sum(seconds.get(pid, 0.0) for pid in family)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for(others_busy: float, cores: int) -> int:
    """Threads to use when other processes keep `others_busy` cores busy on average.

    Example: ``threads_for(0.1, 2)`` -> 2; ``threads_for(0.9, 2)`` -> 1; ``threads_for(2.0, 2)`` -> 1.
    """
    return max(1, min(cores, cores - round(others_busy)))


class CpuShare:
    """Re-picks torch's thread count from the cores other processes leave free, each time `adjust` is called
    (once a step). Inactive (`adjust` returns the fixed count) when `fixed` is set or /proc/stat is missing."""

    def __init__(self, fixed: int | None = None, reserved: int = 0) -> None:
        self.cores = max(1, usable_cores() - reserved)  # `reserved`: cores this process's children keep busy
        self.active = fixed is None and busy_seconds() is not None
        self.threads = fixed or torch.get_num_threads()
        self.limit = min(
            self.threads, self.cores
        )  # never more than torch started with, nor than the cores left
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        return time.monotonic(), busy_seconds() or 0.0, family_seconds() if self.active else 0.0

    def others_busy(self) -> float:
        """Cores other processes kept busy, on average, since the last call."""
        now = self._sample()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)

    def adjust(self) -> int:
        """Set and return the thread count for the next step (unchanged after less than `MIN_INTERVAL_S`: too
        short an interval to measure)."""
        if self.active and time.monotonic() - self._last[0] >= MIN_INTERVAL_S:
            threads = min(self.limit, threads_for(self.others_busy(), self.cores))
            if threads != self.threads:
                torch.set_num_threads(threads)
                self.threads = threads
        return self.threads
