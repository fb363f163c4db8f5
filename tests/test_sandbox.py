"""Hostile programs against the code sandbox: one test per property, each checking the score and the host.

Every test runs real model-style code through ``code_reward`` (real bwrap, real processes) and then checks
that the host is unharmed: files, processes, memory, network, environment. Limits are kept small so the
whole file runs in seconds.
"""

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import rewards
from rewards import RewardError, sandbox
from rewards import _sandbox_view as sandbox_view
from rewards.code import code_reward
from rewards.sandbox import Limits, RunResult, check_sandbox, run_python

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("CI"),
    reason="bwrap is not installed (apt-get install -y bubblewrap); in CI these tests always run",
)

FAST = {"timeout": 2.0, "memory_mb": 256}
FAST_LIMITS = Limits(timeout_s=5, memory_mb=256)


def score(program: str, tests, **options) -> float:
    """The code reward for one completion holding ``program``."""
    completion = f"Here is my solution.\n```python\n{program}\n```"
    return code_reward(["q"], [completion], tests=[tests], **{**FAST, **options})[0]


def sandbox_processes() -> list[int]:
    """Host processes that belong to a sandbox run (bwrap and the runner inside it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"/tmp/.aha/runner.py" in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every hostile test also checks that nothing it started outlives it."""
    yield
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


def test_polite_program_passes():  # the control: the sandbox is not simply failing everything
    program = "def add(a, b):\n    return a + b\nprint('hello')"
    assert score(program, "assert add(1, 2) == 3\nassert add(2, 2) == 4") == 1.0


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    start = time.monotonic()
    assert score("while True:\n    pass", "assert True", timeout=1.0) == 0.0
    assert (
        time.monotonic() - start < 30
    )  # ended by the sandbox, not left running (slack for a loaded machine)


def test_fork_bomb_cannot_start_processes():
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    counts, done = [], threading.Event()

    def watch():  # forked children would inherit the runner's command line, so they would be counted
        while not done.is_set():
            counts.append(len(sandbox_processes()))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        assert score(program, "assert True", timeout=1.0) == 0.0
    finally:
        done.set()
        watcher.join()
    assert (
        time.monotonic() - start < 30
    )  # ended by the sandbox, not left running (slack for a loaded machine)
    assert 0 < max(counts) <= 3  # bwrap, its PID-namespace init and the runner: nothing more, ever
    assert subprocess.run(["true"]).returncode == 0  # and the host can still start processes


def test_subprocesses_are_denied_but_threads_work():
    program = (
        "import subprocess, threading\n"
        "try:\n    subprocess.run(['true'])\n    spawned = True\nexcept OSError:\n    spawned = False\n"
        "out = []\nt = threading.Thread(target=out.append, args=[1])\nt.start()\nt.join()"
    )
    assert score(program, "assert out == [1]\nassert spawned") == 0.5


