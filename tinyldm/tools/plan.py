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
Each script's `main` hands `--plan` to `plan_train_ae` / `plan_train_ldm` in its first lines; they
build the run with the script's own pieces (its configs, `stage_one` / `stage_two`, `train_step`
and checkpoint writer), so what is timed is what the run does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import torch

from ..autoencoder import Autoencoder, AutoencoderConfig
from ..checkpoint import load_checkpoint, save_checkpoint
from ..cli import UsageError
from ..data.image_batches import first_images, make_loader
from ..data.images import make_dataset
from ..data.latent_batches import LatentTrainingSet
from ..data.tasks import TaskSpec, data_configs, has_task_score
from ..evaluation.ae_score import save_reconstructions
from ..evaluation.ldm_score import SampleGrid, save_samples
from ..memory import available_bytes, check_ae_training, check_ldm_training, describe
from ..training.configs import resolve_ae_configs, resolve_ldm_configs
from ..training.distributed import join
from ..training.first_stage import run_script, train_ae_flags
from ..training.health import (
    describe_latents,
    memorising,
)
from ..training.loop import seed_everything
from ..training.presets import AE_PRESETS, AE_SMOKE, LDM_PRESETS, LDM_SMOKE
from ..training.trainer import Trainer, fit_steps

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


def plan_folder() -> Path:
    """A temporary folder for a plan's test writes (its steps' logs, one checkpoint, one grid),
    removed when the process ends: --out is never touched."""
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="tinyldm-plan-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------
# train_ldm.py --plan


def plan_first_stage(cmd: list[str], path: Path, script_dir: Path) -> Path:
    """--plan without --ae: train_ae.py --plan prints the first stage's plan (and writes it beside
    `path`, in the plan's temporary folder); an untrained autoencoder of the same shape is saved at
    `path`, for the latents that the LDM's steps are timed on."""
    json_path = path.with_name("plan.json")
    print(f"the first stage: python train_ae.py {' '.join(cmd)} --plan", flush=True)
    status = run_script(script_dir / "train_ae.py", [*cmd, "--plan", str(json_path)])
    if status:
        raise UsageError(f"train_ae.py --plan ended with exit status {status} (its message is "
                         "above)")
    ae_config = json.loads(json_path.read_text())["ae_config"]
    ae = Autoencoder(AutoencoderConfig(**{**ae_config, "channel_mult": tuple(
        ae_config["channel_mult"])}))
    save_checkpoint(path, {"autoencoder": ae.to_dict(), "step": 0, "train_config": {"steps": 0},
                           "plan": True}, kind="autoencoder")
    return path


def plan_latents(ae, ae_path: Path, config, data_root: str | None, out: Path,
                 device: torch.device) -> tuple[LatentTrainingSet, Stage]:
    """The latent cache of a few batches of the training set, timed: the full cache's time is
    that per image times the training images (twice with --hflip), its size likewise."""
    data, _ = data_configs(asdict(config), data_root)
    full = config.n_train if config.dataset == "shapes" else len(make_dataset(data, "train"))
    few = min(full, max(4 * config.batch_size, 64))
    start = time.perf_counter()
    subset = LatentTrainingSet.build(ae, ae_path, replace(config, n_train=few), data_root, out,
                                     device)
    seconds = (time.perf_counter() - start) / few * full
    size = (out / "latents.pt").stat().st_size / few * full
    return subset, Stage("latent cache", seconds * (2 if config.hflip else 1), images=full,
                         disk=int(size), how=f"encoded {few} of the {full} training images")


