"""A math-verify worker process: reads ``[gold, predicted]`` JSON lines on stdin, writes one verdict per line.

Verdicts: ``equal``, ``different``, ``gold_unparsable`` (math-verify found no mathematical object in the
gold answer, only its raw-string fallback, so the sample cannot be graded). ``rewards.math`` starts these workers, gives each check a deadline
and kills a worker that misses it, so math-verify's own ``signal.alarm`` timeouts are switched off here.

Example session: stdin ``["\\\\frac{1}{2}", "0.5"]`` -> stdout ``equal``.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import resource
import signal
import sys

_INLINE_MATH = re.compile(r"(?<!\\)\$|\\\(|\\\[")  # an unescaped $, or \( or \[


def parseable(answer: str) -> str:
    """The text math-verify should parse for an extracted answer.

    A bare answer (``\\frac{1}{2}``, ``[1, 2)``, ``x = 5``) is wrapped in ``\\boxed{}`` so that it is read as
    one LaTeX expression; an answer that is prose with inline math (``The answer is $\\frac12$``) is left as
    is, so that math-verify finds the math in it.
    """
    answer = answer.strip()
    if _INLINE_MATH.search(answer):
        return answer
    return "\\boxed{" + answer + "}"


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(parseable(text), extraction_config=config, parsing_timeout=None))


def check(gold: str, predicted: str) -> str:
    """Compare two extracted answers with math-verify; returns the verdict (see the module docstring).

    Example: ``check("\\\\sqrt{8}", "2\\\\sqrt{2}")`` -> ``"equal"``.
    """
    from math_verify import verify

    gold_parsed = _parse(gold)
    if all(isinstance(x, str) for x in gold_parsed):  # nothing but math-verify's raw-string fallback
        return "gold_unparsable"
    predicted_parsed = _parse(predicted)
    if not predicted_parsed:
        return "different"
    same = verify(list(gold_parsed), list(predicted_parsed), timeout_seconds=None)
    return "equal" if same else "different"


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when the trainer dies (Linux), so a worker stuck in sympy cannot outlive it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def main() -> None:
    parent_pid, memory_mb = int(sys.argv[1]), int(sys.argv[2])
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    if memory_mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024,) * 2)
    logging.disable(logging.WARNING)  # math-verify warns that its timeouts are off: that is on purpose
    check("1", "1")  # import and warm up before reporting ready, so the first deadline is fair
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            gold, predicted = json.loads(line)
            verdict = check(gold, predicted)
        except Exception as e:  # malformed math must never take the worker down
            verdict = f"error {type(e).__name__}"
        out.write(verdict + "\n")
        out.flush()


if __name__ == "__main__":
    main()
