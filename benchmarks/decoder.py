"""Decode throughput of the transformers engine: aha's Llama-family decoder against transformers' forward.

    python benchmarks/decoder.py                          # 3 shapes, fast vs generic: ~2 min on 2 cores
    python benchmarks/decoder.py --old f941447 --uncapped # + the tuned decoder of that commit: ~5-6 min
    python benchmarks/decoder.py --shapes smollm2-135m --rounds 3 --threads 1 --json out.json
    python benchmarks/decoder.py --quick                  # smoke test: the 3.5M shape, 1 round

Shapes, built locally from a config with random float32 weights and tied embeddings: `bench-3.5m` (the Qwen2
of benchmarks/bench_vs_trl.py), `smollm2-135m` (Llama: hidden 576, 30 layers, 9 heads, 3 KV heads, vocab
49152) and `qwen2.5-0.5b` (Qwen2: hidden 896, 24 layers, 14 heads, 2 KV heads, vocab 151936). Each shape runs
P prompts x G samples with the engine's decoders (`prefill` once per prompt, then `step`), on the same
random token ids for every variant, so that no variant waits on another's sampling. Variants:

    fast                 rollouts/llama_decoder.py: what `rollout.transformers.fast_decoding=true` runs
    generic              transformers' forward and cache: what `fast_decoding=false` runs
    with --old REV, the decoder of rollouts/llama_decoder.py at git revision REV (f941447: before its CPU
    tricks were removed), as it was and without each trick:
    old                  transposed weight copies, fused q/k/v, rms_norm for the norms, rotary table,
                         decode attention by batched products
    old-no-transpose     every projection by its module (q/k/v still one product, of the [out, in] weights)
    old-no-fused-qkv     q, k and v as three products, each by its transposed copy
    old-no-rms-norm      transformers' norm modules instead of one rms_norm call each

The variants take turns step by step (the order rotating every step), each round with fresh decoders, so
that the load of a shared machine falls on all of them alike. It prints, per variant, the median decode
throughput (rows / median step time), its ratio to the first variant's, the medians of one decoder's set-up
(for the old variants including the copies a variant then drops) and of one prefill, the largest logit
difference from the first variant at the last step, and the 10th percentile of the step times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rollouts import hf_engine, llama_decoder  # noqa: E402

# name -> (model type, config, prompts, group, prompt tokens, new tokens)
SHAPES: dict[str, tuple[str, dict, int, int, int, int]] = {
    "bench-3.5m": (
        "qwen2",
        dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048),
        4, 8, 32, 128,
    ),
    "smollm2-135m": (
        "llama",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5),
        4, 8, 32, 64,
    ),
    "qwen2.5-0.5b": (  # few tokens: a decode step reads 2 GB of float32 weights
        "qwen2",
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6),
        2, 8, 32, 16,
    ),
}  # fmt: skip
OLD_VARIANTS = ("old", "old-no-transpose", "old-no-fused-qkv", "old-no-rms-norm")


def build_model(shape: str) -> torch.nn.Module:
    """A random-weight float32 model of `shape`, tied embeddings, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    model_type, settings = SHAPES[shape][:2]
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(0)
    config = config_class(
        **settings, tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=None, eos_token_id=1
    )
    return model_class(config).float().eval()


