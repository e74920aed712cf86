"""kl_term, hidden: one value by hand, and the sum over pixels."""

import math

import torch

from tinyldm.course.grading import close


def a_value_by_hand(run, g):
    """Mean 1 and variance 4 in one pixel: 1/2 (1 + 4 - 1 - log 4)."""
    mean, logvar = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), math.log(4.0))
    close(run("kl_term", mean=mean, logvar=logvar)["kl"],
          torch.tensor([0.5 * (1 + 4 - 1 - math.log(4.0))]), "the KL", atol=1e-6)


def summed_over_channels_and_pixels(run, g):
    """18 equal pixels (2 channels of 3 x 3) give 18 times one pixel's KL."""
    m, lv = float(torch.rand((), generator=g)), -float(torch.rand((), generator=g))
    one = 0.5 * (m**2 + math.exp(lv) - 1 - lv)
    got = run("kl_term", mean=torch.full((1, 2, 3, 3), m), logvar=torch.full((1, 2, 3, 3), lv))
    close(got["kl"], torch.tensor([18 * one]), "the KL", rtol=1e-5, atol=1e-6)
