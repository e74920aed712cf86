"""Train the first stage: a KL- or VQ-regularized autoencoder (LDM, arXiv 2112.10752, Sec. 3.1, App. G).

    python train_ae.py --preset shapes --out runs/ae-shapes          # ~3.5 min on 2 CPU cores, ~36 dB
    python train_ae.py --preset shapes_vq --out runs/ae-shapes-vq
    python train_ae.py --preset celeba64 --data /path/to/celeba --out runs/ae-celeba64
    python train_ae.py --preset shapes --smoke --out /tmp/ae-smoke    # seconds; what CI runs
    python train_ae.py --out runs/ae-shapes --resume                  # continue exactly
    torchrun --nproc_per_node=4 train_ae.py --preset celeba64 --data ...   # data parallel (KL only)
    python train_ae.py --regularizer identity --z_channels 3 --channel_mult 1 --out runs/ae-pixels  # f = 1

Every field of AutoencoderConfig, AELossConfig and TrainAEConfig is a flag (`--base_channels 64`,
`--channel_mult 1,2,4`, `--disc_start 0`); flags override the preset, or, with --resume, the
configuration stored in the checkpoint. --resume is exact (weights, discriminator, optimizers, step,
RNG, data order; the posterior noise is seeded by the step), also with another number of processes,
with num_workers=0 or without random augmentation (hflip in worker processes draws from per-worker
seeds). The celeba / lsun presets use LPIPS like the paper (pip install lpips; its
backbone weights are a one-time download); --perceptual_weight 0 trains without it.

Writes into --out: autoencoder.pt (checkpoint), log.jsonl (one line per logged step, terms averaged
since the previous line), recon_XXXXXXX.png (top row held-out inputs, bottom row reconstructions), loss.png
(the loss so far)
and, at the end, metrics.json (held-out PSNR / SSIM, KL or codebook statistics, latent statistics).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tinyldm.autoencoder import AEOutput, Autoencoder, AutoencoderConfig, codebook_stats, latent_statistics
from tinyldm.autoencoder_loss import AELoss, AELossConfig
from tinyldm.cli import ArgumentParser, UsageError, run
from tinyldm.evaluation.metrics import psnr, ssim
from tinyldm.evaluation.viz import save_image_grid, save_loss_curve
from tinyldm.training.checkpoint import RunLock, load_checkpoint, save_checkpoint
from tinyldm.training.distributed import World, leave, replica_spread
from tinyldm.training.distributed import setup as setup_distributed
from tinyldm.training.distributed import teardown as teardown_distributed
from tinyldm.training.flags import (
    add_config_args,
    build_config,
    check_data_flags,
    check_resume_overrides,
    config_fields,
    default_preset,
)
from tinyldm.training.loop import (
    EMA,
    GracefulStop,
    JSONLLogger,
    batch_indices,
    pick_device,
    resume_command,
    rng_state,
    seed_everything,
    seed_stream,
    set_rng_state,
)
from tinyldm.training.memory import check_training, profile, weights_bytes
from tinyldm.training.presets import AE_PRESETS, AE_SMOKE


@dataclass
class TrainAEConfig:
    dataset: str = "shapes"  # "shapes", "folder", "celeba" or "lsun" (the last three read --data)
    image_size: int = 32
    n_train: int = 50_000  # shapes: size of the training split; other data: first N images (0 = all)
    n_eval: int = 256  # held-out images for PSNR / SSIM (and the recon grid)
    hflip: bool = False  # random horizontal flips of training images (folder / celeba / lsun only)
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" or "cosine" (to lr_min_ratio * lr at `steps`)
    lr_min_ratio: float = 0.0
    warmup_steps: int = 0
    disc_lr: float = 0.0  # 0: same as lr
    adam_beta1: float = 0.5  # (0.5, 0.9): the GAN-friendly betas of VQGAN / CompVis
    adam_beta2: float = 0.9
    ema_decay: float = 0.0  # 0 disables the EMA of weights
    amp: bool = False  # bf16 autocast (CUDA only). Off: in a pair of otherwise equal 64 px GPU runs it cost 2.5 dB PSNR
    seed: int = 0
    check_replicas: bool = False  # under torchrun: log the largest difference between the processes' weights
    tensorboard: bool = False  # also log to <out>/tensorboard (pip install 'tinyldm[tensorboard]')
    num_workers: int = 0
    log_every: int = 50
    image_every: int = 500
    ckpt_every: int = 1000
    stats_images: int = 1024  # training images encoded for the latent statistics / scale factor

    def __post_init__(self):
        if self.dataset not in ("shapes", "folder", "celeba", "lsun"):
            raise ValueError(f"dataset must be shapes, folder, celeba or lsun, got {self.dataset!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")


# ----------------------------------------------------------------------------------------------
# Presets (tinyldm/training/presets.py): plain dicts of field -> value over the dataclass defaults.

PRESETS, SMOKE = AE_PRESETS, AE_SMOKE
CONFIGS = (AutoencoderConfig, AELossConfig, TrainAEConfig)


# ----------------------------------------------------------------------------------------------
# Data


class _Images(Dataset):
    """Keeps only the image of a dataset whose items are dicts with an "image" in [-1, 1]."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        return item["image"] if isinstance(item, dict) else item


