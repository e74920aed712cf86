"""train_ldm.py's setup, out of the reader's way: its configuration resolved and checked, the first
stage it needs (trained now by train_ae.py when none is given), the condition encoder sized from the
data, the denoiser, and the memory check before the first step.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..cli import UsageError
from ..conditioning import ConditionConfig, ConditionEncoder, Tokenizer, split_words
from ..data.images import make_dataset
from ..data.latent_batches import LatentTrainingSet
from ..data.shapes import CLASS_NAMES
from ..data.tasks import (
    CONDS,
    TASKS,
    TaskSpec,
    concat_channels,
    data_configs,
    has_task_score,
)
from ..evaluation.ldm_score import FIXED_PROMPTS
from ..ldm import Denoiser, DiffusionConfig
from ..unet import UNet, UNetConfig
from .checkpoint import load_checkpoint
from .distributed import World
from .flags import (
    build_config,
    check_data_flags,
    check_resume_overrides,
    check_sampling_steps,
    check_values,
    config_fields,
)
from .loop import resume_command
from .memory import check_training, unet_profile, weights_bytes
from .plan import Stage, memorising
from .presets import AE_GATES_DB


def resolve_configs(args: argparse.Namespace, stored: dict | None, config_cls: type, preset: dict
                    ) -> tuple[object, dict, DiffusionConfig]:
    """`preset` (with --smoke's changes) < the resumed checkpoint's own configuration < the command
    line (e.g. a larger --steps). Returns the training config (a `config_cls`), the UNet fields the
    user chose (the latent shape and context width are filled in from the autoencoder and condition
    later) and the diffusion config."""
    saved = ([{**stored["train_config"], **stored["unet_config"], **stored["diffusion_config"]}]
             if stored else [])
    if stored:
        fields = config_fields(config_cls, UNetConfig, DiffusionConfig)
        check_resume_overrides(saved[0], {k: v for k, v in vars(args).items() if k in fields})
    layers = [preset, *saved, vars(args)]
    config = build_config(config_cls, *layers)
    check_data_flags(config.dataset, args.data, config.hflip)
    if config.cond == "auto":
        config = replace(config, cond=detect_condition(config, args.data))
    if config.cond not in CONDS:
        raise UsageError(f"--cond must be one of {', '.join(CONDS)} or auto, got {config.cond!r}")
    if config.task not in TASKS:
        raise UsageError(f"--task must be one of {', '.join(TASKS)}, got {config.task!r}")
    if config.posterior not in ("sample", "mean"):
        raise UsageError(f"--posterior must be sample or mean, got {config.posterior!r}")
    diffusion = build_config(DiffusionConfig, *layers)
    check_sampling_steps(diffusion.T, config.eval_steps, "--eval_steps")
    if (config.cond == "layout" or config.task == "semantic") and config.dataset != "shapes":
        raise UsageError(f"--cond {config.cond} / --task {config.task} need boxes or maps: "
                         "only the shapes dataset has them here")
    unet_fields = {f: v for layer in layers for f, v in layer.items()
                   if f in UNetConfig.__dataclass_fields__}
    # the UNet is built later, from these and the autoencoder's latent shape
    check_values(unet_fields)
    # it has no cross-attention
    if config.cond != "none" and unet_fields.get("attention_block") == "plain":
        if "attention_block" in vars(args):
            raise UsageError(f"--attention_block plain has no cross-attention, so it cannot read "
                             f"--cond {config.cond}: use --attention_block transformer, or "
                             f"--cond none")
        unet_fields["attention_block"] = "transformer"
        print(f"--cond {config.cond}: transformer blocks with cross-attention instead of the "
              "unconditional models' plain attention (Sec. 3.3)")
    for derived in ("in_channels", "out_channels", "latent_size"):
        if derived in vars(args):
            raise UsageError(f"--{derived} is set from the autoencoder; do not pass it")
    return config, unet_fields, diffusion


def detect_condition(config, data_root: str | None) -> str:
    """--cond auto: captions (on any training image) -> "text", a class for every image -> "class",
    else "none"; the shapes dataset -> "text". Reads the file list and the caption / class metadata,
    not the images."""
    if config.dataset == "shapes":
        return "text"
    dataset = make_dataset(data_configs(asdict(config), data_root)[0], "train")
    n, captioned = len(dataset), sum(bool(c) for c in dataset.captions)
    classes = sorted(set(dataset.class_ids)) if min(dataset.class_ids) >= 0 else []
    cond = "text" if captioned else "class" if len(classes) > 1 else "none"
    found = (f"captions for {captioned} of {n} images" if captioned else
             f"{len(classes)} class sub-folders" if len(classes) > 1 else
             "no captions and no class sub-folders")
    print(f"--cond auto: {dataset.name} has {n} training images with {found} -> --cond {cond}")
    return cond


def make_condition_config(config, unet_fields: dict, conditions: dict,
                          class_names: list[str]) -> ConditionConfig:
    width = unet_fields.get("context_dim") or 128
    if config.cond == "text":
        captions = conditions["caption"]
        if not any(captions):
            raise UsageError("--cond text needs captions, and this dataset has none "
                             "(use --cond class or none)")
        tokenizer = Tokenizer.from_texts(list(captions))
        # the grids' fixed prompts; other data sets draw held-out captions
        if config.dataset == "shapes":
            unknown = sorted({w for p in FIXED_PROMPTS for w in tokenizer.unknown_words(p)})
            if unknown:
                print(f"warning: words of the sample prompts never seen in training captions: "
                      f"{unknown}")
        longest = max(len(split_words(c)) for c in captions) + 2  # with <bos> and <eos>
        if longest > config.max_tokens:  # sized from the data: no caption is cut
            print(f"captions have up to {longest} tokens with <bos>/<eos>: the text encoder reads "
                  f"{longest} (--max_tokens {config.max_tokens} raised to fit)")
        return ConditionConfig(kind="text", context_dim=width, vocab=tokenizer.vocab,
                               max_len=max(config.max_tokens, longest), layers=config.text_layers,
                               head_dim=config.text_head_dim)
    if config.cond == "class":
        num_classes = len(class_names) or int(conditions["class_id"].max()) + 1
        if int(conditions["class_id"].min()) < 0:
            raise UsageError("--cond class needs class labels "
                             "(class sub-folders, or a CelebA attribute)")
        return ConditionConfig(kind="class", context_dim=width, num_classes=num_classes)
    if config.cond == "layout":
        return ConditionConfig(kind="layout", context_dim=width, num_classes=len(CLASS_NAMES),
                               max_objects=config.max_shapes, layers=config.text_layers,
                               head_dim=config.text_head_dim)
    return ConditionConfig(kind="none")


def make_denoiser(config, unet_fields: dict, cond_config: ConditionConfig, spec: TaskSpec,
                  latent_shape: tuple[int, int, int], device: torch.device) -> Denoiser:
    """The condition encoder tau_theta and the UNet eps_theta (trained jointly), for latents
    (c, h, w)."""
    c, h, w = latent_shape
    down = 2 ** (len(unet_fields.get("channel_mult", UNetConfig.channel_mult)) - 1)
    if h % down or w % down:
        raise UsageError(f"the latents are {h} x {w}, which the UNet's {down}x downsampling "
                         f"(--channel_mult) cannot halve evenly: choose --image_size so that "
                         f"image_size / f is a multiple of {down}, "
                         "or fewer --channel_mult levels")
    cond_encoder = ConditionEncoder(cond_config)
    unet_config = UNetConfig(**{**unet_fields, "in_channels": c, "out_channels": c,
                                "latent_size": h, "context_dim": cond_encoder.context_dim,
                                "concat_channels": concat_channels(spec, c)})
    denoiser = Denoiser(UNet(unet_config), cond_encoder).to(device)
    if config.channels_last and device.type == "cuda":
        denoiser.unet.to(memory_format=torch.channels_last)
    return denoiser


def check_memory(denoiser: Denoiser, data: LatentTrainingSet, batch_size: int,
                 device: torch.device) -> float:
    """Refuse a batch that cannot fit in memory before the first step (see tinyldm.training.memory):
    the UNet's activations at the latent size, the weights x 5 and the latent cache, which lives on
    the device."""
    h, w = data.latents.shape[-2:]
    per_example = unet_profile(denoiser, (h, w)).training(h * w)
    cache = sum(t.numel() * 4 for t in (data.latents, data.std, data.flipped) if t is not None)
    return check_training("the LDM", weights_bytes(denoiser), per_example, batch_size, device,
                          extra=cache)


def rank_zero_first(world: World, fn: Callable[[], tuple]) -> tuple:
    """fn() in rank 0 first, then in the other processes: what rank 0 writes into --out (an
    autoencoder trained for this run, the latent cache), the others then only read."""
    for turn in ("main", "others"):
        if world.is_main == (turn == "main"):
            result = fn()
        world.barrier()
    return result


def first_stage(args: argparse.Namespace, config, out: Path, world: World, argv: list[str],
                script_dir: Path) -> Path:
    """The autoencoder checkpoint of this run: --ae, the one trained for it before in <out>/ae, or
    one that train_ae.py trains now (or continues, when it was cut short) with the preset
    `config.ae_preset` on the same data."""
    if args.ae:
        return Path(args.ae)
    path = out / "ae" / "autoencoder.pt"
    unfinished = False
    if path.exists():
        stored = load_checkpoint(path, kind="autoencoder")
        unfinished = stored["step"] < stored["train_config"]["steps"]
        if not unfinished:
            return path
        print(f"the autoencoder in {path} stopped at step {stored['step']} of "
              f"{stored['train_config']['steps']}: continuing it")
    if world.enabled:
        raise UsageError(f"no --ae: under torchrun every process would wait while one trained the "
                         f"autoencoder. Train it first "
                         f"(python train_ae.py --preset {config.ae_preset} --out DIR, or torchrun "
                         "for a KL one), then pass --ae DIR/autoencoder.pt")
    cmd = ["--preset", config.ae_preset, "--out", str(out / "ae"), "--device", args.device]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--steps", str(config.ae_steps)] if config.ae_steps and not args.smoke else []
    cmd += ["--tensorboard", "true"] if config.tensorboard else []
    if config.dataset != "shapes":  # the first stage learns the same images as the second
        cmd += ["--dataset", config.dataset, "--data", str(args.data),
                "--image_size", str(config.image_size), "--n_train", str(config.n_train)]
    cmd += ["--resume"] if unfinished else []
    if args.plan is not None:
        return plan_first_stage(cmd, path, script_dir)
    if not unfinished:
        print(f"no --ae given: training the autoencoder first "
              f"(python train_ae.py {' '.join(cmd)})", flush=True)
    status = run_script(script_dir / "train_ae.py", cmd)
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # it checkpointed and said so
        print(f"Continue with: {resume_command('train_ldm.py', argv)}", file=sys.stderr, flush=True)
        raise SystemExit(status)
    if status:
        raise UsageError(f"train_ae.py ended with exit status {status} (its message is above); "
                         f"fix that, then run this command again")
    return path


def check_pinned_autoencoder(args: argparse.Namespace, out: Path, stored: dict | None) -> None:
    """A resumed run continues on the autoencoder it was trained on, unchanged: refuses another
    --ae, and a file whose bytes changed since (ldm.pt holds its SHA-256)."""
    from tinyldm.data.latents import file_digest

    if not stored:
        return
    pinned = Path(stored["ae_path"])
    if args.ae and Path(args.ae).resolve() != pinned.resolve():
        raise UsageError(f"--resume continues the run in {out}, whose UNet was trained on the "
                         f"autoencoder {pinned}; --ae {args.ae} is another. Drop --ae to continue "
                         f"it, or start a new run (another --out) with --ae {args.ae}")
    if not pinned.exists():
        raise UsageError(f"the run in {out} was trained on the autoencoder {pinned}, which is no "
                         "longer there: put it back to continue, or start a new run")
    if stored.get("ae_digest") not in (None, file_digest(pinned)):
        raise UsageError(f"the autoencoder {pinned} changed after the run in {out} began (its "
                         "SHA-256 differs from the one in ldm.pt): the UNet was trained on the "
                         "old one's latents. Put the old file back to continue, or start a new "
                         f"run (another --out) with --ae {pinned}")


def run_script(script: Path, argv: list[str]) -> int:
    """`python script argv` in a child process; its exit status. Ctrl-C reaches the child from the
    terminal (it finishes its step and checkpoints), so this process ignores it meanwhile; a SIGTERM
    sent to this process is passed on."""
    with subprocess.Popen([sys.executable, str(script), *argv]) as child:
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                    signal.SIGTERM: signal.signal(signal.SIGTERM,
                                                  lambda signum, _: child.send_signal(signum))}
        try:
            return child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def check_resumable(args: argparse.Namespace, out: Path, stored: dict | None) -> None:
    """--resume needs something to continue: ldm.pt, or at least the autoencoder trained for this
    run."""
    if args.resume and args.plan is not None:
        raise UsageError("--plan plans a new run: drop --resume (a resumed run does what is left "
                         "of its --steps, at the speed its log.jsonl shows)")
    if not args.resume or stored:
        return
    if not (out / "ae" / "autoencoder.pt").exists():
        raise UsageError(f"--resume: nothing to continue in {out} (no ldm.pt, no "
                         "ae/autoencoder.pt); check --out, or drop --resume to start a new run")
    print(f"--resume: {out} has no ldm.pt yet; the autoencoder continues if it was cut short, "
          "then the LDM starts at step 0")


def describe_latents(data: LatentTrainingSet, ae, ae_ckpt: dict, ae_path: Path, config) -> None:
    """The latents the LDM trains on, and the health of the first stage and the data: a held-out
    PSNR under the preset's gate, scaled latents whose std is far from 1, too few images."""
    N, c, h, w = data.latents.shape
    z = (f"a fresh posterior sample each step, mean sigma {float(data.std.mean()):.4f} scaled"
         if data.std is not None else "posterior means" if ae.config.regularizer == "kl" else
         "pre-quantization latents (VQ)")
    # what the UNet sees: the means' spread, plus the posterior's noise when it samples
    std = float((data.latents.var() + (data.std.pow(2).mean() if data.std is not None else 0))
                .sqrt())
    print(f"latents: {N} x {c} x {h} x {w}, scale factor {float(ae.scale_factor):.4f} "
          f"(from the autoencoder's data), scaled std {std:.3f}; trains on {z}")
    if ae_ckpt.get("plan"):  # --plan's untrained stand-in, on a few batches: nothing to say
        return
    for line in (first_stage_health(ae_ckpt, ae_path, config) + latent_health(std, ae)
                 + memorising(N, config.steps, config.batch_size)):
        print(f"health: {line}")


def first_stage_health(ae_ckpt: dict, ae_path: Path, config) -> list[str]:
    """A first stage that has not reached its preset's held-out PSNR gate (`AE_GATES_DB`): an
    untrained, unfinished or wrongly chosen autoencoder, found before the LDM trains on it."""
    if ae_ckpt["autoencoder"]["config"].get("regularizer") == "identity":
        return []
    gate = AE_GATES_DB.get(config.ae_preset, AE_GATES_DB["photos"])
    psnr = (ae_ckpt.get("metrics") or {}).get("psnr")
    if psnr is None:
        return [f"the autoencoder {ae_path} has no held-out score (it stopped at step "
                f"{ae_ckpt.get('step')} of {ae_ckpt.get('train_config', {}).get('steps')}): finish "
                "it (python train_ae.py --resume --out ITS_FOLDER) before training an LDM on it"]
    if psnr < gate:
        return [f"the autoencoder {ae_path} reconstructs held-out images at {psnr:.1f} dB, under "
                f"the {gate:.0f} dB that a first stage for --ae_preset {config.ae_preset} should "
                "reach: the LDM's samples can be no sharper than its reconstructions. Train it "
                "longer, or check that --ae is the file you meant"]
    return []


def latent_health(std: float, ae) -> list[str]:
    """Scaled latents whose std is far from 1: samples come out flat or as noise (a scale factor
    that does not fit the latents; diffusers#2164, latent-diffusion#187)."""
    if 0.5 <= std <= 2.0:
        return []
    return [f"the scaled latents' std is {std:.3f}, not about 1 (scale factor "
            f"{float(ae.scale_factor):.4f}): the noise schedule assumes unit variance, and samples "
            "come out flat or as noise. Use the scale factor train_ae.py measured (1 / std of the "
            "training latents): retrain or re-measure the autoencoder rather than setting it"]


def describe_denoiser(denoiser: Denoiser, config, device: torch.device, world: World) -> None:
    n_params, n_unet = (sum(p.numel() for p in m.parameters()) / 1e6
                        for m in (denoiser, denoiser.unet))
    print(f"denoiser: {n_params:.2f} M parameters (UNet {n_unet:.2f} M), cond={config.cond}, "
          f"task={config.task}, device={device}"
          + (f", process {world.rank} of {world.size}" if world.enabled else ""))


def compiled(denoiser: Denoiser, config) -> Denoiser:
    """The denoiser with its UNet compiled in place under --compile (its state_dict keys stay the
    same)."""
    if config.compile:
        denoiser.unet.compile()
    return denoiser


# ----------------------------------------------------------------------------------------------
# --plan (see tinyldm.training.plan)


def plan_first_stage(cmd: list[str], path: Path, script_dir: Path) -> Path:
    """--plan without --ae: train_ae.py --plan prints the first stage's plan (and writes it beside
    `path`, in the plan's temporary folder); an untrained autoencoder of the same shape is saved at
    `path`, for the latents that the LDM's steps are timed on."""
    from ..autoencoder import Autoencoder, AutoencoderConfig
    from .checkpoint import save_checkpoint

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


def plan_latents(ae, ae_path: Path, config, data_root: str | None, out: Path, world: World,
                 device: torch.device) -> tuple[LatentTrainingSet, Stage]:
    """The latent cache of a few batches of the training set, timed: the full cache's time is
    that per image times the training images (twice with --hflip), its size likewise."""
    data, _ = data_configs(asdict(config), data_root)
    full = config.n_train if config.dataset == "shapes" else len(make_dataset(data, "train"))
    few = min(full, max(4 * config.batch_size, 64))
    start = time.perf_counter()
    subset = LatentTrainingSet.build(ae, ae_path, replace(config, n_train=few), data_root, out,
                                     world, device)
    seconds = (time.perf_counter() - start) / few * full
    size = (out / "latents.pt").stat().st_size / few * full
    return subset, Stage("latent cache", seconds * (2 if config.hflip else 1), images=full,
                         disk=int(size), how=f"encoded {few} of the {full} training images")


def plan(*, step: Callable[[int], dict], ema, save: Callable[[int], None], ckpt_path: Path,
         grid: Callable[[int], Path], grid_images: int, denoiser: Denoiser, cache: Stage,
         data: LatentTrainingSet, config, start: int, device: torch.device, out: Path,
         data_root: str | None, json_path: str | None) -> dict:
    """--plan: the LDM's time from real steps of `step` (with the EMA update), one grid and one
    checkpoint, and the final evaluation's sampling from the grid's time per image; the first
    stage's plan (from train_ae.py --plan) before it."""
    from .plan import (
        Stage,
        grids_and_checkpoints,
        memorising,
        report,
        seconds_once,
        seconds_per_call,
    )

    # the device holds the whole latent cache: what the timed few lack is added
    memory = check_memory(denoiser, data, config.batch_size, device)
    memory += cache.disk * max(0.0, 1 - len(data.latents) / max(cache.images, 1))

    def run(k: int) -> None:
        step(k)
        ema.update(denoiser)

    t_step = seconds_per_call(run, device, first=start)
    t_ckpt = seconds_once(lambda: save(start), device)
    updates, ema.num_updates, ema.said_young = ema.num_updates, 2**40, True
    # one row, the EMA's: a young EMA's grids draw a second row, counted below
    t_grid = seconds_once(lambda: grid(start), device)
    ema.num_updates = updates
    grids, ckpts, extra = grids_and_checkpoints(config.steps, start, config.sample_every,
                                                config.ckpt_every, t_grid, t_ckpt)
    young = sum(k < 1 / (1 - ema.decay) for k in range(start + 1, config.steps + 1)
                if k % config.sample_every == 0 or k == config.steps)
    extra += young * t_grid
    # the quality curve's points: its held-out items' samples at the grid's time per sample; where
    # it is a feature distance, the first point trains the evaluation's feature network
    points = sum(k % config.curve_every == 0 or k == config.steps
                 for k in range(start + 1, config.steps + 1)) if config.curve_every else 0
    data_cfg, shapes = data_configs(asdict(config), data_root)
    held_out = make_dataset(data_cfg, "eval", shapes=shapes)
    items = min(config.curve_images, len(held_out))
    t_point = items * t_grid / grid_images
    extra += points * t_point
    scored = has_task_score(TaskSpec.from_config(asdict(config)), config.dataset)
    needs_features = not scored and (points or config.eval_images > 0 and
                                      config.dataset != "shapes")
    features = (feature_network(config, make_dataset(data_cfg, "train", shapes=shapes), held_out,
                                device) if needs_features else None)
    curve_trains = bool(points) and features is not None
    extra += features[0] if curve_trains else 0.0
    size = ckpt_path.stat().st_size
    steps = config.steps - start
    stages = []
    first = out / "ae" / "plan.json"
    if first.exists():
        stages += [Stage(**{k: v for k, v in s.items() if k != "epochs"})
                   for s in json.loads(first.read_text())["stages"]]
    stages += [cache, Stage(
        f"LDM ({sum(p.numel() for p in denoiser.parameters()) / 1e6:.1f} M parameters)",
        steps * t_step + extra, steps, config.batch_size, cache.images, memory=memory, disk=size,
        how=f"{t_step * 1000:.0f} ms a step; {grids} grid(s) of {grid_images} samples "
            f"({t_grid:.1f} s each{f', {young} with the raw weights too' if young else ''}), "
            f"{ckpts} checkpoint(s) of {size / 1e6:.1f} MB"
            + (f"; {points} quality point(s) of {items} samples ({t_point:.1f} s each)"
               if points else "") + (f"; at the first, {features[1]}" if curve_trains else ""),
        notes=memorising(cache.images, steps, config.batch_size))]
    if config.eval_images > 0:
        stages.append(evaluation_stage(config, len(held_out), t_grid / grid_images,
                                       None if curve_trains else features))
    return report(stages, device, json_path=json_path)


def feature_network(config, train_set, held_out, device: torch.device) -> tuple[float, str]:
    """The time the evaluation's feature network takes to train on `train_set` (timed over 4 and 12
    of its steps: the difference is its time a step, the rest its setup; counted for
    --feature_steps), and how."""
    from ..evaluation.features import train_classifier, train_contrastive
    from ..tools.evaluate import choose_features

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
