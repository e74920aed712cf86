"""The models of both stages built from their configs: the condition encoder sized from the data
and the denoiser around it (train_ldm.py), the autoencoder with its loss, discriminator, optimizers
and EMA (train_ae.py), and the identity first stage (f = 1, nothing to train) for pixel-space
diffusion.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..autoencoder import Autoencoder, AutoencoderConfig, latent_statistics
from ..autoencoder_loss import AELoss, AELossConfig
from ..checkpoint import rng_state, save_checkpoint, set_rng_state
from ..cli import UsageError
from ..conditioning import ConditionConfig, ConditionEncoder, Tokenizer, split_words
from ..data.image_batches import first_images, make_datasets
from ..data.shapes import CLASS_NAMES
from ..data.tasks import TaskSpec, concat_channels
from ..evaluation.features import load_lpips
from ..evaluation.ldm_score import FIXED_PROMPTS
from ..ldm import Denoiser
from ..unet import UNet, UNetConfig
from .distributed import World
from .loop import EMA


def make_condition_config(config, unet_fields: dict, conditions: dict,
                          class_names: list[str]) -> ConditionConfig:
    width = unet_fields.get("context_dim") or 128
    if config.cond == "text":
        captions = conditions["caption"]
        if not any(captions):
            raise UsageError("--cond text needs captions, and this dataset has none "
                             "(use --cond class or none)")
        tokenizer = Tokenizer.from_texts(list(captions))
        # the grids' fixed prompts; other data sets draw held-out captions
        if config.dataset == "shapes":
            unknown = sorted({w for p in FIXED_PROMPTS for w in tokenizer.unknown_words(p)})
            if unknown:
                print(f"warning: words of the sample prompts never seen in training captions: "
                      f"{unknown}")
        longest = max(len(split_words(c)) for c in captions) + 2  # with <bos> and <eos>
        if longest > config.max_tokens:  # sized from the data: no caption is cut
            print(f"captions have up to {longest} tokens with <bos>/<eos>: the text encoder reads "
                  f"{longest} (--max_tokens {config.max_tokens} raised to fit)")
        return ConditionConfig(kind="text", context_dim=width, vocab=tokenizer.vocab,
                               max_len=max(config.max_tokens, longest), layers=config.text_layers,
                               head_dim=config.text_head_dim)
    if config.cond == "class":
        num_classes = len(class_names) or int(conditions["class_id"].max()) + 1
        if int(conditions["class_id"].min()) < 0:
            raise UsageError("--cond class needs class labels "
                             "(class sub-folders, or a CelebA attribute)")
        return ConditionConfig(kind="class", context_dim=width, num_classes=num_classes)
    if config.cond == "layout":
        return ConditionConfig(kind="layout", context_dim=width, num_classes=len(CLASS_NAMES),
                               max_objects=config.max_shapes, layers=config.text_layers,
                               head_dim=config.text_head_dim)
    return ConditionConfig(kind="none")


def make_denoiser(config, unet_fields: dict, cond_config: ConditionConfig, spec: TaskSpec,
                  latent_shape: tuple[int, int, int], device: torch.device) -> Denoiser:
    """The condition encoder tau_theta and the UNet eps_theta (trained jointly), for latents
    (c, h, w)."""
    c, h, w = latent_shape
    down = 2 ** (len(unet_fields.get("channel_mult", UNetConfig.channel_mult)) - 1)
    if h % down or w % down:
        raise UsageError(f"the latents are {h} x {w}, which the UNet's {down}x downsampling "
                         f"(--channel_mult) cannot halve evenly: choose --image_size so that "
                         f"image_size / f is a multiple of {down}, "
                         "or fewer --channel_mult levels")
    cond_encoder = ConditionEncoder(cond_config)
    unet_config = UNetConfig(**{**unet_fields, "in_channels": c, "out_channels": c,
                                "latent_size": h, "context_dim": cond_encoder.context_dim,
                                "concat_channels": concat_channels(spec, c)})
    denoiser = Denoiser(UNet(unet_config), cond_encoder).to(device)
    if config.channels_last and device.type == "cuda":
        denoiser.unet.to(memory_format=torch.channels_last)
    return denoiser


@dataclass
class TrainState:
    """What the training step updates and a checkpoint stores; `loss_fn` holds the discriminator."""

    model: Autoencoder
    loss_fn: AELoss
    opt_ae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    ema: EMA | None
    start: int  # the first step to train: 0, or the checkpoint's step when resuming
    step_model: torch.nn.Module | None = None  # what the step calls: the model, or in DDP

    @property
    def eval_model(self) -> Autoencoder:
        """The weights that are evaluated and used: the EMA's if there is one."""
        return self.ema.model if self.ema is not None else self.model


