"""What the LLM-as-judge reward costs a step: seconds to judge one step's completions, at several concurrencies.

    python benchmarks/judge.py [--completions 32] [--concurrency 1 16] [--rounds 3] [--json PATH]

Starts vLLM's OpenAI-compatible server (the CPU build, `python -m vllm.entrypoints.openai.api_server`) on
localhost with the shipped tiny model (rl/tiny/model, which has no chat template: `serve_vllm` gives it a
one-line template that passes the message through), then judges one "step" of `--completions` completions
with the `judge` reward, `--rounds` times per setting, alternating. The tiny model reads the completion (an
arithmetic prompt such as "12+35+48+23+67+91=") and answers with a guess of its sum (greedy, it answers
directly: `<answer>329</answer>`, about 6 tokens), which the `number` parser reads as the score. With
`--reply-tokens N` every reply is N tokens instead (vLLM's `ignore_eos`), as long as a short real verdict.
Reported per setting: the median seconds per step, requests per second, and the fraction of scores that are
the right sum (the model's greedy accuracy, about 10%: a check that the requests carried the completions).

`serve_vllm` is also the fixture of tests/test_rewards_judge.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewards.judge import judge_reward  # noqa: E402
from rl.tiny.arithmetic import Problem  # noqa: E402

TINY_MODEL = ROOT / "rl" / "tiny" / "model"
PASS_THROUGH_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
"""A chat template that renders the messages' text and nothing else: chat requests then read as the raw text."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_vllm(
    model: Path = TINY_MODEL,
    name: str = "tiny",
    deadline_s: float = 240.0,
    log_dir: Path | None = None,
    chat_template: bool = True,
) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on a free localhost port, serving ``model`` as ``name``; yields its
    base URL (``http://127.0.0.1:PORT/v1``) once ``/v1/models`` answers, and stops the server's process group
    after. RuntimeError with the log's tail if it does not answer within ``deadline_s``."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="aha-vllm-") as tmp:
        logs = Path(log_dir or tmp)
        template = Path(tmp) / "chat_template.jinja"
        template.write_text(PASS_THROUGH_TEMPLATE)
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--dtype", "float32", "--max-model-len", "128",
            "--host", "127.0.0.1", "--port", str(port),
        ] + (["--chat-template", str(template)] if chat_template else [])  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        with open(logs / "vllm-server.log", "wb") as log:
            server = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            _wait_until_up(server, base_url, deadline_s, logs / "vllm-server.log")
            yield base_url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _wait_until_up(server: subprocess.Popen, base_url: str, deadline_s: float, log: Path) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if server.poll() is not None:
            break
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    tail = log.read_text(errors="replace")[-3000:]
    state = (
        f"exited with {server.returncode}"
        if server.poll() is not None
        else f"silent after {deadline_s:.0f} s"
    )
    raise RuntimeError(f"vLLM's server {state}; the end of its log:\n{tail}")


def arithmetic_prompts(n: int, seed: int = 0) -> list[Problem]:
    """``n`` sums of the tiny model's task (six two-digit terms)."""
    rng = random.Random(seed)
    return [Problem(tuple(rng.randint(10, 99) for _ in range(6))) for _ in range(n)]


def judge_options(base_url: str, concurrency: int, reply_tokens: int = 0) -> dict:
    """The judge's options for the tiny model: the completion is the whole request, the number it answers the
    score. ``reply_tokens``: 0 lets the model stop on its own (about 6 tokens); N makes every reply N tokens
    (vLLM's ``ignore_eos``), the length of a short real verdict."""
    forced = {"max_tokens": reply_tokens, "extra_body": {"ignore_eos": True}} if reply_tokens else {}
    return {
        "base_url": base_url,
        "model": "tiny",
        "template": "{completion}",
        "parse": "number",
        "score_range": [0, 1000],
        "max_tokens": 96,
        "max_concurrency": concurrency,
        "request_timeout_s": 120,
        **forced,
    }


def step_seconds(
    base_url: str, problems: list[Problem], concurrency: int, reply_tokens: int
) -> tuple[float, float]:
    """Seconds to judge one step's completions, and the fraction scored with the right sum."""
    completions = [p.prompt for p in problems]
    options = judge_options(base_url, concurrency, reply_tokens)
    start = time.perf_counter()
    scores = asyncio.run(judge_reward(completions, completions, **options))
    seconds = time.perf_counter() - start
    return seconds, sum(s == p.answer for s, p in zip(scores, problems, strict=True)) / len(problems)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--completions", type=int, default=32, help="completions judged per step")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="max_concurrency values")
    parser.add_argument(
        "--reply-tokens",
        type=int,
        nargs="+",
        default=[0, 64],
        help="0: replies end on their own; N: N tokens",
    )
    parser.add_argument("--rounds", type=int, default=3, help="steps timed per setting (median reported)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    problems = arithmetic_prompts(args.completions)
    settings = [(r, c) for r in args.reply_tokens for c in args.concurrency]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    right: dict[tuple[int, int], float] = {}
    started = time.perf_counter()
    with serve_vllm() as base_url:
        print(f"server up in {time.perf_counter() - started:.0f} s at {base_url}")
        step_seconds(base_url, problems[:4], 4, 0)  # warm-up
        for _ in range(args.rounds):
            for r, c in settings:
                seconds, right[r, c] = step_seconds(base_url, problems, c, r)
                times[r, c].append(seconds)
    rows = []
    for (r, c), t in times.items():
        step = statistics.median(t)
        rows.append(
            {"reply_tokens": r, "max_concurrency": c, "step_s": step, "all_s": t, "right_sums": right[r, c]}
        )
        reply = f"{r}-token replies" if r else "replies ending on their own"
        print(
            f"{reply:28s} max_concurrency {c:3d}: {step:.2f} s per step of {args.completions} completions "
            f"({args.completions / step:.0f} requests/s; right sums {right[r, c]:.0%}); rounds "
            + " ".join(f"{x:.2f}" for x in t)
        )
    if args.json:
        args.json.write_text(json.dumps({"completions": args.completions, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
