"""Run untrusted, model-written Python programs in a bubblewrap (``bwrap``) sandbox.

One call runs one program: ``run_python(files, mode, stdin, limits)`` starts
``bwrap ... python -I runner.py MODE`` (see ``_sandbox_runner.py``), feeds it ``stdin``, and returns its
capped output, exit status and whether it timed out. ``python`` is the trainer's interpreter
(``sys.executable``) unless the ``python=`` argument names another. ``rewards.code`` builds the programs and
scores them.

What the sandbox covers (each property has a hostile test in ``tests/test_sandbox.py``):

- **Host files are read-only.** The program sees ``/`` as a read-only bind mount; it can write only a
  private ``/tmp`` (a size-capped tmpfs that disappears with it; ``/dev/shm`` likewise). ``/root``,
  ``/home``, ``$HOME``, the trainer's working directory and ``/run`` are replaced by empty read-only
  directories (one under ``/tmp`` needs no such cover: the private ``/tmp`` hides it).
- **The interpreter is bound back, and nothing more.** Where the interpreter's prefixes, executable or
  site-packages lie under ``/tmp`` (a virtual environment there, common on CI machines) or a hidden
  directory (``/root/.pyenv``, ``~/venv``), exactly those paths are bound back in, read-only, after the
  private ``/tmp`` and the empty directories are mounted: the rest of the real ``/tmp`` or the home stays
  out of sight, and a hidden directory inside a bound path (a working directory inside the virtual
  environment) is hidden again. An interpreter that needs a hidden directory itself (a virtual
  environment that *is* the working directory, or ``/tmp``) is refused with an error.
- **No capabilities.** bwrap drops every capability (``--cap-drop ALL``), and ``--disable-userns`` (bwrap
  0.8+) runs the program in a nested user namespace where its mounts are locked; seccomp denies
  ``unshare``/``setns``, so it cannot make a user namespace to get capabilities back. Either of the first
  two stops a remount of ``/`` read-write; with neither (the plain ``bwrap --ro-bind / / --unshare-all``
  command, run as root) a program *can* remount ``/`` read-write and write to the host: measured here.
- **No network.** A new, empty network namespace: no interfaces but its own loopback.
- **No new processes.** A seccomp filter denies ``fork``, ``vfork``, ``clone3`` and ``clone`` without
  ``CLONE_THREAD`` (threads still work). This is what stops a fork bomb when the trainer runs as root,
  where ``RLIMIT_NPROC`` is not enforced by the kernel. (x86-64 and aarch64; elsewhere the filter is
  skipped and only ``RLIMIT_NPROC`` remains.)
- **Its own PID namespace**, so it cannot see or signal the trainer or any other host process; it dies
  with the trainer (``--die-with-parent``).
- **Resource limits** (``setrlimit``, set before the program runs): CPU seconds, address space, number
  of processes, file size, no core dumps; plus a wall-clock timeout that kills bwrap's process group, and
  with it the whole PID namespace.
- **Capped output.** At most ``Limits.output_bytes`` of stdout is kept; a program that prints more is
  killed.
- **A stripped environment.** Only ``PATH``, ``HOME=/tmp``, ``LANG`` and thread-count variables: no
  tokens or keys from the trainer's environment; the trainer's ``/proc/<pid>/environ`` is not visible.

What it does **not** cover:

- Kernel exploits: bwrap relies on the kernel's namespaces and seccomp; a kernel bug can break out.
- Reading host files outside the hidden directories that the sandbox's user may read (``/etc``,
  ``/usr``, ``/opt``, ``/var``, other mounted data). Keep secrets in the hidden directories, and not in
  the interpreter's installation (its prefixes and site-packages are readable wherever they live).
- Side channels and timing, CPU contention with the trainer (bound it with ``workers``).
- Tampering with the test harness from inside the program's own interpreter. Assert tests run in the
  solution's process (they call its functions), so a program written to subvert them (walking stack
  frames to find the report token, patching builtins the tests use) can fake a pass. ``sys.exit``,
  ``os._exit`` and printing fake results do not. stdin/stdout tests are judged outside the program.
- ``unsandboxed=True`` mode: only the rlimits, the timeout and the stripped environment apply. It exists
  for machines without bwrap and warns when used.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rewards._seccomp import seccomp_filter
from rewards.registry import RewardError

INSTALL_HINT = (
    "The code reward runs model-written programs and needs bubblewrap (`bwrap`) to sandbox them. "
    "Install it (Debian/Ubuntu: `sudo apt-get install -y bubblewrap`; Fedora: `sudo dnf install bubblewrap`), "
    "or, on a machine where running untrusted code is acceptable, set `kwargs: {unsandboxed: true}` on the "
    "code reward in the recipe."
)
_RUNNER = (Path(__file__).with_name("_sandbox_runner.py")).read_bytes()
_INSIDE = "/tmp/.aha"  # where the runner, solution and tests are mounted read-only inside the sandbox
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Limits:
    """Limits for one sandboxed program."""

    timeout_s: float = 10.0
    """Wall-clock seconds before the whole sandbox is killed (the program then fails)."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB; allocations beyond it raise MemoryError."""
    max_processes: int = 64
    """RLIMIT_NPROC (threads count too). The seccomp filter already denies new processes."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), in MiB."""
    tmp_size_mb: int = 64
    """Size of the private /tmp and /dev/shm, in MiB."""
    output_bytes: int = 1 << 20
    """stdout kept; a program printing more is killed. stderr keeps its first 64 KiB."""

    @property
    def cpu_s(self) -> int:
        """CPU-seconds limit: a little above the wall-clock limit, as a second layer."""
        return max(1, math.ceil(self.timeout_s)) + 1