def load_old_decoder(rev: str) -> types.ModuleType:
    """rollouts/llama_decoder.py as it was at git revision `rev`, as a module of its own."""
    path = "rollouts/llama_decoder.py"
    show = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    module = types.ModuleType(f"llama_decoder_{rev}")
    exec(compile(show.stdout, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def _old_decoder(old: types.ModuleType, name: str, model: torch.nn.Module, batch: int, max_len: int) -> Any:
    """The old decoder for variant `name`, by the attributes it kept its tricks in (transposed, fused_qkv,
    plain_norms)."""
    if name == "old-no-transpose":
        old.TRANSPOSE_MAX_BYTES, cap = 0, old.TRANSPOSE_MAX_BYTES
        try:
            decoder = old.LlamaDecoder(model, batch, max_len)
        finally:
            old.TRANSPOSE_MAX_BYTES = cap
        for layer in decoder.inner.layers:  # q, k and v side by side as [out, in]: no transposed copy
            projections = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
            weight = torch.cat([p.weight.detach() for p in projections]).t()
            bias = None if projections[0].bias is None else torch.cat([p.bias.detach() for p in projections])
            decoder.fused_qkv[layer.self_attn] = (weight, bias)
        return decoder
    decoder = old.LlamaDecoder(model, batch, max_len)
    if name == "old-no-fused-qkv":
        for attn in decoder.fused_qkv:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                bias = None if proj.bias is None else proj.bias.detach()
                decoder.transposed[proj] = (proj.weight.detach().t().contiguous(), bias)
        decoder.fused_qkv = {}
    elif name == "old-no-rms-norm":
        decoder.plain_norms = set()
    return decoder


def make_decoder(
    name: str, model: torch.nn.Module, batch: int, max_len: int, old: types.ModuleType | None
) -> Any:
    """A decoder of variant `name` for `batch` rows of at most `max_len` tokens."""
    if name == "fast":
        return llama_decoder.LlamaDecoder(model, batch, max_len)
    if name == "generic":
        return hf_engine._GenericDecoder(model)
    if old is None:
        raise SystemExit(f"variant {name!r} needs --old REV")
    return _old_decoder(old, name, model, batch, max_len)


@torch.inference_mode()
def measure(shape: str, variants: list[str], rounds: int, old: types.ModuleType | None) -> dict[str, dict]:
    """Per variant: the seconds of every decode step, of each set-up and prefill, and the largest logit
    difference from the first variant after each round's last step."""
    model = build_model(shape)
    _, _, prompts, group, prompt_tokens, new_tokens = SHAPES[shape]
    generator = torch.Generator().manual_seed(1)
    vocab, batch = model.config.vocab_size, prompts * group
    ids = torch.randint(2, vocab, (prompts, prompt_tokens), generator=generator)  # [P, L]
    attention = torch.ones_like(ids)
    tokens = torch.randint(2, vocab, (new_tokens, batch), generator=generator)  # [T, B]
    times = {name: {"step": [], "setup": [], "prefill": [], "diff": []} for name in variants}
    for r in range(rounds + 1):  # round 0 warms up (first calls, the allocator) and is not counted
        decoders, logits = {}, {}
        for name in variants:
            start = time.perf_counter()
            decoders[name] = make_decoder(name, model, batch, prompt_tokens + new_tokens, old)
            built = time.perf_counter()
            logits[name] = decoders[name].prefill(ids, attention, group)  # [B, V]
            if r:
                times[name]["setup"].append(built - start)
                times[name]["prefill"].append(time.perf_counter() - built)
        for t in range(new_tokens if r else 2):
            for name in variants[t % len(variants) :] + variants[: t % len(variants)]:
                start = time.perf_counter()
                logits[name] = decoders[name].step(tokens[t])
                if r:
                    times[name]["step"].append(time.perf_counter() - start)
        for name in variants:
            times[name]["diff"].append((logits[name] - logits[variants[0]]).abs().max().item())
        del decoders, logits
    return times


def report(shape: str, variants: list[str], times: dict[str, dict], seconds: float) -> dict[str, dict]:
    """Print the shape's table; returns its figures."""
    _, _, prompts, group, prompt_tokens, new_tokens = SHAPES[shape]
    rows = prompts * group
    print(
        f"\n{shape}: {prompts} x {group} sequences, {prompt_tokens} + {new_tokens} tokens ({seconds:.0f} s)"
    )
    print(f"  {'variant':17s} {'tok/s':>7s} {'ratio':>6s} {'step ms':>8s} {'setup s':>8s} {'prefill s':>9s} "
          f"{'max|dlogit|':>11s} {'p10 ms':>7s}")  # fmt: skip
    base = rows / statistics.median(times[variants[0]]["step"])
    figures = {}
    for name in variants:
        steps = sorted(times[name]["step"])
        step, p10 = statistics.median(steps), steps[len(steps) // 10]
        setup, prefill = statistics.median(times[name]["setup"]), statistics.median(times[name]["prefill"])
        row = {"tok_per_s": rows / step, "ratio": rows / step / base, "step_s": step, "p10_step_s": p10,
               "setup_s": setup, "prefill_s": prefill, "max_logit_diff": max(times[name]["diff"]),
               "steps_s": times[name]["step"]}  # fmt: skip
        print(f"  {name:17s} {row['tok_per_s']:7.1f} {row['ratio']:5.2f}x {step * 1000:8.1f} {setup:8.2f} "
              f"{prefill:9.2f} {row['max_logit_diff']:11.1e} {p10 * 1000:7.1f}")  # fmt: skip
        figures[name] = row
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--variants", help="comma-separated; the first is the baseline of the ratios")
    parser.add_argument("--old", metavar="REV", help="also run the decoder of this git revision (see above)")
    parser.add_argument("--uncapped", action="store_true", help="old decoder: transposed copies at any size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the 3.5M shape, 1 round")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = load_old_decoder(args.old) if args.old else None
    if old is not None and args.uncapped:
        old.TRANSPOSE_MAX_BYTES = 2**40
    default = [*OLD_VARIANTS, "fast", "generic"] if old is not None else ["fast", "generic"]
    variants = args.variants.split(",") if args.variants else default
    shapes, rounds = (["bench-3.5m"], 1) if args.quick else (args.shapes.split(","), args.rounds)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {rounds} round(s), old decoder: {args.old}")
    figures = {"threads": args.threads, "rounds": rounds, "old": args.old, "uncapped": args.uncapped}
    for shape in shapes:
        start = time.perf_counter()
        times = measure(shape, variants, rounds, old)
        figures[shape] = report(shape, variants, times, time.perf_counter() - start)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
