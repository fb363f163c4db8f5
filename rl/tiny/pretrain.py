"""Pretrain aha's tiny base models on synthetic arithmetic, and measure how they behave.

    python -m rl.tiny.pretrain --threads 1 --p-direct 0.7 --stop-at 1500   # the shipped rl/tiny/model
    python -m rl.tiny.pretrain --task tools --threads 1 --steps 1500   # the shipped rl/tiny/tools_model
    python -m rl.tiny.pretrain --eval rl/tiny/model   # only measures a model on held-out problems

Two tasks (docs/tiny-model.md). `arithmetic` (aha-tiny, `rl.tiny.arithmetic`): each problem's prompt is followed
by the direct answer with probability `p_direct`, otherwise by the step-by-step derivation. `tools`
(`rl.tiny.tools_task`): with probability `p_tool` a calculator call, its output and the answer copied from it;
with `p_worked` the sum restated, then the answer; else the direct answer. The text is generated on the fly
from the task's train split, each completion ending in EOS. The loss is next-token cross-entropy on the
completion only (the prompt's random terms carry nothing to learn), less the calculator's `<out>...</out>` spans (the model reads them, it never writes them).
aha-tiny mostly guesses (short, usually wrong) and sometimes reasons (long, nearly always right); the tools model
mostly guesses and sometimes calls the calculator (nearly always right): the starts from which RL with a
correctness reward can make reasoning, or tool use, win.

Deterministic given the seed and the thread count (float sums are ordered differently with other counts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rl.models import load_tokenizer
from rl.tiny import arithmetic, tools_task
from rl.tiny.tools_eval import evaluate_tools, final_answer, generate

DEFAULT_OUT = Path(__file__).parent / "model"
TOOLS_OUT = Path(__file__).parent / "tools_model"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
"""aha-tiny's tags; the tools model adds `rl.tiny.tools_task.TOOL_TAGS`."""
CHARACTERS = list("0123456789+-*= ")
MAX_POSITIONS = 256
"""Longest sequence (prompt + completion) the model is configured for; pretraining uses at most ~80."""


def tag_pattern(tags: Sequence[str]) -> str:
    """The pre-tokenizer's regex: each tag whole, else one character. Tags come in pairs <name> and </name>.

    Example: tag_pattern(["<think>", "</think>", "<out>", "</out>"]) -> "</?(?:think|out)>|[\\s\\S]"
    """
    matches = [re.fullmatch(r"</?([a-z]+)>", tag) for tag in tags]
    names = list(dict.fromkeys(match.group(1) for match in matches if match))
    if None in matches or sorted(tags) != sorted(
        f"{close}{name}>" for name in names for close in ("<", "</")
    ):
        raise ValueError(f"tags must be pairs <name> and </name>, each once: {list(tags)}")
    return rf"</?(?:{'|'.join(names)})>|[\s\S]"


