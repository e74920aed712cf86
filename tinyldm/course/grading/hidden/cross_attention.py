"""cross_attention, hidden: a whole UNet reads its context through the transformer blocks."""

import torch

from tinyldm.course.grading import close
from tinyldm.course.probe import randomise, tiny_unet


def a_unet_reads_its_context_like_the_library(run, g):
    """A cross-attention UNet gives the library's output for a context with padding."""
    seed = int(torch.randint(0, 2**31, (), generator=g))
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 4, 16, generator=g)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    unet = randomise(tiny_unet(seed, context_dim=16), seed).eval()
    for c in (context, context + 2 * torch.randn(context.shape, generator=g)):
        with torch.no_grad():
            want = unet(x, t, context=c, context_mask=mask)
        got = run("unet_context", seed=seed, x=x, t=t, context=c, mask=mask)["out"]
        close(got, want, "the UNet's output", rtol=1e-4, atol=1e-4 * float(want.abs().max()))
