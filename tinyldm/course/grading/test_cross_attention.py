"""cross_attention: the cross-attention sub-layer of the transformer block (LDM Sec. 3.3)."""

import torch

from tinyldm.blocks import TransformerBlock
from tinyldm.course.grading._helpers import randomise


def _block():
    return randomise(TransformerBlock(32, 8, context_dim=12), 3).eval()


def _inputs():
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    return torch.randn(2, 10, 32, generator=g), torch.randn(2, 6, 12, generator=g), mask


def test_the_block_is_its_three_sublayers():
    block, (x, context, mask) = _block(), _inputs()
    with torch.no_grad():
        h = x + block.self_attn(block.norm1(x))
        h = h + block.cross_attn(block.norm2(h), context, mask)
        want = h + block.ff(block.norm3(h))
        got = block(x, context, mask)
    assert torch.allclose(got, want, atol=1e-5)


def test_the_context_is_read_and_its_padding_is_not():
    block, (x, context, mask) = _block(), _inputs()
    with torch.no_grad():
        base = block(x, context, mask)
        changed_real = context.clone()
        changed_real[:, 0] += 3.0
        changed_pad = context.clone()
        changed_pad[1, 4] += 3.0  # a padded token of the second sequence
        assert (block(x, changed_real, mask) - base).abs().max() > 1e-2
        assert torch.allclose(block(x, changed_pad, mask), base, atol=1e-6)
