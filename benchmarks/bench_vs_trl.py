"""aha against TRL's GRPOTrainer, side by side in one run, at equal settings.

Both trainers run the same GRPO workload: the same locally built model, prompts, group size, batch, token
limit, learning rate and reward, one optimizer step per generation batch, no KL. Each framework runs in a
fresh subprocess of its own (TRL only ever in its own environment), alternating aha, TRL, aha, TRL, ... for
--rounds rounds, so that the load other processes put on a shared machine falls on both alike. Every
process does --warmup steps, then --steps measured steps; the figures are medians over all measured steps.

    python -m venv --system-site-packages /tmp/trl-venv
    /tmp/trl-venv/bin/pip install -r benchmarks/requirements-trl.txt
    python benchmarks/bench_vs_trl.py --trl-python /tmp/trl-venv/bin/python --json bench.json   # CPU, 2.5-5 min
    python benchmarks/bench_vs_trl.py --trl-python /tmp/trl-venv/bin/python --quick            # smoke, <2 min

    # GPU: the reference workload (Qwen2.5-0.5B shape, 32 prompts x 8, 512 tokens), vLLM colocated for both
    python benchmarks/bench_vs_trl.py --device cuda --engine vllm --trl-python python --json bench-gpu.json

What "seconds per step" means: the time from the end of one optimizer step to the end of the next, as each
trainer runs it (sampling, rewards, advantages, forward/backward, optimizer step, its own metrics and
logging). Each side's own in-step timer is reported beside it (`step_s`: aha's `perf/step_s`; TRL:
`on_step_begin` -> `on_step_end`). The rollout time of TRL is measured by timing its generation method.
See docs/benchmarks.md for the settings, the measured figures and the profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Workload:
    """One benchmark's settings; both trainers get exactly these."""

    hidden: int = 256
    """Model width. The model is a Qwen2 built locally with random weights (tied embeddings)."""
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 704
    vocab: int = 2048
    """A byte-level BPE trained here on generated text; ids it never learnt are filled with synthetic tokens."""
    prompts: int = 4
    """Prompts per optimizer step (P)."""
    group: int = 8
    """Completions per prompt (G); a step trains on P x G completions."""
    max_new_tokens: int = 128
    """Completion token limit. Random weights almost never sample EOS, so completions run to the limit."""
    prompt_tokens: int = 32
    """Every prompt has exactly this many tokens, so the two sides' work does not depend on which prompts
    their samplers draw."""
    micro_batch: int = 16
    """Completions per forward/backward pass; gradients accumulate over P x G / micro_batch passes."""
    lr: float = 1e-6
    temperature: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"
    engine: str = "transformers"
    """Rollout engine: transformers (both trainers sample with the policy module) or vllm (colocated)."""
    vllm_memory: float = 0.3
    max_staleness: int = 0
    """aha's rollout.max_staleness: 1 samples the next batch in a process of its own during the update (one
    more thread: the engine's)."""
    threads: int = 1
    """torch threads in each trainer process; 0 = torch's default (one per core). One by default on CPU: on
    the shared 2-core build machine two threads made a decode step 5x slower than one (they wait on each
    other whenever another process holds a core)."""
    seed: int = 0


CPU_DEFAULT = Workload()
CPU_QUICK = Workload(hidden=128, layers=2, intermediate=352, vocab=1024, max_new_tokens=32, prompt_tokens=16)
# The reference GPU workload: Qwen2.5-0.5B's shape, random bf16 weights.
GPU_REFERENCE = Workload(
    hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, prompts=32, group=8,
    max_new_tokens=512, prompt_tokens=64, micro_batch=16, lr=1e-6, dtype="bfloat16", device="cuda",
    engine="vllm", threads=0,
)  # fmt: skip


