"""Train the second stage: a (conditional) diffusion model in the latent space of a frozen autoencoder.

    python train_ldm.py --preset shapes                      # the CPU demo: autoencoder, LDM, samples, score
    python train_ldm.py --preset shapes --ae runs/ae-shapes/autoencoder.pt --out runs/ldm-shapes
    python train_ldm.py --preset celeba64 --data /path/to/celeba --ae runs/ae-celeba64/autoencoder.pt
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
log.jsonl, samples_XXXXXXX.png (fixed prompts or held-out inputs, EMA weights), loss.png (the loss curve so
far) and eval.json: for the
shapes dataset the prompt faithfulness measured by the shapes evaluator, or the task's own score.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tinyldm.autoencoder import Autoencoder
from tinyldm.cli import ArgumentParser, UsageError, run
from tinyldm.conditioning import ConditionConfig, ConditionEncoder, Tokenizer, split_words
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
from tinyldm.evaluation.viz import save_image_grid, save_loss_curve
from tinyldm.ldm import Denoiser, DiffusionConfig, generate, ldm_loss, ldm_payload
from tinyldm.schedule import NoiseSchedule
from tinyldm.training.checkpoint import RunLock, load_checkpoint, save_checkpoint
from tinyldm.training.distributed import World, leave, replica_spread
from tinyldm.training.distributed import setup as setup_distributed
from tinyldm.training.distributed import teardown as teardown_distributed
from tinyldm.training.flags import (
    add_config_args,
    build_config,
    check_data_flags,
    check_resume_overrides,
    check_sampling_steps,
    check_values,
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
    warmup_lr,
)
from tinyldm.training.memory import check_training, unet_profile, weights_bytes
from tinyldm.training.presets import LDM_PRESETS, LDM_SMOKE
from tinyldm.unet import UNet, UNetConfig


@dataclass
class TrainLDMConfig:
    dataset: str = "shapes"  # "shapes", "folder", "celeba" or "lsun" (the last three read --data)
    image_size: int = 32
    n_train: int = 20_000  # shapes: size of the training split; others: a cap (0 = all images)
    hflip: bool = False  # folder / celeba / lsun only; both orientations are cached
    ae_preset: str = "shapes"  # what train_ae.py trains when --ae is not given
    ae_steps: int = 0  # its training steps when --ae is not given (0: the ae_preset's own)
    cond: str = "text"  # cross-attended: "text", "class", "layout" (shapes: boxes + classes), "none", or "auto"
    #                     (what the data holds: captions -> text, class sub-folders -> class, else none)
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
    tensorboard: bool = False  # also log to <out>/tensorboard (pip install 'tinyldm[tensorboard]')
    max_minutes: float = 0.0  # > 0: stop after this much training-loop time (a wall-clock budget), checkpointed
    check_replicas: bool = False  # under torchrun: compare the processes' weights after every step (logged)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 500
    eval_images: int = 162  # images scored at the end (0: skip): shapes prompt faithfulness, a task's score, or for
    #                         other data the feature distance to held-out images (python -m tinyldm.tools.evaluate)
    feature_steps: int = 600  # other data: training steps of the evaluator's feature network (saved beside ldm.pt)
    eval_steps: int = 50
    eval_cfg: float = 3.0  # classifier-free guidance scale for the grids and the evaluation
    posterior: str = "sample"  # KL autoencoders: "sample" trains on z ~ q(z|x), a fresh draw every step from the
    #   cached posterior mean and std, as App. G and CompVis' LatentDiffusion (get_first_stage_encoding) do;
    #   "mean" trains on the posterior mean. VQ autoencoders: the pre-quantization latent either way.


# Presets (tinyldm/training/presets.py): plain dicts of field -> value over the dataclass defaults.
PRESETS, SMOKE = LDM_PRESETS, LDM_SMOKE
FIXED_PROMPTS = [  # the sample grids' prompts, in the shapes dataset's phrasings
    "a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right",
    "top right: a yellow circle", "a purple square in the middle left", "an orange triangle at the top center",
    "a blue circle in the bottom left", "a red triangle in the center",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="default: folder when --data is given, else shapes")
    p.add_argument("--smoke", action="store_true", help="shrink everything to a seconds-long CPU run")
    p.add_argument("--out", default=None, help="output folder (default runs/ldm-<preset>)")
    p.add_argument("--ae", default=None, help="autoencoder checkpoint from train_ae.py (default: train one)")
    p.add_argument("--data", default=None, help="dataset folder (folder / celeba / lsun)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ldm.pt")
    add_config_args(p, TrainLDMConfig, UNetConfig, DiffusionConfig)
    return default_preset(p.parse_args(argv))


def resolve_configs(args: argparse.Namespace, stored: dict | None) -> tuple[TrainLDMConfig, dict, DiffusionConfig]:
    """Preset (+ smoke) < the resumed checkpoint's own configuration < command line (e.g. a larger --steps).
    Returns the training config, the UNet fields the user chose (the latent shape and context width are filled
    in from the autoencoder and condition later) and the diffusion config."""
    base = {**PRESETS[args.preset], **(SMOKE if args.smoke else {})}
    saved = [{**stored["train_config"], **stored["unet_config"], **stored["diffusion_config"]}] if stored else []
    if stored:
        fields = config_fields(TrainLDMConfig, UNetConfig, DiffusionConfig)
        check_resume_overrides(saved[0], {k: v for k, v in vars(args).items() if k in fields})
    layers = [base, *saved, vars(args)]
    config = build_config(TrainLDMConfig, *layers)
    check_data_flags(config.dataset, args.data, config.hflip)
    if config.cond == "auto":
        config = replace(config, cond=detect_condition(config, args.data))
    if config.cond not in CONDS:
        raise SystemExit(f"--cond must be one of {', '.join(CONDS)} or auto, got {config.cond!r}")
    if config.task not in TASKS:
        raise SystemExit(f"--task must be one of {', '.join(TASKS)}, got {config.task!r}")
    if config.posterior not in ("sample", "mean"):
        raise SystemExit(f"--posterior must be sample or mean, got {config.posterior!r}")
    diffusion = build_config(DiffusionConfig, *layers)
    check_sampling_steps(diffusion.T, config.eval_steps, "--eval_steps")
    if (config.cond == "layout" or config.task == "semantic") and config.dataset != "shapes":
        raise SystemExit(f"--cond {config.cond} / --task {config.task} need boxes or maps: only the shapes dataset has "
                         "them here")
    unet_fields = {f: v for layer in layers for f, v in layer.items() if f in UNetConfig.__dataclass_fields__}
    check_values(unet_fields)  # the UNet is built later, from these and the autoencoder's latent shape
    if config.cond != "none" and unet_fields.get("attention_block") == "plain":  # it has no cross-attention
        if "attention_block" in vars(args):
            raise SystemExit(f"--attention_block plain has no cross-attention, so it cannot read --cond "
                             f"{config.cond}: use --attention_block transformer, or --cond none")
        unet_fields["attention_block"] = "transformer"
        print(f"--cond {config.cond}: transformer blocks with cross-attention instead of the unconditional "
              "models' plain attention (Sec. 3.3)")
    for derived in ("in_channels", "out_channels", "latent_size"):
        if derived in vars(args):
            raise SystemExit(f"--{derived} is set from the autoencoder; do not pass it")
    return config, unet_fields, diffusion


def detect_condition(config: TrainLDMConfig, data_root: str | None) -> str:
    """--cond auto: captions (on any training image) -> "text", a class for every image -> "class", else "none";
    the shapes dataset -> "text". Reads the file list and the caption / class metadata, not the images."""
    if config.dataset == "shapes":
        return "text"
    dataset = make_dataset(data_configs(asdict(config), data_root)[0], "train")
    n, captioned = len(dataset), sum(bool(c) for c in dataset.captions)
    classes = sorted(set(dataset.class_ids)) if min(dataset.class_ids) >= 0 else []
    cond = "text" if captioned else "class" if len(classes) > 1 else "none"
    found = (f"captions for {captioned} of {n} images" if captioned else
             f"{len(classes)} class sub-folders" if len(classes) > 1 else "no captions and no class sub-folders")
    print(f"--cond auto: {dataset.name} has {n} training images with {found} -> --cond {cond}")
    return cond


def get_autoencoder(args: argparse.Namespace, config: TrainLDMConfig, out: Path) -> Path:
    """The autoencoder checkpoint to use: --ae, the one trained for this run before, or a fresh one."""
    if args.ae:
        return Path(args.ae)
    path = out / "ae" / "autoencoder.pt"
    unfinished = False
    if path.exists():  # trained for this run before; finished, or cut short (then it continues)
        stored = load_checkpoint(path, kind="autoencoder")
        unfinished = stored["step"] < stored["train_config"]["steps"]
        if unfinished:
            print(f"the autoencoder in {path} stopped at step {stored['step']} of {stored['train_config']['steps']}: "
                  "continuing it")
    if unfinished or not path.exists():
        import train_ae

        cmd = ["--preset", config.ae_preset, "--out", str(out / "ae"), "--device", args.device]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--steps", str(config.ae_steps)] if config.ae_steps and not args.smoke else []
        cmd += ["--tensorboard", "true"] if config.tensorboard else []
        if config.dataset != "shapes":  # the first stage learns the same images as the second
            cmd += ["--dataset", config.dataset, "--data", str(args.data), "--image_size", str(config.image_size)]
        cmd += ["--resume"] if unfinished else []
        if not unfinished:
            print(f"no --ae given: training the autoencoder first (python train_ae.py {' '.join(cmd)})")
        train_ae.main(cmd, single_process=True, resume_hint=resume_command("train_ldm.py", args.argv))
        # under torchrun only rank 0 gets here; the others wait
    return path


def task_spec(config: TrainLDMConfig) -> TaskSpec:
    return TaskSpec(task=config.task, cond=config.cond, sr_factor=config.sr_factor)


@dataclass
class StageOneLatents:
    """The training set's latents from the cache, unscaled: posterior means (VQ: the pre-quantization latents),
    the posterior std where the LDM trains on posterior samples, and the flipped twins of both (--hflip)."""
    mean: torch.Tensor  # (N, c, h, w)
    std: torch.Tensor | None  # (N, c, h, w), or None: train on the mean
    flipped: torch.Tensor | None
    flipped_std: torch.Tensor | None


def load_latents(ae: Autoencoder, ae_path: Path, config: TrainLDMConfig, data_root: str | None, out: Path,
                 device: torch.device) -> tuple[StageOneLatents, dict, list[str]]:
    """Encode the training set once (cached in <out>/latents.pt) -> the latents, the conditions, the class names.
    With --posterior sample and a KL autoencoder the cache holds each image's posterior mean and std."""
    data, shapes = data_configs(asdict(config), data_root)
    spec = task_spec(config)
    dataset = TaskInputs.wrap(make_dataset(data, "train", shapes=shapes), spec)
    keep = cache_keys(spec)
    with_std = config.posterior == "sample" and ae.config.regularizer == "kl"
    key = {"autoencoder": file_digest(ae_path), "data": asdict(data), "shapes": asdict(shapes) if shapes else None,
           "sr_factor": config.sr_factor if config.task == "superres" else None,
           "posterior": "mean_and_std" if with_std else "mean"}

    def encode(x: torch.Tensor) -> torch.Tensor:
        if not with_std:
            return ae.encode(x.to(device))
        q = ae.posterior(x.to(device))
        return torch.cat([q.mean, q.std], dim=1)  # (B, 2c, h, w), split again below

    cached = latent_cache(dataset, encode, path=out / "latents.pt", key=key, flip=config.hflip, device=device,
                          keep=keep)

    def split(z: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (z, None) if z is None or not with_std else z.chunk(2, dim=1)

    (mean, std), (flipped, flipped_std) = split(cached.latents), split(cached.flipped)
    return (StageOneLatents(mean, std, flipped, flipped_std), cached.conditions,
            list(getattr(dataset, "class_names", [])))


def make_condition_config(config: TrainLDMConfig, unet_fields: dict, conditions: dict,
                          class_names: list[str]) -> ConditionConfig:
    width = unet_fields.get("context_dim") or 128
    if config.cond == "text":
        captions = conditions["caption"]
        if not any(captions):
            raise SystemExit("--cond text needs captions, and this dataset has none (use --cond class or none)")
        tokenizer = Tokenizer.from_texts(list(captions))
        if config.dataset == "shapes":  # the grids' fixed prompts; other data sets draw held-out captions
            unknown = sorted({w for p in FIXED_PROMPTS for w in tokenizer.unknown_words(p)})
            if unknown:
                print(f"warning: words of the sample prompts never seen in training captions: {unknown}")
        longest = max(len(split_words(c)) for c in captions) + 2  # with <bos> and <eos>
        if longest > config.max_tokens:  # sized from the data: no caption is cut
            print(f"captions have up to {longest} tokens with <bos>/<eos>: the text encoder reads {longest} "
                  f"(--max_tokens {config.max_tokens} raised to fit)")
        return ConditionConfig(kind="text", context_dim=width, vocab=tokenizer.vocab,
                               max_len=max(config.max_tokens, longest), layers=config.text_layers,
                               head_dim=config.text_head_dim)
    if config.cond == "class":
        num_classes = len(class_names) or int(conditions["class_id"].max()) + 1
        if int(conditions["class_id"].min()) < 0:
            raise SystemExit("--cond class needs class labels (class sub-folders, or a CelebA attribute)")
        return ConditionConfig(kind="class", context_dim=width, num_classes=num_classes)
    if config.cond == "layout":
        return ConditionConfig(kind="layout", context_dim=width, num_classes=len(CLASS_NAMES),
                               max_objects=config.max_shapes, layers=config.text_layers, head_dim=config.text_head_dim)
    return ConditionConfig(kind="none")


def sample_prompts(config: TrainLDMConfig, class_names: list[str], n: int = 8):
    if config.cond == "text":
        return FIXED_PROMPTS[:n]
    if config.cond == "class":
        return torch.arange(n) % max(len(class_names), 1)
    return None


def evaluate_task(denoiser: Denoiser, schedule, ae: Autoencoder, config: TrainLDMConfig, diffusion: DiffusionConfig,
                  latent_hw: tuple[int, int], device: torch.device, data_root: str | None) -> dict:
    """The number that says how well the task worked, on `eval_images` held-out items (see
    `tinyldm.data.tasks.score_items`); class: colour and shape accuracy of images generated for each class in turn."""
    n = config.eval_images
    g = torch.Generator(device).manual_seed(1234)
    kw = dict(prediction=diffusion.prediction, steps=config.eval_steps, guidance_scale=config.eval_cfg, generator=g)
    start = time.perf_counter()
    result = {"images": n, "ddim_steps": config.eval_steps, "guidance_scale": config.eval_cfg}
    if config.cond == "class" and config.task == "generate":
        ids = torch.arange(n) % len(CLASS_NAMES)
        images = torch.cat([generate(denoiser, schedule, ae, ids[i : i + 64].to(device), latent_size=latent_hw,
                                     **kw).cpu()
                            for i in range(0, n, 64)])
        wanted = [[ShapeSpec(*CLASS_NAMES[c].split(" "), None)] for c in ids.tolist()]
        score = score_images(images, wanted)
        result.update(class_accuracy=score.all, color=score.color, shape=score.shape)
    else:
        spec = task_spec(config)
        items = heldout_items(spec, *data_configs(asdict(config), data_root), n, allow_fewer=True)
        if len(items["image"]) < n:
            print(f"note: the held-out split has only {len(items['image'])} images; scoring those")
        n = result["images"] = len(items["image"])
        images = generate_from_items(denoiser, schedule, ae, spec, items, latent_hw, device, **kw)
        result.update(score_items(spec, items, images))
    result["seconds_per_image"] = (time.perf_counter() - start) / n
    return result


def evaluate_shapes(denoiser: Denoiser, schedule, ae: Autoencoder, config: TrainLDMConfig, diffusion: DiffusionConfig,
                    latent_hw: tuple[int, int], device: torch.device) -> dict:
    """Prompt faithfulness: images for `eval_images` prompts (cycling through all 162), scored exactly."""
    prompts = [all_prompts()[i % 162] for i in range(config.eval_images)]
    g = torch.Generator(device).manual_seed(1234)
    start, images = time.perf_counter(), []
    for i in range(0, len(prompts), 64):
        batch = prompts[i : i + 64] if config.cond == "text" else None
        images.append(generate(denoiser, schedule, ae, batch, n=len(prompts[i : i + 64]), latent_size=latent_hw,
                               prediction=diffusion.prediction, steps=config.eval_steps,
                               guidance_scale=config.eval_cfg, generator=g).cpu())
    seconds = time.perf_counter() - start
    score = score_images(torch.cat(images), prompts)
    return {"prompt_faithfulness": score.all, "color": score.color, "shape": score.shape,
            "position": score.position, "images": len(prompts), "ddim_steps": config.eval_steps,
            "guidance_scale": config.eval_cfg, "seconds_per_image": seconds / len(prompts)}


# ----------------------------------------------------------------------------------------------
# Plumbing around the training step: processes, the step's batch and random draws, the log window, the files
# written. The loop itself is at the end of `main` (the last function); `train_step` above it is Eq. 3's update.


def start_processes(device_name: str, config: TrainLDMConfig) -> tuple[World, torch.device]:
    """Join the process group when torchrun started us (one process otherwise); this process's device."""
    world, device_name = setup_distributed(device_name)
    if config.batch_size % world.size:
        raise SystemExit(f"--batch_size {config.batch_size} (the global batch) must be divisible by the "
                         f"{world.size} processes")
    return world, pick_device(device_name)


def rank_zero_first(world: World, fn: Callable[[], tuple]) -> tuple:
    """fn() in rank 0 first, then in the other processes: what rank 0 writes into --out (an autoencoder
    trained for this run, the latent cache), the others then only read."""
    for turn in ("main", "others"):
        if world.is_main == (turn == "main"):
            result = fn()
        world.barrier()
    return result


def load_stage_one(args: argparse.Namespace, config: TrainLDMConfig, stored: dict | None, out: Path,
                   device: torch.device) -> tuple[Path, Autoencoder, StageOneLatents, dict, list[str]]:
    """The frozen autoencoder (the resumed run's, --ae, or one trained now) and the training set's latents:
    (autoencoder path, autoencoder, latents, conditions, class names)."""
    ae_path = Path(stored["ae_path"]) if stored else get_autoencoder(args, config, out)
    ae = Autoencoder.from_checkpoint(load_checkpoint(ae_path, kind="autoencoder")).to(device)
    ae.requires_grad_(False)
    return ae_path, ae, *load_latents(ae, ae_path, config, args.data, out, device)


def make_denoiser(config: TrainLDMConfig, unet_fields: dict, cond_config: ConditionConfig, spec: TaskSpec,
                  latent_shape: tuple[int, int, int], device: torch.device) -> Denoiser:
    """The condition encoder tau_theta and the UNet eps_theta (trained jointly), for latents (c, h, w)."""
    c, h, w = latent_shape
    down = 2 ** (len(unet_fields.get("channel_mult", UNetConfig.channel_mult)) - 1)
    if h % down or w % down:
        raise UsageError(f"the latents are {h} x {w}, which the UNet's {down}x downsampling (--channel_mult) cannot "
                         f"halve evenly: choose --image_size so that image_size / f is a multiple of {down}, or "
                         "fewer --channel_mult levels")
    cond_encoder = ConditionEncoder(cond_config)
    unet_config = UNetConfig(**{**unet_fields, "in_channels": c, "out_channels": c, "latent_size": h,
                                "context_dim": cond_encoder.context_dim, "concat_channels": concat_channels(spec, c)})
    denoiser = Denoiser(UNet(unet_config), cond_encoder).to(device)
    if config.channels_last and device.type == "cuda":
        denoiser.unet.to(memory_format=torch.channels_last)
    return denoiser


def check_memory(denoiser: Denoiser, latents: StageOneLatents, config: TrainLDMConfig, world: World,
                 device: torch.device) -> float:
    """Refuse a batch that cannot fit in memory before the first step (see tinyldm.training.memory): the UNet's
    activations at the latent size, the weights x 5 and the latent cache, which lives on the device."""
    h, w = latents.mean.shape[-2:]
    per_example = unet_profile(denoiser, (h, w)).training(h * w)
    cache = sum(t.numel() * 4 for t in (latents.mean, latents.std, latents.flipped) if t is not None)
    return check_training("the LDM", weights_bytes(denoiser), per_example, config.batch_size // world.size, device,
                          extra=cache)


def prepare_for_training(denoiser: Denoiser, config: TrainLDMConfig, world: World,
                         device: torch.device) -> torch.nn.Module:
    """The module the training step calls: the denoiser, compiled with --compile, and under torchrun wrapped in
    DistributedDataParallel, which averages the gradients of the processes' shares after every backward."""
    if config.compile:
        denoiser.unet.compile()  # in place: the state_dict keys (and so the checkpoints) stay the same
    if not world.enabled:
        return denoiser
    return DistributedDataParallel(denoiser, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def resume(stored: dict | None, denoiser: Denoiser, ema: EMA, opt: torch.optim.Optimizer, ckpt_path: Path) -> int:
    """Load the weights, EMA, optimizer and random state of a resumed run; the step to start from (0 if new)."""
    if not stored:
        return 0
    denoiser.load_state_dict(stored["denoiser"])
    ema.load_state_dict(stored["ema_state"])
    opt.load_state_dict(stored["optimizer"])
    set_rng_state(stored["rng"])
    print(f"resumed from {ckpt_path} at step {stored['step']}")
    return stored["step"]


def step_draws(step: int, n: int, *, seed: int, latent_shape: tuple[int, int, int], T: int, p_uncond: float,
               device: torch.device, posterior: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The random draws of step `step` for the whole global batch of n: flips (n, 1, 1, 1), timesteps t (n,),
    noise eps (n, c, h, w), condition drops (n,), and with `posterior` the posterior's noise (n, c, h, w) for
    z = mu + sigma * noise (else None: nothing drawn). Functions of (seed, step) alone, the same in every process:
    `--resume` continues exactly, with any number of processes."""
    g = torch.Generator(device).manual_seed(seed_stream(seed, step, 1))
    flip = torch.rand(n, 1, 1, 1, generator=g, device=device) < 0.5
    t = torch.randint(0, T, (n,), generator=g, device=device)  # t ~ U{0..T-1}
    eps = torch.randn((n, *latent_shape), generator=g, device=device)
    drop = torch.rand(n, generator=torch.Generator().manual_seed(seed_stream(seed, step, 2))) < p_uncond  # CPU: no sync
    if not posterior:
        return flip, t, eps, drop, None
    g_posterior = torch.Generator(device).manual_seed(seed_stream(seed, step, 3))  # its own stream: eps is unchanged
    return flip, t, eps, drop, torch.randn((n, *latent_shape), generator=g_posterior, device=device)


@dataclass
class Batch:
    """This process's share of a step's global batch: the scaled latents z0 and their conditions, and the
    step's draws for them (t, eps, which conditions to drop)."""
    z0: torch.Tensor  # (B, c, h, w)
    condition: list[str] | torch.Tensor | dict | None  # captions, class ids, layouts (box_classes, boxes)
    concat: torch.Tensor | None  # (B, C_c, h, w): the task's image-like input
    t: torch.Tensor  # (B,) timesteps
    eps: torch.Tensor  # (B, c, h, w) noise
    drop: torch.Tensor  # (B,) bool: conditions replaced by the null condition (classifier-free guidance)
    images: int  # the global batch size (every process together)


@dataclass
class TrainingSet:
    """The training set on the device, and the batch of each step (a pure function of the step)."""
    config: TrainLDMConfig
    world: World
    ae: Autoencoder  # inpainting encodes each step's masked images
    conditions: dict  # captions, class ids, layouts, pixels (inpainting), on the CPU
    latents: torch.Tensor  # (N, c, h, w), scaled: the posterior means
    std: torch.Tensor | None  # (N, c, h, w), scaled: the posterior std (--posterior sample), else None
    flipped: torch.Tensor | None  # their horizontally flipped twins (--hflip)
    flipped_std: torch.Tensor | None
    concat: torch.Tensor | None  # (N, C_c, h, w): the task input of semantic maps and superres
    concat_flipped: torch.Tensor | None
    pixels: torch.Tensor | None  # inpainting: the images (N, 3, H, W), uint8, masked afresh every step
    T: int
    p_uncond: float

    @classmethod
    def on_device(cls, config: TrainLDMConfig, world: World, ae: Autoencoder, latents: StageOneLatents,
                  conditions: dict, T: int, p_uncond: float, device: torch.device) -> TrainingSet:
        """From stage one's unscaled latents: everything moved to the device once, the latents scaled."""
        scale = float(ae.scale_factor)
        # The task's image-like input for every training image; inpainting makes its own every step.
        spec = task_spec(config)
        latent_hw = tuple(latents.mean.shape[-2:])
        concat = task_concat(spec, conditions, latent_hw) if config.task in ("semantic", "superres") else None

        def scaled(z: torch.Tensor | None) -> torch.Tensor | None:
            return z.to(device) * scale if z is not None else None

        concat = concat.to(device) if concat is not None else None
        concat_flipped = concat.flip(-1) if concat is not None and latents.flipped is not None else None
        pixels = conditions["pixels"].to(device) if config.task == "inpaint" else None
        return cls(config, world, ae, conditions, scaled(latents.mean), scaled(latents.std), scaled(latents.flipped),
                   scaled(latents.flipped_std), concat, concat_flipped, pixels, T, p_uncond)

    def batch(self, step: int) -> Batch:
        """The global batch of `step` and its draws, then this process's share of each."""
        config, world, device = self.config, self.world, self.latents.device
        idx_all = batch_indices(step, n=len(self.latents), batch_size=config.batch_size, seed=config.seed).to(device)
        flip_all, t_all, eps_all, drop_all, posterior_all = step_draws(
            step, len(idx_all), seed=config.seed, T=self.T, latent_shape=self.latents.shape[1:],
            p_uncond=self.p_uncond, device=device, posterior=self.std is not None)
        idx, flip = world.shard(idx_all), world.shard(flip_all)
        z0, std = self.latents[idx], self.std[idx] if self.std is not None else None
        concat = self.concat[idx] if self.concat is not None else None
        if self.flipped is not None:  # each image in either orientation (its task input flipped with it)
            z0 = torch.where(flip, self.flipped[idx], z0)
            std = torch.where(flip, self.flipped_std[idx], std) if std is not None else None
            concat = torch.where(flip, self.concat_flipped[idx], concat) if concat is not None else None
        if std is not None:  # a fresh draw z ~ q(z|x) = N(mu, sigma^2) for this step (App. G)
            z0 = z0 + std * world.shard(posterior_all)
        if self.pixels is not None:  # inpainting: this step's masks (a function of the step: exact resume)
            x = self.pixels[idx].float() / 127.5 - 1
            x = torch.where(flip, x.flip(-1), x) if self.flipped is not None else x
            masks = random_mask(len(idx_all), *x.shape[-2:],
                                generator=torch.Generator().manual_seed(seed_stream(config.seed, step, 0)))
            concat = inpaint_concat(self.ae, x, world.shard(masks).to(device))
        condition = None
        if config.cond == "text":
            condition = [self.conditions["caption"][i] for i in idx.tolist()]
        elif config.cond == "class":
            condition = self.conditions["class_id"][idx.cpu()].to(device)
        elif config.cond == "layout":
            condition = {k: self.conditions[k][idx.cpu()].to(device) for k in ("box_classes", "boxes")}
        return Batch(z0, condition, concat, t=world.shard(t_all), eps=world.shard(eps_all).to(z0.dtype),
                     drop=world.shard(drop_all), images=len(idx_all))


class LogWindow:
    """The steps since the last record of log.jsonl: their summed loss, the images seen, the time taken, and
    with --check_replicas the largest difference between the processes' weights. Only rank 0 has a `log`."""

    def __init__(self, log: JSONLLogger | None, *, check_replicas: bool):
        self.log, self.check_replicas = log, check_replicas
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.images, self.start, self.spread = 0.0, 0, 0, time.perf_counter(), 0.0

    def add(self, loss: float, images: int, spread: float = 0.0) -> None:
        self.loss_sum, self.steps, self.images = self.loss_sum + loss, self.steps + 1, self.images + images
        self.spread = max(self.spread, spread)

    def write(self, step: int, *, grad_norm: torch.Tensor, lr: float) -> dict:
        """Log the window ending at `step` (1-based; `grad_norm` and `lr` are its last step's), start afresh."""
        record = {"step": step, "loss": self.loss_sum / self.steps, "grad_norm": float(grad_norm), "lr": lr,
                  "img_per_s": self.images / (time.perf_counter() - self.start)}
        if self.check_replicas:
            record["replica_spread"] = self.spread
        if self.log is not None:
            self.log.log(**record)
        self.reset()
        return record


def time_is_up(config: TrainLDMConfig, done: int, t_loop: float, world: World, device: torch.device) -> bool:
    """--max_minutes spent (and steps left): true in every process if in one, so that all stop at the same step."""
    return bool(config.max_minutes) and done < config.steps and world.any(
        time.perf_counter() - t_loop > 60 * config.max_minutes, device)


@dataclass
class SampleGrid:
    """What the sample grids show: the fixed prompts or classes, or the first held-out inputs (layouts, tasks)."""
    condition: list[str] | torch.Tensor | dict | None
    concat: torch.Tensor | None
    n: int
    latent_hw: tuple[int, int]
    device: torch.device

    @classmethod
    def for_run(cls, config: TrainLDMConfig, class_names: list[str], data_root: str | None,
                latent_hw: tuple[int, int], device: torch.device, ae: Autoencoder, max_len: int) -> SampleGrid:
        held_out_captions = config.cond == "text" and config.dataset != "shapes"
        if config.cond == "layout" or config.task != "generate" or held_out_captions:  # the first 8 held-out inputs
            spec = task_spec(config)
            items = heldout_items(spec, *data_configs(asdict(config), data_root), 8, allow_fewer=True)
            condition, concat = item_conditions(spec, items, latent_hw, device, ae)
            if held_out_captions:  # words past the text encoder's length are left out of the grid's prompts
                condition = [" ".join(split_words(c)[: max_len - 2]) for c in condition]
            return cls(condition, concat, len(items["image"]), latent_hw, device)
        return cls(sample_prompts(config, class_names), None, 8, latent_hw, device)


def save_samples(out: Path, step: int, *, model: Denoiser, schedule: NoiseSchedule, ae: Autoencoder, grid: SampleGrid,
                 diffusion: DiffusionConfig, config: TrainLDMConfig, log: JSONLLogger | None = None) -> Path:
    """<out>/samples_XXXXXXX.png: one row of images for the grid's conditions (the EMA weights, a fixed seed);
    <out>/loss.png: the loss curve so far; with --tensorboard the grid goes there too."""
    path = out / f"samples_{step:07d}.png"
    g = torch.Generator(grid.device).manual_seed(0)
    images = generate(model, schedule, ae, grid.condition, n=grid.n, latent_size=grid.latent_hw,
                      prediction=diffusion.prediction, steps=config.eval_steps, guidance_scale=config.eval_cfg,
                      generator=g, concat=grid.concat)
    save_image_grid(images, path, nrow=grid.n)
    save_loss_curve(out / "log.jsonl", out / "loss.png")  # the loss so far, beside the grids
    if log is not None:
        log.image("samples", path, step)
    return path


def save_ldm_checkpoint(path: Path, step: int, *, denoiser: Denoiser, ema: EMA, opt: torch.optim.Optimizer,
                        ae: Autoencoder, ae_path: Path, diffusion: DiffusionConfig, config: TrainLDMConfig,
                        class_names: list[str], world: World) -> None:
    """ldm.pt: the self-contained model (`ldm_payload`) and what `--resume` needs to continue exactly."""
    payload = ldm_payload(denoiser, ema.model, ae, diffusion, config.image_size)
    payload.update(train_config=asdict(config), step=step, optimizer=opt.state_dict(), rng=rng_state(),
                   ema_state=ema.state_dict(), ae_path=str(ae_path), class_names=class_names, processes=world.size)
    save_checkpoint(path, payload, kind="ldm")


def evaluate_run(model: Denoiser, schedule, ae: Autoencoder, config: TrainLDMConfig, diffusion: DiffusionConfig,
                 latent_hw: tuple[int, int], device: torch.device, data_root: str | None, ckpt_path: Path) -> dict:
    """The end-of-run score, printed: prompt faithfulness for text on shapes, else the task's own score on
    held-out inputs where it has one, else (other data) the feature distance between samples and held-out images
    that `python -m tinyldm.tools.evaluate` measures; {} with --eval_images 0."""
    spec = task_spec(config)
    if config.eval_images <= 0:
        return {}
    if config.dataset == "shapes" and config.cond == "text" and config.task == "generate":
        result = evaluate_shapes(model, schedule, ae, config, diffusion, latent_hw, device)
        print(f"prompt faithfulness (color, shape and position all right): {result['prompt_faithfulness']:.1%} "
              f"over {result['images']} prompts [color {result['color']:.1%}, shape {result['shape']:.1%}, "
              f"position {result['position']:.1%}], {config.eval_steps} DDIM steps, guidance {config.eval_cfg}")
        return result
    if scorable(spec, config.dataset) and (config.cond in ("class", "layout") or config.task != "generate"):
        scores = evaluate_task(model, schedule, ae, config, diffusion, latent_hw, device, data_root)
        shown = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float) and k != "seconds_per_image"}
        print(f"evaluation (cond={config.cond}, task={config.task}, {scores['images']} held-out inputs, "
              f"{config.eval_steps} DDIM steps, guidance {config.eval_cfg}): {shown}")
        return scores
    if config.dataset == "shapes":
        return {}
    from tinyldm.tools.evaluate import measure_checkpoint

    print(f"evaluation: python -m tinyldm.tools.evaluate --ckpt {ckpt_path} --data {data_root} --n "
          f"{config.eval_images} --steps {config.eval_steps} --guidance {config.eval_cfg}")
    try:
        measured = measure_checkpoint(ckpt_path, data_root, n=config.eval_images, steps=config.eval_steps,
                                      guidance=config.eval_cfg, device=device, classifier_steps=config.feature_steps,
                                      contrastive_steps=config.feature_steps,
                                      json_path=ckpt_path.parent / "metrics.json")
    except SystemExit as stop:  # the model is trained and saved; only its measurement cannot be made
        print(f"evaluation skipped: {stop}")
        return {"evaluation_skipped": str(stop)}
    metrics, floor = measured["metrics"], measured["real_vs_train_floor"]
    return {"fd_name": measured["protocol"]["fd_name"], "fd": metrics["fd"], "fd_floor": floor["fd"],
            "kid": metrics["kid"], "precision": metrics["precision"], "recall": metrics["recall"],
            "images": measured["protocol"]["n"]}


# ----------------------------------------------------------------------------------------------
# The training step and the loop


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA, schedule: NoiseSchedule, batch: Batch,
               diffusion: DiffusionConfig, config: TrainLDMConfig, *, step: int, lr: float, world: World,
               ckpt_path: Path) -> tuple[float, torch.Tensor]:
    """One step of Eq. 3, L_LDM = E ||eps - eps_theta(z_t, t, tau_theta(y))||^2 (or its v / x0 / L1 variant, see
    `ldm_loss`), with AdamW; returns the loss (the mean over the processes) and the gradient norm before
    clipping. `model` is the denoiser, or the denoiser wrapped in DDP."""
    denoiser = getattr(model, "module", model)
    denoiser.train()
    for group in opt.param_groups:
        group["lr"] = lr
    device_type = batch.z0.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.amp and device_type == "cuda"):
        loss = ldm_loss(model, schedule, batch.z0, batch.condition, diffusion, concat=batch.concat, t=batch.t,
                        eps=batch.eps, drop=batch.drop)
    loss_value = world.mean(loss.detach())  # one host sync per step: the NaN check needs it, the log too
    if not math.isfinite(loss_value):  # before the update: the last checkpoint stays a good one
        raise SystemExit(f"loss is {loss_value} at step {step}: stopping. The last good checkpoint is "
                         f"{ckpt_path} (lower --lr, or check the latents' scale). Nothing was overwritten.")
    opt.zero_grad(set_to_none=True)
    loss.backward()  # under DDP the processes' gradients are averaged here
    grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip)
    opt.step()
    if world.is_main:  # only rank 0 samples and saves: the others need no EMA
        ema.update(denoiser)
    return loss_value, grad_norm


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv  # for the resume command a stopped run prints
    out = Path(args.out or f"runs/ldm-{args.preset}{'-smoke' if args.smoke else ''}")
    ckpt_path = out / "ldm.pt"
    lock = RunLock(out).acquire() if os.environ.get("RANK", "0") == "0" else None  # one run per folder
    stored = None
    if args.resume and ckpt_path.exists():
        stored = load_checkpoint(ckpt_path, kind="ldm")
    elif args.resume and not (out / "ae" / "autoencoder.pt").exists():
        raise UsageError(f"--resume: nothing to continue in {out} (no ldm.pt, no ae/autoencoder.pt); check --out, "
                         "or drop --resume to start a new run")
    elif args.resume:
        print(f"--resume: {out} has no ldm.pt yet; the autoencoder continues if it was cut short, then the LDM "
              "starts at step 0")
    config, unet_fields, diffusion = resolve_configs(args, stored)
    world, device = start_processes(args.device, config)  # one process unless started by torchrun
    seed_everything(config.seed)
    t_start = time.perf_counter()

    # Stage one, frozen: the autoencoder and the cached latents of the whole training set.
    ae_path, ae, latents, conditions, class_names = rank_zero_first(
        world, lambda: load_stage_one(args, config, stored, out, device))
    scale = float(ae.scale_factor)
    N, c, h, w = latents.mean.shape
    z_kind = ("a fresh posterior sample each step, mean sigma " f"{float(latents.std.mean()) * scale:.4f} scaled"
              if latents.std is not None else "posterior means" if ae.config.regularizer == "kl" else
              "pre-quantization latents (VQ)")
    print(f"latents: {N} x {c} x {h} x {w}, scale factor {scale:.4f} (from the autoencoder's data), "
          f"scaled std {float(latents.mean.std()) * scale:.3f}; trains on {z_kind}")

    # Stage two: UNet + condition encoder, EMA, AdamW with linear warm-up. Seeded again, so the initial
    # weights do not depend on what stage one drew (training an autoencoder, filling the cache).
    seed_everything(config.seed)
    cond_config = ConditionConfig(**stored["cond_config"]) if stored else make_condition_config(
        config, unet_fields, conditions, class_names)
    denoiser = make_denoiser(config, unet_fields, cond_config, task_spec(config), (c, h, w), device)
    ema = EMA(denoiser, decay=config.ema_decay)
    schedule = diffusion.make_schedule().to(device)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            fused=device.type == "cuda")
    check_memory(denoiser, latents, config, world, device)
    start_step = resume(stored, denoiser, ema, opt, ckpt_path)
    n_params, n_unet = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (denoiser, denoiser.unet))
    print(f"denoiser: {n_params:.2f} M parameters (UNet {n_unet:.2f} M), cond={config.cond}, task={config.task}, "
          f"device={device}" + (f", process {world.rank} of {world.size}" if world.enabled else ""))
    model = prepare_for_training(denoiser, config, world, device)  # compiled, wrapped in DDP under torchrun
    log = JSONLLogger(out / "log.jsonl", resume_step=start_step if stored else None,
                      tensorboard=out / "tensorboard" if config.tensorboard else None) if world.is_main else None
    data = TrainingSet.on_device(config, world, ae, latents, conditions, schedule.T, diffusion.p_uncond, device)
    grid = SampleGrid.for_run(config, class_names, args.data, (h, w), device, ae, cond_config.max_len)
    checkpoint = partial(save_ldm_checkpoint, ckpt_path, denoiser=denoiser, ema=ema, opt=opt, ae=ae,
                         ae_path=ae_path, diffusion=diffusion, config=config, class_names=class_names, world=world)
    draw = partial(save_samples, out, model=ema.model, schedule=schedule, ae=ae, grid=grid, diffusion=diffusion,
                   config=config, log=log)

    t_loop, done, window = time.perf_counter(), start_step, LogWindow(log, check_replicas=config.check_replicas)
    quiet = {} if world.is_main else {"disable": True}  # rank 0 keeps tqdm's default, so TQDM_DISABLE=1 works
    with GracefulStop() as stop, tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
                                      desc="train_ldm", **quiet) as bar:
        for step in bar:
            batch = data.batch(step)
            lr = warmup_lr(step, config.lr, config.warmup_steps)
            loss, grad_norm = train_step(model, opt, ema, schedule, batch, diffusion, config, step=step, lr=lr,
                                         world=world, ckpt_path=ckpt_path)
            window.add(loss, batch.images, replica_spread(denoiser, world) if config.check_replicas else 0.0)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                record = window.write(done, grad_norm=grad_norm, lr=lr)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
            if done % config.sample_every == 0 and world.is_main:
                draw(done)
            if (done % config.ckpt_every == 0 or done == config.steps) and world.is_main:
                checkpoint(done)
            if done < config.steps and stop.agreed(world, device, done, config.log_every):  # keep this step
                if done % config.ckpt_every and world.is_main:
                    checkpoint(done)
                break
            if time_is_up(config, done, t_loop, world, device):
                if done % config.ckpt_every and world.is_main:
                    checkpoint(done)
                print(f"\nthe time budget of {config.max_minutes} min of training is spent after {done} steps; "
                      "stopping")
                break
    if stop.requested and done < config.steps:
        world.barrier()
        teardown_distributed(world)
        stop.exit(done, config.steps, ckpt_path, resume_command("train_ldm.py", argv))
    if start_step >= config.steps:
        print(f"already trained for {config.steps} steps; nothing to do (raise --steps to continue)")
    train_seconds = time.perf_counter() - t_start
    world.barrier()
    if not world.is_main:  # rank 0 alone draws, evaluates and reports
        teardown_distributed(world)
        return {"steps": done, "rank": world.rank}

    result = {"steps": done, "wall_seconds": train_seconds, "train_loop_seconds": time.perf_counter() - t_loop,
              "checkpoint": str(ckpt_path)}
    print(f"samples: {draw(done)}")
    result.update(evaluate_run(ema.model, schedule, ae, config, diffusion, (h, w), device, args.data, ckpt_path))
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"done in {time.perf_counter() - t_start:.0f} s; checkpoint {ckpt_path}")
    log.close()
    teardown_distributed(world)
    if lock is not None:
        lock.release()
    return result


if __name__ == "__main__":
    leave(run(main, sys.argv[1:]))  # under torchrun, ranks other than 0 leave at once (see distributed.leave)
