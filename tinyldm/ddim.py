"""Samplers: ancestral DDPM, DDIM with eta, PLMS, DPM-Solver++(2M), classifier-free guidance, and
DDIM inversion.

Contract with the papers
------------------------
* DDPM ancestral sampling (Ho et al., arXiv 2006.11239, Alg. 2):
  x_{t-1} ~ q(x_{t-1} | x_t, x0_pred), the posterior of Eqs. 6-7 (`schedule.q_posterior`) with x0
  replaced by the network's estimate, variance beta_tilde_t.
* DDIM (Song et al., arXiv 2010.02502, Eq. 12), on a sub-sequence of timesteps t > t_prev:

      x_prev = sqrt(alpha_bar_prev) x0_pred                     "predicted x0"
             + sqrt(1 - alpha_bar_prev - sigma^2) eps_pred      "direction pointing to x_t"
             + sigma z                                          "random noise"
      sigma  = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t))
                   sqrt(1 - alpha_bar_t / alpha_bar_prev)                                (Eq. 16)

  eta = 0 is deterministic (the probability-flow ODE, discretised); eta = 1 over every step is
  ancestral DDPM. Both updates are written for any pair (t, t_prev), so DDPM also runs on a
  shortened timestep sequence ("respacing": beta'_t = 1 - alpha_bar_t / alpha_bar_prev).
* Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, Eq. 6):
  pred = pred_u + s (pred_c - pred_u), computed with one batched network call on [uncond; cond].
  Guidance is applied to the raw network output; since eps, x0 and v are linear in each other for
  fixed x_t, guiding any of them is the same.
* PLMS (Liu et al., arXiv 2202.09778, "pseudo linear multistep"; the sampler CompVis' LDM ships):
  the DDIM update with eta = 0 (their "transfer" function phi), fed not the current eps but a
  linear multistep (Adams-Bashforth) combination of it and up to three earlier ones (their Eq. 12,
  the 4th-order weights 55, -59, 37, -9 over 24; 3rd- and 2nd-order weights while fewer are
  known). The first step has no history: it takes an Euler step, evaluates eps there, and redoes
  the step with the mean of the two (a Heun step, two network evaluations). So `steps` PLMS steps
  cost steps + 1 evaluations.
* DPM-Solver++(2M) (Lu et al., arXiv 2211.01095, Alg. 2), in log-SNR time
  lambda_t = log(alpha_t / sigma_t) with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 -
  alpha_bar_t), on data (x0) predictions D:

      x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) D,   h = lambda_prev - lambda_t
      D      = x0_t                                             (first step: first order, = DDIM)
      D      = (1 + 1 / (2 r)) x0_t - (1 / (2 r)) x0_before,   r = h_before / h   (second order)

  The last step, to alpha_bar = 1 (lambda = +inf, so h is infinite), is first order:
  x_prev = x0_t, as in diffusers' DPMSolverMultistepScheduler with its final sigma at zero.
* DDIM inversion (Song et al., Sec. 4.3; used by e.g. Mokady et al., arXiv 2211.09794): run the
  eta = 0 update backwards, x_next = sqrt(alpha_bar_next) x0_pred + sqrt(1 - alpha_bar_next)
  eps_pred, with the prediction made at the current (less noisy) point, the usual first-order
  approximation.

Notation clash: DDIM's alpha_t is DDPM's alpha_bar_t; we write alpha_bar throughout.

Layout: one function per sampler, its loop written out (`ddpm_sample`, `ddim_sample`,
`plms_sample`, `dpmpp_2m_sample`, `ddim_invert`), each made of one-step updates (`ddpm_step`,
`ddim_step`, `plms_eps`, `dpmpp_2m_step`) and two shared helpers: `timestep_pairs` (which steps)
and `predictor` (the guided network's (eps, x0) at a point). `sample(method=...)` picks a sampler
by name for the scripts.

Conventions: timesteps run through a descending sequence; after the last one the sampler steps to
t_prev = -1 where alpha_bar = 1, so the final output is exactly the last x0 prediction (diffusers'
``set_alpha_to_one=True``; CompVis instead stops at alpha_bar_0). The model is any function
``model(x_t, t, **cond) -> prediction``: a UNet, or an oracle in the tests. Every sampler calls
``callback(i, t, x_t, x0_pred)`` after each step's prediction, e.g. to plot a trajectory.

Left out: PNDM's Runge-Kutta warm-up (PLMS starts with one Heun step instead), DPM-Solver's
singlestep and third-order variants, dynamic thresholding, guidance rescaling. DDIM's loop recorded
as one CUDA graph (`tinyldm.tools.speed.graphed_sampler`) is a speed path, tested equal to
`ddim_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .schedule import NoiseSchedule, eps_from_x0, eps_x0_from_prediction, q_posterior, x0_from_eps

ModelFn = Callable[..., Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]  # (i, t, x_t, x0_pred)
SPACINGS = ("uniform", "trailing", "linspace")


# --- Which timesteps, and what the network predicts there -------------------------------------

def make_timesteps(T: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The descending timesteps a sampler visits.

    uniform:  every c = T // steps-th step, shifted by one: c*i + 1 (CompVis "uniform" DDIM
              spacing, diffusers' "leading" with steps_offset=1). With T / 2 < steps < T the stride
              c is 1 and the sequence would start at t = steps - 1, far from pure noise: refused
              (use trailing or linspace).
    trailing: round(T - i * T / steps) - 1, which always starts at T - 1 (diffusers "trailing").
    linspace: round(linspace(0, T - 1, steps)).
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..T={T}, got {steps}")
    if spacing == "uniform":
        c = T // steps
        if c == 1 and steps < T:
            raise ValueError(f"uniform spacing with {steps} of T={T} steps has stride 1 and would "
                             f"start at t={steps - 1}, not near t={T - 1}: use at most {T // 2} "
                             f"steps, all {T}, or spacing 'trailing' / 'linspace'")
        ts = [c * i + 1 if c > 1 else c * i for i in range(steps)]  # with c = 1 (all T) no shift
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return sorted(set(ts), reverse=True)


def timestep_pairs(T: int, steps: int, spacing: str = "uniform") -> list[tuple[int, int]]:
    """(t, t_prev) for every step of `make_timesteps`; the last step goes to t_prev = -1, where
    alpha_bar = 1 (no noise left)."""
    ts = make_timesteps(T, steps, spacing)
    return list(zip(ts, ts[1:] + [-1], strict=True))


def guided_prediction(model: ModelFn, x_t: Tensor, t: Tensor, *, cond: dict | None = None,
                      uncond: dict | None = None, guidance_scale: float = 1.0) -> Tensor:
    """Network output at (x_t, t), with classifier-free guidance when `uncond` is given.

    `cond` / `uncond` are keyword arguments for the model (e.g. {"context": c, "context_mask": m});
    with `uncond` the model is called once on the batch [uncond; cond] (twice the batch size).
    """
    cond = cond or {}
    if uncond is None:
        return model(x_t, t, **cond)
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and "
                         f"{sorted(uncond)}")
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    pred_u, pred_c = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
    # BEGIN ASSIGNMENT classifier_free_guidance
    return pred_u + guidance_scale * (pred_c - pred_u)  # CFG Eq. 6
    # END ASSIGNMENT classifier_free_guidance


def predictor(model: ModelFn, schedule: NoiseSchedule, *, prediction: str = "eps",
              cond: dict | None = None, uncond: dict | None = None, guidance_scale: float = 1.0,
              clip_x0: float | None = None) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
    """predict(x_t, t) -> (eps, x0): the (guided) network's output at timestep t, of kind
    `prediction` ("eps", "x0" or "v"), read as the pair that DDPM Eq. 4 links to x_t.

    clip_x0: clamp x0 to [-clip_x0, clip_x0] (pixel-space models; latents need None).
    """
    def predict(x_t: Tensor, t: int) -> tuple[Tensor, Tensor]:
        alpha_bar = schedule.alpha_bar_value(t)
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        pred = guided_prediction(model, x_t, t_batch, cond=cond, uncond=uncond,
                                 guidance_scale=guidance_scale)
        eps, x0 = eps_x0_from_prediction(pred.to(x_t.dtype), x_t, alpha_bar, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = eps_from_x0(x_t, x0, alpha_bar)  # keep (eps, x0) consistent with x_t
        return eps, x0

    return predict


# --- One step of each sampler ------------------------------------------------------------------

def ddim_step(x0: Tensor, eps: Tensor, alpha_bar_t: float, alpha_bar_prev: float, *,
              eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """One DDIM update from t to t_prev (Eq. 12); `noise` is needed when eta > 0."""
    # BEGIN ASSIGNMENT ddim_step
    # Eq. 16: the standard deviation of the fresh noise; eta = 1 gives DDPM's beta_tilde.
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)
                   * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    predicted_x0 = alpha_bar_prev**0.5 * x0  # Eq. 12: "predicted x0", scaled to t_prev
    # Eq. 12: "direction pointing to x_t"
    direction = max(1 - alpha_bar_prev - sigma**2, 0.0) ** 0.5 * eps
    if eta == 0:
        return predicted_x0 + direction
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs `noise`")
    return predicted_x0 + direction + sigma * noise  # Eq. 12: "random noise"
    # END ASSIGNMENT ddim_step


def ddpm_step(x_t: Tensor, x0: Tensor, alpha_bar_t: float, alpha_bar_prev: float, *,
              noise: Tensor) -> Tensor:
    """One ancestral step (DDPM Alg. 2 line 4): a draw from the posterior of Eqs. 6-7."""
    mean, variance = q_posterior(x_t, x0, alpha_bar_t, alpha_bar_prev)
    return mean + variance**0.5 * noise


def plms_eps(eps: Tensor, history: list[Tensor]) -> Tensor:
    """PLMS's linear multistep estimate of eps from the current one and the earlier ones (oldest
    first): Adams-Bashforth weights of order len(history) + 1, up to 4 (Liu et al., Eq. 12)."""
    if not history:
        return eps
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def _log_snr(alpha_bar: float) -> float:
    """DPM-Solver's lambda = log(alpha / sigma) = log(alpha_bar / (1 - alpha_bar)) / 2; +inf at
    alpha_bar = 1."""
    return math.inf if alpha_bar >= 1.0 else 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def dpmpp_2m_step(x_t: Tensor, x0: Tensor, alpha_bar_t: float, alpha_bar_prev: float, *,
                  x0_before: Tensor | None = None, alpha_bar_before: float | None = None) -> Tensor:
    """One DPM-Solver++(2M) update from t to t_prev (Lu et al., Alg. 2). `x0_before` is the data
    prediction of the previous step, made at alpha_bar_before; without it the update is first
    order (DDIM's, eta = 0)."""
    lam_t, lam_prev = _log_snr(alpha_bar_t), _log_snr(alpha_bar_prev)
    sigma_t, sigma_prev = (1 - alpha_bar_t) ** 0.5, (1 - alpha_bar_prev) ** 0.5
    if math.isinf(lam_prev):  # to alpha_bar = 1: exp(-h) = 0, x_prev = D
        return x0
    h = lam_prev - lam_t
    D = x0
    if x0_before is not None:
        r = (lam_t - _log_snr(alpha_bar_before)) / h
        D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_before
    return (sigma_prev / sigma_t) * x_t - alpha_bar_prev**0.5 * math.expm1(-h) * D


# --- The samplers ------------------------------------------------------------------------------
# Each runs from x_T (pure noise) to x_0. steps: how many updates, each one network evaluation
# (two batched with guidance); spacing: see `make_timesteps`; predict_options: `predictor`'s
# (prediction, cond, uncond, guidance_scale, clip_x0). The same `generator` and x_T give the same
# samples.

@torch.no_grad()
def ddpm_sample(model: ModelFn, schedule: NoiseSchedule, x_T: Tensor, *, steps: int = 50,
                spacing: str = "uniform", generator: torch.Generator | None = None,
                callback: Callback | None = None, **predict_options) -> Tensor:
    """Ancestral sampling (DDPM Alg. 2): every step a draw from q(x_{t-1} | x_t, x0_pred)."""
    predict = predictor(model, schedule, **predict_options)
    x = x_T
    for i, (t, t_prev) in enumerate(timestep_pairs(schedule.T, steps, spacing)):
        alpha_bar_t, alpha_bar_prev = schedule.alpha_bar_value(t), schedule.alpha_bar_value(t_prev)
        _, x0 = predict(x, t)
        if callback is not None:
            callback(i, t, x, x0)
        if t_prev < 0:  # to alpha_bar = 1: the posterior is a point mass at x0
            x = x0
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = ddpm_step(x, x0, alpha_bar_t, alpha_bar_prev, noise=noise)
    return x


@torch.no_grad()
def ddim_sample(model: ModelFn, schedule: NoiseSchedule, x_T: Tensor, *, steps: int = 50,
                eta: float = 0.0, spacing: str = "uniform",
                generator: torch.Generator | None = None, callback: Callback | None = None,
                **predict_options) -> Tensor:
    """DDIM (Eq. 12): eta = 0 deterministic, eta = 1 with DDPM's variance (Eq. 16)."""
    predict = predictor(model, schedule, **predict_options)
    x = x_T
    for i, (t, t_prev) in enumerate(timestep_pairs(schedule.T, steps, spacing)):
        alpha_bar_t, alpha_bar_prev = schedule.alpha_bar_value(t), schedule.alpha_bar_value(t_prev)
        eps, x0 = predict(x, t)
        if callback is not None:
            callback(i, t, x, x0)
        last = t_prev < 0  # to alpha_bar = 1: no noise left to add, x_0 = x0_pred
        noise = None
        if eta > 0 and not last:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddim_step(x0, eps, alpha_bar_t, alpha_bar_prev, eta=0.0 if last else eta, noise=noise)
    return x


@torch.no_grad()
def plms_sample(model: ModelFn, schedule: NoiseSchedule, x_T: Tensor, *, steps: int = 50,
                spacing: str = "uniform", callback: Callback | None = None,
                **predict_options) -> Tensor:
    """PLMS (Liu et al.): DDIM's eta = 0 update with the linear multistep eps; the first step a
    Heun step. steps + 1 network evaluations."""
    predict = predictor(model, schedule, **predict_options)
    x = x_T
    history: list[Tensor] = []  # eps of the last (up to three) steps, oldest first
    for i, (t, t_prev) in enumerate(timestep_pairs(schedule.T, steps, spacing)):
        alpha_bar_t, alpha_bar_prev = schedule.alpha_bar_value(t), schedule.alpha_bar_value(t_prev)
        eps, x0 = predict(x, t)
        if callback is not None:
            callback(i, t, x, x0)
        if not history and t_prev >= 0:  # no history yet: Euler, then the mean of both eps (Heun)
            eps_next, _ = predict(ddim_step(x0, eps, alpha_bar_t, alpha_bar_prev), t_prev)
            eps_used = (eps + eps_next) / 2
        else:
            eps_used = plms_eps(eps, history)
        history = (history + [eps])[-3:]
        x0_used = x0_from_eps(x, eps_used, alpha_bar_t)
        x = ddim_step(x0_used, eps_used, alpha_bar_t, alpha_bar_prev)
    return x


@torch.no_grad()
def dpmpp_2m_sample(model: ModelFn, schedule: NoiseSchedule, x_T: Tensor, *, steps: int = 50,
                    spacing: str = "uniform", callback: Callback | None = None,
                    **predict_options) -> Tensor:
    """DPM-Solver++(2M) (Lu et al., Alg. 2): second order from the second step on."""
    predict = predictor(model, schedule, **predict_options)
    x = x_T
    x0_before, alpha_bar_before = None, None  # the previous step's x0 prediction, and where
    for i, (t, t_prev) in enumerate(timestep_pairs(schedule.T, steps, spacing)):
        alpha_bar_t, alpha_bar_prev = schedule.alpha_bar_value(t), schedule.alpha_bar_value(t_prev)
        _, x0 = predict(x, t)
        if callback is not None:
            callback(i, t, x, x0)
        x = dpmpp_2m_step(x, x0, alpha_bar_t, alpha_bar_prev, x0_before=x0_before,
                          alpha_bar_before=alpha_bar_before)
        x0_before, alpha_bar_before = x0, alpha_bar_t
    return x


@torch.no_grad()
def ddim_invert(model: ModelFn, schedule: NoiseSchedule, x0: Tensor, *, steps: int = 50,
                spacing: str = "uniform", callback: Callback | None = None,
                **predict_options) -> Tensor:
    """Map a clean x0 to the noise x_T that deterministic DDIM (eta = 0) would turn back into x0.

    Use the same steps, spacing and conditioning for `ddim_sample(..., eta=0)` to reconstruct.
    """
    predict = predictor(model, schedule, **predict_options)
    timesteps = make_timesteps(schedule.T, steps, spacing)[::-1]  # ascending
    x = x0
    for i, t_next in enumerate(timesteps):
        # Predict at the current point, which sits at the previous timestep. At the very start x is
        # x0 itself (alpha_bar = 1); we read eps from the network at the first timestep instead.
        t = timesteps[i - 1] if i > 0 else t_next
        eps, x0_pred = predict(x, t)
        if i == 0:
            x0_pred = x
        if callback is not None:
            callback(i, t_next, x, x0_pred)
        # Eq. 12 with eta = 0, run towards more noise.
        alpha_bar_next = schedule.alpha_bar_value(t_next)
        x = alpha_bar_next**0.5 * x0_pred + (1 - alpha_bar_next) ** 0.5 * eps
    return x


SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample, "plms": plms_sample,
            "dpmpp": dpmpp_2m_sample}
METHODS = tuple(SAMPLERS)


def sample(model: ModelFn, schedule: NoiseSchedule, x_T: Tensor, *, method: str = "ddim",
           eta: float = 0.0, generator: torch.Generator | None = None, **options) -> Tensor:
    """The sampler named `method` (a key of SAMPLERS), for callers that choose it by name. `eta`
    reaches DDIM only, `generator` the two that draw noise (DDPM, DDIM); `options` all of them."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    noise_options = {"ddim": {"eta": eta, "generator": generator},
                     "ddpm": {"generator": generator}}.get(method, {})
    return SAMPLERS[method](model, schedule, x_T, **noise_options, **options)
