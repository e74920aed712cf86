"""forward_process: x_t ~ q(x_t | x0) with the given noise (DDPM Eq. 4)."""

import torch

from tinyldm.course.grading import close, schedule


def _eq4(alpha_bar, x0, t, noise):
    ab = alpha_bar[t].view(-1, *[1] * (x0.ndim - 1))
    return ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()


def eq4_for_the_given_noise(run, g):
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, with the noise you are given."""
    kind = "linear"
    ab = schedule(kind)["alpha_bar"]
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(1, 999, (2,), generator=g)])
    got = run("forward_process", **schedule(kind), x0=x0, t=t, noise=noise)["x_t"]
    close(got, _eq4(ab, x0, t, noise), "x_t", atol=1e-5)


def any_schedule_and_any_shape(run, g):
    """alpha_bar_t is read at each sample's own t and broadcast over the sample's other axes."""
    kind = "cosine"
    ab = schedule(kind)["alpha_bar"]
    x0, noise = torch.randn(3, 2, 6, generator=g) * 3, torch.randn(3, 2, 6, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    got = run("forward_process", **schedule(kind), x0=x0, t=t, noise=noise)["x_t"]
    close(got, _eq4(ab, x0, t, noise), "x_t", atol=1e-5)
