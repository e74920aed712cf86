"""tinyldm/training/loop.py: the per-step seed streams and the warm-up, which exact resume depends on."""

import torch

from tinyldm.training.loop import seed_stream, warmup_lr


def test_seed_streams_are_functions_of_seed_and_step_and_never_meet():
    seeds = {(stream, seed, step): seed_stream(seed, step, stream)
             for stream in range(3) for seed in range(3) for step in range(0, 100_000, 997)}
    assert len(set(seeds.values())) == len(seeds)  # no two (stream, seed, step) share a generator seed
    assert seed_stream(7, 12, 1) == 2**40 + 7 * 1_000_003 + 12  # the values the scripts have always used
    assert seed_stream(7, 12, 2) == 2**41 + 7 * 1_000_003 + 12
    assert seed_stream(7, 12) == 7 * 1_000_003 + 12
    draw = lambda s: torch.randn(4, generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(draw(seed_stream(3, 5, 1)), draw(seed_stream(3, 5, 1)))  # same step: same draws


def test_warmup_is_linear_then_constant():
    lrs = [warmup_lr(step, 1e-3, 4) for step in range(6)]
    assert lrs == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert warmup_lr(0, 1e-3, 0) == 1e-3  # no warm-up
