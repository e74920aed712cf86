"""cross_attention, hidden: a whole UNet reads its context through the transformer blocks."""

import torch

from tinyldm.course.grading._helpers import randomise, tiny_unet


def test_a_unet_reads_its_context_and_not_its_padding():
    unet = randomise(tiny_unet(context_dim=16), 5).eval()
    g = torch.Generator().manual_seed(6)
    x, t, context = (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([50, 600]),
                     torch.randn(2, 4, 16, generator=g))
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    with torch.no_grad():
        base = unet(x, t, context=context, context_mask=mask)
        other = context.clone()
        other[1, 3] = 5.0  # padding of the second sequence
        assert torch.allclose(unet(x, t, context=other, context_mask=mask), base, atol=1e-5)
        other[0, 0] = 5.0  # a real token of the first
        assert (unet(x, t, context=other, context_mask=mask)[0] - base[0]).abs().max() > 1e-3
