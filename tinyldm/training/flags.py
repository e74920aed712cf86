"""Dataclass configs as command-line flags: every field `name` of a config becomes `--name VALUE`.

Flags left unset stay absent from the parsed namespace, so `build_config` can merge layers in order:
a named preset, then what a checkpoint stored, then what the command line says (`--resume` with a
larger `--steps` continues a run with its own settings and the new step count). `build_config`
checks every value first against `FIELD_RULES`: numbers against their ranges, text against `CHOICES`
(the values the code reads; a typo would otherwise fall through to another branch, e.g. any
--lr_schedule but "constant" to the cosine). The checks below refuse, with the flag to use, what a
run would otherwise ignore or get wrong: data flags the dataset does not read, and step counts the
sampler's spacing cannot place.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any

from tinyldm.autoencoder import DOWNSAMPLE_PADDINGS, REGULARIZERS
from tinyldm.autoencoder_loss import DISC_LOSSES, LPIPS_NETS, REC_LOSSES
from tinyldm.cli import UsageError
from tinyldm.data.images import SOURCES
from tinyldm.data.tasks import CONDS, TASKS
from tinyldm.ddim import make_timesteps
from tinyldm.ldm import LOSSES
from tinyldm.schedule import PREDICTIONS, SCHEDULE_KINDS
from tinyldm.unet import ATTENTION_BLOCKS

from .presets import AE_PRESETS
from .trainer import LR_SCHEDULES

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
                raise ValueError(f"config field {f.name!r} is in both {seen[f.name]} and "
                                 f"{cls.__name__}")
            seen[f.name] = cls.__name__
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if default is None:  # `int | None = None`: show the type that can be given
                kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), str)
                metavar = getattr(kind, "__name__", "VALUE").upper()
            else:
                metavar = type(default).__name__.upper()
            allowed = f"; one of {', '.join(CHOICES[f.name])}" if f.name in CHOICES else ""
            group.add_argument(
                f"--{f.name}", type=_parser_for(hints[f.name]), default=argparse.SUPPRESS,
                metavar=metavar, help=f"default: {default}{allowed}",
            )


def config_fields(*config_classes: type) -> set[str]:
    return {f.name for cls in config_classes for f in dataclasses.fields(cls)}


def build_config(cls: type, *layers: dict) -> Any:
    """cls(**merged) where later layers (preset, checkpoint, command line) override earlier ones;
    every value is checked against `FIELD_RULES` first, so that a bad one is refused naming its flag
    before it reaches torch; a combination the config itself refuses ends in one line too."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in names})
    check_values(merged)
    try:
        return cls(**merged)
    except ValueError as e:
        raise UsageError(f"{cls.__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------
# What each config field may hold (a field missing here is free-form text or a boolean)

# The text fields of the scripts' configs (TrainingConfig and each script's own, AutoencoderConfig,
# AELossConfig, UNetConfig, DiffusionConfig): the values the code reads, each list taken from the
# module that reads it. The paper's configs also refuse theirs when built directly (in
# `__post_init__`, or when the UNet is built), from the same lists; here they are refused by flag,
# before any work.
CHOICES: dict[str, tuple[str, ...]] = {
    "lr_schedule": LR_SCHEDULES,
    "dataset": SOURCES,
    "ae_preset": tuple(AE_PRESETS),  # train_ldm.py: what train_ae.py trains without --ae
    "cond": (*CONDS, "auto"),  # auto: chosen from the data (`tinyldm.data.tasks.detect_condition`)
    "task": TASKS,
    "posterior": ("sample", "mean"),  # the KL latent the LDM trains on (`LatentTrainingSet`)
    "regularizer": REGULARIZERS,
    "downsample_padding": DOWNSAMPLE_PADDINGS,
    "rec_loss": REC_LOSSES,
    "lpips_net": LPIPS_NETS,
    "disc_loss": DISC_LOSSES,
    "attention_block": ATTENTION_BLOCKS,
    "schedule": SCHEDULE_KINDS,
    "prediction": PREDICTIONS,
    "loss": LOSSES,
}


def _one_of(allowed: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), f"one of {', '.join(allowed)}"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: _finite(v) and ok(v)


_POSITIVE_INT = (_int_at_least(1), "a whole number >= 1")
_COUNT = (_int_at_least(0), "a whole number >= 0")
_WEIGHT = (_number(lambda v: v >= 0), "a number >= 0")
_FRACTION = (_number(lambda v: 0 <= v <= 1), "a number in [0, 1]")
_DECAY = (_number(lambda v: 0 <= v < 1), "a number in [0, 1)")
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(
        ["image_size", "batch_size", "steps", "log_every", "sample_every", "ckpt_every",
         "eval_steps", "T", "channels", "num_res_blocks", "head_dim", "transformer_depth",
         "norm_groups", "base_channels", "z_channels", "n_codes", "text_layers", "text_head_dim",
         "max_tokens", "disc_channels", "disc_layers", "in_channels", "out_channels", "latent_size",
         "stats_images", "feature_steps", "sr_factor"], _POSITIVE_INT),
    **dict.fromkeys(["n_train", "n_eval", "warmup_steps", "ae_steps", "eval_images", "num_workers",
                     "disc_start", "concat_channels"], _COUNT),
    "seed": (lambda v: _int_at_least(0)(v) and v < 2**63, "a whole number in 0 .. 2**63 - 1"),
    "max_shapes": (lambda v: _int_at_least(1)(v) and v <= 9,
                   "a whole number in 1..9 (one object per grid cell)"),
    "lr": (_number(lambda v: 0 < v <= 1), "a learning rate in (0, 1], e.g. 1e-4"),
    "disc_lr": (_number(lambda v: 0 <= v <= 1), "a learning rate in [0, 1] (0: the same as --lr)"),
    **dict.fromkeys(["weight_decay", "grad_clip", "max_minutes", "eval_cfg", "kl_weight",
                     "codebook_weight", "disc_weight", "perceptual_weight", "vq_beta",
                     "adaptive_max"], _WEIGHT),
    **dict.fromkeys(["lr_min_ratio", "p_uncond", "vq_restart_threshold"], _FRACTION),
    **dict.fromkeys(["ema_decay", "dropout", "adam_beta1", "adam_beta2", "vq_usage_decay"], _DECAY),
    **dict.fromkeys(["beta_start", "beta_end"],
                    (lambda v: v is None or _number(lambda b: 0 < b < 1)(v),
                     "a noise level in (0, 1)")),
    **dict.fromkeys(["norm_eps", "adaptive_delta"],
                    (_number(lambda v: 0 < v <= 1), "a small number > 0")),
    "channel_mult": (lambda v: isinstance(v, tuple) and len(v) > 0
                     and all(_int_at_least(1)(m) for m in v),
                     "comma-separated whole numbers >= 1, e.g. 1,2,4"),
    "attn_resolutions": (lambda v: isinstance(v, tuple) and all(_int_at_least(1)(m) for m in v),
                         "comma-separated latent sizes, e.g. 16,8 (or empty)"),
    **{name: _one_of(allowed) for name, allowed in CHOICES.items()},
}


