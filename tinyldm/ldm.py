"""Latent diffusion: the training objective in latent space, and generation.

Contract with the paper
-----------------------
LDM (Rombach et al., arXiv 2112.10752), Sec. 3.2-3.3. With a frozen autoencoder (E, D) and the
latents rescaled to unit variance, z0 = scale_factor * E(x) (App. G), the denoiser eps_theta and the
condition encoder tau_theta are trained together on (Eq. 3)

    L_LDM = E_{z0, y, eps ~ N(0, I), t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2,
    z_t = q_sample(z0, t, eps)

optionally with the v- or x0-parameterized target instead of eps, or an L1 norm. With probability
p_uncond the condition is replaced by the null one, so the same network also learns the
unconditional model that classifier-free guidance needs (Ho & Salimans, arXiv 2207.12598, Alg. 1);
the training step draws t, eps and that dropout and hands them to `ldm_loss`.
Generation runs a sampler from tinyldm.ddim in latent space, then x = D(z0 / scale_factor).

Image-like conditions (a segmentation map, a low-resolution image, a masked image and its mask;
Secs. 4.3.2, 4.4, 4.5) are not cross-attended but concatenated to z_t at the UNet's input (`concat`,
at the latent size; tinyldm.data.image_conditions builds them). They are never dropped, so guidance
acts on the other condition.

What lives where: the schedule is tensors and pure functions (schedule.py), the samplers are loops
over a model function (ddim.py); this file only wires them to a `Denoiser` (UNet + tau, the
trainable part and the part EMA averages) and an `Autoencoder` (frozen). Its checkpoint, one
self-contained file: `tinyldm.checkpoint.ldm_payload` / `load_ldm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoencoder import Autoencoder
from .conditioning import ConditionEncoder, batch_size
from .ddim import sample
from .schedule import NoiseSchedule
from .unet import UNet

LOSSES = ("l2", "l1")  # DiffusionConfig.loss: Eq. 3's squared error, or the absolute error


@dataclass
class DiffusionConfig:
    schedule: str = "scaled_linear"  # see schedule.py for the honest names
    T: int = 1000
    beta_start: float | None = None  # None: the schedule's default range
    beta_end: float | None = None
    prediction: str = "eps"  # "eps", "v" or "x0"
    loss: str = "l2"  # "l2" (Eq. 3) or "l1"
    p_uncond: float = 0.1  # condition dropout for classifier-free guidance

    def make_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.schedule, T=self.T, beta_start=self.beta_start,
                             beta_end=self.beta_end)


class Denoiser(nn.Module):
    """eps_theta(z_t, t, tau_theta(y)): the UNet and the condition encoder, trained (and
    EMA-averaged) together."""

    def __init__(self, unet: UNet, cond: ConditionEncoder):
        super().__init__()
        if unet.cfg.context_dim != cond.context_dim:
            raise ValueError(f"UNet context_dim={unet.cfg.context_dim} but the condition encoder "
                             f"gives {cond.context_dim}")
        self.unet, self.cond = unet, cond

    def forward(self, z_t: Tensor, t: Tensor, condition=None, *,
                concat: Tensor | None = None) -> Tensor:
        """`concat` (B, C_c, h, w): the image-like condition stacked onto z_t (Sec. 3.3
        "concatenation")."""
        return self.unet(z_t, t, **self.cond(condition), concat=concat)


def ldm_loss(denoiser: nn.Module, schedule: NoiseSchedule, z0: Tensor, t: Tensor, eps: Tensor,
             condition, cfg: DiffusionConfig, *, concat: Tensor | None = None) -> Tensor:
    """Eq. 3 on a batch of scaled latents z0 (B, c, h, w), given the step's draws t ~ U{0..T-1} (B,)
    and eps ~ N(0, I) like z0, and the conditions (captions, class ids, layouts or None) after
    dropout.

    `concat` (B, C_c, h, w) is an image-like condition at the latent size (a segmentation map, a
    low-res image, a masked image's latent and its mask); it is never dropped: guidance acts on
    `condition` only.
    """
    # BEGIN ASSIGNMENT training_step
    z_t = schedule.q_sample(z0, t, eps)  # DDPM Eq. 4
    pred = denoiser(z_t, t, condition, concat=concat).float()
    target = schedule.target(z0, eps, t, cfg.prediction).float()  # eps for Eq. 3 (or v / x0)
    return F.mse_loss(pred, target) if cfg.loss == "l2" else F.l1_loss(pred, target)
    # END ASSIGNMENT training_step


@torch.no_grad()
def generate(denoiser: Denoiser, schedule: NoiseSchedule, autoencoder: Autoencoder, condition, *,
             n: int | None = None, latent_size: tuple[int, int], prediction: str = "eps",
             steps: int = 50, eta: float = 0.0, method: str = "ddim", guidance_scale: float = 1.0,
             generator: torch.Generator | None = None, concat: Tensor | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] for a batch of conditions (or `n` unconditional samples):
    z_T ~ N(0, I), the sampler's loop down to z0 (`generate_latents`), x = D(z0 / scale_factor).

    guidance_scale = 1 is the plain conditional model (one UNet call per step); any other value
    uses classifier-free guidance with the learned null condition (two calls, batched).
    `latent_size` may exceed the training size: the UNet is convolutional (paper Sec. 4.3.2).
    `concat` (B, C_c, h, w) is the image-like condition of concat-conditioned models; it goes into
    both halves of a guided batch. To start from a given z_T (e.g. `ddim_invert`'s) or to watch the
    steps, call `generate_latents` and `decode_latents`.
    """
    device = next(denoiser.parameters()).device
    B = batch_size(condition) if condition is not None else len(concat) if concat is not None else n
    if B is None:
        raise ValueError("pass `n` for unconditional generation")
    z_T = torch.randn((B, denoiser.unet.cfg.in_channels, *latent_size), generator=generator,
                      device=device)
    z0 = generate_latents(denoiser, schedule, z_T, condition, prediction=prediction, steps=steps,
                          eta=eta, method=method, guidance_scale=guidance_scale,
                          generator=generator, concat=concat)
    return decode_latents(autoencoder, z0)


@torch.no_grad()
def generate_latents(denoiser: Denoiser, schedule: NoiseSchedule, z_T: Tensor, condition=None, *,
                     prediction: str = "eps", steps: int = 50, eta: float = 0.0,
                     method: str = "ddim", guidance_scale: float = 1.0,
                     generator: torch.Generator | None = None, concat: Tensor | None = None,
                     callback=None) -> Tensor:
    """The scaled latents z0 (B, c, h, w) that the sampler reaches from the starting noise z_T
    (B, c, h, w), one per condition (or per `concat` map; any B for unconditional models).
    `callback(i, t, z_t, z0_pred)` goes to `tinyldm.ddim.sample` (trajectories, attention maps);
    the other arguments are `generate`'s."""
    B, c = z_T.shape[:2]
    n_cond = (batch_size(condition) if condition is not None
              else len(concat) if concat is not None else B)
    if (B, c) != (n_cond, denoiser.unet.cfg.in_channels):
        raise ValueError(f"z_T has shape {tuple(z_T.shape)}; "
                         f"expected ({n_cond}, {denoiser.unet.cfg.in_channels}, h, w) "
                         f"for {n_cond} conditions")
    image_cond = {} if concat is None else {"concat": concat}
    # encode the condition once, not at every step
    cond = {**denoiser.cond(condition), **image_cond}
    uncond = None
    if guidance_scale != 1.0 and condition is not None:
        uncond = {**denoiser.cond(denoiser.cond.null_condition(B)), **image_cond}
    return sample(denoiser.unet, schedule, z_T, steps=steps, method=method, eta=eta,
                  prediction=prediction, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                  generator=generator, callback=callback)


@torch.no_grad()
def decode_latents(autoencoder: Autoencoder, z0: Tensor) -> Tensor:
    """Images x = D(z0 / scale_factor) in [-1, 1] from scaled latents z0 (App. G)."""
    return autoencoder.decode(z0 / autoencoder.scale_factor).clamp(-1, 1)
