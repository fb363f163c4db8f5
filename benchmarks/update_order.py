"""Update time with micro-batches taken in length order against as the samples come, on varied lengths.

    python benchmarks/update_order.py [--prompts 4] [--group 8] [--micro 8] [--min-len 16] [--max-len 128]

Random weights sample to the token limit, so bench_vs_trl's completions all have one length and this choice
never shows there. Here the completion lengths are drawn uniformly from [--min-len, --max-len] (R1-Zero-style
runs have wide length spreads within a step). The model is bench_vs_trl's CPU model (Qwen2 shape, 3.5M
parameters, float32, one thread). Both orders alternate on the same samples; it prints the median seconds of
one update (forward, backward, optimizer step) of each and their ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_vs_trl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import rl.update as update
    from rl.config import load_config
    from rl.distributed import Distributed
    from rl.logprobs import CompletionLogprobs
    from rl.trajectory import Trajectory

    torch.set_num_threads(1)
    w = bench_vs_trl.CPU_DEFAULT
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        bench_vs_trl.build_model(w, Path(tmp))
        policy = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    samples = []
    for g in range(args.prompts):
        prompt = [rng.randrange(10, w.vocab) for _ in range(w.prompt_tokens)]
        for _ in range(args.group):
            completion = [rng.randrange(10, w.vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
            samples.append(Trajectory(g, prompt, completion, [0.0] * len(completion), rng.gauss(0, 1), True))
    config = load_config(
        None, [f"train.micro_batch_size={args.micro}", f"rollout.max_new_tokens={args.max_len}"]
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer, dist = CompletionLogprobs(policy), Distributed(torch.device("cpu"))
    length_order = update.micro_batch_order

    def timed(order) -> float:
        update.micro_batch_order = order
        start = time.perf_counter()
        update.update_policy(
            update.Trainee(trainer, policy, None, 0), optimizer, scheduler, samples, config, dist
        )
        return time.perf_counter() - start

    orders = {"as they come": lambda s, _m: s, "length order": length_order}
    times: dict[str, list[float]] = {name: [] for name in orders}
    for order in orders.values():  # warm-up
        timed(order)
    for _ in range(args.repeats):
        for name, order in orders.items():
            times[name].append(timed(order))
    update.micro_batch_order = length_order
    chosen = length_order(samples, args.micro) is not samples
    print(f"{len(samples)} samples, completion lengths {args.min_len}-{args.max_len}, micro-batch {args.micro}; "
          f"micro_batch_order picks {'length order' if chosen else 'as they come'}")  # fmt: skip
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in med.items():
        print(f"  {name:14} {seconds:.3f} s per update (runs: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  as they come / length order: {med['as they come'] / med['length order']:.2f}x")


if __name__ == "__main__":
    main()
