"""Data parallelism under PyTorch's own launcher: `torchrun --nproc_per_node=N train_ldm.py ...`.

torchrun starts N processes and tells each its place through environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT); `join()` reads them and joins the process group.
Without torchrun WORLD_SIZE is unset and everything is a plain single process. The conventions the
scripts follow (docs/distributed.md): `--batch_size` is the global batch, a pure function of the
step, and each process trains on every world-th example of it; a step's random draws are made for
the whole global batch, identically in every process, and sliced the same way; rank 0 alone writes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..data.order import shard


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> World:
        """This process's place: from the process group `join` entered, or one process."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(rank=dist.get_rank(), size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_zero_first(self, fn):
        """fn() in rank 0 first, then in the other processes: what rank 0 writes into --out (the
        latent cache), the others then only read."""
        for turn in ("main", "others"):
            if self.is_main == (turn == "main"):
                result = fn()
            self.barrier()
        return result

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the processes (each holds the mean of an equal share of the
        batch)."""
        if self.enabled:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.size
        return float(value)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True in every process if it is True in one (e.g. a time budget spent: all stop at the
        same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def average(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the processes (a copy)."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.size

    def average_gradients(self, module: torch.nn.Module) -> None:
        """What DDP does after backward, written out: every gradient becomes the processes' mean."""
        if self.enabled:
            for p in module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.size

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Floating-point buffers (BatchNorm running statistics) become the processes' mean."""
        if self.enabled:
            for b in module.buffers():
                if b.is_floating_point():
                    dist.all_reduce(b)
                    b /= self.size

    def shard(self, x):
        """This process's share of a global batch: every `size`-th item from `rank` (tensors or
        lists)."""
        return shard(x, self.rank, self.size)


def join(device_name: str, batch_size: int) -> tuple[World, torch.device]:
    """Join the process group when torchrun started us (NCCL on GPUs, gloo on CPUs; one process
    otherwise); this process's device (under torchrun on GPUs its own, cuda:LOCAL_RANK). The global
    batch must split evenly over the processes."""
    from ..cli import UsageError
    from .loop import pick_device

    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World() if size == 1 else World(rank=int(os.environ["RANK"]), size=size,
                                            local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    cuda = (torch.cuda.is_available() and device_name in ("auto", "cuda")
            or device_name.startswith("cuda"))
    if world.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if world.enabled and cuda:
        torch.cuda.set_device(world.local_rank)
        device_name = f"cuda:{world.local_rank}"
    elif world.enabled and device_name == "auto":
        device_name = "cpu"
    if batch_size % world.size:
        raise UsageError(f"--batch_size {batch_size} (the global batch) must be divisible by the "
                         f"{world.size} processes")
    return world, pick_device(device_name)


def teardown(world: World) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(result: dict) -> None:
    """End a script's process after `main` returned `result`: a process other than rank 0 (it wrote
    nothing) leaves at once with `os._exit`, skipping the interpreter's finalisation, where a gloo
    process whose peer is still finishing can abort ("terminate called without an active
    exception")."""
    if isinstance(result, dict) and result.get("rank", 0) != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def replica_spread(params: list[torch.Tensor], world: World) -> float:
    """Largest difference between the processes' checksums of the weights `params` (0.0:
    identical replicas)."""
    if not world.enabled:
        return 0.0
    total = torch.stack([p.detach().double().square().sum() for p in params]).sum()
    first = params[0].detach().double().flatten()[:1000].sum()
    local = torch.stack([total, first]).to(params[0].device)
    gathered = [torch.zeros_like(local) for _ in range(world.size)]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)
    return float((stacked.max(0).values - stacked.min(0).values).max())
