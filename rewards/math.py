"""The ``math`` reward: is the completion's final answer equal to the ``answer`` column?

Why score this: a correct final answer is the only signal R1-Zero needs for math, and it is cheap to check.
Equality is symbolic (math-verify on sympy), not string matching, so ``0.5``, ``\\frac{1}{2}`` and ``50\\%``
all match a gold ``1/2``, and ``2\\sqrt{2}`` matches ``\\sqrt{8}``: the model is paid for the mathematics,
not for copying the gold answer's notation. 1.0 when equal, 0.0 otherwise (including no answer, an answer
math-verify cannot parse, or a check that runs out of time). A gold answer that math-verify cannot parse
scores None (excluded from the mean, visible in ``reward/math/none_frac``) instead of a silent 0.0.

Extraction, in this order (``extract_answer``):

1. Only the final part counts: what follows the last ``</think>``, up to any ``<think>`` that opens after it
   and never closes. A completion whose thinking never closes (``<think>`` with no ``</think>``, or a
   prompt that prefills ``<think>`` and a completion with no ``</think>``) has no final answer and scores
   0.0 (as in DeepScaleR/rllm). So a ``\\boxed{42}`` hedged inside the thinking is never graded, and a
   draft there never spoils the answer after ``</think>``.
2. In that part: the content of the last complete ``\\boxed{...}`` (nested braces allowed), else of the
   last ``<answer>...</answer>``, else of the last ``#### N`` line (GSM8K).
3. Cleaned (``clean_answer``): one trailing sentence period is dropped (``42.`` -> ``42``, ``\\boxed{3.}``
   -> ``3``; ``42.5`` stays), and a plain number followed only by plain words is the number
   (``42 dollars``, ``$42 apples each`` -> ``42``), unless a word changes its meaning (``42 or more``,
   ``2 pi``). Anything else (``2x``, ``42 \\pm 1``, ``7\\text{ cm}``, ``41, 42``) goes to math-verify as is.

The gold answer goes through the same steps (it has no thinking, so step 1 changes nothing); a gold answer
with no box, tags or ``####`` line is the whole string, cleaned. So it may be plain LaTeX, a full
``\\boxed{}`` solution, or a GSM8K solution, and a gold ``42.`` means 42.

Checks never run in the trainer's process: a pool of worker processes (``rewards/_math_worker.py``) runs
them, each with a deadline (``timeout`` seconds, measured from the parent, no ``signal.alarm``); a worker
that misses it is killed and replaced, and the check scores 0.0. Identical (gold, answer) pairs are checked
once per call, and an answer that is the same string as the gold answer is equal without a check.

Example: ``math_reward(["Q"], ["... so \\\\boxed{\\\\frac{1}{2}}"], answer=["0.5"])`` -> ``[1.0]``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from rewards.registry import RewardError, on_close, register_reward
from rewards.text import as_text, last_tag_content, prompt_opens_think

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
"""Longer extracted answers score 0.0 without a check (no real final answer is this long)."""
DEFAULT_TIMEOUT_S = 5.0
WORKER_MEMORY_MB = 4096
"""Address-space limit of a worker, so that ``10^{10^{10}}`` raises MemoryError instead of eating the host."""
_STARTUP_TIMEOUT_S = 120.0

# --- answer extraction ------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"^[ \t]*####[ \t]*(.+?)[ \t]*$", re.MULTILINE)
_TRAILING_PERIOD = re.compile(r"(?<![.\\])\.\s*$")  # one period; not an ellipsis, not LaTeX's ``\.``
_NUMBER_THEN_WORDS = re.compile(
    r"(?:\\?\$\s*)?"  # an optional currency sign: $42, \$42
    r"(?P<number>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)"  # 42, -3.5, 1,000
    r"(?P<words>(?:\s+[A-Za-z]{2,})+)"  # words of two letters or more: a lone x, i or e is a symbol
)
_NOT_UNITS = frozenset("or and to than least most plus minus times over pi sqrt inf infty infinity".split())
"""Words that change what the number means (``42 or more``, ``2 pi``): such an answer is left as is."""


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group whose ``{`` is at ``text[start]``; escaped ``\\{``/``\\}`` do not nest."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), or None.

    Example: ``last_boxed("\\\\boxed{1} then \\\\boxed{\\\\frac{1}{2}}")`` -> ``"\\\\frac{1}{2}"``.
    """
    for m in reversed(list(_BOXED.finditer(text))):
        content = _braced(text, m.end() - 1)
        if content is not None:
            return content.strip()
    return None


