"""Shared pieces of the grading tests (not a test file)."""

import torch


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn (norm weights around 1, biases around 0): defaults would hide a swapped
    layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=g).mul_(p[0].numel() ** -0.5 if p.ndim > 1 else 0.3)
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm) and m.weight is not None:
                m.weight.add_(1.0)
    return module


def tiny_unet(context_dim: int | None = None, channels: int = 3, seed: int = 0,
              fused_attention: bool = True):
    from tinyldm.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    return UNet(UNetConfig(in_channels=channels, out_channels=channels, latent_size=8, channels=32,
                           channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8, 4),
                           head_dim=16, context_dim=context_dim, norm_groups=8,
                           fused_attention=fused_attention))
