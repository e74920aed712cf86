"""Each script's configuration: the named preset (shrunk by --smoke) < what a resumed checkpoint
stored < the command line, built into the dataclass configs, with the checks that span several
fields or the data (the per-field rules are `tinyldm.training.flags.FIELD_RULES`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..autoencoder import AutoencoderConfig
from ..autoencoder_loss import AELossConfig
from ..checkpoint import load_checkpoint
from ..cli import UsageError
from ..data.images import check_data_flags
from ..data.tasks import detect_condition
from ..ldm import DiffusionConfig
from ..unet import UNetConfig
from .first_stage import check_pinned_autoencoder
from .flags import (
    build_config,
    check_resume_overrides,
    check_sampling_steps,
    check_values,
    config_fields,
)
from .trainer import fit_steps


def resolve_ldm_configs(args: argparse.Namespace, stored: dict | None, config_cls: type,
                        preset: dict) -> tuple[object, dict, DiffusionConfig]:
    """`preset` (with --smoke's changes) < the resumed checkpoint's own configuration < the command
    line (e.g. a larger --steps). Returns the training config (a `config_cls`), the UNet fields the
    user chose (the latent shape and context width are filled in from the autoencoder and condition
    later) and the diffusion config."""
    saved = ([{**stored["train_config"], **stored["unet_config"], **stored["diffusion_config"]}]
             if stored else [])
    if stored:
        fields = config_fields(config_cls, UNetConfig, DiffusionConfig)
        check_resume_overrides(saved[0], {k: v for k, v in vars(args).items() if k in fields})
    layers = [preset, *saved, vars(args)]
    config = build_config(config_cls, *layers)
    check_data_flags(config.dataset, args.data, config.hflip)
    if config.cond == "auto":
        config = replace(config, cond=detect_condition(config, args.data))
    diffusion = build_config(DiffusionConfig, *layers)
    check_sampling_steps(diffusion.T, config.eval_steps, "--eval_steps")
    if (config.cond == "layout" or config.task == "semantic") and config.dataset != "shapes":
        raise UsageError(f"--cond {config.cond} / --task {config.task} need boxes or maps: "
                         "only the shapes dataset has them here")
    unet_fields = {f: v for layer in layers for f, v in layer.items()
                   if f in UNetConfig.__dataclass_fields__}
    # the UNet is built later, from these and the autoencoder's latent shape
    check_values(unet_fields)
    # it has no cross-attention
    if config.cond != "none" and unet_fields.get("attention_block") == "plain":
        if "attention_block" in vars(args):
            raise UsageError(f"--attention_block plain has no cross-attention, so it cannot read "
                             f"--cond {config.cond}: use --attention_block transformer, or "
                             f"--cond none")
        unet_fields["attention_block"] = "transformer"
        print(f"--cond {config.cond}: transformer blocks with cross-attention instead of the "
              "unconditional models' plain attention (Sec. 3.3)")
    for derived in ("in_channels", "out_channels", "latent_size"):
        if derived in vars(args):
            raise UsageError(f"--{derived} is set from the autoencoder; do not pass it")
    return config, unet_fields, diffusion


def resumed_checkpoint(args: argparse.Namespace, out: Path) -> dict | None:
    """With --resume, <out>/ldm.pt, checked to stand on the same autoencoder file as before; None
    for a new run, or when only the autoencoder trained for this run is there to continue (refused
    when nothing is)."""
    ckpt_path = out / "ldm.pt"
    if args.resume and ckpt_path.exists():
        stored = load_checkpoint(ckpt_path, kind="ldm")
        check_pinned_autoencoder(args, out, stored)
        return stored
    if args.resume and not (out / "ae" / "autoencoder.pt").exists():
        raise UsageError(f"--resume: nothing to continue in {out} (no ldm.pt, no "
                         "ae/autoencoder.pt); check --out, or drop --resume to start a new run")
    if args.resume:
        print(f"--resume: {out} has no ldm.pt yet; the autoencoder continues if it was cut "
              "short, then the LDM starts at step 0")
    return None


def resolve_ae_configs(args: argparse.Namespace, ckpt_path: Path,
                       configs: tuple[type, type, type], preset: dict
                       ) -> tuple[AutoencoderConfig, AELossConfig, object, dict | None]:
    """(ae_config, loss_config, config, checkpoint): `preset` (shrunk by --smoke) or, with --resume,
    the checkpoint's stored configuration, overridden by the flags; the checkpoint is None unless
    resuming. `configs`: the autoencoder's, the loss's and the script's config classes."""
    overrides = {k: v for k, v in vars(args).items() if k in config_fields(*configs)}
    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(ckpt_path if args.resume == "auto" else args.resume,
                               kind="autoencoder")
        base = {**ckpt["ae_config"], **ckpt["loss_config"], **ckpt["train_config"]}
        check_resume_overrides(base, overrides)
        if overrides:
            print(f"resume: overriding stored config with {overrides}")
    else:
        base = preset
    ae_config, loss_config, config = (build_config(cls, base, overrides) for cls in configs)
    check_data_flags(config.dataset, args.data, config.hflip)
    f = ae_config.downsample_factor
    if config.image_size % f:
        raise UsageError(f"--image_size {config.image_size} must be a multiple of the "
                         f"autoencoder's downsampling factor f = {f} "
                         f"(--channel_mult {','.join(map(str, ae_config.channel_mult))}): "
                         f"e.g. {config.image_size // f * f or f}")
    return ae_config, loss_config, config, ckpt


def fit_ae_to_data(state, config, loss_config: AELossConfig, images: int,
                   args: argparse.Namespace) -> tuple[object, AELossConfig]:
    """The photo presets' steps from their epochs over `images` (`fit_steps`); the discriminator
    then joins at the same share of the shorter run (unless --disc_start was given), in `state`'s
    loss too."""
    fitted = fit_steps(config, images, explicit="steps" in vars(args))
    if fitted.steps != config.steps and loss_config.disc_start and "disc_start" not in vars(args):
        start = round(loss_config.disc_start * fitted.steps / config.steps)
        print(f"the discriminator joins at step {start:,} ({loss_config.disc_start:,} of the "
              f"preset's {config.steps:,})")
        loss_config = state.loss_fn.config = replace(loss_config, disc_start=start)
    return fitted, loss_config