def make_datasets(config: TrainAEConfig, data_path: str | None) -> tuple[Dataset, Dataset]:
    """(train, held-out) datasets of (3, H, W) images in [-1, 1]."""
    if config.dataset == "shapes":
        from tinyldm.data.shapes import ShapesConfig, ShapesDataset

        shapes = ShapesConfig(image_size=config.image_size, n_train=config.n_train, n_eval=config.n_eval)
        return _Images(ShapesDataset(shapes, "train")), _Images(ShapesDataset(shapes, "eval"))
    if data_path is None:
        raise SystemExit(f"--dataset {config.dataset} needs --data PATH")
    from tinyldm.data.images import make_image_datasets

    train, held_out = make_image_datasets(config.dataset, data_path, image_size=config.image_size,
                                          n_eval=config.n_eval, hflip=config.hflip, max_images=config.n_train or None)
    return _Images(train), _Images(held_out)


class StepBatches:
    """A batch sampler whose k-th batch is `batch_indices(k)`: the order depends on the step alone. Under
    torchrun each process gets its share of that global batch (`world.shard`)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, world: World | None = None):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.world = world or World()

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = batch_indices(step, n=self.n, batch_size=self.batch_size, seed=self.seed).tolist()
            yield self.world.shard(idx)

    def __len__(self) -> int:
        return self.stop - self.start


def make_loader(train_set: Dataset, config: TrainAEConfig, start: int, world: World, device: torch.device):
    """The training batches of steps start..config.steps (this process's share of each)."""
    batches = StepBatches(len(train_set), config.batch_size, config.seed, start, config.steps, world)
    # Its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG.
    return DataLoader(train_set, batch_sampler=batches, num_workers=config.num_workers,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed + start))


def first_images(dataset: Dataset, n: int, batch_size: int):
    """Batches of the first n images, in order (held-out evaluation, latent statistics)."""
    n = min(n, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, n))])


# ----------------------------------------------------------------------------------------------
# The training step


def lr_at(step: int, config: TrainAEConfig, base_lr: float) -> float:
    """Linear warm-up over `warmup_steps`, then constant or a cosine decay to `lr_min_ratio * base_lr` at `steps`.
    (The cosine decay is why this is not `training.loop.warmup_lr`, which stays constant after the warm-up.)"""
    if step < config.warmup_steps:
        return base_lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return base_lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    r = config.lr_min_ratio
    return base_lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class TrainState:
    """What the training step updates and a checkpoint stores. `ddp_model` is `model` itself, or under torchrun
    `model` wrapped in DistributedDataParallel (which averages its gradients); `loss_fn` holds the discriminator."""

    model: Autoencoder
    ddp_model: torch.nn.Module
    loss_fn: AELoss
    opt_ae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    ema: EMA | None
    start: int  # the first step to train: 0, or the checkpoint's step when resuming

    @property
    def eval_model(self) -> Autoencoder:
        """The weights that are evaluated and used: the EMA's if there is one."""
        return self.ema.model if self.ema is not None else self.model