def build_ae_state(ae_config: AutoencoderConfig, loss_config: AELossConfig, config, world: World,
                device: torch.device, ckpt: dict | None) -> TrainState:
    """The autoencoder, its loss and discriminator, their Adam optimizers and the EMA; restored from
    `ckpt` (weights, optimizers, step and RNG state) when resuming."""
    if world.enabled and ae_config.regularizer == "vq":
        raise UsageError("a VQ autoencoder does not train under torchrun (its dead-code restarts "
                         "would differ between processes): train it as one process")
    model = Autoencoder(ae_config).to(device)
    lpips = (load_lpips(loss_config.lpips_net, pretrained=loss_config.lpips_pretrained)
             if loss_config.perceptual_weight > 0 else None)
    loss_fn = AELoss(loss_config, in_channels=ae_config.in_channels, perceptual=lpips).to(device)
    if world.enabled and device.type == "cuda":  # the PatchGAN's BatchNorm over the global batch
        loss_fn.discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(loss_fn.discriminator)
    betas = (config.adam_beta1, config.adam_beta2)
    opt_ae = torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)
    opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=config.disc_lr or config.lr,
                                betas=betas)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["autoencoder"]["state_dict"])
        loss_fn.discriminator.load_state_dict(ckpt["discriminator"])
        opt_ae.load_state_dict(ckpt["opt_ae"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        if ema is not None and ckpt["ema_autoencoder"] is not None:
            ema.load_state_dict({**ckpt["ema_state"],
                                 "model": ckpt["ema_autoencoder"]["state_dict"]})
        start = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
    return TrainState(model, loss_fn, opt_ae, opt_disc, ema, start)


def save_identity(ae_config: AutoencoderConfig, loss_config: AELossConfig, config,
                  args: argparse.Namespace, ckpt_path: Path, device: torch.device) -> dict:
    """--regularizer identity: nothing to train. Measure the pixels' scale factor and write a
    checkpoint that train_ldm.py reads like any other first stage (it then trains a pixel-space
    diffusion model)."""
    model = Autoencoder(ae_config).to(device)
    train_set, _ = make_datasets(config, args.data)
    stats = latent_statistics(model,
                              first_images(train_set, config.stats_images, config.batch_size),
                              max_images=config.stats_images,
                              generator=torch.Generator(device).manual_seed(config.seed))
    # Pixel-space diffusion models (DDPM, ADM, the paper's LDM-1) train on pixels in [-1, 1] as they
    # are; the measured std is reported but not divided out.
    model.set_latent_stats(replace(stats, scale_factor=1.0))
    save_checkpoint(ckpt_path, {
        "step": 0, "ae_config": asdict(ae_config), "loss_config": asdict(loss_config),
        "train_config": asdict(config), "autoencoder": model.to_dict(), "ema_autoencoder": None,
        "ema_state": None, "discriminator": {}, "opt_ae": {}, "opt_disc": {}, "rng": rng_state(),
        "metrics": {"latent": asdict(stats)},
    }, kind="autoencoder")
    print(f"identity first stage (z = x, f = 1): pixels used as they are in [-1, 1] "
          f"(std {stats.global_std:.4f}, scale_factor 1); nothing to train -> {ckpt_path}")
    return {"latent": asdict(stats), "checkpoint": str(ckpt_path)}
