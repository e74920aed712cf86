"""What sample.py does beyond drawing from a checkpoint's own conditions, out of the reader's way:
`sample_from_inputs` (--from_eval: models that generate from held-out layouts, semantic maps,
low-resolution or masked images, shown inputs | samples | originals and scored) and
`sample_pretrained` (--pretrained: the paper's released models through tinyldm's own modules).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ..cli import UsageError
from ..data.image_conditions import masked_image, tile, untile, upsample_bicubic
from ..data.shapes import seg_palette
from ..data.tasks import (
    TaskSpec,
    data_configs,
    generate_from_items,
    heldout_items,
    scorable,
    score_items,
)
from ..evaluation.viz import label_image, save_image_grid
from ..memory import SamplingEstimate
from ..training.flags import check_sampling_steps


def sample_from_inputs(args: argparse.Namespace, ckpt: dict, denoiser, schedule, ae, diffusion,
                       device) -> dict:
    """Generate from held-out layouts / maps / low-res / masked images, show inputs | samples |
    originals, score."""
    train = ckpt["train_config"]
    spec = TaskSpec.from_config(train)
    size = train["image_size"]
    H, W = args.height or size, args.width or size
    # beyond the training size: each input is a k x k mosaic of held-out inputs (paper Fig. 9)
    k = H // size
    if H != W or H % size or (k > 1 and (denoiser.cond.cfg.kind != "none" or not spec.has_concat)):
        raise UsageError(f"--from_eval samples at the training size ({size}) or, for semantic / "
                         "superres / inpaint models without a cross-attended condition, at a "
                         f"square multiple of it ({2 * size}, ...)")
    f = ae.downsample_factor
    SamplingEstimate(denoiser, ae, (size // f, size // f)).check(
        args.from_eval, H, W, guided=denoiser.cond.cfg.kind != "none" and args.guidance != 1,
        device=device, step=size)
    items = heldout_items(spec, *data_configs(train, args.data), args.from_eval * k * k)
    g = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    options = dict(prediction=diffusion.prediction, steps=args.steps, eta=args.eta,
                   method=args.sampler,
                   guidance_scale=args.guidance if denoiser.cond.cfg.kind != "none" else 1.0,
                   generator=g)
    if k == 1:
        images = generate_from_items(denoiser, schedule, ae, spec, items, (size // f,) * 2, device,
                                     **options)
    else:  # generate the mosaics at k times the latent size, then cut them back into tiles to score
        spatial = ("image", "seg", "lowres", "mask")
        mosaic = {key: tile(v, k) for key, v in items.items() if key in spatial and v is not None}
        big = generate_from_items(denoiser, schedule, ae, spec, mosaic, (k * size // f,) * 2,
                                  device, **options)
        images = untile(big, k)
    seconds = time.perf_counter() - start
    if spec.task == "semantic":  # the map, each object in its class colour
        inputs = label_image(items["seg"], seg_palette())
    elif spec.task == "superres":  # the low-res input, blown up (bicubic) to the output size
        inputs = upsample_bicubic(items["lowres"], images.shape[-2:])
    elif spec.task == "inpaint":  # the known pixels, the hole grey
        inputs = masked_image(items["image"], items["mask"])
    else:  # a layout: the dataset's own rendering of it stands in
        inputs = items["image"]
    rows = [inputs, images] + ([items["image"]] if spec.has_concat else [])
    if k > 1:  # show the mosaics: inputs | samples | originals, one column per big image
        rows = [tile(r, k) for r in rows]
    out = save_image_grid(torch.cat(rows), args.out, nrow=len(rows[0]))
    scores = score_items(spec, items, images) if scorable(spec, train["dataset"]) else {}
    print(f"{len(images)} images from held-out inputs"
          f"{f' (in {k}x{k} mosaics of {H}x{W})' if k > 1 else ''} in {seconds:.2f} s "
          f"(cond={spec.cond}, task={spec.task}) -> {out}; "
          f"{', '.join(f'{name} {v:.3f}' for name, v in scores.items() if v is not None)}")
    return {"images": len(images), "seconds_per_image": seconds / len(images), "grid": str(out),
            **scores}


def sample_pretrained(args: argparse.Namespace, device: torch.device) -> dict:
    """--pretrained: n samples of an unconditional release, the x4 upscaling of --image, or n images
    per --prompt of the text-to-image release (guided by --guidance against the empty prompt)."""
    from ..pretrained import load

    model = load(args.pretrained, device=device)  # refuses weights the device cannot hold
    check_sampling_steps(model.schedule.T, args.steps)
    concat, prompts = None, None
    if model.prompted:
        if not args.prompt:
            raise UsageError(f"{args.pretrained} is text-to-image: pass at least one --prompt")
        tokenizer = model.denoiser.cond.tokenizer
        cut = [p for p, long in zip(args.prompt, tokenizer.truncated(args.prompt), strict=True)
               if long]
        if cut:
            print(f"warning: {len(cut)} prompt(s) longer than the model's {tokenizer.max_len} "
                  f"tokens are cut there, as in training: {cut[0][:60]!r}...")
        prompts = [p for p in args.prompt for _ in range(args.n)]
    elif args.prompt:
        raise UsageError(f"{args.pretrained} takes no --prompt "
                         "(only the text-to-image release does)")
    if model.denoiser.unet.cfg.concat_channels:
        if not args.image:
            raise UsageError(f"{args.pretrained} upscales an image: pass it with --image PATH")
        import numpy as np
        from PIL import Image

        pixels = torch.from_numpy(np.asarray(Image.open(args.image).convert("RGB"),
                                             dtype=np.float32))  # (h, w, 3)
        concat = (pixels.permute(2, 0, 1)[None] / 127.5 - 1).repeat(args.n, 1, 1, 1).to(device)
    elif args.image:
        raise UsageError(f"{args.pretrained} takes no --image "
                         "(only the super-resolution release does)")
    guidance = args.guidance if prompts else 1.0
    # the memory estimate, from one small probe: a crafted sample_size cannot ask for more unnoticed
    f, probe = model.autoencoder.downsample_factor, 2 ** len(model.denoiser.unet.cfg.channel_mult)
    H, W = ((model.image_size,) * 2 if concat is None
            else (f * concat.shape[-2], f * concat.shape[-1]))  # the low-res image is z_t's size
    n = len(prompts) if prompts else len(concat) if concat is not None else args.n
    SamplingEstimate(model.denoiser, model.autoencoder, (probe, probe)).check(
        n, H, W, guided=guidance != 1, device=device, step=f * probe // 2,
        size_from="set by unet/config.json's sample_size" if concat is None
        else "set by --image's size")
    g = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    images = model.generate(args.n, prompts=prompts, steps=args.steps, eta=args.eta,
                            method=args.sampler, guidance_scale=guidance,
                            concat=concat, generator=g).cpu()
    seconds = time.perf_counter() - start
    out = save_image_grid(images, args.out, nrow=min(len(images), 8) if prompts is None else args.n)
    if args.singles:
        for j, img in enumerate(images):
            save_image_grid(img[None], out.with_name(f"{out.stem}_{j:03d}.png"), nrow=1, pad=0)
    print(f"{len(images)} images ({images.shape[-2]}x{images.shape[-1]}) from {model.source} in "
          f"{seconds:.2f} s: {seconds / len(images) * 1000:.0f} ms per image ({args.sampler}, "
          f"{args.steps} steps{f', guidance {guidance:g}' if prompts else ''}, "
          f"device {device}) -> {out}")
    return {"images": len(images), "seconds_per_image": seconds / len(images), "grid": str(out)}


def check_sampling_flags(*, n: int, steps: int, eta: float, guidance: float, seed: int) -> None:
    """The sampling flags every tool shares (sample.py, the evaluate command), refused before any
    work."""
    if n < 1:
        raise UsageError(f"--n {n}: ask for at least one image (--n 1 or more)")
    if steps < 1:
        raise UsageError(f"--steps {steps}: the sampler needs at least one step "
                         "(50 is the default)")
    if not 0.0 <= eta <= 1.0:
        raise UsageError(f"--eta {eta:g}: DDIM's eta is in [0, 1] "
                         "(0 deterministic, 1 as stochastic as DDPM)")
    if not math.isfinite(guidance) or guidance < 0:
        raise UsageError(f"--guidance {guidance:g}: use a scale >= 0 "
                         "(1 = no guidance, 3-8 typical)")
    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed {seed}: use a seed in 0 .. 2**63 - 1")
