"""The default run's step time next to busy processes: quiet, one busy process, two busy processes.

    python benchmarks/under_load.py [--steps 10] [--variants aha,fixed] [--json PATH]

Each case runs `aha train train.steps=N eval.size=0` (the default recipe) in a subprocess while 0, 1 or 2
`python -c 'while True: pass'` processes compete for the cores, and takes the median `perf/step_s` of the
steps after the first. Variants:
    aha        as aha runs by default: threads from the cores other processes leave free (rl/cpu.py)
    fixed      as it ran before: as many threads as cores, whatever else runs
    passive    fixed threads with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep instead of spinning)
Figures are ratios against the quiet step of the same variant, measured in the same run (the machines are
shared and noisy). Target (issue 16): at most 2x with one busy process and 3x with two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "aha": ({}, []),
    "fixed": ({}, [f"train.threads={len(os.sched_getaffinity(0))}"]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, [f"train.threads={len(os.sched_getaffinity(0))}"]),
}


def step_time(steps: int, busy: int, env: dict[str, str], overrides: list[str], workdir: Path) -> dict:
    """Median seconds per step (after the first) of a default run next to `busy` spinning processes."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        name = f"run-{busy}-{len(list(workdir.iterdir()))}"
        argv = [
            sys.executable,
            "-m",
            "rl.cli",
            "train",
            f"train.steps={steps}",
            "eval.size=0",
            f"run.name={name}",
        ]
        argv += [
            f"run.dir={workdir}",
            "track.console=quiet",
            "track.dashboard=false",
            "track.tensorboard=false",
        ]
        argv += ["run.save_model=false", *overrides]
        subprocess.run(argv, env={**os.environ, **env}, cwd=REPO, check=True, capture_output=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    rows = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()][1:]
    return {
        "step_s": statistics.median(r["perf/step_s"] for r in rows),
        "threads": statistics.median(r.get("perf/threads", float("nan")) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="aha,fixed", help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            env, overrides = VARIANTS[variant]
            cases = {busy: step_time(args.steps, busy, env, overrides, Path(tmp)) for busy in (0, 1, 2)}
            figures[variant] = {f"busy{b}": c for b, c in cases.items()}
            quiet = cases[0]["step_s"]
            print(f"{variant}: quiet {quiet:.2f} s/step ({cases[0]['threads']:.0f} threads)", flush=True)
            for busy in (1, 2):
                c = cases[busy]
                ratio = c["step_s"] / quiet
                figures[variant][f"busy{busy}"]["ratio"] = ratio
                print(
                    f"  next to {busy} busy: {c['step_s']:.2f} s/step, {ratio:.2f}x quiet ({c['threads']:.0f} threads)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