def test_memory_bomb_hits_the_address_space_limit():
    program = "chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))"
    start = time.monotonic()
    assert score(program, "assert True", memory_mb=256) == 0.0
    assert (
        time.monotonic() - start < 30
    )  # ended by the sandbox, not left running (slack for a loaded machine)
    result = run_python({"solution.py": program.encode()}, "stdio", b"", Limits(timeout_s=5, memory_mb=256))
    assert result.returncode == 1 and b"MemoryError" in result.stderr
    # The program's own peak, measured inside the sandbox: the host's wait4() figure would include the
    # trainer's memory, which Linux charges to a forked child up to its exec.
    measuring = (
        "import resource\nchunks = []\ntry:\n    while True:\n        chunks.append(bytearray(32 << 20))\n"
        "except MemoryError:\n    chunks.clear()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    result = run_python({"solution.py": measuring.encode()}, "stdio", b"", Limits(timeout_s=5, memory_mb=256))
    assert result.returncode == 0, result.stderr
    assert 0 < int(result.stdout) < 256  # the program never held more than its limit


def test_cannot_write_or_delete_files_outside_its_temp_dir():
    host_dir = Path(tempfile.mkdtemp(prefix="aha-sandbox-", dir="/var/tmp"))  # shown read-only, by request
    try:
        host_dir.chmod(0o777)
        victim = host_dir / "victim.txt"
        victim.write_text("original")
        victim.chmod(0o666)
        program = f"""
import os
def attempt(action):
    try:
        action()
        return True
    except OSError:
        return False
own_tmp = attempt(lambda: open('/tmp/mine.txt', 'w').write('ok'))
created = attempt(lambda: open('{host_dir}/new.txt', 'w').write('pwned'))
appended = attempt(lambda: open('{victim}', 'a').write('pwned'))
deleted = attempt(lambda: os.remove('{victim}'))
renamed = attempt(lambda: os.rename('{victim}', '{host_dir}/moved.txt'))
readable = open('{victim}').read() == 'original'
elsewhere = [attempt(lambda: open(f'{{d}}/new.txt', 'w').write('x')) for d in ('/', '/etc', '/usr', '/dev')]
"""
        tests = (
            "assert own_tmp\nassert readable\nassert created\nassert appended\nassert deleted\n"
            "assert renamed\nassert any(elsewhere)"
        )
        # only its own /tmp is writable; the host directory it was shown can be read, not changed
        assert score(program, tests, read_only_paths=[str(host_dir)]) == pytest.approx(2 / 7)
        assert sorted(p.name for p in host_dir.iterdir()) == ["victim.txt"]
        assert victim.read_text() == "original"
    finally:
        shutil.rmtree(host_dir)


def test_cannot_regain_capabilities_to_remount_the_host_read_write():
    host_dir = Path(tempfile.mkdtemp(prefix="aha-sandbox-", dir="/var/tmp"))
    try:
        host_dir.chmod(0o777)
        program = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND = 32, 4096
def remount(path):
    return libc.mount(b"none", path, None, MS_REMOUNT | MS_BIND, None) == 0
remounted = remount(b"/") or remount(b"/usr") or remount(b"{host_dir}")
new_userns = libc.unshare(0x10000000 | 0x00020000) == 0  # CLONE_NEWUSER | CLONE_NEWNS
remounted_later = remount(b"/") or remount(b"/usr") or remount(b"{host_dir}")
try:
    open('{host_dir}/pwned', 'w').write('x')
    wrote = True
except OSError:
    wrote = False
"""
        tests = "assert remounted\nassert new_userns\nassert remounted_later\nassert wrote"
        assert score(program, tests, read_only_paths=[str(host_dir)]) == 0.0  # shown, read-only
        assert list(host_dir.iterdir()) == []
    finally:
        shutil.rmtree(host_dir)


def test_cannot_fill_memory_through_its_temp_dir():
    program = """
written = 0
try:
    for i in range(1000):
        with open(f'/tmp/fill{i}', 'wb') as f:
            f.write(b'x' * (1 << 20))
        written += 1
except OSError:
    pass
"""
    # /tmp is a 64 MiB tmpfs: writing stops there, and the memory goes away with the sandbox
    assert score(program, "assert written >= 200\nassert 1 <= written <= 64") == 0.5


def test_cannot_read_the_trainers_environment_or_working_directory(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("AHA_TEST_API_KEY", secret)
    workdir = Path(tempfile.mkdtemp(prefix="aha-sandbox-", dir="/var/tmp"))  # not under the private /tmp
    (workdir / ".env").write_text(f"API_KEY={secret}\n")
    monkeypatch.chdir(workdir)  # the trainer's working directory is hidden
    program = f"""
import os, glob
texts = [str(dict(os.environ))]
for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline') + ['{workdir}/.env', '/proc/{os.getpid()}/environ']:
    try:
        texts.append(open(path, 'rb').read().decode(errors='replace'))
    except OSError:
        pass
found = any('{secret}' in t for t in texts)
print(*texts)
"""
    try:
        assert score(program, "assert 'PATH' in os.environ\nassert found") == 0.5
        result = run_python(
            {"solution.py": program.encode()}, "stdio", b"", Limits(timeout_s=2, memory_mb=256)
        )
        assert result.returncode == 0 and secret.encode() not in result.stdout
    finally:
        shutil.rmtree(workdir)


def test_cannot_open_a_network_connection():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = f"""
import socket
def connects(address):
    try:
        socket.create_connection(address, timeout=0.5).close()
        return True
    except OSError:
        return False
host_loopback = connects(('127.0.0.1', {port}))
internet = connects(('1.1.1.1', 53))
try:
    socket.getaddrinfo('pypi.org', 443)
    resolved = True
except OSError:
    resolved = False
"""
    try:
        assert score(program, "assert host_loopback\nassert internet\nassert resolved") == 0.0
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody reached the host's listener
    finally:
        listener.close()


def test_cannot_kill_its_parent_or_host_processes():
    canary = subprocess.Popen(["sleep", "60"])
    try:
        program = f"""
import os, signal
def try_kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False
canary = try_kill({canary.pid})
host_parent = try_kill({os.getpid()})
try_kill(os.getppid())
try_kill(-1)
"""
        assert score(program, "assert not canary\nassert not host_parent") == 1.0
        assert canary.poll() is None  # the host process it aimed at is alive, and so are we
    finally:
        canary.send_signal(signal.SIGKILL)
        canary.wait()


def test_printing_gigabytes_is_cut_off():
    program = "import sys\nchunk = 'x' * (1 << 16)\nwhile True:\n    sys.stdout.write(chunk)"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    assert score(program, [{"input": "", "output": "x"}], timeout=5.0) == 0.0
    assert (
        time.monotonic() - start < 30
    )  # ended by the sandbox, not left running (slack for a loaded machine)
    result = run_python({"solution.py": program.encode()}, "stdio", b"", Limits(timeout_s=5, memory_mb=256))
    assert result.output_capped and len(result.stdout) == Limits().output_bytes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024  # KiB


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "raise SystemExit",
        "import sys\nsys.stdout.write('\\nxxxx pass 0\\npass 0\\n')\nsys.exit(0)",  # forged report lines
    ],
)
def test_exiting_before_the_tests_run_does_not_count_as_a_pass(program):
    assert score(program, "assert False\nassert False") == 0.0
    stdio = [{"input": "", "output": ""}]  # an empty expected output: exiting 0 early is not enough...
    assert score(program + "\nprint('unreachable')", [{"input": "", "output": "ok"}]) == 0.0
    assert score("print('ok')", stdio) == 0.0  # ...and a wrong output fails


# --- what the program sees: an allowlist of host paths, nothing else ----------------------------------------

PROBE = """
import json, os
def read(path):
    try:
        with open(path, 'rb') as f:
            return f.read().decode(errors='replace')
    except OSError:
        return None
def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None
"""
SYSTEM_TOP = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp"}
ETC_ALLOWED = {"ld.so.cache", "localtime", "passwd", "group", "hosts", "nsswitch.conf"}


def probe(body: str, **options) -> dict:
    """Run ``PROBE`` + ``body`` (which prints one JSON line) in the sandbox; the parsed line."""
    result = run_python({"solution.py": (PROBE + body).encode()}, "stdio", b"", FAST_LIMITS, **options)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def plant(base: str) -> tuple[Path, str]:
    """A fresh world-readable directory in ``base`` holding ``token`` with a new secret: nothing but the
    sandbox's view keeps a program from reading it."""
    d = Path(tempfile.mkdtemp(prefix="aha-secret-", dir=base))
    secret = secrets.token_hex(16)
    (d / "token").write_text(secret)
    d.chmod(0o755)
    (d / "token").chmod(0o644)
    return d, secret


@pytest.fixture
def planted(monkeypatch):
    """Secrets in fresh directories under /opt, /srv, /var/lib and /mnt (outside any home) and in a sibling of
    the trainer's working directory, which is a fresh directory too; yields {token path: secret}. Removed
    after."""
    root = Path(tempfile.mkdtemp(prefix="aha-sandbox-", dir="/var/tmp"))
    made = [root]
    try:
        root.chmod(0o755)
        (root / "project").mkdir()
        monkeypatch.chdir(root / "project")
        found = {}
        for base in ["/opt", "/srv", "/var/lib", "/mnt", str(root)]:
            if os.path.isdir(base) and os.access(base, os.W_OK):
                d, secret = plant(base)
                made.append(d)
                found[str(d / "token")] = secret
        if len(found) < 2:
            pytest.skip("needs write access to /opt, /srv, /var/lib or /mnt (run as root, as CI does)")
        yield found
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


def unmounted(paths: list[str]) -> list[str]:
    """``paths`` that neither are nor hold a path the sandbox mounts (an interpreter may live in /opt)."""
    mounted = sandbox.mounted_paths()
    return [p for p in paths if not any(m == p or m.startswith(p.rstrip("/") + "/") for m in mounted)]


def test_files_outside_the_allowlist_cannot_be_read_or_listed(planted):
    secret_dirs = [str(Path(p).parent) for p in planted]
    dirs = ["/opt", "/srv", "/var", "/var/lib", "/mnt", "/home", "/run", "/boot", "/media", "/sys"]
    dirs = unmounted([*dirs, "/sys/class/net", str(Path.cwd().parent), *secret_dirs])
    files = [*planted, "/etc/shadow", "/etc/gshadow", "/etc/hostname", "/etc/os-release"]
    body = f"""
print(json.dumps({{
    "read": [p for p in {files!r} if read(p) is not None],
    "listed": [d for d in {dirs!r} if listing(d) is not None],
    "passwd": read('/etc/passwd'),
    "cmdlines": [read(f'/proc/{{p}}/cmdline') for p in os.listdir('/proc') if p.isdigit()],
}}))
"""
    seen = probe(body)
    assert seen["read"] == [] and seen["listed"] == []
    assert seen["passwd"] == sandbox._etc_data()["/etc/passwd"].decode()  # written for it, not the host's
    cmdlines = "\n".join(c or "" for c in seen["cmdlines"])
    assert os.getcwd() not in cmdlines and "--ro-bind" not in cmdlines  # bwrap's options came by --args
    assert not any(secret in json.dumps(seen) for secret in planted.values())
    # the same, scored by the code reward and run by the python tool
    assert score(PROBE + body, "assert read(" + repr(next(iter(planted))) + ") is None") == 1.0
    from rollouts.tools import python as python_tool

    observation = python_tool(f"print(open({next(iter(planted))!r}).read())", timeout_s=5, memory_mb=256)
    assert "FileNotFoundError" in observation and not any(s in observation for s in planted.values())


def test_the_root_and_etc_show_only_what_the_allowlist_mounts():
    mounted = sandbox.mounted_paths()
    seen = probe("print(json.dumps({'/': listing('/'), '/etc': listing('/etc'), '/sys': listing('/sys')}))")
    interpreter_top = {Path(p).parts[1] for p in sandbox._python_paths(sys.executable)}
    assert set(seen["/"]) == {Path(p).parts[1] for p in mounted}
    assert set(seen["/"]) <= SYSTEM_TOP | interpreter_top  # /opt, /srv, /var, /mnt, /home, /sys... absent
    assert seen["/etc"] == sorted(Path(p).name for p in mounted if p.startswith("/etc/"))
    assert set(seen["/etc"]) <= ETC_ALLOWED
    assert seen["/sys"] is None


def test_a_home_or_working_directory_inside_a_mounted_system_directory_is_hidden(monkeypatch):
    if not os.access("/usr/local", os.W_OK):
        pytest.skip("needs write access to /usr/local (run as root, as CI does)")
    app = Path(tempfile.mkdtemp(prefix="aha-app-", dir="/usr/local"))  # a Docker habit: WORKDIR /usr/src/app
    try:
        (app / ".env").write_text("API_KEY=secret\n")
        monkeypatch.chdir(app)
        seen = probe(f"print(json.dumps([listing({str(app)!r}), read({str(app / '.env')!r})]))")
        assert seen == [[], None]
        assert str(app) in sandbox.mounted_paths()  # covered by an empty read-only directory
    finally:
        shutil.rmtree(app)


CONTROLS = """
import asyncio, ctypes, datetime, decimal, fractions, getpass, hashlib, heapq, json, locale, math, os, pwd
import random, re, socket, sqlite3, ssl, statistics, tempfile, threading, time, unicodedata, zoneinfo
from concurrent.futures import ThreadPoolExecutor
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, 'f.txt'), 'w') as f:
        f.write('x')
    wrote = open(os.path.join(d, 'f.txt')).read() == 'x'
out = []
thread = threading.Thread(target=out.append, args=[1])
thread.start()
thread.join()
checks = {
    'json': json.loads(json.dumps({'a': [1, 2.5]})) == {'a': [1, 2.5]},
    'math': math.comb(5, 2) == 10 and math.isclose(math.sqrt(2) ** 2, 2),
    're': re.findall(r'[0-9]+', 'a1b22') == ['1', '22'],
    'tempfile': wrote,
    'threads': out == [1] and list(ThreadPoolExecutor(4).map(abs, [-1, -2, -3])) == [1, 2, 3],
    'asyncio': asyncio.run(asyncio.sleep(0, 'ok')) == 'ok',
    'numbers': decimal.Decimal('0.1') * 3 == decimal.Decimal('0.3') and fractions.Fraction(1, 3) * 3 == 1,
    'statistics': statistics.median([3, 1, 2]) == 2 and heapq.nsmallest(2, [3, 1, 2]) == [1, 2],
    'random': random.Random(0).random() == random.Random(0).random(),
    'hashlib': hashlib.sha256(b'').hexdigest().startswith('e3b0c442'),
    'sqlite3': sqlite3.connect(':memory:').execute('select 1 + 1').fetchone() == (2,),
    'ctypes': ctypes.CDLL('libm.so.6').cabs is not None,
    'ssl': ssl.create_default_context().verify_mode == ssl.CERT_REQUIRED,
    'time': time.localtime().tm_year >= 2024 and datetime.date(2024, 2, 29).isoformat() == '2024-02-29',
    'zoneinfo': str(datetime.datetime(2024, 7, 1, tzinfo=zoneinfo.ZoneInfo('Europe/Paris'))).endswith('+02:00'),
    'user': pwd.getpwuid(os.getuid()).pw_name == getpass.getuser(),
    'host': socket.gethostname() == 'sandbox' and socket.gethostbyname('localhost') == '127.0.0.1',
    'cpus': (os.cpu_count() or 0) >= 1,
    'locale': locale.getpreferredencoding() == 'UTF-8' and unicodedata.name('é').startswith('LATIN'),
}
try:
    import numpy as np
except ImportError:
    pass
else:
    a = np.arange(6.0).reshape(2, 3)
    inverse = float(np.linalg.inv(np.eye(3)).sum())
    checks['numpy'] = (a @ a.T).tolist() == [[5.0, 14.0], [14.0, 50.0]] and inverse == 3.0
print(json.dumps(checks))
"""
INTERPRETERS = [sys.executable] + [
    p
    for p in ["/usr/bin/python3"]
    if os.path.exists(p) and os.path.realpath(p) != os.path.realpath(sys.executable)
]


@pytest.mark.parametrize("python", INTERPRETERS)
def test_everyday_programs_still_work(python):
    # the controls: the standard library and numpy need nothing the allowlist leaves out (/sys, /etc/ssl)
    result = run_python({"solution.py": CONTROLS.encode()}, "stdio", b"", Limits(timeout_s=30), python=python)
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    checks = json.loads(result.stdout)
    assert all(checks.values()), checks
    has_numpy = subprocess.run([python, "-I", "-c", "import numpy"], capture_output=True).returncode == 0
    assert ("numpy" in checks) == has_numpy


REFERENCES = [  # MBPP-style tasks with reference solutions, leaning on the modules such solutions import
    (
        "import re\ndef strip_spaces(s):\n    return re.sub(r'\\s+', '', s)",
        ["assert strip_spaces(' a b\\tc ') == 'abc'"],
    ),
    (
        "import heapq as hq\ndef smallest(xs, n):\n    return hq.nsmallest(n, xs)",
        ["assert smallest([5, 1, 4, 2], 2) == [1, 2]"],
    ),
    (
        "from collections import Counter\ndef top(xs):\n    return Counter(xs).most_common(1)[0][0]",
        ["assert top('abracadabra') == 'a'", "assert top([3, 3, 1]) == 3"],
    ),
    (
        "from itertools import combinations\ndef pairs(xs, k):\n"
        "    return sum(a + b == k for a, b in combinations(xs, 2))",
        ["assert pairs([1, 5, 7, -1], 6) == 2"],
    ),
    (
        "import math\ndef is_prime(n):\n    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))",
        ["assert is_prime(13)", "assert not is_prime(15)"],
    ),
    (
        "import bisect\ndef left_insertion(a, x):\n    return bisect.bisect_left(a, x)",
        ["assert left_insertion([1, 2, 4, 5], 3) == 2"],
    ),
    (
        "from functools import lru_cache\n@lru_cache(None)\ndef fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)",
        ["assert fib(60) == 1548008755920"],
    ),
    (
        "import cmath\ndef to_polar(z):\n    return cmath.polar(z)",
        ["assert to_polar(1j) == (1.0, cmath.pi / 2)"],
    ),
    (
        "import sys\ndef smallest_int(xs):\n    m = sys.maxsize\n    for x in xs:\n"
        "        m = min(m, x)\n    return m",
        ["assert smallest_int([4, -2, 9]) == -2"],
    ),
    (
        "import datetime\ndef weekday(y, m, d):\n    return datetime.date(y, m, d).strftime('%A')",
        ["assert weekday(2024, 2, 29) == 'Thursday'"],
    ),
    ("n = int(input())\nprint(sum(map(int, input().split()[:n])))", [{"input": "3\n1 2 3\n", "output": "6"}]),
    (
        "import sys\nwords = sys.stdin.read().split()\nprint(len(set(words)))",
        [{"input": "a b a\nc\n", "output": "3"}],
    ),
]


def test_a_benchmarks_reference_solutions_still_score_full_marks():
    from rl.datasets import _mbpp_row

    rows = [json.loads(line) for line in (Path(__file__).parent / "fixtures" / "mbpp_test.jsonl").open()]
    cases = [(row["code"], _mbpp_row(row)["tests"]) for row in rows] + REFERENCES
    completions = [f"```python\n{code}\n```" for code, _ in cases]
    scores = code_reward(["q"] * len(cases), completions, tests=[t for _, t in cases], timeout=10.0)
    assert scores == [1.0] * len(cases)


# --- read_only_paths: a path a task needs, shown read-only -----------------------------------------------


def test_read_only_paths_show_exactly_those_paths_read_only(planted):
    if not os.access("/opt", os.W_OK):
        pytest.skip("needs write access to /opt (run as root, as CI does)")
    data_dir, _ = plant("/opt")
    try:
        (data_dir / "data.txt").write_text("rows")
        beside = [p for p in planted if p.startswith("/opt/")] + [str(Path.cwd().parent)]
        body = f"""
def write(path):
    try:
        open(path, 'w').write('x')
        return True
    except OSError:
        return False
print(json.dumps({{
    "data": read({str(data_dir / "data.txt")!r}),
    "listing": listing({str(data_dir)!r}),
    "wrote": write({str(data_dir / "new.txt")!r}) or write({str(data_dir / "data.txt")!r}),
    "beside": [read(p) or listing(p) for p in {beside!r}],
}}))
"""
        seen = probe(body, read_only_paths=[str(data_dir)])
        assert seen == {
            "data": "rows",
            "listing": ["data.txt", "token"],
            "wrote": False,
            "beside": [None] * 2,
        }
        assert (data_dir / "data.txt").read_text() == "rows" and not (data_dir / "new.txt").exists()
        # the code reward's and the python tool's option of the same name
        tests = f"assert open({str(data_dir / 'data.txt')!r}).read() == 'rows'"
        assert score("", tests) == 0.0 and score("", tests, read_only_paths=[str(data_dir)]) == 1.0
        from rollouts.tools import python as python_tool

        call = f"print(open({str(data_dir / 'data.txt')!r}).read())"
        assert python_tool(call, timeout_s=5, read_only_paths=[str(data_dir)]) == "rows\n"
    finally:
        shutil.rmtree(data_dir)


def test_a_working_directory_inside_a_read_only_path_stays_hidden(planted):
    parent = Path.cwd().parent  # holds the working directory and a sibling with a secret
    (Path.cwd() / ".env").write_text("API_KEY=secret\n")
    sibling = next(p for p in planted if p.startswith(str(parent)))
    body = f"print(json.dumps([listing({os.getcwd()!r}), read({sibling!r})]))"
    assert probe(body, read_only_paths=[str(parent)]) == [[], planted[sibling]]  # asked for, so shown
    named = probe(f"print(json.dumps(listing({os.getcwd()!r})))", read_only_paths=[str(parent), os.getcwd()])
    assert named == [".env"]  # a hidden directory shows only when named itself


def test_a_read_only_path_that_does_not_exist_is_refused_at_start_up():
    with pytest.raises(RewardError, match="read_only_paths names /nonexistent-aha, which does not exist"):
        check_sandbox(read_only_paths=["/nonexistent-aha"])
    with pytest.raises(RewardError, match="does not exist"):
        score("x = 1", "assert x == 1", read_only_paths=["/nonexistent-aha"])


# --- an interpreter under /tmp (a virtual environment there, as on many CI machines) ----------------------


@pytest.fixture(scope="module")
def tmp_python():
    """The interpreter of a fresh virtual environment in ``/tmp/aha-venv-*/venv``; beside it lies a file the
    sandbox must not show (binding the interpreter back must not bring the rest of the real /tmp with it)."""
    root = Path(tempfile.mkdtemp(prefix="aha-venv-", dir="/tmp"))
    try:
        venv = root / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
        )
        (root / "beside.txt").write_text("beside the venv")
        yield str(venv / "bin" / "python")
    finally:
        shutil.rmtree(root)


