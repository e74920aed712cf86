"""noise_schedule, hidden: what alpha_bar feeds (the posterior of DDPM Eqs. 6-7)."""

import numpy as np

from tinyldm.schedule import NoiseSchedule, make_betas


def test_the_posterior_variance_follows_from_alpha_bar():
    s = NoiseSchedule("linear", T=200)
    betas = make_betas("linear", 200).numpy()
    ab = np.cumprod(1 - betas)
    t = np.arange(1, 200)
    want = betas[t] * (1 - ab[t - 1]) / (1 - ab[t])
    assert np.allclose(s.posterior_variance.numpy()[1:], want, rtol=1e-5)
