"""The building blocks that the autoencoder, the UNet and the condition encoder share.

Contract with the papers
------------------------
* `ResBlock`: the residual block of DDPM / ADM (Ho et al., arXiv 2006.11239, App. B; Dhariwal &
  Nichol, arXiv 2105.05233, Sec. 3): GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected)
  skip. Given a timestep embedding (`emb_dim`), the block injects it between the two convolutions,
  either added to the features or as ADM's adaptive GroupNorm ("AdaGN": GN(h) (1 + scale) + shift).
  The autoencoder's blocks have no embedding (`emb_dim=None`), the UNet's have one.
* `Downsample` (a stride-2 3x3 conv) and `Upsample` (nearest-neighbour x2, then a 3x3 conv): the
  same resampling in the autoencoder and in the UNet.
* Attention, as the LDM paper writes it in Sec. 3.3 (Rombach et al., arXiv 2112.10752; Vaswani et
  al., arXiv 1706.03762, Sec. 3.2.1):

      Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,
      Q = W_Q phi_i(z_t),  K = W_K tau(y),  V = W_V tau(y)

  `Attention` runs it with `F.scaled_dot_product_attention`, or, built with `fused=False`, with the
  explicit softmax `attention_weights`: the reference the fused kernel is tested against.
* `TransformerBlock`: pre-norm residual self-attention, cross-attention to a context (if it has
  one) and a GEGLU feed-forward (Shazeer, arXiv 2002.05202), as in the LDM UNet's transformer
  (App. E.2.1). Without a context it is the plain pre-norm transformer layer that the text and
  layout encoders stack.

Conventions: feature maps are (B, C, H, W), token sequences (B, N, C); a key padding `mask` (B, L)
is True for real tokens and False for padding, which no query attends to. GroupNorm uses eps = 1e-6
everywhere.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, groups: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with CompVis' eps 1e-6 by default (their diffusers releases use 1e-5 outside the
    transformers)."""
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so that the residual branch it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN -> SiLU -> conv, [timestep injection], GN -> SiLU -> dropout -> conv, plus a skip.

    emb_dim:     width of the timestep embedding, or None for a block without one (the
                 autoencoder's).
    scale_shift: inject the embedding as AdaGN's scale and shift (True) or add it to the features.
    zero_init:   start the second conv at zero, so the block starts as its skip connection (the
                 UNet's).
    eps:         the GroupNorms' epsilon.
    """

    def __init__(self, in_ch: int, out_ch: int, *, groups: int, emb_dim: int | None = None,
                 scale_shift: bool = False, dropout: float = 0.0, zero_init: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        emb_out = 2 * out_ch if scale_shift else out_ch
        self.emb_proj = nn.Linear(emb_dim, emb_out) if emb_dim else None
        self.norm2 = group_norm(out_ch, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:
            zero_module(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        if self.emb_proj is None:
            h = self.norm2(h)
        else:
            e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch or 2 out_ch, 1, 1)
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift  # AdaGN
            else:
                h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) with a stride-2 3x3 conv. `asymmetric`: pad one pixel on the
    right and bottom only, as the CompVis autoencoders (and so their releases) do, instead of one on
    every side."""

    def __init__(self, channels: int, *, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def attention_weights(q: Tensor, k: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """The attention probabilities (Vaswani et al. Eq. 1; LDM Sec. 3.3) of (B, heads, N, d) queries
    over (B, heads, L, d) keys: (B, heads, N, L).

    Each row sums to 1; mask (B, L) is True where keys count, and masked keys get probability 0.
    """
    # BEGIN ASSIGNMENT attention
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)
    # END ASSIGNMENT attention


class Attention(nn.Module):
    """Multi-head attention of queries x (B, N, C) to keys / values from `context` (B, L, D), or
    to x itself.

    qkv_bias: biases in the q / k / v projections (the released unconditional CompVis models have
              them).
    fused:    F.scaled_dot_product_attention (flash / memory-efficient kernels where available), or
              False for the explicit formula `attention_weights(q, k) @ v`.
    """

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None, *,
                 qkv_bias: bool = False, fused: bool = True):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not divisible by head_dim {head_dim}")
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.is_cross = context_dim is not None  # attends to a context (tau(y)), not to x itself
        self.fused = fused

    def forward(self, x: Tensor, context: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, N or L, C) -> (B, heads, N or L, d)
        q, k, v = (a.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2) for a in (q, k, v))
        if self.fused:
            attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, d)
        else:
            out = attention_weights(q, k, mask=mask) @ v  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit: W_2 (a * GELU(g)), [a, g] = W_1 x (Shazeer)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm residual block on tokens x (B, N, C): self-attention, cross-attention to a context
    (when `context_dim` is given), GEGLU feed-forward. `mask` (B, N) marks x's own real tokens (a
    padded caption); `context_mask` (B, L) the context's. `fused`: both attentions' kernel."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None, *,
                 fused: bool = True):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, head_dim, fused=fused)
        self.cross_attn = None
        if context_dim:
            self.cross_attn = Attention(dim, head_dim, context_dim, fused=fused)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.norm1(x), mask=mask)
        if self.cross_attn is not None:
            # BEGIN ASSIGNMENT cross_attention
            # Q from x, K and V from tau(y)
            x = x + self.cross_attn(self.norm2(x), context, context_mask)
            # END ASSIGNMENT cross_attention
        return x + self.ff(self.norm3(x))
