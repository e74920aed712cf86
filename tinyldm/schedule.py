"""The forward (noising) process of a diffusion model, and the algebra around it.

Contract with the papers
------------------------
DDPM (Ho et al., arXiv 2006.11239) defines a Markov chain that adds Gaussian noise,
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), with the closed form (Eq. 4)

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
    alpha_bar_t  = prod_{s<=t} (1 - beta_s)

and the tractable posterior (Eqs. 6-7)

    q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde_t I)
    mu_tilde     = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t

The LDM paper (Rombach et al., arXiv 2112.10752, Sec. 3.2) runs exactly this process on the
autoencoder's latents z instead of pixels; nothing here knows which one it is given.

Conventions
-----------
* Timesteps are integers t in {0, ..., T-1}; t = 0 is the least noisy step and alpha_bar_{-1} = 1
  (no noise at all), which the posterior at t = 0 and the samplers' last step use.
* `q_posterior` takes alpha_bar_t and alpha_bar_{t-1} rather than t, and beta_t as
  1 - alpha_bar_t / alpha_bar_{t-1}: the same formula then serves a sampler that skips timesteps
  (the posterior of the respaced chain). `ddim.ddpm_step` draws from it.
* Schedules by their honest names:
    - ``linear``:        beta linear in t (DDPM), default 1e-4 .. 0.02.
    - ``scaled_linear``: sqrt(beta) linear in t. The CompVis LDM code calls this "linear";
                         LDM uses 0.0015 .. 0.0195, Stable Diffusion 0.00085 .. 0.012 (our default).
    - ``cosine``:        alpha_bar from a squared cosine (Nichol & Dhariwal, arXiv 2102.09672,
                         Eq. 17) with offset s = 0.008 and betas clipped at 0.999.
* Notation clash: DDIM (arXiv 2010.02502) writes alpha_t for what DDPM calls alpha_bar_t. We
  always use DDPM's names: ``alpha`` is 1 - beta, ``alpha_bar`` is the cumulative product.
* Three parameterizations of the network output, all linear in (x_t, x0, eps):
    eps (DDPM),  x0,  and v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
    (Salimans & Ho, arXiv 2202.00512, Sec. 4).
* SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al., arXiv 2107.00630).

Left out: learned variances (improved DDPM), continuous time, zero-terminal-SNR rescaling.
The tables are computed in float64 and stored in float32 (MPS has no float64).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")

# Default beta ranges per kind; cosine has none (its betas come from the cosine curve).
DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


@dataclass
class ScheduleConfig:
    kind: str = "scaled_linear"
    T: int = 1000
    beta_start: float | None = None  # None: the kind's default (see DEFAULT_BETA_RANGE)
    beta_end: float | None = None
    cosine_s: float = 0.008


def make_betas(kind: str, T: int, beta_start: float | None = None, beta_end: float | None = None,
               cosine_s: float = 0.008) -> Tensor:
    """beta_t for t = 0..T-1 as a float64 tensor of shape (T,)."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}")
    if T < 1:
        raise ValueError(f"T must be a positive number of steps, got {T}")
    if kind == "cosine":
        # Nichol & Dhariwal Eq. 17: f(t) = cos^2(((t/T + s) / (1 + s)) pi/2),
        # alpha_bar_t = f(t) / f(0);
        # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped so the last steps stay finite.
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    lo, hi = DEFAULT_BETA_RANGE[kind]
    lo = lo if beta_start is None else beta_start
    hi = hi if beta_end is None else beta_end
    if not 0 < lo <= hi < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {lo} .. {hi}")
    if kind == "linear":
        return torch.linspace(lo, hi, T, dtype=torch.float64)
    return torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float64) ** 2  # scaled_linear


# --- Conversions between parameterizations -----------------------------------------------------
# Pure functions of broadcastable tensors; `alpha_bar` is alpha_bar_t already shaped like x_t, or a
# Python float (the samplers use exact float64 scalars per step).
# All follow from x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps   (DDPM Eq. 4).