def test_a_trainer_running_from_an_interpreter_under_tmp_can_sandbox_programs(tmp_python):
    # The trainer itself runs on the /tmp interpreter, so the sandbox's default (sys.executable) is that one.
    script = (
        "from rewards.sandbox import Limits, check_sandbox, run_python\n"
        "check_sandbox()\n"
        "result = run_python({'solution.py': b'import sys; print(sys.prefix)'}, 'stdio', b'', Limits())\n"
        "print(result.returncode, result.stdout.decode().strip(), result.stderr.decode())\n"
    )
    paths = [str(Path(rewards.__file__).parents[1]), *(p for p in sys.path if p)]  # the trainer's imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run([tmp_python, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", str(Path(tmp_python).parents[1])]


def test_an_interpreter_under_tmp_shows_nothing_else_of_tmp_and_is_read_only(tmp_python):
    venv = Path(tmp_python).parents[1]
    host_dir = Path(tempfile.mkdtemp(prefix="aha-sandbox-", dir="/var/tmp"))
    loose = Path(tempfile.mkstemp(prefix="aha-loose-", dir="/tmp")[1])  # a file directly in the real /tmp
    try:
        host_dir.chmod(0o777)
        before = sorted(p.relative_to(venv) for p in venv.rglob("*"))
        program = f"""
import json, os, socket, sys
def attempt(action):
    try:
        action()
        return True
    except OSError:
        return False
print(json.dumps({{
    "prefix": sys.prefix,
    "own_tmp": attempt(lambda: open('/tmp/mine.txt', 'w').write('ok')),
    "into_venv": attempt(lambda: open('{venv}/pwned.txt', 'w').write('pwned')),
    "venv_bin": attempt(lambda: os.remove('{tmp_python}')),
    "host": attempt(lambda: open('{host_dir}/pwned.txt', 'w').write('pwned')),
    "beside": attempt(lambda: open('{venv.parent}/beside.txt').read()),
    "loose": attempt(lambda: open('{loose}').read()),
    "listing": sorted(os.listdir('/tmp')) + sorted(os.listdir('{venv.parent}')),
    "fork": attempt(os.fork),
    "network": attempt(lambda: socket.create_connection(('1.1.1.1', 53), timeout=0.5)),
}}))
"""
        result = run_python({"solution.py": program.encode()}, "stdio", b"", FAST_LIMITS, python=tmp_python)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        assert seen.pop("prefix") == str(venv) and seen.pop("own_tmp")  # it ran on the /tmp interpreter
        assert seen.pop("listing") == sorted([".aha", venv.parent.name, "mine.txt"]) + ["venv"]
        assert not any(seen.values()), seen  # no writes outside its /tmp, no other /tmp file, fork, network
        assert sorted(p.relative_to(venv) for p in venv.rglob("*")) == before
        assert list(host_dir.iterdir()) == []
    finally:
        shutil.rmtree(host_dir)
        loose.unlink()


