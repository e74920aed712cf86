"""The paper's central claim, measured on one folder of real images: at the same wall-clock
training budget, diffusion in an autoencoder's latent space (LDM) reaches better samples than
diffusion in pixel space (Sec. 1 and Fig. 6 of Rombach et al.). Three models train on one folder:

    (a) tinyldm's one command, `python train_ldm.py --data DIR --cond none`: the first stage and
        the LDM; its training time (the autoencoder's and the LDM loop's) is the budget;
    (b) tinyldm in pixel space, the paper's LDM-1: `train_ae.py --regularizer identity` (z = x,
        nothing to train), then `train_ldm.py` on the 32 x 32 x 3 pixels with the same UNet width
        and two more levels (channel_mult 1,2,2,2, attention at 8 and 4 as in (a)), for the budget
        (`--max_minutes`);
    (c) denoising-diffusion-pytorch (lucidrains), a pixel-space DDPM library, trained for the
        budget by the loop below with its README's recipe (Adam betas (0.9, 0.99), EMA 0.995 every
        10 steps, gradient clipping at 1, v-prediction, sigmoid schedule), scaled to the budget:
        `Unet(dim=32, dim_mults=(1, 2, 4))` (2.6 M parameters, a size that takes a few hundred
        steps in minutes on a CPU), batch 32, learning rate `--peer_lr` (its README's 8e-5 by
        default).

Each draws N images with 50 DDIM steps (timed). Their Frechet distance to a held-out reference
folder is measured on tinyldm's two feature networks (a classifier on the folder's classes where it
has them, and a label-free contrastive encoder, both trained on the training folder), with a 95%
bootstrap interval centred on the figure, beside the real-vs-real floor (N training images against
the same reference). One table is printed and written (compare.json, table.md) with a figure of the
three models' samples side by side (side_by_side.png).

    pip install -e ".[bench]"
    python -m tinyldm.data.example_folders fashion --out data/fashion
    python -m tinyldm.data.example_folders fashion --out data/fashion-test --split test \
        --per_class 100
    python -m tinyldm.tools.compare --data data/fashion --reference data/fashion-test \
        --out runs/compare

`--smoke` runs every part in seconds on any folder (a check of the plumbing, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tinyldm.checkpoint import load_checkpoint, load_ldm
from tinyldm.cli import UsageError, run
from tinyldm.data.images import DataConfig, folder_dataset
from tinyldm.evaluation.features import extract
from tinyldm.evaluation.metrics import frechet_bootstrap, frechet_from_features
from tinyldm.evaluation.viz import image_grid
from tinyldm.ldm import generate
from tinyldm.tools.evaluate import feature_function
from tinyldm.training.loop import pick_device

ROOT = Path(__file__).resolve().parents[2]  # the clone: train_ae.py and train_ldm.py live here
BATCH = 100  # images per sampling call
LABELS = {"latent": "(a) tinyldm LDM (f = 4)", "pixel": "(b) tinyldm LDM-1 (pixels)",
          "peer": "(c) denoising-diffusion-pytorch"}


def script(name: str, argv: list[str], log: Path) -> float:
    """`python <clone>/name argv`, its output into `log`; its wall time in seconds. A failure ends
    the benchmark naming the log."""
    path = ROOT / name
    if not path.exists():
        raise UsageError(f"{path} is not there: run the benchmark from a clone of tinyldm")
    start = time.perf_counter()
    with log.open("w") as out:
        status = subprocess.call([sys.executable, str(path), *argv], stdout=out,
                                 stderr=subprocess.STDOUT)
    if status:
        raise UsageError(f"{name} {' '.join(argv)} ended with status {status}: see {log}")
    return time.perf_counter() - start


def train_latent(data: Path, out: Path, smoke: bool) -> dict:
    """(a): the one command. The budget is what it spent training: the autoencoder's seconds and
    the LDM loop's (grids and quality points included, its evaluation not)."""
    wall = script("train_ldm.py", ["--data", str(data), "--cond", "none", "--out", str(out)]
                  + ["--smoke"] * smoke, out.parent / "latent.log")
    ae_seconds = json.loads((out / "ae" / "metrics.json").read_text())["train_seconds"]
    ldm = json.loads((out / "eval.json").read_text())
    return {"checkpoint": str(out / "ldm.pt"), "command_seconds": wall, "steps": ldm["steps"],
            "train_seconds": ae_seconds + ldm["train_loop_seconds"]}


