"""attention: the attention probabilities softmax(q k^T / sqrt(d)), with a key mask."""

import torch
import torch.nn.functional as F

from tinyldm.blocks import attention_weights


def _qkv(seed=0, n=5, length=7, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, n, d, generator=g) * 2, torch.randn(2, 3, length, d, generator=g) * 2,
            torch.randn(2, 3, length, d, generator=g))


def test_the_weights_give_what_the_fused_kernel_gives():
    q, k, v = _qkv()
    w = attention_weights(q, k)
    assert w.shape == (2, 3, 5, 7) and torch.allclose(w.sum(-1), torch.ones(2, 3, 5), atol=1e-6)
    assert torch.allclose(w @ v, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_masked_keys_get_probability_zero():
    q, k, v = _qkv(1)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True, False] * 3 + [True]])
    w = attention_weights(q, k, mask=mask)
    assert torch.equal(w[0, :, :, 4:], torch.zeros(3, 5, 3))
    assert torch.equal(w[1, :, :, 1::2], torch.zeros(3, 5, 3))
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, 5), atol=1e-6)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert torch.allclose(w @ v, fused, atol=1e-5)
