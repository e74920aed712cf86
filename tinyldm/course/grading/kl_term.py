"""kl_term: KL(N(mean, exp(logvar)) || N(0, I)) per image (Kingma & Welling, App. B)."""

import torch
from torch.distributions import Normal, kl_divergence

from tinyldm.course.grading import close


def _by_torch(mean, logvar):
    return kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))


def equals_torch_distributions(run, g):
    """1/2 sum over (c, h, w) of (mu^2 + sigma^2 - 1 - log sigma^2): one value per image."""
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    close(run("kl_term", mean=mean, logvar=logvar)["kl"], _by_torch(mean, logvar), "the KL",
          rtol=1e-5, atol=1e-5)


def zero_for_the_prior_and_positive_elsewhere(run, g):
    """KL(N(0, I) || N(0, I)) = 0; moving the mean or the variance away makes it positive."""
    zeros = torch.zeros(2, 4, 3, 3)
    close(run("kl_term", mean=zeros, logvar=zeros)["kl"], torch.zeros(2), "the prior's KL",
          atol=1e-7)
    mean, logvar = zeros + torch.randn(2, 4, 1, 1, generator=g), zeros - 1.0
    close(run("kl_term", mean=mean, logvar=logvar)["kl"], _by_torch(mean, logvar),
          "the KL away from the prior", rtol=1e-5, atol=1e-5)
