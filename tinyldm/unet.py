"""The denoiser: a UNet with timestep embedding, ResBlocks and cross-attention transformer blocks.

Contract with the papers
------------------------
* LDM (Rombach et al., arXiv 2112.10752), Sec. 3.3 and Fig. 3: the time-conditional UNet
  eps_theta(z_t, t, tau(y)) whose intermediate feature maps phi_i(z_t) attend to the condition
  encoding tau(y) in (B, L, D) through cross-attention,

      Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,   Q = W_Q phi_i(z_t),  K = W_K tau(y),  V = W_V tau(y)   (Eq. 2)

  inside a transformer block per attention level (App. E.2.1, Tab. 15): self-attention,
  cross-attention, GEGLU feed-forward (Shazeer, arXiv 2002.05202), each pre-norm and residual.
  `attention_block="plain"` uses instead the unconditional models' self-attention block (GroupNorm,
  attention, projection; no feed-forward), which gives the paper's 274 M CelebA-HQ LDM-4 UNet.
  The "concat" conditioning of Sec. 3.3 / 4.4 / 4.5 stacks extra channels onto z_t at the input.
* The backbone follows DDPM / ADM (Ho et al., arXiv 2006.11239, App. B; Dhariwal & Nichol,
  arXiv 2105.05233, Sec. 3): sinusoidal timestep embedding (Vaswani et al., Sec. 3.5) and an MLP;
  ResBlocks GroupNorm -> SiLU -> conv with the timestep injected either additively or as an
  adaptive GroupNorm scale and shift (ADM's "AdaGN": GN(h) * (1 + scale) + shift); strided-conv
  downsampling, nearest + conv upsampling, skip connections concatenated on the way up.

Conventions
-----------
* `attn_resolutions` are latent resolutions in pixels (16 means "the level whose feature map is
  16 x 16 when the input is `latent_size` x `latent_size`"), not downsampling factors.
* `head_dim` is the width of one attention head; heads = channels // head_dim at each level.
* `context` has shape (B, L, context_dim); `context_mask` (B, L) is True for real tokens and
  False for padding, which no query may attend to. Every row needs at least one True.
* The UNet knows nothing of the noise schedule: t is only an input to the timestep embedding.
* `keep_attention_weights(model)` makes the attention layers keep their softmax probabilities
  (B, heads, N, L) for plotting cross-attention maps; it changes no output (explicit vs fused path).

Left out: learned-variance outputs, the "linear" (1x1) projection variant, xformers / flash kernels
beyond what `F.scaled_dot_product_attention` picks, up/downsampling inside ResBlocks (BigGAN-style).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels of z_t
    out_channels: int = 4  # usually = in_channels (eps, x0 or v have z's shape)
    concat_channels: int = 0  # extra input channels stacked onto z_t (masked image, low-res image, ...)
    latent_size: int = 16  # training latent side; places the attention levels
    channels: int = 128  # base width; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16, 8)  # latent resolutions (pixels) with a transformer block
    mid_attention: bool = True  # a transformer block in the middle, as in the paper's UNets
    head_dim: int = 32
    transformer_depth: int = 1
    attention_block: str = "transformer"  # "transformer" (Sec. 3.3) or "plain": ADM's self-attention block, no MLP
    context_dim: int | None = None  # None: no cross-attention (self-attention only)
    num_classes: int | None = None  # ADM-style class embedding added to the timestep embedding
    dropout: float = 0.0
    scale_shift_norm: bool = True  # timestep injection as GN scale/shift (True) or additive (False)
    norm_groups: int = 32
    gradient_checkpointing: bool = False  # recompute blocks in backward to save memory


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. Sec. 3.5): [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def attention_weights(q: Tensor, k: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """The softmax of Eq. 2 on (B, heads, N, d) queries and (B, heads, L, d) keys: (B, heads, N, L), rows sum to 1.

    mask (B, L) is True where keys count; masked keys get probability exactly 0.
    """
    # BEGIN ASSIGNMENT attention
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)
    # END ASSIGNMENT attention


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, fused: bool = True) -> Tensor:
    """Eq. 2, softmax(q k^T / sqrt(d)) v, on (B, heads, N, d) tensors; mask (B, L) is True where keys count.

    fused=True calls F.scaled_dot_product_attention (flash / memory-efficient kernels where available);
    fused=False is the explicit formula, kept as the reference the tests compare against.
    """
    if fused:
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L): all heads and queries
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return attention_weights(q, k, mask=mask) @ v


class Attention(nn.Module):
    """Multi-head attention of queries x (B, N, C) to keys/values from `context` (B, L, D), or to x itself."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not divisible by head_dim {head_dim}")
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.is_cross = context_dim is not None  # attends to a context (Eq. 2's tau(y)), not to x itself
        self.fused = True  # set False to use the explicit softmax (the reference the tests compare against)
        self.keep_weights = False  # True: explicit softmax, and its probabilities are kept in `self.weights`
        self.weights: Tensor | None = None  # (B, heads, N, L) from the last forward while keep_weights is on

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, N or L, C) -> (B, heads, N or L, d)
        q, k, v = (a.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2) for a in (q, k, v))
        if self.keep_weights:  # for looking at attention maps (keep_attention_weights)
            weights = attention_weights(q, k, mask=mask)  # (B, heads, N, L)
            self.weights = weights.detach()
            out = weights @ v
        else:
            out = attention(q, k, v, mask=mask, fused=self.fused)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


