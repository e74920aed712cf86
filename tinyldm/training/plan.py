"""`--plan`: what a run will do, printed before it starts, and nothing written.

Each stage (the autoencoder, the latent cache, the LDM, the final evaluation) with its steps and
what they are in passes over this data (epochs), the memory it needs against the device's free
memory, what it writes to disk, and its time, measured on this device: a few real steps of the
run's own training step on its own data, after a warm-up that is not counted, times the number of
steps, plus the grids and checkpoints along the way and the measurement at the end.
`train_ldm.py --plan` without `--ae` asks `train_ae.py --plan` for the first stage, and times its
own steps on latents from an untrained autoencoder of the same shape (the time of a step does not
depend on the weights).

What is not measured is said: a stage whose time is extrapolated from a smaller one names it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import torch

from .memory import available_bytes, describe

WARMUP, TIMED = 3, 8  # steps run before the clock starts, and steps timed (their median counts)


@dataclass
class Stage:
    name: str
    seconds: float
    steps: int = 0  # training steps (0: a stage that does not train)
    batch: int = 0
    images: int = 0  # the images the stage goes over
    memory: float | None = None  # bytes it needs at its peak (an estimate)
    disk: int = 0  # bytes it writes
    how: str = ""  # how the time was found
    notes: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> float | None:
        return self.steps * self.batch / self.images if self.steps and self.images else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[int], object], device: torch.device, *, first: int = 0,
                     warmup: int = WARMUP, timed: int = TIMED) -> float:
    """fn(first), fn(first + 1), ...: `warmup` calls not counted, then the median time of `timed`
    (a median: one call slowed by something else on the machine does not move it)."""
    for i in range(warmup):
        fn(first + i)
    times = []
    for i in range(timed):
        sync(device)
        start = time.perf_counter()
        fn(first + warmup + i)
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def seconds_once(fn: Callable[[], object], device: torch.device) -> float:
    """The time of one call of fn() (a checkpoint written, a grid drawn), the device synced."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def report(stages: list[Stage], device: torch.device, *, json_path: str | None = None,
           **extra) -> dict:
    """Print the plan (one row per stage, then the total and the finish time); with `json_path`,
    also write it there, with `extra`. Returns it as a dict."""
    free = available_bytes(device)
    total = sum(s.seconds for s in stages)
    finish = datetime.now() + timedelta(seconds=total)
    print(f"\nplan, device {device} ({describe(free) + ' free' if free else 'free memory unknown'})"
          f"; times: the median of {TIMED} real steps on this device, after {WARMUP} of warm-up:")
    print(f"  {'stage':<28}{'steps':>8}{'batch':>7}{'images':>8}{'epochs':>9}{'memory':>10}"
          f"{'disk':>10}{'time':>15}")
    for s in stages:
        epochs = f"{s.epochs:.1f}" if s.epochs is not None else "-"
        print(f"  {s.name:<28}{s.steps or '-':>8}{s.batch or '-':>7}{s.images or '-':>8}"
              f"{epochs:>9}{describe(s.memory) if s.memory else '-':>10}"
              f"{describe(s.disk) if s.disk else '-':>10}{duration(s.seconds):>15}")
        for line in ([s.how] if s.how else []) + s.notes:
            print(f"      {line}")
    print(f"  total {duration(total)}: finishes at about {finish:%H:%M} on {finish:%Y-%m-%d}")
    needy = [s for s in stages if s.memory and free and s.memory > 0.9 * free]
    for s in needy:
        print(f"warning: {s.name} needs about {describe(s.memory)}, more than 90% of the "
              f"{describe(free)} free on {device}: it will be refused when it starts")
    plan = {"device": str(device), "free_memory": free, "total_seconds": total,
            "finish": finish.isoformat(timespec="minutes"),
            "stages": [{**asdict(s), "epochs": s.epochs} for s in stages], **extra}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def grids_and_checkpoints(steps: int, start: int, every_grid: int, every_ckpt: int,
                          grid_seconds: float, ckpt_seconds: float) -> tuple[int, int, float]:
    """(grids, checkpoints, seconds) a loop from `start` to `steps` draws and writes on the way,
    the last grid and checkpoint included."""
    grids = max(0, (steps - 1) // every_grid - start // every_grid) + 1
    ckpts = max(0, (steps - 1) // every_ckpt - start // every_ckpt) + 1
    return grids, ckpts, grids * grid_seconds + ckpts * ckpt_seconds


def memorising(images: int, steps: int, batch: int) -> list[str]:
    """Notes on data too small for the run: fewer images than a batch; so many passes over few
    images that the model will reproduce them (a note, not a refusal)."""
    notes = []
    if images < batch:
        notes.append(f"warning: {images} training images, fewer than a batch of {batch}: "
                     "each batch repeats images")
    epochs = steps * batch / max(images, 1)
    if images < 1000 and epochs > 500:
        notes.append(f"note: {epochs:.0f} passes over {images} images: expect samples close to the "
                     "training images (memorised); more images, or fewer --steps")
    return notes


def plan_folder() -> Path:
    """A temporary folder for a plan's test writes (its steps' logs, one checkpoint, one grid),
    removed when the process ends: --out is never touched."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="tinyldm-plan-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
