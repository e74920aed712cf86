"""Checkpoints: one file of plain tensors and values, written atomically, read without unpickling code.

A checkpoint is one `torch.save` dict of tensors and plain Python values (configs as dicts, a tokenizer's
vocabulary as a list), tagged with a `kind` ("autoencoder", "ldm", ...). It is written to a temporary
file in the same folder and renamed (`os.replace`), so a crash never leaves a half-written file under the
real name, and read back with `torch.load(weights_only=True)`, which refuses anything that would run code.
A missing, truncated, corrupt or wrong-kind file is refused with a `CheckpointError` that says which.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None, map_location: Any = "cpu") -> dict:
    """torch.load(path, weights_only=True), with clear errors for files that are not usable checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (an interrupted write?)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip reader errors, EOFError, UnpicklingError for disallowed globals, ...
        raise CheckpointError(
            f"checkpoint {path} could not be read: it is truncated, corrupt, or not a tinyldm checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(data, dict) or "kind" not in data:
        raise CheckpointError(f"{path} is a torch file but not a tinyldm checkpoint (no 'kind' entry)")
    if kind is not None and data["kind"] != kind:
        raise CheckpointError(f"{path} is a {data['kind']!r} checkpoint, expected a {kind!r} checkpoint")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {data.get('format')}, expected {CHECKPOINT_FORMAT}")
    return data


# ----------------------------------------------------------------------------------------------
# Devices and random state
