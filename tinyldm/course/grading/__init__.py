"""The grading cases: for each assignment, `<name>.py` (visible: in student copies, and what
`python -m tinyldm.course check <name>` runs) and `hidden/<name>.py` (the instructor's).

A case is a function `case(run, g)`. It draws its inputs with the generator `g` (a fresh seed on
every run), has the student's code compute through `run(probe, **inputs)` (in a sandboxed child
process: see ../probe.py), and checks what comes back with `expect` and `close`. It passes when it
returns. Its docstring is the hint a student sees when it fails. The expected values are computed
here, in the grader's process: from closed forms, from independent references (torch.distributions,
diffusers, PyTorch's fused attention), or, in hidden cases, from the library's own solution.
"""

import numpy as np
import torch

from tinyldm.schedule import make_betas


class Failed(Exception):
    """A check failed: the message says what was expected and what came back."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def close(got, want: torch.Tensor, what: str, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """`got` has `want`'s shape and its values within rtol / atol."""
    got = torch.as_tensor(got)
    expect(tuple(got.shape) == tuple(want.shape),
           f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    expect(got.dtype != torch.bool and not got.is_complex(), f"{what}: dtype {got.dtype}")
    got, want = got.double(), want.double()
    error = float((got - want).abs().max()) if got.numel() else 0.0
    expect(bool(torch.allclose(got, want, rtol=rtol, atol=atol)),
           f"{what}: off by up to {error:.3g} (allowed: {atol:g} + {rtol:g} x |expected|)")


def alpha_bar_table(kind: str, T: int = 1000, **kw) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) in float64, by numpy: the cases never need the
    noise_schedule assignment's code."""
    return torch.from_numpy(np.cumprod(1 - make_betas(kind, T, **kw).numpy()))


def schedule(kind: str, T: int = 1000) -> dict:
    """A schedule's tables as a probe's inputs (it builds its NoiseSchedule from them)."""
    return {"alpha_bar": alpha_bar_table(kind, T), "betas": make_betas(kind, T)}
