"""What the training and sampling scripts share: checkpoints, devices, EMA, logging, flags, images.

No paper maths lives here; this is the plumbing that keeps `train_ae.py`, `train_ldm.py` and
`sample.py` thin and identical in behaviour:

* checkpoints: one `torch.save` dict of plain tensors and plain Python values, tagged with a `kind`
  ("autoencoder", "ldm", ...), written atomically (temp file in the same folder + `os.replace`, so a
  crash never leaves a half-written file under the real name) and read back with
  `torch.load(weights_only=True)`, refusing truncated, corrupt or wrong-kind files with a clear error;
* `pick_device("auto")`: cuda > mps > cpu;
* `EMA`: an exponential moving average of a model's weights, with the usual warm-up
  decay_t = min(decay, (1 + t) / (10 + t)) so short runs are not dominated by the random init;
* `rng_state` / `set_rng_state`: torch (CPU and CUDA), numpy and Python `random`, as plain values;
* `batch_indices(step, ...)`: the data order as a pure function of the step, which makes `--resume`
  exact without saving a data-loader's state;
* `JSONLLogger`: one JSON object per line; on resume it drops records past the resumed step;
* dataclass configs -> argparse `--field value` flags, merged over a named preset;
* `save_image_grid`: images in [-1, 1] -> one PNG, via pillow.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; any other name is checked and returned."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (try --device auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available (try --device auto)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global RNG is what third-party code uses)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state as plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": list(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_indices(step: int, *, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example indices of training step `step` (0-based): epochs of seeded permutations.

    A pure function of (step, n, batch_size, seed): resuming at any step reproduces the data order.
    Batches are consecutive slices of the epoch-long stream; a batch may straddle two epochs.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n - offset, start + batch_size - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# EMA of weights


class EMA:
    """shadow <- decay_t * shadow + (1 - decay_t) * param, decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)  # running statistics, codebook usage, ...: copied, not averaged

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.model.load_state_dict(state["model"])


# ----------------------------------------------------------------------------------------------
# Logging


class JSONLLogger:
    """Appends one JSON object per call to `path`; `resume_step` drops records with step > it."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _record_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, **record: Any) -> None:
        plain = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(plain) + "\n")


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return math.inf  # unreadable lines (a torn write) are dropped on resume


# ----------------------------------------------------------------------------------------------
# Dataclass configs <-> command-line flags


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _parser_for(tp: Any):
    """An argparse `type=` callable for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: parse as X, "none" -> None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        parse = _parser_for(inner[0])
        return lambda s: None if s.lower() == "none" else parse(s)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return lambda s: tuple(item(v) for v in s.replace(" ", "").split(",") if v)
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported config field type {tp!r}")


def add_config_args(parser: argparse.ArgumentParser, *config_classes: type) -> None:
    """Add `--field value` for every field; unset flags stay absent from the parsed namespace."""
    seen: dict[str, str] = {}
    for cls in config_classes:
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise ValueError(f"config field {f.name!r} is in both {seen[f.name]} and {cls.__name__}")
            seen[f.name] = cls.__name__
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if default is None:  # `int | None = None`: show the type that can be given
                kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), str)
                metavar = getattr(kind, "__name__", "VALUE").upper()
            else:
                metavar = type(default).__name__.upper()
            group.add_argument(
                f"--{f.name}", type=_parser_for(hints[f.name]), default=argparse.SUPPRESS,
                metavar=metavar, help=f"default: {default}",
            )


def config_fields(*config_classes: type) -> set[str]:
    return {f.name for cls in config_classes for f in dataclasses.fields(cls)}


def build_config(cls: type, *layers: dict) -> Any:
    """cls(**merged) where later layers (preset, checkpoint, command line) override earlier ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in names})
    return cls(**merged)


# ----------------------------------------------------------------------------------------------
# Images


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int = 8, pad: int = 2) -> Path:
    """Tile (N, C, H, W) images in [-1, 1] (C = 1 or 3) into one PNG, written atomically."""
    from PIL import Image

    from tinyldm.viz import image_grid

    array = image_grid(images, nrow=nrow, pad=pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array[:, :, 0] if images.shape[1] == 1 else array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
