"""ddim_step: one DDIM update (DDIM Eqs. 12 and 16)."""

import torch

from tinyldm.ddim import ddim_step, ddpm_step, make_timesteps
from tinyldm.schedule import NoiseSchedule


def test_with_a_point_oracle_every_step_lands_on_the_noised_point():
    """If the network predicts the exact eps for the one data point x*, eta = 0 DDIM moves along
    sqrt(alpha_bar) x* + sqrt(1 - alpha_bar) eps*: every intermediate state is known."""
    s = NoiseSchedule("scaled_linear")
    x_star, eps_star = torch.randn(2, 4).double(), torch.randn(2, 4).double()
    ts = make_timesteps(1000, 10, "uniform")
    x = s.alpha_bar_value(ts[0]) ** 0.5 * x_star + (1 - s.alpha_bar_value(ts[0])) ** 0.5 * eps_star
    for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
        ab, ab_prev = s.alpha_bar_value(t), s.alpha_bar_value(t_prev)
        eps = (x - ab**0.5 * x_star) / (1 - ab) ** 0.5
        x = ddim_step(x_star, eps, ab, ab_prev, eta=0.0)
        want = ab_prev**0.5 * x_star + (1 - ab_prev) ** 0.5 * eps_star
        assert torch.allclose(x, want, atol=1e-9), t


def test_eta_one_is_the_ddpm_step():
    s = NoiseSchedule("cosine")
    x_t, x0, noise = (torch.randn(3, 8).double(), torch.randn(3, 8).double(),
                      torch.randn(3, 8).double())
    for t, t_prev in [(999, 998), (500, 499), (981, 961), (600, 10)]:
        ab_t, ab_prev = s.alpha_bar_value(t), s.alpha_bar_value(t_prev)
        eps = (x_t - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
        a = ddim_step(x0, eps, ab_t, ab_prev, eta=1.0, noise=noise)
        assert torch.allclose(a, ddpm_step(x_t, x0, ab_t, ab_prev, noise=noise),
                              atol=1e-9), (t, t_prev)


def test_matches_diffusers_ddim_scheduler():
    import diffusers  # a reference the grader requires: missing, grading stops with a message

    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    ref.set_timesteps(20)
    s = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 4, 4, 4, generator=g), torch.randn(4, 4, generator=g) / 2
    for eta in [0.0, 0.6]:
        ts = ref.timesteps.tolist()
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            eps = torch.tanh(torch.einsum("bchw,cd->bdhw", x, w))
            noise = torch.randn(x.shape, generator=g)
            want = ref.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            ab, ab_prev = s.alpha_bar_value(t), s.alpha_bar_value(t_prev)
            x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
            got = ddim_step(x0, eps, ab, ab_prev, eta=eta, noise=noise)
            assert torch.allclose(got, want, atol=1e-4), (eta, t)
            x = want
