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

Also here: what a checkpoint holds besides weights, the global random state (`rng_state` /
`set_rng_state`, for an exact resume), and the LDM's self-contained file (`ldm_payload` writes
what sample.py needs, `load_ldm` rebuilds the models from it)."""

from __future__ import annotations

import os
import random
import types
import typing
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
from tinyldm.cli import CheckpointError
from tinyldm.conditioning import ConditionConfig, ConditionEncoder
from tinyldm.files import save_atomically
from tinyldm.ldm import Denoiser, DiffusionConfig
from tinyldm.memory import check_weights
from tinyldm.schedule import NoiseSchedule
from tinyldm.unet import UNet, UNetConfig

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
# Random state, for an exact resume


def rng_state() -> dict:
    """Every global RNG state as plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": list(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"],  # noqa: NPY002
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if (state["cuda"] and torch.cuda.is_available()
            and len(state["cuda"]) == torch.cuda.device_count()):
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# The LDM's self-contained checkpoint


def ldm_payload(denoiser: Denoiser, ema: Denoiser | None, autoencoder: Autoencoder,
                cfg: DiffusionConfig, image_size: int) -> dict:
    """Plain tensors and values: everything sample.py needs, in one file (weights_only loadable)."""
    cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
    return {
        "unet_config": asdict(denoiser.unet.cfg),
        "cond_config": asdict(denoiser.cond.cfg),
        "diffusion_config": asdict(cfg),
        "image_size": image_size,
        "denoiser": cpu(denoiser),
        "ema": cpu(ema) if ema is not None else None,
        "autoencoder": autoencoder.to_dict(),
    }


def build_denoiser(unet_config: dict, cond_config: dict) -> Denoiser:
    unet_config = {**unet_config, "channel_mult": tuple(unet_config["channel_mult"]),
                   "attn_resolutions": tuple(unet_config["attn_resolutions"])}
    return Denoiser(UNet(UNetConfig(**unet_config)),
                    ConditionEncoder(ConditionConfig(**cond_config)))


def load_ldm(ckpt: dict, *,
             use_ema: bool = True) -> tuple[Denoiser, NoiseSchedule, Autoencoder, DiffusionConfig]:
    """Rebuild (denoiser, schedule, autoencoder, config) from a checkpoint dict
    (`load_checkpoint`'s)."""
    denoiser = build_denoiser(ckpt["unet_config"], ckpt["cond_config"])
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["denoiser"]
    denoiser.load_state_dict(weights)
    cfg = DiffusionConfig(**ckpt["diffusion_config"])
    return (denoiser.eval(), cfg.make_schedule(),
            Autoencoder.from_dict(ckpt["autoencoder"]).eval(), cfg)
