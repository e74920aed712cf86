"""training_step: the LDM objective, Eq. 3."""

import pytest
import torch
import torch.nn.functional as F

from tinyldm.conditioning import ConditionConfig, ConditionEncoder
from tinyldm.course.grading._helpers import randomise, tiny_unet
from tinyldm.ldm import Denoiser, DiffusionConfig, ldm_loss


def _setup(prediction="eps", loss="l2"):
    cfg = DiffusionConfig(schedule="linear", prediction=prediction, loss=loss, p_uncond=0.0)
    denoiser = Denoiser(randomise(tiny_unet(), 1), ConditionEncoder(ConditionConfig(kind="none")))
    g = torch.Generator().manual_seed(2)
    z0, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    return cfg, denoiser, cfg.make_schedule(), z0, eps, torch.tensor([5, 400, 990])


@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_the_loss_is_eq3_by_hand(loss):
    cfg, denoiser, schedule, z0, eps, t = _setup(loss=loss)
    ab = schedule.alpha_bar[t].view(3, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    with torch.no_grad():
        want = (F.mse_loss if loss == "l2" else F.l1_loss)(denoiser(z_t, t), eps)
        got = ldm_loss(denoiser, schedule, z0, t, eps, None, cfg)
    assert got.ndim == 0 and torch.allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_v_and_x0_targets(prediction):
    cfg, denoiser, schedule, z0, eps, t = _setup(prediction=prediction)
    ab = schedule.alpha_bar[t].view(3, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    target = ab.sqrt() * eps - (1 - ab).sqrt() * z0 if prediction == "v" else z0
    with torch.no_grad():
        want = F.mse_loss(denoiser(z_t, t), target)
        got = ldm_loss(denoiser, schedule, z0, t, eps, None, cfg)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
