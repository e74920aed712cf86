"""attention: the attention probabilities softmax(q k^T / sqrt(d)), with a key mask."""

import torch
import torch.nn.functional as F

from tinyldm.course.grading import close, expect


def _qkv(g, n=5, length=7, d=16):
    return (torch.randn(2, 3, n, d, generator=g) * 2, torch.randn(2, 3, length, d, generator=g) * 2,
            torch.randn(2, 3, length, d, generator=g))


def the_weights_give_what_the_fused_kernel_gives(run, g):
    """softmax over the keys (the last axis) of q k^T / sqrt(d): weights @ v is attention."""
    q, k, v = _qkv(g)
    w = run("attention", q=q, k=k)["weights"]
    close(w.sum(-1), torch.ones(2, 3, 5), "the rows' sums", atol=1e-5)
    close(w @ v, F.scaled_dot_product_attention(q, k, v), "weights @ v", atol=1e-5)


def masked_keys_get_probability_zero(run, g):
    """A key whose mask is False gets probability exactly 0 (fill its scores with -inf)."""
    q, k, v = _qkv(g, n=4, length=9)
    mask = torch.rand(2, 9, generator=g) < 0.6
    mask[:, 0] = True  # every query has a key to attend to
    w = run("attention", q=q, k=k, mask=mask)["weights"]
    close(w.sum(-1), torch.ones(2, 3, 4), "the rows' sums", atol=1e-5)
    expect(bool((w.transpose(1, 3)[~mask] == 0).all()), "a masked key got a probability above 0")
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    close(w @ v, fused, "weights @ v with the mask", atol=1e-5)
