"""noise_schedule: alpha_bar_t from the betas (DDPM Eq. 4)."""

import torch

from tinyldm.course.grading import alpha_bar_table, close, expect
from tinyldm.schedule import make_betas


def the_running_product_for_every_kind(run, g):
    """alpha_bar_t = prod over s <= t of (1 - beta_s): a cumulative product, in float64."""
    for kind in ("linear", "scaled_linear", "cosine"):
        T = int(torch.randint(20, 1001, (), generator=g))
        got = run("noise_schedule", kind=kind, T=T)
        want = alpha_bar_table(kind, T)
        close(got["alpha_bar"], want, f"alpha_bar ({kind}, T = {T})", rtol=1e-12, atol=0)
        close(got["alpha_bar_float32"], want, f"the float32 table ({kind})", rtol=1e-6, atol=1e-9)


def starts_at_one_minus_beta_and_decreases(run, g):
    """alpha_bar_0 = 1 - beta_0, then every factor (1 - beta_t) is below 1."""
    T = int(torch.randint(10, 200, (), generator=g))
    ab = run("noise_schedule", kind="scaled_linear", T=T)["alpha_bar"]
    beta0 = float(make_betas("scaled_linear", T)[0])
    expect(ab.shape == (T,), f"alpha_bar has shape {tuple(ab.shape)}, expected ({T},)")
    expect(abs(float(ab[0]) - (1 - beta0)) < 1e-12,
           f"alpha_bar_0 is {float(ab[0]):.9f}, expected 1 - beta_0 = {1 - beta0:.9f}")
    expect(bool((ab.diff() < 0).all() and ((ab > 0) & (ab < 1)).all()),
           "alpha_bar must decrease strictly and stay in (0, 1)")
