"""noise_schedule, hidden: what alpha_bar feeds (the posterior of DDPM Eqs. 6-7)."""

import torch

from tinyldm.course.grading import close, expect
from tinyldm.schedule import make_betas, q_posterior


def the_posterior_variance_follows_from_alpha_bar(run, g):
    """beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) with your alpha_bar."""
    T = int(torch.randint(100, 400, (), generator=g))
    betas = make_betas("linear", T).double()
    ab = run("noise_schedule", kind="linear", T=T)["alpha_bar"].double()
    expect(ab.shape == (T,), f"alpha_bar has shape {tuple(ab.shape)}, expected ({T},)")
    x = torch.zeros(1)
    got = torch.tensor([q_posterior(x, x, float(ab[i]), float(ab[i - 1]))[1]
                        for i in range(1, T)])
    exact = torch.cumprod(1 - betas, 0)
    want = betas[1:] * (1 - exact[:-1]) / (1 - exact[1:])
    close(got, want, "the posterior variance", rtol=1e-6)
