"""classifier_free_guidance: Ho & Salimans Eq. 6."""

import torch

from tinyldm.course.grading import close


def _guided(run, g, scale):
    """The probe's model is x * a + c * b: its conditional and unconditional predictions differ."""
    x, c, u = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    a, b = 0.2 + float(torch.rand((), generator=g)), 1 + float(torch.rand((), generator=g))
    got = run("classifier_free_guidance", x=x, c=c, u=u, a=a, b=b, scale=float(scale))["guided"]
    return got, x * a + u * b, x * a + c * b


def the_guided_prediction_at_several_scales(run, g):
    """pred_u + s (pred_c - pred_u): s = 0 is the unconditional model, s = 1 the conditional one."""
    for scale in [0.0, 1.0, 3.5, 7.5, 10 * float(torch.rand((), generator=g))]:
        got, pred_u, pred_c = _guided(run, g, scale)
        close(got, pred_u + scale * (pred_c - pred_u), f"the prediction at scale {scale:.2f}",
              atol=1e-5)