# Flags that a resumed run may change: when to stop, what to log, save and evaluate. Every other
# config flag changes the model, the data, the batch or the optimisation, and a run continued with
# it would be neither the old run nor a new one.
RESUME_SAFE = frozenset({
    "steps", "max_minutes", "log_every", "sample_every", "ckpt_every", "stats_images",
    "eval_images", "eval_steps", "eval_cfg", "feature_steps", "tensorboard", "check_replicas",
    "num_workers",
})


def check_resume_overrides(stored: dict, overrides: dict) -> None:
    """Refuse `--resume` with flags whose values differ from the stored run's (except
    `RESUME_SAFE`), listing all."""
    def plain(v: Any) -> Any:
        return tuple(v) if isinstance(v, list | tuple) else v

    changed = [(k, v, stored[k]) for k, v in overrides.items()
               if k in stored and k not in RESUME_SAFE and plain(v) != plain(stored[k])]
    if changed:
        listed = "; ".join(f"--{k} {_shown(v)} (the run has {_shown(old)})"
                           for k, v, old in changed)
        raise UsageError(f"--resume with flags that change the run: {listed}. Drop them to "
                         "continue the run as it was, or start a new run with another --out "
                         f"(flags that may change: {', '.join(sorted(RESUME_SAFE))})")


def check_values(values: dict) -> None:
    """Refuse the first value that breaks its field's rule, as `--name value: must be ...`."""
    for name, value in values.items():
        rule = FIELD_RULES.get(name)
        if rule is not None and not rule[0](value):
            raise UsageError(f"--{name} {_shown(value)}: must be {rule[1]}")


def _shown(v: Any) -> str:
    """A value as it is typed on the command line (a tuple comma-separated)."""
    return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)


def default_preset(args: argparse.Namespace) -> argparse.Namespace:
    """No --preset: "folder" when --data names one (your own images, said on the first line), else
    "shapes"."""
    if args.preset is None:
        args.preset = "folder" if args.data else "shapes"
        if args.data:
            print(f"--data {args.data} without --preset: "
                  "using the folder preset (32 px, CPU-sized)")
    return args


def check_sampling_steps(T: int, steps: int, flag: str = "--steps") -> None:
    """The sampler's timestep sequence for `steps` steps of a T-step schedule, refused up front with
    the flag's name instead of failing after training or loading (see
    `tinyldm.ddim.make_timesteps`)."""
    try:
        make_timesteps(T, steps)
    except ValueError as e:
        raise UsageError(f"{flag} {steps}: {e}") from None
