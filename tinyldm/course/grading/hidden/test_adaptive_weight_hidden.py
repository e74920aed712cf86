"""adaptive_weight, hidden: no reconstruction gradient, no weight."""

import torch

from tinyldm.autoencoder_loss import adaptive_weight


def test_zero_when_the_reconstruction_loss_does_not_depend_on_the_layer():
    layer = torch.randn(4, 4, requires_grad=True)
    h = torch.randn(3, 4) @ layer
    rec, adv = 0.0 * h.sum() + 1.0, h.tanh().sum()
    assert float(adaptive_weight(rec, adv, layer, delta=1e-4, max_value=1e4)) == 0.0
