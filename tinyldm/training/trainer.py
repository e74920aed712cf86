"""One training loop for both stages.

A script writes its own training step, `train_step(step) -> {name: value}`: it draws the step's
batch, computes the loss, calls backward and its optimizers, and returns the terms to log (0-dim
tensors, left on the device). That is the part a reader came for. `Trainer.run` does what every run
needs around it:

* the learning rate of every step (`lr_at`), set on each optimizer before the step;
* the EMA of the weights after it (rank 0 only: it alone samples and saves);
* log.jsonl every `log_every` steps: each term's mean over the window and over the processes (an
  all-reduce on log and checkpoint steps only), the learning rate and images per second; a term that
  is not finite, or (with `diverge`) a loss above its first window and `diverge` times its best,
  stops the run before a checkpoint can store it;
* Ctrl-C / SIGTERM: finish the step, checkpoint, exit with 128 + the signal; the time budget
  `max_minutes`: checkpoint and return early. Under torchrun the processes agree on both on log
  steps.

What is optional is a callback, an object with any of these methods, each given the trainer:
`on_step_end` (rank 0, after every step but the last), `on_checkpoint` (rank 0, when one is due:
every `ckpt_every` steps, and at a stop) and `on_signal` (every process, before it exits). Three
are defined here: `Checkpoints`, `Grids` (the sample grid every `sample_every` steps, loss.png
redrawn beside it) and `QualityPoints` (a point of the quality-against-steps curve). After the loop
the script draws its last grid and writes its last checkpoint itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..cli import UsageError
from ..evaluation.viz import save_loss_curve
from .distributed import World, replica_spread
from .distributed import teardown as teardown_distributed
from .loop import EMA, GracefulStop, JSONLLogger, resume_command

LR_SCHEDULES = ("constant", "cosine")  # what `lr_at` does after the warm-up


@dataclass
class TrainingConfig:
    """The fields every stage's config has (each script's config extends this one)."""

    batch_size: int = 64  # the global batch: under torchrun each process takes its share
    steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr
    lr_schedule: str = "constant"  # after the warm-up: "constant", or "cosine" to lr_min_ratio * lr
    lr_min_ratio: float = 0.0
    ema_decay: float = 0.0  # 0: no EMA of the weights
    amp: bool = False  # bf16 autocast (CUDA only)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000  # the sample (or reconstruction) grid
    ckpt_every: int = 500
    max_minutes: float = 0.0  # > 0: stop after this much training-loop time, checkpointed
    tensorboard: bool = False  # also log to <out>/tensorboard (pip install 'tinyldm[tensorboard]')
    check_replicas: bool = False  # under torchrun: log the processes' largest weight difference
    # > 0: the run's length in passes over the training images, `steps` the most and `min_steps`
    # the least it may be (`fit_steps`); an explicit --steps wins
    epochs: float = 0.0
    min_steps: int = 0


def lr_at(step: int, config: TrainingConfig, base_lr: float | None = None) -> float:
    """The learning rate of `step` (0-based) for an optimizer whose rate is `base_lr` (default
    `config.lr`): linear warm-up over `warmup_steps`, then constant, or a cosine decay to
    `lr_min_ratio * base_lr` at `steps`."""
    lr = config.lr if base_lr is None else base_lr
    if step < config.warmup_steps:
        return lr * min(1.0, (step + 1) / config.warmup_steps)
    if config.lr_schedule == "constant":
        return lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    r = config.lr_min_ratio
    return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def fit_steps(config: TrainingConfig, images: int, *, explicit: bool) -> TrainingConfig:
    """`config` with its steps set from `epochs` passes over `images` training images:
    ceil(epochs * images / batch_size), at most `steps` (what the preset gives the whole data set)
    and at least `min_steps`. Unchanged without `epochs`, or when --steps was given (`explicit`).
    Prints what it chose and why."""
    if config.epochs <= 0 or explicit or images <= 0:
        return config
    by_epochs = math.ceil(config.epochs * images / config.batch_size)
    steps = max(min(config.steps, by_epochs), min(config.min_steps, config.steps))
    why = ("its share of the preset's epochs" if steps == by_epochs else
           f"the most, the preset's steps ({config.steps:,})" if steps == config.steps else
           f"the least a run gets, --min_steps {config.min_steps:,}")
    print(f"steps: {steps:,} ({config.epochs:g} epochs over {images:,} images at batch "
          f"{config.batch_size} is {by_epochs:,}; {why}). Give --steps to choose")
    return dataclasses.replace(config, steps=steps)


class LogWindow:
    """Each logged term's sum and count since the last record, the images seen, the time taken."""

    def __init__(self, first_step: int):
        self.sums: dict[str, list] = {}  # name -> [sum, count]; on the device until a log step
        self.first_step, self.images, self.start = first_step, 0, time.perf_counter()

    def add(self, logs: dict, images: int) -> None:
        self.images += images
        for k, v in logs.items():
            acc = self.sums.setdefault(k, [0.0, 0])
            acc[0], acc[1] = acc[0] + (v.detach().double() if torch.is_tensor(v) else v), acc[1] + 1

    def means(self, world: World) -> dict[str, float]:
        """Each term's mean over the window and the processes: an all-reduce and a device sync."""
        return {k: world.mean(torch.as_tensor(total / n)) for k, (total, n) in self.sums.items()}

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