def build_state(ae_config: AutoencoderConfig, loss_config: AELossConfig, config: TrainAEConfig, world: World,
                device: torch.device, ckpt: dict | None) -> TrainState:
    """The autoencoder, its loss and discriminator, their Adam optimizers and the EMA; restored from `ckpt`
    (weights, optimizers, step and RNG state) when resuming."""
    model = Autoencoder(ae_config).to(device)
    loss_fn = AELoss(loss_config, in_channels=ae_config.in_channels).to(device)
    if world.enabled and device.type == "cuda":  # the PatchGAN's BatchNorm over the global batch
        loss_fn.discriminator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(loss_fn.discriminator)
    betas = (config.adam_beta1, config.adam_beta2)
    opt_ae = torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)
    opt_disc = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=config.disc_lr or config.lr, betas=betas)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["autoencoder"]["state_dict"])
        loss_fn.discriminator.load_state_dict(ckpt["discriminator"])
        opt_ae.load_state_dict(ckpt["opt_ae"])
        opt_disc.load_state_dict(ckpt["opt_disc"])
        if ema is not None and ckpt["ema_autoencoder"] is not None:
            ema.load_state_dict({**ckpt["ema_state"], "model": ckpt["ema_autoencoder"]["state_dict"]})
        start = int(ckpt["step"])
        set_rng_state(ckpt["rng"])
    # Data parallel: DDP averages the autoencoder's gradients; the discriminator (run three times a step)
    # has its gradients averaged by hand (`world.average_gradients`), which is the same arithmetic.
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.enabled else model
    return TrainState(model, ddp_model, loss_fn, opt_ae, opt_disc, ema, start)


def set_learning_rates(state: TrainState, step: int, config: TrainAEConfig) -> None:
    for opt, base_lr in ((state.opt_ae, config.lr), (state.opt_disc, config.disc_lr or config.lr)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config, base_lr)


def posterior_noise(step: int, config: TrainAEConfig, z_shape: tuple, world: World,
                    device: torch.device) -> torch.Tensor:
    """The KL posterior's noise for this process's share of the batch. It is drawn for the whole global batch
    from a generator seeded by the step: the same in every process (each takes its share), so N processes
    train like one, and resume is exact."""
    g = torch.Generator(device).manual_seed(seed_stream(config.seed, step, 1))
    return world.shard(torch.randn((config.batch_size, *z_shape), generator=g, device=device))


def train_step(state: TrainState, x: torch.Tensor, noise: torch.Tensor | None, *, step: int, autocast,
               world: World) -> tuple[AEOutput, dict[str, torch.Tensor]]:
    """One step of the two players (App. G; the VQGAN objective of Esser et al., arXiv 2012.09841):
    1) the autoencoder: L_rec (+ perceptual) + L_reg (KL or VQ), + lambda * L_adv once the discriminator
       is on, lambda the adaptive weight (ratio of the two terms' gradient norms at the decoder's last layer);
    2) once it is on, the discriminator, on the same batch with the reconstructions detached.
    Returns the autoencoder's output and the detached terms to log."""
    model, loss_fn = state.model, state.loss_fn
    reduce = world.average if world.enabled else None  # lambda from the global batch's gradient norms
    with autocast:
        out = state.ddp_model(x, noise=noise)
        loss, logs = loss_fn.autoencoder_loss(x, out, step=step, last_layer=model.last_layer, reduce=reduce)
    state.opt_ae.zero_grad(set_to_none=True)
    loss.backward()
    state.opt_ae.step()
    if loss_fn.disc_active(step):
        with autocast:
            loss_d, logs_d = loss_fn.discriminator_loss(x, out.x_rec, step=step)
        state.opt_disc.zero_grad(set_to_none=True)  # also drops what the autoencoder's loss left on D
        loss_d.backward()
        world.average_gradients(loss_fn.discriminator)
        state.opt_disc.step()
        world.average_buffers(loss_fn.discriminator)  # BatchNorm running statistics stay identical
        logs.update(logs_d)
    return out, logs


# ----------------------------------------------------------------------------------------------
# Around the step: logging, reconstruction grids, checkpoints, the held-out evaluation


class LogWindow:
    """Each logged term's sum and count, the images seen and the time since the last log line."""

    def __init__(self):
        self.sums: dict[str, list] = {}  # name -> [sum, count]
        self.images, self.since = 0, time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], images: int) -> None:
        self.images += images
        for k, v in logs.items():
            acc = self.sums.setdefault(k, [0.0, 0])
            acc[0], acc[1] = acc[0] + v, acc[1] + 1

    def close(self, world: World) -> tuple[dict[str, float], float]:
        """Each term's mean over the window (and the processes) and the images per second; opens the next."""
        now = time.perf_counter()
        images_per_s = self.images / max(now - self.since, 1e-9)
        means = {k: world.mean(total / n) for k, (total, n) in self.sums.items()}
        self.sums, self.images, self.since = {}, 0, now
        return means, images_per_s