@contextmanager
def keep_attention_weights(model: nn.Module, *, cross_only: bool = True) -> Iterator[dict[str, Attention]]:
    """Inside the `with` block, the attention layers of `model` store their softmax probabilities.

    Yields {module name: Attention layer}; after every forward, `layer.weights` holds (B, heads, N, L)
    (N = h * w latent pixels of that level, L = context tokens), computed by the explicit formula, so
    the model's output is the fused path's up to float rounding. Each forward overwrites the last one;
    read them in between (e.g. in a sampler callback). Cross-attention only by default: those maps say
    which tokens of tau(y) each latent pixel reads. On exit the flags are reset and the weights dropped.
    """
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, Attention) and (m.is_cross or not cross_only)}
    for layer in layers.values():
        layer.keep_weights = True
    try:
        yield layers
    finally:
        for layer in layers.values():
            layer.keep_weights, layer.weights = False, None


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit: W_2 (a * GELU(g)), [a, g] = W_1 x (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: self-attention, cross-attention to the context (if any), GEGLU."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, head_dim)
        self.cross_attn = Attention(dim, head_dim, context_dim) if context_dim else None
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.norm1(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), context, mask)  # Eq. 2: Q from x, K and V from tau(y)
        return x + self.ff(self.norm3(x))


class SelfAttentionBlock(nn.Module):
    """The unconditional UNets' attention (DDPM / ADM, and the paper's CelebA-HQ, FFHQ, LSUN models):
    GroupNorm -> multi-head self-attention over the H * W positions -> zero-initialised projection, residual.
    No feed-forward and no cross-attention, so it is about a third of a transformer block's parameters."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.attn = Attention(channels, cfg.head_dim)
        zero_module(self.attn.to_out)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        h = self.attn(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class SpatialTransformer(nn.Module):
    """Feature map (B, C, H, W) -> tokens (B, HW, C) -> transformer blocks -> feature map, plus a residual."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, cfg.head_dim, cfg.context_dim) for _ in range(cfg.transformer_depth)
        )
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context, mask)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv, timestep injection, GN -> SiLU -> dropout -> conv (zero-init), plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.scale_shift = cfg.scale_shift_norm
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if self.scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch or 2 out_ch, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift  # AdaGN
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, *unused) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, *unused) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(z_t, t, context): the LDM denoiser. Output has the shape of z_t (out_channels)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        levels = len(cfg.channel_mult)
        widths = [cfg.channels * m for m in cfg.channel_mult]
        for w in [cfg.channels, *widths]:
            if w % cfg.norm_groups:
                raise ValueError(f"channel width {w} is not divisible by norm_groups={cfg.norm_groups}")
        level_res = [cfg.latent_size // 2**i for i in range(levels)]
        if cfg.latent_size % 2 ** (levels - 1):
            raise ValueError(f"latent_size {cfg.latent_size} is not divisible by 2^(levels-1) = {2 ** (levels - 1)}")
        unknown = sorted(set(cfg.attn_resolutions) - set(level_res))
        if unknown:
            raise ValueError(f"attn_resolutions {unknown} match no level; level resolutions are {level_res} "
                             f"for latent_size={cfg.latent_size} (resolutions are in latent pixels)")
        if cfg.attention_block not in ("transformer", "plain"):
            raise ValueError(f"attention_block must be 'transformer' or 'plain', got {cfg.attention_block!r}")
        if cfg.attention_block == "plain" and cfg.context_dim is not None:
            raise ValueError("attention_block='plain' has no cross-attention: use 'transformer' with a context_dim")
        attention_block = SpatialTransformer if cfg.attention_block == "transformer" else SelfAttentionBlock

        emb_dim = 4 * cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, cfg.channels, 3, padding=1)

        def stage(in_ch: int, out_ch: int, res: int) -> nn.ModuleList:
            layers = [ResBlock(in_ch, out_ch, emb_dim, cfg)]
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

        mid = [ResBlock(ch, ch, emb_dim, cfg)]
        if cfg.mid_attention:
            mid.append(attention_block(ch, cfg))
        self.mid = nn.ModuleList([*mid, ResBlock(ch, ch, emb_dim, cfg)])

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip; upsample between levels.
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            for j in range(cfg.num_res_blocks + 1):
                layers = stage(ch + skip_widths.pop(), widths[i], level_res[i])
                ch = widths[i]
                if i > 0 and j == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.up.append(layers)

        self.out = nn.Sequential(nn.GroupNorm(cfg.norm_groups, ch, eps=1e-6), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def _run(self, layers: nn.ModuleList, h: Tensor, emb: Tensor, context: Tensor | None,
             mask: Tensor | None) -> Tensor:
        for layer in layers:
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, emb, context, mask, use_reentrant=False)
            else:
                h = layer(h, emb, context, mask)
        return h

    def forward(self, x_t: Tensor, t: Tensor, *, context: Tensor | None = None, context_mask: Tensor | None = None,
                class_labels: Tensor | None = None, concat: Tensor | None = None) -> Tensor:
        cfg = self.cfg
        B, C, H, W = x_t.shape
        if C != cfg.in_channels:
            raise ValueError(f"x_t has {C} channels, the UNet expects in_channels={cfg.in_channels}")
        down_factor = 2 ** (len(cfg.channel_mult) - 1)
        if H % down_factor or W % down_factor:
            raise ValueError(f"latent size {H}x{W} must be divisible by {down_factor} (the UNet's downsampling)")
        if (context is None) != (cfg.context_dim is None):
            state = "missing" if context is None else "given"
            raise ValueError(f"context is {state} but context_dim={cfg.context_dim}")
        if context is not None and (context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim):
            raise ValueError(f"context must have shape ({B}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if context_mask is not None:
            if context is None or context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool:
                raise ValueError("context_mask must be a bool tensor of shape (B, L) matching context")
            # A row of only padding would softmax over nothing (NaN). Checked on CPU only: on a GPU the check
            # would synchronise every step, and a traced (compiled) graph cannot branch on data.
            eager_cpu = context_mask.device.type == "cpu" and not torch.compiler.is_compiling()
            if eager_cpu and not context_mask.any(dim=1).all():
                raise ValueError("every context_mask row needs at least one True (real) token")
        if (class_labels is None) != (cfg.num_classes is None):
            raise ValueError(f"class_labels {'missing' if class_labels is None else 'given'}, "
                             f"num_classes={cfg.num_classes}")
        concat_ch = 0 if concat is None else concat.shape[1]
        if concat_ch != cfg.concat_channels:
            raise ValueError(f"concat must have {cfg.concat_channels} channels (None when 0)")

        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        emb = self.time_mlp(timestep_embedding(t, cfg.channels).to(x_t.dtype))  # (B, 4 * channels)
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_labels)

        h = self.conv_in(x_t if concat is None else torch.cat([x_t, concat], dim=1))  # (B, channels, H, W)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.mid, h, emb, context, context_mask)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)
