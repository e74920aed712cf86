"""ddim_step, hidden: the noise's standard deviation is Eq. 16's, scaled by eta."""

import torch

from tinyldm.ddim import ddim_step


def test_sigma_is_eq16_times_eta():
    noise = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)).double()
    zero = torch.zeros(2, 5, dtype=torch.float64)
    for ab_t, ab_prev, eta in [(0.3, 0.5, 0.5), (0.05, 0.4, 1.0), (0.6, 0.9, 0.25)]:
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        got = ddim_step(zero, zero, ab_t, ab_prev, eta=eta, noise=noise)
        assert torch.allclose(got, sigma * noise, atol=1e-12), (ab_t, ab_prev, eta)
