"""Throughput of the math and code rewards on this machine.

Prints math-verify checks per second (through the worker pool, distinct answer pairs, so no cache or
string shortcut helps) and sandboxed code-reward programs per second for trivial programs::

    python benchmarks/bench_rewards.py                 # plain lines
    python benchmarks/bench_rewards.py --json out.json # also write the figures as JSON

Worker start-up is excluded from both figures (it happens once per training run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards.code import code_reward  # noqa: E402
from rewards.math import close_pools, default_workers, get_pool, math_reward  # noqa: E402

# (gold, completion answer) templates: fractions, decimals, radicals, intervals, sets, percentages, equations.
_TEMPLATES = [
    ("\\frac{{{a}}}{{{b}}}", "{q:.6f}"),
    ("{a}/{b}", "\\dfrac{{{a2}}}{{{b2}}}"),
    ("\\sqrt{{{s}}}", "{r}\\sqrt{{{t}}}"),
    ("[{a}, {b})", "[{a},{b})"),
    ("\\{{{a}, {b}\\}}", "\\{{{b},{a}\\}}"),
    ("{p}\\%", "{pf}"),
    ("x = {a}", "{a}"),
    ("{a}^\\circ", "{a}"),
    ("({a}, {b})", "({a},{b})"),
    ("{a}\\sqrt{{2}} + {b}", "{b} + \\sqrt{{{a2sq}}}"),
]


def math_cases(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` distinct (gold, completion) pairs, about half of them equal."""
    rng = random.Random(seed)
    golds, completions = [], []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1000, 1999)
        k = rng.randint(2, 9)
        s = rng.choice([8, 12, 18, 20, 27, 45, 50])
        r = {8: 2, 12: 2, 18: 3, 20: 2, 27: 3, 45: 3, 50: 5}[s]
        t = s // (r * r)
        p = rng.randint(1, 99)
        fields = dict(a=a, b=b, a2=a * k, b2=b * k, q=a / b, s=s, r=r, t=t, p=p, pf=p / 100, a2sq=2 * a * a)
        if i % 2:  # every other pair is wrong: the prediction is built from a+1, r+1, p+1
            wrong = dict(
                a=a + 1, a2=(a + 1) * k, q=(a + 1) / b, r=r + 1, pf=(p + 1) / 100, a2sq=2 * (a + 1) ** 2
            )
            pred_fields = {**fields, **wrong}
        else:
            pred_fields = fields
        gold_t, pred_t = _TEMPLATES[(i // 2) % len(_TEMPLATES)]
        gold, pred = gold_t.format(**fields), pred_t.format(**pred_fields)
        golds.append(gold)
        completions.append(f"Thinking... so the answer is \\boxed{{{pred}}}. #{i}")
    return golds, completions


def bench_math(n: int, workers: int) -> dict:
    golds, completions = math_cases(n)
    get_pool(workers).check([("1", "2")] * workers, timeout=120)  # start the workers
    start = time.perf_counter()
    scores = math_reward([""] * n, completions, answer=golds, workers=workers)
    seconds = time.perf_counter() - start
    close_pools()
    return {
        "checks": n,
        "workers": workers,
        "seconds": seconds,
        "per_s": n / seconds,
        "mean": sum(scores) / n,
    }


def bench_code(n: int, workers: int) -> dict:
    completions = [f"```python\ndef f(x):\n    return x + {i}\n```" for i in range(n)]
    tests = [f"assert f(1) == {1 + i}" for i in range(n)]
    code_reward(["q"] * workers, completions[:workers], tests=tests[:workers], workers=workers)  # warm caches
    start = time.perf_counter()
    scores = code_reward(["q"] * n, completions, tests=tests, workers=workers)
    seconds = time.perf_counter() - start
    return {
        "programs": n,
        "workers": workers,
        "seconds": seconds,
        "per_s": n / seconds,
        "mean": sum(scores) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--math-n", type=int, default=400, help="number of math checks")
    parser.add_argument("--code-n", type=int, default=64, help="number of trivial programs")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="math workers / parallel programs"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args()
    math_result = bench_math(args.math_n, args.workers)
    print(f"math: {math_result['per_s']:.1f} checks/s ({args.math_n} checks, {args.workers} workers)")
    code_result = bench_code(args.code_n, args.workers)
    print(
        f"code: {code_result['per_s']:.1f} programs/s ({args.code_n} sandboxed programs, {args.workers} at once)"
    )
    if args.json:
        result = {"math": math_result, "code": code_result, "cpu_count": os.cpu_count()}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
