"""Train the first stage: a KL- or VQ-regularized autoencoder (LDM, arXiv 2112.10752, Sec. 3.1,
App. G).

    python train_ae.py --preset shapes --out runs/ae-shapes       # ~2 min on 2 CPU cores, ~36 dB
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
from functools import partial
from pathlib import Path

import torch

from tinyldm.autoencoder import AutoencoderConfig
from tinyldm.autoencoder_loss import AELossConfig
from tinyldm.cli import ArgumentParser, UsageError, run
from tinyldm.evaluation.ae_score import final_metrics, format_metrics, save_reconstructions
from tinyldm.evaluation.metrics import codebook_stats
from tinyldm.training import ae_setup
from tinyldm.training.ae_setup import TrainState
from tinyldm.training.checkpoint import RunLock, save_checkpoint
from tinyldm.training.distributed import World, exit_process, join
from tinyldm.training.flags import add_config_args, default_preset
from tinyldm.training.loop import rng_state, seed_everything, seed_stream
from tinyldm.training.plan import plan_folder
from tinyldm.training.presets import AE_PRESETS, AE_SMOKE
from tinyldm.training.trainer import Trainer, TrainingConfig


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
    amp: bool = False  # bf16 autocast, CUDA only. Off: 2.5 dB lower PSNR in a pair of H200 runs
    num_workers: int = 0
    sample_every: int = 500  # the reconstruction grid
    ckpt_every: int = 1000
    stats_images: int = 1024  # training images encoded for the latent statistics, scale factor

    def __post_init__(self):
        if self.dataset not in ("shapes", "folder", "celeba", "lsun"):
            raise UsageError(f"--dataset must be shapes, folder, celeba or lsun: {self.dataset!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UsageError(f"--lr_schedule must be constant or cosine: {self.lr_schedule!r}")


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


def train_step(step: int, *, state: TrainState, model: torch.nn.Module, batches,
               config: TrainAEConfig, world: World, trainer: Trainer) -> dict:
    """One step of the two players (App. G; the VQGAN objective of Esser et al., arXiv 2012.09841):
    1) the autoencoder: L_rec (+ perceptual) + L_reg (KL or VQ), + lambda * L_adv once the
       discriminator is on, lambda the adaptive weight (the ratio of the two terms' gradient norms
       at the decoder's last layer);
    2) once it is on, the discriminator, on the same batch with the reconstructions detached.
    `model`: the autoencoder, or under torchrun the autoencoder in DDP. Returns the logged terms."""
    loss_fn, device = state.loss_fn, trainer.device
    x = next(batches).to(device, non_blocking=True)  # this process's share of the global batch
    noise = None
    if state.model.config.regularizer == "kl":  # z = mu + sigma * noise, noise seeded by the step
        g = torch.Generator(device).manual_seed(seed_stream(config.seed, step, 1))
        z_shape = state.model.latent_shape(config.image_size)
        noise = torch.randn((config.batch_size, *z_shape), generator=g, device=device)
        noise = world.shard(noise)
    reduce = world.average if world.enabled else None  # lambda from the global batch's gradients
    with trainer.autocast():
        out = model(x, noise=noise)
        loss, logs = loss_fn.autoencoder_loss(x, out, step=step, reduce=reduce,
                                              last_layer=state.model.last_layer)
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


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = plan_folder() if args.plan is not None else Path(args.out)  # a plan writes elsewhere
    ckpt_path = out / "autoencoder.pt"
    lock = RunLock.for_rank_zero(out)  # one run per output folder
    preset = {**PRESETS[args.preset], **(SMOKE if args.smoke else {})}
    ae_config, loss_config, config, ckpt = ae_setup.resolve_configs(args, ckpt_path, CONFIGS,
                                                                    preset)
    configs = (ae_config, loss_config, config)
    world, device = join(args.device, config.batch_size)  # one process unless torchrun started us
    if world.enabled and ae_config.regularizer == "vq":
        raise UsageError("a VQ autoencoder does not train under torchrun (its dead-code restarts "
                         "would differ between processes): train it as one process")
    seed_everything(config.seed)
    if ae_config.regularizer == "identity":
        return ae_setup.save_identity(ae_config, loss_config, config, args, ckpt_path, device)
    state = ae_setup.build_state(ae_config, loss_config, config, world, device, ckpt)
    ae_setup.check_memory(state, ae_config, config, world, device)
    train_set, held_out = ae_setup.make_datasets(config, args.data)
    config, loss_config = ae_setup.fit_to_data(state, config, loss_config, len(train_set), args)
    configs = (ae_config, loss_config, config)
    ae_setup.describe(state, config, train_set, held_out, device)

    optimizers = {state.opt_ae: config.lr, state.opt_disc: config.disc_lr or config.lr}
    trainer = Trainer(config, script="train_ae.py", argv=argv, out=out, ckpt_path=ckpt_path,
                      world=world, device=device, optimizers=optimizers, model=state.model,
                      ema=state.ema, replicas=(state.model, state.loss_fn.discriminator),
                      loss_key="loss_ae", resumed_step=state.start if ckpt is not None else None)
    batches = iter(ae_setup.make_loader(train_set, config, state.start, world, device,
                                        endless=args.plan is not None))
    grid_x = next(ae_setup.first_images(held_out, 8, 8)).to(device)
    save_grid = lambda step: save_reconstructions(state.eval_model, grid_x,  # noqa: E731
                                                  out / f"recon_{step:07d}.png")
    step = partial(train_step, state=state, model=trainer.distribute(state.model), batches=batches,
                   config=config, world=world, trainer=trainer)
    state.model.train()
    if args.plan is not None:  # real steps timed, stages printed; nothing written to --out
        return ae_setup.plan(state, config, train_set, held_out, device, step=step, grid=save_grid,
                             save=lambda k: save_ae(ckpt_path, k, state=state, configs=configs),
                             ckpt_path=ckpt_path, json_path=args.plan)
    trainer.run(step, start=state.start, sample=save_grid,
                save=lambda step: save_ae(ckpt_path, step, state=state, configs=configs))
    rng_after_training = rng_state()  # the evaluation below draws from its own generators
    trainer.close()
    if not world.is_main:  # rank 0 alone evaluates and writes the final checkpoint
        return {"step": config.steps, "rank": world.rank}

    trainer.sample_grid(save_grid, config.steps)
    metrics = final_metrics(state, train_set, held_out, config, device, trainer.seconds)
    save_ae(ckpt_path, config.steps, state=state, configs=configs, rng=rng_after_training,
            metrics=metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_metrics(metrics))
    lock.release()
    return metrics


if __name__ == "__main__":
    exit_process(run(main, sys.argv[1:]))  # under torchrun, ranks other than 0 leave at once
