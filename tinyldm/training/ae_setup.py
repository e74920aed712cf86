"""train_ae.py's setup, out of the reader's way: its configuration resolved and checked, the images
(a step's batch is a pure function of the step), the autoencoder with its discriminator and
optimizers (restored when resuming), the memory check before the first step, the objective in one
line, and the identity first stage (f = 1, nothing to train) for pixel-space diffusion.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..autoencoder import Autoencoder, AutoencoderConfig, latent_statistics
from ..autoencoder_loss import AELoss, AELossConfig
from ..cli import UsageError
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import World
from .flags import build_config, check_data_flags, check_resume_overrides, config_fields
from .loop import EMA, batch_indices, rng_state, set_rng_state
from .memory import check_training, profile, weights_bytes
from .trainer import fit_steps


class _Images(Dataset):
    """Keeps only the image of a dataset whose items are dicts with an "image" in [-1, 1]."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        return item["image"] if isinstance(item, dict) else item


def make_datasets(config, data_path: str | None) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets of (3, H, W) images in [-1, 1]."""
    if config.dataset == "shapes":
        from tinyldm.data.shapes import ShapesConfig, ShapesDataset

        shapes = ShapesConfig(image_size=config.image_size, n_train=config.n_train,
                              n_eval=config.n_eval)
        return _Images(ShapesDataset(shapes, "train")), _Images(ShapesDataset(shapes, "eval"))
    if data_path is None:
        raise UsageError(f"--dataset {config.dataset} needs --data PATH")
    from tinyldm.data.images import make_image_datasets

    train, held_out = make_image_datasets(config.dataset, data_path, image_size=config.image_size,
                                          n_eval=config.n_eval, hflip=config.hflip,
                                          max_images=config.n_train or None)
    return _Images(train), _Images(held_out)


class StepBatches:
    """A batch sampler whose k-th batch is `batch_indices(k)`: the order depends on the step alone.
    Under torchrun each process gets its share of that global batch (`world.shard`)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int,
                 world: World | None = None):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.world = world or World()

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = batch_indices(step, n=self.n, batch_size=self.batch_size, seed=self.seed).tolist()
            yield self.world.shard(idx)

    def __len__(self) -> int:
        return self.stop - self.start


def make_loader(train_set: Dataset, config, start: int, world: World, device: torch.device, *,
                endless: bool = False):
    """The training batches of steps start..config.steps (this process's share of each); `endless`
    (a --plan's timed steps, which may outnumber a short run's): on past config.steps."""
    stop = start + 2**40 if endless else config.steps
    batches = StepBatches(len(train_set), config.batch_size, config.seed, start, stop, world)
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG.
    return DataLoader(train_set, batch_sampler=batches, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(config.seed + start))


def first_images(dataset: Dataset, n: int, batch_size: int):
    """Batches of the first n images, in order (held-out evaluation, latent statistics)."""
    n = min(n, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, n))])


@dataclass
class TrainState:
    """What the training step updates and a checkpoint stores; `loss_fn` holds the discriminator."""

    model: Autoencoder
    loss_fn: AELoss
    opt_ae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    ema: EMA | None
    start: int  # the first step to train: 0, or the checkpoint's step when resuming

    @property
    def eval_model(self) -> Autoencoder:
        """The weights that are evaluated and used: the EMA's if there is one."""
        return self.ema.model if self.ema is not None else self.model