def train_pixel(data: Path, out: Path, seconds: float, smoke: bool) -> dict:
    """(b): an identity first stage, then the LDM on pixels for `seconds` of training loop."""
    smoke_flags = ["--smoke"] * smoke
    script("train_ae.py", ["--data", str(data), "--regularizer", "identity", "--z_channels", "3",
                           "--channel_mult", "1", "--out", str(out / "ae")] + smoke_flags,
           out.parent / "pixel_ae.log")
    flags = ["--data", str(data), "--cond", "none", "--ae", str(out / "ae" / "autoencoder.pt"),
             "--out", str(out), "--channel_mult", "1,2,2,2", "--attn_resolutions", "8,4",
             "--curve_every", "0", "--eval_images", "16", "--max_minutes", f"{seconds / 60:.4f}"]
    flags += smoke_flags if smoke else ["--steps", "1000000", "--sample_every", "1000000",
                                        "--ckpt_every", "1000000"]
    script("train_ldm.py", flags, out.parent / "pixel.log")
    ldm = json.loads((out / "eval.json").read_text())
    return {"checkpoint": str(out / "ldm.pt"), "steps": ldm["steps"],
            "train_seconds": ldm["train_loop_seconds"]}


def peer_model(image_size: int, smoke: bool):
    try:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    except ImportError as e:
        raise UsageError("the pixel-space peer is denoising-diffusion-pytorch: "
                         "pip install -e '.[bench]'") from e
    unet = Unet(dim=8 if smoke else 32, dim_mults=(1, 2, 4), flash_attn=False)
    return GaussianDiffusion(unet, image_size=image_size, timesteps=1000,
                             sampling_timesteps=3 if smoke else 50)