def build_tokenizer(tags: Sequence[str] = tuple(TAG_TOKENS)) -> PreTrainedTokenizerFast:
    """Character-level tokenizer; each tag is a single token. Decoding gives back the exact text.

    Ids: the special tokens, the tags in the given order, the characters. The default (aha-tiny's tags) is the
    tokenizer shipped in rl/tiny/model; the tools model's adds <calc> </calc> <out> </out>.

    Example: "12+3=<answer>15</answer>" -> ["1", "2", "+", "3", "=", "<answer>", "1", "5", "</answer>"]
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(tags) + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(tag_pattern(tags)), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens as they are: no spaces between characters
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",  # prompts are left-padded for generation
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """save_pretrained, naming the class that transformers 4.x also knows (5.x writes "TokenizersBackend")."""
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


@dataclass
class PretrainArgs:
    """Pretraining settings; each field is also a command-line flag (--batch-size for batch_size)."""

    task: str = field(
        default="arithmetic",
        metadata={
            "help": "arithmetic (aha-tiny: direct answers or derivations) or tools (direct or calculator)."
        },
    )
    out: str = field(
        default="",
        metadata={
            "help": "Directory the model, tokenizer and generation config are written to; empty: the task's "
            "shipped directory (rl/tiny/model, rl/tiny/tools_model)."
        },
    )
    steps: int = field(default=1800, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=128, metadata={"help": "Problems (prompt + completion) per step."})
    lr: float = field(
        default=3e-3,
        metadata={"help": "Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth of it)."},
    )
    warmup: int = field(default=100, metadata={"help": "Warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    p_direct: float = field(
        default=0.75,
        metadata={
            "help": "arithmetic: probability that a problem in the text is followed by the direct answer (else "
            "the derivation)."
        },
    )
    p_tool: float = field(
        default=0.1,
        metadata={"help": "tools: probability that a problem in the text is followed by a calculator call."},
    )
    p_worked: float = field(
        default=0.4,
        metadata={"help": "tools: probability that a problem is followed by the sum restated (else direct)."},
    )
    hidden: int = field(default=128, metadata={"help": "Hidden size (the MLP is 4x wider)."})
    layers: int = field(default=4, metadata={"help": "Transformer layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    seed: int = field(default=0, metadata={"help": "Seed of the initial weights and of the generated text."})
    threads: int = field(default=2, metadata={"help": "torch CPU threads."})
    stop_at: int = field(
        default=0,
        metadata={
            "help": "Stop (and save) after this many steps of the `steps`-long schedule; 0 = all of them."
        },
    )


def build_model(args: PretrainArgs, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A small Qwen2 (Qwen2.5's architecture, so every engine that runs Qwen runs it), randomly initialized."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


Example = tuple[str, str, str]
"""One problem of the pretraining text: (prompt, completion without EOS, style)."""


def draw_arithmetic(rng: random.Random, args: PretrainArgs) -> Example:
    """Example: ("12+35+48+23+67+50=", "<answer>235</answer>", "direct")."""
    problem = arithmetic.random_problem(rng, "train")
    if rng.random() < args.p_direct:
        return problem.prompt, arithmetic.format_direct(problem), "direct"
    return problem.prompt, arithmetic.format_reasoning(problem), "reasoning"


def draw_tools(rng: random.Random, args: PretrainArgs) -> Example:
    """Example: ("1234+5678+90123=", "<calc>1234+5678+90123</calc><out>97035</out><answer>97035</answer>", "tool")."""
    problem = tools_task.random_problem(rng, "train")
    draw = rng.random()
    if draw < args.p_tool:
        return problem.prompt, tools_task.format_tool_call(problem), "tool"
    if draw < args.p_tool + args.p_worked:
        return problem.prompt, tools_task.format_worked(problem), "worked"
    return problem.prompt, tools_task.format_direct(problem), "direct"


@dataclass(frozen=True)
class TinyTask:
    """What pretraining needs of a task: its tokenizer's tags, where its model ships, how to draw its text."""

    tags: tuple[str, ...]
    out: Path
    draw: Callable[[random.Random, PretrainArgs], Example]
    styles: tuple[str, ...]
    """Completion styles, in the order a step's chunks are run (the order gradients are summed in)."""


TASKS = {
    "arithmetic": TinyTask(tuple(TAG_TOKENS), DEFAULT_OUT, draw_arithmetic, ("direct", "reasoning")),
    "tools": TinyTask(
        (*TAG_TOKENS, *tools_task.TOOL_TAGS), TOOLS_OUT, draw_tools, ("direct", "worked", "tool")
    ),
}

_TOOL_OUTPUT = re.compile(f"({re.escape(tools_task.OUT_OPEN)}.*?{re.escape(tools_task.OUT_CLOSE)})")


