"""vq_lookup: the nearest code and the straight-through estimator (VQ-VAE Eqs. 1-3)."""

import torch

from tinyldm.course.grading import close, expect


def _codebook(g, K=16, c=4):
    """Codes of very different norms: the ||e||^2 term decides many lookups."""
    return torch.randn(K, c, generator=g) * torch.linspace(0.1, 3.0, K)[:, None]


def _nearest(codebook, z):
    c = codebook.shape[1]
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)
    return torch.cdist(flat.double(), codebook.double()).argmin(1).reshape(z.shape[0],
                                                                         *z.shape[2:])


def indices_are_the_nearest_codes(run, g):
    """The index of the codebook vector at the smallest Euclidean distance, for every latent
    pixel: (B, h, w) int64."""
    codebook = _codebook(g)
    z = torch.randn(2, 4, 5, 6, generator=g) * 1.5
    got = run("vq_lookup", codebook=codebook, z=z)["indices"]
    expect(got.shape == (2, 5, 6), f"indices of shape {tuple(got.shape)}, expected (2, 5, 6)")
    expect(bool(torch.equal(got.long(), _nearest(codebook, z))),
           f"{int((got.long() != _nearest(codebook, z)).sum())} of 60 indices are not the "
           "nearest code's")


def the_output_is_the_code_and_the_gradient_passes_straight_through(run, g):
    """z_q has the value of the nearest code e_k and the gradient of z_e: z_e + (e_k - z_e)
    detached."""
    codebook = _codebook(g)
    z = torch.randn(2, 4, 3, 3, generator=g)
    weights = torch.randn(2, 4, 3, 3, generator=g)
    got = run("vq_forward", codebook=codebook, z=z, weights=weights)
    close(got["z_q"], codebook[_nearest(codebook, z)].permute(0, 3, 1, 2), "z_q", atol=1e-6)
    close(got["grad"], weights, "the gradient of sum(z_q * w) at z_e", atol=1e-6)
