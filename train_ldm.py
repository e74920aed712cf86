"""Train the second stage: a diffusion model in the latent space of a frozen autoencoder
(LDM, arXiv 2112.10752, Secs. 3.2-3.3).

    python train_ldm.py --preset shapes           # the CPU demo: autoencoder, LDM, samples, score
    python train_ldm.py --preset shapes --ae runs/ae-shapes/autoencoder.pt --out runs/ldm-shapes
    python train_ldm.py --preset celeba64 --data CELEBA --ae runs/ae-celeba64_vq/autoencoder.pt
    python train_ldm.py --out runs/ldm-shapes --resume        # continue exactly where it stopped
    python train_ldm.py --preset shapes --smoke --out /tmp/ldm-smoke   # seconds; what CI runs
    torchrun --nproc_per_node=4 train_ldm.py --preset shapes64 --ae AE.pt  # --batch_size is global

Every field of TrainLDMConfig, UNetConfig and DiffusionConfig is a flag (--steps 500, --channels 64,
--prediction v, --cond class). Without --ae, train_ae.py first trains the preset's autoencoder into
<out>/ae. The paper's other tasks (Secs. 4.3-4.5): --cond class | layout and --task semantic |
superres | inpaint (presets shapes_class, shapes_layout, shapes_semantic, shapes_sr and
shapes_inpaint).

Writes into --out: ldm.pt (self-contained: UNet, EMA, condition encoder, schedule, autoencoder,
configs), latents.pt (the latent cache), log.jsonl, loss.png, samples_XXXXXXX.png (EMA weights) and
eval.json (the final score).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from tinyldm.autoencoder import Autoencoder
from tinyldm.cli import ArgumentParser, run
from tinyldm.conditioning import ConditionConfig
from tinyldm.data.latent_batches import LatentTrainingSet, task_spec
from tinyldm.evaluation.curves import reference_for
from tinyldm.evaluation.ldm_score import QualityCurve, SampleGrid, evaluate_run, save_samples
from tinyldm.ldm import Denoiser, DiffusionConfig, ldm_loss, ldm_payload
from tinyldm.training import ldm_setup
from tinyldm.training.checkpoint import RunLock, load_checkpoint, save_checkpoint
from tinyldm.training.distributed import exit_process, join
from tinyldm.training.flags import add_config_args, default_preset
from tinyldm.training.loop import EMA, rng_state, seed_everything, seed_stream, set_rng_state
from tinyldm.training.plan import plan_folder
from tinyldm.training.presets import LDM_PRESETS, LDM_SMOKE
from tinyldm.training.trainer import Trainer, TrainingConfig, fit_steps
from tinyldm.unet import UNetConfig


@dataclass
class TrainLDMConfig(TrainingConfig):
    dataset: str = "shapes"  # "shapes", "folder", "celeba" or "lsun" (the last three read --data)
    image_size: int = 32
    n_train: int = 20_000  # shapes: size of the training split; others: a cap (0 = all images)
    hflip: bool = False  # folder / celeba / lsun only; both orientations are cached
    ae_preset: str = "shapes"  # what train_ae.py trains when --ae is not given
    ae_steps: int = 0  # its training steps (0: the ae_preset's own)
    cond: str = "text"  # cross-attended: text, class, layout (shapes' boxes), none or auto
    task: str = "generate"  # concatenated to z_t: generate (nothing), semantic, superres or inpaint
    max_shapes: int = 1  # shapes: objects per image (1..9); layouts and semantic maps want several
    sr_factor: int = 4  # superres: how much smaller the low-resolution input is
    max_tokens: int = 16  # text: <bos> + words + <eos>
    text_layers: int = 2
    text_head_dim: int = 32
    batch_size: int = 64
    steps: int = 6000
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    amp: bool = True  # bf16 autocast, CUDA only
    compile: bool = False  # torch.compile the UNet
    channels_last: bool = True  # CUDA only: the UNet's convolutions in NHWC layout (fast with bf16)
    eval_images: int = 162  # scored at the end (0: skip); see tinyldm.evaluation.ldm_score
    feature_steps: int = 600  # other data: training steps of the evaluator's feature network
    eval_steps: int = 50
    eval_cfg: float = 3.0  # classifier-free guidance scale for the grids and the evaluation
    curve_every: int = 0  # a quality-curve point (log.jsonl, loss.png) every N steps; 0: none
    curve_images: int = 32  # its fixed held-out set
    posterior: str = "sample"  # KL: z ~ q(z|x), a fresh draw each step (App. G), or the posterior
    #                            "mean". VQ: the pre-quantization latent either way.


PRESETS, SMOKE = LDM_PRESETS, LDM_SMOKE  # dicts of field -> value (tinyldm/training/presets.py)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="default: folder when --data is given, else shapes")
    p.add_argument("--smoke", action="store_true", help="shrink it all to a seconds-long CPU run")
    p.add_argument("--out", default=None, help="output folder (default runs/ldm-<preset>)")
    p.add_argument("--ae", default=None, help="train_ae.py's autoencoder.pt (default: train one)")
    p.add_argument("--data", default=None, help="dataset folder (folder / celeba / lsun)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda:1, mps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ldm.pt")
    p.add_argument("--plan", nargs="?", const="", default=None, metavar="JSON",
                   help="print what the run will do (times from real steps) and exit")
    add_config_args(p, TrainLDMConfig, UNetConfig, DiffusionConfig)
    return default_preset(p.parse_args(argv))


def train_step(step: int, *, model: torch.nn.Module, denoiser: Denoiser, opt: torch.optim.Optimizer,
               schedule, data: LatentTrainingSet, diffusion: DiffusionConfig,
               config: TrainLDMConfig, trainer: Trainer) -> dict:
    """One step of Eq. 3, L_LDM = E ||eps - eps_theta(z_t, t, tau_theta(y))||^2, with AdamW.
    `model` is the denoiser, or under torchrun the denoiser in DDP. Every draw is seeded by the step
    and made for the global batch (each process takes its share): --resume and N processes train
    exactly like one."""
    B, device, world = config.batch_size, data.latents.device, trainer.world
    g = torch.Generator(device).manual_seed(seed_stream(config.seed, step, 1))
    z0, condition, concat = data.batch(step, g)  # this process's share: scaled latents, conditions
    t = world.shard(torch.randint(0, schedule.T, (B,), generator=g, device=device))  # t ~ U{0..T-1}
    eps = world.shard(torch.randn((B, *z0.shape[1:]), generator=g, device=device))  # eps ~ N(0, I)
    g_cpu = torch.Generator().manual_seed(seed_stream(config.seed, step, 2))
    drop = world.shard(torch.rand(B, generator=g_cpu) < diffusion.p_uncond)  # for guidance (CFG)
    if condition is not None:
        condition = denoiser.cond.drop(condition, drop)  # the null condition where dropped
    with trainer.autocast():
        loss = ldm_loss(model, schedule, z0, t, eps, condition, diffusion, concat=concat)  # Eq. 3
    opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the processes' gradients are averaged here
    grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip)
    opt.step()
    return {"loss": loss.detach(), "grad_norm": grad_norm}


def save_ldm(path: Path, step: int, *, denoiser: Denoiser, ema: EMA, opt: torch.optim.Optimizer,
             ae: Autoencoder, ae_path: Path, ae_digest: str, diffusion: DiffusionConfig,
             config: TrainLDMConfig, class_names: list[str], processes: int) -> None:
    """ldm.pt: the self-contained model (`ldm_payload`) and what --resume needs to continue,
    pinned to its autoencoder file by digest."""
    payload = ldm_payload(denoiser, ema.model, ae, diffusion, config.image_size)
    payload.update(train_config=asdict(config), step=step, optimizer=opt.state_dict(),
                   rng=rng_state(), ema_state=ema.state_dict(), ae_path=str(ae_path),
                   ae_digest=ae_digest, class_names=class_names, processes=processes)
    save_checkpoint(path, payload, kind="ldm")


def stage_two(config: TrainLDMConfig, unet_fields: dict, diffusion: DiffusionConfig,
              data: LatentTrainingSet, stored: dict | None, device: torch.device):
    """tau_theta and eps_theta (trained together), their EMA, the schedule and AdamW; restored
    from `stored` when resuming. Seeded again: the initial weights do not depend on stage one."""
    seed_everything(config.seed)
    cond_config = ConditionConfig(**stored["cond_config"]) if stored else \
        ldm_setup.make_condition_config(config, unet_fields, data.conditions, data.class_names)
    denoiser = ldm_setup.make_denoiser(config, unet_fields, cond_config, task_spec(config),
                                       tuple(data.latents.shape[1:]), device)
    ema = EMA(denoiser, decay=config.ema_decay)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            fused=device.type == "cuda")
    if stored:  # weights, EMA, optimizer and random state: --resume continues exactly
        denoiser.load_state_dict(stored["denoiser"])
        ema.load_state_dict(stored["ema_state"])
        opt.load_state_dict(stored["optimizer"])
        set_rng_state(stored["rng"])
        print(f"resumed at step {stored['step']}")
    return denoiser, ema, diffusion.make_schedule().to(device), opt


def main(argv: list[str] | None = None) -> dict:
    argv, t_start = list(sys.argv[1:] if argv is None else argv), time.perf_counter()
    args = parse_args(argv)
    out = Path(args.out or f"runs/ldm-{args.preset}{'-smoke' if args.smoke else ''}")
    out = plan_folder() if args.plan is not None else out  # a plan writes elsewhere
    ckpt_path = out / "ldm.pt"
    lock = RunLock.for_rank_zero(out)  # one run per output folder
    stored = load_checkpoint(ckpt_path, kind="ldm") if args.resume and ckpt_path.exists() else None
    ldm_setup.check_resumable(args, out, stored)
    preset = {**PRESETS[args.preset], **(SMOKE if args.smoke else {})}
    config, unet_fields, diffusion = ldm_setup.resolve_configs(args, stored, TrainLDMConfig, preset)
    world, device = join(args.device, config.batch_size)  # one process unless torchrun started us

    # Stage one, frozen: the autoencoder, and the scaled latents of the training set (cached once).
    ldm_setup.check_pinned_autoencoder(args, out, stored)
    ae_path = Path(stored["ae_path"]) if stored else ldm_setup.first_stage(
        args, config, out, world, argv, script_dir=Path(__file__).resolve().parent)
    ae_ckpt = load_checkpoint(ae_path, kind="autoencoder")
    ae = Autoencoder.from_checkpoint(ae_ckpt).to(device)
    ae.requires_grad_(False)
    if args.plan is not None:  # the cache of a few batches, timed
        data, cache = ldm_setup.plan_latents(ae, ae_path, config, args.data, out, world, device)
    else:
        data = ldm_setup.rank_zero_first(world, lambda: LatentTrainingSet.build(
            ae, ae_path, config, args.data, out, world, device))
    images = cache.images if args.plan is not None else len(data.latents)
    config = fit_steps(config, images, explicit="steps" in vars(args))  # photo presets: epochs
    ldm_setup.describe_latents(data, ae, ae_ckpt, ae_path, config)  # and health lines

    # Stage two: the denoiser and its training loop.
    denoiser, ema, schedule, opt = stage_two(config, unet_fields, diffusion, data, stored, device)
    ldm_setup.check_memory(denoiser, data, config.batch_size // world.size, device)
    ldm_setup.describe_denoiser(denoiser, config, device, world)
    start = stored["step"] if stored else 0
    curve = QualityCurve((ema.model, schedule, ae, diffusion), config, args.data, device, out)
    trainer = Trainer(config, script="train_ldm.py", argv=argv, out=out, ckpt_path=ckpt_path,
                      world=world, device=device, optimizers={opt: config.lr}, model=denoiser,
                      ema=ema, replicas=(denoiser,), resumed_step=start if stored else None,
                      diverge=10.0,  # a loss 10x its best and above its first: stop
                      curve=curve, curve_every=config.curve_every,
                      reference=reference_for(args.preset, config))  # drawn behind loss.png
    model = trainer.distribute(ldm_setup.compiled(denoiser, config), find_unused=True)
    save = partial(save_ldm, ckpt_path, denoiser=denoiser, ema=ema, opt=opt, ae=ae, ae_path=ae_path,
                   ae_digest=data.ae_digest, diffusion=diffusion, config=config,
                   class_names=data.class_names, processes=world.size)
    latent_hw = tuple(data.latents.shape[-2:])
    grid = SampleGrid.for_run(config, data.class_names, args.data, latent_hw, device, ae,
                              denoiser.cond.cfg.max_len)
    save_grid = partial(save_samples, out, model=ema.model, schedule=schedule, ae=ae, grid=grid,
                        diffusion=diffusion, config=config, raw=denoiser, ema=ema)
    step = partial(train_step, model=model, denoiser=denoiser, opt=opt, schedule=schedule,
                   data=data, diffusion=diffusion, config=config, trainer=trainer)
    if args.plan is not None:  # real steps timed, stages printed; nothing written to --out
        return ldm_setup.plan(step=step, ema=ema, save=save, ckpt_path=ckpt_path, grid=save_grid,
                              grid_images=grid.n, denoiser=denoiser, cache=cache, data=data,
                              config=config, start=start, device=device, out=out,
                              data_root=args.data, json_path=args.plan)
    done = trainer.run(step, start=start, save=save, sample=save_grid)
    if done > start and world.is_main:
        save(done)
    trainer.close()
    if not world.is_main:  # rank 0 alone draws, evaluates and reports
        return {"steps": done, "rank": world.rank}

    # The final grid and measurement, with the EMA weights.
    result = {"steps": done, "wall_seconds": time.perf_counter() - t_start,
              "train_loop_seconds": trainer.seconds, "checkpoint": str(ckpt_path),
              "samples": str(trainer.sample_grid(save_grid, done))}
    print(f"samples: {result['samples']}")
    if config.curve_every and done > start:
        trainer.curve_point(done)  # the curve's last point
    result.update(evaluate_run(ema.model, schedule, ae, config, diffusion, latent_hw, device,
                               args.data, ckpt_path))
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"done in {time.perf_counter() - t_start:.0f} s; checkpoint {ckpt_path}")
    lock.release()
    return result


if __name__ == "__main__":
    exit_process(run(main, sys.argv[1:]))  # under torchrun, ranks other than 0 leave at once