def final_part(text: str, in_think: bool = False) -> str:
    """The part of a completion that may hold its final answer: what follows the last ``</think>``, cut at
    a ``<think>`` that opens after it (unclosed thinking is not an answer). ``in_think``: the text starts
    inside a think block, because the prompt ended with ``<think>``.

    Example: ``final_part("<think>maybe 42</think><answer>43</answer>")`` -> ``"<answer>43</answer>"``,
    ``final_part("<think>maybe \\\\boxed{42}")`` -> ``""``.
    """
    if in_think:
        text = "<think>" + text
    return text.rpartition("</think>")[2].partition("<think>")[0]


def clean_answer(answer: str) -> str:
    """An extracted answer without a trailing sentence period, and a plain number followed only by plain
    words (units, nouns) as the number; anything else unchanged.

    Example: ``clean_answer("42 dollars.")`` -> ``"42"``; ``clean_answer("42.5")`` -> ``"42.5"``;
    ``clean_answer("42 or more")`` -> ``"42 or more"``.
    """
    answer = _TRAILING_PERIOD.sub("", answer.strip()).strip()
    m = _NUMBER_THEN_WORDS.fullmatch(answer)
    if m and not any(word.lower() in _NOT_UNITS for word in m["words"].split()):
        return m["number"]
    return answer


def extract_answer(text: str, in_think: bool = False) -> str | None:
    """The final answer in a completion or gold solution, cleaned; None when there is none. Reads only
    ``final_part(text, in_think)``: its last ``\\boxed{}``, else its last ``<answer>``, else its last
    ``#### N`` line.

    Example: ``extract_answer("Natalia sold 48/2 = 24 clips...\\n#### 72.")`` -> ``"72"``.
    """
    text = final_part(text, in_think)
    hashes = _HASHES.findall(text)
    for found in (last_boxed(text), last_tag_content(text, "answer"), hashes[-1] if hashes else None):
        if found and (answer := clean_answer(found)):
            return answer
    return None


def _gold_answer(gold: object) -> str | None:
    if gold is None:
        return None
    text = str(gold).strip()
    return extract_answer(text) or clean_answer(text) or None