def log_line(done: int, window: LogWindow, state: TrainState, out: AEOutput, config: TrainAEConfig, world: World,
             logger: JSONLLogger | None, bar: tqdm) -> None:
    """One line of log.jsonl: the window's means (+ replica spread, codebook statistics), lr and images/s."""
    means, images_per_s = window.close(world)
    if config.check_replicas:
        means["replica_spread"] = max(replica_spread(state.model, world),
                                      replica_spread(state.loss_fn.discriminator, world))
    if out.indices is not None:  # this step's batch: usage and perplexity of the codebook
        means.update(codebook_stats(out.indices, state.model.config.n_codes))
    if logger is not None:
        logger.log(step=done, lr=state.opt_ae.param_groups[0]["lr"], images_per_s=images_per_s, **means)
    bar.set_postfix(loss=f"{means['loss_ae']:.4f}", rec=f"{means['rec']:.4f}", img_s=f"{images_per_s:.0f}")


@torch.no_grad()
def reconstruct(model: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """The deterministic path the LDM uses: decode(encode(x)), posterior mean / quantized latent."""
    return model.decode(model.encode(x)).float().clamp(-1, 1)


def save_reconstructions(state: TrainState, grid_x: torch.Tensor, path: Path, logger: JSONLLogger, done: int) -> None:
    """Top row held-out inputs, bottom row their reconstructions; logs the grid's PSNR (8 images: a quick look);
    redraws loss.png, the autoencoder's loss so far."""
    eval_model = state.eval_model
    eval_model.eval()
    grid_rec = reconstruct(eval_model, grid_x)
    save_image_grid(torch.cat([grid_x, grid_rec]), path, nrow=8)
    logger.log(step=done, grid_psnr=psnr(grid_rec, grid_x).mean())
    save_loss_curve(logger.path, path.with_name("loss.png"), key="loss_ae")  # beside the grids, for long runs
    logger.image("reconstructions", path, done)
    state.model.train()


def write_checkpoint(path: Path, state: TrainState, configs: tuple[AutoencoderConfig, AELossConfig, TrainAEConfig],
                     *, step: int, rng: dict, metrics: dict | None = None) -> None:
    """Everything --resume needs (weights, discriminator, optimizers, EMA, step, RNG) and the configs."""
    ae_config, loss_config, config = configs
    ema = state.ema
    save_checkpoint(path, {
        "step": step, "ae_config": asdict(ae_config), "loss_config": asdict(loss_config),
        "train_config": asdict(config), "autoencoder": state.model.to_dict(),
        "ema_autoencoder": ema.model.to_dict() if ema is not None else None,
        "ema_state": {"decay": ema.decay, "num_updates": ema.num_updates} if ema is not None else None,
        "discriminator": state.loss_fn.discriminator.state_dict(),
        "opt_ae": state.opt_ae.state_dict(), "opt_disc": state.opt_disc.state_dict(), "rng": rng, "metrics": metrics,
    }, kind="autoencoder")


@torch.no_grad()
def reconstruction_scores(model: Autoencoder, held_out: Dataset, config: TrainAEConfig, device: torch.device) -> dict:
    """Held-out PSNR / SSIM, and KL (KL-reg.) or codebook usage / perplexity (VQ-reg.)."""
    model.eval()
    psnrs, ssims, kls, stds, indices = [], [], [], [], []
    for x in first_images(held_out, config.n_eval, config.batch_size):
        x = x.to(device)
        x_rec = reconstruct(model, x)
        psnrs.append(psnr(x_rec, x).cpu())
        ssims.append(ssim(x_rec, x).cpu())
        if model.config.regularizer == "kl":
            q = model.posterior(x)
            kls.append(q.kl().cpu())
            stds.append(q.std.mean().cpu()[None])
        else:
            indices.append(model.quantizer.lookup(model.encode(x)).cpu())
    result = {"n_eval": int(torch.cat(psnrs).numel()), "psnr": float(torch.cat(psnrs).mean()),
              "ssim": float(torch.cat(ssims).mean())}
    if kls:
        result.update(kl_per_image=float(torch.cat(kls).mean()), posterior_std=float(torch.cat(stds).mean()))
    else:
        result.update(codebook_stats(torch.cat(indices), model.quantizer.n_codes))
    return result


def final_metrics(state: TrainState, train_set: Dataset, held_out: Dataset, config: TrainAEConfig,
                  device: torch.device, train_seconds: float) -> dict:
    """The held-out scores of the weights in use, and the latent statistics of training images, which set the
    scale factor the LDM divides by (stored in the model and its EMA)."""
    eval_model = state.eval_model
    metrics = reconstruction_scores(eval_model, held_out, config, device)
    stats = latent_statistics(
        eval_model, first_images(train_set, config.stats_images, config.batch_size), max_images=config.stats_images,
        generator=torch.Generator().manual_seed(config.seed),
    )
    for m in {id(state.model): state.model, id(eval_model): eval_model}.values():
        m.set_latent_stats(stats)
    metrics.update(step=config.steps, train_seconds=round(train_seconds, 1), latent=asdict(stats))
    return metrics


# ----------------------------------------------------------------------------------------------
# The script


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="default: folder when --data is given, else shapes")
    p.add_argument("--smoke", action="store_true", help="shrink the preset to a seconds-long CPU run")
    p.add_argument("--out", default="runs/ae", help="output folder")
    p.add_argument("--data", default=None, help="dataset folder (folder / celeba / lsun)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: OUT/autoencoder.pt)")
    add_config_args(p, *CONFIGS)
    return default_preset(p.parse_args(argv))


