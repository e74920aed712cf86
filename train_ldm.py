"""Train the second stage: a (conditional) diffusion model in the latent space of a frozen autoencoder.

    python train_ldm.py --preset shapes                      # the CPU demo: autoencoder, LDM, samples, score
    python train_ldm.py --preset shapes --ae runs/ae-shapes/ae.pt --out runs/ldm-shapes
    python train_ldm.py --preset celeba64 --data /path/to/celeba --ae runs/ae-celeba64/ae.pt
    python train_ldm.py --out runs/ldm-shapes --resume       # continue exactly where it stopped
    python train_ldm.py --preset shapes --smoke --out /tmp/ldm-smoke    # seconds; what CI runs
    torchrun --nproc_per_node=4 train_ldm.py --preset shapes64          # data parallel; --batch_size is global

Every field of TrainLDMConfig, UNetConfig and DiffusionConfig is a flag (`--steps 500`, `--channels 64`,
`--prediction v`, `--cond class`). Without --ae, the preset's autoencoder is trained first with
train_ae.py into <out>/ae (that is what makes the shapes preset a one-command demo).

The paper's other tasks (Secs. 4.3-4.4) on shapes: `--cond class` and `--cond layout` (boxes + classes as
cross-attended tokens), `--task semantic` (the segmentation map concatenated to z_t) and `--task superres`
(the image bicubic-downsampled by --sr_factor, concatenated), `--task inpaint` (the masked image's latent
and the mask, concatenated; a fresh mask of boxes and strokes every step); presets shapes_class,
shapes_layout, shapes_semantic, shapes_sr, shapes_inpaint. Each ends with its own score on held-out inputs (eval.json).

Writes into --out: ldm.pt (a self-contained checkpoint: UNet, EMA, condition encoder, schedule,
autoencoder, configs), latents.pt (the latent cache, keyed by the autoencoder file and data settings),
log.jsonl, samples_XXXXXXX.png (fixed prompts or held-out inputs, EMA weights) and eval.json: for the
shapes dataset the prompt faithfulness measured by the shapes evaluator, or the task's own score.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tinyldm.autoencoder import Autoencoder
from tinyldm.conditioning import ConditionConfig, ConditionEncoder, Tokenizer
from tinyldm.data.image_conditions import random_mask
from tinyldm.data.images import make_dataset
from tinyldm.data.latents import file_digest, latent_cache
from tinyldm.data.shapes import CLASS_NAMES, ShapeSpec, all_prompts, score_images
from tinyldm.data.tasks import (
    CONDS,
    TASKS,
    TaskInputs,
    TaskSpec,
    cache_keys,
    concat_channels,
    data_configs,
    generate_from_items,
    heldout_items,
    inpaint_concat,
    item_conditions,
    scorable,
    score_items,
    task_concat,
)
from tinyldm.evaluation.viz import save_image_grid
from tinyldm.ldm import Denoiser, DiffusionConfig, generate, ldm_loss, ldm_payload
from tinyldm.training.checkpoint import load_checkpoint, save_checkpoint
from tinyldm.training.distributed import leave, replica_spread
from tinyldm.training.distributed import setup as setup_distributed
from tinyldm.training.distributed import teardown as teardown_distributed
from tinyldm.training.flags import add_config_args, build_config
from tinyldm.training.loop import (
    EMA,
    JSONLLogger,
    batch_indices,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from tinyldm.unet import UNet, UNetConfig


@dataclass
class TrainLDMConfig:
    dataset: str = "shapes"  # "shapes", "folder", "celeba" or "lsun" (the last three read --data)
    image_size: int = 32
    n_train: int = 20_000  # shapes: size of the training split; others: a cap (0 = all images)
    hflip: bool = False  # folder / celeba / lsun only; both orientations are cached
    ae_preset: str = "shapes"  # what train_ae.py trains when --ae is not given
    ae_steps: int = 0  # its training steps when --ae is not given (0: the ae_preset's own)
    cond: str = "text"  # cross-attended: "text", "class", "layout" (shapes: boxes + classes) or "none"
    task: str = "generate"  # concatenated: "generate" (nothing), "semantic" (shapes' map), "superres" (low-res x4),
    #                         "inpaint" (the masked image's latent + the mask; a fresh random mask every step)
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
    channels_last: bool = True  # CUDA only: the UNet's convolutions in NHWC layout (faster with bf16)
    max_minutes: float = 0.0  # > 0: stop after this much training-loop time (a wall-clock budget), checkpointed
    check_replicas: bool = False  # under torchrun: compare the processes' weights after every step (logged)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 500
    eval_images: int = 162  # shapes: images scored for prompt faithfulness at the end (0: skip)
    eval_steps: int = 50
    eval_cfg: float = 3.0  # classifier-free guidance scale for the grids and the evaluation


# CPU-sized: 32 px images, f = 4 autoencoder -> 8 x 8 x 4 latents.
# Sized so that the whole demo (autoencoder, LDM, evaluation) fits in 10 minutes on 2 CPU cores.
# The autoencoder gets 600 steps instead of its preset's 800 (~35 dB instead of 36; plenty for the LDM).
_SHAPES_DEMO = dict(ae_steps=600, n_train=10_000, batch_size=32, steps=1400, lr=1e-3, channels=64, channel_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=(8, 4), head_dim=32, context_dim=128)
# The concat-conditioned tasks have no cross-attention to a condition: self-attention at 4 x 4 only, no guidance.
_SHAPES_CONCAT = {**_SHAPES_DEMO, "cond": "none", "attn_resolutions": (4,), "max_shapes": 3, "eval_cfg": 1.0}

PRESETS: dict[str, dict] = {
    "shapes": _SHAPES_DEMO,
    # The paper's other tasks on shapes (Sec. 4.3-4.5), same model size as the demo; up to 3 objects per image.
    "shapes_class": {**_SHAPES_DEMO, "cond": "class"},
    "shapes_layout": {**_SHAPES_DEMO, "cond": "layout", "max_shapes": 3},
    "shapes_semantic": {**_SHAPES_CONCAT, "task": "semantic"},
    "shapes_sr": {**_SHAPES_CONCAT, "task": "superres"},
    "shapes_inpaint": {**_SHAPES_CONCAT, "task": "inpaint"},
    # GPU-sized: 64 px images -> 16 x 16 x 4 latents; the "tiny text-to-image" UNet of DESIGN.md.
    "shapes64": dict(image_size=64, ae_preset="shapes64", n_train=50_000, batch_size=256, steps=8000, lr=4e-4,
                     channels=128, channel_mult=(1, 2, 2), attn_resolutions=(16, 8), context_dim=256),
    "celeba64": dict(dataset="celeba", image_size=64, ae_preset="celeba64", cond="none", n_train=0, hflip=True,
                     batch_size=128, steps=100_000, lr=2e-4, channels=128, channel_mult=(1, 2, 3, 4),
                     attn_resolutions=(8, 4), context_dim=None, eval_images=0),
    "celeba128": dict(dataset="celeba", image_size=128, ae_preset="celeba128_f8", cond="none", n_train=0,
                      hflip=True, batch_size=96, steps=150_000, lr=2e-4, channels=192, channel_mult=(1, 2, 3, 4),
                      attn_resolutions=(8, 4), context_dim=None, eval_images=0),
    "lsun64": dict(dataset="lsun", image_size=64, ae_preset="lsun64", cond="none", n_train=0, hflip=True,
                   batch_size=128, steps=100_000, lr=2e-4, channels=128, channel_mult=(1, 2, 3, 4),
                   attn_resolutions=(8, 4), context_dim=None, eval_images=0),
}
# image_size=32 gives 8 x 8 latents, so the smoke UNet's levels (8, 4) exist for every preset (celeba64 too).
SMOKE = dict(image_size=32, n_train=64, steps=6, batch_size=8, warmup_steps=2, channels=32, channel_mult=(1, 2),
             attn_resolutions=(4,), context_dim=32, text_layers=1, log_every=2, sample_every=4, ckpt_every=3,
             eval_images=4, eval_steps=3, ae_preset="shapes")
FIXED_PROMPTS = [  # the sample grids' prompts, in the shapes dataset's phrasings
    "a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right",
    "top right: a yellow circle", "a purple square in the middle left", "an orange triangle at the top center",
    "a blue circle in the bottom left", "a red triangle in the center",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes", choices=sorted(PRESETS))
    p.add_argument("--smoke", action="store_true", help="shrink everything to a seconds-long CPU run")
    p.add_argument("--out", default=None, help="output folder (default runs/ldm-<preset>)")
    p.add_argument("--ae", default=None, help="autoencoder checkpoint from train_ae.py (default: train one)")
    p.add_argument("--data", default=None, help="dataset folder (folder / celeba / lsun)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ldm.pt")
    add_config_args(p, TrainLDMConfig, UNetConfig, DiffusionConfig)
    return p.parse_args(argv)


def resolve_configs(args: argparse.Namespace, stored: dict | None) -> tuple[TrainLDMConfig, dict, DiffusionConfig]:
    """Preset (+ smoke) < checkpoint < command line. Returns the train config, the UNet fields the user
    chose (the latent shape and context width are filled in from the autoencoder and condition later)."""
    base = {**PRESETS[args.preset], **(SMOKE if args.smoke else {})}
    layers = [base] + ([stored] if stored else []) + [vars(args)]
    train = build_config(TrainLDMConfig, *layers)
    if train.cond not in CONDS:
        raise SystemExit(f"--cond must be one of {', '.join(CONDS)}, got {train.cond!r}")
    if train.task not in TASKS:
        raise SystemExit(f"--task must be one of {', '.join(TASKS)}, got {train.task!r}")
    if (train.cond == "layout" or train.task == "semantic") and train.dataset != "shapes":
        raise SystemExit(f"--cond {train.cond} / --task {train.task} need boxes or maps: only the shapes dataset has "
                         "them here")
    unet_fields = {f: v for layer in layers for f, v in layer.items() if f in UNetConfig.__dataclass_fields__}
    for derived in ("in_channels", "out_channels", "latent_size"):
        if derived in vars(args):
            raise SystemExit(f"--{derived} is set from the autoencoder; do not pass it")
    return train, unet_fields, build_config(DiffusionConfig, *layers)


def get_autoencoder(args: argparse.Namespace, train: TrainLDMConfig, out: Path) -> Path:
    """The autoencoder checkpoint to use: --ae, the one trained for this run before, or a fresh one."""
    if args.ae:
        return Path(args.ae)
    path = out / "ae" / "autoencoder.pt"
    if not path.exists():
        import train_ae

        cmd = ["--preset", train.ae_preset, "--out", str(out / "ae"), "--device", args.device]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--steps", str(train.ae_steps)] if train.ae_steps and not args.smoke else []
        print(f"no --ae given: training the autoencoder first (python train_ae.py {' '.join(cmd)})")
        train_ae.main(cmd, single_process=True)  # under torchrun only rank 0 gets here; the others wait
    return path


def task_spec(train: TrainLDMConfig) -> TaskSpec:
    return TaskSpec(task=train.task, cond=train.cond, sr_factor=train.sr_factor)


def load_latents(ae: Autoencoder, ae_path: Path, train: TrainLDMConfig, data_root: str | None, out: Path,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, dict, list[str]]:
    """Encode the training set once (cached in <out>/latents.pt) -> unscaled latents (N, c, h, w), their
    flipped twins (or None), the conditions, and the class names."""
    data, shapes = data_configs(asdict(train), data_root)
    spec = task_spec(train)
    dataset = TaskInputs.wrap(make_dataset(data, "train", shapes=shapes), spec)
    keep = cache_keys(spec)
    key = {"autoencoder": file_digest(ae_path), "data": asdict(data), "shapes": asdict(shapes) if shapes else None,
           "sr_factor": train.sr_factor if train.task == "superres" else None}
    cached = latent_cache(dataset, lambda x: ae.encode(x.to(device)), path=out / "latents.pt", key=key,
                          flip=train.hflip, device=device, keep=keep)
    return cached.latents, cached.flipped, cached.conditions, list(getattr(dataset, "class_names", []))


def make_condition_config(train: TrainLDMConfig, unet_fields: dict, conditions: dict,
                          class_names: list[str]) -> ConditionConfig:
    width = unet_fields.get("context_dim") or 128
    if train.cond == "text":
        captions = conditions["caption"]
        if not any(captions):
            raise SystemExit("--cond text needs captions, and this dataset has none (use --cond class or none)")
        tokenizer = Tokenizer.from_texts(list(captions))
        unknown = sorted({w for p in FIXED_PROMPTS for w in tokenizer.unknown_words(p)})
        if unknown:
            print(f"warning: words of the sample prompts never seen in training captions: {unknown}")
        vocab = tokenizer.vocab
        return ConditionConfig(kind="text", context_dim=width, vocab=vocab, max_len=train.max_tokens,
                               layers=train.text_layers, head_dim=train.text_head_dim)
    if train.cond == "class":
        num_classes = len(class_names) or int(conditions["class_id"].max()) + 1
        if int(conditions["class_id"].min()) < 0:
            raise SystemExit("--cond class needs class labels (class sub-folders, or a CelebA attribute)")
        return ConditionConfig(kind="class", context_dim=width, num_classes=num_classes)
    if train.cond == "layout":
        return ConditionConfig(kind="layout", context_dim=width, num_classes=len(CLASS_NAMES),
                               max_objects=train.max_shapes, layers=train.text_layers, head_dim=train.text_head_dim)
    return ConditionConfig(kind="none")


def sample_prompts(train: TrainLDMConfig, class_names: list[str], n: int = 8):
    if train.cond == "text":
        return FIXED_PROMPTS[:n]
    if train.cond == "class":
        return torch.arange(n) % max(len(class_names), 1)
    return None


def evaluate_task(denoiser: Denoiser, schedule, ae: Autoencoder, train: TrainLDMConfig, diffusion: DiffusionConfig,
                  latent_hw: tuple[int, int], device: torch.device, data_root: str | None) -> dict:
    """The number that says how well the task worked, on `eval_images` held-out items (see
    `task_inputs.score_items`); class: colour and shape accuracy of images generated for each class in turn."""
    n = train.eval_images
    g = torch.Generator(device).manual_seed(1234)
    kw = dict(prediction=diffusion.prediction, steps=train.eval_steps, guidance_scale=train.eval_cfg, generator=g)
    start = time.perf_counter()
    result = {"images": n, "ddim_steps": train.eval_steps, "guidance_scale": train.eval_cfg}
    if train.cond == "class" and train.task == "generate":
        ids = torch.arange(n) % len(CLASS_NAMES)
        images = torch.cat([generate(denoiser, schedule, ae, ids[i : i + 64].to(device), latent_size=latent_hw,
                                     **kw).cpu()
                            for i in range(0, n, 64)])
        wanted = [[ShapeSpec(*CLASS_NAMES[c].split(" "), None)] for c in ids.tolist()]
        score = score_images(images, wanted)
        result.update(class_accuracy=score.all, color=score.color, shape=score.shape)
    else:
        spec = task_spec(train)
        items = heldout_items(spec, *data_configs(asdict(train), data_root), n, allow_fewer=True)
        if len(items["image"]) < n:
            print(f"note: the held-out split has only {len(items['image'])} images; scoring those")
        n = result["images"] = len(items["image"])
        images = generate_from_items(denoiser, schedule, ae, spec, items, latent_hw, device, **kw)
        result.update(score_items(spec, items, images))
    result["seconds_per_image"] = (time.perf_counter() - start) / n
    return result


def evaluate_shapes(denoiser: Denoiser, schedule, ae: Autoencoder, train: TrainLDMConfig, diffusion: DiffusionConfig,
                    latent_hw: tuple[int, int], device: torch.device) -> dict:
    """Prompt faithfulness: images for `eval_images` prompts (cycling through all 162), scored exactly."""
    prompts = [all_prompts()[i % 162] for i in range(train.eval_images)]
    g = torch.Generator(device).manual_seed(1234)
    start, images = time.perf_counter(), []
    for i in range(0, len(prompts), 64):
        batch = prompts[i : i + 64] if train.cond == "text" else None
        images.append(generate(denoiser, schedule, ae, batch, n=len(prompts[i : i + 64]), latent_size=latent_hw,
                               prediction=diffusion.prediction, steps=train.eval_steps,
                               guidance_scale=train.eval_cfg, generator=g).cpu())
    seconds = time.perf_counter() - start
    score = score_images(torch.cat(images), prompts)
    return {"prompt_faithfulness": score.all, "color": score.color, "shape": score.shape,
            "position": score.position, "images": len(prompts), "ddim_steps": train.eval_steps,
            "guidance_scale": train.eval_cfg, "seconds_per_image": seconds / len(prompts)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or f"runs/ldm-{args.preset}{'-smoke' if args.smoke else ''}")
    ckpt_path = out / "ldm.pt"
    stored = load_checkpoint(ckpt_path, kind="ldm") if args.resume else None
    if stored:  # the run's own configuration; flags given now still override it (e.g. a larger --steps)
        stored_fields = {**stored["train_config"], **stored["unet_config"], **stored["diffusion_config"]}
    train, unet_fields, diffusion = resolve_configs(args, stored_fields if stored else None)
    world, device_name = setup_distributed(args.device)  # one process unless started by torchrun
    if train.batch_size % world.size:
        raise SystemExit(f"--batch_size {train.batch_size} (the global batch) must be divisible by the "
                         f"{world.size} processes")
    device = pick_device(device_name)
    seed_everything(train.seed)
    t_start = time.perf_counter()

    # Stage one, frozen: the autoencoder and the cached latents of the whole training set. With several
    # processes, rank 0 trains / encodes first and the others then read what it wrote.
    for turn in ("main", "others"):
        if world.is_main == (turn == "main"):
            ae_path = Path(stored["ae_path"]) if stored else get_autoencoder(args, train, out)
            ae = Autoencoder.from_checkpoint(load_checkpoint(ae_path, kind="autoencoder")).to(device)
            ae.requires_grad_(False)
            latents, flipped, conditions, class_names = load_latents(ae, ae_path, train, args.data, out, device)
        world.barrier()
    scale = float(ae.scale_factor)
    N, c, h, w = latents.shape
    print(f"latents: {N} x {c} x {h} x {w}, scale factor {scale:.4f} (from the autoencoder's data), "
          f"scaled std {float(latents.std()) * scale:.3f}")
    # The task's image-like input (N, C_c, h, w) for every training image; inpainting makes its own every step.
    spec = task_spec(train)
    concat_all = task_concat(spec, conditions, (h, w)) if train.task in ("semantic", "superres") else None

    # Stage two: UNet + condition encoder (trained jointly), EMA, AdamW with linear warm-up. Seeded again, so
    # the initial weights do not depend on what stage one drew (training an autoencoder, filling the cache).
    seed_everything(train.seed)
    cond_cfg = ConditionConfig(**stored["cond_config"]) if stored else make_condition_config(
        train, unet_fields, conditions, class_names)
    cond_encoder = ConditionEncoder(cond_cfg)
    unet_cfg = UNetConfig(**{**unet_fields, "in_channels": c, "out_channels": c, "latent_size": h,
                             "context_dim": cond_encoder.context_dim,
                             "concat_channels": concat_channels(spec, c)})
    denoiser = Denoiser(UNet(unet_cfg), cond_encoder).to(device)
    if train.channels_last and device.type == "cuda":
        denoiser.unet.to(memory_format=torch.channels_last)
    ema = EMA(denoiser, decay=train.ema_decay)
    schedule = diffusion.make_schedule().to(device)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                            fused=device.type == "cuda")
    lr_at = lambda step: train.lr * min(1.0, (step + 1) / max(train.warmup_steps, 1))  # noqa: E731
    start_step = 0
    if stored:
        denoiser.load_state_dict(stored["denoiser"])
        ema.load_state_dict(stored["ema_state"])
        opt.load_state_dict(stored["optimizer"])
        set_rng_state(stored["rng"])
        start_step = stored["step"]
        print(f"resumed from {ckpt_path} at step {start_step}")
    n_params, n_unet = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (denoiser, denoiser.unet))
    print(f"denoiser: {n_params:.2f} M parameters (UNet {n_unet:.2f} M), cond={train.cond}, task={train.task}, "
          f"device={device}" + (f", process {world.rank} of {world.size}" if world.enabled else ""))
    if train.compile:
        denoiser.unet.compile()  # in place: the state_dict keys (and so the checkpoints) stay the same
    # Data parallel: DDP averages the gradients of the processes' shares after every backward.
    model = DistributedDataParallel(denoiser, device_ids=[device.index] if device.type == "cuda" else None,
                                    find_unused_parameters=True) if world.enabled else denoiser
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.amp and device.type == "cuda")
    log = JSONLLogger(out / "log.jsonl", resume_step=start_step if stored else None) if world.is_main else None
    latents_dev = latents.to(device) * scale
    flipped_dev = flipped.to(device) * scale if flipped is not None else None
    concat_dev = concat_all.to(device) if concat_all is not None else None
    concat_flipped_dev = concat_dev.flip(-1) if concat_dev is not None and flipped_dev is not None else None
    pixels_dev = conditions["pixels"].to(device) if train.task == "inpaint" else None
    sample_cond, sample_concat, n_grid = sample_prompts(train, class_names), None, 8
    if train.cond == "layout" or train.task != "generate":  # the grids show the first 8 held-out inputs
        items = heldout_items(spec, *data_configs(asdict(train), args.data), 8, allow_fewer=True)
        sample_cond, sample_concat = item_conditions(spec, items, (h, w), device, ae)
        n_grid = len(items["image"])

    def checkpoint(step: int) -> None:
        if not world.is_main:
            return
        payload = ldm_payload(denoiser, ema.model, ae, diffusion, train.image_size)
        payload.update(train_config=asdict(train), step=step, optimizer=opt.state_dict(), rng=rng_state(),
                       ema_state=ema.state_dict(), ae_path=str(ae_path), class_names=class_names,
                       processes=world.size)
        save_checkpoint(ckpt_path, payload, kind="ldm")

    def draw(step: int) -> None:
        if not world.is_main:
            return
        g = torch.Generator(device).manual_seed(0)
        imgs = generate(ema.model, schedule, ae, sample_cond, n=n_grid, latent_size=(h, w),
                        prediction=diffusion.prediction, steps=train.eval_steps, guidance_scale=train.eval_cfg,
                        generator=g, concat=sample_concat)
        save_image_grid(imgs, out / f"samples_{step:07d}.png", nrow=n_grid)

    bar = tqdm(range(start_step, train.steps), initial=start_step, total=train.steps, desc="train_ldm",
               **({} if world.is_main else {"disable": True}))
    seen_since, steps_since, t_since, loss_sum = 0, 0, time.perf_counter(), 0.0
    t_loop, done = time.perf_counter(), start_step
    spread_max = 0.0
    for step in bar:
        denoiser.train()
        # The step's global batch and its random draws: functions of the step, the same in every process
        # (exact resume, with any number of processes); then this process's share of each.
        idx_all = batch_indices(step, n=N, batch_size=train.batch_size, seed=train.seed).to(device)
        g = torch.Generator(device).manual_seed(2**40 + train.seed * 1_000_003 + step)
        flip_all = torch.rand(len(idx_all), 1, 1, 1, generator=g, device=device) < 0.5
        t_all = torch.randint(0, schedule.T, (len(idx_all),), generator=g, device=device)
        eps_all = torch.randn((len(idx_all), c, h, w), generator=g, device=device)
        drop_all = torch.rand(len(idx_all), generator=torch.Generator().manual_seed(  # on the CPU: no sync
            2**41 + train.seed * 1_000_003 + step)) < diffusion.p_uncond
        idx, flip = world.shard(idx_all), world.shard(flip_all)
        z0 = latents_dev[idx]
        concat = concat_dev[idx] if concat_dev is not None else None
        if flipped_dev is not None:  # each image in either orientation (its task input flipped with it)
            z0 = torch.where(flip, flipped_dev[idx], z0)
            concat = torch.where(flip, concat_flipped_dev[idx], concat) if concat is not None else None
        if pixels_dev is not None:  # inpainting: this step's masks (a function of the step: exact resume)
            x = pixels_dev[idx].float() / 127.5 - 1
            x = torch.where(flip, x.flip(-1), x) if flipped_dev is not None else x
            masks = random_mask(len(idx_all), *x.shape[-2:], generator=torch.Generator().manual_seed(
                train.seed * 1_000_003 + step))
            concat = inpaint_concat(ae, x, world.shard(masks).to(device))
        condition = None
        if train.cond == "text":
            condition = [conditions["caption"][i] for i in idx.tolist()]
        elif train.cond == "class":
            condition = conditions["class_id"][idx.cpu()].to(device)
        elif train.cond == "layout":
            condition = {k: conditions[k][idx.cpu()].to(device) for k in ("box_classes", "boxes")}
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            loss = ldm_loss(model, schedule, z0, condition, diffusion, concat=concat, t=world.shard(t_all),
                            eps=world.shard(eps_all).to(z0.dtype), drop=world.shard(drop_all))
        loss_value = world.mean(loss.detach())  # one host sync per step: the NaN check needs it, the log too
        if not math.isfinite(loss_value):
            bar.close()
            raise SystemExit(f"loss is {loss_value} at step {step}: stopping. The last good checkpoint is "
                             f"{ckpt_path} (lower --lr, or check the latents' scale). Nothing was overwritten.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), train.grad_clip)
        opt.step()
        if world.is_main:  # only rank 0 samples and saves: the others need no EMA
            ema.update(denoiser)
        if train.check_replicas:
            spread_max = max(spread_max, replica_spread(denoiser, world))
        loss_sum += loss_value
        seen_since, steps_since = seen_since + len(idx_all), steps_since + 1
        done = step + 1
        if done % train.log_every == 0 or done == train.steps:
            dt = time.perf_counter() - t_since
            record = {"step": done, "loss": loss_sum / steps_since, "grad_norm": float(grad_norm),
                      "lr": lr_at(step), "img_per_s": seen_since / dt}
            if train.check_replicas:
                record["replica_spread"], spread_max = spread_max, 0.0
            if log is not None:
                log.log(**record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
            seen_since, steps_since, t_since, loss_sum = 0, 0, time.perf_counter(), 0.0
        if done % train.sample_every == 0:
            draw(done)
        if done % train.ckpt_every == 0 or done == train.steps:
            checkpoint(done)
        if train.max_minutes and done < train.steps and world.any(
                time.perf_counter() - t_loop > 60 * train.max_minutes, device):
            if done % train.ckpt_every:
                checkpoint(done)
            print(f"\nthe time budget of {train.max_minutes} min of training is spent after {done} steps; stopping")
            break
    bar.close()
    if start_step >= train.steps:
        print(f"already trained for {train.steps} steps; nothing to do (raise --steps to continue)")
    train_seconds = time.perf_counter() - t_start
    world.barrier()
    if not world.is_main:  # rank 0 alone draws, evaluates and reports
        teardown_distributed(world)
        return {"steps": done, "rank": world.rank}

    result = {"steps": done, "wall_seconds": train_seconds, "train_loop_seconds": time.perf_counter() - t_loop,
              "checkpoint": str(ckpt_path)}
    draw(done)
    print(f"samples: {out / f'samples_{done:07d}.png'}")
    if train.dataset == "shapes" and train.cond == "text" and train.task == "generate" and train.eval_images > 0:
        result.update(evaluate_shapes(ema.model, schedule, ae, train, diffusion, (h, w), device))
        print(f"prompt faithfulness (color, shape and position all right): {result['prompt_faithfulness']:.1%} "
              f"over {result['images']} prompts [color {result['color']:.1%}, shape {result['shape']:.1%}, "
              f"position {result['position']:.1%}], {train.eval_steps} DDIM steps, guidance {train.eval_cfg}")
    elif train.eval_images > 0 and scorable(spec, train.dataset) and (
            train.cond in ("class", "layout") or train.task != "generate"):
        scores = evaluate_task(ema.model, schedule, ae, train, diffusion, (h, w), device, args.data)
        result.update(scores)
        shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float) and k != "seconds_per_image"}
        print(f"evaluation (cond={train.cond}, task={train.task}, {scores['images']} held-out inputs, "
              f"{train.eval_steps} DDIM steps, guidance {train.eval_cfg}): {shown}")
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"done in {time.perf_counter() - t_start:.0f} s; checkpoint {ckpt_path}")
    teardown_distributed(world)
    return result


if __name__ == "__main__":
    leave(main(sys.argv[1:]))  # under torchrun, ranks other than 0 leave at once (see distributed.leave)