class Trainer:
    """Runs a script's `train_step` from `start` to `config.steps` (see the module docstring).
    `optimizers` maps each optimizer to its base learning rate. Settable after construction:
    `loss_key` (the logged term loss.png shows), `diverge` and `reference` (a reference run's curves
    drawn behind loss.png, `tinyldm.evaluation.curves`)."""

    def __init__(self, config: TrainingConfig, model: torch.nn.Module, ema: EMA | None,
                 optimizers: dict, out: Path):
        self.config, self.model, self.ema, self.optimizers = config, model, ema, optimizers
        self.out, self.world = Path(out), World.current()
        self.device = next(model.parameters()).device
        self.loss_key, self.diverge, self.reference = "loss", 0.0, None
        self.callbacks: list = []
        self.start = self.step = 0
        self.seconds, self.log = 0.0, None
        self.first_loss, self.best_loss, self.stopped_by = None, math.inf, None

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def trigger(self, event: str) -> None:
        for callback in self.callbacks:
            if hasattr(callback, event):
                getattr(callback, event)(self)

    def autocast(self):
        """bf16 autocast on CUDA with --amp; nothing elsewhere (CPU training stays in fp32)."""
        on = self.config.amp and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    def distribute(self, model: torch.nn.Module, *, find_unused: bool = False) -> torch.nn.Module:
        """`model`, or under torchrun `model` in DistributedDataParallel, which averages the
        processes' gradients during backward (one step equals one step on the global batch)."""
        if not self.world.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def run(self, train_step: Callable[[int], dict], *, start: int) -> int:
        """Steps start..steps-1; returns the number of steps done (fewer when the time budget ran
        out). A signal ends the process here, after a checkpoint."""
        config, world = self.config, self.world
        self._open_log(start)
        self.start = self.step = start
        window, saved = LogWindow(start), start
        if start >= config.steps:
            print(f"already trained for {config.steps} steps; nothing to do (raise --steps)")
        quiet = {} if world.is_main else {"disable": True}  # rank 0: TQDM_DISABLE=1 still works
        bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
                   desc=Path(sys.argv[0]).stem, mininterval=2.0, **quiet)  # the script's name
        with GracefulStop() as stop, bar:
            for step in bar:
                for opt, base_lr in self.optimizers.items():
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, config, base_lr)
                logs = train_step(step)
                if self.ema is not None and world.is_main:
                    self.ema.update(self.model)
                window.add(logs, config.batch_size)
                self.step = done = step + 1
                log_step = done % config.log_every == 0 or done == config.steps
                if log_step:  # stops on a term that is not finite
                    window = self._write_log(window, bar)
                if done == config.steps:
                    break  # the script draws the last grid and writes the last checkpoint
                if world.is_main:
                    self.trigger("on_step_end")  # grids, quality points
                if done % config.ckpt_every == 0:
                    self._check(window.means(world), window.first_step)
                    saved = self._checkpoint()
                # Under torchrun the processes agree on stopping (an all-reduce) on log steps only.
                reason = self._stop_reason(stop) if log_step or not world.enabled else None
                if reason is not None and saved != done:
                    saved = self._checkpoint()
                if reason == "signal":
                    self._exit(stop)
                if reason == "time":
                    print(f"\nthe time budget of {config.max_minutes} min of training is spent "
                          f"after {done} steps; stopping")
                    break
        self.seconds = time.perf_counter() - self.t_loop
        return self.step

    def plot(self) -> None:
        """loss.png: the loss so far and the quality curve, over a reference run's when given."""
        save_loss_curve(self.log.path, self.out / "loss.png", key=self.loss_key,
                        reference=self.reference)

    def close(self) -> None:
        """After the loop: the processes meet, and all but rank 0 leave the process group."""
        self.world.barrier()
        if self.log is not None:
            self.log.close()
        if not self.world.is_main:
            teardown_distributed(self.world)

    def _open_log(self, start: int) -> None:
        """log.jsonl (rank 0): a new one, or after a --resume the old one up to `start`."""
        self.t_loop, self.minutes_before = time.perf_counter(), 0.0
        if not self.world.is_main:
            return
        tensorboard = self.out / "tensorboard" if self.config.tensorboard else None
        self.log = JSONLLogger(self.out / "log.jsonl", resume_step=start or None,
                               tensorboard=tensorboard)
        if start and self.log.path.exists():
            kept = [json.loads(line) for line in self.log.path.read_text().splitlines() if line]
            self.minutes_before = max((r["minutes"] for r in kept if "minutes" in r), default=0.0)

    def _checkpoint(self) -> int:
        if self.world.is_main:
            self.trigger("on_checkpoint")
        return self.step

    def _exit(self, stop: GracefulStop) -> None:
        """After a signal: the processes meet, leave the group, say how to resume and exit."""
        self.world.barrier()
        teardown_distributed(self.world)
        self.stopped_by = stop.signal
        self.trigger("on_signal")
        raise SystemExit(128 + int(stop.signal))

    def _stop_reason(self, stop: GracefulStop) -> str | None:
        """"signal" (Ctrl-C or SIGTERM), "time" (--max_minutes spent) or None, the same in every
        process: true in all if in one."""
        if self.world.any(stop.requested, self.device):
            return "signal"
        minutes = (time.perf_counter() - self.t_loop) / 60
        spent = bool(self.config.max_minutes) and minutes > self.config.max_minutes
        return "time" if self.world.any(spent, self.device) else None

    def _check(self, means: dict[str, float], first: int) -> None:
        """Stop (one line) on a term that is not finite, or a loss that diverged, before any
        checkpoint of these weights: the last one written stays a good one."""
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        steps = f"steps {first + 1}-{self.step}"
        keep = "stopping. The last checkpoint written is kept; nothing was overwritten"
        if bad:
            terms = ", ".join(f"{k} is {v}" for k, v in bad.items())
            amp = (" under bf16 autocast: an overflow there is one cause (--amp false to check)"
                   if self.config.amp and self.device.type == "cuda" else "")
            raise UsageError(f"{terms} in {steps}{amp}: {keep} (lower --lr, or check the data "
                             "and the latents' scale).")
        loss = means.get(self.loss_key)
        if (self.diverge and loss is not None and self.first_loss is not None
                and 0 < self.best_loss and loss > max(self.first_loss,
                                                      self.diverge * self.best_loss)):
            raise UsageError(f"{self.loss_key} diverged: {loss:.4g} in {steps}, above its first "
                             f"logged value ({self.first_loss:.4g}) and "
                             f"{loss / self.best_loss:.0f}x its best ({self.best_loss:.4g}): "
                             f"{keep} (lower --lr, or raise --warmup_steps).")

    def _write_log(self, window: LogWindow, bar: tqdm) -> LogWindow:
        """One record of log.jsonl for the window ending at this step; returns the next window."""
        means = window.means(self.world)
        self._check(means, window.first_step)
        if self.loss_key in means:  # what a later window is compared with
            self.first_loss = means[self.loss_key] if self.first_loss is None else self.first_loss
            self.best_loss = min(self.best_loss, means[self.loss_key])
        if self.config.check_replicas:
            means["replica_spread"] = max(replica_spread(group["params"], self.world)
                                          for opt in self.optimizers for group in opt.param_groups)
        lr, images_per_s = next(iter(self.optimizers)).param_groups[0]["lr"], window.images_per_s()
        if self.log is not None:
            self.log.log(step=self.step, **means, lr=lr, img_per_s=images_per_s)
        bar.set_postfix(loss=f"{means[self.loss_key]:.4f}", img_s=f"{images_per_s:.0f}")
        return LogWindow(self.step)


