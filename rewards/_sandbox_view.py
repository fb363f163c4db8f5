"""What a sandboxed program sees of the file system: an allowlist on bwrap's empty root (rewards/sandbox.py).

The system's software, two files of /etc (and four written for the sandbox), /dev's minimal nodes, its own
/proc, a private /tmp, the interpreter's own paths and the paths a user adds read-only; nothing else of the
host. See the sandbox module's docstring for the whole list and the tests that hold it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache

from rewards.registry import RewardError

Paths = str | list[str] | tuple[str, ...] | None  # the read_only_paths option: a list, or one path
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


# --- what the program sees ---------------------------------------------------------------------------------

_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # the system's software
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")  # read by the dynamic loader and by time.localtime()
_PRIVATE_DIRS = ("/tmp", "/dev/shm")  # each a fresh tmpfs inside the sandbox: nothing of the host's shows


def _is_under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _outermost(paths: list[str]) -> list[str]:
    """``paths`` without those that lie under another one, sorted."""
    return sorted({p for p in paths if not any(_is_under(p, o) and p != o for o in paths)})


def _etc_data() -> dict[str, bytes]:
    """The /etc files written for the sandbox instead of bound from the host: names for the program's own
    user and group (``pwd``, ``getpass`` and ``tarfile`` look them up; bwrap maps the trainer's ids to
    themselves), ``localhost``, and a name-service configuration that reads only these files (no DNS, no
    host daemons). Example: run as root, ``/etc/passwd`` holds ``root`` and ``nobody``, both at ``/tmp``."""
    uid, gid, nologin = os.getuid(), os.getgid(), "/usr/sbin/nologin"
    passwd = [f"root:x:0:0:root:/tmp:{nologin}", f"nobody:x:65534:65534:nobody:/nonexistent:{nologin}"]
    group = ["root:x:0:", "nogroup:x:65534:"]
    if uid not in (0, 65534):
        passwd.append(f"sandbox:x:{uid}:{gid}:sandbox:/tmp:{nologin}")
    if gid not in (0, 65534):
        group.append(f"sandbox:x:{gid}:")
    files = {
        "/etc/passwd": passwd,
        "/etc/group": group,
        "/etc/hosts": ["127.0.0.1 localhost sandbox", "::1 localhost ip6-localhost ip6-loopback"],
        "/etc/nsswitch.conf": ["passwd: files", "group: files", "shadow: files", "hosts: files"],
    }
    return {path: "".join(line + "\n" for line in lines).encode() for path, lines in files.items()}


def _hide_candidates() -> list[str]:
    """Homes, the trainer's working directory (where configs and ``.env`` files live) and ``/run``
    (container secrets), resolved. None of them is mounted; one that lies inside a mounted directory
    (``/usr/src/app``, a working directory inside a virtual environment) is hidden again. ``/`` and a
    directory that holds a system directory are never hidden."""
    out = []
    for d in ["/root", "/home", os.path.expanduser("~"), os.getcwd(), "/run"]:
        d = os.path.realpath(d)
        if os.path.isdir(d) and not any(_is_under(s, d) for s in _SYSTEM_DIRS):
            out.append(d)
    return sorted(set(out))


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


def _absolute_paths(paths: Paths) -> tuple[str, ...]:
    """A user's extra read-only paths (the ``read_only_paths`` option: a list, or one path), absolute (a
    relative one is taken from the trainer's working directory); RewardError for one that does not exist.

    Example: ``_absolute_paths("data/fixtures")`` -> ``("/home/me/project/data/fixtures",)``."""
    paths = [paths] if isinstance(paths, str) else list(paths or ())
    out = tuple(os.path.abspath(os.path.expanduser(str(p))) for p in paths)
    missing = [p for p in out if not os.path.exists(p)]
    if missing:
        raise RewardError(f"code sandbox: read_only_paths names {missing[0]}, which does not exist")
    return out


def _shown_paths(python: str, extra: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The host paths bound in read-only besides the system's (the interpreter's, then ``extra``: the
    user's), and the hidden directories that lie inside a mounted one, to cover again with an empty tmpfs.
    A path that lies in such a directory is bound again on top, so exactly it shows and nothing else."""
    hide = _hide_candidates()
    needed = _python_paths(python)
    clash = [p for p in needed if p in hide or p in _PRIVATE_DIRS]
    if clash:
        raise RewardError(
            f"code sandbox: the Python interpreter {python!r} needs {clash[0]}, which is itself a "
            f"directory the sandbox hides ({', '.join([*_PRIVATE_DIRS, *hide])}); binding it back would "
            "show that directory to the programs. "
            "Install Python (or its virtual environment) in a directory of its own, outside the trainer's "
            "working directory."
        )
    links = [s for s in _SYSTEM_DIRS if os.path.islink(s)]  # /bin -> usr/bin: shown through /usr
    system = [s for s in _SYSTEM_DIRS if os.path.isdir(s) and s not in links]
    wanted = sorted({p for p in [*needed, *extra] if not any(_is_under(p, s) for s in links)})
    roots = _outermost([*system, *wanted])
    rehide = [d for d in hide if d not in wanted and any(_is_under(d, r) and d != r for r in roots)]
    binds = [p for p in wanted if (p in roots and p not in system) or any(_is_under(p, d) for d in rehide)]
    return binds, rehide


