"""The evaluation suite: the table every R1-Zero-style paper reports, sampled the way those papers sample it.

    aha eval MODEL_OR_RUN --suite reasoning [--data-dir DIR] [--limit N] [--k 8] [--k-for aime24=64]

runs AIME24, AIME25, AMC23, MATH-500, Minerva-math, OlympiadBench and GSM8K (BENCHMARKS) and prints one
table: problems, avg@k (= pass@1 estimated as the mean over k samples), pass@k, maj@k, mean response length
and the truncated fraction, per benchmark; a JSON file and the per-problem samples (JSON Lines) go beside it.

The conventions are defaults, each overridable (docs/evaluation.md says where each comes from):
- temperature 0.6, top-p 0.95 (DeepSeek-R1), `aha eval`'s own defaults;
- k per benchmark (`Benchmark.k`): 32 for the 30-40-problem AIME and AMC sets (avg@32, as DAPO and
  SimpleRL-Zoo report AIME), 4 for the larger sets;
- every answer graded by the math reward, the one training uses: the last \\boxed{}, else <answer>, else
  `#### N`, of what follows the last </think> (a completion whose thinking never closes has no answer).

Data: the hub presets of rl/datasets.py, or, offline, `--data-dir DIR` with DIR/<name>/test.jsonl in the
layout of Qwen2.5-Math's evaluation data (its field names per benchmark: `Benchmark.gold`, `QUESTION_KEYS`).
A benchmark that cannot be loaded is skipped with one line that says why.

In a run, `eval.suite: [aime24, math500]` evaluates those benchmarks whenever the held-out set is evaluated,
with the same sampling (eval.samples, eval.temperature), and logs eval/<name>/accuracy
(`evaluate_suite_in_run`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.config import SUITE_BENCHMARKS, Config
from rl.data import PromptSet
from rl.datasets import boxed_answer, check_jsonl, gsm8k_answer, load_preset, olympiad_answer, plain_answer
from rl.errors import AhaError, DataError
from rl.evaluate import (
    EvalOptions,
    check_k,
    default_out,
    eval_engine,
    eval_params,
    eval_settings,
    length_figures,
    load_eval_model,
    pick_template,
    sample_problems,
    score_problems,
)
from rl.templates import apply_template
from rollouts import RolloutEngine, SamplingParams

# ---------------------------------------------------------------------------------------- the benchmarks


def _answer_or_boxed(row: dict) -> str | None:
    """`answer` (AIME, AMC, MATH-500 copies), else the last \\boxed{} of `solution` (MATH, Minerva-math)."""
    return plain_answer(row.get("answer")) or boxed_answer(row.get("solution"))


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite: its name (the hub preset and the directory of its local copy), its k."""

    name: str
    k: int
    """Samples per problem by default: avg@k estimates pass@1."""
    gold: Callable[[dict], str | None] = _answer_or_boxed
    """The gold answer of a row of the local copy, read as Qwen2.5-Math's `parse_ground_truth` reads it."""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime24", 32),
        Benchmark("aime25", 32),
        Benchmark("amc23", 32),  # its answers are numbers, 27.0: read as "27"
        Benchmark("math500", 4),
        Benchmark("minerva_math", 4),  # Qwen2.5-Math's copy: the \boxed{} of `solution`
        Benchmark("olympiadbench", 4, lambda row: olympiad_answer(row.get("final_answer"))),
        Benchmark("gsm8k", 4, lambda row: gsm8k_answer(row.get("answer"))),  # the solution's "#### N"
    )
}
SUITES: dict[str, tuple[str, ...]] = {"reasoning": tuple(BENCHMARKS)}
"""Suite name -> its benchmarks, in the order of the table."""
QUESTION_KEYS = ("question", "problem", "Question", "input")
"""The fields a local copy's question is read from, the first present (Qwen2.5-Math's `parse_question`)."""
assert tuple(BENCHMARKS) == SUITE_BENCHMARKS, "rl.config.SUITE_BENCHMARKS names the suite's benchmarks"


def benchmark_rows(name: str, data_dir: str | None, limit: int | None = None) -> list[dict]:
    """The first `limit` problems (all: None) of a benchmark as rows {prompt, answer}: from the hub preset, or
    from DATA_DIR/<name>/test.jsonl. DataError when it cannot be loaded (the message says why)."""
    if data_dir is None:
        return load_preset(name, "test", limit)
    path = Path(data_dir).expanduser() / name / "test.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found")
    check_jsonl(path)  # a bad line: an error naming the file and the line
    rows: list[dict] = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        row = local_row(BENCHMARKS[name], json.loads(line)) if line.strip() else None
        if row is not None:
            rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(
            f"{path}: no row has a question ({', '.join(QUESTION_KEYS)}) and a gold answer that can be read"
        )
    return rows


