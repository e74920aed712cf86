"""The forward process: schedules, q_sample, the posterior, conversions, SNR."""

import math

import pytest
import torch

from tinyldm.schedule import (
    NoiseSchedule,
    eps_from_v,
    eps_from_x0,
    eps_x0_from_prediction,
    make_betas,
    q_posterior,
    v_from_eps_x0,
    x0_from_eps,
    x0_from_v,
)

KINDS = ["linear", "scaled_linear", "cosine"]


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_bar_strictly_decreasing_in_open_unit_interval(kind):
    s = NoiseSchedule(kind, T=1000)
    assert s.alpha_bar.shape == (1000,)
    assert (s.alpha_bar > 0).all() and (s.alpha_bar < 1).all()
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    # alpha_bar is the cumulative product of 1 - beta (the definition, checked in float64).
    betas = make_betas(kind, 1000)
    assert torch.allclose(s.alpha_bar.double(), torch.cumprod(1 - betas, 0), rtol=1e-6)


def test_schedule_closed_forms():
    T = 1000
    lin = make_betas("linear", T)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    step = (0.02 - 1e-4) / (T - 1)
    assert torch.allclose(lin.diff(), torch.full((T - 1,), step, dtype=torch.float64))
    # scaled_linear: sqrt(beta) is linear in t.
    sl = make_betas("scaled_linear", T, 0.0015, 0.0195)
    root_steps = sl.sqrt().diff()
    assert torch.allclose(root_steps, root_steps[0].expand_as(root_steps), atol=1e-12)
    assert sl[-1].item() == pytest.approx(0.0195)
    # cosine: alpha_bar_t = f(t) / f(0) with f(t) = cos^2(((t+1)/T + s)/(1 + s) pi / 2), where
    # unclipped.
    s = NoiseSchedule("cosine", T=T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 10, 500, 900]:
        assert s.alpha_bar[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-5)


def test_schedule_matches_diffusers_betas():
    diffusers = pytest.importorskip("diffusers")
    for ours, theirs, kw in [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("cosine", "squaredcos_cap_v2", {}),
    ]:
        ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw)
        s = NoiseSchedule(ours, T=1000, **kw)
        assert torch.allclose(s.alpha_bar, ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7), ours


def test_q_sample_moments_match_closed_form():
    s = NoiseSchedule("linear", T=1000)
    x0 = torch.tensor([0.7, -1.3]).repeat(200_000, 1)  # (N, 2): many draws of two fixed points
    for t in [0, 250, 999]:
        x_t = s.q_sample(x0, torch.full((x0.shape[0],), t), torch.randn_like(x0))
        ab = s.alpha_bar[t]
        assert torch.allclose(x_t.mean(0), ab.sqrt() * x0[0], atol=0.01)  # Eq. 4 mean
        # Eq. 4 variance
        assert torch.allclose(x_t.var(0), (1 - ab).expand(2), rtol=0.02, atol=1e-4)


def test_posterior_is_bayes_rule_for_gaussians():
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0): multiply the two Gaussians by
    hand."""
    s = NoiseSchedule("cosine", T=1000)
    x0, x_t = torch.tensor([[0.3]]), torch.tensor([[-0.8]])
    betas = make_betas("cosine", 1000)  # float64, so the reference is exact
    alpha_bar = torch.cumprod(1 - betas, 0)
    for t in [1, 17, 500, 998]:
        beta, ab_prev = betas[t], alpha_bar[t - 1]
        # As a function of y = x_{t-1}: N(x_t; sqrt(1-beta) y, beta) and
        # N(y; sqrt(ab_prev) x0, 1 - ab_prev).
        precision = (1 - beta) / beta + 1 / (1 - ab_prev)
        mean = ((1 - beta).sqrt() * x_t.double() / beta
                + ab_prev.sqrt() * x0.double() / (1 - ab_prev)) / precision
        got_mean, got_var = q_posterior(x_t, x0, s.alpha_bar_value(t), s.alpha_bar_value(t - 1))
        assert got_mean.item() == pytest.approx(mean.item(), rel=1e-4)
        assert got_var == pytest.approx((1 / precision).item(), rel=1e-4)
    # At t = 0 the posterior is a point mass at x0.
    mean, var = q_posterior(x_t, x0, s.alpha_bar_value(0), s.alpha_bar_value(-1))
    assert var == 0 and mean.item() == pytest.approx(x0.item(), abs=1e-6)


def test_conversions_round_trip():
    s = NoiseSchedule("scaled_linear", T=1000)
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = s.q_sample(x0, t, eps)
    ab = s.alpha_bar_at(t, x0)
    assert torch.allclose(x0_from_eps(x_t, eps, ab), x0, atol=1e-3)
    assert torch.allclose(eps_from_x0(x_t, x0, ab), eps, atol=1e-3)
    v = v_from_eps_x0(eps, x0, ab)
    assert torch.allclose(x0_from_v(x_t, v, ab), x0, atol=1e-4)
    assert torch.allclose(eps_from_v(x_t, v, ab), eps, atol=1e-4)
    for prediction, pred in [("eps", eps), ("x0", x0), ("v", v)]:
        assert torch.allclose(s.target(x0, eps, t, prediction), pred)
        e, x = eps_x0_from_prediction(pred, x_t, ab, prediction)
        assert torch.allclose(e[2:], eps[2:], atol=1e-3)
        assert torch.allclose(x[:-1], x0[:-1], atol=1e-3)
    # v-prediction keeps unit scale at every t: v has the variance of eps and x0 when both are unit
    # Gaussians.
    assert v.var().item() == pytest.approx(1.0, abs=0.1)


def test_snr_monotone_and_closed_form():
    s = NoiseSchedule("scaled_linear", T=1000)
    t = torch.arange(1000)
    snr = s.snr(t)
    assert (snr[1:] < snr[:-1]).all()
    assert torch.allclose(snr, s.alpha_bar / (1 - s.alpha_bar))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule("linear", beta_start=0.5, beta_end=0.1)
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="t must be"):
        s.q_sample(torch.zeros(3, 2), torch.zeros(2), torch.zeros(3, 2))


def test_config_round_trip():
    s = NoiseSchedule("linear", T=200, beta_start=1e-3, beta_end=0.03)
    s2 = NoiseSchedule.from_config(vars(s.config))
    assert torch.equal(s.alpha_bar, s2.alpha_bar)
