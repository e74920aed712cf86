"""cross_attention: the cross-attention sub-layer of the transformer block (LDM Sec. 3.3)."""

import torch

from tinyldm.course.grading import close, expect
from tinyldm.course.probe import transformer_block


def _inputs(g):
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3 + int(torch.randint(0, 3, (), generator=g)):] = False  # padding of the second
    return torch.randn(2, 10, 32, generator=g), torch.randn(2, 6, 12, generator=g), mask


def the_block_is_its_three_sublayers(run, g):
    """x + self-attention(norm1 x), then + cross-attention(norm2 x, context, context_mask), then +
    feed-forward(norm3 x): pre-norm, residual, queries from x, keys and values from the context."""
    seed = int(torch.randint(0, 2**31, (), generator=g))
    x, context, mask = _inputs(g)
    block = transformer_block(seed)
    with torch.no_grad():
        h = x + block.self_attn(block.norm1(x))
        h = h + block.cross_attn(block.norm2(h), context, mask)
        want = h + block.ff(block.norm3(h))
    got = run("cross_attention", seed=seed, x=x, context=context, mask=mask)["out"]
    close(got, want, "the block's output", atol=1e-5)


def the_context_is_read_and_its_padding_is_not(run, g):
    """Changing a real context token changes the output; changing a padded one (mask False) does
    not."""
    seed = int(torch.randint(0, 2**31, (), generator=g))
    x, context, mask = _inputs(g)
    base = run("cross_attention", seed=seed, x=x, context=context, mask=mask)["out"]
    real, pad = context.clone(), context.clone()
    real[:, 0] += 3.0
    pad[1, ~mask[1]] += 3.0
    moved = run("cross_attention", seed=seed, x=x, context=real, mask=mask)["out"]
    expect(float((moved - base).abs().max()) > 1e-2, "the output does not depend on the context")
    close(run("cross_attention", seed=seed, x=x, context=pad, mask=mask)["out"], base,
          "the output after changing only padded tokens", atol=1e-6)
