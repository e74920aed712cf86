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
from pathlib import Path

import torch

from tinyldm.autoencoder import Autoencoder
from tinyldm.checkpoint import (
    ldm_payload,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tinyldm.cli import ArgumentParser, run
from tinyldm.conditioning import ConditionConfig
from tinyldm.data.latent_batches import LatentTrainingSet, task_spec
from tinyldm.data.order import Stream, seed_stream
from tinyldm.evaluation.curves import reference_for
from tinyldm.evaluation.ldm_score import QualityCurve, SampleGrid, evaluate_run, save_samples
from tinyldm.ldm import Denoiser, DiffusionConfig, ldm_loss
from tinyldm.memory import check_ldm_training
from tinyldm.schedule import NoiseSchedule
from tinyldm.tools.plan import plan_train_ldm
from tinyldm.training.build import make_condition_config, make_denoiser
from tinyldm.training.configs import resolve_ldm_configs, resumed_checkpoint
from tinyldm.training.distributed import World, exit_process, join
from tinyldm.training.first_stage import first_stage
from tinyldm.training.flags import add_config_args, default_preset
from tinyldm.training.health import describe_denoiser, describe_latents
from tinyldm.training.loop import EMA, seed_everything
from tinyldm.training.presets import LDM_PRESETS, LDM_SMOKE
from tinyldm.training.run_lock import RunLock
from tinyldm.training.trainer import (
    Checkpoints,
    Grids,
    QualityPoints,
    Trainer,
    TrainingConfig,
    fit_steps,
)
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


@dataclass
class LDMState:
    """What the LDM's training step reads and updates, and ldm.pt stores."""

    config: TrainLDMConfig
    diffusion: DiffusionConfig
    data: LatentTrainingSet  # the scaled latents of the training set, their conditions, the ae
    denoiser: Denoiser  # tau_theta and eps_theta, trained together
    ema: EMA
    opt: torch.optim.Optimizer
    schedule: NoiseSchedule
    start: int = 0  # the first step to train: 0, or the checkpoint's step when resuming
    step_model: torch.nn.Module | None = None  # what the step calls: the denoiser, or in DDP


def train_step(step: int, *, state: LDMState, trainer: Trainer) -> dict:
    """One step of Eq. 3, L_LDM = E ||eps - eps_theta(z_t, t, tau_theta(y))||^2, with AdamW.
    Every draw is seeded by the step and made for the global batch (each process takes its share):
    --resume and N processes train exactly like one."""
    config, schedule, world = state.config, state.schedule, trainer.world
    B, device = config.batch_size, state.data.latents.device
    g = torch.Generator(device).manual_seed(seed_stream(config.seed, step, Stream.NOISE))
    z0, condition, concat = state.data.batch(step, g)  # this process's share: latents, conditions
    t = world.shard(torch.randint(0, schedule.T, (B,), generator=g, device=device))  # t ~ U{0..T-1}
    eps = world.shard(torch.randn((B, *z0.shape[1:]), generator=g, device=device))  # eps ~ N(0, I)
    g_cpu = torch.Generator().manual_seed(seed_stream(config.seed, step, Stream.DROP))
    drop = world.shard(torch.rand(B, generator=g_cpu) < state.diffusion.p_uncond)  # for CFG
    if condition is not None:
        condition = state.denoiser.cond.drop(condition, drop)  # the null condition where dropped
    with trainer.autocast():
        loss = ldm_loss(state.step_model, schedule, z0, t, eps, condition, state.diffusion,
                        concat=concat)  # Eq. 3
    state.opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the processes' gradients are averaged here
    grad_norm = torch.nn.utils.clip_grad_norm_(state.denoiser.parameters(), config.grad_clip)
    state.opt.step()
    return {"loss": loss.detach(), "grad_norm": grad_norm}


def save_ldm(path: Path, step: int, *, state: LDMState, ae_path: Path) -> None:
    """ldm.pt: the self-contained model (`ldm_payload`) and what --resume needs to continue,
    pinned to its autoencoder file by digest."""
    data, ema = state.data, state.ema
    payload = ldm_payload(state.denoiser, ema.model, data.ae, state.diffusion,
                          state.config.image_size)
    payload.update(train_config=asdict(state.config), step=step,
                   optimizer=state.opt.state_dict(), rng=rng_state(), ema_state=ema.state_dict(),
                   ae_path=str(ae_path), ae_digest=data.ae_digest, class_names=data.class_names,
                   processes=World.current().size)
    save_checkpoint(path, payload, kind="ldm")


def stage_two(config: TrainLDMConfig, unet_fields: dict, diffusion: DiffusionConfig,
              data: LatentTrainingSet, stored: dict | None, device: torch.device) -> LDMState:
    """tau_theta and eps_theta (trained together), their EMA, the schedule and AdamW; restored
    from `stored` when resuming. Seeded again: the initial weights do not depend on stage one."""
    seed_everything(config.seed)
    cond_config = ConditionConfig(**stored["cond_config"]) if stored else \
        make_condition_config(config, unet_fields, data.conditions, data.class_names)
    denoiser = make_denoiser(config, unet_fields, cond_config, task_spec(config),
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
    world = World.current()  # before the first step: a batch that cannot fit is refused
    check_ldm_training(denoiser, data, config.batch_size // world.size, device)
    describe_denoiser(denoiser, config, device, world)
    if config.compile:  # in place: the state_dict keys stay the same
        denoiser.unet.compile()
    schedule = diffusion.make_schedule().to(device)
    return LDMState(config, diffusion, data, denoiser, ema, opt, schedule,
                    start=stored["step"] if stored else 0)


def main(argv: list[str] | None = None) -> dict:
    argv, t_start = list(sys.argv[1:] if argv is None else argv), time.perf_counter()
    args = parse_args(argv)
    if args.plan is not None:  # what the run will do, timed on real steps; nothing written
        return plan_train_ldm(args, sys.modules[__name__])
    out = Path(args.out or f"runs/ldm-{args.preset}{'-smoke' if args.smoke else ''}")
    ckpt_path = out / "ldm.pt"
    lock = RunLock.for_rank_zero(out)  # one run per output folder
    stored = resumed_checkpoint(args, out)  # None for a new run; refused on another autoencoder
    preset = {**PRESETS[args.preset], **(SMOKE if args.smoke else {})}
    config, unet_fields, diffusion = resolve_ldm_configs(args, stored, TrainLDMConfig, preset)
    world, device = join(args.device, config.batch_size)  # one process unless torchrun started us

    # Stage one, frozen: the autoencoder, and the scaled latents of the training set (cached once).
    ae_path = Path(stored["ae_path"]) if stored else first_stage(
        args, config, out, argv, script_dir=Path(__file__).resolve().parent)
    ae_ckpt = load_checkpoint(ae_path, kind="autoencoder")
    ae = Autoencoder.from_checkpoint(ae_ckpt).to(device).requires_grad_(False)
    data = world.rank_zero_first(lambda: LatentTrainingSet.build(
        ae, ae_path, config, args.data, out, device, rank=world.rank, size=world.size))
    config = fit_steps(config, len(data.latents), explicit="steps" in vars(args))  # photo presets
    describe_latents(data, ae, ae_ckpt, ae_path, config)  # and health lines

    # Stage two: the denoiser and its training loop.
    state = stage_two(config, unet_fields, diffusion, data, stored, device)
    trainer = Trainer(config, state.denoiser, state.ema, {state.opt: config.lr}, out)
    trainer.diverge = 10.0  # a loss 10x its best and above its first: stop
    trainer.reference = reference_for(args.preset, config)  # drawn behind loss.png
    state.step_model = trainer.distribute(state.denoiser, find_unused=True)
    save = lambda step: save_ldm(ckpt_path, step, state=state, ae_path=ae_path)  # noqa: E731
    grid = SampleGrid.for_run(config, data.class_names, args.data, tuple(data.latents.shape[-2:]),
                              device, ae, state.denoiser.cond.cfg.max_len)
    grids = Grids(lambda step: save_samples(out, step, state, grid), config.sample_every)
    curve = QualityPoints(QualityCurve((state.ema.model, state.schedule, ae, diffusion), config,
                                       args.data, device, out), config.curve_every)
    for callback in (Checkpoints(ckpt_path, save, "train_ldm.py", argv), grids, curve):
        trainer.add_callback(callback)
    done = trainer.run(lambda step: train_step(step, state=state, trainer=trainer),
                       start=state.start)
    if done > state.start and world.is_main:
        save(done)
    trainer.close()
    if not world.is_main:  # rank 0 alone draws, evaluates and reports
        return {"steps": done, "rank": world.rank}

    result = {"steps": done, "wall_seconds": time.perf_counter() - t_start,
              "train_loop_seconds": trainer.seconds, "checkpoint": str(ckpt_path)}
    result = finish(trainer, state, (grids, curve), args.data, result)
    print(f"done in {time.perf_counter() - t_start:.0f} s; checkpoint {ckpt_path}")
    lock.release()
    return result


def finish(trainer: Trainer, state: LDMState, callbacks: tuple[Grids, QualityPoints],
           data_root: str | None, result: dict) -> dict:
    """The final grid, the quality curve's last point and the measurement, with the EMA weights;
    eval.json."""
    grids, curve = callbacks
    result["samples"] = str(grids.now(trainer))
    print(f"samples: {result['samples']}")
    if curve.every and trainer.step > trainer.start:
        curve.now(trainer)  # the curve's last point
    result.update(evaluate_run(state.ema.model, state.schedule, state.data.ae, state.config,
                               state.diffusion, tuple(state.data.latents.shape[-2:]),
                               trainer.device, data_root, Path(result["checkpoint"])))
    (trainer.out / "eval.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    exit_process(run(main, sys.argv[1:]))  # under torchrun, ranks other than 0 leave at once
