"""Samplers, checked against oracles whose answers are known in closed form, and against
diffusers."""

import pytest
import torch

from tinyldm.ddim import (
    SAMPLERS,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dpmpp_2m_sample,
    guided_prediction,
    make_timesteps,
    plms_sample,
    sample,
    timestep_pairs,
)
from tinyldm.schedule import NoiseSchedule, make_betas, v_from_eps_x0


def point_oracle(schedule, x_star, prediction="eps"):
    """The exact denoiser when the data set is the single point x_star: x0_pred = x_star at every
    t."""
    def model(x_t, t, **_):
        ab = schedule.alpha_bar_at(t, x_t)
        eps = (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt()
        x0 = x_star.expand_as(x_t)
        return {"eps": eps, "x0": x0, "v": v_from_eps_x0(eps, x_star, ab)}[prediction]
    return model


def gaussian_oracle(schedule, mu, std, prediction="eps"):
    """The exact denoiser for data x0 ~ N(mu, std^2) per coordinate:
    E[x0 | x_t] = mu + sqrt(ab) std^2 / (ab std^2 + 1 - ab) (x_t - sqrt(ab) mu)."""
    def model(x_t, t, **_):
        ab = schedule.alpha_bar_at(t, x_t)
        x0 = mu + ab.sqrt() * std**2 / (ab * std**2 + 1 - ab) * (x_t - ab.sqrt() * mu)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"eps": eps, "x0": x0, "v": v_from_eps_x0(eps, x0, ab)}[prediction]
    return model


def test_timesteps_spacings():
    # CompVis: range(0, T, c) + 1
    assert make_timesteps(1000, 50, "uniform") == list(range(981, 0, -20))
    assert make_timesteps(1000, 1000, "uniform") == list(range(999, -1, -1))
    assert make_timesteps(1000, 10, "trailing")[0] == 999
    for spacing in ["uniform", "trailing", "linspace"]:
        for steps in [1, 7, 50, 500, 999]:
            if spacing == "uniform" and steps == 999:
                continue  # refused, see below
            ts = make_timesteps(1000, steps, spacing)
            assert len(ts) == steps and all(0 <= t < 1000 for t in ts)
            assert ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError, match="spacing"):
        make_timesteps(1000, 10, "quadratic")


@pytest.mark.parametrize("steps", [501, 600, 999])
def test_uniform_spacing_refuses_stride_one_short_of_the_full_chain(steps):
    """With T/2 < steps < T, T // steps = 1: 'uniform' would be 0..steps-1 and start at
    t = steps - 1 (600 steps: t = 599, alpha_bar 0.16, far from pure noise). It is refused; trailing
    and linspace start at T - 1."""
    with pytest.raises(ValueError, match="trailing"):
        make_timesteps(1000, steps, "uniform")
    for spacing in ("trailing", "linspace"):
        ts = make_timesteps(1000, steps, spacing)
        assert ts[0] == 999 and len(ts) == steps
    assert make_timesteps(1000, 500, "uniform")[0] == 999  # stride 2: 2 * 499 + 1


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("steps", [1, 3, 50, 1000])
def test_ddim_eta0_with_point_oracle_returns_the_point(steps, prediction):
    s = NoiseSchedule("scaled_linear")
    x_star = torch.randn(1, 3, 4, 4)
    x_T = torch.randn(5, 3, 4, 4)
    out = ddim_sample(point_oracle(s, x_star, prediction), s, x_T, steps=steps, eta=0.0,
                      prediction=prediction)
    assert torch.allclose(out, x_star.expand_as(out), atol=1e-4)