def resolve_configs(
    args: argparse.Namespace, ckpt_path: Path
) -> tuple[AutoencoderConfig, AELossConfig, TrainAEConfig, dict | None]:
    """(ae_config, loss_config, config, checkpoint): the preset (shrunk by --smoke) or, with --resume, the
    checkpoint's stored configuration, overridden by the flags; the checkpoint is None unless resuming."""
    overrides = {k: v for k, v in vars(args).items() if k in config_fields(*CONFIGS)}
    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(ckpt_path if args.resume == "auto" else args.resume, kind="autoencoder")
        base = {**ckpt["ae_config"], **ckpt["loss_config"], **ckpt["train_config"]}
        check_resume_overrides(base, overrides)
        if overrides:
            print(f"resume: overriding stored config with {overrides}")
    else:
        base = {**PRESETS[args.preset], **(SMOKE if args.smoke else {})}
    ae_config, loss_config, config = (build_config(cls, base, overrides) for cls in CONFIGS)
    check_data_flags(config.dataset, args.data, config.hflip)
    f = ae_config.downsample_factor
    if config.image_size % f:
        raise UsageError(f"--image_size {config.image_size} must be a multiple of the autoencoder's downsampling "
                         f"factor f = {f} (--channel_mult {','.join(map(str, ae_config.channel_mult))}): "
                         f"e.g. {config.image_size // f * f or f}")
    return ae_config, loss_config, config, ckpt


def setup_world(args: argparse.Namespace, ae_config: AutoencoderConfig, config: TrainAEConfig,
                single_process: bool) -> tuple[World, torch.device]:
    """Join the torchrun process group (unless `single_process`), check the run can be shared, pick the device."""
    world, device_name = (World(), args.device) if single_process else setup_distributed(args.device)
    if world.enabled and ae_config.regularizer == "vq":
        raise SystemExit("a VQ autoencoder does not train under torchrun yet (its dead-code restarts would differ "
                         "between processes): train it as one process")
    if config.batch_size % world.size:
        raise SystemExit(f"--batch_size {config.batch_size} (the global batch) must be divisible by the "
                         f"{world.size} processes")
    return world, pick_device(device_name)


