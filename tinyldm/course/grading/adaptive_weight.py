"""adaptive_weight: VQGAN Eq. 7."""

import torch

from tinyldm.course.grading import close, expect


def _inputs(g):
    return torch.randn(8, 4, generator=g), torch.randn(5, 8, generator=g)


def _by_hand(layer, x, rec_scale, adv_scale, delta, max_value):
    layer = layer.clone().requires_grad_()
    h = x @ layer
    g_rec = torch.autograd.grad(h.pow(2).mean() * rec_scale, layer, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(h.sin().sum() * adv_scale, layer)[0].norm()
    return (g_rec / (g_adv + delta)).clamp(0, max_value).detach()


def _weight(run, layer, x, rec_scale, adv_scale, delta, max_value):
    got = run("adaptive_weight", layer=layer, x=x, rec_scale=rec_scale, adv_scale=adv_scale,
              delta=delta, max_value=max_value)
    want = _by_hand(layer, x, rec_scale, adv_scale, delta, max_value)
    close(got["lambda"], want, f"lambda (rec x{rec_scale:g}, adv x{adv_scale:g})", rtol=1e-5,
          atol=0)
    return got


def the_weight_of_eq7(run, g):
    """lambda = ||grad of L_rec|| / (||grad of L_GAN|| + delta), a scalar with no gradient."""
    got = _weight(run, *_inputs(g), 1.0, 1.0, 1e-4, 1e4)
    expect(not got["requires_grad"], "lambda must carry no gradient (detach it)")


def delta_counts_when_the_adversarial_gradient_is_small(run, g):
    """When ||grad of L_GAN|| is about delta, delta halves lambda: it is in the denominator."""
    _weight(run, *_inputs(g), 1.0, 1e-5, 1e-4, 1e9)


def clamped_to_max_value(run, g):
    """lambda is clamped to [0, max_value]."""
    layer, x = _inputs(g)
    _weight(run, layer, x, 1.0, 1.0, 1e-4, 1e4)
    _weight(run, layer, x, 1e6, 1.0, 1e-4, 1e4)