def feature_network(config, train_set, held_out, device: torch.device) -> tuple[float, str]:
    """The time the evaluation's feature network takes to train on `train_set` (timed over 4 and 12
    of its steps: the difference is its time a step, the rest its setup; counted for
    --feature_steps), and how."""
    from ..evaluation.features import train_classifier, train_contrastive
    from .evaluate import choose_features

    kind, _ = choose_features("auto", train_set)

    def feature_seconds(steps: int) -> float:
        if kind == "classifier":
            classes = len(getattr(train_set, "class_names", None) or []) or 2
            return train_classifier(train_set, held_out, classes, steps=steps,
                                    device=device)[1]["train_seconds"]
        return train_contrastive(train_set, held_out, steps=steps, device=device)[1][
            "train_seconds"]

    short, long = feature_seconds(4), feature_seconds(12)
    per_step = max(0.0, (long - short) / 8)
    seconds = short - 4 * per_step + config.feature_steps * per_step
    return seconds, (f"the {kind} feature network: {config.feature_steps} steps of "
                     f"{per_step * 1000:.0f} ms ({seconds:.0f} s)")


def evaluation_stage(config, held_out: int, per_sample: float,
                     features: tuple[float, str] | None) -> Stage:
    """The final measurement's time: its samples (one per held-out image, up to --eval_images, for
    other data than shapes; `held_out` images there are) at the grid's time per sample, and
    `features` (seconds, how): the feature network it trains first, unless the quality curve
    trained it before."""
    n = config.eval_images if config.dataset == "shapes" else min(config.eval_images, held_out)
    seconds, how = features or (0.0, "")
    return Stage(f"evaluation ({n} samples)", n * per_sample + seconds, images=n,
                 how=f"{config.eval_steps} DDIM steps, {per_sample:.2f} s a sample (the grid's)"
                     + (f"; {how}" if how else ""))




def refuse_resume(args) -> Path:
    """A plan is of a new run; its test writes go to a temporary folder, returned."""
    if args.resume:
        raise UsageError("--plan plans a new run: drop --resume (a resumed run does what is left "
                         "of its --steps, at the speed its log.jsonl shows)")
    return plan_folder()


def plan_train_ldm(args, script) -> dict:
    """train_ldm.py --plan: the run built as `main` builds it (`script` is train_ldm.py, whose
    config, `stage_two`, `train_step` and `save_ldm` are used), on latents of a few batches, with
    the first stage's plan from train_ae.py --plan when no --ae is given; then each stage timed
    and printed."""
    out = refuse_resume(args)
    preset = {**LDM_PRESETS[args.preset], **(LDM_SMOKE if args.smoke else {})}
    config, unet_fields, diffusion = resolve_ldm_configs(args, None, script.TrainLDMConfig, preset)
    _, device = join(args.device, config.batch_size)
    ae_path = Path(args.ae) if args.ae else plan_first_stage(
        train_ae_flags(args, config, out), out / "ae" / "autoencoder.pt",
        Path(script.__file__).resolve().parent)
    ae_ckpt = load_checkpoint(ae_path, kind="autoencoder")
    ae = Autoencoder.from_checkpoint(ae_ckpt).to(device).requires_grad_(False)
    data, cache = plan_latents(ae, ae_path, config, args.data, out, device)
    config = fit_steps(config, cache.images, explicit="steps" in vars(args))
    describe_latents(data, ae, ae_ckpt, ae_path, config)
    state = script.stage_two(config, unet_fields, diffusion, data, None, device)
    trainer = Trainer(config, state.denoiser, state.ema, {state.opt: config.lr}, out)
    state.step_model = trainer.distribute(state.denoiser, find_unused=True)
    grid = SampleGrid.for_run(config, data.class_names, args.data, tuple(data.latents.shape[-2:]),
                              device, ae, state.denoiser.cond.cfg.max_len)

    def step(k: int) -> None:  # what Trainer.run does each step
        script.train_step(k, state=state, trainer=trainer)
        state.ema.update(state.denoiser)

    t_step = seconds_per_call(step, device)
    ckpt_path = out / "ldm.pt"
    t_ckpt = seconds_once(lambda: script.save_ldm(ckpt_path, 0, state=state, ae_path=ae_path),
                          device)
    # one row, the EMA's: a young EMA's grids draw a second row, counted in `ldm_stages`
    t_grid = seconds_once(lambda: save_samples(out, 0, state, grid, raw=False), device)
    memory = check_ldm_training(state.denoiser, data, config.batch_size, device)
    memory += cache.disk * max(0.0, 1 - len(data.latents) / max(cache.images, 1))
    timed = {"step": t_step, "checkpoint": t_ckpt, "grid": t_grid, "grid_images": grid.n,
             "memory": memory}
    return ldm_stages(state, cache, timed, ckpt_path, args.data, args.plan)


