"""What a slow, I/O-bound reward (an HTTP judge) adds to the default run's step: plain and `async def`,
on-policy and with rollout.max_staleness=1, all in one run.

    python benchmarks/slow_rewards.py [--steps 12] [--wait 0.2] [--staleness 0,1,2] [--json PATH]

Each case runs `aha train` (the default recipe, eval off) with the math reward plus, in all but the baseline,
a reward of weight 0 whose every call waits `--wait` seconds (L) and scores 0: `plain` sleeps in a plain
function (aha runs it in a thread), `async` awaits asyncio.sleep in an `async def`. Figures: the median
`perf/step_s` of the steps after the first two, and what the slow reward adds to it, in units of L, against
the baseline of the same schedule measured in the same run (the machines are shared and noisy).
Targets (issue 25): at most 1.5 L per step on-policy, however many groups a step has; under 0.25 L with
rollout.max_staleness=1, where batches are collected and scored beside generation (rl/schedule.py). Sampled
ahead, scoring hides only in the slack: a batch is scored once the engine has generated it, so what is left
on the step is about max(0, generation + L - update) (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WAIT_ENV = "AHA_BENCH_REWARD_WAIT_S"


def slow_plain(prompts: list, completions: list, **columns: object) -> list[float]:
    """A reward that waits like a remote call (in a thread), then scores 0."""
    time.sleep(float(os.environ.get(WAIT_ENV, "0.2")))
    return [0.0] * len(completions)


async def slow_async(prompts: list, completions: list, **columns: object) -> list[float]:
    """The same wait, awaited."""
    await asyncio.sleep(float(os.environ.get(WAIT_ENV, "0.2")))
    return [0.0] * len(completions)


CASES = {"none": None, "plain": "slow_plain", "async": "slow_async"}


def step_time(steps: int, staleness: int, reward: str | None, wait: float, workdir: Path) -> float:
    """Median seconds per step (after the first two) of the default run with the slow reward added."""
    name = f"run-{staleness}-{reward or 'none'}"
    rewards = "[{name: math}" + (f", {{name: 'slow_rewards:{reward}', weight: 0}}" if reward else "") + "]"
    argv = [
        sys.executable,
        "-m",
        "rl.cli",
        "train",
        f"train.steps={steps}",
        "eval.size=0",
        f"run.name={name}",
    ]
    argv += [f"run.dir={workdir}", f"rollout.max_staleness={staleness}", f"rewards={rewards}"]
    argv += [
        "track.console=quiet",
        "track.dashboard=false",
        "track.tensorboard=false",
        "run.save_model=false",
    ]
    path = os.pathsep.join([str(REPO / "benchmarks"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, WAIT_ENV: str(wait)}
    subprocess.run(argv, env=env, cwd=REPO, check=True, capture_output=True)
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["perf/step_s"] for r in rows[2:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--wait", type=float, default=0.2, help="L: seconds each call of the slow reward waits"
    )
    parser.add_argument("--staleness", default="0,1", help="rollout.max_staleness values, comma-separated")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for staleness in [int(k) for k in args.staleness.split(",")]:
            times = {
                case: step_time(args.steps, staleness, fn, args.wait, Path(tmp)) for case, fn in CASES.items()
            }
            label = "on-policy" if staleness == 0 else f"max_staleness={staleness}"
            figures[label] = {"step_s": times}
            print(f"{label}: {times['none']:.2f} s/step without the slow reward", flush=True)
            for case in ("plain", "async"):
                added = (times[case] - times["none"]) / args.wait
                figures[label][f"{case}_added_L"] = added
                print(
                    f"  + {case:5s} reward (L = {args.wait:g} s): {times[case]:.2f} s/step, adds {added:+.2f} L"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
