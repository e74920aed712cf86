"""One training loop for both stages, the way minGPT keeps its trainer.py beside its projects.

A script writes its own training step, `train_step(step) -> {name: value}`: it draws the step's
batch, computes the loss, calls backward and its optimizers, and returns the terms to log (0-dim
tensors, left on the device). That is the part a reader came for. `Trainer.run` does everything
around it, once for both stages:

* the learning rate of every step (`lr_at`), set on each optimizer before the step;
* the EMA of the weights after it (rank 0 only: it alone samples and saves);
* bf16 autocast on CUDA (`trainer.autocast()`), and under torchrun the DDP wrapper
  (`trainer.distribute`);
* log.jsonl every `log_every` steps: each term's mean over the window and over the processes (an
  all-reduce on log and checkpoint steps only), the learning rate and images per second; a term that
  is not finite, or (with `diverge`) a loss above its first window and `diverge` times its best,
  stops the run before a checkpoint can store it;
* the sample grid every `sample_every` steps, with loss.png redrawn beside it;
* with a `curve` (the script's measurement of its weights on a fixed held-out set), a point of the
  quality-against-steps curve every `curve_every` steps: a log.jsonl record with the training
  minutes so far, and loss.png redrawn with it (and a reference run's curves, given `reference`);
* a checkpoint every `ckpt_every` steps, written by the script's `save(step)`;
* Ctrl-C / SIGTERM: finish the step, checkpoint, print the resume command and exit with 128 + the
  signal; the time budget `max_minutes`: checkpoint and return early. Under torchrun the processes
  agree on both on log steps.

After the loop the script draws its last grid and writes its last checkpoint (the autoencoder's
holds the latent scale factor, measured after training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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

    `optimizers` maps each optimizer to its base learning rate; `ema` (or None) averages `model`
    after each step; `replicas` are the modules whose copies in the processes `--check_replicas`
    compares; `script` and `argv` make the command that resumes a stopped run; `loss_key` names the
    logged term that loss.png shows, `reference` a reference run's curves it is drawn against
    (`tinyldm.evaluation.curves`)."""

    def __init__(self, config: TrainingConfig, *, script: str, argv: list[str], out: Path,
                 ckpt_path: Path, world: World, device: torch.device, optimizers: dict,
                 model: torch.nn.Module, ema: EMA | None = None,
                 replicas: tuple[torch.nn.Module, ...] = (), loss_key: str = "loss",
                 resumed_step: int | None = None, diverge: float = 0.0,
                 curve: Callable[[int], dict] | None = None, curve_every: int = 0,
                 reference: dict | None = None):
        self.config, self.script, self.argv = config, script, argv
        self.out, self.ckpt_path, self.world, self.device = out, ckpt_path, world, device
        self.optimizers, self.model, self.ema, self.replicas = optimizers, model, ema, replicas
        self.loss_key = loss_key
        # > 0: stop when a logged loss is above its first window and `diverge` x its best
        self.diverge, self.first_loss, self.best_loss = diverge, None, math.inf
        self.seconds = 0.0  # the last run's training-loop time
        self.curve, self.curve_every, self.reference = curve, curve_every, reference
        tensorboard = out / "tensorboard" if config.tensorboard else None
        self.log = JSONLLogger(out / "log.jsonl", resume_step=resumed_step,
                               tensorboard=tensorboard) if world.is_main else None
        self.minutes_before = 0.0  # after a --resume: the minutes of the last point before it
        if resumed_step is not None and self.log is not None:
            kept = [json.loads(line) for line in self.log.path.read_text().splitlines() if line]
            self.minutes_before = max((r["minutes"] for r in kept if "minutes" in r), default=0.0)

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

    def run(self, train_step: Callable[[int], dict], *, start: int, save: Callable[[int], None],
            sample: Callable[[int], Path] | None = None) -> int:
        """Steps start..steps-1; returns the number of steps done (fewer when the time budget ran
        out). A signal ends the process here, after a checkpoint."""
        config, world = self.config, self.world
        window, t_loop, done, saved = LogWindow(start), time.perf_counter(), start, start
        self.t_loop = t_loop
        if start >= config.steps:
            print(f"already trained for {config.steps} steps; nothing to do (raise --steps)")
        quiet = {} if world.is_main else {"disable": True}  # rank 0: TQDM_DISABLE=1 still works
        bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
                   desc=Path(self.script).stem, mininterval=2.0, **quiet)
        with GracefulStop() as stop, bar:
            for step in bar:
                for opt, base_lr in self.optimizers.items():
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, config, base_lr)
                logs = train_step(step)
                if self.ema is not None and world.is_main:
                    self.ema.update(self.model)
                window.add(logs, config.batch_size)
                done = step + 1
                log_step = done % config.log_every == 0 or done == config.steps
                if log_step:  # stops on a term that is not finite
                    window = self._write_log(window, done, bar)
                if done == config.steps:
                    break  # the script draws the last grid and writes the last checkpoint
                if done % config.sample_every == 0 and world.is_main and sample is not None:
                    self.sample_grid(sample, done)
                if self.curve_every and done % self.curve_every == 0 and world.is_main:
                    self.curve_point(done)
                if done % config.ckpt_every == 0:
                    self._check_finite(window.means(world), window.first_step, done)
                    saved = self._save(save, done)
                # Under torchrun the processes agree on stopping (an all-reduce) on log steps only.
                reason = self._stop_reason(stop, t_loop) if log_step or not world.enabled else None
                if reason is not None:
                    saved = saved if saved == done else self._save(save, done)
                if reason == "signal":
                    world.barrier()
                    teardown_distributed(world)
                    stop.exit(done, config.steps, self.ckpt_path,
                              resume_command(self.script, self.argv))
                if reason == "time":
                    print(f"\nthe time budget of {config.max_minutes} min of training is spent "
                          f"after {done} steps; stopping")
                    break
        self.seconds = time.perf_counter() - t_loop
        return done

    def _stop_reason(self, stop: GracefulStop, t_loop: float) -> str | None:
        """"signal" (Ctrl-C or SIGTERM), "time" (--max_minutes spent) or None, the same in every
        process: true in all if in one."""
        if self.world.any(stop.requested, self.device):
            return "signal"
        minutes = (time.perf_counter() - t_loop) / 60
        spent = bool(self.config.max_minutes) and minutes > self.config.max_minutes
        return "time" if self.world.any(spent, self.device) else None

    def _check_finite(self, means: dict[str, float], first: int, done: int) -> None:
        """Stop (one line) on a term that is not finite, or a loss that diverged, before any
        checkpoint of these weights: the last one written stays a good one."""
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        keep = (f"stopping. The last good checkpoint is {self.ckpt_path}; nothing was "
                "overwritten")
        if bad:
            terms = ", ".join(f"{k} is {v}" for k, v in bad.items())
            amp = (" under bf16 autocast: an overflow there is one cause (--amp false to check)"
                   if self.config.amp and self.device.type == "cuda" else "")
            raise UsageError(f"{terms} in steps {first + 1}-{done}{amp}: {keep} (lower --lr, or "
                             "check the data and the latents' scale).")
        loss = means.get(self.loss_key)
        if (self.diverge and loss is not None and self.first_loss is not None
                and 0 < self.best_loss and loss > max(self.first_loss,
                                                      self.diverge * self.best_loss)):
            raise UsageError(f"{self.loss_key} diverged: {loss:.4g} in steps {first + 1}-{done}, "
                             f"above its first logged value ({self.first_loss:.4g}) and "
                             f"{loss / self.best_loss:.0f}x its best ({self.best_loss:.4g}): "
                             f"{keep} (lower --lr, or raise --warmup_steps).")

    def _write_log(self, window: LogWindow, done: int, bar: tqdm) -> LogWindow:
        """One record of log.jsonl for the window ending at step `done`; returns the next window."""
        means = window.means(self.world)
        self._check_finite(means, window.first_step, done)
        if self.loss_key in means:  # what a later window is compared with
            self.first_loss = means[self.loss_key] if self.first_loss is None else self.first_loss
            self.best_loss = min(self.best_loss, means[self.loss_key])
        if self.config.check_replicas:
            means["replica_spread"] = max(replica_spread(m, self.world) for m in self.replicas)
        lr, images_per_s = next(iter(self.optimizers)).param_groups[0]["lr"], window.images_per_s()
        if self.log is not None:
            self.log.log(step=done, **means, lr=lr, img_per_s=images_per_s)
        bar.set_postfix(loss=f"{means[self.loss_key]:.4f}", img_s=f"{images_per_s:.0f}")
        return LogWindow(done)

    def sample_grid(self, sample: Callable[[int], Path], done: int) -> Path:
        """The grid of step `done` (`sample` writes it), shown in TensorBoard; loss.png redrawn."""
        path = sample(done)
        self.draw_curves()
        self.log.image("grid", path, done)
        return path

    def curve_point(self, done: int) -> None:
        """One point of the quality curve (rank 0, with a `curve`): its record in log.jsonl, with
        the minutes of training so far (the loop's wall time, its grids and points included; after
        a --resume counted on from the last point before it), and loss.png redrawn."""
        if self.curve is None or self.log is None:
            return
        minutes = self.minutes_before + (time.perf_counter() - self.t_loop) / 60
        point = self.curve(done)
        if point is None:  # the data allow no measurement (said once)
            return
        self.log.log(step=done, minutes=round(minutes, 3), **point)
        print(f"\nquality at step {done}: {point['quality_name']} {point['quality']:.4g} "
              f"({point['quality_better']} is better)")
        self.draw_curves()

    def draw_curves(self) -> None:
        """loss.png: the loss so far and the quality curve, over a reference run's when given."""
        save_loss_curve(self.log.path, self.out / "loss.png", key=self.loss_key,
                        reference=self.reference)

    def _save(self, save: Callable[[int], None], done: int) -> int:
        if self.world.is_main:
            save(done)
        return done

    def close(self) -> None:
        """After the loop: the processes meet, and all but rank 0 leave the process group."""
        self.world.barrier()
        if self.log is not None:
            self.log.close()
        if not self.world.is_main:
            teardown_distributed(self.world)