def test_ddim_eta0_is_deterministic_and_seeded_noise_is_reproducible():
    s = NoiseSchedule("linear")
    model = gaussian_oracle(s, 0.5, 0.3)
    x_T = torch.randn(4, 2)
    a = sample(model, s, x_T, steps=20, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = sample(model, s, x_T, steps=20, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # eta = 0 uses no noise at all
    c = sample(model, s, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = sample(model, s, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(1))
    e = sample(model, s, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c, d) and not torch.allclose(c, e)


def test_ddim_eta1_step_equals_ddpm_step_with_shared_noise():
    """Eq. 16 with eta = 1 makes DDIM's update the DDPM posterior draw, for full and respaced
    sequences."""
    s = NoiseSchedule("cosine")
    x_t, x0, noise = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    for t, t_prev in [(999, 998), (500, 499), (1, 0), (981, 961), (600, 10)]:
        ab_t, ab_prev = s.alpha_bar_value(t), s.alpha_bar_value(t_prev)
        eps = (x_t.double() - ab_t**0.5 * x0.double()) / (1 - ab_t) ** 0.5
        a = ddim_step(x0.double(), eps, ab_t, ab_prev, eta=1.0, noise=noise.double())
        b = ddpm_step(x_t.double(), x0.double(), ab_t, ab_prev, noise=noise.double())
        assert torch.allclose(a, b, atol=1e-9), (t, t_prev)


def test_ddpm_step_on_full_chain_draws_from_the_closed_form_posterior():
    """With t_prev = t - 1, ddpm_step is mean + std * noise for DDPM Eq. 7 written out from the
    betas."""
    s = NoiseSchedule("linear")
    betas = make_betas("linear", 1000)  # float64
    alpha_bar = torch.cumprod(1 - betas, 0)
    x_t, x0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    for t in [1, 400, 999]:
        beta, ab, ab_prev = betas[t], alpha_bar[t], alpha_bar[t - 1]
        mean = (ab_prev.sqrt() * beta / (1 - ab) * x0
                + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x_t)
        var = (1 - ab_prev) / (1 - ab) * beta
        ab_t, ab_prev = s.alpha_bar_value(t), s.alpha_bar_value(t - 1)
        got = ddpm_step(x_t, x0, ab_t, ab_prev, noise=torch.zeros_like(x_t))
        assert torch.allclose(got, mean, rtol=1e-9, atol=1e-12)
        got1 = ddpm_step(x_t, x0, ab_t, ab_prev, noise=torch.ones_like(x_t))
        assert torch.allclose(got1 - got, var.sqrt().expand_as(got), rtol=1e-7, atol=1e-12)
    # The last step, to alpha_bar = 1: variance 0 and mean x0.
    last = ddpm_step(x_t, x0, s.alpha_bar_value(0), 1.0, noise=torch.ones_like(x_t))
    assert torch.allclose(last, x0)


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_samplers_reproduce_gaussian_data_distribution(method, eta):
    """With the exact denoiser for N(mu, std^2) data, every sampler run over all T steps gives
    N(mu, std^2)."""
    s = NoiseSchedule("cosine")  # alpha_bar_{T-1} ~ 0, so x_T ~ N(0, I) is the true marginal
    mu, std = 0.7, 0.4
    x_T = torch.randn(10_000, 1, generator=torch.Generator().manual_seed(0))
    out = sample(gaussian_oracle(s, mu, std), s, x_T, steps=1000, method=method, eta=eta,
                 generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(mu, abs=0.015)  # standard error 0.004
    assert out.std().item() == pytest.approx(std, rel=0.02)  # standard error 0.7%


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_fewer_steps_converge_at_first_order(method):
    """Fewer steps are a coarser discretisation: the std error shrinks roughly in proportion to
    1 / steps."""
    s = NoiseSchedule("cosine")
    model = gaussian_oracle(s, 0.7, 0.4)
    x_T = torch.randn(40_000, 1, generator=torch.Generator().manual_seed(0))
    err = {}
    for steps in [25, 100, 500]:  # divisors of T, so "uniform" spacing reaches the top of the chain
        out = sample(model, s, x_T, steps=steps, method=method,
                     generator=torch.Generator().manual_seed(1))
        err[steps] = abs(out.std().item() - 0.4)
    assert err[25] > 2 * err[100] > 2 * err[500] and err[500] < 0.005, err


def test_ddpm_and_ddim_eta1_agree_in_distribution_and_step_by_step():
    s = NoiseSchedule("scaled_linear", T=200)
    model = gaussian_oracle(s, -0.2, 0.6, prediction="v")
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    a = ddpm_sample(model, s, x_T, steps=200, prediction="v",
                    generator=torch.Generator().manual_seed(5))
    b = ddim_sample(model, s, x_T, steps=200, eta=1.0, prediction="v",
                    generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-4)  # same noise draws: same samples


def test_cfg_combines_conditional_and_unconditional_predictions():
    calls = []

    def model(x_t, t, *, context):
        calls.append(x_t.shape[0])
        return x_t * context[:, None]  # output depends on the condition

    x, t = torch.randn(3, 4), torch.full((3,), 10)
    cond, uncond = {"context": torch.full((3,), 2.0)}, {"context": torch.full((3,), 0.5)}
    for scale, expected in [(1.0, 2.0 * x), (0.0, 0.5 * x)]:
        got = guided_prediction(model, x, t, cond=cond, uncond=uncond, guidance_scale=scale)
        assert torch.allclose(got, expected)
    got = guided_prediction(model, x, t, cond=cond, uncond=uncond, guidance_scale=7.5)
    assert torch.allclose(got, 0.5 * x + 7.5 * (2.0 * x - 0.5 * x))  # eps_u + s (eps_c - eps_u)
    assert calls == [6, 6, 6]  # one batched call each
    assert torch.allclose(guided_prediction(model, x, t, cond=cond), 2.0 * x)
    with pytest.raises(ValueError, match="same keys"):
        guided_prediction(model, x, t, cond=cond, uncond={"mask": 1}, guidance_scale=2.0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_then_sampling_reconstructs(prediction):
    """Gaussian data: the eta = 0 map noise -> data is a bijection, so inverting then sampling gives
    x0 back, up to the first-order error of the inversion's approximation, which halves when the
    steps double."""
    s = NoiseSchedule("scaled_linear")
    model = gaussian_oracle(s, 0.3, 0.5, prediction)
    x0 = 0.3 + 0.5 * torch.randn(8, 3, 4, 4)
    err = {}
    for steps in [50, 200, 1000]:
        x_T = ddim_invert(model, s, x0, steps=steps, prediction=prediction)
        assert x_T.std().item() == pytest.approx(1.0, abs=0.1)  # it really is noise-like
        rec = sample(model, s, x_T, steps=steps, eta=0.0, prediction=prediction)
        err[steps] = (rec - x0).abs().mean().item()
    assert err[50] < 0.05 and err[1000] < 0.003 and err[50] > 3 * err[200] > 9 * err[1000] / 2, err


def test_callback_sees_every_step():
    s = NoiseSchedule()
    x_star = torch.randn(1, 2)
    seen = []
    for method in SAMPLERS:
        seen.clear()
        sample(point_oracle(s, x_star), s, torch.randn(2, 2), steps=10, method=method,
               callback=lambda i, t, x, x0: seen.append((i, t)))
        assert [i for i, _ in seen] == list(range(10)) and seen[0][1] == 901, method
    # The last step goes to alpha_bar = 1.
    assert timestep_pairs(1000, 3) == [(667, 334), (334, 1), (1, -1)]


def test_sample_by_name_is_the_named_sampler():
    """`sample(method=...)` passes eta to DDIM alone and the generator to the two samplers that draw
    noise."""
    s = NoiseSchedule("scaled_linear", T=100)
    model, x_T = gaussian_oracle(s, 0.2, 0.5), torch.randn(3, 2)
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert torch.equal(sample(model, s, x_T, steps=10, eta=0.5, generator=seed()),
                       ddim_sample(model, s, x_T, steps=10, eta=0.5, generator=seed()))
    assert torch.equal(sample(model, s, x_T, steps=10, method="ddpm", eta=0.5, generator=seed()),
                       ddpm_sample(model, s, x_T, steps=10, generator=seed()))
    assert torch.equal(sample(model, s, x_T, steps=10, method="plms", eta=0.5, generator=seed()),
                       plms_sample(model, s, x_T, steps=10))
    assert torch.equal(sample(model, s, x_T, steps=10, method="dpmpp", generator=seed()),
                       dpmpp_2m_sample(model, s, x_T, steps=10))
    with pytest.raises(ValueError, match="unknown method 'euler'; choose one of ddim, ddpm, plms"):
        sample(model, s, x_T, method="euler")


def test_ddim_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    # A fixed nonlinear "network", so the two samplers see identical predictions at identical
    # inputs.
    w = torch.randn(4, 4) / 2

    def model(x_t, t, **_):
        h = torch.tanh(torch.einsum("bchw,cd->bdhw", x_t, w))
        return h + t.float().view(-1, 1, 1, 1) / 1000

    for prediction, theirs in [("eps", "epsilon"), ("v", "v_prediction")]:
        ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                      beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                      set_alpha_to_one=True, steps_offset=1,
                                      timestep_spacing="leading", prediction_type=theirs)
        ref.set_timesteps(50)
        s = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
        assert ref.timesteps.tolist() == make_timesteps(1000, 50, "uniform")

        for eta in [0.0, 0.7]:
            x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            ours = sample(model, s, x_T, steps=50, eta=eta, prediction=prediction,
                          generator=torch.Generator().manual_seed(9))
            g = torch.Generator().manual_seed(9)
            x = x_T.clone()
            for t in ref.timesteps:
                out = model(x, t.expand(2))
                noise = torch.randn(x.shape, generator=g) if eta > 0 and t > 1 else None
                x = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
            assert torch.allclose(ours, x, atol=1e-4), (prediction, eta)


def test_ddpm_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", beta_start=1e-3,
                                  beta_end=0.1, clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(100)
    s = NoiseSchedule("linear", T=100, beta_start=1e-3, beta_end=0.1)
    model = gaussian_oracle(s, 0.1, 0.8)
    x_T = torch.randn(3, 5)
    ours = ddpm_sample(model, s, x_T, steps=100, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t.expand(3)), t, x, generator=g).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)


# --- PLMS and DPM-Solver++(2M) -----------------------------------------------------------------

def _shared_model():
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2

    def model(x_t, t, **_):
        h = torch.tanh(torch.einsum("bchw,cd->bdhw", x_t, w))
        return h + t.float().view(-1, 1, 1, 1) / 1000
    return model


def _states(method, s, x_T, steps, **kw):
    """x at every timestep the sampler visits, and its output."""
    seen = []
    out = sample(_shared_model(), s, x_T, steps=steps, method=method,
                 callback=lambda i, t, x, x0: seen.append(x), **kw)
    return seen, out


@pytest.mark.parametrize("steps", [10, 25])
def test_plms_matches_diffusers_pndm_step_by_step(steps):
    """PNDMScheduler with skip_prk_steps (PLMS; its first step a Heun step, at a repeated timestep)
    and CompVis' spacing: the same state after every step, to float32 rounding."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1)
    ref.set_timesteps(steps)
    s = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours, out = _states("plms", s, x_T, steps)
    model, x, theirs = _shared_model(), x_T.clone(), []
    for i, t in enumerate(ref.timesteps):
        if i != 1:  # the repeated timestep is the Heun step's second evaluation, not a new state
            theirs.append(x)
        x = ref.step(model(x, t.expand(2)), t, x).prev_sample
    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(out, x, atol=1e-4) and (out - x_T).abs().max() > 0.5


@pytest.mark.parametrize("prediction, theirs", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_pp_2m_matches_diffusers_step_by_step(prediction, theirs, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                beta_end=0.012, timestep_spacing="trailing",
                                                prediction_type=theirs)
    ref.set_timesteps(steps)
    s = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours, out = _states("dpmpp", s, x_T, steps, spacing="trailing", prediction=prediction)
    model, x, theirs_states = _shared_model(), x_T.clone(), []
    for t in ref.timesteps:
        theirs_states.append(x)
        x = ref.step(model(x, t.expand(2)), t, x).prev_sample
    for a, b in zip(ours, theirs_states, strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(out, x, atol=1e-4)


def test_plms_and_dpm_solver_pp_with_guidance_call_the_model_as_counted():
    s = NoiseSchedule("scaled_linear")
    calls = []

    def model(x_t, t, c):
        calls.append(len(x_t))
        return x_t * 0.1 + c

    c = torch.ones(2, 1)
    for method, evaluations in [("plms", 11), ("dpmpp", 10), ("ddim", 10)]:
        calls.clear()
        sample(model, s, torch.randn(2, 1), steps=10, method=method, cond={"c": c},
               uncond={"c": 0 * c}, guidance_scale=3.0)
        # [uncond; cond] batched, one more evaluation for PLMS's start
        assert calls == [4] * evaluations, method


def test_higher_order_samplers_converge_faster_on_the_gaussian_oracle():
    """The probability-flow ODE of Gaussian data has a closed-form solution: x_t = sqrt(ab_t) mu +
    sqrt(ab_t std^2 + 1 - ab_t) z with z fixed along the path. The error at the last visited
    timestep (t = 1), as the number of steps doubles: DDIM halves it (order 1), DPM-Solver++(2M)
    quarters it (order 2); PLMS is far more accurate than DDIM at every step count."""
    mu, std = 0.7, 0.4
    x_T = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0)).double()
    s = NoiseSchedule("cosine")
    table = torch.tensor(s._alpha_bar_exact, dtype=torch.float64)

    def oracle(x_t, t, **_):
        ab = table[t].view(-1, 1)
        x0 = mu + ab.sqrt() * std**2 / (ab * std**2 + 1 - ab) * (x_t - ab.sqrt() * mu)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def error(method, steps):
        seen = []
        sample(oracle, s, x_T, steps=steps, method=method,
               callback=lambda i, t, x, x0: seen.append((t, x)))
        (t0, _), (t_last, x_last) = seen[0], seen[-1]
        ab0, ab = s.alpha_bar_value(t0), s.alpha_bar_value(t_last)
        z = (x_T - ab0**0.5 * mu) / (ab0 * std**2 + 1 - ab0) ** 0.5
        return float((x_last - (ab**0.5 * mu + (ab * std**2 + 1 - ab) ** 0.5 * z)).abs().max())

    errors = {m: [error(m, n) for n in (10, 20, 40, 80, 160)] for m in ("ddim", "plms", "dpmpp")}
    ratio = {m: [e[i] / e[i + 1] for i in range(4)] for m, e in errors.items()}
    assert all(1.7 < r < 2.3 for r in ratio["ddim"][1:]), ratio
    assert all(3.4 < r < 4.6 for r in ratio["dpmpp"][2:]), ratio
    assert all(p < d / 10 for p, d in zip(errors["plms"], errors["ddim"], strict=True)), errors
