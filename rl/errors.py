"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class AhaError(Exception):
    """Base class of errors caused by the user's input (recipe, data, model path), not by a bug."""


class ConfigError(AhaError, ValueError):
    """A recipe or override that cannot run; the message says what to change."""


class DataError(AhaError, ValueError):
    """A dataset that cannot be used as configured (missing column, empty, unreadable)."""


DISK_FULL_SIGNS = ("No space left on device", "Disk quota exceeded", "unexpected pos", "File too large")
"""How a full disk reads in the errors of the writers aha uses: the OS's ENOSPC/EDQUOT/EFBIG text, and
torch.save's zip writer, which reports a short write as `unexpected pos N vs M`."""


def write_error(err: BaseException, where: Path, what: str, needed: int | None = None) -> AhaError | None:
    """The error to show for a failed write of `what` under `where`: for a full disk, one clear message with
    the free space there (and what the write needs, when known); None for other failures (a bug: re-raise).

    Example: ``write_error(OSError(28, "No space left on device"), Path("runs/aha"), "metrics.jsonl")`` ->
    ``AhaError("no space left to write metrics.jsonl in runs/aha: 0.0 MiB free on that disk. ...")``.
    """
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or any(
        sign in str(err) for sign in DISK_FULL_SIGNS
    )
    if not full and not isinstance(err, OSError):
        return None
    existing = Path(where)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free / 2**20
    need = f", and it needs about {needed / 2**20:.1f} MiB" if needed else ""
    if full:
        return AhaError(f"no space left to write {what} in {where}: {free:.1f} MiB free on that disk{need}.")
    return AhaError(f"could not write {what} in {where}: {err} ({free:.1f} MiB free on that disk).")
