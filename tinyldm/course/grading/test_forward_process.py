"""forward_process: x_t ~ q(x_t | x0) with the given noise (DDPM Eq. 4)."""

import torch

from tinyldm.schedule import NoiseSchedule


def test_q_sample_is_eq4_for_the_given_noise():
    s = NoiseSchedule("linear", T=1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ab = s.alpha_bar.double()[t].view(4, 1, 1, 1)
    want = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    assert torch.allclose(s.q_sample(x0, t, noise).double(), want, atol=1e-5)


def test_q_sample_has_the_moments_of_eq4():
    s = NoiseSchedule("cosine", T=1000)
    x0 = torch.full((200_000,), 0.8)
    t = torch.full((200_000,), 300)
    x_t = s.q_sample(x0, t, torch.randn(200_000, generator=torch.Generator().manual_seed(1)))
    ab = float(s.alpha_bar[300])
    assert abs(float(x_t.mean()) - ab**0.5 * 0.8) < 0.01 and abs(float(x_t.var()) - (1 - ab)) < 0.01
