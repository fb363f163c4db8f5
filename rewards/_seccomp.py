"""The sandbox's seccomp filter: deny process creation (threads allowed) and namespace changes.

A classic-BPF program for `bwrap --seccomp FD` (rewards/sandbox.py): fork, vfork, clone without
CLONE_THREAD, clone3, unshare and setns fail with EPERM; everything else is allowed. None on an architecture
it has no syscall numbers for (the sandbox then runs without it and says so).
"""

from __future__ import annotations

import platform
import struct
from functools import cache

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# (clone, fork, vfork, clone3, unshare, setns); None where the architecture has no such call.
_SYSCALLS = {"x86_64": (56, 57, 58, 435, 272, 308), "aarch64": (220, None, None, 435, 97, 268)}
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


@cache
def seccomp_filter() -> bytes | None:
    """A classic-BPF seccomp program (as bwrap's ``--seccomp FD`` reads it) for this machine's architecture,
    or None where the architecture is not supported."""
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    if arch not in _AUDIT_ARCH:
        return None
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000

    def errno(e: int) -> int:
        return 0x00050000 | e

    clone, fork, vfork, clone3, unshare, setns = _SYSCALLS[arch]
    prog = [_bpf(ld_abs, 0, 0, 4), _bpf(jeq, 1, 0, _AUDIT_ARCH[arch]), _bpf(ret, 0, 0, kill)]
    prog.append(_bpf(ld_abs, 0, 0, 0))  # syscall number
    if arch == "x86_64":  # the x32 ABI reaches the same calls with bit 30 set: deny all of it
        prog += [_bpf(jge, 0, 1, 0x40000000), _bpf(ret, 0, 0, errno(_EPERM))]
    denied = [(fork, _EPERM), (vfork, _EPERM), (unshare, _EPERM), (setns, _EPERM), (clone3, _ENOSYS)]
    for nr, err in denied:  # clone3 -> ENOSYS makes glibc fall back to clone() for threads
        if nr is not None:
            prog += [_bpf(jeq, 0, 1, nr), _bpf(ret, 0, 0, errno(err))]
    prog += [
        _bpf(jeq, 0, 3, clone),
        _bpf(ld_abs, 0, 0, 16),  # low 32 bits of args[0]: the clone flags
        _bpf(jset, 1, 0, _CLONE_THREAD),
        _bpf(ret, 0, 0, errno(_EPERM)),
        _bpf(ret, 0, 0, allow),
    ]
    return b"".join(prog)
