"""vq_lookup, hidden: each code is its own nearest code, at any latent shape."""

import torch

from tinyldm.course.grading import close, expect
from tinyldm.course.grading.vq_lookup import _codebook, _nearest


def the_codes_map_to_themselves(run, g):
    """A latent image made of the codes themselves looks up to their own indices."""
    codebook = torch.randn(12, 3, generator=g) * torch.linspace(0.2, 4.0, 12)[:, None]
    order = torch.randperm(12, generator=g)
    z = codebook[order].T.reshape(1, 3, 3, 4)
    got = run("vq_lookup", codebook=codebook, z=z)["indices"]
    expect(bool(torch.equal(got.long().flatten(), order)), "a code did not map to itself")


def other_shapes(run, g):
    """(B, c, h, w) latents of any size and a codebook of any size."""
    codebook = _codebook(g, K=40, c=3)
    z = torch.randn(3, 3, 1, 7, generator=g) * 2
    got = run("vq_lookup", codebook=codebook, z=z)["indices"]
    expect(got.shape == (3, 1, 7) and bool(torch.equal(got.long(), _nearest(codebook, z))),
           "the indices are not the nearest codes'")


def straight_through_at_another_shape(run, g):
    """z_q takes the nearest code's value and passes z_e's gradient through unchanged, at any
    shape."""
    codebook = _codebook(g, K=40, c=3)
    z, weights = torch.randn(1, 3, 2, 5, generator=g) * 2, torch.randn(1, 3, 2, 5, generator=g)
    got = run("vq_forward", codebook=codebook, z=z, weights=weights)
    close(got["z_q"], codebook[_nearest(codebook, z)].permute(0, 3, 1, 2), "z_q", atol=1e-6)
    close(got["grad"], weights, "the gradient of sum(z_q * w) at z_e", atol=1e-6)
