"""The program that runs inside the sandbox (standard library only; it is shipped as data, never imported).

Usage: ``python -I runner.py MODE DIR LIMITS_JSON``

- ``stdio``: set the limits, then run ``DIR/solution.py`` as ``__main__``; the host judges its stdout.
- ``asserts``: read a one-line token from stdin, set the limits, load the test steps from
  ``DIR/tests.json`` (``[[source, is_case], ...]``), execute the solution, then each step in the same
  namespace. Every finished case is reported on the original stdout as ``\\n<token> pass|fail <k>``. A
  solution that exits (``sys.exit``, ``os._exit``) or crashes before the tests ran reports no passes, so it
  scores 0.

Example: ``runner.py asserts /tmp/aha '{"cpu_s": 3, "memory_mb": 256, "nproc": 64, "file_mb": 16}'``
"""

import json
import os
import resource
import runpy
import sys


def _set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    wanted = {
        resource.RLIMIT_CPU: (limits["cpu_s"], limits["cpu_s"] + 1),
        resource.RLIMIT_AS: (limits["memory_mb"] * mb,) * 2,
        resource.RLIMIT_NPROC: (limits["nproc"],) * 2,
        resource.RLIMIT_FSIZE: (limits["file_mb"] * mb,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, (soft, hard) in wanted.items():
        resource.setrlimit(which, (soft, hard))


def _run_stdio(root: str) -> None:
    sys.argv = ["solution.py"]
    runpy.run_path(os.path.join(root, "solution.py"), run_name="__main__")


def _run_asserts(root: str, token: str) -> None:
    report = os.fdopen(os.dup(1), "w")  # a private handle: the solution may close or replace sys.stdout

    def emit(message: str) -> None:
        report.write(f"\n{token} {message}\n")
        report.flush()

    with open(os.path.join(root, "tests.json")) as f:
        steps = json.load(f)
    with open(os.path.join(root, "solution.py")) as f:
        solution = f.read()
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
    except BaseException as e:  # noqa: B036 - SystemExit and KeyboardInterrupt must not count as a pass either
        emit(f"solution-error {type(e).__name__}")
        os._exit(1)
    case = 0
    for i, (source, is_case) in enumerate(steps):
        try:
            exec(compile(source, f"test_{i}.py", "exec"), namespace)
        except BaseException as e:  # noqa: B036
            if not is_case:
                emit(f"setup-error {type(e).__name__}")
                os._exit(1)
            emit(f"fail {case} {type(e).__name__}")
        else:
            if is_case:
                emit(f"pass {case}")
        case += bool(is_case)
    emit("done")
    os._exit(0)


def main() -> None:
    mode, root, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    token = sys.stdin.readline().strip() if mode == "asserts" else ""
    _set_limits(limits)
    if mode == "stdio":
        _run_stdio(root)
    elif mode == "asserts":
        _run_asserts(root, token)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