def encode_example(
    tokenizer: PreTrainedTokenizerFast, prompt: str, completion: str
) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + EOS, and a loss mask: 1 on the completion's tokens and EOS, except
    a calculator's output span `<out>...</out>` (inserted by the tool at RL time: read, never written).

    Example: "1+2=", "<calc>1+2</calc><out>3</out><answer>3</answer>" -> mask
    0 0 0 0 | 1 (<calc>) 1 1 1 1 (</calc>) | 0 (<out>) 0 0 (</out>) | 1 (<answer>) 1 1 (</answer>) 1 (EOS)
    """
    ids = tokenizer.encode(prompt)
    mask = [0] * len(ids)
    for segment in _TOOL_OUTPUT.split(completion):
        segment_ids = tokenizer.encode(segment)
        ids += segment_ids
        mask += [0 if _TOOL_OUTPUT.fullmatch(segment) else 1] * len(segment_ids)
    return ids + [tokenizer.eos_token_id], mask + [1]


def make_batch(
    rng: random.Random, tokenizer: PreTrainedTokenizerFast, args: PretrainArgs
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One step's text (`args.batch_size` problems of `args.task`), as a right-padded chunk per completion
    style, so short ones are not padded long.

    Each chunk is (token ids [b, T], loss mask [b, T]: 1 on the completion tokens that are trained, see
    `encode_example`).
    """
    task = TASKS[args.task]
    by_style: dict[str, list[tuple[list[int], list[int]]]] = {style: [] for style in task.styles}
    for _ in range(args.batch_size):
        prompt, completion, style = task.draw(rng, args)
        by_style[style].append(encode_example(tokenizer, prompt, completion))
    chunks = []
    for rows in by_style.values():
        if not rows:
            continue
        width = max(len(row) for row, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # [b, T]
        mask = torch.zeros((len(rows), width))  # [b, T]
        for i, (row, row_mask) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = torch.tensor(row_mask, dtype=mask.dtype)
        chunks.append((ids, mask))
    return chunks


def pretrain(args: PretrainArgs) -> Path:
    """Train the tiny model from scratch; save weights (safetensors), tokenizer and generation config."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; tasks: {', '.join(TASKS)}")
    tokenizer = build_tokenizer(TASKS[args.task].tags)
    model = build_model(args, tokenizer)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {args}", flush=True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95)
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    start = time.perf_counter()
    model.train()
    for step in range(args.stop_at or args.steps):
        chunks = make_batch(rng, tokenizer, args)
        n_tokens = sum(mask[:, 1:].sum() for _, mask in chunks)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for ids, mask in chunks:  # [b, T], [b, T]
            logits = model(input_ids=ids).logits[:, :-1]  # [b, T-1, V]; right padding needs no attention mask
            token_loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, T-1]
            chunk_loss = (token_loss * mask[:, 1:]).sum() / n_tokens  # a token mean over the whole step
            chunk_loss.backward()
            loss += chunk_loss.item()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == (args.stop_at or args.steps) - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  loss {loss:.4f}  lr {lr_at(step):.2e}  {elapsed:5.0f}s", flush=True)
    elapsed = time.perf_counter() - start
    print(f"pretraining took {elapsed:.0f}s ({elapsed / 60:.1f} min) on {args.threads} threads", flush=True)

    out = Path(args.out or TASKS[args.task].out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
    )
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    record = asdict(args) | {"out": None, "seconds": round(elapsed), "torch": torch.__version__}
    (out / "pretrain_args.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {out}")
    return out


@torch.no_grad()
def evaluate_styles(
    model_dir: str | Path,
    n: int = 200,
    seed: int = 0,
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
) -> dict[str, float]:
    """Sample `samples` completions for each of n held-out (test-split) problems and describe them.

    temperature 0 means greedy. Returns the fraction of completions that reason (contain <think>), the
    accuracy of direct completions and of reasoning ones, overall accuracy, the mean completion length in
    tokens (EOS counted) of each style and overall, and the fraction cut off by max_new_tokens.

    Example: evaluate_styles("rl/tiny/model") -> {"reasoning_fraction": 0.25, "direct_accuracy": 0.15, ...}
    """
    tokenizer = load_tokenizer(model_dir)  # AutoTokenizer would swap in Qwen2's, which drops the tags
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = arithmetic.make_problems("test", n, seed=seed)
    prompts = [row["prompt"] for row in rows for _ in range(samples)]
    answers = [row["answer"] for row in rows for _ in range(samples)]
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    completions = generate(model, tokenizer, prompts, [eos], max_new_tokens, temperature)  # cut after EOS
    correct: dict[str, list[float]] = {"reasoning": [], "direct": []}
    lengths: dict[str, list[float]] = {"reasoning": [], "direct": []}
    truncated = 0
    for ids, answer in zip(completions, answers, strict=True):
        truncated += eos not in ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        style = "reasoning" if "<think>" in text else "direct"
        correct[style].append(float(final_answer(text) == answer))
        lengths[style].append(float(len(ids)))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "reasoning_fraction": len(correct["reasoning"]) / len(answers),
        "direct_accuracy": mean(correct["direct"]),
        "reasoning_accuracy": mean(correct["reasoning"]),
        "accuracy": mean(correct["direct"] + correct["reasoning"]),
        "direct_length": mean(lengths["direct"]),
        "reasoning_length": mean(lengths["reasoning"]),
        "length": mean(lengths["direct"] + lengths["reasoning"]),
        "truncated_fraction": truncated / len(answers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(PretrainArgs):
        help_text = f"{f.metadata['help']} (default: {f.default})"
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=help_text
        )
    parser.add_argument("--eval", metavar="MODEL_DIR", help="skip pretraining; only evaluate MODEL_DIR")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems to evaluate (default 200)")
    parser.add_argument("--eval-samples", type=int, default=4, help="samples per problem at T=1 (default 4)")
    ns = vars(parser.parse_args())
    eval_dir, eval_n, eval_samples = ns.pop("eval"), ns.pop("eval_n"), ns.pop("eval_samples")
    if eval_dir is None:
        eval_dir = pretrain(PretrainArgs(**ns))
    torch.set_num_threads(ns["threads"])
    for label, result in run_evals(ns["task"], eval_dir, eval_n, eval_samples):
        print(f"held-out, {label}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)


def run_evals(task: str, model_dir: str | Path, n: int, samples: int) -> list[tuple[str, dict[str, float]]]:
    """The measurements docs/tiny-model.md reports: T=1 and greedy; for tools also greedy with <calc> forced."""
    settings = [
        (f"{n} problems x {samples}, T=1", samples, 1.0, ""),
        (f"{n} problems x 1, greedy", 1, 0.0, ""),
    ]
    if task == "tools":
        settings.append((f"{n} problems x 1, greedy, <calc> forced", 1, 0.0, tools_task.CALL_OPEN))
        return [(label, evaluate_tools(model_dir, n, 0, k, t, prefix)) for label, k, t, prefix in settings]
    return [(label, evaluate_styles(model_dir, n, 0, k, t)) for label, k, t, _ in settings]


if __name__ == "__main__":
    main()