def ldm_stages(state, cache: Stage, timed: dict, ckpt_path: Path, data_root: str | None,
               json_path: str | None) -> dict:
    """The plan's rows after the first stage: the latent cache, the LDM (its steps, grids,
    checkpoints and quality points) and the final evaluation, from the `timed` seconds of one step,
    one checkpoint and one grid of `grid_images` samples, and the memory estimate."""
    config, ema, denoiser = state.config, state.ema, state.denoiser
    device = state.data.latents.device
    t_step, t_ckpt, t_grid, memory = (timed[k] for k in ("step", "checkpoint", "grid", "memory"))
    grid_images = timed["grid_images"]
    per_sample = t_grid / grid_images
    grids, ckpts, extra = grids_and_checkpoints(config.steps, 0, config.sample_every,
                                                config.ckpt_every, t_grid, t_ckpt)
    young = sum(k < 1 / (1 - ema.decay) for k in range(1, config.steps + 1)
                if k % config.sample_every == 0 or k == config.steps)
    extra += young * t_grid
    # the quality curve's points: its held-out items' samples at the grid's time per sample; where
    # it is a feature distance, the first point trains the evaluation's feature network
    points = sum(k % config.curve_every == 0 or k == config.steps
                 for k in range(1, config.steps + 1)) if config.curve_every else 0
    data_cfg, shapes = data_configs(asdict(config), data_root)
    held_out = make_dataset(data_cfg, "eval", shapes=shapes)
    items = min(config.curve_images, len(held_out))
    t_point = items * per_sample
    extra += points * t_point
    scored = has_task_score(TaskSpec.from_config(asdict(config)), config.dataset)
    needs_features = not scored and (points or config.eval_images > 0 and
                                      config.dataset != "shapes")
    features = (feature_network(config, make_dataset(data_cfg, "train", shapes=shapes), held_out,
                                device) if needs_features else None)
    curve_trains = bool(points) and features is not None
    extra += features[0] if curve_trains else 0.0
    size = ckpt_path.stat().st_size
    first = ckpt_path.parent / "ae" / "plan.json"
    stages = ([Stage(**{k: v for k, v in s.items() if k != "epochs"})
               for s in json.loads(first.read_text())["stages"]] if first.exists() else [])
    stages += [cache, Stage(
        f"LDM ({sum(p.numel() for p in denoiser.parameters()) / 1e6:.1f} M parameters)",
        config.steps * t_step + extra, config.steps, config.batch_size, cache.images,
        memory=memory, disk=size,
        how=f"{t_step * 1000:.0f} ms a step; {grids} grid(s) of {grid_images} samples "
            f"({t_grid:.1f} s each{f', {young} with the raw weights too' if young else ''}), "
            f"{ckpts} checkpoint(s) of {size / 1e6:.1f} MB"
            + (f"; {points} quality point(s) of {items} samples ({t_point:.1f} s each)"
               if points else "") + (f"; at the first, {features[1]}" if curve_trains else ""),
        notes=memorising(cache.images, config.steps, config.batch_size))]
    if config.eval_images > 0:
        stages.append(evaluation_stage(config, len(held_out), per_sample,
                                       None if curve_trains else features))
    return report(stages, device, json_path=json_path)


# ----------------------------------------------------------------------------------------------
# train_ae.py --plan