def test_a_working_directory_inside_the_bound_interpreter_stays_hidden(tmp_python, monkeypatch):
    workdir = Path(tmp_python).parents[1] / "src" / "project"  # e.g. a package checked out by pip -e
    workdir.mkdir(parents=True)
    (workdir / ".env").write_text("API_KEY=secret\n")
    monkeypatch.chdir(workdir)
    try:
        program = f"import os\nprint(os.listdir('{workdir}'))"
        result = run_python({"solution.py": program.encode()}, "stdio", b"", FAST_LIMITS, python=tmp_python)
        assert (result.returncode, result.stdout) == (0, b"[]\n"), result.stderr
    finally:
        shutil.rmtree(workdir.parent)


@pytest.mark.parametrize("place", ["home", "opt", "workdir"])
def test_an_interpreter_in_a_home_a_prefix_in_opt_or_the_working_directory_works(place, monkeypatch):
    # ~/venv, a conda-like prefix in /opt, uv's .venv in the project: each bound, and nothing beside it
    if place == "opt" and not os.access("/opt", os.W_OK):
        pytest.skip("needs write access to /opt (run as root, as CI does)")
    root = Path(tempfile.mkdtemp(prefix="aha-venv-", dir="/opt" if place == "opt" else "/var/tmp"))
    try:
        root.chmod(0o755)
        (root / "beside.txt").write_text("beside the interpreter")
        venv = root / {"home": "venv", "opt": "conda", "workdir": ".venv"}[place]
        if place == "home":
            monkeypatch.setenv("HOME", str(root))
        if place == "workdir":
            monkeypatch.chdir(root)
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
        )
        python = str(venv / "bin" / "python")
        body = f"""
import sys
try:
    import numpy
    has_numpy = True
except ImportError:
    has_numpy = False
print(json.dumps([sys.prefix, listing({str(root)!r}), read({str(root / "beside.txt")!r}), listing('/'), has_numpy]))
"""
        prefix, beside, text, top, has_numpy = probe(body, python=python)
        assert (prefix, beside, text) == (str(venv), [venv.name], None)
        assert set(top) <= SYSTEM_TOP | {Path(p).parts[1] for p in sandbox._python_paths(python)}
        host_numpy = subprocess.run([python, "-I", "-c", "import numpy"], capture_output=True).returncode == 0
        assert has_numpy == host_numpy
    finally:
        shutil.rmtree(root)


