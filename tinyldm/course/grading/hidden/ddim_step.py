"""ddim_step, hidden: the noise's standard deviation is Eq. 16's, scaled by eta."""

import torch

from tinyldm.course.grading import close
from tinyldm.course.grading.ddim_step import _step


def sigma_is_eq16_times_eta(run, g):
    """sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) multiplies the noise."""
    noise = torch.randn(2, 5, generator=g).double()
    zero = torch.zeros(2, 5, dtype=torch.float64)
    for _ in range(3):
        a_prev = 0.3 + 0.6 * float(torch.rand((), generator=g))
        a_t = a_prev * (0.1 + 0.8 * float(torch.rand((), generator=g)))
        eta = 0.1 + 0.9 * float(torch.rand((), generator=g))
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        close(_step(run, zero, zero, a_t, a_prev, eta, noise), sigma * noise,
              f"the step with x0 = eps = 0 (eta = {eta:.2f})", rtol=0, atol=1e-12)