def plan_train_ae(args, script) -> dict:
    """train_ae.py --plan: the run built as `main` builds it (`script` is train_ae.py, whose
    configs, `train_step` and `save_ae` are used); its steps timed before and after the
    discriminator joins, one grid and one checkpoint (written to a temporary folder), and the final
    held-out measurement extrapolated from one batch."""
    out = refuse_resume(args)
    ckpt_path = out / "autoencoder.pt"
    preset = {**AE_PRESETS[args.preset], **(AE_SMOKE if args.smoke else {})}
    ae_config, loss_config, config, _ = resolve_ae_configs(args, ckpt_path, script.CONFIGS, preset)
    world, device = join(args.device, config.batch_size)
    if ae_config.regularizer == "identity":
        return report([Stage("autoencoder (identity, f=1)", 0.0, how="nothing to train")], device,
                      json_path=args.plan, ae_config=asdict(ae_config))
    seed_everything(config.seed)
    state, configs, (train_set, held_out) = script.stage_one(
        args, (ae_config, loss_config, config), None, device)
    config = configs[2]
    optimizers = {state.opt_ae: config.lr, state.opt_disc: config.disc_lr or config.lr}
    trainer = Trainer(config, state.model, state.ema, optimizers, out)
    state.step_model = trainer.distribute(state.model)
    batches = iter(make_loader(train_set, config, state.start, (world.rank, world.size), device,
                               endless=True))  # a plan's timed steps may outnumber a short run's
    grid_x = next(first_images(held_out, 8, 8)).to(device)
    calls = {"step": lambda k: script.train_step(k, state=state, batches=batches, trainer=trainer),
             "checkpoint": lambda k: script.save_ae(ckpt_path, k, state=state, configs=configs),
             "grid": lambda k: save_reconstructions(state.eval_model, grid_x,
                                                    out / f"recon_{k:07d}.png")}
    return ae_stages(state, config, (train_set, held_out), calls, ckpt_path, args.plan)


def ae_stages(state, config, datasets: tuple, calls: dict, ckpt_path: Path,
              json_path: str | None) -> dict:
    """The autoencoder's rows, from `calls` of one step, one checkpoint and one grid (each given the
    step): its steps (timed before and after the discriminator joins), grids and checkpoints, and
    the held-out score with the scale factor."""
    train_set, held_out = datasets
    device = next(state.model.parameters()).device
    step, save, grid = calls["step"], calls["checkpoint"], calls["grid"]
    start, steps, disc = state.start, config.steps, state.loss_fn.config.disc_start
    memory = check_ae_training(state, config.image_size, config.batch_size, device)
    state.model.train()

    def run(k: int) -> None:  # what Trainer.run does each step
        step(k)
        if state.ema is not None:
            state.ema.update(state.model)

    before = max(0, min(steps, disc) - start)  # steps without the discriminator, then with it
    after = steps - start - before
    t_before = seconds_per_call(run, device, first=start) if before else 0.0
    t_after = seconds_per_call(run, device, first=max(start, disc)) if after else 0.0
    t_ckpt = seconds_once(lambda: save(start), device)
    t_grid = seconds_once(lambda: grid(start), device)
    grids, ckpts, extra = grids_and_checkpoints(steps, start, config.sample_every,
                                                config.ckpt_every, t_grid, t_ckpt)
    x = next(first_images(train_set, config.batch_size, config.batch_size)).to(device)
    with torch.no_grad():
        t_image = seconds_per_call(lambda _: state.eval_model(x), device, warmup=1,
                                   timed=2) / len(x)
    scored = min(len(held_out), config.n_eval) + min(len(train_set), config.stats_images)
    how = ", then ".join(([f"{t_before * 1000:.0f} ms a step"] if before else [])
                         + ([f"{t_after * 1000:.0f} ms with the discriminator"] if after else []))
    size = ckpt_path.stat().st_size
    cfg = state.model.config
    stages = [
        Stage(f"autoencoder ({cfg.regularizer}, f={cfg.downsample_factor})",
              before * t_before + after * t_after + extra, after + before, config.batch_size,
              len(train_set), memory=memory, disk=size,
              how=f"{how}; {grids} grid(s), {ckpts} checkpoint(s) of {size / 1e6:.1f} MB",
              notes=memorising(len(train_set), steps - start, config.batch_size)),
        Stage("held-out score, scale factor", scored * t_image, images=scored,
              how=f"{t_image * 1000:.1f} ms an image (encoded and decoded)"),
    ]
    return report(stages, device, json_path=json_path, ae_config=asdict(cfg))
