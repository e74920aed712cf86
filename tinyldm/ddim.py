"""Samplers: ancestral DDPM, DDIM with eta, classifier-free guidance, and DDIM inversion.

Contract with the papers
------------------------
* DDPM ancestral sampling (Ho et al., arXiv 2006.11239, Alg. 2): x_{t-1} ~ q(x_{t-1} | x_t, x0_pred),
  the posterior of Eqs. 6-7 with x0 replaced by the network's estimate, variance beta_tilde_t.
* DDIM (Song et al., arXiv 2010.02502, Eq. 12), on a sub-sequence of timesteps t > t_prev:

      x_prev = sqrt(alpha_bar_prev) x0_pred                          "predicted x0"
             + sqrt(1 - alpha_bar_prev - sigma^2) eps_pred           "direction pointing to x_t"
             + sigma z                                               "random noise"
      sigma  = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)  (Eq. 16)

  eta = 0 is deterministic (the probability-flow ODE, discretised); eta = 1 over every step is
  ancestral DDPM. Both updates are written for any pair (t, t_prev), so DDPM also runs on a
  shortened timestep sequence ("respacing": beta'_t = 1 - alpha_bar_t / alpha_bar_prev).
* Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, Eq. 6): pred = pred_u + s (pred_c - pred_u),
  computed with one batched network call on [uncond; cond]. Guidance is applied to the raw network
  output; since eps, x0 and v are linear in each other for fixed x_t, guiding any of them is the same.
* PLMS (Liu et al., arXiv 2202.09778, "pseudo linear multistep"; the sampler CompVis' LDM ships): the DDIM
  update with eta = 0 (their "transfer" function phi), fed not the current eps but a linear multistep
  (Adams-Bashforth) combination of it and up to three earlier ones (their Eq. 12, the 4th-order weights
  55, -59, 37, -9 over 24; 3rd- and 2nd-order weights while fewer are known). The first step has no history:
  it takes an Euler step, evaluates eps there, and redoes the step with the mean of the two (a Heun step,
  two network evaluations). So `steps` PLMS steps cost steps + 1 evaluations.
* DPM-Solver++(2M) (Lu et al., arXiv 2211.01095, Alg. 2), in log-SNR time lambda_t = log(alpha_t / sigma_t)
  with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), on data (x0) predictions D:

      x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h) - 1) D,      h = lambda_prev - lambda_t
      D      = x0_t                                                  (first step: first order, = DDIM)
      D      = (1 + 1 / (2 r)) x0_t - (1 / (2 r)) x0_before,   r = h_before / h      (second order)

  The last step, to alpha_bar = 1 (lambda = +inf, so h is infinite), is first order: x_prev = x0_t, as in
  diffusers' DPMSolverMultistepScheduler with its final sigma at zero.
* DDIM inversion (Song et al., Sec. 4.3; used by e.g. Mokady et al., arXiv 2211.09794): run the
  eta = 0 update backwards, x_next = sqrt(alpha_bar_next) x0_pred + sqrt(1 - alpha_bar_next) eps_pred,
  with the prediction made at the current (less noisy) point, the usual first-order approximation.

Notation clash: DDIM's alpha_t is DDPM's alpha_bar_t; we write alpha_bar throughout.

Conventions: timesteps run through a descending sequence; after the last one the sampler steps to
t_prev = -1 where alpha_bar = 1, so the final output is exactly the last x0 prediction (diffusers'
``set_alpha_to_one=True``; CompVis instead stops at alpha_bar_0). The model is any function
``model(x_t, t, **cond) -> prediction``: a UNet, or an oracle in the tests.

Left out: PNDM's Runge-Kutta warm-up (PLMS starts with one Heun step instead), DPM-Solver's singlestep and
third-order variants, dynamic thresholding, guidance rescaling. The same loop recorded as one CUDA
graph (`tinyldm.training.speed.graphed_sampler`) is a speed path, tested equal to `sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .schedule import NoiseSchedule, eps_from_x0, eps_x0_from_prediction, x0_from_eps

ModelFn = Callable[..., Tensor]
SPACINGS = ("uniform", "trailing", "linspace")
METHODS = ("ddim", "ddpm", "plms", "dpmpp")


def make_timesteps(T: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The descending timesteps a sampler visits.

    uniform:  every c = T // steps-th step, shifted by one: c*i + 1 (CompVis "uniform" DDIM spacing,
              diffusers' "leading" with steps_offset=1). With T / 2 < steps < T the stride c is 1 and the
              sequence would stop at t = steps - 1, far from pure noise: refused (use trailing or linspace).
    trailing: round(T - i * T / steps) - 1, which always starts at T - 1 (diffusers "trailing").
    linspace: round(linspace(0, T - 1, steps)).
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..T={T}, got {steps}")
    if spacing == "uniform":
        c = T // steps
        if c == 1 and steps < T:
            raise ValueError(f"uniform spacing with {steps} of T={T} steps has stride 1 and would start at "
                             f"t={steps - 1}, not near t={T - 1}: use at most {T // 2} steps, all {T}, or "
                             "spacing 'trailing' / 'linspace'")
        ts = [c * i + 1 if c > 1 else c * i for i in range(steps)]  # with c = 1 (all T steps) no shift
    elif spacing == "trailing":
        ts = [round(T - i * T / steps) - 1 for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return sorted(set(ts), reverse=True)


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
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    pred_u, pred_c = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
    # BEGIN ASSIGNMENT classifier_free_guidance
    return pred_u + guidance_scale * (pred_c - pred_u)  # CFG Eq. 6
    # END ASSIGNMENT classifier_free_guidance


def ddim_step(x0: Tensor, eps: Tensor, alpha_bar_t: float, alpha_bar_prev: float, *, eta: float = 0.0,
              noise: Tensor | None = None) -> Tensor:
    """One DDIM update from t to t_prev (Eq. 12); `noise` is needed when eta > 0."""
    # BEGIN ASSIGNMENT ddim_step
    # Eq. 16: the standard deviation of the fresh noise; eta = 1 gives DDPM's beta_tilde.
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    predicted_x0 = alpha_bar_prev**0.5 * x0  # Eq. 12: "predicted x0", scaled to t_prev
    direction = max(1 - alpha_bar_prev - sigma**2, 0.0) ** 0.5 * eps  # Eq. 12: "direction pointing to x_t"
    if eta == 0:
        return predicted_x0 + direction
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs `noise`")
    return predicted_x0 + direction + sigma * noise  # Eq. 12: "random noise"
    # END ASSIGNMENT ddim_step


def ddpm_step(x_t: Tensor, x0: Tensor, alpha_bar_t: float, alpha_bar_prev: float, *,
              noise: Tensor) -> Tensor:
    """One ancestral step (DDPM Alg. 2 line 4), written as a draw from the posterior of Eqs. 6-7."""
    alpha_t = alpha_bar_t / alpha_bar_prev  # 1 - beta_t; for a respaced sequence, the effective one
    beta_t = 1 - alpha_t
    # Eq. 7: posterior mean (mu_tilde) and variance (beta_tilde).
    mean = (alpha_bar_prev**0.5 * beta_t * x0 + alpha_t**0.5 * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar_t)
    variance = beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return mean + variance**0.5 * noise


def plms_eps(eps: Tensor, history: list[Tensor]) -> Tensor:
    """PLMS's linear multistep estimate of eps from the current one and the earlier ones (oldest first):
    Adams-Bashforth weights of order len(history) + 1, up to 4 (Liu et al., Eq. 12)."""
    if not history:
        return eps
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def _log_snr(alpha_bar: float) -> float:
    """DPM-Solver's lambda = log(alpha / sigma) = log(alpha_bar / (1 - alpha_bar)) / 2; +inf at alpha_bar = 1."""
    return math.inf if alpha_bar >= 1.0 else 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def dpmpp_2m_step(x_t: Tensor, x0: Tensor, alpha_bar_t: float, alpha_bar_prev: float, *,
                  x0_before: Tensor | None = None, alpha_bar_before: float | None = None) -> Tensor:
    """One DPM-Solver++(2M) update from t to t_prev (Lu et al., Alg. 2). `x0_before` is the data prediction of
    the previous step, made at alpha_bar_before; without it the update is first order (DDIM's, eta = 0)."""
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


