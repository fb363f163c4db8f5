"""The ``code`` reward: run the completion's last fenced Python block against the row's ``tests``.

Why score this: passing tests is what "correct code" means, and it cannot be faked by sounding right. The
score is the fraction of test cases passed (partial credit helps a weak model find the gradient), or 1.0 /
0.0 with ``all_or_nothing=True`` (strict, as in most code-RL papers). A completion without a Python block
scores 0.0; a row without tests scores None. Programs run sandboxed (``rewards/sandbox.py``).

The code is the last fenced block tagged ``python``/``py``/``python3`` (else the last untagged block); an
unclosed fence (a truncated completion) does not count. ``tests`` may be:

- Python source with asserts, run after the solution in its namespace. Each top-level ``assert`` is one
  case; other top-level statements (imports, helpers) run in order as setup. Source without a top-level
  assert is one case that passes when it runs without error.
- A list of strings: each string is one case (source run after the solution, in order).
- stdin/stdout cases: a list of ``{"input": ..., "output": ...}`` dicts, a dict
  ``{"inputs": [...], "outputs": [...]}``, or either as a JSON string. Each case runs the solution as a
  program; it passes when the program exits with 0 and its stdout matches (trailing whitespace per line and
  trailing blank lines ignored).

Options: ``all_or_nothing``, ``timeout`` (wall seconds per program), ``memory_mb``, ``workers`` (programs run
at once; default one per core), ``read_only_paths`` (host paths the programs may also read, e.g. data files a
task opens; everything under them can end up in the programs' output: see the sandbox docstring),
``unsandboxed`` (run without bwrap; see the sandbox docstring).

Example: ``code_reward(["Q"], ["```python\\ndef f(x):\\n    return 2 * x\\n```"], tests=["assert f(2) == 4"])``
-> ``[1.0]``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from rewards.registry import RewardError, register_reward
from rewards.sandbox import Limits, RunResult, check_sandbox, run_python
from rewards.text import as_text

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(text: str) -> str | None:
    """The last fenced Python block (else the last untagged block), or None.

    Example: ``extract_code("```python\\nprint(1)\\n```")`` -> ``"print(1)\\n"``.
    """
    blocks = _FENCE.findall(text)
    for wanted in (lambda tag: tag.lower() in _PYTHON_TAGS, lambda tag: tag == ""):
        chosen = [code for tag, code in blocks if wanted(tag)]
        if chosen:
            return chosen[-1]
    return None


@dataclass(frozen=True)
class TestSuite:
    """A row's tests, normalized: assert steps ``(source, is_case)`` or stdio cases ``(input, output)``."""

    steps: tuple[tuple[str, bool], ...] = ()
    cases: tuple[tuple[str, str], ...] = ()

    @property
    def n_cases(self) -> int:
        return len(self.cases) if self.cases else sum(is_case for _, is_case in self.steps)


