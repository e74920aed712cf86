"""Dataclass configs as command-line flags: every field `name` of a config becomes `--name VALUE`.

Flags left unset stay absent from the parsed namespace, so `build_config` can merge layers in order:
a named preset, then what a checkpoint stored, then what the command line says (`--resume` with a
larger `--steps` continues a run with its own settings and the new step count).
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
