"""kl_term, hidden: one value by hand, and the sum over pixels."""

import math

import torch

from tinyldm.autoencoder import DiagonalGaussian


def test_a_value_by_hand():
    moments = torch.tensor([1.0, math.log(4.0)]).view(1, 2, 1, 1)  # mean 1, variance 4
    assert abs(float(DiagonalGaussian(moments).kl()[0]) - 0.5 * (1 + 4 - 1 - math.log(4.0))) < 1e-6


def test_summed_over_channels_and_pixels():
    mean, logvar = torch.full((1, 2, 3, 3), 0.5), torch.full((1, 2, 3, 3), -1.0)
    one = DiagonalGaussian(torch.cat([mean[:, :1, :1, :1], logvar[:, :1, :1, :1]], 1)).kl()
    assert torch.allclose(DiagonalGaussian(torch.cat([mean, logvar], 1)).kl(), 18 * one, rtol=1e-6)