@dataclass
class RunResult:
    """What one program did. ``returncode`` is None when it was killed (timeout or output cap)."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_capped: bool = False
    seconds: float = 0.0


def bwrap_path() -> str | None:
    """The bwrap executable, or None when it is not installed."""
    return shutil.which("bwrap")


def check_sandbox(unsandboxed: bool = False, python: str | None = None) -> None:
    """Raise RewardError (with install instructions) when code cannot be sandboxed and the recipe did not
    opt into unsandboxed mode; warn when it did. ``python`` is the interpreter the programs will run with
    (default ``sys.executable``), as for ``run_python``."""
    if unsandboxed:
        warnings.warn(
            "code reward: running model-written programs WITHOUT a sandbox (unsandboxed: true). Only rlimits, "
            "a timeout and a stripped environment apply; the programs can read and write your files.",
            stacklevel=2,
        )
        return
    if bwrap_path() is None:
        raise RewardError(f"bwrap not found. {INSTALL_HINT}")
    _smoke_test(python or sys.executable)


@cache
def _smoke_test(python: str) -> None:
    """Run one trivial program in the sandbox, once per process and interpreter: a bwrap that cannot start
    here (no user namespaces, an AppArmor policy) or cannot start the interpreter must fail loudly now, not
    score every program 0.0 later."""
    result = run_python({"solution.py": b"print('ok')"}, "stdio", b"", Limits(timeout_s=60), python=python)
    if result.returncode != 0 or result.stdout != b"ok\n":
        raise RewardError(_smoke_test_error(result, python))


# bwrap's own errors when it may not create namespaces or mount (sysctl, AppArmor, a container's seccomp):
# "setting up uid map: Permission denied", "No permissions to create new namespace, ...",
# "Creating new namespace failed: ...", "Can't mount proc on /newroot/proc: Operation not permitted".
_NAMESPACE_ERRORS = re.compile(
    r"namespace|uid map|gid map|unshare|Operation not permitted|Permission denied|Can't mount|capset", re.I
)
_USERNS_HINT = (
    "bwrap needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 "
    "also kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap; in a container, "
    "one that allows user namespaces and mounts). "
)


def _smoke_test_error(result: RunResult, python: str) -> str:
    """The error for a failed smoke test: what actually failed, in bwrap's (or Python's) own words, with a
    hint that fits. User namespaces are blamed only when bwrap's error is about namespaces or permissions.

    Example: stderr ``bwrap: execvp /tmp/v/bin/python: No such file or directory`` gives ``"code sandbox:
    bwrap could not start the Python interpreter /tmp/v/bin/python inside the sandbox: bwrap: execvp ..."``.
    """
    stderr = result.stderr.decode(errors="replace").strip()
    detail = stderr[-1000:] or f"exit status {result.returncode}, stdout {result.stdout[:200]!r}"
    if result.timed_out:
        detail = f"timed out after {result.seconds:.0f} s; {detail}"
    bwrap_errors = [line for line in stderr.splitlines() if line.startswith("bwrap:")]
    if any("execvp" in line for line in bwrap_errors):
        return (
            f"code sandbox: bwrap could not start the Python interpreter {python} inside the sandbox: "
            f"{detail}\nInside, /tmp is private and /root, /home, $HOME, the working directory and /run are "
            "hidden; only the interpreter's prefixes, executable and site-packages are bound back."
        )
    if any(_NAMESPACE_ERRORS.search(line) for line in bwrap_errors):
        return (
            f"bwrap is installed but cannot set up a sandbox on this machine: {detail}\n"
            + _USERNS_HINT
            + INSTALL_HINT
        )
    where = "bwrap" if bwrap_errors else f"the Python interpreter {python} in the sandbox"
    return f"code sandbox: a trivial program failed; {where} reported: {detail}"


@cache
def _bwrap_features() -> frozenset[str]:
    """Options of the installed bwrap that vary by version (``--disable-userns`` is 0.8+, ``--size`` 0.7+)."""
    exe = bwrap_path()
    if exe is None:
        raise RewardError(f"bwrap not found. {INSTALL_HINT}")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    return frozenset(opt for opt in ("--disable-userns", "--size") if opt in out.stdout + out.stderr)


# --- the bwrap command line ---------------------------------------------------------------------------------

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/proc", "/sys", "/dev")
_PRIVATE_DIRS = ("/tmp", "/dev/shm")  # each a fresh tmpfs inside the sandbox: nothing of the host's shows


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _outermost(paths: list[str]) -> list[str]:
    """``paths`` without those that lie under another one, sorted."""
    return sorted({p for p in paths if not any(_is_under(p, o) and p != o for o in paths)})


def _hide_candidates() -> list[str]:
    """Homes, the trainer's working directory (where configs and ``.env`` files live) and ``/run``
    (container secrets), resolved; system directories and ``/`` are never hidden."""
    out = []
    for d in ["/root", "/home", os.path.expanduser("~"), os.getcwd(), "/run"]:
        d = os.path.realpath(d)
        if (
            d != "/"
            and os.path.isdir(d)
            and not any(_is_under(d, s) or _is_under(s, d) for s in _SYSTEM_DIRS)
        ):
            out.append(d)
    return sorted(set(out))


def hidden_dirs() -> list[str]:
    """Host directories replaced by empty read-only ones inside the sandbox: homes, the trainer's working
    directory and ``/run``. One under ``/tmp`` or ``/dev/shm`` is left out: the sandbox's private tmpfs
    there already hides it (and a read-only one over ``/tmp`` would leave the program nowhere to write)."""
    return _outermost([d for d in _hide_candidates() if not any(_is_under(d, p) for p in _PRIVATE_DIRS)])


_PYTHON_PATHS = """
import json, os, sys
paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, sys.executable]
paths += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
print(json.dumps(paths))
"""


@cache
def _python_paths(python: str) -> list[str]:
    """What ``python -I`` needs, as that interpreter reports it: its prefixes, its executable and its
    site-packages (not other ``sys.path`` entries, which may be the very project directory that is hidden).
    Each as given and resolved, so a path through a symlink works inside the sandbox too."""
    try:
        out = subprocess.run(
            [python, "-I", "-c", _PYTHON_PATHS], capture_output=True, text=True, env=dict(_ENV), timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RewardError(f"code sandbox: cannot start the Python interpreter {python!r}: {e}") from e
    if out.returncode != 0:
        raise RewardError(
            f"code sandbox: the Python interpreter {python!r} failed: {out.stderr.strip()[-1000:]}"
        )
    reported = json.loads(out.stdout.strip().splitlines()[-1])  # the last line: a sitecustomize may print
    paths = [os.path.abspath(p) for p in reported if p and os.path.exists(p)]
    return sorted({q for p in paths for q in (p, os.path.realpath(p))})


def _mount_args(python: str) -> list[str]:
    """Hide homes, the working directory and ``/run``; bind the interpreter's paths back read-only where
    they lie under those or the private ``/tmp``/``/dev/shm`` (only those paths: nothing else of the real
    ``/tmp`` or a home shows); then hide again any such directory that lies inside a bound path."""
    hidden = hidden_dirs()
    hide = [*_PRIVATE_DIRS, *_hide_candidates()]
    needed = [p for p in _python_paths(python) if any(_is_under(p, h) for h in hide)]
    binds = _outermost(needed)
    rehide = [d for d in hide if any(_is_under(d, b) and d != b for b in binds)]
    clash = [p for p in needed if p in hide or any(_is_under(p, d) for d in rehide)]
    if clash:
        raise RewardError(
            f"code sandbox: the Python interpreter {python!r} needs {clash[0]}, which is (or lies in) a "
            f"directory the sandbox hides ({', '.join(hide)}); binding it back would show that directory to "
            "the programs. "
            "Install Python (or its virtual environment) in a directory of its own, outside the trainer's "
            "working directory."
        )
    args = [arg for d in hidden for arg in ("--tmpfs", d)]
    args += [arg for p in binds for arg in ("--ro-bind", p, p)]
    args += [arg for d in rehide for arg in ("--tmpfs", d)]
    return args + [arg for d in [*hidden, *rehide] for arg in ("--remount-ro", d)]


def _bwrap_command(
    data_fds: dict[str, int], seccomp_fd: int | None, limits: Limits, python: str
) -> list[str]:
    feats = _bwrap_features()
    size = lambda mb: ["--size", str(mb * 1024 * 1024)] if "--size" in feats else []  # noqa: E731
    cmd = [bwrap_path() or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    cmd += [*size(limits.tmp_size_mb), "--tmpfs", "/tmp", *size(limits.tmp_size_mb), "--tmpfs", "/dev/shm"]
    cmd += _mount_args(python)  # after the private /tmp: bwrap mounts in order, so the binds show through it
    for name, fd in data_fds.items():
        cmd += ["--ro-bind-data", str(fd), f"{_INSIDE}/{name}"]
    cmd += ["--chdir", "/tmp", "--unshare-all", "--unshare-user", "--hostname", "sandbox"]
    cmd += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if "--disable-userns" in feats:
        cmd.append("--disable-userns")
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return cmd


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding ``data``, positioned at its start (bwrap reads it from there)."""
    fd = os.memfd_create(name)
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# --- running one program ------------------------------------------------------------------------------------


