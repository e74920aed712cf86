"""forward_process, hidden: linear in the noise it is given, and nearly x0 at t = 0."""

import torch

from tinyldm.course.grading import close, schedule


def _run(run, kind, x0, t, noise):
    return run("forward_process", **schedule(kind), x0=x0, t=t, noise=noise)["x_t"]


def linear_in_the_given_noise(run, g):
    """Doubling the noise adds sqrt(1 - alpha_bar_t) noise; zero noise leaves sqrt(alpha_bar_t)
    x0."""
    kind, ab = "scaled_linear", schedule("scaled_linear")["alpha_bar"]
    x0, n = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.randint(1, 1000, (3,), generator=g)
    scale = ab[t].view(3, 1, 1, 1)
    close(_run(run, kind, x0, t, 2 * n) - _run(run, kind, x0, t, n), (1 - scale).sqrt() * n,
          "x_t(2 noise) - x_t(noise)", atol=1e-5)
    close(_run(run, kind, x0, t, torch.zeros_like(n)), scale.sqrt() * x0, "x_t with zero noise",
          atol=1e-5)


def t_zero_is_nearly_x0(run, g):
    """At t = 0, x_t is x0 shrunk by sqrt(alpha_bar_0) plus a little noise."""
    kind, ab = "linear", schedule("linear")["alpha_bar"]
    x0, n = torch.randn(2, 3, 4, 4, generator=g) * 10, torch.randn(2, 3, 4, 4, generator=g)
    t = torch.zeros(2, dtype=torch.long)
    close(_run(run, kind, x0, t, n), ab[0].sqrt() * x0 + (1 - ab[0]).sqrt() * n, "x_0", atol=1e-5)