def local_row(benchmark: Benchmark, raw: dict) -> dict | None:
    """A row of a local copy as {prompt, answer}; None when it has no question or no readable gold answer.

    As Qwen2.5-Math asks them, a question whose answer is yes/no or true/false says so. Example (gsm8k):
    `{"question": "2+3?", "answer": "2+3=5\\n#### 5"}` -> `{"prompt": "2+3?", "answer": "5"}`.
    """
    question = next((raw[key] for key in QUESTION_KEYS if raw.get(key)), None)
    answer = benchmark.gold(raw)
    if question is None or answer is None:
        return None
    question = str(question).strip()
    if answer.lower() in ("true", "false"):
        question += " (True or False)"
    elif answer.lower() in ("yes", "no"):
        question += " (Yes or No)"
    return {"prompt": question, "answer": answer}


def encode(rows: list[dict], template: str, tokenizer: Any, max_prompt_tokens: int) -> PromptSet:
    """Rows {prompt, answer} templated and tokenized; prompts over `max_prompt_tokens` are left out, counted
    in `skipped`."""
    problems = PromptSet([], [], [], ["answer"])
    for row in rows:
        text = apply_template(template, row["prompt"], tokenizer)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > max_prompt_tokens:
            problems.skipped += 1
            continue
        problems.rows.append(row)
        problems.texts.append(text)
        problems.ids.append(tokens)
    return problems


# -------------------------------------------------------------------------------------------- the command


@dataclass
class SuiteOptions(EvalOptions):
    """What `aha eval --suite` runs: `aha eval`'s options (data, split and the answer columns unused) and:"""

    suite: str = "reasoning"
    """A name in SUITES."""
    benchmark: list[str] | None = None
    """Only these benchmarks of the suite (None: all)."""
    k_for: list[str] | None = None
    """NAME=K: K samples per problem of benchmark NAME (over `k`, which is over each benchmark's default)."""
    data_dir: str | None = None
    """Local copies in the Qwen2.5-Math layout (DIR/<name>/test.jsonl); None: the hub presets."""


def suite_plan(opts: SuiteOptions) -> dict[str, int]:
    """Benchmark -> k, in the suite's order: the suite (or the chosen benchmarks), each with its k."""
    if opts.suite not in SUITES:
        raise AhaError(f"unknown suite {opts.suite!r}; the suites: {', '.join(SUITES)}")
    names = list(SUITES[opts.suite])
    unknown = [name for name in opts.benchmark or [] if name not in names]
    if unknown:
        raise AhaError(
            f"--benchmark {', '.join(unknown)}: not in the {opts.suite} suite ({', '.join(names)})"
        )
    plan = {name: opts.k or BENCHMARKS[name].k for name in names if name in (opts.benchmark or names)}
    for item in opts.k_for or []:
        name, _, k = item.partition("=")
        if name not in plan or not k.isdigit():
            raise AhaError(f"--k-for {item!r}: give NAME=K, NAME one of {', '.join(plan)}")
        plan[name] = int(k)
    for k in plan.values():
        check_k(k, opts.temperature)
    return plan


def load_suite(
    plan: dict[str, int], opts: SuiteOptions, tokenizer: Any, template: str
) -> tuple[dict[str, PromptSet], dict[str, str]]:
    """The benchmarks that load, encoded, and why each of the others did not (one line printed for each)."""
    sets, skipped = {}, {}
    for name in plan:
        try:
            rows = benchmark_rows(name, opts.data_dir, opts.limit)
        except DataError as err:
            skipped[name] = str(err)
            print(f"aha eval: skipping {name}: {err}", file=sys.stderr)
            continue
        problems = encode(rows, template, tokenizer, opts.max_prompt_tokens)
        if len(problems):
            sets[name] = problems
        else:
            skipped[name] = f"every prompt is over {opts.max_prompt_tokens} tokens"
            print(f"aha eval: skipping {name}: {skipped[name]}", file=sys.stderr)
    if not sets:
        raise AhaError(f"no benchmark of the {opts.suite} suite could be loaded (see above)")
    return sets, skipped