def test_an_interpreter_that_is_the_working_directory_is_refused(tmp_python, monkeypatch):
    monkeypatch.chdir(Path(tmp_python).parents[1])  # binding the interpreter back would show all of it
    with pytest.raises(
        RewardError, match="needs .*aha-venv-.*/venv, which is .* a directory the sandbox hides"
    ):
        run_python({"solution.py": b"print(1)"}, "stdio", b"", FAST_LIMITS, python=tmp_python)


@pytest.mark.parametrize("workdir", ["/tmp", "home"])
def test_a_working_directory_or_home_under_tmp_leaves_tmp_writable(workdir, monkeypatch):
    monkeypatch.chdir("/tmp")  # hidden_dirs() once made the program's private /tmp read-only here
    if workdir == "home":
        monkeypatch.setenv("HOME", "/tmp")
    program = "open('/tmp/mine.txt', 'w').write('ok')\nprint(open('/tmp/mine.txt').read())"
    result = run_python({"solution.py": program.encode()}, "stdio", b"", FAST_LIMITS)
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


def test_smoke_test_reports_the_interpreter_it_could_not_start(tmp_python, monkeypatch):
    # as before the fix: nothing bound back (the view of the file system is rewards/_sandbox_view.py's)
    monkeypatch.setattr(sandbox_view, "_python_paths", lambda python: [])
    sandbox._smoke_test.cache_clear()
    try:
        with pytest.raises(RewardError) as error:
            check_sandbox(python=tmp_python)
    finally:
        sandbox._smoke_test.cache_clear()
    message = str(error.value)
    assert f"could not start the Python interpreter {tmp_python}" in message
    assert f"bwrap: execvp {tmp_python}: No such file or directory" in message  # bwrap's own words
    assert "user namespaces" not in message


