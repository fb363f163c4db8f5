"""Per-step time split (rollout / reward / update / sync) of the tiny end-to-end run.

    python benchmarks/step_split.py [--steps 12] [--model DIR] [--json PATH]

By default it builds the tests' tiny random Qwen2 (2 layers, hidden 64, a locally trained BPE tokenizer),
trains it with the toy `letter_a` reward (4 prompts x 8 samples, 8 new tokens), and prints the median
seconds of each phase over the steps after the first, and each phase's share of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rl.config import load_config  # noqa: E402
from rl.train import train  # noqa: E402
from tests.conftest import TOY_PROMPTS, save_tiny_model  # noqa: E402

PHASES = ("rollout", "reward", "update", "sync")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", help="model directory (default: build the tests' tiny random Qwen2)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("override", nargs="*", help="extra config overrides, e.g. train.threads=1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else save_tiny_model(Path(tmp) / "model")
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": p}) for p in TOY_PROMPTS))
        config = load_config(
            None,
            [
                f"model.path={model}",
                f"data.source={data}",
                "rewards=[{name: 'tests.toy_rewards:letter_a'}]",
                f"train.steps={args.steps}",
                "train.prompts_per_step=4",
                "train.micro_batch_size=16",
                "rollout.group_size=8",
                "rollout.max_new_tokens=8",
                "optim.lr=1e-2",
                f"run.dir={tmp}/runs",
                "track.console=quiet",
                "track.tensorboard=false",
                "track.dashboard=false",
                "eval.size=0",
                "run.save_model=false",
                "track.truncation_alarm=1.0",  # 8 tokens truncate most completions on purpose: no alarm
            ]
            + args.override,
        )
        run_dir = train(config)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    step = statistics.median(r["perf/step_s"] for r in rows)
    figures = {p: statistics.median(r[f"perf/{p}_s"] for r in rows) for p in PHASES}
    print(f"median over steps 2-{args.steps}: {step * 1000:.1f} ms per step")
    for phase, seconds in figures.items():
        print(f"  {phase:<8} {seconds * 1000:8.1f} ms  {seconds / step:6.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"step_s": step, **{f"{p}_s": s for p, s in figures.items()}}))


if __name__ == "__main__":
    main()