def _same_string(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        return re.sub(r"\s+", "", s.strip().strip("$"))

    return norm(a) == norm(b)


# --- the worker pool --------------------------------------------------------------------------------------

_BOOT = "import sys; sys.path.insert(0, {root!r}); from rewards._math_worker import main; main()"


class _Worker:
    """One worker process and what it is doing."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT.format(root=root), str(os.getpid()), str(WORKER_MEMORY_MB)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
            process_group=0,  # no Ctrl-C from the terminal; the pool stops it
        )
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0
        self.buffer = b""

    def send(self, task: int, gold: str, predicted: str, timeout: float) -> None:
        self.task, self.deadline = task, time.monotonic() + timeout
        try:
            self.proc.stdin.write((json.dumps([gold, predicted]) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: reading its stdout gives EOF, and the pool retries the task on a new worker

    def read_lines(self) -> list[str] | None:
        """Lines the worker wrote since last time; None when it has exited."""
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in lines]

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-2000:].decode(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            f.close()


class VerifierPool:
    """Worker processes that run math-verify checks in parallel, each under a hard deadline.

    ``concurrent.futures`` cannot kill a stuck worker; this pool can: a check that misses its deadline
    gets its worker SIGKILLed and replaced. Workers start lazily, are plain ``subprocess`` children (no
    fork of the trainer, no re-import of its ``__main__``), die with the trainer (``PR_SET_PDEATHSIG``)
    and are stopped by ``close()`` and at interpreter exit.
    """

    def __init__(self, workers: int) -> None:
        self.size = max(1, workers)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def check(self, pairs: list[tuple[str, str]], timeout: float) -> list[str]:
        """Verdicts for (gold, predicted) pairs: equal, different, gold_unparsable, timeout or error."""
        with self._lock:
            return self._check(pairs, timeout)

    def _check(self, pairs: list[tuple[str, str]], timeout: float) -> list[str]:
        verdicts: list[str | None] = [None] * len(pairs)
        crashes = [0] * len(pairs)
        pending = deque(range(len(pairs)))
        while len(self._workers) < min(self.size, len(pairs)):
            self._workers.append(_Worker())
        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    task = pending.popleft()
                    w.send(task, *pairs[task], timeout)
            self._wait_and_read(verdicts, crashes, pending)
        return [v or "error" for v in verdicts]

    def _wait_and_read(self, verdicts: list, crashes: list[int], pending: deque) -> None:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.task is not None]
        deadlines += [w.started + _STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
        with selectors.DefaultSelector() as sel:
            for w in self._workers:
                sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            events = sel.select(max(0.0, min(deadlines) - now))
        for key, _ in events:
            w: _Worker = key.data
            lines = w.read_lines()
            if lines is None:  # the worker died (crash, OOM kill): retry its check once on a new one
                if not w.ready:
                    raise RewardError(
                        f"math reward: a math-verify worker failed to start:\n{w.stderr_tail()}"
                    )
                if w.task is not None:
                    crashes[w.task] += 1
                    if crashes[w.task] < 2:
                        pending.appendleft(w.task)
                    else:
                        verdicts[w.task] = "error"
                self._replace(w)
                continue
            for line in lines:
                if line == "ready":
                    w.ready = True
                elif w.task is not None:
                    verdicts[w.task], w.task = line, None
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline:
                verdicts[w.task] = "timeout"
                self._replace(w)
            elif not w.ready and now >= w.started + _STARTUP_TIMEOUT_S:
                tail = w.stderr_tail()
                self._replace(w)
                raise RewardError(f"math reward: a math-verify worker did not start in time:\n{tail}")

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker()

    def close(self) -> None:
        """Kill every worker (they restart on the next check)."""
        with self._lock:
            for w in self._workers:
                w.kill()
            self._workers = []


_POOLS: dict[int, VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def default_workers() -> int:
    """One worker per CPU core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def get_pool(workers: int | None = None) -> VerifierPool:
    """The process-wide pool with ``workers`` workers (created on first use)."""
    size = workers or default_workers()
    with _POOLS_LOCK:
        if size not in _POOLS:
            _POOLS[size] = VerifierPool(size)
        return _POOLS[size]


@on_close
def close_pools() -> None:
    """Stop every math worker process."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()


atexit.register(close_pools)


# --- the reward -------------------------------------------------------------------------------------------


def verify_answers(
    golds: list, predictions: list, *, timeout: float = DEFAULT_TIMEOUT_S, workers: int | None = None
) -> list[float | None]:
    """Score extracted predictions (str or None) against gold answers (as given in the dataset)."""
    scores: list[float | None] = [None] * len(predictions)
    to_check: dict[tuple[str, str], list[int]] = {}
    for i, (gold, pred) in enumerate(zip(golds, predictions, strict=True)):
        gold_answer = _gold_answer(gold)
        if gold_answer is None:
            continue  # no gold answer: no score
        if not pred or len(pred) > MAX_ANSWER_CHARS:
            scores[i] = 0.0
        elif _same_string(gold_answer, pred):
            scores[i] = 1.0
        else:
            to_check.setdefault((gold_answer, pred), []).append(i)
    if not to_check:
        return scores
    pairs = list(to_check)
    verdicts = get_pool(workers).check(pairs, timeout)
    problems = {}
    for pair, verdict in zip(pairs, verdicts, strict=True):
        score = {"equal": 1.0, "different": 0.0, "gold_unparsable": None}.get(verdict, 0.0)
        if verdict not in ("equal", "different"):
            problems[verdict.split()[0]] = problems.get(verdict.split()[0], 0) + 1
        for i in to_check[pair]:
            scores[i] = score
    if problems:
        log.warning("math reward: %s (scored 0.0, or None for an unparsable gold answer)", problems)
    return scores


@register_reward("math", accuracy=True)
def math_reward(
    prompts: list,
    completions: list,
    answer: list | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
    **columns,
) -> list[float | None]:
    """1.0 where the completion's final answer equals the ``answer`` column (symbolically), else 0.0;
    None where the gold answer is missing or unparsable. A prompt ending with ``<think>`` means the
    completion starts inside a think block. Options: ``timeout`` seconds per check, ``workers`` processes
    (default: one per core, at most 8)."""
    if answer is None:
        raise RewardError(
            f"the math reward needs an 'answer' column in the dataset; got columns: {sorted(columns)}"
        )
    predictions = [
        extract_answer(as_text(c), in_think=prompt_opens_think(p))
        for p, c in zip(prompts, completions, strict=True)
    ]
    return verify_answers(answer, predictions, timeout=timeout, workers=workers)
