"""Checkpoints: one file of plain tensors and values, written atomically, read without unpickling
code.

A checkpoint is one `torch.save` dict of tensors and plain Python values (configs as dicts, a
tokenizer's vocabulary as a list), tagged with a `kind` ("autoencoder", "ldm", ...). It is written
to a temporary file in the same folder and renamed (`os.replace`), so a crash never leaves a
half-written file under the real name, and read back with `torch.load(weights_only=True)`, which
refuses anything that would run code.
A missing, truncated, corrupt or wrong-kind file is refused with a `CheckpointError` that says
which, and so is a write that fails (a full disk): the file under the real name is then still the
previous checkpoint.

`RunLock` keeps two runs out of one output folder: `<out>/.lock` names the process that holds it; a
lock left by a process that no longer runs (killed) is taken over with a note.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tinyldm.cli import UsageError

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt, or of the wrong kind."""


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | os.PathLike, payload: dict, *, kind: str) -> Path:
    """torch.save({"kind": kind, "format": 1, **payload}) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"kind": kind, "format": CHECKPOINT_FORMAT, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows when both live in the same folder
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError | RuntimeError) and not isinstance(e, NotImplementedError):
            # torch.save reports a failed write (a full disk) as RuntimeError or OSError
            before = (f"{path} still holds the previous checkpoint, unchanged, which --resume "
                      "continues from" if path.exists() else f"nothing was written to {path}")
            raise CheckpointError(f"writing the checkpoint {path} failed ({_reason(e)}); "
                                  f"{before}. Free some disk space (or choose another --out) and "
                                  "run again") from e
        raise
    return path


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None,
                    map_location: Any = "cpu") -> dict:
    """torch.load(path, weights_only=True), with clear errors for files that are not usable
    checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted write?)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # zip reader errors, EOFError, UnpicklingError for disallowed globals, ...
        raise CheckpointError(
            f"checkpoint {path} could not be read: it is truncated, corrupt, or not a tinyldm "
            f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(data, dict) or "kind" not in data:
        raise CheckpointError(f"{path} is a torch file but not a tinyldm checkpoint "
                              "(no 'kind' entry)")
    if kind is not None and data["kind"] != kind:
        raise CheckpointError(f"{path} is a {data['kind']!r} checkpoint, "
                              f"expected a {kind!r} checkpoint")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {data.get('format')}, "
                              f"expected {CHECKPOINT_FORMAT}")
    return data


# ----------------------------------------------------------------------------------------------
# Devices and random state


# ----------------------------------------------------------------------------------------------
# One run per output folder


class RunLock:
    """`<folder>/.lock`, created exclusively, holding the owner's pid, host, start time and command
    line.

    `acquire` refuses a folder whose lock belongs to a live process (naming it), takes over a lock
    whose process no longer runs on this host (a killed run), and is re-entrant within one process
    (tests run several mains).
    The lock goes when `release` is called or the process exits normally; after SIGKILL it stays,
    and is stale.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.NAME

    @classmethod
    def for_rank_zero(cls, folder: str | os.PathLike) -> RunLock:
        """The lock of `folder`, taken by rank 0 of a torchrun job (or the only process); the other
        ranks hold an untaken one, whose `release` does nothing."""
        lock = cls(folder)
        return lock.acquire() if os.environ.get("RANK", "0") == "0" else lock

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.owner()
                # half-written by a process that is starting, or garbage: look again
                if other is None:
                    time.sleep(0.2)
                    other = self.owner()
                if (other is not None and other.get("pid") == me["pid"]
                        and other.get("host") == me["host"]):
                    break  # this process holds it already
                if other is not None and other.get("host") != me["host"]:
                    raise UsageError(f"{self.path.parent} is in use by process {other.get('pid')} "
                                     f"on {other.get('host')} (started {other.get('started')}: "
                                     f"{other.get('command')}); choose another --out, or delete "
                                     f"{self.path} if that run is over") from None
                if other is not None and _alive(other.get("pid")):
                    raise UsageError(f"{self.path.parent} is in use by process {other['pid']} "
                                     f"(started {other.get('started')}: {other.get('command')}); "
                                     "wait for it, stop it, or choose another --out") from None
                who = (f"process {other['pid']}, which no longer runs" if other
                       else "an unreadable lock")
                print(f"note: taking over {self.path} from {who}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        else:
            raise UsageError(f"could not take the lock {self.path}; delete it if no run is using "
                             f"{self.path.parent}")
        atexit.register(self.release)
        return self

    def release(self) -> None:
        other = self.owner()
        if (other is not None and other.get("pid") == os.getpid()
                and other.get("host") == socket.gethostname()):
            self.path.unlink(missing_ok=True)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
