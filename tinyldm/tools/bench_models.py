"""The benchmark's models: its configurations, and the diffusers models of the same size.

Each config names a tinyldm UNet and/or autoencoder; `diffusers_unet` / `diffusers_autoencoder`
build diffusers' UNet2DConditionModel, UNet2DModel or AutoencoderKL with the same widths, res
blocks, attention levels and head width (tests/test_bench.py checks parameters within 0.1% and FLOPs
per step within 2%). diffusers is imported only when one of them is called (the `bench` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tinyldm.autoencoder import AutoencoderConfig
from tinyldm.unet import UNetConfig


@dataclass(frozen=True)
class BenchConfig:
    unet: UNetConfig | None = None
    tokens: int = 0  # context length for cross-attention (0: no context)
    train_batch: int = 8
    sample_batch: int = 8
    sample_steps: int = 50
    ae: AutoencoderConfig | None = None
    ae_size: int = 64  # autoencoder input side in pixels
    ae_batch: int = 8


CONFIGS: dict[str, BenchConfig] = {
    # Runs on a 2-core CPU in about a minute (eager): a small text-to-image UNet and a small f = 4
    # autoencoder.
    "cpu": BenchConfig(
        unet=UNetConfig(latent_size=8, channels=64, channel_mult=(1, 2), attn_resolutions=(4,),
                        context_dim=128, scale_shift_norm=False),
        tokens=16, train_batch=32, sample_batch=16,
        ae=AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                             decoder_res_blocks=2),
        ae_size=32, ae_batch=16),
    # The "tiny text-to-image" UNet: 16x16x4 latents, channels (128, 256, 256), cross-attention at
    # 16 and 8 to 32 tokens of width 256; 34.9 M parameters.
    "tiny_t2i": BenchConfig(
        unet=UNetConfig(latent_size=16, channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attn_resolutions=(16, 8), head_dim=32, context_dim=256,
                        scale_shift_norm=False),
        tokens=32, train_batch=256, sample_batch=64),
    # The paper's CelebA-HQ LDM-4 UNet (Tab. 14 / the CompVis config): 64x64x3 latents,
    # 224 x (1, 2, 3, 4), plain self-attention at 32, 16 and 8, head width 32, additive timestep
    # embedding; 274.0 M parameters.
    "celebahq_ldm4": BenchConfig(
        unet=UNetConfig(in_channels=3, out_channels=3, latent_size=64, channels=224,
                        channel_mult=(1, 2, 3, 4), num_res_blocks=2, attn_resolutions=(32, 16, 8),
                        head_dim=32, context_dim=None, attention_block="plain",
                        scale_shift_norm=False),
        train_batch=32, sample_batch=32),
    # A KL autoencoder, f = 4, channels 128 x (1, 2, 4), 2 res blocks per level (3 in the decoder,
    # as CompVis and diffusers build it); 55.3 M parameters.
    "kl_f4": BenchConfig(ae=AutoencoderConfig(base_channels=128, channel_mult=(1, 2, 4),
                                              num_res_blocks=2, decoder_res_blocks=3),
                         ae_size=64, ae_batch=64),
}
GPU_CONFIGS = ("tiny_t2i", "celebahq_ldm4", "kl_f4")


def smoke_config(cfg: BenchConfig) -> BenchConfig:
    """The same architecture at batch 2 and 3 sampling steps: a run in seconds that exercises every
    path."""
    return replace(cfg, train_batch=2, sample_batch=2, sample_steps=3, ae_batch=2)


# ----------------------------------------------------------------------------------------------
# The diffusers counterparts (imported only when asked for)


def diffusers_unet(cfg: UNetConfig) -> torch.nn.Module:
    """The diffusers UNet with tinyldm's layout: same widths, res blocks, attention levels and head
    width."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    widths = tuple(cfg.channels * m for m in cfg.channel_mult)
    attn = [cfg.latent_size // 2**i in cfg.attn_resolutions for i in range(len(widths))]
    common = dict(sample_size=cfg.latent_size, in_channels=cfg.in_channels + cfg.concat_channels,
                  out_channels=cfg.out_channels, block_out_channels=widths,
                  layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups,
                  norm_eps=1e-6,
                  resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default")
    if cfg.context_dim is not None:
        if cfg.attention_block != "transformer" or not cfg.mid_attention:
            raise ValueError("diffusers' UNet2DConditionModel has transformer blocks and a mid "
                             "attention block")
        return UNet2DConditionModel(
            **common, cross_attention_dim=cfg.context_dim,
            transformer_layers_per_block=cfg.transformer_depth,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                                 for a in reversed(attn)),
            # diffusers' name: heads per level
            attention_head_dim=tuple(w // cfg.head_dim for w in widths))
    if cfg.attention_block != "plain":
        raise ValueError("without a context, diffusers' UNet2DModel has plain attention: use "
                         "attention_block='plain'")
    return UNet2DModel(
        **common, attention_head_dim=cfg.head_dim, add_attention=cfg.mid_attention,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))


def diffusers_autoencoder(cfg: AutoencoderConfig) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    if (cfg.regularizer != "kl"
            or (cfg.decoder_res_blocks or cfg.num_res_blocks) != cfg.num_res_blocks + 1):
        raise ValueError("diffusers' AutoencoderKL is a KL autoencoder with num_res_blocks + 1 "
                         "decoder blocks")
    n = len(cfg.channel_mult)
    return AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
                         layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
                         norm_num_groups=cfg.norm_groups, mid_block_add_attention=cfg.mid_attention)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