@torch.no_grad()
def sample(model: ModelFn, schedule: NoiseSchedule, x_T: Tensor, *, steps: int = 50, method: str = "ddim",
           eta: float = 0.0, spacing: str = "uniform", prediction: str = "eps", cond: dict | None = None,
           uncond: dict | None = None, guidance_scale: float = 1.0, clip_x0: float | None = None,
           generator: torch.Generator | None = None,
           callback: Callable[[int, int, Tensor, Tensor], None] | None = None) -> Tensor:
    """Run the reverse process from x_T (pure noise) to x_0.

    method:   "ddim" (Eq. 12 with `eta`), "ddpm" (ancestral, Alg. 2), "plms" (linear multistep, one more
              evaluation than steps) or "dpmpp" (DPM-Solver++(2M)); `eta` is DDIM's only.
    steps:    how many updates: network evaluations (times two with guidance), plus one for PLMS.
    clip_x0:  clamp x0 predictions to [-clip_x0, clip_x0] (pixel-space models; latents need None).
    callback: called as callback(i, t, x_t, x0_pred) after every prediction, e.g. to plot a trajectory.
    The same `generator` and x_T give the same samples.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    timesteps = make_timesteps(schedule.T, steps, spacing)
    x = x_T
    B = x.shape[0]

    def predict(x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(eps, x0) of the (guided) network at (x, t), x0 clipped if asked."""
        alpha_bar = schedule.alpha_bar_value(t)
        t_batch = torch.full((B,), t, device=x.device, dtype=torch.long)
        pred = guided_prediction(model, x, t_batch, cond=cond, uncond=uncond, guidance_scale=guidance_scale)
        eps, x0 = eps_x0_from_prediction(pred.to(x.dtype), x, alpha_bar, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = eps_from_x0(x, x0, alpha_bar)  # keep (eps, x0) consistent with x_t
        return eps, x0

    history: list[Tensor] = []  # PLMS: earlier eps; DPM-Solver++: the previous x0
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        # Exact scalars; after the last step (t_prev = -1) alpha_bar = 1: no noise left.
        alpha_bar_t, alpha_bar_prev = schedule.alpha_bar_value(t), schedule.alpha_bar_value(t_prev)
        eps, x0 = predict(x, t)
        if callback is not None:
            callback(i, t, x, x0)

        if method == "plms":
            if not history and t_prev >= 0:  # no history yet: a Heun step (Euler, then the mean of both eps)
                eps_next, _ = predict(ddim_step(x0, eps, alpha_bar_t, alpha_bar_prev), t_prev)
                eps_used = (eps + eps_next) / 2
            else:
                eps_used = plms_eps(eps, history)
            history = (history + [eps])[-3:]
            x = ddim_step(x0_from_eps(x, eps_used, alpha_bar_t), eps_used, alpha_bar_t, alpha_bar_prev)
            continue
        if method == "dpmpp":
            x = dpmpp_2m_step(x, x0, alpha_bar_t, alpha_bar_prev, x0_before=history[0] if history else None,
                              alpha_bar_before=schedule.alpha_bar_value(timesteps[i - 1]) if i else None)
            history = [x0]
            continue

        needs_noise = t_prev >= 0 and (method == "ddpm" or eta > 0)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if needs_noise else None
        if method == "ddpm":
            x = ddpm_step(x, x0, alpha_bar_t, alpha_bar_prev, noise=noise) if t_prev >= 0 else x0
        else:
            x = ddim_step(x0, eps, alpha_bar_t, alpha_bar_prev, eta=eta if t_prev >= 0 else 0.0, noise=noise)
    return x


@torch.no_grad()
def ddim_invert(model: ModelFn, schedule: NoiseSchedule, x0: Tensor, *, steps: int = 50,
                spacing: str = "uniform", prediction: str = "eps", cond: dict | None = None,
                uncond: dict | None = None, guidance_scale: float = 1.0,
                callback: Callable[[int, int, Tensor, Tensor], None] | None = None) -> Tensor:
    """Map a clean x0 to the noise x_T that deterministic DDIM (eta = 0) would turn back into x0.

    Use the same steps, spacing and conditioning for `sample(..., eta=0)` to reconstruct.
    """
    timesteps = make_timesteps(schedule.T, steps, spacing)[::-1]  # ascending
    x = x0
    B = x.shape[0]
    for i, t_next in enumerate(timesteps):
        # Predict at the current point, which sits at the previous timestep. At the very start x is x0
        # itself (alpha_bar = 1); we read eps from the network at the first timestep instead.
        t = timesteps[i - 1] if i > 0 else t_next
        t_batch = torch.full((B,), t, device=x.device, dtype=torch.long)
        pred = guided_prediction(model, x, t_batch, cond=cond, uncond=uncond, guidance_scale=guidance_scale)
        eps, x0_pred = eps_x0_from_prediction(pred.to(x.dtype), x, schedule.alpha_bar_value(t), prediction)
        if i == 0:
            x0_pred = x
        if callback is not None:
            callback(i, t_next, x, x0_pred)
        # Eq. 12 with eta = 0, run towards more noise.
        alpha_bar_next = schedule.alpha_bar_value(t_next)
        x = alpha_bar_next**0.5 * x0_pred + (1 - alpha_bar_next) ** 0.5 * eps
    return x