def train_peer(images: torch.Tensor, seconds: float, *, lr: float, smoke: bool,
               seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(c): its README's loop for `seconds` (at least one step): batches of 32 drawn at random
    (seeded) from `images` in [-1, 1], Adam, gradient clipping, its EMA. Returns the EMA model."""
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    model = peer_model(images.shape[-1], smoke)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    ema = EMA(model, beta=0.995, update_every=10)
    g, steps, start = torch.Generator().manual_seed(seed), 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < seconds:
        batch = images[torch.randint(len(images), (32,), generator=g)]
        loss = model((batch + 1) / 2)  # the library takes images in [0, 1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update()
        steps += 1
    n_params = sum(p.numel() for p in model.model.parameters())
    return ema.ema_model.eval(), {"steps": steps, "train_seconds": time.perf_counter() - start,
                                  "parameters": n_params, "lr": lr}


@torch.no_grad()
def sample_ldm(ckpt: dict, n: int, device: torch.device, smoke: bool) -> torch.Tensor:
    """n unconditional samples of a `train_ldm.py` checkpoint (its EMA weights), 50 DDIM steps."""
    denoiser, schedule, ae, diffusion = load_ldm(ckpt)
    denoiser, schedule, ae = denoiser.to(device), schedule.to(device), ae.to(device)
    side = ckpt["image_size"] // ae.downsample_factor
    g = torch.Generator(device).manual_seed(0)
    return torch.cat([generate(denoiser, schedule, ae, None, n=min(BATCH, n - i),
                               latent_size=(side, side), prediction=diffusion.prediction,
                               steps=3 if smoke else 50, generator=g).cpu()
                      for i in range(0, n, BATCH)])


@torch.no_grad()
def sample_peer(model, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([model.sample(batch_size=min(BATCH, n - i)) * 2 - 1
                      for i in range(0, n, BATCH)]).clamp(-1, 1)


def timed(fn, *args) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def measure(feature_sets: dict, reference: dict, images: torch.Tensor) -> dict:
    """Each feature set's FD of `images` against the reference, with its centred interval."""
    out = {}
    for name, fn in feature_sets.items():
        fake = extract(fn, images)
        lo, hi = frechet_bootstrap(reference[name], fake, resamples=100,
                                   generator=torch.Generator().manual_seed(0))
        out[name] = {"fd": frechet_from_features(reference[name], fake), "interval": [lo, hi]}
    return out


def features(train_set, reference_set, folder: Path, device: torch.device, smoke: bool) -> dict:
    """The classifier's features where every training image has a class, and the contrastive
    encoder's, each trained on the training folder (kept in `folder`)."""
    steps = 20 if smoke else 600
    kinds = (["classifier"] if min(train_set.class_ids, default=-1) >= 0 else []) + ["contrastive"]
    return {kind: feature_function(kind, train_set, lambda: reference_set, folder, device,
                                   classifier_steps=steps, contrastive_steps=steps)[0]
            for kind in kinds}


def figure(samples: dict, path: Path) -> Path:
    """The three models' first 64 samples, side by side, each under its name."""
    panels = [Image.fromarray(image_grid(images[:64], nrow=8)) for images in samples.values()]
    w, h = panels[0].size
    canvas = Image.new("RGB", (len(panels) * (w + 16), h + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, panel) in enumerate(zip(samples, panels, strict=True)):
        canvas.paste(panel.convert("RGB"), (i * (w + 16), 24))
        draw.text((i * (w + 16) + 2, 6), LABELS[name], fill="black")
    canvas.save(path)
    return path


def table(rows: dict, floor: dict, n: int) -> str:
    kinds = list(floor)
    head = ("| model | parameters | training | steps | sampling N = " + f"{n:,} | "
            + " | ".join(f"FD ({k}) [95% interval]" for k in kinds) + " |")
    lines = [head, "|" + "---|" * (5 + len(kinds))]
    for name, r in rows.items():
        fds = " | ".join(f"{r['fd'][k]['fd']:.2f} [{r['fd'][k]['interval'][0]:.2f}, "
                         f"{r['fd'][k]['interval'][1]:.2f}]" for k in kinds)
        lines.append(f"| {LABELS[name]} | {r['parameters'] / 1e6:.2f} M | "
                     f"{r['train_seconds']:.0f} s | {r['steps']:,} | {r['sample_seconds']:.0f} s "
                     f"| {fds} |")
    floors = " | ".join(f"{floor[k]['fd']:.2f} [{floor[k]['interval'][0]:.2f}, "
                        f"{floor[k]['interval'][1]:.2f}]" for k in kinds)
    lines.append(f"| real vs real (N training images) | | | | | {floors} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the training folder (class sub-folders or not)")
    p.add_argument("--reference", required=True, help="a held-out folder of the same kind")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--n", type=int, default=500, help="samples per model (and training images "
                   "in the floor)")
    p.add_argument("--peer_lr", type=float, default=8e-5,
                   help="the peer's learning rate (its README's 8e-5 by default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="seconds-long, on any folder")
    args = p.parse_args(argv)
    out, device = Path(args.out), pick_device(args.device)
    n = 8 if args.smoke else args.n
    out.mkdir(parents=True, exist_ok=True)
    train_set = folder_dataset(DataConfig(source="folder", root=args.data, image_size=32), "all")
    reference_set = folder_dataset(DataConfig(source="folder", root=args.reference,
                                              image_size=32), "all")
    if len(reference_set) < 2 or len(train_set) < n:
        raise UsageError(f"--n {n} needs as many training images ({len(train_set)}) and a "
                         f"reference of at least 2 ({len(reference_set)})")

    rows = {"latent": train_latent(Path(args.data), out / "latent", args.smoke)}
    budget = min(rows["latent"]["train_seconds"], 5.0 if args.smoke else float("inf"))
    print(f"(a) trained in {budget:.0f} s: the budget of (b) and (c)", flush=True)
    rows["pixel"] = train_pixel(Path(args.data), out / "pixel", budget, args.smoke)
    images = torch.stack([train_set[i]["image"] for i in range(len(train_set))])
    peer, rows["peer"] = train_peer(images, budget, lr=args.peer_lr, smoke=args.smoke)
    print(f"(b) {rows['pixel']['steps']} steps, (c) {rows['peer']['steps']} steps", flush=True)

    samples = {}
    for name in ("latent", "pixel"):
        ckpt = load_checkpoint(rows[name]["checkpoint"], kind="ldm")
        rows[name]["parameters"] = sum(v.numel() for v in ckpt["denoiser"].values())
        samples[name], rows[name]["sample_seconds"] = timed(sample_ldm, ckpt, n, device,
                                                            args.smoke)
    samples["peer"], rows["peer"]["sample_seconds"] = timed(sample_peer, peer.to(device), n)

    feature_sets = features(train_set, reference_set, out, device, args.smoke)
    reference = {k: extract(fn, torch.stack([reference_set[i]["image"]
                                             for i in range(len(reference_set))]))
                 for k, fn in feature_sets.items()}
    g = torch.Generator().manual_seed(0)
    floor_images = images[torch.randperm(len(images), generator=g)[:n]]
    floor = measure(feature_sets, reference, floor_images)
    for name in rows:
        rows[name]["fd"] = measure(feature_sets, reference, samples[name].float())
    text = table(rows, floor, n)
    print(text)
    result = {"rows": rows, "floor": floor, "n": n, "reference_images": len(reference_set),
              "train_images": len(train_set), "budget_seconds": budget,
              "figure": str(figure(samples, out / "side_by_side.png"))}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    run(main)
