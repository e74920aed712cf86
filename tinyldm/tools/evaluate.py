"""Sample N images from a trained LDM and measure them, with the protocol written next to the numbers.

    python -m tinyldm.tools.evaluate --ckpt runs/ldm-shapes/ldm.pt --n 1000 --json runs/ldm-shapes/metrics.json
    python -m tinyldm.tools.evaluate --ckpt runs/ldm-celeba64/ldm.pt --data /data/celeba --features inception \\
        --inception_weights pt_inception-2015-12-05-6726825d.pth

The protocol (printed, and stored in the JSON):

* reference set: the first N images of the held-out split of the checkpoint's own data set;
* generated set: one image per reference image, conditioned on that image's own caption, class, layout or
  task input (unconditional models: N samples), `--steps` DDIM steps with `--eta`, guidance `--guidance`, seed
  `--seed` (the sampler's noise comes from one generator, so the same flags give the same images);
* features: a small classifier trained by tinyldm on the training split's labels (`--features classifier`,
  reported as "FD (tinyldm classifier)"; trained once and saved beside the checkpoint), or Inception-v3
  through pytorch-fid (`--features inception`, reported as FID / KID);
* metrics: Frechet distance, KID (mean and std over 100 subsets of min(1000, N / 2)), precision / recall
  (k = 3); the same metrics between the reference set and N training images, the floor a perfect model
  would reach at this N (Frechet distances are biased upwards at small N, so compare models at the same
  N only); and where the data allow it, the task's own score (shapes evaluator, PSNR / SSIM).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tinyldm.data.images import make_dataset
from tinyldm.data.tasks import TaskSpec, data_configs, generate_from_items, heldout_items, scorable, score_items
from tinyldm.evaluation.features import InceptionFeatures, extract, load_classifier, save_classifier, train_classifier
from tinyldm.evaluation.metrics import frechet_from_features, kernel_distance, precision_recall
from tinyldm.ldm import load_ldm
from tinyldm.training.checkpoint import load_checkpoint
from tinyldm.training.flags import check_sampling_steps
from tinyldm.training.loop import pick_device


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0) -> dict:
    kid, kid_std = kernel_distance(real, fake, subsets=100, subset_size=min(1000, len(real) // 2),
                                   generator=torch.Generator().manual_seed(seed))
    precision, recall = precision_recall(real, fake, k=3)
    return {"fd": frechet_from_features(real, fake), "kid": kid, "kid_std": kid_std, "precision": precision,
            "recall": recall}


def feature_function(args: argparse.Namespace, train_config: dict, ckpt_path: Path, device: torch.device):
    """(callable images -> features, name of the Frechet distance, details for the protocol)."""
    if args.features == "inception":
        net = InceptionFeatures(args.inception_weights, device)
        return net, "FID", {"features": "Inception-v3 pool3 (pytorch-fid), 2048-d"}
    path = Path(args.classifier) if args.classifier else ckpt_path.parent / "feature_classifier.pt"
    if not path.exists():
        data, shapes = data_configs(train_config, args.data)
        train_set, eval_set = make_dataset(data, "train", shapes=shapes), make_dataset(data, "eval", shapes=shapes)
        names = getattr(train_set, "class_names", None) or []
        num_classes = len(names) or 1 + max(train_set[i]["class_id"] for i in range(min(len(train_set), 2000)))
        print(f"training the feature classifier on {len(train_set)} labelled training images ({num_classes} "
              f"classes, {args.classifier_steps} steps) -> {path}")
        model, meta = train_classifier(train_set, eval_set, num_classes, steps=args.classifier_steps, device=device)
        save_classifier(path, model, meta)
        print(f"held-out accuracy {meta['accuracy']:.1%} ({meta['train_seconds']:.0f} s)")
    model, meta = load_classifier(path)
    model = model.to(device)
    return (lambda x: model.features(x.to(device))), "FD (tinyldm classifier)", {
        "features": f"tinyldm classifier {path} (128-d, held-out accuracy {meta['accuracy']:.3f})"}


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    ckpt_path = Path(args.ckpt)
    ckpt = load_checkpoint(ckpt_path, kind="ldm")
    denoiser, schedule, ae, diffusion = load_ldm(ckpt)
    check_sampling_steps(schedule.T, args.steps)
    denoiser, ae = denoiser.to(device), ae.to(device)
    schedule = schedule.to(device)
    train_config = ckpt["train_config"]
    spec = TaskSpec.from_config(train_config)
    data, shapes = data_configs(train_config, args.data)
    items = heldout_items(spec, data, shapes, args.n)
    side = ckpt["image_size"] // ae.downsample_factor
    guidance = args.guidance if denoiser.cond.cfg.kind != "none" else 1.0
    protocol = {"checkpoint": str(ckpt_path), "n": args.n, "reference": f"first {args.n} held-out images of "
                f"{train_config['dataset']} at {ckpt['image_size']} px", "sampler": "ddim", "steps": args.steps,
                "eta": args.eta, "guidance": guidance, "seed": args.seed, "cond": spec.cond, "task": spec.task}
    g = torch.Generator(device).manual_seed(args.seed)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.amp):
        images = generate_from_items(denoiser, schedule, ae, spec, items, (side, side), device,
                                     prediction=diffusion.prediction, steps=args.steps, eta=args.eta,
                                     guidance_scale=guidance, generator=g).float()
    sample_seconds = time.perf_counter() - start
    feature_fn, fd_name, details = feature_function(args, train_config, ckpt_path, device)
    protocol.update(details, fd_name=fd_name)
    real, fake = extract(feature_fn, items["image"]), extract(feature_fn, images)
    train_set = make_dataset(data, "train", shapes=shapes)
    floor_images = torch.stack([train_set[i]["image"] for i in range(min(args.n, len(train_set)))])
    metrics = distribution_metrics(real, fake, seed=args.seed)
    floor = distribution_metrics(real, extract(feature_fn, floor_images), seed=args.seed)
    result = {"protocol": protocol, "metrics": metrics, "real_vs_train_floor": floor,
              "sample_seconds_per_image": sample_seconds / args.n}
    if scorable(spec, train_config["dataset"]) and (spec.cond != "none" or spec.has_concat):
        result["task_score"] = score_items(spec, items, images)
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()))
    print(f"{fd_name}: {metrics['fd']:.3f} (real vs train images: {floor['fd']:.3f}); KID {metrics['kid']:.4f} "
          f"+- {metrics['kid_std']:.4f} (floor {floor['kid']:.4f}); precision {metrics['precision']:.3f}, "
          f"recall {metrics['recall']:.3f}; {sample_seconds / args.n * 1e3:.1f} ms per image")
    if "task_score" in result:
        print("task score: " + ", ".join(f"{k} {v:.3f}" for k, v in result["task_score"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ldm.pt from train_ldm.py")
    p.add_argument("--n", type=int, default=1000, help="reference and generated images (compare at equal N only)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=3.0,
                   help="guidance scale (models with a cross-attended condition)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", choices=("classifier", "inception"), default="classifier")
    p.add_argument("--classifier", help="a feature classifier checkpoint (default: <ckpt dir>/feature_classifier.pt, "
                   "trained if missing)")
    p.add_argument("--classifier_steps", type=int, default=600)
    p.add_argument("--inception_weights", help="a local copy of pytorch-fid's weights file")
    p.add_argument("--data", help="the data root, for data sets that are not built in")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="bf16 autocast for sampling on CUDA")
    p.add_argument("--json", help="write the protocol and the numbers here")
    return evaluate_checkpoint(p.parse_args(argv))


if __name__ == "__main__":
    main()
