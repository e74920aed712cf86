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
import types
import typing
from functools import cache
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
    return save_atomically({"kind": kind, "format": CHECKPOINT_FORMAT, **payload}, path,
                           what="the checkpoint",
                           kept="the previous checkpoint, unchanged, which --resume continues from")


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
    import errno
    import shutil

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


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None,
                    map_location: Any = "cpu", device: Any = None) -> dict:
    """torch.load(path, weights_only=True), with clear errors for files that are not usable
    checkpoints. A file larger than the free memory is refused before it is read, and its configs
    are checked against its tensors' shapes; with `device`, weights that it (or the CPU, where they
    are built) cannot hold are refused before any module is built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted write?)")
    from tinyldm.training.memory import check_weights

    check_weights(str(path), path.stat().st_size, reading=True)  # a file larger than memory
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
    nbytes = check_shapes(path, data)
    if device is not None:
        check_weights(str(path), nbytes, device)
    return data


def check_shapes(path: str | os.PathLike, data: dict) -> int:
    """Refuse an 'ldm' or 'autoencoder' checkpoint whose configs do not build modules that its
    stored tensors fit, before any real memory is allocated: each module is built on the meta
    device and compared with the stored tensors by name and shape. A crafted config (16,384
    channels beside a few KB of weights) or a missing or mistyped entry ends in one line. Returns
    the bytes of the modules one model needs (the denoiser once, whether EMA or not, and its
    autoencoder)."""
    from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
    from tinyldm.conditioning import ConditionConfig
    from tinyldm.ldm import DiffusionConfig, build_denoiser
    from tinyldm.unet import UNetConfig

    @cache
    def denoiser():  # the same shapes for the weights and their EMA: built once
        return build_denoiser(data["unet_config"], data["cond_config"])

    def autoencoder(entry):
        return lambda: Autoencoder(AutoencoderConfig(**entry["config"]))

    try:
        entries = []
        if data["kind"] == "ldm":
            for key, cls in (("unet_config", UNetConfig), ("cond_config", ConditionConfig),
                             ("diffusion_config", DiffusionConfig)):
                check_types(path, key, cls, data[key])
            check_types(path, "autoencoder config", AutoencoderConfig,
                        data["autoencoder"]["config"])
            DiffusionConfig(**data["diffusion_config"])
            entries += [("the denoiser", denoiser, data["denoiser"])]
            entries += [("the EMA denoiser", denoiser, data["ema"])] if data.get("ema") else []
            entries += [("the autoencoder", autoencoder(data["autoencoder"]),
                         data["autoencoder"]["state_dict"])]
        elif data["kind"] == "autoencoder":
            for key in ("autoencoder", "ema_autoencoder"):
                if key in data and data[key] is not None:
                    check_types(path, f"{key} config", AutoencoderConfig, data[key]["config"])
                    entries.append((f"its {key.replace('_', ' ')}", autoencoder(data[key]),
                                    data[key]["state_dict"]))
            if not entries:
                raise KeyError("autoencoder")
        sizes = {}  # bytes per module ("denoiser", "autoencoder"), an EMA's counted once
        for what, make, state in entries:
            with torch.device("meta"):
                built = make().state_dict()
            want = {k: tuple(v.shape) for k, v in built.items()}
            module = what.split()[-1]
            sizes[module] = max(sizes.get(module, 0),
                                sum(v.numel() * v.element_size() for v in built.values()))
            have = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
            if want != have:
                diff = [f"{k}: config {want.get(k)}, stored {have.get(k)}"
                        for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
                raise CheckpointError(f"{path}: {what}'s config does not match its stored "
                                      f"weights ({len(diff)} tensors differ, e.g. {diff[0]}): a "
                                      "damaged or crafted file; nothing was built from it")
        return sum(sizes.values())
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path} is a malformed {data['kind']!r} checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from e


def check_types(path: str | os.PathLike, where: str, cls: type, values: dict) -> None:
    """Refuse a stored config whose entries do not have the types `cls` (a config dataclass)
    declares, naming the entry: "channel_mult = 'many'" says more than the TypeError that building
    it would raise. Entries `cls` does not declare are left to its constructor."""
    hints = typing.get_type_hints(cls)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: {where} is a {type(values).__name__}, not a dict: a "
                              "damaged or crafted file; nothing was built from it")
    for key, value in values.items():
        if key in hints and not _has_type(value, hints[key]):
            raise CheckpointError(f"{path}: {where} {key} = {value!r:.60} is not of type "
                                  f"{hints[key]}: a damaged or crafted file; nothing was built "
                                  "from it")


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin in (tuple, list):  # stored as lists or tuples
        if not isinstance(value, tuple | list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_has_type, value, args))
        return all(_has_type(v, args[0]) for v in value) if args else True
    if hint is type(None):
        return value is None
    if hint in (int, float):  # an int is a float too, a bool is neither
        return isinstance(value, int | float if hint is float else int) and not isinstance(
            value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    return True  # another declared type: its constructor checks it


# ----------------------------------------------------------------------------------------------
# Devices and random state


# ----------------------------------------------------------------------------------------------
# One run per output folder


class RunLock:
    """`<folder>/.lock`: a kernel lock (`flock`) on that file, which also records the owner's pid,
    host, start time and command line.

    `acquire` refuses a folder whose lock another process holds (naming it from the file). The
    kernel drops the lock when its process ends, however it ends, so a lock left by a killed run is
    simply taken (with a note). A lock is taken only on the file the folder holds at that moment:
    the file's inode is checked after locking, so two runs can never both hold one. Re-entrant
    within one process (tests run several mains). `release`, or a normal exit, removes the file.
    """

    NAME = ".lock"
    _held: dict[str, tuple[int, int]] = {}  # path -> (fd, holds) in this process

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
        import fcntl

        key = str(self.path.resolve())
        if key in RunLock._held:
            fd, holds = RunLock._held[key]
            RunLock._held[key] = (fd, holds + 1)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                other = self.owner() or {}
                where = "" if other.get("host") in (None, socket.gethostname()) else \
                    f" on {other['host']}"
                raise UsageError(f"{self.path.parent} is in use by process {other.get('pid', '?')}"
                                 f"{where} (started {other.get('started', '?')}: "
                                 f"{other.get('command', '?')}); wait for it, stop it, or choose "
                                 "another --out") from None
            try:  # locked: but is it still the folder's lock file, or one unlinked meanwhile?
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            try:  # what a killed run left
                other = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
            except ValueError:
                other = None
            if isinstance(other, dict) and other.get("pid") != os.getpid():
                print(f"note: taking over {self.path} from process {other.get('pid')}, which no "
                      "longer runs")
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            RunLock._held[key] = (fd, 1)
            atexit.register(self.release)
            return self
        raise UsageError(f"could not take the lock {self.path}: other runs keep replacing it")

    def release(self) -> None:
        key = str(self.path.resolve())
        if key not in RunLock._held:
            return
        fd, holds = RunLock._held.pop(key)
        if holds > 1:
            RunLock._held[key] = (fd, holds - 1)
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody can take this file now
        os.close(fd)


