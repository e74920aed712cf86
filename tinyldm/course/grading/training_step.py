"""training_step: the LDM objective, Eq. 3."""

import torch
import torch.nn.functional as F

from tinyldm.course.grading import close, schedule
from tinyldm.course.probe import tiny_denoiser


def _check(run, g, *, kind: str, prediction: str, loss: str) -> None:
    """The loss on one batch, and its gradient at every weight, against the same network's by hand
    (the probe builds the network from `seed`; x_t is handed to it as data)."""
    tables = schedule(kind)
    z0, eps = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    ab = tables["alpha_bar"][t].view(3, 1, 1, 1)
    z_t = (ab.sqrt() * z0 + (1 - ab).sqrt() * eps).float()
    seed = int(torch.randint(0, 2**31, (), generator=g))
    got = run("training_step", **tables, z0=z0, t=t, eps=eps, z_t=z_t, prediction=prediction,
              loss=loss, seed=seed)
    target = {"eps": eps, "x0": z0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * z0}[prediction]
    denoiser = tiny_denoiser(seed)
    want = (F.mse_loss if loss == "l2" else F.l1_loss)(denoiser(z_t, t).float(), target.float())
    want.backward()
    close(got["loss"], want.detach(), f"the {loss} loss with the {prediction} target", rtol=1e-5,
          atol=1e-7)
    for name, p in denoiser.named_parameters():
        grad = got.get(f"grad.{name}", torch.zeros_like(p))
        close(grad, p.grad, f"the gradient at {name}", rtol=1e-4, atol=1e-6)


def the_loss_is_eq3_by_hand(run, g):
    """Noise z0 to z_t with schedule.q_sample(z0, t, eps), predict with denoiser(z_t, t, ...), and
    compare with schedule.target(...) by cfg.loss: 'l2' is the mean squared error, 'l1' the mean
    absolute error. The gradient must reach the network."""
    for loss in ("l2", "l1"):
        _check(run, g, kind="linear", prediction="eps", loss=loss)


def v_and_x0_targets(run, g):
    """The target is schedule.target(z0, eps, t, cfg.prediction): eps, v or x0."""
    for prediction in ("v", "x0"):
        _check(run, g, kind="linear", prediction=prediction, loss="l2")
