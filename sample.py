"""Sample images from a trained latent diffusion model (one self-contained train_ldm.py checkpoint).

    python sample.py --ckpt runs/ldm-shapes/ldm.pt --prompt "a red circle in the top left" --n 8
    python sample.py --ckpt runs/ldm-shapes_class/ldm.pt --class "red circle" --n 16 --steps 25
    python sample.py --ckpt runs/ldm-celeba64/ldm.pt --n 16 --height 128 --width 128  # beyond 64 px
    python sample.py --ckpt runs/ldm-shapes_semantic/ldm.pt --from_eval 4 --height 64 --width 64
    python sample.py --pretrained CompVis/ldm-celebahq-256 --n 4  # a released model (see below)
    python sample.py --pretrained CompVis/ldm-super-resolution-4x-openimages --image small.png  # x4
    python sample.py --pretrained CompVis/ldm-text2im-large-256 --prompt "a squirrel" --guidance 5

Each --prompt (repeatable) or --class gets --n images; without either, the model samples
unconditionally. Writes a grid (--out, one row per prompt) and, with --singles, one PNG per image.
For models trained on the shapes dataset, it also prints the exact evaluator's prompt faithfulness.

Models that generate from an input (layouts, semantic maps, low-resolution or masked images:
train_ldm.py's --cond layout and --task semantic / superres / inpaint) take theirs from the first
--from_eval N held-out images; the grid's first row shows the inputs, the second the samples, the
last the originals. With --height/--width k times the training size, each input is a k x k mosaic.

--pretrained ID_OR_DIR runs one of the paper's released models (a diffusers-format folder, or a hub
id with the `pretrained` extra) through tinyldm's own UNet, autoencoder and sampler
(`tinyldm.pretrained`); the super-resolution model upscales --image, the text-to-image one --prompt.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tinyldm.checkpoint import load_checkpoint, load_ldm
from tinyldm.cli import ArgumentParser, UsageError, check_writable, run
from tinyldm.data.shapes import parse_prompt, score_images
from tinyldm.ddim import METHODS
from tinyldm.evaluation.ldm_score import generate_in_chunks
from tinyldm.evaluation.viz import save_image_grid
from tinyldm.memory import SamplingEstimate
from tinyldm.tools.sampling import check_sampling_flags, sample_from_inputs, sample_pretrained
from tinyldm.training.flags import check_sampling_steps
from tinyldm.training.loop import pick_device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="ldm.pt written by train_ldm.py")
    what.add_argument("--pretrained", metavar="ID_OR_DIR", help="a released model: hub id or dir")
    p.add_argument("--image", help="--pretrained super-resolution: the low-res image to upscale")
    p.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    p.add_argument("--class", dest="class_name", action="append", default=[], help="(repeatable)")
    p.add_argument("--n", type=int, default=8, help="images per prompt / class (or in all if none)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity: 0 none, 1 like DDPM")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (1: none)")
    p.add_argument("--sampler", choices=list(METHODS), default="ddim",
                   help="ddim (--eta), ddpm, plms (CompVis' LDM sampler; 1 extra evaluation) or "
                        "dpmpp (DPM-Solver++(2M): 5-10 steps match DDIM's 50, docs/samplers.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="height in px (default: training size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="samples.png", help="the grid")
    p.add_argument("--singles", action="store_true", help="also save each as <out stem>_NNN.png")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--from_eval", type=int, default=0, metavar="N",
                   help="layout / semantic / superres / inpaint: generate from N held-out inputs")
    p.add_argument("--data", default=None, help="--from_eval's folder / celeba / lsun data path")
    p.add_argument("--device", default="auto")
    return check_args(p.parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse, before any work, values that cannot be meant: each check names flag and range."""
    check_sampling_flags(n=args.n, steps=args.steps, eta=args.eta, guidance=args.guidance,
                         seed=args.seed)
    for flag in ("height", "width"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: give a positive size in pixels")
    if args.from_eval < 0:
        raise UsageError(f"--from_eval {args.from_eval}: give a number of held-out inputs, "
                         "1 or more")
    check_writable(args.out, "--out")
    return args


def conditions(args: argparse.Namespace, kind: str, class_names: list[str], tokenizer,
               max_len: int) -> list:
    """One entry per image: captions, class ids, or [None]."""
    if kind == "text":
        if args.class_name:
            raise UsageError("this model is text-conditioned: use --prompt, not --class")
        if not args.prompt:
            print("no --prompt: sampling with the empty (null) caption, i.e. unconditionally")
            return [""] * args.n
        for prompt in args.prompt:
            try:
                tokenizer([prompt], max_len)  # refuses captions longer than the token positions
            except ValueError as e:
                raise UsageError(f"--prompt: {e}: this model reads at most {max_len} tokens; "
                                 "shorten the prompt (or train with a larger "
                                 "--max_tokens)") from None
            unknown = tokenizer.unknown_words(prompt)
            if unknown:
                print(f"warning: {prompt!r} has words the model never saw in training: {unknown} "
                      "(read as <unk>)")
        return [p for p in args.prompt for _ in range(args.n)]
    if kind == "class":
        if args.prompt:
            raise UsageError("this model is class-conditional: use --class NAME, not --prompt")
        ids = []
        for name in args.class_name or []:
            if name not in class_names:
                raise UsageError(f"unknown class {name!r}; this model knows: "
                                 f"{', '.join(class_names)}")
            ids += [class_names.index(name)] * args.n
        return ids or [len(class_names)] * args.n  # no --class: the null class, i.e. unconditional
    if args.prompt or args.class_name:
        raise UsageError("this model is unconditional: drop --prompt / --class")
    return [None] * args.n


def check_size(H: int, W: int, ae, denoiser) -> int:
    """Refuse sizes the autoencoder or UNet cannot produce; returns the autoencoder's factor f."""
    f = ae.downsample_factor
    if H % f or W % f:
        raise UsageError(f"--height/--width must be multiples of the autoencoder's factor f={f}")
    down = 2 ** (len(denoiser.unet.cfg.channel_mult) - 1)
    if (H // f) % down or (W // f) % down:
        raise UsageError(f"--height/--width must be multiples of {f * down} for this UNet")
    return f


def prompt_faithfulness(prompts: list[str], images: torch.Tensor, captions: list[str]) -> dict:
    """The shapes evaluator's score of text-to-image samples ({} for a non-shapes prompt)."""
    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ValueError as err:
        print(f"(no prompt-faithfulness score: {err})")
        return {}
    score = score_images(images, captions)
    print(f"shapes evaluator: all attributes right {score.all:.1%} (color {score.color:.1%}, shape "
          f"{score.shape:.1%}, position {score.position:.1%})")
    return {"prompt_faithfulness": score.all}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.pretrained:
        return sample_pretrained(args, device)
    ckpt = load_checkpoint(args.ckpt, kind="ldm", device=device)  # refuses what it cannot hold
    denoiser, schedule, ae, diffusion = load_ldm(ckpt, use_ema=not args.no_ema)
    check_sampling_steps(schedule.T, args.steps)
    denoiser, ae, schedule = denoiser.to(device), ae.to(device), schedule.to(device)
    kind = denoiser.cond.cfg.kind
    task = ckpt.get("train_config", {}).get("task", "generate")
    if kind == "layout" or task != "generate":
        if not args.from_eval:
            what = "layouts" if kind == "layout" else f"its {task} input"
            raise UsageError(f"this model generates from {what}: pass --from_eval N to use the "
                             "first N held-out inputs")
        return sample_from_inputs(args, ckpt, denoiser, schedule, ae, diffusion, device)
    if args.from_eval:
        raise UsageError("--from_eval is for layout / semantic / superres / inpaint models; "
                         "this one takes --prompt / --class")
    tokenizer = denoiser.cond.text.tokenizer if kind == "text" else None
    conds = conditions(args, kind, ckpt.get("class_names", []), tokenizer,
                       denoiser.cond.cfg.max_len if kind == "text" else 0)
    H, W = args.height or ckpt["image_size"], args.width or ckpt["image_size"]
    f = check_size(H, W, ae, denoiser)
    side = ckpt["image_size"] // f  # the memory estimate, from one probe at the training size
    SamplingEstimate(denoiser, ae, (side, side)).check(
        len(conds), H, W, guided=kind != "none" and args.guidance != 1, device=device,
        step=f * 2 ** (len(denoiser.unet.cfg.channel_mult) - 1))
    g = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    condition = None if kind == "none" else conds if kind == "text" else torch.tensor(conds)
    images = generate_in_chunks(
        denoiser, schedule, ae, condition, len(conds), latent_size=(H // f, W // f),
        prediction=diffusion.prediction, steps=args.steps, eta=args.eta, method=args.sampler,
        guidance_scale=args.guidance if kind != "none" else 1.0, generator=g)
    seconds = time.perf_counter() - start
    out = save_image_grid(images, args.out, nrow=args.n if args.n <= 16 else 16)
    if args.singles:
        for j, img in enumerate(images):
            save_image_grid(img[None], out.with_name(f"{out.stem}_{j:03d}.png"), nrow=1, pad=0)
    print(f"{len(images)} images ({H}x{W}) in {seconds:.2f} s: "
          f"{seconds / len(images) * 1000:.0f} ms per image ({args.sampler}, {args.steps} steps, "
          f"guidance {args.guidance if kind != 'none' else 'none'}, device {device}) -> {out}")
    result = {"images": len(images), "seconds_per_image": seconds / len(images), "grid": str(out)}
    if kind == "text" and args.prompt and ckpt["train_config"].get("dataset") == "shapes":
        result.update(prompt_faithfulness(args.prompt, images, conds))
    return result


if __name__ == "__main__":
    run(main, sys.argv[1:])
