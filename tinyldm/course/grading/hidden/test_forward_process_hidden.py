"""forward_process, hidden: linear in the noise it is given, and x0 at t = 0."""

import torch

from tinyldm.schedule import NoiseSchedule


def test_linear_in_the_given_noise():
    s = NoiseSchedule("scaled_linear")
    g = torch.Generator().manual_seed(3)
    x0, n = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([1, 250, 900])
    diff = s.q_sample(x0, t, 2 * n) - s.q_sample(x0, t, n)
    assert torch.allclose(diff, (1 - s.alpha_bar[t]).sqrt().view(3, 1, 1, 1) * n, atol=1e-5)


def test_t_zero_is_nearly_x0():
    s = NoiseSchedule("linear")
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    x_t = s.q_sample(x0, torch.zeros(2, dtype=torch.long), torch.zeros_like(x0))
    assert torch.allclose(x_t, x0 * float(s.alpha_bar[0]) ** 0.5, atol=1e-6)
