"""`aha eval`: pass@1, pass@k and maj@k of a model on a dataset, with the trainer's data, templates, engines
and rewards (so an evaluation scores exactly what training rewards).

Over N problems, each with k samples of which c are correct (the task's accuracy reward scores 1.0):

    pass@1  mean over problems of c / k: the expected accuracy of a single sample
    pass@j  mean of 1 - C(k - c, j) / C(k, j) for j = 2, 4, ... and k: the probability that at least one of j
            samples is correct, estimated without bias from all k (Chen et al. 2021, "Evaluating Large
            Language Models Trained on Code")
    maj@k   1 when the answer given most often among the k samples is correct (self-consistency voting,
            Wang et al. 2023). Answers are the final answers the math reward extracts (last \\boxed{}, else
            <answer>, else `#### N`), grouped by `normalize_answer`, a normalised string; math-verify
            equivalence would also merge `0.5` with `\\frac{1}{2}`, at k^2 symbolic checks a problem, so maj@k
            here is a slight underestimate when a model writes one value in several notations. Ties go to
            the answer that appeared first; samples without an answer do not vote.

Problems whose gold answer the reward cannot read (every sample scored None) are left out and counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rl.config import Config, DataConfig, RolloutConfig, config_from_dict
from rl.data import PromptSet
from rl.errors import AhaError
from rl.trajectory import Trajectory
from rollouts import RolloutEngine, SamplingParams, build_engine, engine_class

# ------------------------------------------------------------------------------------------ the metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Example: `pass_at_k(4, 1, 2)` -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\^\{?\\circ\}?|\\%|%|\$")
_NUMBER = re.compile(r"[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?")


def normalize_answer(answer: str | None) -> str | None:
    """The string answers are grouped by for majority voting; None for no answer.

    Removes whitespace, `$`, `\\left`/`\\right`, LaTeX spacing, degree and percent signs, `\\text{}` wrappers
    and a trailing period; `\\dfrac`/`\\tfrac` -> `\\frac`; numbers lose thousands commas and trailing zeros.
    Example: `normalize_answer(" $1,000.50$ ")` -> `"1000.5"`, `normalize_answer("\\\\dfrac{1}{2}")` ->
    `"\\\\frac{1}{2}"`.
    """
    if answer is None:
        return None
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer)
    text = _LATEX_NOISE.sub("", text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    text = re.sub(r"\s+", "", text).rstrip(".")
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        text = text.lstrip("+")
        if text in ("-0", ""):
            text = "0"
    return text or None


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample holding the most frequent normalised answer; None when no sample has one.

    Example: `majority_answer(["2", None, "3", "3", "2"])` -> 0 (2 and 3 tie with two votes; 2 came first).
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = normalize_answer(answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool | None]) -> float:
    """1.0 when the majority answer among the samples (`majority_answer`) is correct, else 0.0.

    Example: `maj_at_k(["5", "4", "4"], [True, False, False])` -> 0.0 (the majority says 4, which is wrong).
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    index = majority_answer(answers)
    return 0.0 if index is None else float(bool(correct[index]))


def pass_ks(k: int) -> list[int]:
    """The j reported as pass@j for k samples: 1, 2, 4, ... below k, and k. Example: 6 -> [1, 2, 4, 6]."""
    ks = [1]
    while ks[-1] * 2 < k:
        ks.append(ks[-1] * 2)
    return ks + [k] if k > 1 else ks


def summarize(correct: list[list[bool | None]], answers: list[list[str | None]]) -> dict[str, float]:
    """pass@j and maj@k over problems, from each problem's per-sample correctness and extracted answers.

    Problems where every sample is None (no gold answer to judge by) are skipped.
    """
    k = len(correct[0]) if correct else 0
    scored = [(c, a) for c, a in zip(correct, answers, strict=True) if any(x is not None for x in c)]
    out: dict[str, float] = {}
    if not scored or not k:
        return out
    for j in pass_ks(k):
        out[f"pass@{j}"] = sum(pass_at_k(k, sum(bool(x) for x in c), j) for c, _ in scored) / len(scored)
    out[f"maj@{k}"] = sum(maj_at_k(a, c) for c, a in scored) / len(scored)
    return out


