"""Run untrusted, model-written Python programs in a bubblewrap (``bwrap``) sandbox.

One call runs one program: ``run_python(files, mode, stdin, limits)`` starts
``bwrap ... python -I runner.py MODE`` (see ``_sandbox_runner.py``), feeds it ``stdin``, and returns its
capped output, exit status and whether it timed out. ``python`` is the trainer's interpreter
(``sys.executable``) unless the ``python=`` argument names another. ``rewards.code`` builds the programs and
scores them.

What the sandbox covers (each property has a hostile test in ``tests/test_sandbox.py``):

- **Only an allowlist of host files shows, read-only.** The program starts from bwrap's empty root and
  sees (``mounted_paths()`` lists them for an interpreter):

  - the system's software: ``/usr``, and ``/bin``, ``/sbin``, ``/lib``, ``/lib32``, ``/lib64``,
    ``/libx32`` where the host has them (a symlink such as ``/bin -> usr/bin`` stays a symlink);
  - in ``/etc``, only ``ld.so.cache`` (the dynamic loader's index of shared libraries) and ``localtime``
    (the time zone) from the host, and ``passwd``, ``group``, ``hosts`` and ``nsswitch.conf`` written for
    the sandbox (its own user and group, ``localhost``, files only: no DNS);
  - the interpreter: its prefixes, executable and site-packages, wherever they live (a virtual
    environment under ``/tmp`` or ``~/venv``, ``/root/.pyenv``, a conda prefix in ``/opt``);
  - ``/dev``'s minimal nodes (``null``, ``zero``, ``random``, ``urandom``, ``tty``, ``pts``...), its own
    ``/proc`` (its PID namespace's), and a private ``/tmp`` and ``/dev/shm``: size-capped tmpfs, the
    only places it can write (``/`` and ``/dev`` are remounted read-only), gone with it;
  - the paths the user adds with ``read_only_paths`` (below).

  Nothing else of the host: no ``/opt``, ``/srv``, ``/var``, ``/mnt``, ``/sys``, ``/boot``, no other
  ``/etc`` file (``/etc/shadow`` included), no homes, no working directory, no ``/run``. Directories that
  lead to a mounted path exist, empty (``/root`` holds only ``.pyenv/versions/3.11.7`` when that is the
  interpreter). Homes, the trainer's working directory and ``/run`` that lie *inside* a mounted path (a
  working directory ``/usr/src/app``, or inside a virtual environment) are covered again by an empty
  read-only directory, and an interpreter path inside such a cover is bound again on top of it: exactly
  that path shows. An interpreter that needs one of them itself (a virtual environment that *is* the
  working directory, or ``/tmp``) is refused with an error. bwrap gets its options through ``--args FD``,
  so ``/proc/1/cmdline`` does not list them.
- **Adding a path a task needs: ``read_only_paths``** (a kwarg of the code reward and of the ``python``
  tool: ``kwargs: {read_only_paths: [/data/fixtures]}``). Each path, a directory or a file, shows
  read-only at the same place; a relative path is taken from the trainer's working directory; one that
  does not exist is an error (at start-up for the code reward, on each call for the tool). Homes, the
  working directory and ``/run`` inside it stay covered unless named themselves. **Warning:** a program
  can read everything under these paths and print it, and what it prints becomes reward feedback, tool
  observations in the model's context, and text in sample logs and training data. Add only data you
  would publish; never a directory holding keys, tokens, ``.env`` files or credentials
  (``read_only_paths: [/]`` brings back the whole host, homes and working directory still covered).
- **No capabilities.** bwrap drops every capability (``--cap-drop ALL``), and ``--disable-userns`` (bwrap
  0.8+) runs the program in a nested user namespace where its mounts are locked; seccomp denies
  ``unshare``/``setns``, so it cannot make a user namespace to get capabilities back. Either of the first
  two stops a remount of a bound directory read-write; with neither (the plain ``bwrap --ro-bind / /
  --unshare-all`` command, run as root) a program *can* remount ``/`` read-write and write to the host:
  measured here.
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
- Reading what the allowlist shows: everything under ``/usr`` (software, but also whatever an admin put
  in ``/usr/local``), the interpreter's installation (its prefixes and site-packages, wherever they
  live: keep no secrets in a virtual environment or conda prefix), the ``read_only_paths``, and what
  ``/proc`` shows of the machine (``/proc/cpuinfo``, ``/proc/meminfo``, the kernel's version; its own
  mount table names the mounted paths).
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

from rewards._sandbox_view import (
    _ENV,
    _INSIDE,
    Paths,
    _absolute_paths,
    _etc_data,
    _mounts,
)
from rewards._sandbox_view import _python_paths as _python_paths  # re-exported: tests, tools
from rewards._sandbox_view import mounted_paths as mounted_paths  # re-exported: the public list
from rewards._seccomp import seccomp_filter
from rewards.registry import RewardError

INSTALL_HINT = (
    "The code reward runs model-written programs and needs bubblewrap (`bwrap`) to sandbox them. "
    "Install it (Debian/Ubuntu: `sudo apt-get install -y bubblewrap`; Fedora: `sudo dnf install bubblewrap`), "
    "or, on a machine where running untrusted code is acceptable, set `kwargs: {unsandboxed: true}` on the "
    "code reward in the recipe."
)
_RUNNER = (Path(__file__).with_name("_sandbox_runner.py")).read_bytes()


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


def check_sandbox(unsandboxed: bool = False, python: str | None = None, read_only_paths: Paths = ()) -> None:
    """Raise RewardError (with install instructions) when code cannot be sandboxed and the recipe did not
    opt into unsandboxed mode; warn when it did. ``python`` is the interpreter the programs will run with
    (default ``sys.executable``) and ``read_only_paths`` the host paths they may also read, as for
    ``run_python``; one that does not exist is an error."""
    if unsandboxed:
        warnings.warn(
            "code reward: running model-written programs WITHOUT a sandbox (unsandboxed: true). Only rlimits, "
            "a timeout and a stripped environment apply; the programs can read and write your files.",
            stacklevel=2,
        )
        return
    if bwrap_path() is None:
        raise RewardError(f"bwrap not found. {INSTALL_HINT}")
    _smoke_test(python or sys.executable, _absolute_paths(read_only_paths))


@cache
def _smoke_test(python: str, read_only_paths: tuple[str, ...] = ()) -> None:
    """Run one trivial program in the sandbox, once per process, interpreter and set of extra paths: a bwrap
    that cannot start here (no user namespaces, an AppArmor policy), cannot start the interpreter or cannot
    mount a path must fail loudly now, not score every program 0.0 later."""
    result = run_python(
        {"solution.py": b"print('ok')"},
        "stdio",
        b"",
        Limits(timeout_s=60),
        python=python,
        read_only_paths=read_only_paths,
    )
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
            f"{detail}\nInside, only /usr (with /bin, /lib...), a few /etc files, a private /tmp and the "
            "interpreter's prefixes, executable and site-packages are visible."
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


def _bwrap_args(
    data_fds: dict[str, int], seccomp_fd: int | None, limits: Limits, python: str, extra: tuple[str, ...]
) -> list[str]:
    """bwrap's options (everything before ``--``); they reach bwrap through ``--args FD``, so the sandbox's
    own ``/proc/1/cmdline`` does not list the host paths it mounts or hides."""
    sized = "--size" in _bwrap_features()
    cmd = [arg for _, op in _mounts(python, extra, data_fds, limits.tmp_size_mb, sized) for arg in op]
    cmd += ["--chdir", "/tmp", "--unshare-all", "--unshare-user", "--hostname", "sandbox"]
    cmd += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if "--disable-userns" in _bwrap_features():
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
    read_only_paths: Paths = (),
) -> RunResult:
    """Run ``runner.py MODE`` on ``files`` (``solution.py`` and, for mode ``asserts``, ``tests.json``) as
    ``python -I``, where ``python`` is the interpreter's path (default ``sys.executable``: the trainer's own).
    Wherever it lives, under ``/tmp`` or a hidden directory included, the sandbox binds it back read-only.
    ``read_only_paths`` are host paths the program may also read (at the same place, read-only; see the
    module docstring's warning); unsandboxed, it reads everything anyway.

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
    extra = _absolute_paths(read_only_paths)
    files = {f"{_INSIDE}/{name}": data for name, data in files.items()} | _etc_data()
    fds = {dest: _memfd(os.path.basename(dest), data) for dest, data in files.items()}
    bpf = seccomp_filter()
    seccomp_fd = _memfd("seccomp", bpf) if bpf is not None else None
    args_fd = None
    try:
        options = _bwrap_args(fds, seccomp_fd, limits, python, extra)
        args_fd = _memfd("bwrap-args", b"".join(arg.encode() + b"\0" for arg in options))
        argv = [bwrap_path() or "bwrap", "--args", str(args_fd), "--", python, "-I", f"{_INSIDE}/runner.py"]
        argv += [mode, _INSIDE, _limits_json(limits)]
        own = [fd for fd in [*fds.values(), seccomp_fd, args_fd] if fd is not None]
        return _run(argv, stdin, limits, pass_fds=tuple(own), cwd="/")
    finally:
        for fd in [*fds.values(), seccomp_fd, args_fd]:
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
