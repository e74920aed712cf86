"""A second, differently built judge of prompt faithfulness on the shapes data, to check the shapes
evaluator.

The shapes evaluator (`tinyldm.data.shapes.score_images`) is hand-built: it finds objects by
connected components, names their colour by votes along colour blend lines and their shape by image
moments. This detector shares none of that:

* colour and shape: the argmax of tinyldm's feature classifier (`tinyldm.evaluation.features`), a
  small CNN trained on real shapes images to their 18 colour x shape classes; it pools over the
  whole image, so it does not locate anything;
* position: the centroid of the foreground, every pixel weighted by its RGB distance from the
  image's median colour (the background), read off the 3 x 3 grid.

It judges one-object prompts only (the quickstart's). Agreement of the two on ground-truth images
says both read the data; their disagreement on samples says how much a faithfulness figure depends
on the judge.

    python -m tinyldm.evaluation.second_detector --ckpt runs/ldm-shapes/ldm.pt --n 500
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tinyldm.cli import ArgumentParser, UsageError, run
from tinyldm.data.shapes import CLASS_NAMES, POSITIONS, parse_prompt, score_images


@dataclass
class Verdicts:
    color: Tensor  # (N,) bool: the attribute is what the prompt asked for
    shape: Tensor
    position: Tensor

    @property
    def all(self) -> Tensor:
        return self.color & self.shape & self.position

    def summary(self) -> dict[str, float]:
        return {k: float(getattr(self, k).float().mean())
                for k in ("all", "color", "shape", "position")}


def foreground_position(images: Tensor) -> list[str]:
    """The grid cell of each image's foreground centroid (pixels weighted by their distance from the
    median colour), as a position name."""
    x = (images.float() + 1) / 2  # (N, 3, H, W) in [0, 1]
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    weight = (x - background).norm(dim=1)  # (N, H, W)
    # ignore faint texture and noise
    weight = torch.where(weight > 0.15, weight, torch.zeros_like(weight))
    N, H, W = weight.shape
    total = weight.sum(dim=(1, 2)).clamp_min(1e-8)
    ys = (weight * torch.arange(H, dtype=torch.float32)[None, :, None]).sum(dim=(1, 2)) / total
    xs = (weight * torch.arange(W, dtype=torch.float32)[None, None, :]).sum(dim=(1, 2)) / total
    rows = (ys / H * 3).floor().clamp(0, 2).long()
    cols = (xs / W * 3).floor().clamp(0, 2).long()
    return [POSITIONS[3 * int(r) + int(c)] for r, c in zip(rows, cols, strict=True)]


@torch.no_grad()
def judge(images: Tensor, prompts: list[str], classifier: torch.nn.Module,
          batch_size: int = 256) -> Verdicts:
    """Per image, whether its colour, shape and position are the one-object prompt's, by this
    detector."""
    specs = [parse_prompt(p) for p in prompts]
    if any(len(s) != 1 for s in specs):
        raise ValueError("the second detector judges one-object prompts only")
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    logits = torch.cat([classifier(images[i:i + batch_size].float().to(device)).cpu()
                        for i in range(0, len(images), batch_size)])
    names = [CLASS_NAMES[int(k)].split(" ") for k in logits.argmax(dim=1)]
    positions = foreground_position(images)
    want = [s[0] for s in specs]
    return Verdicts(color=torch.tensor([n[0] == w.color for n, w in zip(names, want, strict=True)]),
                    shape=torch.tensor([n[1] == w.shape for n, w in zip(names, want, strict=True)]),
                    position=torch.tensor([p == w.position
                                           for p, w in zip(positions, want, strict=True)]))


def compare(images: Tensor, prompts: list[str], classifier: torch.nn.Module) -> dict:
    """Both judges on the same images: each one's scores, and how often their verdicts ("all
    attributes right") agree."""
    ours = judge(images, prompts, classifier)
    evaluator = score_images(images, prompts)
    theirs = torch.tensor([r["all"] == 1.0 for r in evaluator.per_image])
    return {"evaluator": {"all": evaluator.all, "color": evaluator.color, "shape": evaluator.shape,
                          "position": evaluator.position},
            "second_detector": ours.summary(),
            "agreement": float((ours.all == theirs).float().mean()), "n": len(images)}


def main(argv: list[str] | None = None) -> dict:
    # the command's heavier imports (data sets, models, the evaluate tool) only when it runs
    from tinyldm.checkpoint import load_checkpoint, load_ldm
    from tinyldm.data.images import make_dataset
    from tinyldm.data.tasks import TaskSpec, data_configs, generate_from_items, heldout_items
    from tinyldm.evaluation.features import load_classifier
    from tinyldm.tools.evaluate import feature_function

    p = ArgumentParser(prog="python -m tinyldm.evaluation.second_detector", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="a text-conditioned shapes checkpoint (the quickstart's)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.ckpt, kind="ldm")
    config = ckpt["train_config"]
    if config["dataset"] != "shapes":
        raise UsageError(f"{args.ckpt} was not trained on shapes: the second detector "
                         "knows only shapes")
    spec = TaskSpec.from_config(config)
    data, shapes = data_configs(config, None)
    items = heldout_items(spec, data, shapes, args.n)
    train_set = make_dataset(data, "train", shapes=shapes)
    # trains and saves the classifier beside the checkpoint if missing
    feature_function("classifier", train_set, lambda: make_dataset(data, "eval", shapes=shapes),
                     Path(args.ckpt).parent, torch.device("cpu"))
    classifier, _ = load_classifier(Path(args.ckpt).parent / "feature_classifier.pt")
    prompts = list(items["caption"])
    real = compare(items["image"], prompts, classifier)
    denoiser, schedule, ae, diffusion = load_ldm(ckpt)
    side = ckpt["image_size"] // ae.downsample_factor
    images = generate_from_items(denoiser, schedule, ae, spec, items, (side, side),
                                 torch.device("cpu"), prediction=diffusion.prediction,
                                 steps=args.steps, method=args.sampler,
                                 guidance_scale=args.guidance,
                                 generator=torch.Generator().manual_seed(args.seed))
    fake = compare(images, prompts, classifier)
    for name, r in (("held-out images (ground truth)", real),
                    (f"samples ({args.sampler}, {args.steps} steps, guidance {args.guidance:g})",
                     fake)):
        e, s = r["evaluator"], r["second_detector"]
        print(f"{name}, N = {r['n']}: evaluator {e['all']:.1%} (colour {e['color']:.1%}, shape "
              f"{e['shape']:.1%}, position {e['position']:.1%}); second detector {s['all']:.1%} "
              f"(colour {s['color']:.1%}, shape {s['shape']:.1%}, position {s['position']:.1%}); "
              f"same verdict on {r['agreement']:.1%} of images")
    return {"ground_truth": real, "samples": fake}


if __name__ == "__main__":
    run(main)