# ---------------------------------------------------------------------------------------- the command


@dataclass
class EvalOptions:
    """What `aha eval` runs; the CLI flags map one to one."""

    model: str
    """A model directory, `aha-tiny`, a packaged model name, a hub id, or a run directory (uses RUN/model)."""
    data: str | None = None
    """As data.source (preset, gym:task, hub id, local file, builtin:*); None: the run's held-out set."""
    split: str = "test"
    k: int | None = None
    """Samples per problem; None: 8 (in a suite, each benchmark's own: rl/suite.py)."""
    limit: int | None = None
    max_new_tokens: int | None = None
    """None: the run's rollout.max_new_tokens for a run directory, else 1024."""
    temperature: float = 0.6
    top_p: float = 0.95
    template: str = "auto"
    """auto: the run's template for a run directory, plain for builtin:arithmetic, chat when the tokenizer
    has a chat template, else boxed."""
    engine: str = "transformers"
    reward: str = "auto"
    """Accuracy reward: auto picks countdown for rows with numbers/target, code for rows with tests, else math."""
    stop: list[str] | None = None
    """None: the run's rollout.stop for a run directory, else none."""
    seed: int = 0
    dtype: str = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    batch_size: int = 64
    """Sequences decoded at once by the transformers engine."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    answer_format: str = "raw"
    max_prompt_tokens: int = 4096
    out: str | None = None
    """JSON path; None: RUN/eval/<data>-<split>.json (a run's held-out set: held-out-<split>), else
    ./eval-<model>-<data>-<split>.json."""


def resolve_eval_model(name: str) -> tuple[Path | str, dict]:
    """(model path or hub id, the run's config as a dict or {}) for a model dir, run dir, name or hub id."""
    from rl.models import resolve_model_path
    from rl.packaged import resolve_packaged_model

    local = Path(name).expanduser()
    if (local / "model").is_dir() and (local / "config.yaml").is_file():
        import yaml

        return local / "model", yaml.safe_load((local / "config.yaml").read_text()) or {}
    packaged = resolve_packaged_model(name)
    return (packaged if packaged is not None else resolve_model_path(name)), {}


def pick_template(requested: str, data: str, run_config: dict, tokenizer: Any) -> str:
    """The prompt template: as requested, else the run's, else by data and tokenizer (see EvalOptions)."""
    if requested != "auto":
        return requested
    if run_config.get("data", {}).get("template"):
        return run_config["data"]["template"]
    if data.startswith("builtin:"):
        return "plain"
    return "chat" if getattr(tokenizer, "chat_template", None) else "boxed"


def pick_reward(requested: str, columns: list[str]) -> str:
    if requested != "auto":
        return requested
    if {"numbers", "target"} <= set(columns):
        return "countdown"
    return "code" if "tests" in columns else "math"


@dataclass
class EvalModel:
    """A model loaded for evaluation, with what its run directory (if any) says about sampling it."""

    path: Path | str
    run_config: dict  # the run's config.yaml; {} for a model that is not a run directory
    tokenizer: Any
    policy: Any
    dtype: str
    max_new_tokens: int
    stop: list[str]
    tools: Config | None  # the run's config when it called tools (it is evaluated with them), else None


def load_eval_model(opts: EvalOptions) -> EvalModel:
    """`opts.model` on its device, with the token limit, stop strings and tools it is sampled with."""
    from rl.models import load_policy, pick_device

    model_path, run_config = resolve_eval_model(opts.model)
    run_rollout = run_config.get("rollout", {})
    device = pick_device(opts.device)
    dtype = opts.dtype if opts.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if engine_class(opts.engine).shares_policy:  # the engine samples from the policy module
        tokenizer, policy = load_policy(model_path, dtype, device)
    else:  # the engine (vLLM) loads its own copy: only the config, for the context length
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = types.SimpleNamespace(config=AutoConfig.from_pretrained(model_path))
    tools = run_config.get("tools") or {}
    return EvalModel(
        model_path, run_config, tokenizer, policy, dtype,
        max_new_tokens=opts.max_new_tokens or run_rollout.get("max_new_tokens") or 1024,
        stop=list(opts.stop if opts.stop is not None else run_rollout.get("stop") or []),
        tools=config_from_dict({"tools": tools}) if tools.get("use") else None,
    )  # fmt: skip


def eval_engine(opts: EvalOptions, model: EvalModel, prompt_tokens: int) -> RolloutEngine:
    """The engine `aha eval` samples with (the run's engine options for it, then those for running alone),
    with the run's tools when it called them; `prompt_tokens`: the longest prompt."""
    from rl.rollout import tool_context, with_tools

    extra = 0 if model.tools is None else tool_context(model.tools)  # observations take context, not budget
    options = asdict(getattr(RolloutConfig(), opts.engine)) if hasattr(RolloutConfig(), opts.engine) else {}
    options.update(engine_class(opts.engine).standalone, max_batch_size=opts.batch_size)
    engine = build_engine(
        opts.engine, policy=model.policy, tokenizer=model.tokenizer, model_path=str(model.path),
        dtype=model.dtype, context_len=prompt_tokens + model.max_new_tokens + extra, seed=opts.seed,
        **options,
    )  # fmt: skip
    return engine if model.tools is None else with_tools(engine, model.tokenizer, model.tools)


def check_k(k: int, temperature: float) -> None:
    if k < 1:
        raise AhaError("--k must be at least 1")
    if k > 1 and temperature == 0:
        raise AhaError("k > 1 samples at temperature 0 are all the same: use --temperature > 0 or --k 1")


def eval_params(opts: EvalOptions, model: EvalModel, k: int) -> SamplingParams:
    """k samples a problem at the options' temperature and top-p, with the model's token limit and stops."""
    return SamplingParams(
        n=k, max_new_tokens=model.max_new_tokens, temperature=opts.temperature,
        top_p=opts.top_p if opts.temperature else 1.0, stop=tuple(model.stop), seed=opts.seed,
        logprobs=False,  # unused here, and they cost vLLM half its throughput at a large vocabulary
    )  # fmt: skip


def sample_problems(
    problems: Any, engine: RolloutEngine, scorer: Any, params: SamplingParams, progress: bool, label: str
) -> Any:
    """Every problem's k samples, scored, with a progress bar named `label` (rl.rollout.sample_and_score)."""
    from rl.rollout import sample_and_score

    per_call = None if engine.batch_size is None else max(1, engine.batch_size // params.n)  # the bar moves
    with _progress(progress, len(problems), label) as advance:
        rows = list(range(len(problems)))
        return sample_and_score(problems, engine, scorer, rows, params, per_call=per_call, advance=advance)


def eval_settings(opts: EvalOptions, model: EvalModel, template: str, reward: str, params: Any) -> dict:
    return {
        "template": template, "reward": reward, "engine": opts.engine, "temperature": opts.temperature,
        "top_p": params.top_p, "max_new_tokens": model.max_new_tokens, "stop": model.stop, "seed": opts.seed,
        "dtype": model.dtype, "limit": opts.limit,
        "tools": [t.name for t in model.tools.tools.use] if model.tools else [],
    }  # fmt: skip


def run_eval(opts: EvalOptions, progress: bool = True) -> dict:
    """Sample k completions per problem, score them, and return (and write) the results as a dict."""
    from rewards import RewardScorer, RewardSpec

    started = time.perf_counter()
    check_k(opts.k or 8, opts.temperature)
    model = load_eval_model(opts)
    label = opts.data or "held-out"
    template = pick_template(opts.template, label, model.run_config, model.tokenizer)
    if opts.data is None:  # the run's held-out set, as the run built it
        problems = run_held_out(model.run_config, model.tokenizer, template, opts.limit)
    else:
        data = DataConfig(
            source=opts.data, prompt_key=opts.prompt_key, answer_key=opts.answer_key,
            answer_format=opts.answer_format, template=template, max_prompt_tokens=opts.max_prompt_tokens,
        )  # fmt: skip
        problems = PromptSet.load(
            data, model.tokenizer, source=opts.data, split=opts.split, limit=opts.limit, seed=opts.seed
        )
    params = eval_params(opts, model, opts.k or 8)
    reward = pick_reward(opts.reward, problems.columns)
    engine = eval_engine(opts, model, max(len(ids) for ids in problems.ids))
    try:
        with RewardScorer([RewardSpec(reward)]) as scorer:
            sampled = sample_problems(problems, engine, scorer, params, progress, "sampling")
    finally:
        engine.close()
    metrics, records = score_problems(sampled, reward, tools=model.tools is not None)
    result = {
        "model": opts.model, "model_path": str(model.path), "data": label, "split": opts.split,
        "problems": len(problems), "k": params.n, "metrics": metrics,
        "problems_unscored": sum(all(x is None for x in r["correct"]) for r in records),  # no gold answer
        "majority_vote": "normalised answer string (rl.evaluate.normalize_answer); ties: first seen",
        "settings": eval_settings(opts, model, template, reward, params), "records": records,
        "time_s": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    out = Path(opts.out) if opts.out else default_out(opts, bool(model.run_config), label, opts.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    result["out"] = str(out)
    return result


def run_held_out(run_config: dict, tokenizer: Any, template: str, limit: int | None) -> Any:
    """A run directory's held-out set as the run built it (`train_and_held_out`), in `template`, first N."""
    config = config_from_dict(run_config) if run_config else None
    if config is None or not config.eval.size:
        what = (
            "the run has no held-out set (eval.size=0)" if config else "not a run directory (no held-out set)"
        )
        raise AhaError(f"{what}: name the data to evaluate on with --data, or a suite with --suite")
    config.eval.size, config.data.template = min(config.eval.size, limit or config.eval.size), template
    return train_and_held_out(config, tokenizer)[1]


def train_and_held_out(config: Config, tokenizer: Any) -> tuple[Any, Any]:
    """The run's training and held-out prompts, as the run built them (rl/data.py `train_and_held_out`)."""
    from rl.data import train_and_held_out as load
    from rl.rollout import prompt_tools

    return load(config, tokenizer, prompt_tools(config))


def score_problems(sampled: Any, reward: str, tools: bool = False) -> tuple[dict[str, float], list[dict]]:
    """pass@j, maj@k and length figures of scored groups, with one record per problem."""
    from rewards.math import extract_answer
    from rewards.text import prompt_opens_think

    trajectories = sampled.trajectories
    records, correct, answers = [], [], []
    for group in sampled.groups:
        flags = [_verdict(t, reward) for t in group]
        in_think = prompt_opens_think(group[0].prompt)  # as the math reward reads them
        extracted = [extract_answer(t.text, in_think) for t in group]
        correct.append(flags)
        answers.append(extracted)
        majority = majority_answer(extracted)
        records.append(
            {
                "prompt": group[0].prompt, "gold": group[0].row.get("answer"), "answers": extracted,
                "correct": flags, "majority": None if majority is None else extracted[majority],
                "completions": [t.text for t in group], "lengths": [len(t.completion_ids) for t in group],
                "truncated": [t.finish_reason == "length" for t in group],
            }
        )  # fmt: skip
    metrics = summarize(correct, answers)
    metrics.update(length_figures(trajectories))
    metrics["no_answer_frac"] = sum(a is None for group in answers for a in group) / len(trajectories)
    if tools:
        metrics["tool_call_frac"] = sum(t.tool_calls > 0 for t in trajectories) / len(trajectories)
    return metrics, records


def _verdict(t: Trajectory, reward: str) -> bool | None:
    """Whether the accuracy reward judged the trajectory correct (its score 1.0); None when it did not score."""
    if t.correct is not None:
        return t.correct
    score = t.scores.get(reward)
    return None if score is None else score == 1.0


def length_figures(trajectories: list[Trajectory]) -> dict[str, float]:
    """Mean length in tokens and the fraction that hit the token limit."""
    lengths = [len(t.completion_ids) for t in trajectories]
    return {
        "len_mean": sum(lengths) / len(lengths),
        "truncated_frac": sum(t.finish_reason == "length" for t in trajectories) / len(trajectories),
    }


# ------------------------------------------------------------------------------------- in-run evaluation


def held_out_params(config: Any) -> SamplingParams:
    """How the run evaluates its held-out set (eval.*; the rollout's token limit and stop strings)."""
    return SamplingParams(
        n=config.eval.samples, max_new_tokens=config.rollout.max_new_tokens,
        temperature=config.eval.temperature, top_p=config.rollout.top_p if config.eval.temperature else 1.0,
        stop=tuple(config.rollout.stop), seed=config.train.seed,
        logprobs=False,  # unused here, and they cost vLLM half its throughput at a large vocabulary
    )  # fmt: skip


def evaluate_held_out(
    engine: RolloutEngine, scorer: Any, eval_set: Any, params: SamplingParams,
    generation: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, tools: bool = False,
) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    """The in-run evaluation: eval/* metrics (mean accuracy = pass@1 over eval.samples each; with `tools`,
    the share of completions that call one) and records."""
    from rl.rollout import sample_and_score

    sampled = sample_and_score(
        eval_set, engine, scorer, list(range(len(eval_set))), params, generation=generation
    )
    trajectories = sampled.trajectories
    finite = [t.reward for t in trajectories if t.scored]
    out = {"eval/reward_mean": sum(finite) / len(finite) if finite else float("nan")}
    out.update({f"eval/{k}": v for k, v in length_figures(trajectories).items()})
    if sampled.scores.correct is not None:
        judged = [t.correct for t in trajectories if t.correct is not None]
        out["eval/accuracy"] = sum(judged) / len(judged) if judged else float("nan")
    if tools:
        out["eval/tool_call_frac"] = sum(t.tool_calls > 0 for t in trajectories) / len(trajectories)
    records = [
        {"prompt": t.prompt, "completion": t.text, "reward": t.reward, "length": len(t.completion_ids)}
        for t in trajectories
    ]
    return out, records


def eval_summary(row: dict) -> str:
    acc = f"accuracy {row['eval/accuracy']:.3f}, " if "eval/accuracy" in row else ""
    return f"{acc}reward {row['eval/reward_mean']:.3f}, mean length {row['eval/len_mean']:.1f} tokens"


def before_after(before: list[dict], after: list[dict], count: int = 3) -> str:
    """A few held-out problems with the base model's and the trained model's completions."""
    lines = ["held-out samples, before -> after training:"]
    for b, a in list(zip(before, after, strict=True))[:count]:
        lines.append(f"  prompt: {b['prompt']!r}")
        lines.append(f"    before (reward {b['reward']:.2f}, {b['length']} tokens): {b['completion']!r}")
        lines.append(f"    after  (reward {a['reward']:.2f}, {a['length']} tokens): {a['completion']!r}")
    return "\n".join(lines)


def default_out(opts: EvalOptions, is_run: bool, what: str, split: str = "") -> Path:
    """RUN/eval/<what>[-<split>].json for a run directory, else ./eval-<model>-<what>[-<split>].json."""
    name = _slug(what) + (f"-{split}" if split else "")
    if is_run:
        return Path(opts.model).expanduser() / "eval" / f"{name}.json"
    return Path(f"eval-{_slug(opts.model)}-{name}.json")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip("/")).strip("_")[-60:] or "x"


@contextlib.contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over problems when stderr is a terminal; yields `advance(n)`."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
