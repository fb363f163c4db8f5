"""The `aha` command: train a recipe, list the shipped recipes.

aha train [RECIPE] [key.sub=value ...]     RECIPE: a shipped recipe name or a YAML path (default: default)
aha recipes                                the shipped recipes with their one-line descriptions
aha eval MODEL_OR_RUN --data NAME [--k 8]  pass@1, pass@k and maj@k of a model on a dataset (a run directory
                                           without --data: on the run's own held-out set)
aha eval MODEL_OR_RUN --suite reasoning    the R1-Zero papers' table: AIME24/25, AMC23, MATH-500, Minerva-math,
                                           OlympiadBench, GSM8K (docs/evaluation.md)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TEMPLATES = ("plain", "r1_zero", "boxed", "chat", "chat_boxed")
ENGINE_NAMES = ("transformers", "vllm")
"""The engines `aha eval --engine` offers: those rollouts.ENGINES registers (kept here so the CLI starts without
importing torch; a test keeps them equal)."""
"""The prompt templates `aha eval --template` offers: every one `data.template` takes (a test keeps them equal)."""
SUITE_NAMES = ("reasoning",)
"""The suites `aha eval --suite` offers: rl.suite.SUITES's (kept here for a CLI that starts without torch)."""


def shipped_recipes() -> dict[str, Path]:
    """Recipe name -> file, for the YAML files shipped in recipes/."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe name (`default`) or a path to a YAML file; a missing one is reported by load_config."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return shipped_recipes().get(name_or_path, path)


def recipe_description(path: Path) -> str:
    """The recipe's `description:` field, else its first comment line."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    if isinstance(data, dict) and data.get("description"):
        return str(data["description"])
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def cmd_train(args: argparse.Namespace) -> int:
    from rl.config import load_config
    from rl.run import RunStopped
    from rl.train import train

    items = list(args.items)
    recipe = "default"
    if items and "=" not in items[0]:
        recipe = items.pop(0)
    # `resume=auto` / `resume=PATH` is short for run.resume=...
    items = ["run." + item if item.startswith("resume=") else item for item in items]
    config = load_config(resolve_recipe(recipe), items)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # one line, also when launched on several ranks
    try:
        run_dir = train(config)
    except RunStopped as stopped:
        if main_rank:
            print(f"aha: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    if main_rank:
        print(f"run written to {run_dir}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    recipes = shipped_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rl.report import plot_runs

    out = Path(args.out) if args.out else Path(args.runs[0]) / "dashboard.png"
    print(f"dashboard written to {plot_runs([Path(r) for r in args.runs], out)}")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from rl.report import print_samples

    print_samples(Path(args.run), args.step, "best" if args.best else "worst" if args.worst else None)
    return 0


SUITE_FLAGS = ("benchmark", "k_for", "data_dir")
"""`aha eval` flags that only a suite takes."""


def cmd_eval(args: argparse.Namespace) -> int:
    from rl.errors import AhaError

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None}
    if args.suite is None:
        from rl.evaluate import EvalOptions, run_eval

        if stray := [f"--{k.replace('_', '-')}" for k in SUITE_FLAGS if k in given]:
            raise AhaError(f"{', '.join(stray)} go(es) with --suite")
        print_eval_report(run_eval(EvalOptions(**given)))
        return 0
    from rl.suite import SuiteOptions, run_suite

    if args.data is not None:
        raise AhaError("--data and --suite are alternatives: the suite names its own data (see --data-dir)")
    print_suite_report(run_suite(SuiteOptions(**given)))
    return 0


def print_eval_report(result: dict) -> None:
    """The metrics as a table (rich), with what was evaluated and where the JSON went."""
    from rich.console import Console
    from rich.table import Table

    s = result["settings"]
    console = Console()
    console.print(
        f"[bold]{result['model']}[/bold] on [bold]{result['data']}[/bold] ({result['split']}, "
        f"{result['problems']} problems, k={result['k']} samples each)",
        highlight=False,
    )
    table = Table(show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.1f}" if name == "len_mean" else f"{value:.3f}")
    console.print(table)
    console.print(_settings_line(s) + f"; {result['time_s']:.0f} s", highlight=False)
    if result["problems_unscored"]:
        console.print(
            f"{result['problems_unscored']} problems had no gold answer the reward could read (left out)"
        )
    console.print(f"results written to {result['out']}", highlight=False)


def _settings_line(s: dict) -> str:
    return (
        f"temperature {s['temperature']}, top_p {s['top_p']}, max_new_tokens {s['max_new_tokens']}, "
        f"template {s['template']}, reward {s['reward']}, engine {s['engine']}"
    )


def print_suite_report(result: dict) -> None:
    """The suite's table (rates in percent), what was skipped, the settings and where the files went."""
    from rich.console import Console
    from rich.table import Table

    from rl.suite import SUITE_COLUMNS, suite_row

    console = Console(width=None if sys.stdout.isatty() else 120)  # a log file gets the table unwrapped
    console.print(
        f"[bold]{result['model']}[/bold], suite [bold]{result['suite']}[/bold] ({result['data']})",
        highlight=False,
    )
    table = Table(show_header=True)
    for i, column in enumerate(SUITE_COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for name, benchmark in result["benchmarks"].items():
        table.add_row(*suite_row(name, benchmark))
    if result["average_avg@k"] is not None and len(result["benchmarks"]) > 1:
        table.add_row("average", "", "", f"{100 * result['average_avg@k']:.1f}", *[""] * 4)
    console.print(table)
    for name, why in result["skipped"].items():
        console.print(f"skipped {name}: {why}", highlight=False)
    console.print(_settings_line(result["settings"]) + f"; {result['time_s']:.0f} s", highlight=False)
    console.print(f"results written to {result['out']}, samples to {result['samples']}", highlight=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aha", description="GRPO training that makes reasoning emerge.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe", description="Train with GRPO.")
    p.add_argument(
        "items",
        nargs="*",
        metavar="RECIPE | key=value",
        help="a shipped recipe name or YAML path (default: default), then overrides like train.steps=10",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("plot", help="write a dashboard PNG of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<name>)")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/dashboard.png of the first run)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("samples", help="print the logged samples of a run")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--step", type=int, help="which logged step (default: the last)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--best", action="store_true", help="highest reward first")
    order.add_argument("--worst", action="store_true", help="lowest reward first")
    p.set_defaults(func=cmd_samples)
    add_eval_parser(sub)
    return parser


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`aha eval`'s flags; each maps to a field of rl.evaluate.EvalOptions or rl.suite.SuiteOptions."""
    p = sub.add_parser(
        "eval",
        help="pass@1, pass@k and maj@k of a model on a dataset, a run's held-out set or a benchmark suite",
        description="Sample k completions per problem and report pass@1, pass@k (unbiased estimator) and "
        "maj@k (majority vote); results go to a JSON file and a table. A run directory without --data is "
        "evaluated on its own held-out set. See docs/datasets.md and docs/evaluation.md.",
    )
    p.add_argument(
        "model", metavar="MODEL_OR_RUN", help="model dir, aha-tiny, packaged name, hub id, or run dir"
    )
    p.add_argument(
        "--data",
        metavar="NAME_OR_PATH",
        help="gsm8k, math, math_l3to5, math500, aime24, aime25, amc23, minerva_math, olympiadbench, mbpp, "
        "gym:TASK, builtin:arithmetic, a hub id or a .jsonl/.json/.parquet file (default for a run "
        "directory: the run's held-out set)",
    )
    p.add_argument("--split", help="dataset split (default: test; a local file is used whole)")
    p.add_argument(
        "--suite",
        choices=SUITE_NAMES,
        help="a benchmark suite instead of --data: reasoning = AIME24, AIME25, AMC23, MATH-500, Minerva-math, "
        "OlympiadBench, GSM8K at temperature 0.6, top-p 0.95, k 32 (AIME, AMC) or 4 (docs/evaluation.md)",
    )
    p.add_argument(
        "--benchmark", action="append", help="suite: only this benchmark (repeatable; default: all)"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="suite: local copies, DIR/<benchmark>/test.jsonl in the Qwen2.5-Math evaluation layout "
        "(default: the hub)",
    )
    p.add_argument(
        "--k", type=int, help="samples per problem (default: 8; in a suite, each benchmark's: 32 or 4)"
    )
    p.add_argument(
        "--k-for", action="append", metavar="NAME=K", help="suite: K samples for benchmark NAME (repeatable)"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N problems (of each benchmark)")
    p.add_argument(
        "--max-new-tokens", type=int, help="completion token limit (default: the run's, else 1024)"
    )
    p.add_argument(
        "--temperature", type=float, help="sampling temperature (default: 0.6; 0 = greedy, needs --k 1)"
    )
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: 0.95)")
    p.add_argument(
        "--template",
        choices=["auto", *TEMPLATES],
        help="prompt template (default auto: the run's, plain for builtin:arithmetic, chat if the tokenizer "
        "has one, else boxed)",
    )
    p.add_argument("--engine", choices=ENGINE_NAMES, help="rollout engine (default: transformers)")
    p.add_argument(
        "--reward", help="accuracy reward (default auto: countdown, code or math by the data's columns)"
    )
    p.add_argument("--stop", action="append", help="stop string (repeatable; default: the run's)")
    p.add_argument("--seed", type=int, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="default auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument(
        "--batch-size", type=int, help="sequences decoded at once, transformers engine (default: 64)"
    )
    p.add_argument("--prompt-key", help="column holding the question (default: prompt)")
    p.add_argument("--answer-key", help="column holding the gold answer (default: answer)")
    p.add_argument("--answer-format", choices=["raw", "gsm8k", "boxed"], help="how to read it (default: raw)")
    p.add_argument(
        "--out", help="JSON path (default: RUN/eval/DATA-SPLIT.json, else ./eval-MODEL-DATA-SPLIT.json)"
    )
    p.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    from rewards import RewardError
    from rl.errors import AhaError
    from rollouts import EngineError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AhaError, RewardError, EngineError) as err:
        print(f"aha: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aha: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
