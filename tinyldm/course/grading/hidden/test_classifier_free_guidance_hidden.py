"""classifier_free_guidance, hidden: a scale above one extrapolates away from the unconditional
prediction."""

import torch

from tinyldm.ddim import guided_prediction


def test_scale_two_extrapolates():
    def model(x_t, t, c):
        return x_t + 3 * c

    x, c = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    got = guided_prediction(model, x, torch.zeros(2), cond={"c": c},
                            uncond={"c": torch.zeros_like(c)}, guidance_scale=2.0)
    assert torch.allclose(got, 2 * model(x, None, c) - model(x, None, torch.zeros_like(c)),
                          atol=1e-6)
