"""Dataclass configs as command-line flags: every field `name` of a config becomes `--name VALUE`.

Flags left unset stay absent from the parsed namespace, so `build_config` can merge layers in order:
a named preset, then what a checkpoint stored, then what the command line says (`--resume` with a
larger `--steps` continues a run with its own settings and the new step count). The checks below refuse,
with the flag to use, what a run would otherwise ignore or get wrong: data flags the dataset does not read, and
step counts the sampler's spacing cannot place.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

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


def default_preset(args: argparse.Namespace) -> argparse.Namespace:
    """No --preset: "folder" when --data names one (your own images, said on the first line), else "shapes"."""
    if args.preset is None:
        args.preset = "folder" if args.data else "shapes"
        if args.data:
            print(f"--data {args.data} without --preset: using the folder preset (32 px, CPU-sized)")
    return args


def check_data_flags(dataset: str, data: str | None, hflip: bool) -> None:
    """Refuse a data flag that the chosen dataset would ignore or get wrong, naming the flag to use instead."""
    if dataset != "shapes" and data is None:
        raise SystemExit(f"--dataset {dataset} needs --data PATH: the folder of images (folder), the CelebA root "
                         "(celeba) or the LSUN folder or LMDB export (lsun)")
    if dataset == "shapes" and data is not None:
        raise SystemExit(f"--data {data} would be ignored: the dataset is the built-in shapes (the preset's). "
                         "Add --dataset folder (or celeba, lsun) to train on those images")
    if dataset == "shapes" and hflip:
        raise SystemExit("--hflip does not apply to the shapes dataset: its captions, boxes and maps say left and "
                         "right, which a mirrored image would contradict. Drop --hflip (it is for folder / celeba / "
                         "lsun)")


def check_sampling_steps(T: int, steps: int, flag: str = "--steps") -> None:
    """The sampler's timestep sequence for `steps` steps of a T-step schedule, refused up front with the flag's
    name instead of failing after training or loading (see `tinyldm.ddim.make_timesteps`)."""
    from tinyldm.ddim import make_timesteps

    try:
        make_timesteps(T, steps)
    except ValueError as e:
        raise SystemExit(f"{flag} {steps}: {e}") from None