def digit_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """The benchmark's reward, TRL's signature: the fraction of a completion's characters that are digits.
    Rule-based, cheap and varied under random weights, so groups have non-zero advantages."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


# ------------------------------------------------------------------------------------------ model and data

WORDS = (
    "the a of to and is in that it for on with as was by at an be this from or which one all were we when "
    "there can an more if will would about how up out them then she many some so these has two like him "
    "what is plus minus times equals answer think step first next verify wait check sum total number left "
    "right each half double count add take"
).split()


def corpus(n: int, rng: random.Random) -> list[str]:
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(f"What is {a} + {b}? {words}. {a} + {b} = {a + b}.")
    return lines


def build_tokenizer(vocab: int, rng: random.Random):
    """A byte-level BPE trained on generated text, padded with synthetic tokens up to `vocab` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 4096),
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(20_000, rng), trainer)
    spec = json.loads(tok.to_str())
    table = spec["model"]["vocab"]
    k = 0
    while len(table) < vocab:  # never produced by encoding, but decodable, so any sampled id has text
        table.setdefault(f"Ġx{k}", len(table))
        k += 1
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model(w: Workload, path: Path) -> dict:
    """Save a random Qwen2 of the workload's shape and its tokenizer to `path`; returns its size."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(w.vocab, random.Random(w.seed))
    torch.manual_seed(w.seed)
    config = Qwen2Config(
        vocab_size=w.vocab,
        hidden_size=w.hidden,
        intermediate_size=w.intermediate,
        num_hidden_layers=w.layers,
        num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads,
        max_position_embeddings=max(2048, 2 * (w.prompt_tokens + w.max_new_tokens)),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype=w.dtype,
    )
    model = Qwen2ForCausalLM(config).to(getattr(torch, w.dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "weight_bytes": params * model.dtype.itemsize, "vocab": len(tokenizer)}


def build_prompts(w: Workload, tokenizer, path: Path, count: int = 256) -> None:
    """`count` prompts of exactly w.prompt_tokens tokens each, as JSONL rows {"prompt": ...}."""
    rng = random.Random(w.seed + 1)
    rows: list[str] = []
    while len(rows) < count:
        text = f"What is {rng.randint(0, 999)} + {rng.randint(0, 999)}?"
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < w.prompt_tokens:
            text += " " + rng.choice(WORDS)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == w.prompt_tokens:
            rows.append(text)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))


# ------------------------------------------------------------------------------------------------ workers
# Each worker (aha's here, TRL's in _trl_worker.py) returns {"steps": [per-step record, ...], ...}. A record: step, interval_s (end of the previous step
# to the end of this one), step_s (the trainer's own step timer), rollout_s, update_s, gen_tokens,
# update_tokens, samples.


def aha_worker(
    w: Workload,
    model_dir: Path,
    data: Path,
    steps: int,
    out_dir: Path,
    step_hook: Callable[[], None] | None = None,
) -> dict:
    import torch
    import transformers

    from rl.config import load_config
    from rl.tracking import Loggers
    from rl.train import train

    logged: list[tuple[float, dict]] = []
    original = Loggers.log

    def timed_log(self, row):  # aha logs once per step, after the step's work
        logged.append((time.perf_counter(), dict(row)))
        if step_hook:  # bench_vs_trl's operator profile
            step_hook()
        return original(self, row)

    Loggers.log = timed_log
    overrides = [
        f"model.path={model_dir}", f"model.dtype={w.dtype}", f"data.source={data}", "data.template=plain",
        "rewards=[{name: 'bench_vs_trl:digit_reward'}]", f"train.steps={steps}", f"train.prompts_per_step={w.prompts}",
        f"rollout.group_size={w.group}", f"rollout.max_new_tokens={w.max_new_tokens}",
        f"rollout.temperature={w.temperature}", f"rollout.engine={w.engine}",
        f"train.micro_batch_size={w.micro_batch}", f"optim.lr={w.lr}", "optim.schedule=constant",
        f"train.device={w.device}", f"train.seed={w.seed}", f"run.dir={out_dir}", "run.name=aha",
        "track.console=quiet", "track.tensorboard=false", "track.dashboard=false", "track.samples_every=100000",
        "eval.size=0", "run.save_model=false", "algorithm.kl_coef=0.0",
    ]  # fmt: skip
    if w.threads:
        overrides.append(f"train.threads={w.threads}")
    if w.max_staleness:
        overrides.append(f"rollout.max_staleness={w.max_staleness}")
    if w.engine == "vllm":
        overrides += [f"rollout.vllm.gpu_memory_utilization={w.vllm_memory}", "rollout.vllm.sleep_level=0"]
    start = time.perf_counter()
    train(load_config(None, overrides))
    records, previous = [], None
    for t, row in logged:
        records.append(
            {
                "step": int(row["step"]),
                "interval_s": t - previous if previous is not None else None,
                "step_s": row["perf/step_s"],
                "rollout_s": row["perf/rollout_s"],
                "update_s": row["perf/update_s"],
                "gen_tokens": row["perf/rollout_tokens"],
                "update_tokens": row["perf/update_tokens"],
                "samples": w.prompts * w.group,
            }
        )
        previous = t
    cuda_peak = torch.cuda.max_memory_allocated() / 2**30 if w.device == "cuda" else None
    return {
        "steps": records,
        "total_s": time.perf_counter() - start,
        "cuda_peak_gib": cuda_peak,
        "threads": torch.get_num_threads(),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }


def worker_main(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    w = Workload(**spec["workload"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # digit_reward, importable as bench_vs_trl:...
    sys.path.insert(0, str(ROOT))
    if args.worker == "aha":
        fn = aha_worker
    else:  # only ever imported in TRL's environment
        from _trl_worker import trl_worker as fn
    call = (w, Path(spec["model"]), Path(spec["data"]), spec["steps"], Path(spec["out_dir"]))
    if spec.get("profile"):  # cProfile (phases, read with pstats) and torch.profiler (operator kinds)
        import cProfile

        from op_profile import OpProfile

        ops = OpProfile(cuda=w.device == "cuda", warmup=spec["warmup"])
        with cProfile.Profile() as prof:
            result = fn(*call, step_hook=ops.step_end)
        ops.stop()
        prof.dump_stats(spec["profile"])
        result["op_s_per_step"] = ops.seconds_per_step()
    else:
        result = fn(*call)
    result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------- orchestration


def run_worker(framework: str, python: str, spec: dict, workdir: Path, device: str) -> dict:
    """One fresh process of `framework`; returns its result plus wall time and peak RSS (from wait4)."""
    spec_path, result_path = workdir / f"{framework}-spec.json", workdir / f"{framework}-result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    launcher = [python]
    if framework == "trl" and device == "cuda":  # TRL's colocated vLLM wants a torch.distributed launch
        launcher = [python, "-m", "torch.distributed.run", "--nproc_per_node=1"]
    cmd = [*launcher, __file__, "--worker", framework, "--spec", str(spec_path), "--result", str(result_path)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    start = time.perf_counter()
    with (workdir / f"{framework}.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    code, wall = os.waitstatus_to_exitcode(status), time.perf_counter() - start
    if code != 0 or not result_path.exists():
        tail = (workdir / f"{framework}.log").read_text()[-3000:]
        sys.exit(f"{framework} worker failed (exit {code}); the end of its log:\n{tail}")
    result = json.loads(result_path.read_text())
    # wait4 sees the child (and the descendants it reaped); the worker's own figure covers a torchrun launch.
    result.update(process_s=wall, peak_rss_gib=max(usage.ru_maxrss / 2**20, result["max_rss_gib"]))
    return result


def summarise(runs: list[dict], warmup: int, w: Workload) -> dict:
    """Medians over the measured steps (after each process's warm-up) of every round."""
    steps = [s for r in runs for s in r["steps"] if s["step"] > warmup]
    med = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    per_step = med("interval_s")
    out = {
        "s_per_step": per_step,
        "own_step_s": med("step_s"),
        "rollout_s": med("rollout_s"),
        "update_s": med("update_s"),
        "samples_per_s": w.prompts * w.group / per_step,
        "gen_tok_per_s": statistics.median(s["gen_tokens"] / s["rollout_s"] for s in steps),
        "update_tok_per_s": statistics.median(s["update_tokens"] / s["update_s"] for s in steps),
        "gen_tokens_per_step": med("gen_tokens"),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
        "round_s_per_step": [statistics.median(s["interval_s"] for s in r["steps"] if s["step"] > warmup) for r in runs],
        "measured_steps": len(steps),
    }  # fmt: skip
    if w.device == "cuda":
        out["cuda_peak_gib"] = max(r["cuda_peak_gib"] for r in runs)
    return out


def measure_cpu_limits(w: Workload, seconds: float = 1.0) -> dict:
    """This machine's limits, measured now with the trainers' thread count: the float32 rate of the update's
    largest matrix product (GFLOP/s; [micro_batch x max_new_tokens, hidden] @ [hidden, intermediate], best
    of repeats) and the read bandwidth of a 512 MiB tensor (GB/s, beyond any cache; best of repeats)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(w.threads or threads)
    try:
        a, b = torch.randn(w.micro_batch * w.max_new_tokens, w.hidden), torch.randn(w.hidden, w.intermediate)
        big = torch.ones(2**27)  # 512 MiB of float32
        best = {"matmul": float("inf"), "read": float("inf")}
        for name, fn in (("matmul", lambda: a @ b), ("read", big.sum)):
            fn()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {
        "matmul_gflops": 2 * a.shape[0] * w.hidden * w.intermediate / best["matmul"] / 1e9,
        "read_gbs": big.numel() * 4 / best["read"] / 1e9,
        "threads": w.threads or threads,
    }


def efficiency(fig: dict, w: Workload, size: dict, peak_flops: float, bandwidth: float) -> dict:
    """How close each trainer's two phases come to the hardware: training MFU and the decode step's floor.

    MFU = 6 * params * tokens trained (prompt + completion) / update seconds / peak FLOP/s.
    A decode step must read every weight once and do 2 * params FLOPs per sequence: it takes at least
    max(weight_bytes / bandwidth, 2 * params * sequences / peak) seconds. Against the measured seconds per
    decode step (rollout seconds / max_new_tokens; completions run to the limit) that gives `decode_fraction`.
    On a GPU the peak and bandwidth are the datasheet's; on a CPU they are measured in the same run.
    """
    trained = fig["update_tok_per_s"] * (1 + w.prompt_tokens / w.max_new_tokens)  # prompt tokens ride along
    sequences = w.prompts * w.group
    bound_s = max(size["weight_bytes"] / bandwidth, 2 * size["params"] * sequences / peak_flops)
    decode_s = fig["rollout_s"] / w.max_new_tokens
    return {
        "mfu": 6 * size["params"] * trained / peak_flops,
        "decode_step_s": decode_s,
        "decode_step_bound_s": bound_s,
        "decode_fraction": bound_s / decode_s,
        "rollout_tok_s_bound": sequences / bound_s,
    }


# Where the time goes, from a cProfile of one process per framework: (phase, file suffix, function).
PHASES = {
    "aha": [
        ("rollout (sampling)", "rollouts/hf_engine.py", "generate"),
        ("rollout (sampling)", "rollouts/vllm_engine.py", "generate"),
        ("rewards", "bench_vs_trl.py", "digit_reward"),
        ("log-prob forward + loss", "rl/logprobs.py", "completion_logprobs"),
        ("backward", "torch/_tensor.py", "backward"),
        ("optimizer step", "torch/optim/adam.py", "step"),
    ],
    "trl": [
        ("rollout (sampling)", "trl/trainer/grpo_trainer.py", "_generate_single_turn"),
        ("rewards", "bench_vs_trl.py", "digit_reward"),
        ("log-prob forward + loss", "trl/trainer/grpo_trainer.py", "compute_loss"),
        ("backward", "torch/_tensor.py", "backward"),
        ("optimizer step", "torch/optim/adam.py", "step"),
    ],
}


def profile_phases(prof_path: Path, framework: str, steps: int) -> dict[str, float]:
    """Seconds per step in each phase (cumulative cProfile time / steps, the warm-up step included)."""
    import pstats

    stats = pstats.Stats(str(prof_path)).stats
    out: dict[str, float] = {}
    for phase, suffix, name in PHASES[framework]:
        seconds = sum(v[3] for (f, _, fn), v in stats.items() if fn == name and f.endswith(suffix))
        out[phase] = out.get(phase, 0.0) + seconds / steps
    return out


ROWS = [  # (label, key, format)
    ("s/step (median)", "s_per_step", "{:.3f}"),
    ("own step timer, s", "own_step_s", "{:.3f}"),
    ("rollout s/step", "rollout_s", "{:.3f}"),
    ("update s/step", "update_s", "{:.3f}"),
    ("samples/s", "samples_per_s", "{:.2f}"),
    ("generated tok/s", "gen_tok_per_s", "{:.0f}"),
    ("update tok/s", "update_tok_per_s", "{:.0f}"),
    ("peak RSS, GiB", "peak_rss_gib", "{:.2f}"),
]


def rows(figs: dict) -> list[tuple[str, str, str]]:
    extra = [("peak GPU memory, GiB", "cuda_peak_gib", "{:.2f}")] if "cuda_peak_gib" in figs["aha"] else []
    return ROWS + extra


def print_table(figs: dict) -> None:
    print(f"\n{'':24}{'aha':>12}{'TRL':>12}{'aha/TRL':>10}")
    for label, key, fmt in rows(figs):
        a, t = figs["aha"][key], figs["trl"][key]
        print(f"{label:24}{fmt.format(a):>12}{fmt.format(t):>12}{a / t if t else float('nan'):>10.2f}")
    speedup = figs["trl"]["s_per_step"] / figs["aha"]["s_per_step"]
    print(f"\naha steps/s over TRL steps/s: {speedup:.2f}x (target >= 2x)")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--trl-python", default=sys.executable, help="Python of the environment that has TRL")
    p.add_argument("--aha-python", default=sys.executable, help="Python of the environment that has aha")
    p.add_argument("--json", help="write every figure and setting to this JSON file")
    p.add_argument("--quick", action="store_true", help="a smaller model and workload, 1 round: a smoke test")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--engine", choices=["transformers", "vllm"], help="default: transformers on CPU, vllm on GPU"
    )
    p.add_argument("--rounds", type=int, help="aha+TRL process pairs (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps at the start of every process")
    p.add_argument("--steps", type=int, help="measured steps per process (default 4, quick 2)")
    p.add_argument(
        "--threads", type=int, help="torch threads per trainer (0 = one per core; default 1 on CPU)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one extra process of each framework: phases, operator kinds",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override Workload fields")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--hbm-tbs", type=float, default=3.35, help="GPU memory bandwidth, TB/s (H100 SXM: 3.35)")
    p.add_argument("--workdir", help="keep models, logs and run dirs here (default: a temporary directory)")
    p.add_argument(
        "--async", dest="with_async", action="store_true", help="also aha with rollout.max_staleness=1"
    )
    p.add_argument("--worker", choices=["aha", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)

    base = GPU_REFERENCE if args.device == "cuda" else CPU_QUICK if args.quick else CPU_DEFAULT
    w = dataclasses.replace(base, device=args.device, engine=args.engine or base.engine)
    if args.threads is not None:
        w = dataclasses.replace(w, threads=args.threads)
    for item in args.set:
        key, value = item.split("=", 1)
        w = dataclasses.replace(w, **{key: type(getattr(w, key))(value)})
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 4)
    if w.prompts * w.group % w.micro_batch:
        sys.exit(
            "prompts x group must be a multiple of micro_batch (one optimizer step per generation batch)"
        )

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, data = workdir / "model", workdir / "prompts.jsonl"
    size = build_model(w, model_dir)
    from transformers import AutoTokenizer

    build_prompts(w, AutoTokenizer.from_pretrained(model_dir), data)
    print(f"settings: {json.dumps(dataclasses.asdict(w))}")
    print(f"model: {size['params'] / 1e6:.2f}M parameters; {rounds} rounds x (aha, TRL), each {args.warmup} "
          f"warm-up + {steps} measured steps; workdir {workdir}")  # fmt: skip

    load_at_start = os.getloadavg()
    runs: dict[str, list[dict]] = {"aha": [], "trl": []}
    variants = [("aha", "aha", args.aha_python, w), ("trl", "trl", args.trl_python, w)]
    if args.with_async:  # aha with rollout.max_staleness=1, a third process per round
        runs["aha_async"] = []
        variants.append(("aha_async", "aha", args.aha_python, dataclasses.replace(w, max_staleness=1)))
    for r in range(rounds):
        for framework, worker, python, workload in variants:
            spec = {
                "workload": dataclasses.asdict(workload), "model": str(model_dir), "data": str(data),
                "steps": args.warmup + steps, "out_dir": str(workdir / f"{framework}-{r}"),
            }  # fmt: skip
            result = run_worker(worker, python, spec, workdir, args.device)
            runs[framework].append(result)
            med = statistics.median(s["interval_s"] for s in result["steps"] if s["step"] > args.warmup)
            print(f"round {r + 1}/{rounds} {framework:3}: {med:.3f} s/step "
                  f"(process {result['process_s']:.0f} s, peak RSS {result['peak_rss_gib']:.2f} GiB)", flush=True)  # fmt: skip

    figs = {k: summarise(v, args.warmup, w) for k, v in runs.items()}
    print_table(figs)
    if "aha_async" in figs:
        a, s, t = (figs[k]["s_per_step"] for k in ("aha_async", "aha", "trl"))
        print(f"aha async (max_staleness=1): {a:.3f} s/step, {s / a:.2f}x aha on-policy, {t / a:.2f}x TRL")
    profile: dict[str, dict[str, float]] = {}
    ops: dict[str, dict[str, float]] = {}
    # Profiled processes are extra ones: cProfile slows Python-heavy code, so they stay out of the figures.
    if args.profile:
        for framework, python in (("aha", args.aha_python), ("trl", args.trl_python)):
            prof = workdir / f"{framework}.prof"
            spec = {
                "workload": dataclasses.asdict(w), "model": str(model_dir), "data": str(data),
                "steps": args.warmup + steps, "out_dir": str(workdir / f"{framework}-profile"), "profile": str(prof), "warmup": args.warmup,
            }  # fmt: skip
            result = run_worker(framework, python, spec, workdir, args.device)
            profile[framework] = profile_phases(prof, framework, args.warmup + steps)
            ops[framework] = result["op_s_per_step"]
        print(f"\ncProfile, seconds per step, warm-up included (pstats files in {workdir}):")
        for phase in dict.fromkeys(p for p, _, _ in PHASES["aha"] + PHASES["trl"]):
            a, t = profile["aha"].get(phase, 0.0), profile["trl"].get(phase, 0.0)
            print(f"  {phase:30}{a:>10.3f}{t:>10.3f}")
        print("torch.profiler, seconds per measured step by kind of operator (benchmarks/op_profile.py):")
        for kind in ops["aha"]:
            print(f"  {kind:30}{ops['aha'][kind]:>10.3f}{ops['trl'][kind]:>10.3f}")
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_start": load_at_start,
            "load_avg_end": os.getloadavg(),
        },
        "versions": {"aha": runs["aha"][0].get("versions"), "trl": runs["trl"][0].get("versions")},
        "settings": dataclasses.asdict(w) | {"rounds": rounds, "warmup": args.warmup, "steps": steps},
        "model": size,
        "figures": figs,
        "ratio_aha_over_trl": {
            k: figs["aha"][k] / figs["trl"][k] for _, k, _ in rows(figs) if figs["trl"][k]
        },
        "speedup_steps_per_s": figs["trl"]["s_per_step"] / figs["aha"]["s_per_step"],
        "trl_prompt_tokens_seen": [r.get("prompt_tokens_seen") for r in runs["trl"]],
        "profile_s_per_step": profile,
        "op_kinds_s_per_step": ops,
        "runs": runs,
    }
    if args.device == "cuda":
        peak, bandwidth = args.peak_tflops * 1e12, args.hbm_tbs * 1e12
    else:
        report["cpu_limits"] = limits = measure_cpu_limits(w)
        peak, bandwidth = limits["matmul_gflops"] * 1e9, limits["read_gbs"] * 1e9
        print(f"\nthis CPU, {limits['threads']} thread(s): {limits['matmul_gflops']:.0f} GFLOP/s float32 matrix "
              f"product, {limits['read_gbs']:.1f} GB/s memory read")  # fmt: skip
    # aha_async's rollout seconds are its waits for a batch sampled ahead: no decode figure to derive from them
    report["efficiency"] = eff = {
        k: efficiency(figs[k], w, size, peak, bandwidth) for k in figs if k != "aha_async"
    }
    for k, e in eff.items():
        print(f"{k:3}: update MFU {e['mfu']:.0%}; decode step {e['decode_step_s'] * 1e3:.2f} ms against a "
              f"floor of {e['decode_step_bound_s'] * 1e3:.2f} ms ({e['decode_fraction']:.0%})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if not args.workdir and not args.profile:  # the model and run dirs; keep them with --workdir
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