def _limits_json(limits: Limits) -> str:
    return json.dumps(
        {
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "nproc": limits.max_processes,
            "file_mb": limits.file_size_mb,
        }
    )


def run_python(
    files: dict[str, bytes],
    mode: str,
    stdin: bytes,
    limits: Limits,
    *,
    sandboxed: bool = True,
    python: str | None = None,
) -> RunResult:
    """Run ``runner.py MODE`` on ``files`` (``solution.py`` and, for mode ``asserts``, ``tests.json``) as
    ``python -I``, where ``python`` is the interpreter's path (default ``sys.executable``: the trainer's own).
    Wherever it lives, under ``/tmp`` or a hidden directory included, the sandbox binds it back read-only.

    Example: ``run_python({"solution.py": b"print(input())"}, "stdio", b"hi\\n", Limits())``
    returns ``RunResult(returncode=0, stdout=b"hi\\n", ...)``.
    """
    files, python = {**files, "runner.py": _RUNNER}, os.path.abspath(python or sys.executable)
    if not sandboxed:
        with tempfile.TemporaryDirectory(prefix="aha-unsandboxed-") as root:
            for name, data in files.items():
                Path(root, name).write_bytes(data)
            argv = [python, "-I", f"{root}/runner.py", mode, root, _limits_json(limits)]
            return _run(argv, stdin, limits, pass_fds=(), cwd=root)
    fds = {name: _memfd(name, data) for name, data in files.items()}
    bpf = seccomp_filter()
    seccomp_fd = _memfd("seccomp", bpf) if bpf is not None else None
    try:
        cmd = _bwrap_command(fds, seccomp_fd, limits, python)
        argv = cmd + ["--", python, "-I", f"{_INSIDE}/runner.py", mode, _INSIDE, _limits_json(limits)]
        extra = () if seccomp_fd is None else (seccomp_fd,)
        return _run(argv, stdin, limits, pass_fds=(*fds.values(), *extra), cwd="/")
    finally:
        for fd in [*fds.values(), seccomp_fd]:
            if fd is not None:
                os.close(fd)


