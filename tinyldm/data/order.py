"""The data order and each step's random streams, as pure functions of (seed, step).

* `batch_indices(step, ...)`: the example indices of a training step, epochs of seeded
  permutations, so `--resume` is exact without saving a data loader's state;
* `seed_stream(seed, step, stream)`: the seed of the generator one `Stream` of a step's draws comes
  from, so every draw is a function of (seed, step): `--resume` continues exactly, with any number
  of processes;
* `shard(x, rank, size)`: one process's share of a global batch (every process draws for the whole
  batch and keeps its own slice).
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Stream(IntEnum):
    """The random streams of a training step; each draws from its own generator."""

    MASK = 0  # inpainting masks (CPU)
    NOISE = 1  # the draws made on the device: t, eps, flips, the autoencoder's posterior noise
    DROP = 2  # condition dropout for guidance (CPU)
    POSTERIOR = 3  # the LDM's fresh posterior sample z ~ q(z|x) from the latent cache


def seed_stream(seed: int, step: int, stream: Stream) -> int:
    """The seed of the generator for stream `stream` of a step's draws, a function of (seed, step)
    alone. Streams 2**40 apart never meet (for seed < 2**20 and step < 2**30)."""
    return 2**40 * int(stream) + seed * 1_000_003 + step


def batch_indices(step: int, *, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example indices of training step `step` (0-based): epochs of seeded permutations.

    A pure function of (step, n, batch_size, seed): resuming at any step reproduces the data order.
    Batches are consecutive slices of the epoch-long stream; a batch may straddle two epochs.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n - offset, start + batch_size - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)


def shard(x, rank: int, size: int):
    """This process's share of a global batch: every `size`-th item from `rank` (tensors or lists);
    `x` itself when size == 1."""
    return x[rank::size] if size > 1 else x
