"""What a run shows afterwards: the dashboard PNG, the samples HTML page, and readable samples in a terminal.

aha plot RUN_DIR [RUN_DIR ...] [--out PNG]     one dashboard; several runs are overlaid for comparison
aha samples RUN_DIR [--step N] [--best|--worst]   (sorted: each distinct completion once)
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from rl.errors import AhaError
from rl.tracking import read_jsonl

# (title, [(metric, label)], y-axis label, y range or None) of each dashboard panel
PANELS = [
    ("Reward", [("reward/mean", "reward")], "mean reward", None),
    ("Accuracy", [("reward/accuracy", "train"), ("eval/accuracy", "held-out")], "accuracy", (0, 1.02)),
    ("Response length", [("rollout/len_mean", "mean")], "tokens", None),
    ("Truncation", [("rollout/truncated_frac", "truncated")], "fraction of completions", (0, 1.02)),
    ("Reflection words", [("rollout/reflection_frac", "reflection")], "fraction of completions", (0, None)),
    ("KL / entropy", [("loss/kl", "KL"), ("policy/entropy", "entropy")], "nats per token", None),
]
TOOL_PANELS = [
    (
        "Tool calls",
        [("tools/call_frac", "train"), ("eval/tool_call_frac", "held-out")],
        "fraction calling",
        (0, 1.02),
    ),
    (
        "Accuracy with / without a call",
        [("tools/accuracy_with_call", "with a call"), ("tools/accuracy_without_call", "without")],
        "accuracy",
        (0, 1.02),
    ),
]
"""Added to the dashboard when a run called tools (docs/tools.md): the tool-use curve and whether calling pays."""


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise AhaError(f"no metrics.jsonl in {run_dir}: is it a run directory (runs/<name>)?")
    return read_jsonl(path)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write a dashboard of one or more runs to `out` (PNG): 2x3 panels, 2x4 with the tool panels when a run
    called tools."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d).name or str(d), read_metrics(Path(d))) for d in run_dirs]
    tools = any("tools/call_frac" in row for _, rows in runs for row in rows)
    panels = PANELS + TOOL_PANELS if tools else PANELS
    fig, axes = plt.subplots(2, len(panels) // 2, figsize=(5 * len(panels) // 2, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys, ylabel, ylim) in zip(axes.flat, panels, strict=True):
        for r, (name, rows) in enumerate(runs):
            color = colors[r % len(colors)]
            for k, (key, label) in enumerate(keys):
                steps, values = _series(rows, key)
                if not steps:
                    continue
                legend = f"{name} {label}" if len(runs) > 1 else label
                marker = "o" if key.startswith("eval/") else None
                ax.plot(steps, values, color=color, linestyle=["-", "--"][k % 2], marker=marker, label=legend)
                if key == "rollout/len_mean":
                    lo_steps, p90 = _series(rows, "rollout/len_p90")
                    if len(lo_steps) == len(steps):
                        ax.fill_between(steps, values, p90, color=color, alpha=0.2, label=f"{legend} to p90")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("aha: " + ", ".join(name for name, _ in runs))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_samples(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise AhaError(f"no samples.jsonl in {run_dir} (samples are written every track.samples_every steps)")
    return read_jsonl(path)


def distinct_samples(records: list[dict]) -> list[dict]:
    """The records with a distinct (prompt, completion), the first of each kept, with `copies`: how many of the
    records wrote that completion for that prompt (a converged group samples one answer many times).

    Example: completions of one prompt ["a", "b", "a"] -> ["a" (copies 2), "b" (copies 1)].
    """
    kept: dict[tuple[str, str], dict] = {}
    for r in records:
        key = (r["prompt"], r["completion"])
        if key in kept:
            kept[key]["copies"] += 1
        else:
            kept[key] = {**r, "copies": 1}
    return list(kept.values())


def select_samples(records: list[dict], step: int | None, order: str | None) -> tuple[int, list[dict]]:
    """The records of one step (the last one by default), optionally sorted best or worst reward first, then
    each distinct completion once (distinct_samples)."""
    steps = sorted({r["step"] for r in records})
    if not steps:
        raise AhaError("samples.jsonl is empty")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise AhaError(f"no samples at step {step}; steps with samples: {', '.join(map(str, steps))}")
    chosen = [r for r in records if r["step"] == step]
    if order is not None:
        chosen = distinct_samples(sorted(chosen, key=lambda r: r["reward"], reverse=order == "best"))
    return step, chosen


def print_samples(run_dir: Path, step: int | None = None, order: str | None = None) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    step, chosen = select_samples(read_samples(run_dir), step, order)
    console = Console()
    console.rule(f"step {step}")
    for r in chosen:
        verdict = {True: "correct", False: "wrong", None: ""}[r["correct"]]
        title = f"reward {r['reward']:.2f} {verdict} | {r['length']} tokens | {r['finish_reason']}"
        if r.get("copies", 1) > 1:
            title += f" | sampled {r['copies']} times"
        body = Text(r["prompt"], style="dim")
        body.append(r["completion"])
        console.print(Panel(body, title=title, title_align="left"))


def write_samples_html(run_dir: Path, out: Path | None = None) -> Path:
    """One HTML page with every logged step's samples, newest first."""
    records = read_samples(run_dir)
    out = out or Path(run_dir) / "samples.html"
    parts = [
        "<!doctype html><meta charset='utf-8'><title>aha samples</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:auto} pre{white-space:pre-wrap;margin:0}"
        ".s{border:1px solid #ccc;border-radius:6px;padding:8px;margin:8px 0} .p{color:#777}"
        ".good{border-left:6px solid #2a2} .bad{border-left:6px solid #c33} .meta{font-size:12px;color:#555}",
        f"</style><h1>Samples of {html.escape(Path(run_dir).name)}</h1>",
    ]
    for step in sorted({r["step"] for r in records}, reverse=True):
        parts.append(f"<h2 id='step{step}'>step {step}</h2>")
        for r in (r for r in records if r["step"] == step):
            cls = "good" if r["reward"] > 0 else "bad"
            parts.append(
                f"<div class='s {cls}'><div class='meta'>group {r['group']} | reward {r['reward']:.2f} | "
                f"{r['length']} tokens | {r['finish_reason']}</div><pre><span class='p'>"
                f"{html.escape(r['prompt'])}</span>{html.escape(r['completion'])}</pre></div>"
            )
    out.write_text("\n".join(parts))
    return out
