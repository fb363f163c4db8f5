"""Peak memory of one policy-update step: full fine-tuning vs LoRA vs gradient checkpointing.

    python benchmarks/memory.py                                  # CPU, Qwen2.5-0.5B shape, bf16
    python benchmarks/memory.py --device cuda --batch 32 --micro-batch 16 --completion 512   # on a GPU
    python benchmarks/memory.py --modes full,lora --json mem.json
    python benchmarks/memory.py --dtype float32 --compute-dtype bfloat16   # mixed precision

Each mode runs in a fresh process: it builds a model of Qwen2.5-0.5B's shape with random weights (24 layers,
hidden 896, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings), prepares it the way
`aha train` does (`rl.models.prepare_for_training`: LoRA adapters, gradient checkpointing), and runs aha's
own update (`rl.update.update_policy`: log-probs, clipped loss, backward, AdamW step) on one generation batch
of random token sequences (prompt + completion tokens each; GRPO groups of 8 sharing a prompt).

Memory: on CUDA, the allocator's peak during the step (`torch.cuda.max_memory_allocated`) and what was
allocated before it (the weights); on CPU, the process's resident memory sampled every 5 ms during the step
(`/proc/self/statm`), and before it. CPU workers run with glibc's `MALLOC_MMAP_THRESHOLD_=65536`: every
block of 64 KiB or more is mapped on allocation and unmapped when freed, so resident memory is the memory
in use; with glibc's default, freed blocks stay in the heap, and the same LoRA step measured 4.7-5.8 GiB
from run to run instead of one figure every time. The step's own memory is the difference: gradients,
optimizer state (created at the first step) and activations. Figures are printed and, with --json, written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {  # name -> (LoRA rank, gradient checkpointing)
    "full": (0, False),
    "checkpointing": (0, True),
    "lora": (16, False),
    "lora+checkpointing": (16, True),
}
SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)


class RssPeak:
    """Highest resident set size seen by a sampling thread while the context is open (CPU)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> RssPeak:
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def worker(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from rl.config import load_config
    from rl.distributed import Distributed
    from rl.logprobs import CompletionLogprobs
    from rl.models import prepare_for_training
    from rl.trajectory import Trajectory
    from rl.update import Trainee, update_policy

    rank, checkpointing = MODES[spec["mode"]]
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    torch.manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    config = load_config(
        None,
        [
            f"model.dtype={spec['dtype']}",
            f"model.compute_dtype={spec['compute_dtype'] or 'null'}",
            f"model.gradient_checkpointing={str(checkpointing).lower()}",
            f"model.lora.r={rank}",
            f"train.micro_batch_size={spec['micro_batch']}",
            f"rollout.max_new_tokens={spec['completion']}",
            "optim.lr=1e-6",
        ],
    )
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPE), dtype=dtype)
    policy = prepare_for_training(policy, config.model)
    trainer = CompletionLogprobs(policy)
    params = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    generator = torch.Generator().manual_seed(1)
    samples = []
    for g in range(spec["batch"] // 8):
        prompt = torch.randint(3, SHAPE["vocab_size"], (spec["prompt"],), generator=generator).tolist()
        for k in range(8):
            completion = torch.randint(3, SHAPE["vocab_size"], (spec["completion"],), generator=generator)
            samples.append(
                Trajectory(g, prompt, completion.tolist(), [0.0] * spec["completion"], (-1.0) ** k, True)
            )

    def step() -> float:
        start = time.perf_counter()
        update_policy(
            Trainee(trainer, policy, None, 0), optimizer, scheduler, samples, config, Distributed(device)
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds = step()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = RssPeak.now()
        with RssPeak() as sampler:
            seconds = step()
        peak = sampler.peak
    return {
        "mode": spec["mode"],
        "params": params,
        "trainable_params": trainable,
        "before_gib": before / 2**30,
        "peak_gib": peak / 2**30,
        "step_gib": (peak - before) / 2**30,
        "step_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--dtype", default="bfloat16", help="weights and optimizer dtype (model.dtype)")
    parser.add_argument(
        "--compute-dtype",
        help="mixed precision (model.compute_dtype), e.g. --dtype float32 --compute-dtype bfloat16",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (groups of 8)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=256, help="completion tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker(spec)))
        return

    settings = {
        "device": args.device, "dtype": args.dtype, "compute_dtype": args.compute_dtype, "batch": args.batch, "micro_batch": args.micro_batch,
        "prompt": args.prompt, "completion": args.completion, "threads": args.threads,
    }  # fmt: skip
    print(f"Qwen2.5-0.5B shape, random weights; {json.dumps(settings)}")
    print(
        f"{'mode':20}{'params':>10}{'trainable':>12}{'before GiB':>12}{'peak GiB':>10}{'step GiB':>10}{'s':>8}"
    )
    results = []
    env = dict(os.environ)
    if args.device == "cpu":  # resident memory = memory in use (see the module docstring)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            if mode not in MODES:
                sys.exit(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
            spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / f"{mode}.json"
            spec_path.write_text(json.dumps({**settings, "mode": mode, "result": str(result_path)}))
            subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], check=True, env=env)
            r = json.loads(result_path.read_text())
            results.append(r)
            print(f"{mode:20}{r['params'] / 1e6:>9.0f}M{r['trainable_params'] / 1e6:>11.2f}M"
                  f"{r['before_gib']:>12.2f}{r['peak_gib']:>10.2f}{r['step_gib']:>10.2f}{r['step_s']:>8.1f}",
                  flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
