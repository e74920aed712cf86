"""Checkpoints: one file of plain tensors and values, written atomically, read without unpickling
code.

A checkpoint is one `torch.save` dict of tensors and plain Python values (configs as dicts, a
tokenizer's vocabulary as a list), tagged with a `kind` ("autoencoder", "ldm", ...). It is written
to a temporary file in the same folder and renamed (`os.replace`), so a crash never leaves a
half-written file under the real name, and read back with `torch.load(weights_only=True)`, which
refuses anything that would run code.
A missing, truncated, corrupt or wrong-kind file is refused with a `CheckpointError` that says
which, and so is a write that fails (a full disk): the file under the real name is then still the
previous checkpoint."""

from __future__ import annotations

import os
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tinyldm.cli import CheckpointError
from tinyldm.files import save_atomically
from tinyldm.memory import check_weights

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str | os.PathLike, payload: dict, *, kind: str) -> Path:
    """torch.save({"kind": kind, "format": 1, **payload}) to `path`, atomically."""
    return save_atomically({"kind": kind, "format": CHECKPOINT_FORMAT, **payload}, path,
                           what="the checkpoint",
                           kept="the previous checkpoint, unchanged, which --resume continues from")


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