def _host_mount(path: str) -> list[str]:
    """Show host ``path`` at the same place, read-only; a symlink (``/bin -> usr/bin``) as the same one."""
    return ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]


def _mounts(
    python: str, extra: tuple[str, ...], data_fds: dict[str, int], tmp_mb: int, sized: bool = True
) -> list[tuple[str, list[str]]]:
    """The whole file system the program sees, on bwrap's empty root, as (destination, bwrap options): the
    system directories, the named /etc files, ``/dev``'s minimal nodes, its own ``/proc``, a private
    ``/tmp`` and ``/dev/shm``, the interpreter's paths and ``extra``, the files in ``data_fds``
    (destination -> fd) and the hidden directories covered again. Parents first (bwrap mounts in order, so
    a bind under ``/tmp`` or a hidden directory shows through it); last, ``/`` and the covers go read-only."""
    binds, rehide = _shown_paths(python, extra)
    size = ["--size", str(tmp_mb * 1024 * 1024)] if sized else []
    system = [p for p in (*_SYSTEM_DIRS, *_ETC_FILES) if os.path.lexists(p)]
    ops = [(p, _host_mount(p)) for p in system if not any(_is_under(p, b) for b in binds)]  # else shown
    ops += [("/dev", ["--dev", "/dev"]), ("/proc", ["--proc", "/proc"])]
    ops += [(d, [*size, "--tmpfs", d]) for d in _PRIVATE_DIRS]
    ops += [(p, ["--ro-bind", p, p]) for p in binds] + [(d, ["--tmpfs", d]) for d in rehide]
    ops += [(dest, ["--ro-bind-data", str(fd), dest]) for dest, fd in data_fds.items()]
    ops.sort(key=lambda op: op[0])  # a parent sorts before what lies in it
    return ops + [(d, ["--remount-ro", d]) for d in [*rehide, "/dev", "/"]]


def mounted_paths(python: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """Every path the sandbox mounts for programs run on ``python`` (default ``sys.executable``) with the
    user's ``extra`` read-only paths, as the program sees them; the directories leading to them exist too,
    empty. Example (merged-/usr Debian, pyenv): ``['/bin', '/dev', '/dev/shm', '/etc/group', '/etc/hosts',
    '/etc/ld.so.cache', '/etc/localtime', '/etc/nsswitch.conf', '/etc/passwd', '/lib', '/lib64', '/proc',
    '/root/.pyenv/versions/3.11.7', '/sbin', '/tmp', '/tmp/.aha/runner.py', '/usr']``."""
    fds = dict.fromkeys([*_etc_data(), f"{_INSIDE}/runner.py"], -1)
    ops = _mounts(os.path.abspath(python or sys.executable), extra, fds, 1, sized=False)
    return sorted({dest for dest, op in ops if op[0] != "--remount-ro"})