def _run(argv: list[str], stdin: bytes, limits: Limits, *, pass_fds: tuple, cwd: str) -> RunResult:
    start = time.monotonic()
    deadline = start + limits.timeout_s
    small = len(stdin) <= 32768  # fits a pipe: the program cannot rewind it (the asserts token goes this way)
    stdin_file = None if small else tempfile.TemporaryFile()
    if stdin_file is not None:
        stdin_file.write(stdin)
        stdin_file.seek(0)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if small else stdin_file,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(_ENV),
        cwd=cwd,
        pass_fds=pass_fds,
        process_group=0,
        close_fds=True,
    )
    try:
        if small:
            try:
                proc.stdin.write(stdin)
                proc.stdin.close()
            except BrokenPipeError:
                pass
        out, err, timed_out, capped = _collect(proc, deadline, limits.output_bytes)
        rusage = None if timed_out or capped else _reap(proc, deadline)
        timed_out = timed_out or (rusage is None and not capped)
    finally:
        if proc.returncode is None:
            _kill(proc)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        if stdin_file is not None:
            stdin_file.close()
    killed = timed_out or capped
    return RunResult(
        returncode=None if killed else proc.returncode,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        output_capped=capped,
        seconds=time.monotonic() - start,
    )


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close, the deadline passes or stdout exceeds ``cap``."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), bytes(err), True, False
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data is out:
                    out += chunk
                    if len(out) > cap:
                        return bytes(out[:cap]), bytes(err), False, True
                elif len(err) < 65536:
                    err += chunk[: 65536 - len(err)]
    return bytes(out), bytes(err), False, False


def _reap(proc: subprocess.Popen, deadline: float) -> resource.struct_rusage | None:
    """Wait for the program to exit by ``deadline``; its resource usage (including the processes it waited
    for: bwrap waits for the sandbox), or None if it is still running."""
    delay = 0.001
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return rusage
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(0.02, delay * 2)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap's process group; ``--die-with-parent`` and the PID namespace take the rest with it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