def _lines(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _stdio_cases(tests: Any) -> tuple[tuple[str, str], ...] | None:
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise RewardError("code reward: tests have different numbers of inputs and outputs")
        return tuple((_lines(i), _lines(o)) for i, o in zip(tests["inputs"], tests["outputs"], strict=True))
    if isinstance(tests, list | tuple) and tests and all(isinstance(t, dict) for t in tests):
        cases = []
        for t in tests:
            stdin, stdout = t.get("input", t.get("stdin", "")), t.get("output", t.get("stdout"))
            if stdout is None:
                raise RewardError(f"code reward: a stdio test case has no 'output' (or 'stdout'): {t!r:.200}")
            cases.append((_lines(stdin), _lines(stdout)))
        return tuple(cases)
    return None


def parse_tests(tests: Any) -> TestSuite | None:
    """Normalize a row's ``tests`` (see the module docstring); None for no tests, RewardError if malformed."""
    if tests is None or (isinstance(tests, str | list | tuple | dict) and len(tests) == 0):
        return None
    if isinstance(tests, str) and tests.lstrip()[:1] in ("[", "{"):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            pass  # Python source that starts with a bracket
    cases = _stdio_cases(tests)
    if cases is not None:
        return TestSuite(cases=cases)
    if isinstance(tests, list | tuple) and all(isinstance(t, str) for t in tests):
        return TestSuite(steps=tuple((t, True) for t in tests))
    if not isinstance(tests, str):
        raise RewardError(
            f"code reward: unsupported tests value of type {type(tests).__name__}: {tests!r:.200}"
        )
    try:
        body = ast.parse(tests).body
    except SyntaxError as e:
        raise RewardError(f"code reward: the tests are not valid Python: {e}") from e
    if not any(isinstance(node, ast.Assert) for node in body):
        return TestSuite(steps=((tests, True),))
    return TestSuite(steps=tuple((ast.unparse(node), isinstance(node, ast.Assert)) for node in body))


def outputs_match(actual: str, expected: str) -> bool:
    """Judge's comparison: equal after stripping trailing whitespace per line and trailing blank lines."""

    def norm(s: str) -> list[str]:
        lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(actual) == norm(expected)


def _passed_asserts(code: str, suite: TestSuite, limits: Limits, run: Callable[..., RunResult]) -> int:
    token = secrets.token_hex(16)  # the program never sees it after the runner read it from stdin
    files = {"solution.py": code.encode(errors="replace"), "tests.json": json.dumps(suite.steps).encode()}
    result = run(files, "asserts", (token + "\n").encode(), limits)
    passed = set()
    for line in result.stdout.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == token and parts[1] == "pass" and parts[2].isdigit():
            passed.add(int(parts[2]))
    return len(passed & set(range(suite.n_cases)))


def _passed_stdio(code: str, case: tuple[str, str], limits: Limits, run: Callable[..., RunResult]) -> int:
    stdin, expected = case
    files = {"solution.py": code.encode(errors="replace")}
    result = run(files, "stdio", stdin.encode(errors="replace"), limits)
    ok = result.returncode == 0 and outputs_match(result.stdout.decode(errors="replace"), expected)
    return int(ok)


def _preflight(options: dict[str, Any]) -> None:
    unsandboxed = bool(options.get("unsandboxed", False))
    check_sandbox(unsandboxed=unsandboxed, read_only_paths=options.get("read_only_paths"))


@register_reward("code", accuracy=True, preflight=_preflight)
def code_reward(
    prompts: list,
    completions: list,
    tests: list | None = None,
    *,
    all_or_nothing: bool = False,
    unsandboxed: bool = False,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    read_only_paths: list[str] | None = None,
    **columns,
) -> list[float | None]:
    """Fraction of ``tests`` cases each completion's code passes (see the module docstring)."""
    if tests is None:
        raise RewardError(
            f"the code reward needs a 'tests' column in the dataset; got columns: {sorted(columns)}"
        )
    check_sandbox(unsandboxed, read_only_paths=read_only_paths)
    limits = Limits(timeout_s=timeout, memory_mb=memory_mb)
    run = partial(run_python, sandboxed=not unsandboxed, read_only_paths=read_only_paths)
    scores: list[float | None] = [None] * len(completions)
    jobs = []  # (sample, function, args)
    suites = [parse_tests(t) for t in tests]
    for i, (completion, suite) in enumerate(zip(completions, suites, strict=True)):
        code = extract_code(as_text(completion))
        if suite is None:
            continue
        scores[i] = 0.0
        if code is None or suite.n_cases == 0:
            continue
        if suite.cases:
            jobs += [(i, _passed_stdio, (code, case, limits, run)) for case in suite.cases]
        else:
            jobs.append((i, _passed_asserts, (code, suite, limits, run)))
    passed = [0] * len(completions)
    if jobs:
        with ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 1, thread_name_prefix="aha-code"
        ) as ex:
            futures = [(i, ex.submit(fn, *args)) for i, fn, args in jobs]
            for i, future in futures:
                passed[i] += future.result()
    for i, suite in enumerate(suites):
        if suite is not None and scores[i] is not None and suite.n_cases:
            fraction = passed[i] / suite.n_cases
            scores[i] = float(fraction == 1.0) if all_or_nothing else fraction
    return scores