@pytest.mark.parametrize(
    ("stderr", "expected", "unexpected"),
    [
        (b"bwrap: setting up uid map: Permission denied", "user namespaces", "could not start"),
        (b"bwrap: No permissions to create new namespace, likely because ...", "user namespaces", "start"),
        (b"bwrap: Creating new namespace failed: Operation not permitted", "user namespaces", "start"),
        (b"bwrap: Can't mount proc on /newroot/proc: Operation not permitted", "user namespaces", "start"),
        (b"bwrap: execvp /x/bin/python: Permission denied", "could not start the Python", "namespaces"),
        (b"bwrap: Can't find source path /x: No such file or directory", "bwrap reported", "namespaces"),
        (b"Fatal Python error: init_fs_encoding", "the Python interpreter /x/bin/python in", "namespaces"),
    ],
)
def test_smoke_test_error_blames_user_namespaces_only_for_namespace_errors(stderr, expected, unexpected):
    message = sandbox._smoke_test_error(RunResult(returncode=1, stdout=b"", stderr=stderr), "/x/bin/python")
    assert stderr.decode() in message and expected in message and unexpected not in message


def test_the_python_tool_s_read_only_paths_are_checked_when_the_run_starts():
    from rl.config import load_config
    from rl.rollout import with_tools
    from tests.test_tools import CharTokenizer

    config = load_config(None, ["tools.use=[{name: python, kwargs: {read_only_paths: [/no/such/dir]}}]"])
    with pytest.raises(RewardError, match="/no/such/dir, which does not exist"):
        with_tools(object(), CharTokenizer(), config)  # before any engine is asked for anything
