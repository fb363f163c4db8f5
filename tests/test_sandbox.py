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
    host_dir = Path(tempfile.mkdtemp(prefix="aha-sandbox-", dir="/var/tmp"))  # visible inside, read-only
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
"""
        tests = "assert own_tmp\nassert created\nassert appended\nassert deleted\nassert renamed"
        assert score(program, tests) == 0.2  # only its own /tmp is writable
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
remounted = libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None) == 0
new_userns = libc.unshare(0x10000000 | 0x00020000) == 0  # CLONE_NEWUSER | CLONE_NEWNS
remounted_later = libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None) == 0
try:
    open('{host_dir}/pwned', 'w').write('x')
    wrote = True
except OSError:
    wrote = False
"""
        tests = "assert remounted\nassert new_userns\nassert remounted_later\nassert wrote"
        assert score(program, tests) == 0.0
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
    monkeypatch.setattr(sandbox, "_python_paths", lambda python: [])  # as before the fix: nothing bound back
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
