"""noise_schedule, hidden: what alpha_bar feeds (the posterior of DDPM Eqs. 6-7)."""

import numpy as np
import torch

from tinyldm.schedule import NoiseSchedule, make_betas, q_posterior


def test_the_posterior_variance_follows_from_alpha_bar():
    s = NoiseSchedule("linear", T=200)
    betas = make_betas("linear", 200).numpy()
    ab = np.cumprod(1 - betas)
    t = np.arange(1, 200)
    want = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
    x = torch.zeros(1)
    got = [q_posterior(x, x, s.alpha_bar_value(i), s.alpha_bar_value(i - 1))[1] for i in t]
    assert np.allclose(got, want, rtol=1e-5)