def build_state(ae_config: AutoencoderConfig, loss_config: AELossConfig, config, world: World,
                device: torch.device, ckpt: dict | None) -> TrainState:
    """The autoencoder, its loss and discriminator, their Adam optimizers and the EMA; restored from
    `ckpt` (weights, optimizers, step and RNG state) when resuming."""
    model = Autoencoder(ae_config).to(device)
    loss_fn = AELoss(loss_config, in_channels=ae_config.in_channels).to(device)
    if world.enabled and device.type == "cuda":  # the PatchGAN's BatchNorm over the global batch
        loss_fn.discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(loss_fn.discriminator)
    betas = (config.adam_beta1, config.adam_beta2)
    opt_ae = torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)
    opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=config.disc_lr or config.lr,
                                betas=betas)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["autoencoder"]["state_dict"])
        loss_fn.discriminator.load_state_dict(ckpt["discriminator"])
        opt_ae.load_state_dict(ckpt["opt_ae"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        if ema is not None and ckpt["ema_autoencoder"] is not None:
            ema.load_state_dict({**ckpt["ema_state"],
                                 "model": ckpt["ema_autoencoder"]["state_dict"]})
        start = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
    return TrainState(model, loss_fn, opt_ae, opt_disc, ema, start)


def resolve_configs(args: argparse.Namespace, ckpt_path: Path, configs: tuple[type, type, type],
                    preset: dict) -> tuple[AutoencoderConfig, AELossConfig, object, dict | None]:
    """(ae_config, loss_config, config, checkpoint): `preset` (shrunk by --smoke) or, with --resume,
    the checkpoint's stored configuration, overridden by the flags; the checkpoint is None unless
    resuming. `configs`: the autoencoder's, the loss's and the script's config classes."""
    if args.resume and args.plan is not None:
        raise UsageError("--plan plans a new run: drop --resume (a resumed run does what is left "
                         "of its --steps, at the speed its log.jsonl shows)")
    overrides = {k: v for k, v in vars(args).items() if k in config_fields(*configs)}
    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(ckpt_path if args.resume == "auto" else args.resume,
                               kind="autoencoder")
        base = {**ckpt["ae_config"], **ckpt["loss_config"], **ckpt["train_config"]}
        check_resume_overrides(base, overrides)
        if overrides:
            print(f"resume: overriding stored config with {overrides}")
    else:
        base = preset
    ae_config, loss_config, config = (build_config(cls, base, overrides) for cls in configs)
    check_data_flags(config.dataset, args.data, config.hflip)
    f = ae_config.downsample_factor
    if config.image_size % f:
        raise UsageError(f"--image_size {config.image_size} must be a multiple of the "
                         f"autoencoder's downsampling factor f = {f} "
                         f"(--channel_mult {','.join(map(str, ae_config.channel_mult))}): "
                         f"e.g. {config.image_size // f * f or f}")
    return ae_config, loss_config, config, ckpt


def fit_to_data(state: TrainState, config, loss_config: AELossConfig, images: int,
                args: argparse.Namespace) -> tuple[object, AELossConfig]:
    """The photo presets' steps from their epochs over `images` (`fit_steps`); the discriminator
    then joins at the same share of the shorter run (unless --disc_start was given), in `state`'s
    loss too."""
    fitted = fit_steps(config, images, explicit="steps" in vars(args))
    if fitted.steps != config.steps and loss_config.disc_start and "disc_start" not in vars(args):
        start = round(loss_config.disc_start * fitted.steps / config.steps)
        print(f"the discriminator joins at step {start:,} ({loss_config.disc_start:,} of the "
              f"preset's {config.steps:,})")
        loss_config = state.loss_fn.config = replace(loss_config, disc_start=start)
    return fitted, loss_config


def save_identity(ae_config: AutoencoderConfig, loss_config: AELossConfig, config,
                  args: argparse.Namespace, ckpt_path: Path, device: torch.device) -> dict:
    """--regularizer identity: nothing to train. Measure the pixels' scale factor and write a
    checkpoint that train_ldm.py reads like any other first stage (it then trains a pixel-space
    diffusion model)."""
    model = Autoencoder(ae_config).to(device)
    train_set, _ = make_datasets(config, args.data)
    stats = latent_statistics(model,
                              first_images(train_set, config.stats_images, config.batch_size),
                              max_images=config.stats_images,
                              generator=torch.Generator(device).manual_seed(config.seed))
    # Pixel-space diffusion models (DDPM, ADM, the paper's LDM-1) train on pixels in [-1, 1] as they
    # are; the measured std is reported but not divided out.
    model.set_latent_stats(replace(stats, scale_factor=1.0))
    save_checkpoint(ckpt_path, {
        "step": 0, "ae_config": asdict(ae_config), "loss_config": asdict(loss_config),
        "train_config": asdict(config), "autoencoder": model.to_dict(), "ema_autoencoder": None,
        "ema_state": None, "discriminator": {}, "opt_ae": {}, "opt_disc": {}, "rng": rng_state(),
        "metrics": {"latent": asdict(stats)},
    }, kind="autoencoder")
    print(f"identity first stage (z = x, f = 1): pixels used as they are in [-1, 1] "
          f"(std {stats.global_std:.4f}, scale_factor 1); nothing to train -> {ckpt_path}")
    return {"latent": asdict(stats), "checkpoint": str(ckpt_path)}


def check_memory(state: TrainState, ae_config: AutoencoderConfig, config, world: World,
                 device: torch.device) -> float:
    """Refuse a batch that cannot fit in memory before the first step (see tinyldm.training.memory):
    the autoencoder's activations and the discriminator's (run on real and reconstructed images),
    and, when LPIPS is on, its backbone's (on both)."""
    S = config.image_size
    x = torch.zeros(1, ae_config.in_channels, S, S, device=device)
    parts = [(state.model, lambda: state.model(x), 1),
             (state.loss_fn.discriminator, lambda: state.loss_fn.discriminator(x), 2)]
    if state.loss_fn.perceptual is not None:
        parts.append((state.loss_fn.perceptual, lambda: state.loss_fn.perceptual(x, x), 1))
    per_example = sum(times * profile(m, fn, S * S).training(S * S) for m, fn, times in parts)
    trained = weights_bytes(state.model, state.loss_fn.discriminator)
    return check_training("the autoencoder", trained, per_example, config.batch_size // world.size,
                          device)


def describe_loss(loss: AELossConfig, ae: AutoencoderConfig) -> str:
    """The training objective in one line, e.g.
    "L1 + 1 x LPIPS (vgg) + 1e-06 x KL + 0.5 x PatchGAN from step 50001"."""
    terms = [loss.rec_loss.upper()]
    if loss.perceptual_weight > 0:
        backbone = ("" if loss.lpips_pretrained else
                    ", random backbone: a plumbing check, not a perceptual loss")
        terms.append(f"{loss.perceptual_weight:g} x LPIPS ({loss.lpips_net}{backbone})")
    if ae.regularizer == "kl":
        terms.append(f"{loss.kl_weight:g} x KL")
    elif ae.regularizer == "vq":
        terms.append(f"{loss.codebook_weight:g} x codebook")
    if loss.disc_weight > 0:
        terms.append(f"{loss.disc_weight:g} x PatchGAN ({loss.disc_loss}) "
                     f"from step {loss.disc_start}")
    return " + ".join(terms)


def describe(state: TrainState, config, train_set: Dataset, held_out: Dataset,
             device: torch.device) -> None:
    model, ae_config = state.model, state.model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"autoencoder: {n_params / 1e6:.2f}M params, f={ae_config.downsample_factor}, "
          f"{ae_config.regularizer}, latent {model.latent_shape(config.image_size)} for "
          f"{config.image_size}px; {len(train_set)} train / {len(held_out)} held-out images; "
          f"device {device}; steps {state.start}..{config.steps}")
    print(f"loss: {describe_loss(state.loss_fn.config, ae_config)}; "
          f"bf16 autocast {'on' if config.amp else 'off'} (CUDA only)")
    if len(train_set) < config.batch_size:  # (memorising shows in the held-out score it measures)
        from .plan import memorising

        print(f"health: {memorising(len(train_set), config.steps, config.batch_size)[0]}")


def plan(state: TrainState, config, train_set: Dataset, held_out: Dataset, device: torch.device,
         *, step: Callable[[int], dict], save: Callable[[int], None], ckpt_path: Path,
         grid: Callable[[int], object], json_path: str | None) -> dict:
    """--plan: the stage's time from real steps of `step` (before and after the discriminator
    joins, each timed), one grid and one checkpoint (written to the plan's temporary folder), and
    the final held-out measurement extrapolated from one batch; printed by `plan.report` (see
    tinyldm.training.plan)."""
    from .plan import (
        Stage,
        grids_and_checkpoints,
        memorising,
        report,
        seconds_once,
        seconds_per_call,
    )

    start, steps, disc = state.start, config.steps, state.loss_fn.config.disc_start
    memory = check_memory(state, state.model.config, config, World(), device)
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
