"""kl_term: KL(N(mean, exp(logvar)) || N(0, I)) per image (Kingma & Welling, App. B)."""

import torch
from torch.distributions import Normal, kl_divergence

from tinyldm.autoencoder import DiagonalGaussian


def _posterior(mean, logvar):
    return DiagonalGaussian(torch.cat([mean, logvar], dim=1))


def test_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    want = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    got = _posterior(mean, logvar).kl()
    assert got.shape == (3,) and torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_zero_for_the_prior_itself():
    assert torch.equal(_posterior(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).kl(),
                       torch.zeros(2))