def run_suite(opts: SuiteOptions, progress: bool = True) -> dict:
    """Evaluate a model on each benchmark of the suite (one engine for all); return and write the results."""
    from rewards import RewardScorer, RewardSpec

    started = time.perf_counter()
    plan = suite_plan(opts)
    model = load_eval_model(opts)
    template = pick_template(opts.template, "suite", model.run_config, model.tokenizer)
    sets, skipped = load_suite(plan, opts, model.tokenizer, template)
    engine = eval_engine(opts, model, max(len(ids) for problems in sets.values() for ids in problems.ids))
    results, samples = {}, []
    try:
        with RewardScorer([RewardSpec("math")]) as scorer:
            for name, problems in sets.items():
                t = time.perf_counter()
                params = eval_params(opts, model, plan[name])
                sampled = sample_problems(problems, engine, scorer, params, progress, f"{name} k={params.n}")
                metrics, records = score_problems(sampled, "math", tools=model.tools is not None)
                results[name] = {
                    "problems": len(problems), "k": params.n, "metrics": metrics,
                    "problems_unscored": sum(all(x is None for x in r["correct"]) for r in records),
                    "rows_over_prompt_limit": problems.skipped,
                    "time_s": round(time.perf_counter() - t, 2),
                }  # fmt: skip
                samples += [{"benchmark": name, **record} for record in records]
                done = f"avg@{params.n} {suite_row(name, results[name])[3]}% over {len(problems)} problems"
                print(f"aha eval: {name}: {done} ({results[name]['time_s']:.0f} s)", file=sys.stderr)
    finally:
        engine.close()
    return write_suite(opts, model, template, params, results, skipped, samples, started)


def write_suite(
    opts: SuiteOptions, model: Any, template: str, params: SamplingParams, results: dict, skipped: dict,
    samples: list[dict], started: float,
) -> dict:  # fmt: skip
    """The suite's JSON (and, beside it, its samples as JSON Lines); returns the JSON's dict with its path."""
    out = Path(opts.out) if opts.out else default_out(opts, bool(model.run_config), f"suite-{opts.suite}")
    samples_path = out.with_suffix(".samples.jsonl")
    avg = [r["metrics"]["pass@1"] for r in results.values() if "pass@1" in r["metrics"]]
    result = {
        "model": opts.model, "model_path": str(model.path), "suite": opts.suite,
        "data": opts.data_dir or "hub presets", "benchmarks": results, "skipped": skipped,
        "average_avg@k": sum(avg) / len(avg) if avg else None,
        "settings": eval_settings(opts, model, template, "math", params), "samples": str(samples_path),
        "time_s": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    with samples_path.open("w") as f:
        for record in samples:
            f.write(json.dumps(record, default=str) + "\n")
    return {**result, "out": str(out)}


SUITE_COLUMNS = (
    "benchmark",
    "problems",
    "k",
    "avg@k (pass@1)",
    "pass@k",
    "maj@k",
    "mean length",
    "truncated",
)
"""The columns of the suite's table; the rates in percent."""


def suite_row(name: str, result: dict) -> tuple[str, ...]:
    """A benchmark's row of the table, e.g. ("aime24", "30", "32", "28.1", "63.3", "40.0", "812", "2.1")."""
    m, k = result["metrics"], result["k"]

    def pct(key: str) -> str:
        return f"{100 * m[key]:.1f}" if key in m else "-"

    return (
        name, str(result["problems"]), str(k), pct("pass@1"), pct(f"pass@{k}"), pct(f"maj@{k}"),
        f"{m['len_mean']:.0f}", pct("truncated_frac"),
    )  # fmt: skip


# ------------------------------------------------------------------------------------- in-run evaluation


def evaluate_suite_in_run(
    engine: RolloutEngine, tokenizer: Any, config: Config, params: SamplingParams
) -> dict[str, float]:
    """eval/<name>/accuracy (the mean of eval.samples samples a problem: pass@1), eval/<name>/len_mean and
    eval/<name>/truncated_frac for each benchmark of eval.suite, in the run's template, graded by the math
    reward. A benchmark that cannot be loaded is an error here: the run asked for it."""
    from rewards import RewardScorer, RewardSpec
    from rl.rollout import sample_and_score

    out: dict[str, float] = {}
    with RewardScorer([RewardSpec("math")]) as scorer:
        for name in config.eval.suite:
            rows = benchmark_rows(name, config.eval.suite_dir, config.eval.suite_limit)
            problems = encode(rows, config.data.template, tokenizer, config.data.max_prompt_tokens)
            sampled = sample_and_score(problems, engine, scorer, list(range(len(problems))), params)
            judged = [t.correct for t in sampled.trajectories if t.correct is not None]
            out[f"eval/{name}/accuracy"] = sum(judged) / len(judged) if judged else math.nan
            out.update({f"eval/{name}/{k}": v for k, v in length_figures(sampled.trajectories).items()})
    return out


def suite_summary(row: dict, names: list[str]) -> str:
    """The suite's accuracies in a run's row, as one line. Example: "aime24 0.033, math500 0.412"."""
    return ", ".join(f"{name} {row[f'eval/{name}/accuracy']:.3f}" for name in names)
