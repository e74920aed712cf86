"""Files written whole or not at all, and their digests."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tinyldm.cli import CheckpointError


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, e.g. of the autoencoder checkpoint, for a cache key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_atomically(obj: object, path: str | os.PathLike, *, what: str, kept: str) -> Path:
    """torch.save(obj) to a temporary file beside `path`, synced, then renamed: a crash never leaves
    half a file. A failed write (a full disk) removes the temporary file and ends in one line
    (CheckpointError) saying what `path` still holds: `kept`, or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows when both live in the same folder
    except BaseException as e:
        full = _disk_full(e, path.parent)  # measured before the temporary file goes
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, OSError | RuntimeError) or isinstance(e, NotImplementedError):
            raise
        # torch.save reports a failed write (a full disk) as RuntimeError or OSError
        before = f"{path} still holds {kept}" if path.exists() else f"nothing was written to {path}"
        raise CheckpointError(f"writing {what} {path} failed ({full or _reason(e)}); {before}, "
                              "and the temporary file was removed. Free some disk space (or choose "
                              "another --out) and run again") from e
    return path


def _disk_full(e: BaseException, folder: Path) -> str | None:
    """What a write that failed for a full disk says (torch's zip writer reports it as a
    RuntimeError about positions), else None."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if getattr(e, "errno", None) == errno.ENOSPC or free < 2**20:
        return f"No space left on device: {free // 1024} KiB free on it"
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__
