"""Train the first stage: a KL- or VQ-regularized autoencoder (LDM, arXiv 2112.10752, Sec. 3.1,
App. G).

    python train_ae.py --preset shapes --out runs/ae-shapes       # the CPU demo's first stage
    python train_ae.py --preset shapes_vq --out runs/ae-shapes_vq
    python train_ae.py --preset celeba64_vq --data CELEBA --out runs/ae-celeba64_vq
    python train_ae.py --preset shapes --smoke --out /tmp/ae-smoke  # seconds; what CI runs
    python train_ae.py --out runs/ae-shapes --resume                # continue exactly
    torchrun --nproc_per_node=4 train_ae.py --preset celeba64 --data CELEBA  # KL only
    python train_ae.py --regularizer identity --z_channels 3 --channel_mult 1 --out runs/ae-pixels

Every field of AutoencoderConfig, AELossConfig and TrainAEConfig is a flag (--base_channels 64,
--channel_mult 1,2,4, --disc_start 0); flags override the preset or, with --resume, the
configuration stored in the checkpoint. --resume is exact (weights, discriminator, optimizers, step,
RNG, data order; the posterior noise is seeded by the step), also with another number of processes.
The celeba / lsun presets use LPIPS like the paper (pip install 'tinyldm[lpips]');
--perceptual_weight 0 goes without.
--regularizer identity (f = 1) trains nothing: it writes a pixel-space first stage.

Writes into --out: autoencoder.pt, log.jsonl, loss.png, recon_XXXXXXX.png (top row held-out inputs,
bottom row reconstructions) and metrics.json (held-out PSNR / SSIM, KL or codebook statistics, and
the latent statistics that set the scale factor).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tinyldm.autoencoder import AutoencoderConfig
from tinyldm.autoencoder_loss import AELossConfig
from tinyldm.checkpoint import rng_state, save_checkpoint
from tinyldm.cli import ArgumentParser, run
from tinyldm.data.image_batches import first_images, make_datasets, make_loader
from tinyldm.data.order import Stream, seed_stream
from tinyldm.evaluation.ae_score import final_metrics, format_metrics, save_reconstructions
from tinyldm.evaluation.metrics import codebook_stats
from tinyldm.memory import check_ae_training
from tinyldm.tools.plan import plan_train_ae
from tinyldm.training.build import TrainState, build_ae_state, save_identity
from tinyldm.training.configs import fit_ae_to_data, resolve_ae_configs
from tinyldm.training.distributed import World, exit_process, join
from tinyldm.training.flags import add_config_args, default_preset
from tinyldm.training.health import describe_autoencoder
from tinyldm.training.loop import seed_everything
from tinyldm.training.presets import AE_PRESETS, AE_SMOKE
from tinyldm.training.run_lock import RunLock
from tinyldm.training.trainer import Checkpoints, Grids, Trainer, TrainingConfig


@dataclass
class TrainAEConfig(TrainingConfig):
    dataset: str = "shapes"  # "shapes", "folder", "celeba" or "lsun" (the last three read --data)
    image_size: int = 32
    n_train: int = 50_000  # shapes: the training split's size; other data: first N images (0: all)
    n_eval: int = 256  # held-out images for PSNR / SSIM (and the reconstruction grid)
    hflip: bool = False  # random horizontal flips of training images (folder / celeba / lsun only)
    batch_size: int = 32
    steps: int = 2000
    disc_lr: float = 0.0  # 0: same as lr
    adam_beta1: float = 0.5  # (0.5, 0.9): the GAN-friendly betas of VQGAN / CompVis
    adam_beta2: float = 0.9
    amp: bool = False  # bf16 autocast, CUDA only; off, since it costs PSNR (docs/scripts.md)
    num_workers: int = 0
    sample_every: int = 500  # the reconstruction grid
    ckpt_every: int = 1000
    stats_images: int = 1024  # training images encoded for the latent statistics, scale factor


PRESETS, SMOKE = AE_PRESETS, AE_SMOKE  # dicts of field -> value (tinyldm/training/presets.py)
CONFIGS = (AutoencoderConfig, AELossConfig, TrainAEConfig)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="default: folder when --data is given, else shapes")
    p.add_argument("--smoke", action="store_true", help="shrink it to a seconds-long CPU run")
    p.add_argument("--out", default="runs/ae", help="output folder")
    p.add_argument("--data", default=None, help="dataset folder (folder / celeba / lsun)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda:1, mps")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: OUT/autoencoder.pt)")
    p.add_argument("--plan", nargs="?", const="", default=None, metavar="JSON",
                   help="print what the run will do (times from real steps) and exit")
    add_config_args(p, *CONFIGS)
    return default_preset(p.parse_args(argv))


def train_step(step: int, *, state: TrainState, batches, trainer: Trainer) -> dict:
    """One step of the two players (App. G; the VQGAN objective of Esser et al., arXiv 2012.09841):
    1) the autoencoder: L_rec (+ perceptual) + L_reg (KL or VQ), + lambda * L_adv once the
       discriminator is on, lambda the adaptive weight (the ratio of the two terms' gradient norms
       at the decoder's last layer);
    2) once it is on, the discriminator, on the same batch with the reconstructions detached.
    Returns the logged terms."""
    loss_fn, device, config, world = state.loss_fn, trainer.device, trainer.config, trainer.world
    x = next(batches).to(device, non_blocking=True)  # this process's share of the global batch
    eps = None
    if state.model.config.regularizer == "kl":  # z = mu + sigma * eps, eps seeded by the step
        g = torch.Generator(device).manual_seed(seed_stream(config.seed, step, Stream.NOISE))
        z_shape = state.model.latent_shape(config.image_size)
        eps = torch.randn((config.batch_size, *z_shape), generator=g, device=device)
        eps = world.shard(eps)
    with trainer.autocast():
        out = state.step_model(x, eps=eps)  # the autoencoder, or under torchrun in DDP
        terms = loss_fn.autoencoder_terms(x, out, step=step)  # L_rec, L_reg, -L_adv
        grads = loss_fn.last_layer_gradients(terms, state.model.last_layer)  # Eq. (7)'s, at D_L
        if grads is not None:  # lambda from the global batch's gradients: their process mean
            grads = tuple(map(world.average, grads))
        loss, logs = loss_fn.autoencoder_loss(terms, grads)
    state.opt_ae.zero_grad(set_to_none=True)
    loss.backward()
    state.opt_ae.step()
    if loss_fn.disc_active(step):
        with trainer.autocast():
            loss_d, logs_d = loss_fn.discriminator_loss(x, out.x_rec, step=step)
        state.opt_disc.zero_grad(set_to_none=True)  # drops what the autoencoder's loss left on D
        loss_d.backward()
        world.average_gradients(loss_fn.discriminator)  # what DDP does for the autoencoder
        state.opt_disc.step()
        world.average_buffers(loss_fn.discriminator)  # BatchNorm running statistics stay identical
        logs.update(logs_d)
    if out.indices is not None and (step + 1) % config.log_every == 0:  # VQ: the codebook's health
        logs.update(codebook_stats(out.indices, state.model.config.n_codes))
    return logs


def save_ae(path: Path, step: int, *, state: TrainState, configs: tuple, rng: dict | None = None,
            metrics: dict | None = None) -> None:
    """What --resume needs (weights, discriminator, optimizers, EMA, step, RNG), and the configs."""
    ae_config, loss_config, config = configs
    ema = state.ema
    save_checkpoint(path, {
        "step": step, "ae_config": asdict(ae_config), "loss_config": asdict(loss_config),
        "train_config": asdict(config), "autoencoder": state.model.to_dict(),
        "ema_autoencoder": ema.model.to_dict() if ema is not None else None,
        "ema_state": None if ema is None else {"decay": ema.decay, "num_updates": ema.num_updates},
        "discriminator": state.loss_fn.discriminator.state_dict(),
        "opt_ae": state.opt_ae.state_dict(), "opt_disc": state.opt_disc.state_dict(),
        "rng": rng or rng_state(), "metrics": metrics,
    }, kind="autoencoder")


def stage_one(args: argparse.Namespace, configs: tuple, ckpt: dict | None,
              device: torch.device) -> tuple[TrainState, tuple, tuple]:
    """The autoencoder, its loss and discriminator with their optimizers and EMA (restored from
    `ckpt` when resuming), checked to fit in memory; the training and held-out images. Returns
    them with the configs, the photo presets' steps fitted to the images."""
    ae_config, loss_config, config = configs
    world = World.current()
    state = build_ae_state(ae_config, loss_config, config, world, device, ckpt)
    check_ae_training(state, config.image_size, config.batch_size // world.size, device)
    train_set, held_out = make_datasets(config, args.data)
    config, loss_config = fit_ae_to_data(state, config, loss_config, len(train_set), args)
    describe_autoencoder(state, config, train_set, held_out, device)
    return state, (ae_config, loss_config, config), (train_set, held_out)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.plan is not None:  # what the run will do, timed on real steps; nothing written
        return plan_train_ae(args, sys.modules[__name__])
    out = Path(args.out)
    ckpt_path = out / "autoencoder.pt"
    lock = RunLock.for_rank_zero(out)  # one run per output folder
    preset = {**PRESETS[args.preset], **(SMOKE if args.smoke else {})}
    ae_config, loss_config, config, ckpt = resolve_ae_configs(args, ckpt_path, CONFIGS, preset)
    world, device = join(args.device, config.batch_size)  # one process unless torchrun started us
    seed_everything(config.seed)
    if ae_config.regularizer == "identity":
        return save_identity(ae_config, loss_config, config, args, ckpt_path, device)

    # The two players with their optimizers (restored when resuming), and the images.
    state, configs, (train_set, held_out) = stage_one(args, (ae_config, loss_config, config),
                                                      ckpt, device)
    config = configs[2]  # with the photo presets' steps fitted to the images
    batches = iter(make_loader(train_set, config, state.start, (world.rank, world.size), device))

    # The training loop.
    optimizers = {state.opt_ae: config.lr, state.opt_disc: config.disc_lr or config.lr}
    trainer = Trainer(config, state.model, state.ema, optimizers, out)
    trainer.loss_key = "loss_ae"
    state.step_model = trainer.distribute(state.model)
    grid_x = next(first_images(held_out, 8, 8)).to(device)
    draw = lambda step: save_reconstructions(state.eval_model, grid_x,  # noqa: E731
                                             out / f"recon_{step:07d}.png")
    save = lambda step: save_ae(ckpt_path, step, state=state, configs=configs)  # noqa: E731
    for callback in (Checkpoints(ckpt_path, save, "train_ae.py", argv),
                     grids := Grids(draw, config.sample_every)):
        trainer.add_callback(callback)
    state.model.train()
    trainer.run(lambda step: train_step(step, state=state, batches=batches, trainer=trainer),
                start=state.start)
    rng_after_training = rng_state()  # the evaluation below draws from its own generators
    trainer.close()
    if not world.is_main:  # rank 0 alone evaluates and writes the final checkpoint
        return {"step": config.steps, "rank": world.rank}

    # The last grid, the held-out measurement and the latent scale factor.
    grids.now(trainer)
    metrics = final_metrics(state, train_set, held_out, config, device, trainer.seconds)
    save_ae(ckpt_path, config.steps, state=state, configs=configs, rng=rng_after_training,
            metrics=metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_metrics(metrics))
    lock.release()
    return metrics


if __name__ == "__main__":
    exit_process(run(main, sys.argv[1:]))  # under torchrun, ranks other than 0 leave at once