def save_identity(ae_config: AutoencoderConfig, loss_config: AELossConfig, config: TrainAEConfig,
                  args: argparse.Namespace, ckpt_path: Path, device: torch.device) -> dict:
    """--regularizer identity: nothing to train. Measure the pixels' scale factor and write a checkpoint that
    train_ldm.py reads like any other first stage (it then trains a pixel-space diffusion model)."""
    model = Autoencoder(ae_config).to(device)
    train_set, _ = make_datasets(config, args.data)
    stats = latent_statistics(model, first_images(train_set, config.stats_images, config.batch_size),
                              max_images=config.stats_images,
                              generator=torch.Generator(device).manual_seed(config.seed))
    # Pixel-space diffusion models (DDPM, ADM, the paper's LDM-1) train on pixels in [-1, 1] as they are;
    # the measured std is reported but not divided out.
    model.set_latent_stats(replace(stats, scale_factor=1.0))
    save_checkpoint(ckpt_path, {
        "step": 0, "ae_config": asdict(ae_config), "loss_config": asdict(loss_config),
        "train_config": asdict(config), "autoencoder": model.to_dict(), "ema_autoencoder": None, "ema_state": None,
        "discriminator": {}, "opt_ae": {}, "opt_disc": {}, "rng": rng_state(), "metrics": {"latent": asdict(stats)},
    }, kind="autoencoder")
    print(f"identity first stage (z = x, f = 1): pixels used as they are in [-1, 1] (std {stats.global_std:.4f}, "
          f"scale_factor 1); nothing to train -> {ckpt_path}")
    return {"latent": asdict(stats), "checkpoint": str(ckpt_path)}