# ----------------------------------------------------------------------------------------------
# The callbacks


class Checkpoints:
    """`save(step)` when a checkpoint is due; after a signal, the line that says how to resume
    (`script` run again with `argv` and --resume)."""

    def __init__(self, path: Path, save: Callable[[int], None], script: str, argv: list[str]):
        self.path, self.save, self.script, self.argv = path, save, script, argv

    def on_checkpoint(self, trainer: Trainer) -> None:
        self.save(trainer.step)

    def on_signal(self, trainer: Trainer) -> None:
        print(f"stopped by {signal.Signals(trainer.stopped_by).name} after step {trainer.step} of "
              f"{trainer.config.steps}; checkpoint {self.path}. Continue with: "
              f"{resume_command(self.script, self.argv)}", file=sys.stderr, flush=True)


class Grids:
    """The grid of `draw(step)` every `every` steps, shown in TensorBoard; loss.png redrawn."""

    def __init__(self, draw: Callable[[int], Path], every: int):
        self.draw, self.every = draw, every

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0:
            self.now(trainer)

    def now(self, trainer: Trainer) -> Path:
        path = self.draw(trainer.step)
        trainer.plot()
        trainer.log.image("grid", path, trainer.step)
        return path


class QualityPoints:
    """A point of the quality curve every `every` steps: `measure(step)` (a dict with `quality`,
    `quality_name`, `quality_better`, or None where the data allow none) as a log.jsonl record with
    the minutes of training so far; loss.png redrawn."""

    def __init__(self, measure: Callable[[int], dict | None], every: int):
        self.measure, self.every = measure, every

    def on_step_end(self, trainer: Trainer) -> None:
        if self.every and trainer.step % self.every == 0:
            self.now(trainer)

    def now(self, trainer: Trainer) -> None:
        # minutes of training so far, grids and points included; after a --resume counted on
        minutes = trainer.minutes_before + (time.perf_counter() - trainer.t_loop) / 60
        point = self.measure(trainer.step)
        if point is None or trainer.log is None:
            return
        trainer.log.log(step=trainer.step, minutes=round(minutes, 3), **point)
        print(f"\nquality at step {trainer.step}: {point['quality_name']} {point['quality']:.4g} "
              f"({point['quality_better']} is better)")
        trainer.plot()
