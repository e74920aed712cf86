"""noise_schedule: alpha_bar_t from the betas (DDPM Eq. 4)."""

import numpy as np
import pytest

from tinyldm.schedule import NoiseSchedule, make_betas


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_alpha_bar_is_the_running_product(kind):
    s = NoiseSchedule(kind, T=1000)
    betas = make_betas(kind, 1000).numpy()
    want = np.cumprod(1 - betas)
    assert np.allclose(np.array(s._alpha_bar_exact), want, rtol=1e-12, atol=0)
    assert np.allclose(s.alpha_bar.numpy(), want, rtol=1e-6, atol=1e-9)


def test_alpha_bar_starts_at_one_minus_beta_and_decreases():
    s = NoiseSchedule("scaled_linear", T=50)
    ab = np.array(s._alpha_bar_exact)
    assert abs(ab[0] - (1 - float(s.betas[0]))) < 1e-7
    assert np.all(np.diff(ab) < 0) and np.all((ab > 0) & (ab < 1))