def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    return (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5


def v_from_eps_x0(eps: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    return alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar: Tensor | float) -> Tensor:
    return (1 - alpha_bar) ** 0.5 * x_t + alpha_bar**0.5 * v


def eps_x0_from_prediction(pred: Tensor, x_t: Tensor, alpha_bar: Tensor | float,
                           prediction: str) -> tuple[Tensor, Tensor]:
    """Turn a network output of kind `prediction` into the pair (eps, x0)."""
    if prediction == "eps":
        return pred, x0_from_eps(x_t, pred, alpha_bar)
    if prediction == "x0":
        return eps_from_x0(x_t, pred, alpha_bar), pred
    if prediction == "v":
        return eps_from_v(x_t, pred, alpha_bar), x0_from_v(x_t, pred, alpha_bar)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def q_posterior(x_t: Tensor, x0: Tensor, alpha_bar_t: float,
                alpha_bar_prev: float) -> tuple[Tensor, float]:
    """DDPM Eqs. 6-7: mean and variance of q(x_{t-1} | x_t, x0), from t to the step before it whose
    alpha_bar is `alpha_bar_prev` (1 at t = 0: the variance is then 0 and the mean x0)."""
    alpha_t = alpha_bar_t / alpha_bar_prev  # 1 - beta_t; for a respaced sequence, the effective one
    beta_t = 1 - alpha_t
    # Eq. 7: mu_tilde and beta_tilde.
    mean = (alpha_bar_prev**0.5 * beta_t * x0
            + alpha_t**0.5 * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar_t)
    variance = beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return mean, variance


class NoiseSchedule:
    """The tables of one beta schedule, and the forward-process functions that read them.

    >>> s = NoiseSchedule("scaled_linear", T=1000)
    >>> s.alpha_bar.shape
    torch.Size([1000])
    """

    def __init__(self, kind: str = "scaled_linear", T: int = 1000,
                 beta_start: float | None = None, beta_end: float | None = None,
                 cosine_s: float = 0.008):
        self.config = ScheduleConfig(kind, T, beta_start, beta_end, cosine_s)
        betas = make_betas(kind, T, beta_start, beta_end, cosine_s)  # float64, (T,)
        # BEGIN ASSIGNMENT noise_schedule
        # DDPM Eq. 4's alpha_bar_t = prod_{s <= t} (1 - beta_s)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        # END ASSIGNMENT noise_schedule
        self.T = T
        self._alpha_bar_exact = alpha_bar.tolist()  # Python floats (float64), for alpha_bar_value
        self.betas = betas.float()
        self.alpha_bar = alpha_bar.float()

    @classmethod
    def from_config(cls, config: ScheduleConfig | dict) -> NoiseSchedule:
        return cls(**(config if isinstance(config, dict) else asdict(config)))

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move every table to `device` (in place; returns self for chaining)."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device))
        return self

    def _at(self, table: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """table[t] shaped (B, 1, ..., 1) to broadcast against x, in x's dtype and device."""
        t = torch.as_tensor(t, device=table.device).long()
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), "
                             f"got {tuple(t.shape)}")
        return table[t].to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def alpha_bar_at(self, t: Tensor, x: Tensor) -> Tensor:
        return self._at(self.alpha_bar, t, x)

    def alpha_bar_value(self, t: int) -> float:
        """alpha_bar_t as an exact float64 scalar, with alpha_bar_{-1} = 1 (no noise).

        Samplers use these: their per-step coefficients, like beta_t = 1 - alpha_bar_t /
        alpha_bar_prev, cancel catastrophically when computed from float32 tables.
        """
        if not -1 <= t < self.T:
            raise ValueError(f"timestep {t} is outside -1..{self.T - 1}")
        return 1.0 if t < 0 else self._alpha_bar_exact[t]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """DDPM Eq. 4: x_t ~ q(x_t | x0), with `noise` (shaped like x0) as its standard normal draw;
        t: (B,)."""
        # BEGIN ASSIGNMENT forward_process
        alpha_bar = self.alpha_bar_at(t, x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        # END ASSIGNMENT forward_process

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), shape like t."""
        alpha_bar = self.alpha_bar.to(torch.as_tensor(t).device)[torch.as_tensor(t).long()]
        return alpha_bar / (1 - alpha_bar)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction: str) -> Tensor:
        """What a network trained with `prediction` should output for (x0, eps, t)."""
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        if prediction == "v":
            return v_from_eps_x0(eps, x0, self.alpha_bar_at(t, x0))
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")

    def __repr__(self) -> str:
        return f"NoiseSchedule({asdict(self.config)})"
