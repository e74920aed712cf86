"""attention, hidden: a UNet built with fused_attention=False runs your attention, and trains like
the fused kernel."""

import torch

from tinyldm.course.grading import close, expect
from tinyldm.course.probe import attention_run, randomise, tiny_unet


def the_unet_runs_this_attention_and_gives_the_fused_output(run, g):
    """A whole UNet whose every attention layer runs attention_weights gives the fused UNet's
    output."""
    seed = int(torch.randint(0, 2**31, (), generator=g))
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g)
    with torch.no_grad():
        want = randomise(tiny_unet(seed), seed).eval()(x, t)
    got = run("unet_attention", seed=seed, x=x, t=t)["out"]
    close(got, want, "the UNet's output", rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def a_short_training_run_matches_the_fused_kernel(run, g):
    """25 Adam steps of a UNet with your attention follow the fused UNet's losses."""
    seed = int(torch.randint(0, 2**31, (), generator=g))
    got = run("attention_run", seed=seed, steps=25)["losses"]
    want = torch.tensor(attention_run(seed, 25, fused=True)[0], dtype=torch.float64)
    expect(got.shape == want.shape, f"{got.shape[0] if got.ndim else 0} losses, expected 25")
    gap = float(((got - want).abs() / want).max())
    expect(gap < 1e-3, f"the losses part from the fused run's by up to {gap:.2%} (allowed 0.1%)")


def a_mask_that_keeps_one_key_gives_one_hot_rows(run, g):
    """With one key kept per sequence, every query puts probability exactly 1 on it."""
    q, k = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    keep = torch.randint(0, 6, (3,), generator=g)
    mask = torch.nn.functional.one_hot(keep, 6).bool()
    w = run("attention", q=q, k=k, mask=mask)["weights"]
    want = mask[:, None, None, :].expand(3, 2, 4, 6).to(w.dtype)
    expect(w.shape == want.shape and bool(torch.equal(w, want)),
           "the weights are not one-hot on the one kept key")
