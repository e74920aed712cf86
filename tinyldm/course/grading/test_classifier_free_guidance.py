"""classifier_free_guidance: Ho & Salimans Eq. 6."""

import pytest
import torch

from tinyldm.ddim import guided_prediction


def _model(x_t, t, c):
    return x_t * 0.5 + c * 2.0  # conditional and unconditional predictions that differ


def _preds():
    g = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g),
               torch.zeros(2, 3, 4, 4))
    return x, {"c": c}, {"c": u}, _model(x, None, c), _model(x, None, u)


@pytest.mark.parametrize("scale", [0.0, 2.0, 3.5, 7.5])
def test_the_guided_prediction_at_several_scales(scale):
    x, cond, uncond, pred_c, pred_u = _preds()
    got = guided_prediction(_model, x, torch.zeros(2), cond=cond, uncond=uncond,
                            guidance_scale=scale)
    assert torch.allclose(got, pred_u + scale * (pred_c - pred_u), atol=1e-6)


def test_scale_one_is_the_conditional_model():
    x, cond, uncond, pred_c, _ = _preds()
    got = guided_prediction(_model, x, torch.zeros(2), cond=cond, uncond=uncond, guidance_scale=1.0)
    assert torch.allclose(got, pred_c, atol=1e-6)
