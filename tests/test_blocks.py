"""The shared building blocks (tinyldm/blocks.py), against their formulas written out by hand, and
the guarantee that sharing them must keep: one ResBlock for both stages."""

import pytest
import torch
import torch.nn.functional as F

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
from tinyldm.blocks import (
    Attention,
    Downsample,
    ResBlock,
    TransformerBlock,
    Upsample,
    attention_weights,
)
from tinyldm.unet import UNet, UNetConfig


def _randomise(module: torch.nn.Module) -> None:
    """Zero-initialised and unit GroupNorm parameters would hide mistakes: give every parameter a
    value."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def _gn(block_norm, h):
    return F.group_norm(h, block_norm.num_groups, block_norm.weight, block_norm.bias, eps=1e-6)


@pytest.mark.parametrize("in_ch, out_ch", [(8, 8), (8, 16)])
def test_resblock_without_embedding_is_the_autoencoders_formula(in_ch, out_ch):
    block = ResBlock(in_ch, out_ch, groups=4)
    _randomise(block)
    x = torch.randn(2, in_ch, 5, 6)
    h = block.conv1(F.silu(_gn(block.norm1, x)))
    h = block.conv2(F.silu(_gn(block.norm2, h)))
    skip = x if in_ch == out_ch else F.conv2d(x, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x), skip + h)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_resblock_injects_the_timestep_additively_or_as_adagn(scale_shift):
    block = ResBlock(8, 8, groups=4, emb_dim=12, scale_shift=scale_shift)
    _randomise(block)
    x, emb = torch.randn(3, 8, 4, 4), torch.randn(3, 12)
    h = block.conv1(F.silu(_gn(block.norm1, x)))
    e = F.linear(F.silu(emb), block.emb_proj.weight, block.emb_proj.bias)[:, :, None, None]
    if scale_shift:  # ADM's AdaGN: GN(h) * (1 + scale) + shift
        h = _gn(block.norm2, h) * (1 + e[:, :8]) + e[:, 8:]
    else:
        h = _gn(block.norm2, h + e)
    torch.testing.assert_close(block(x, emb), x + block.conv2(F.silu(h)))


def test_zero_initialised_resblock_starts_as_its_skip_connection():
    block = ResBlock(8, 16, groups=4, emb_dim=12, zero_init=True)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 12)), block.skip(x))
    # Without zero_init it is not.
    assert not torch.equal(ResBlock(8, 16, groups=4)(x), block.skip(x))


def test_resampling_halves_and_doubles_the_resolution():
    x = torch.randn(1, 8, 6, 10)
    assert Downsample(8)(x).shape == (1, 8, 3, 5)
    up = Upsample(8)
    torch.testing.assert_close(up(x), up.conv(x.repeat_interleave(2, -2).repeat_interleave(2, -1)))


def test_autoencoder_and_unet_are_built_from_the_same_blocks():
    ae = Autoencoder(AutoencoderConfig(base_channels=32, channel_mult=(1, 2)))
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), attn_resolutions=(4,)))
    for kind in (ResBlock, Downsample, Upsample):
        assert any(isinstance(m, kind) for m in ae.modules())
        assert any(isinstance(m, kind) for m in unet.modules())
    # The autoencoder's blocks have no timestep input; the UNet's all have one and start at their
    # skip.
    assert all(m.emb_proj is None for m in ae.modules() if isinstance(m, ResBlock))
    unet_blocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    assert all(m.emb_proj is not None and not m.conv2.weight.any() for m in unet_blocks)


def test_transformer_block_ignores_padding_tokens_of_its_own_sequence():
    """With a key padding mask, what sits in the padded positions cannot change the real tokens'
    outputs."""
    block = TransformerBlock(16, head_dim=8).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    other = torch.where(mask[..., None], x, torch.randn_like(x) * 10)
    y, y_other = block(x, mask=mask), block(other, mask=mask)
    torch.testing.assert_close(y[mask], y_other[mask])
    assert not torch.allclose(block(x)[mask], block(other)[mask])  # without the mask they do leak


def test_cross_attention_block_reads_the_context_and_respects_its_mask():
    block = TransformerBlock(16, head_dim=8, context_dim=12).eval()
    _randomise(block)
    x, context = torch.randn(1, 4, 16), torch.randn(1, 3, 12)
    context_mask = torch.tensor([[True, True, False]])
    changed_padding = context.clone()
    changed_padding[:, 2] = 5.0
    torch.testing.assert_close(block(x, context, context_mask),
                               block(x, changed_padding, context_mask))
    changed_real = context.clone()
    changed_real[:, 0] = 5.0
    assert not torch.allclose(block(x, context, context_mask), block(x, changed_real, context_mask))


@pytest.mark.parametrize("context_dim", [None, 12])
def test_attention_fused_and_explicit_are_the_formula(context_dim):
    """Attention(fused=True) (F.scaled_dot_product_attention) and Attention(fused=False) (the
    explicit softmax) give softmax(q k^T / sqrt(d)) v per head, written out here with a loop over
    heads; masked keys count for 0."""
    fused = Attention(16, 8, context_dim)
    _randomise(fused)
    explicit = Attention(16, 8, context_dim, fused=False)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, 16)
    context = x if context_dim is None else torch.randn(2, 5, context_dim)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    q, k, v = fused.to_q(x), fused.to_k(context), fused.to_v(context)
    heads = []
    for h in range(2):
        cols = slice(8 * h, 8 * h + 8)
        scores = q[..., cols] @ k[..., cols].mT / 8**0.5  # (B, N, L)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        heads.append(scores.softmax(-1) @ v[..., cols])
    expected = fused.to_out(torch.cat(heads, dim=-1))
    given = None if context_dim is None else context
    torch.testing.assert_close(fused(x, given, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit(x, given, mask), expected, atol=1e-5, rtol=1e-5)
    q_heads, k_heads = (a.reshape(2, 5, 2, 8).transpose(1, 2) for a in (q, k))  # (B, heads, N, d)
    w = attention_weights(q_heads, k_heads, mask=mask)
    assert torch.equal(w[0, :, :, 3:], torch.zeros(2, 5, 2))  # masked keys: exactly 0
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 5))
