"""adaptive_weight: VQGAN Eq. 7."""

import torch

from tinyldm.autoencoder_loss import adaptive_weight


def _losses(rec_scale=1.0, adv_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.randn(8, 4, generator=g, requires_grad=True)
    x = torch.randn(5, 8, generator=g)
    h = x @ layer
    return (h.pow(2).mean() * rec_scale, (h.sin().sum()) * adv_scale, layer)


def _by_hand(rec, adv, layer, delta, max_value):
    g_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(adv, layer, retain_graph=True)[0].norm()
    return float((g_rec / (g_adv + delta)).clamp(0, max_value))


def test_the_weight_of_eq7():
    rec, adv, layer = _losses()
    got = adaptive_weight(rec, adv, layer, delta=1e-4, max_value=1e4)
    assert got.ndim == 0 and (abs(float(got) - _by_hand(rec, adv, layer, 1e-4, 1e4))
                              < 1e-5 * _by_hand(rec, adv, layer, 1e-4, 1e4))


def test_delta_counts_when_the_adversarial_gradient_is_small():
    # ||grad_adv|| ~ 1e-4: delta = 1e-4 halves lambda
    rec, adv, layer = _losses(adv_scale=1e-5, seed=1)
    want = _by_hand(rec, adv, layer, 1e-4, 1e9)
    assert (abs(float(adaptive_weight(rec, adv, layer, delta=1e-4, max_value=1e9)) - want)
            < 1e-4 * want)


def test_clamped_to_max_value():
    rec, adv, layer = _losses(rec_scale=1e6, seed=2)
    assert float(adaptive_weight(rec, adv, layer, delta=1e-4, max_value=1e4)) == 1e4
