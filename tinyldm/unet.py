"""The denoiser: a UNet with timestep embedding, ResBlocks and cross-attention transformer blocks.

Contract with the papers
------------------------
* LDM (Rombach et al., arXiv 2112.10752), Sec. 3.3 and Fig. 3: the time-conditional UNet
  eps_theta(z_t, t, tau(y)) whose intermediate feature maps phi_i(z_t) attend to the condition
  encoding tau(y) in (B, L, D) through cross-attention (the formula of Sec. 3.3, in `blocks.py`:
  Q from phi_i(z_t), K and V from tau(y)), inside a transformer block per attention level
  (App. E.2.1, Tab. 15): self-attention, cross-attention, GEGLU feed-forward, each pre-norm and
  residual (`blocks.TransformerBlock`), between a GroupNorm + 1x1 conv in and a 1x1 conv out.
  `attention_block="plain"` uses instead the unconditional models' self-attention block
  (GroupNorm, attention, projection; no feed-forward), which gives the paper's 274 M CelebA-HQ
  LDM-4 UNet. The "concat" conditioning of Sec. 3.3 / 4.4 / 4.5 stacks extra channels onto z_t at
  the input.
* The backbone follows DDPM / ADM (Ho et al., arXiv 2006.11239, App. B; Dhariwal & Nichol,
  arXiv 2105.05233, Sec. 3): sinusoidal timestep embedding (Vaswani et al., Sec. 3.5) and an MLP;
  ResBlocks with the timestep injected either additively or as ADM's adaptive GroupNorm scale and
  shift (`blocks.ResBlock`); strided-conv downsampling, nearest + conv upsampling, skip connections
  concatenated on the way up.

Conventions
-----------
* `attn_resolutions` are latent resolutions in pixels (16 means "the level whose feature map is
  16 x 16 when the input is `latent_size` x `latent_size`"), not downsampling factors.
* `head_dim` is the width of one attention head; heads = channels // head_dim at each level.
  `num_heads` instead fixes the head count at every level (as the released text-to-image model
  does), and the head width is then channels // num_heads.
* `context` has shape (B, L, context_dim); `context_mask` (B, L) is True for real tokens and
  False for padding, which no query may attend to. Every row needs at least one True.
* The UNet knows nothing of the noise schedule: t is only an input to the timestep embedding.
* `fused_attention=False` runs every attention layer through the explicit softmax
  (`blocks.attention_weights`) instead of `F.scaled_dot_product_attention`: the same outputs up to
  float rounding, with the (B, heads, N, L) probabilities held in memory.
* Each layer gets only what it uses: ResBlocks (h, emb), transformers (h, context, context_mask),
  the rest h alone. The input checks sit below the model, in `check_config` / `check_inputs`.

Left out: learned-variance outputs, the "linear" (1x1) projection variant, xformers / flash kernels
beyond what `F.scaled_dot_product_attention` picks, up/downsampling inside ResBlocks (BigGAN-style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .blocks import (
    Attention,
    Downsample,
    ResBlock,
    TransformerBlock,
    Upsample,
    group_norm,
    zero_module,
)

ATTENTION_BLOCKS = ("transformer", "plain")  # UNetConfig.attention_block


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels of z_t
    out_channels: int = 4  # usually = in_channels (eps, x0 or v have z's shape)
    concat_channels: int = 0  # extra input channels stacked onto z_t (masked image, low-res, ...)
    latent_size: int = 16  # training latent side; places the attention levels
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16, 8)  # latent resolutions (pixels) with attention
    mid_attention: bool = True  # a transformer block in the middle, as in the paper's UNets
    head_dim: int = 32
    num_heads: int | None = None  # None: channels // head_dim heads; else this many everywhere
    transformer_depth: int = 1
    attention_block: str = "transformer"  # "transformer" (Sec. 3.3) or "plain" (ADM's, no MLP)
    context_dim: int | None = None  # None: no cross-attention (self-attention only)
    num_classes: int | None = None  # ADM-style class embedding added to the timestep embedding
    dropout: float = 0.0
    scale_shift_norm: bool = True  # timestep injection as GN scale/shift (True) or additive (False)
    norm_groups: int = 32
    norm_eps: float = 1e-6  # GroupNorm epsilon outside the transformers (diffusers releases: 1e-5)
    qkv_bias: bool = False  # q / k / v biases in the plain attention blocks (the CelebA-HQ release)
    fused_attention: bool = True  # F.scaled_dot_product_attention, or False: the explicit softmax
    gradient_checkpointing: bool = False  # recompute blocks in backward to save memory


def head_width(cfg: UNetConfig, channels: int) -> int:
    """The width of one attention head at a level of `channels` channels."""
    if cfg.num_heads is None:
        return cfg.head_dim
    if channels % cfg.num_heads:
        raise ValueError(f"a level of {channels} channels cannot be split into "
                         f"num_heads={cfg.num_heads} heads")
    return channels // cfg.num_heads


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. Sec. 3.5): [cos(t w_k), sin(t w_k)],
    w_k = max_period^(-k/half)."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class SelfAttentionBlock(nn.Module):
    """The unconditional UNets' attention (DDPM / ADM, and the paper's CelebA-HQ, FFHQ, LSUN
    models): GroupNorm -> multi-head self-attention over the H * W positions -> zero-initialised
    projection, residual. No feed-forward and no cross-attention, so it is about a third of a
    transformer block's parameters."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = group_norm(channels, cfg.norm_groups, cfg.norm_eps)
        self.attn = Attention(channels, head_width(cfg, channels), qkv_bias=cfg.qkv_bias,
                              fused=cfg.fused_attention)
        zero_module(self.attn.to_out)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class SpatialTransformer(nn.Module):
    """Feature map (B, C, H, W) -> tokens (B, HW, C) -> transformer blocks -> feature map,
    plus a residual."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = group_norm(channels, cfg.norm_groups)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, head_width(cfg, channels), cfg.context_dim,
                             fused=cfg.fused_attention)
            for _ in range(cfg.transformer_depth)
        )
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context, context_mask)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class UNet(nn.Module):
    """eps_theta(z_t, t, context): the LDM denoiser. Output has the shape of z_t (out_channels)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.channel_mult)
        widths = [cfg.channels * m for m in cfg.channel_mult]
        level_res = [cfg.latent_size // 2**i for i in range(levels)]
        check_config(cfg, widths, level_res)
        plain = cfg.attention_block == "plain"
        attention_block = SelfAttentionBlock if plain else SpatialTransformer

        emb_dim = 4 * cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.channels, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, cfg.channels, 3, padding=1)

        def res_block(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, groups=cfg.norm_groups, emb_dim=emb_dim,
                            scale_shift=cfg.scale_shift_norm, dropout=cfg.dropout, zero_init=True,
                            eps=cfg.norm_eps)

        def stage(in_ch: int, out_ch: int, res: int) -> nn.ModuleList:
            layers = [res_block(in_ch, out_ch)]
            if res in cfg.attn_resolutions:
                layers.append(attention_block(out_ch, cfg))
            return nn.ModuleList(layers)

        # Down path: every block's output is kept as a skip for the up path.
        self.down = nn.ModuleList()
        skip_widths, ch = [cfg.channels], cfg.channels
        for i in range(levels):
            for _ in range(cfg.num_res_blocks):
                self.down.append(stage(ch, widths[i], level_res[i]))
                ch = widths[i]
                skip_widths.append(ch)
            if i < levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_widths.append(ch)

        mid = [res_block(ch, ch)]
        if cfg.mid_attention:
            mid.append(attention_block(ch, cfg))
        self.mid = nn.ModuleList([*mid, res_block(ch, ch)])

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip; upsample in between.
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            for j in range(cfg.num_res_blocks + 1):
                layers = stage(ch + skip_widths.pop(), widths[i], level_res[i])
                ch = widths[i]
                if i > 0 and j == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(layers)

        self.out = nn.Sequential(group_norm(ch, cfg.norm_groups, cfg.norm_eps), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def forward(self, x_t: Tensor, t: Tensor, *, context: Tensor | None = None,
                context_mask: Tensor | None = None, class_labels: Tensor | None = None,
                concat: Tensor | None = None) -> Tensor:
        """x_t (B, in_channels, H, W), t (B,) or a scalar; context (B, L, context_dim) with
        context_mask (B, L); class_labels (B,); concat (B, concat_channels, H, W).
        Returns (B, out_channels, H, W)."""
        check_inputs(self.cfg, x_t, context, context_mask, class_labels, concat)
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels).to(x_t.dtype))  # (B, 4 C)
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_labels)

        x_in = x_t if concat is None else torch.cat([x_t, concat], dim=1)
        h = self.conv_in(x_in)  # (B, channels, H, W)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.mid, h, emb, context, context_mask)
        for layers in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)

    def _run(self, layers: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor | None,
             context_mask: Tensor | None) -> Tensor:
        """Apply a stage's layers in order, each to the inputs it takes."""
        for layer in layers:
            if isinstance(layer, ResBlock):
                inputs = (h, emb)
            elif isinstance(layer, SpatialTransformer):
                inputs = (h, context, context_mask)
            else:  # SelfAttentionBlock, Downsample, Upsample
                inputs = (h,)
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recomputed in backward: less memory
                h = checkpoint(layer, *inputs, use_reentrant=False)
            else:
                h = layer(*inputs)
        return h


