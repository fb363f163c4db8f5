"""What tool calls cost a rollout: generated tokens per second with and without tools, at equal settings.

    python benchmarks/tool_rollouts.py [--model aha-tiny-tools] [--rounds 3] [--tools calculator python]

Samples the same held-out prompts of `builtin:tool_arithmetic` (16 prompts x 8 samples, up to 48 model tokens,
temperature 1, the same seed) with the transformers engine, plain (`none`: no stop at </calc>, nothing
inserted) and through the multi-turn rollout with each tool (rollouts/multiturn.py: stop at </calc>, run the
calls of the turn at once, insert <out>...</out>, continue from the token prefix). Modes alternate, --rounds
times each; reported per mode: the median wall time, the model's tokens per second (inserted tokens not
counted), calls per completion, and the throughput as a ratio of the plain one's in the same run.

`--model` takes a trained run's `final_model` too: the base model calls rarely, a trained one nearly always, so
the overhead it shows is the one a run pays once the policy has learned to call.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rl.data import load_rows  # noqa: E402
from rl.models import load_tokenizer, resolve_model_path  # noqa: E402
from rollouts import SamplingParams  # noqa: E402
from rollouts.hf_engine import TransformersEngine  # noqa: E402
from rollouts.multiturn import Markers, ToolRollout  # noqa: E402
from rollouts.tools import Toolbox, resolve_tool  # noqa: E402

MARKERS = Markers("<calc>", "</calc>", "<out>", "</out>")


def sample_once(engine, tokenizer, prompts: list[list[int]], tool: str, params: SamplingParams) -> dict:
    """One batch of rollouts in a mode; its wall time, model tokens and calls."""
    if tool != "none":
        toolbox = Toolbox({tool: resolve_tool(tool)}, timeout_s=10.0)
        engine = ToolRollout(engine, tokenizer, toolbox, MARKERS, max_calls=2)
    start = time.perf_counter()
    groups = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    completions = [c for group in groups for c in group]
    model_tokens = sum(len(c.token_ids) - sum(c.tool_mask or []) for c in completions)
    calls = sum(getattr(c, "tool_calls", 0) for c in completions)
    return {"s": seconds, "model_tokens": model_tokens, "calls_per_completion": calls / len(completions)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="aha-tiny-tools")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tools", nargs="+", default=["calculator", "python"])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    tools = [t for t in args.tools if t != "python" or shutil.which("bwrap")]
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = TransformersEngine(policy, tokenizer)
    rows = load_rows("builtin:tool_arithmetic", "test", limit=16)
    prompts = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in rows]
    params = SamplingParams(n=8, max_new_tokens=48, temperature=1.0, seed=0)
    print(f"{args.model}: {len(prompts)} prompts x {params.n}, torch threads {torch.get_num_threads()}")
    runs: dict[str, list[dict]] = {mode: [] for mode in ("none", *tools)}
    sample_once(engine, tokenizer, prompts, "none", params)  # warm-up
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(sample_once(engine, tokenizer, prompts, mode, params))
    figures = {}
    for mode, results in runs.items():
        seconds = statistics.median(r["s"] for r in results)
        tokens = statistics.median(r["model_tokens"] for r in results)
        calls = statistics.mean(r["calls_per_completion"] for r in results)
        figures[mode] = {"s": seconds, "tok_per_s": tokens / seconds, "calls_per_completion": calls}
    for mode, f in figures.items():
        ratio = f["tok_per_s"] / figures["none"]["tok_per_s"]
        print(f"  {mode:10s} {f['s']:6.2f} s  {f['tok_per_s']:7.0f} tok/s  {ratio:5.2f}x of plain  "
              f"{f['calls_per_completion']:.2f} calls/completion")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