def check_memory(state: TrainState, ae_config: AutoencoderConfig, config: TrainAEConfig, world: World,
                 device: torch.device) -> float:
    """Refuse a batch that cannot fit in memory before the first step (see tinyldm.training.memory): the
    autoencoder's activations and the discriminator's (run on real and reconstructed images), and, when LPIPS is
    on, its backbone's (on both)."""
    S = config.image_size
    x = torch.zeros(1, ae_config.in_channels, S, S, device=device)
    parts = [(state.model, lambda: state.model(x), 1), (state.loss_fn.discriminator,
                                                          lambda: state.loss_fn.discriminator(x), 2)]
    if state.loss_fn.perceptual is not None:
        parts.append((state.loss_fn.perceptual, lambda: state.loss_fn.perceptual(x, x), 1))
    per_example = sum(times * profile(m, fn, S * S).training(S * S) for m, fn, times in parts)
    trained = weights_bytes(state.model, state.loss_fn.discriminator)
    return check_training("the autoencoder", trained, per_example, config.batch_size // world.size, device)


def describe_loss(loss: AELossConfig, ae: AutoencoderConfig) -> str:
    """The training objective in one line, e.g. "L1 + 1 x LPIPS (vgg) + 1e-06 x KL + 0.5 x PatchGAN from step 50001"."""
    terms = [loss.rec_loss.upper()]
    if loss.perceptual_weight > 0:
        backbone = "" if loss.lpips_pretrained else ", random backbone: a plumbing check, not a perceptual loss"
        terms.append(f"{loss.perceptual_weight:g} x LPIPS ({loss.lpips_net}{backbone})")
    if ae.regularizer == "kl":
        terms.append(f"{loss.kl_weight:g} x KL")
    elif ae.regularizer == "vq":
        terms.append(f"{loss.codebook_weight:g} x codebook")
    if loss.disc_weight > 0:
        terms.append(f"{loss.disc_weight:g} x PatchGAN ({loss.disc_loss}) from step {loss.disc_start}")
    return " + ".join(terms)


def main(argv: list[str] | None = None, *, single_process: bool = False, resume_hint: str | None = None) -> dict:
    """`single_process`: train here alone even inside a torchrun job (train_ldm.py's rank 0 uses it).
    `resume_hint`: the command a run stopped by a signal prints (default: this command with --resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    ckpt_path = out / "autoencoder.pt"
    lock = RunLock(out).acquire() if single_process or os.environ.get("RANK", "0") == "0" else None
    ae_config, loss_config, config, ckpt = resolve_configs(args, ckpt_path)
    configs = (ae_config, loss_config, config)
    world, device = setup_world(args, ae_config, config, single_process)
    seed_everything(config.seed)
    if ae_config.regularizer == "identity":
        return save_identity(ae_config, loss_config, config, args, ckpt_path, device)
    state = build_state(ae_config, loss_config, config, world, device, ckpt)
    model, start = state.model, state.start
    check_memory(state, ae_config, config, world, device)
    train_set, held_out = make_datasets(config, args.data)
    n_params = sum(p.numel() for p in model.parameters())
    z_shape = model.latent_shape(config.image_size)
    print(f"autoencoder: {n_params / 1e6:.2f}M params, f={ae_config.downsample_factor}, {ae_config.regularizer}, "
          f"latent {z_shape} for {config.image_size}px; {len(train_set)} train / {len(held_out)} held-out images; "
          f"device {device}; steps {start}..{config.steps}")
    print(f"loss: {describe_loss(loss_config, ae_config)}; bf16 autocast {'on' if config.amp else 'off'} (CUDA only)")
    logger = JSONLLogger(out / "log.jsonl", resume_step=start if ckpt is not None else None,
                         tensorboard=out / "tensorboard" if config.tensorboard else None) if world.is_main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.amp)
    grid_x = next(first_images(held_out, 8, 8)).to(device)
    loader = make_loader(train_set, config, start, world, device)

    model.train()
    t_start, window = time.perf_counter(), LogWindow()
    bar = tqdm(zip(range(start, config.steps), loader, strict=True), total=config.steps, initial=start,
               desc="train_ae", dynamic_ncols=True, mininterval=2.0, **({} if world.is_main else {"disable": True}))
    with GracefulStop() as stop:
        for step, x in bar:
            x = x.to(device, non_blocking=True)
            set_learning_rates(state, step, config)
            noise = posterior_noise(step, config, z_shape, world, device) if ae_config.regularizer == "kl" else None
            out_ae, logs = train_step(state, x, noise, step=step, autocast=autocast, world=world)
            if state.ema is not None and world.is_main:  # only rank 0 draws, evaluates and saves
                state.ema.update(model)
            done = step + 1
            window.add(logs, images=x.shape[0] * world.size)
            if done % config.log_every == 0 or done == config.steps:
                log_line(done, window, state, out_ae, config, world, logger, bar)
            if (done % config.image_every == 0 or done == config.steps) and world.is_main:
                save_reconstructions(state, grid_x, out / f"recon_{done:07d}.png", logger, done)
            periodic = done % config.ckpt_every == 0 and done < config.steps
            if periodic and world.is_main:
                write_checkpoint(ckpt_path, state, configs, step=done, rng=rng_state())
            if done < config.steps and stop.agreed(world, device, done, config.log_every):  # keep this step
                if not periodic and world.is_main:
                    write_checkpoint(ckpt_path, state, configs, step=done, rng=rng_state())
                break
    bar.close()
    if stop.requested and done < config.steps:
        world.barrier()
        if not single_process:
            teardown_distributed(world)
        stop.exit(done, config.steps, ckpt_path, resume_hint or resume_command("train_ae.py", argv))
    train_seconds = time.perf_counter() - t_start
    rng_after_training = rng_state()  # evaluation below uses its own generator; resume continues from here
    # All processes meet here before any of them tears its process group down: with gloo, a process that closes
    # its connections while a peer is still completing the last all-reduce can make that peer abort.
    world.barrier()
    if not world.is_main:  # rank 0 alone evaluates and writes the final checkpoint
        teardown_distributed(world)
        return {"step": config.steps, "rank": world.rank}

    metrics = final_metrics(state, train_set, held_out, config, device, train_seconds)
    write_checkpoint(ckpt_path, state, configs, step=config.steps, rng=rng_after_training, metrics=metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_metrics(metrics))
    logger.close()
    if not single_process:
        teardown_distributed(world)
    if lock is not None:
        lock.release()
    return metrics


def format_metrics(m: dict) -> str:
    lines = [f"held-out ({m['n_eval']} images): PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.4f}"]
    if "kl_per_image" in m:
        lines.append(f"KL per image {m['kl_per_image']:.1f} nats, mean posterior std {m['posterior_std']:.4f}")
    else:
        lines.append(f"codebook usage {m['codebook_usage']:.3f}, perplexity {m['perplexity']:.1f}")
    lat = m["latent"]
    fmt = " ".join(f"{v:+.3f}" for v in lat["mean"]), " ".join(f"{v:.3f}" for v in lat["std"])
    lines.append(f"latent per-channel mean [{fmt[0]}] std [{fmt[1]}] over {lat['n_images']} train images")
    lines.append(f"latent global std {lat['global_std']:.4f} -> scale_factor {lat['scale_factor']:.4f}")
    lines.append(f"train time {m['train_seconds']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    leave(run(main, sys.argv[1:]))  # under torchrun, ranks other than 0 leave at once (see distributed.leave)
