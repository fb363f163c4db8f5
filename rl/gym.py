"""reasoning-gym tasks as data sources (`gym:countdown`, `gym:gsm_symbolic?difficulty=2`, ...): generated
offline, seeded, in worker processes (the library's generators are slow and not all thread-safe).

Train and test are generated from different seeds (`gym_seed(seed, split)`), and each keeps only the problems
that the hash split of rl/datasets.py assigns to it (`GYM_HELD_OUT_PERCENT` = 50), so an exact duplicate can
never appear in both; duplicates within a split are dropped too.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rl.datasets import held_out, plain_answer
from rl.errors import DataError

GYM_HELD_OUT_PERCENT = 50
"""Share of the hash space reserved for reasoning-gym test problems (each split draws from its own seed)."""
GYM_DEFAULT_ROWS = {"train": 2000, "test": 500}
"""Rows generated when no limit is given."""
GYM_TASK_FIELDS: dict[str, tuple[str, ...]] = {"countdown": ("numbers", "target")}
"""Metadata fields of a reasoning-gym task copied into each row, for rewards that check them."""


def parse_gym_source(source: str) -> tuple[str, dict[str, Any]]:
    """`gym:countdown?min_numbers=3&max_numbers=4` -> `("countdown", {"min_numbers": 3, "max_numbers": 4})`.

    Option values are read as YAML where they parse (numbers, booleans, lists such as `[+, -]`), else
    kept as strings.
    """
    import yaml

    name, _, query = source.removeprefix("gym:").partition("?")
    options = {}
    for part in filter(None, query.split("&")):  # not parse_qsl: it would read `+` as a space
        key, _, value = part.partition("=")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key.strip()] = value
    return name.strip(), options


def gym_row(task: str, item: dict) -> dict:
    """A reasoning-gym item as a row: `prompt`, `answer` and the task's fields (GYM_TASK_FIELDS)."""
    row = {"prompt": item["question"], "answer": plain_answer(item.get("answer"))}
    metadata = item.get("metadata") or {}
    for key in GYM_TASK_FIELDS.get(task, ()):
        row[key] = metadata.get(key)
    return row


def generate_gym(task: str, options: dict, seed: int, start: int, stop: int) -> list[dict]:
    """Items `start..stop-1` of a reasoning-gym task (item i depends only on `seed + i`) as rows."""
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(task, seed=seed, size=stop, **options)
    return [gym_row(task, dataset[i]) for i in range(start, stop)]


def load_gym(source: str, split: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """`limit` (default GYM_DEFAULT_ROWS) distinct problems of a reasoning-gym task for `split` (train|test).

    Offline and deterministic: the same source, split, limit and seed give the same rows. Slow generators
    (Countdown: ~15 ms a problem) run in parallel processes when there are cores to spare.
    """
    task, options = parse_gym_source(source)
    if split not in ("train", "test"):
        raise DataError(f"reasoning-gym tasks have the splits train and test, not {split!r}")
    check_gym_task(task, options)
    wanted = limit or GYM_DEFAULT_ROWS[split]
    task_seed = gym_seed(seed, split)
    rows: list[dict] = []
    seen: set[str] = set()
    keep_rate = GYM_HELD_OUT_PERCENT / 100 if split == "test" else 1 - GYM_HELD_OUT_PERCENT / 100
    index, per_item_s = 0, None
    while len(rows) < wanted:
        if index > 50 * wanted + 10_000:
            raise DataError(
                f"{source} gave only {len(rows)} distinct {split} problems out of {index} generated; ask for "
                "fewer (data.limit) or widen the task's options"
            )
        count = max(16, math.ceil((wanted - len(rows)) / max(keep_rate, 0.05) * 1.1))
        if per_item_s is None:
            count = min(count, 64)  # a first small batch measures how slow the generator is
        started = time.perf_counter()
        batch = _generate(task, options, task_seed, index, index + count, per_item_s)
        if per_item_s is None:
            per_item_s = (time.perf_counter() - started) / count
        kept = 0
        for row in batch:
            text = row["prompt"].strip()
            if text in seen or held_out(text, GYM_HELD_OUT_PERCENT) != (split == "test"):
                continue
            seen.add(text)
            kept += 1
            if len(rows) < wanted:
                rows.append(row)
        index += count
        keep_rate = max(kept / count, 0.01) if kept else keep_rate / 4
    return rows


def gym_seed(seed: int, split: str) -> int:
    """The generator seed of a split: blake2b of `"<seed>:<split>"`, 32 bits.

    reasoning-gym seeds item i with `seed + i`, so seeds 3 and 4 would give the same problems shifted by one;
    hashed seeds are far apart, for the two splits and for neighbouring run seeds.
    """
    return int.from_bytes(hashlib.blake2b(f"{seed}:{split}".encode(), digest_size=4).digest(), "big")


def check_gym_task(task: str, options: dict) -> None:
    """Fail early, with suggestions, on an unknown task or option (before any process starts)."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataError("gym: sources need reasoning-gym: `pip install reasoning-gym`") from None
    import dataclasses

    if task not in DATASETS:
        hint = difflib.get_close_matches(task, list(DATASETS), n=3)
        extra = f"; did you mean {', '.join(hint)}?" if hint else " (see reasoning_gym.factory.DATASETS)"
        raise DataError(f"unknown reasoning-gym task {task!r}{extra}")
    fields = {f.name for f in dataclasses.fields(DATASETS[task][1])} - {"seed", "size"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise DataError(
            f"gym:{task} has no option(s) {', '.join(unknown)}; its options: {', '.join(sorted(fields))}"
        )


_WORKER = (
    "import json, sys; sys.path.insert(0, {root!r}); from rl.gym import generate_gym; "
    "a = json.loads(sys.argv[1]); json.dump(generate_gym(*a), sys.stdout)"
)


def _generate(
    task: str, options: dict, seed: int, start: int, stop: int, per_item_s: float | None
) -> list[dict]:
    """Generate in this process, or split over worker processes when it would take more than a few seconds.

    Workers are fresh interpreters (`python -c`), not forks: the trainer may hold CUDA or OpenMP state that a
    fork must not inherit, and no user `__main__` gets re-imported.
    """
    workers = min(os.cpu_count() or 1, 16, (stop - start) // 200)
    if per_item_s is None or per_item_s * (stop - start) < 5.0 or workers < 2:
        try:
            return generate_gym(task, options, seed, start, stop)
        except Exception as err:  # reasoning-gym asserts on bad option values
            raise DataError(f"reasoning-gym task {task!r} failed with options {options}: {err!r}") from None
    root = str(Path(__file__).resolve().parent.parent)
    bounds = [start + (stop - start) * i // workers for i in range(workers + 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER.format(root=root), json.dumps([task, options, seed, lo, hi])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    rows: list[dict] = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            for other in procs:
                other.kill()
            raise DataError(f"reasoning-gym task {task!r} failed in a worker process:\n{err[-2000:]}")
        rows += json.loads(out)
    return rows
