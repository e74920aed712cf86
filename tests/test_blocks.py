"""The shared building blocks (tinyldm/blocks.py), against their formulas written out by hand, and the
guarantees that sharing them must keep: one ResBlock for both stages, old checkpoints still loading."""

import pytest
import torch
import torch.nn.functional as F

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
from tinyldm.blocks import Downsample, ResBlock, TransformerBlock, Upsample
from tinyldm.conditioning import ConditionConfig, ConditionEncoder
from tinyldm.unet import UNet, UNetConfig


def _randomise(module: torch.nn.Module) -> None:
    """Zero-initialised and unit GroupNorm parameters would hide mistakes: give every parameter a value."""
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
    assert not torch.equal(ResBlock(8, 16, groups=4)(x), block.skip(x))  # without zero_init it is not


def test_resampling_halves_and_doubles_the_resolution():
    x = torch.randn(1, 8, 6, 10)
    assert Downsample(8)(x).shape == (1, 8, 3, 5)
    up = Upsample(8)
    torch.testing.assert_close(up(x), up.conv(x.repeat_interleave(2, -2).repeat_interleave(2, -1)))


def test_autoencoder_and_unet_are_built_from_the_same_blocks():
    ae = Autoencoder(AutoencoderConfig(base_channels=32, channel_mult=(1, 2)))
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), attn_resolutions=(4,)))
    for kind in (ResBlock, Downsample, Upsample):
        assert any(isinstance(m, kind) for m in ae.modules()) and any(isinstance(m, kind) for m in unet.modules())
    # The autoencoder's blocks have no timestep input; the UNet's all have one and start at their skip.
    assert all(m.emb_proj is None for m in ae.modules() if isinstance(m, ResBlock))
    unet_blocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    assert all(m.emb_proj is not None and not m.conv2.weight.any() for m in unet_blocks)


def test_transformer_block_ignores_padding_tokens_of_its_own_sequence():
    """With a key padding mask, what sits in the padded positions cannot change the real tokens' outputs."""
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
    torch.testing.assert_close(block(x, context, context_mask), block(x, changed_padding, context_mask))
    changed_real = context.clone()
    changed_real[:, 0] = 5.0
    assert not torch.allclose(block(x, context, context_mask), block(x, changed_real, context_mask))


@pytest.mark.parametrize("kind", ["text", "layout"])
def test_condition_encoders_load_checkpoints_with_the_old_layer_names(kind):
    """Before the encoders used blocks.TransformerBlock their layers were `attn` and `norm2` (before the
    feed-forward); such checkpoints load into today's `self_attn` / `norm3` and give the same context."""
    cfg = ConditionConfig(kind=kind, context_dim=32, head_dim=16, num_classes=18, max_objects=3,
                          vocab=["<pad>", "<bos>", "<eos>", "<unk>", "a", "red", "circle"])
    encoder = ConditionEncoder(cfg).eval()
    old = {k.replace(".self_attn.", ".attn.").replace(".norm3.", ".norm2."): v for k, v in encoder.state_dict().items()}
    assert any(".blocks.0.attn." in k for k in old) and not any(".norm3." in k for k in old)
    fresh = ConditionEncoder(cfg).eval()
    fresh.load_state_dict(old)  # strict: every key found, none left over
    if kind == "text":
        condition = ["a red circle", ""]
    else:
        condition = {"box_classes": torch.tensor([[3, -1], [-1, -1]]),
                     "boxes": torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])}
    torch.testing.assert_close(fresh(condition)["context"], encoder(condition)["context"], rtol=0, atol=0)