# --- Checks at the module boundary: one clear error for a config or an input that cannot work ----

def check_config(cfg: UNetConfig, widths: list[int], level_res: list[int]) -> None:
    for w in [cfg.channels, *widths]:
        if w % cfg.norm_groups:
            raise ValueError(f"channel width {w} is not divisible by norm_groups={cfg.norm_groups}")
    levels = len(cfg.channel_mult)
    if cfg.latent_size % 2 ** (levels - 1):
        raise ValueError(f"latent_size {cfg.latent_size} is not divisible by 2^(levels-1) = "
                         f"{2 ** (levels - 1)}")
    unknown = sorted(set(cfg.attn_resolutions) - set(level_res))
    if unknown:
        raise ValueError(f"attn_resolutions {unknown} match no level; level resolutions are "
                         f"{level_res} for latent_size={cfg.latent_size} (resolutions are in "
                         "latent pixels)")
    if cfg.attention_block not in ATTENTION_BLOCKS:
        raise ValueError(f"attention_block must be 'transformer' or 'plain', "
                         f"got {cfg.attention_block!r}")
    if cfg.attention_block == "plain" and cfg.context_dim is not None:
        raise ValueError("attention_block='plain' has no cross-attention: use 'transformer' with a "
                         "context_dim")


def check_inputs(cfg: UNetConfig, x_t: Tensor, context: Tensor | None,
                 context_mask: Tensor | None, class_labels: Tensor | None,
                 concat: Tensor | None) -> None:
    B, C, H, W = x_t.shape
    if C != cfg.in_channels:
        raise ValueError(f"x_t has {C} channels, the UNet expects in_channels={cfg.in_channels}")
    down_factor = 2 ** (len(cfg.channel_mult) - 1)
    if H % down_factor or W % down_factor:
        raise ValueError(f"latent size {H}x{W} must be divisible by {down_factor} "
                         "(the UNet's downsampling)")
    if (context is None) != (cfg.context_dim is None):
        state = "missing" if context is None else "given"
        raise ValueError(f"context is {state} but context_dim={cfg.context_dim}")
    if context is not None and (context.ndim != 3 or context.shape[0] != B
                                or context.shape[2] != cfg.context_dim):
        raise ValueError(f"context must have shape ({B}, L, {cfg.context_dim}), "
                         f"got {tuple(context.shape)}")
    if context_mask is not None:
        if (context is None or context_mask.shape != context.shape[:2]
                or context_mask.dtype != torch.bool):
            raise ValueError("context_mask must be a bool tensor of shape (B, L) matching context")
        # A row of only padding would softmax over nothing (NaN). Checked on CPU only: on a GPU the
        # check would synchronise every step, and a traced (compiled) graph cannot branch on data.
        eager_cpu = context_mask.device.type == "cpu" and not torch.compiler.is_compiling()
        if eager_cpu and not context_mask.any(dim=1).all():
            raise ValueError("every context_mask row needs at least one True (real) token")
    if (class_labels is None) != (cfg.num_classes is None):
        raise ValueError(f"class_labels {'missing' if class_labels is None else 'given'}, "
                         f"num_classes={cfg.num_classes}")
    concat_ch = 0 if concat is None else concat.shape[1]
    if concat_ch != cfg.concat_channels:
        raise ValueError(f"concat must have {cfg.concat_channels} channels (None when 0)")
