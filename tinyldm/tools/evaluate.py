"""Sample N images from a trained LDM and measure them, with the protocol written next to the
numbers.

    python -m tinyldm.tools.evaluate --ckpt runs/ldm-shapes/ldm.pt --n 1000 \\
        --json runs/ldm-shapes/metrics.json
    python -m tinyldm.tools.evaluate --ckpt runs/ldm-photos/ldm.pt --data photos/ --n 500
    python -m tinyldm.tools.evaluate --ckpt runs/ldm-shapes/ldm.pt --n 500 \\
        --sweep_steps 5 10 20 50   # a table per sampler
    python -m tinyldm.tools.evaluate --ckpt runs/ldm-celeba64/ldm.pt --data /data/celeba \\
        --features inception --inception_weights pt_inception-2015-12-05-6726825d.pth
    python -m tinyldm.tools.evaluate --pretrained CompVis/ldm-celebahq-256 --data /data/celebahq \\
        --n 1000 --features inception   # the paper's released model, on the same scale

From Python (e.g. at the end of training): `measure_checkpoint(ckpt_path, data_root, n, steps,
guidance, device)` returns the dict the command prints and writes.

The protocol (printed, and stored in the JSON):

* reference set: the first N images of the held-out split of the checkpoint's own data set (a small
  folder may hold out fewer than N: then all of them, and N is that number, said in one line);
* generated set: one image per reference image, conditioned on that image's own caption, class,
  layout or task input (unconditional models: N samples), `--steps` steps of `--sampler` (DDIM with
  `--eta` by default), guidance `--guidance`, seed
  `--seed` (the sampler's noise comes from one generator, so the same flags give the same images);
* features (`tinyldm.evaluation.features`), `--features auto` by default: a small classifier trained
  by tinyldm on the training split's labels when every training image has one (shapes, class
  sub-folders; reported as "FD (tinyldm classifier)"), else a small SimCLR encoder trained by
  tinyldm on the training images alone (reported as "FD (tinyldm contrastive features)"); either is
  trained once and saved beside the checkpoint (feature_classifier.pt, feature_contrastive.pt).
  `--features inception`: Inception-v3 through pytorch-fid, the only features reported as FID / KID;
* a released model (`--pretrained`, `tinyldm.pretrained.load`) is measured the same way against
  the held-out split of `--data` (read as `--dataset`) at its own image size; its feature networks
  are kept in runs/features/<data>-<size>px/. To place it and a model trained here on one scale,
  give both the same reference folder and the same features (`--features inception`, or the same
  `--contrastive` file) at the same N;
* metrics: Frechet distance with a 95% bootstrap interval centred on it (`--bootstrap`
  resamples of both feature sets, default 100), KID (mean and std over 100 subsets of
  max(2, min(1000, N / 2))),
  precision / recall (k = min(3, N - 1)); the same metrics between the reference set and N training
  images drawn at random (of each reference image's class, where the data have classes), the
  real-vs-real floor a perfect model would reach at this N (Frechet distances are biased upwards at
  small N, so compare models at the same N only); and where the data allow it, the task's own score
  (shapes evaluator, PSNR / SSIM). Every printed figure carries the protocol on its line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyldm.checkpoint import load_checkpoint, load_ldm
from tinyldm.cli import ArgumentParser, UsageError, check_writable, run
from tinyldm.data.images import make_dataset
from tinyldm.data.tasks import (
    TaskSpec,
    data_configs,
    generate_from_items,
    has_task_score,
    heldout_items,
    score_items,
)
from tinyldm.ddim import METHODS
from tinyldm.evaluation.features import (
    ContrastiveEncoder,
    InceptionFeatures,
    extract,
    labelled,
    load_classifier,
    load_feature_net,
    save_feature_net,
    train_classifier,
    train_contrastive,
)
from tinyldm.evaluation.metrics import (
    frechet_bootstrap,
    frechet_from_features,
    kernel_distance,
    precision_recall,
)
from tinyldm.tools.sampling import check_sampling_flags
from tinyldm.training.flags import check_sampling_steps
from tinyldm.training.loop import pick_device

FEATURES = ("auto", "classifier", "contrastive", "inception")


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0) -> dict:
    """Frechet distance, KID and precision / recall between two feature sets (N >= 2 each). KID's
    subsets (max(2, min(1000, N / 2)) features) and the neighbourhoods' k (min(3, N - 1)) shrink
    with tiny N and are returned with the numbers."""
    n = min(len(real), len(fake))
    subset_size, k = max(2, min(1000, n // 2)), min(3, n - 1)
    kid, kid_std = kernel_distance(real, fake, subsets=100, subset_size=subset_size,
                                   generator=torch.Generator().manual_seed(seed))
    precision, recall = precision_recall(real, fake, k=k)
    return {"fd": frechet_from_features(real, fake), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall, "kid_subset_size": subset_size, "k": k}


def choose_features(features: str, train_set, *, classifier: str | None = None,
                    contrastive: str | None = None) -> tuple[str, str]:
    """(the feature kind, why): `auto` is the network whose file was given, else the classifier when
    every training image has a class, else the contrastive encoder; any other kind is taken as
    asked."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    if features != "auto":
        return features, "asked for"
    if classifier or contrastive:
        return ("classifier", "auto: --classifier was given") if classifier else (
            "contrastive", "auto: --contrastive was given")
    if labelled(train_set):
        return "classifier", "auto: every training image has a class label"
    return "contrastive", "auto: the training images have no class labels"


def feature_function(kind: str, train_set, eval_set_fn, folder: Path, device: torch.device, *,
                     classifier: str | None = None, classifier_steps: int = 600,
                     contrastive: str | None = None, contrastive_steps: int = 600,
                     inception_weights: str | None = None):
    """(callable images -> features, name of the Frechet distance, details for the protocol). The
    tinyldm networks are read from their file (default: in `folder`), or trained on
    `train_set` and saved there first; `eval_set_fn()` gives the held-out split their training
    reports on."""
    if kind == "inception":
        net = InceptionFeatures(inception_weights, device)
        return net, "FID", {"features": "Inception-v3 pool3 (pytorch-fid), 2048-d"}
    if kind == "classifier":
        path = Path(classifier) if classifier else folder / "feature_classifier.pt"
        if not path.exists():
            if not labelled(train_set):
                raise UsageError("--features classifier needs class labels (class sub-folders, a "
                                 "CelebA attribute or the shapes data); these training images have "
                                 "none: use --features contrastive (or auto)")
            names = getattr(train_set, "class_names", None) or []
            num_classes = len(names) or 1 + max(train_set[i]["class_id"]
                                                for i in range(min(len(train_set), 2000)))
            print(f"training the feature classifier on {len(train_set)} labelled training images "
                  f"({num_classes} classes, {classifier_steps} steps) -> {path}")
            model, meta = train_classifier(train_set, eval_set_fn(), num_classes,
                                           steps=classifier_steps, device=device)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_feature_net(path, model, meta)
            print(f"held-out accuracy {meta['accuracy']:.1%} ({meta['train_seconds']:.0f} s)")
        model, meta = load_classifier(path)
        model = model.to(device)
        return (lambda x: model.features(x.to(device))), "FD (tinyldm classifier)", {
            "features": f"tinyldm classifier {path} (128-d, held-out accuracy "
                        f"{meta['accuracy']:.3f})"}
    path = Path(contrastive) if contrastive else folder / "feature_contrastive.pt"
    if not path.exists():
        print(f"training the contrastive feature network (SimCLR) on {len(train_set)} training "
              f"images, no labels ({contrastive_steps} steps) -> {path}")
        model, meta = train_contrastive(train_set, eval_set_fn(), steps=contrastive_steps,
                                        device=device)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_feature_net(path, model, meta)
        print(f"held-out view retrieval {meta['view_retrieval']:.1%} "
              f"(chance {1 / meta['eval_images']:.1%}), final loss {meta['loss']:.3f} "
              f"({meta['train_seconds']:.0f} s)")
    model, meta = load_feature_net(path, ContrastiveEncoder)
    model = model.to(device)
    return (lambda x: model.features(x.to(device))), "FD (tinyldm contrastive features)", {
        "features": f"tinyldm contrastive encoder {path} (128-d, before the projection head; "
                    f"{meta['steps']} steps on {meta['train_images']} training images, held-out "
                    f"view retrieval {meta['view_retrieval']:.3f})"}


def floor_indices(train_set, held_out_classes: torch.Tensor, *,
                  seed: int = 0) -> tuple[list[int], str]:
    """Training images for the real-vs-real floor, as many as there are held-out images, drawn at
    random (seeded): of the same class as each held-out image where both sets have classes (a
    folder's files are sorted by class, so its first N would all be one class), else from the whole
    training set. Returns (indices, how)."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(held_out_classes), len(train_set))
    train_classes = getattr(train_set, "class_ids", None)
    if (train_classes is None or min(train_classes, default=-1) < 0
            or int(held_out_classes.min()) < 0):
        return torch.randperm(len(train_set), generator=g)[:n].tolist(), "drawn at random (seeded)"
    by_class: dict[int, list[int]] = {}
    for i in torch.randperm(len(train_set), generator=g).tolist():
        by_class.setdefault(int(train_classes[i]), []).append(i)
    picked = [by_class[c].pop() for c in held_out_classes[:n].tolist() if by_class.get(c)]
    if len(picked) < n:  # a class with fewer training than held-out images: fill from the rest
        rest = [i for ids in by_class.values() for i in ids]
        picked += [rest[j]
                   for j in torch.randperm(len(rest), generator=g)[: n - len(picked)].tolist()]
    return picked, "one of each held-out image's class, drawn at random (seeded)"


@dataclass
class Prepared:
    """What measuring a checkpoint needs before it samples: the model, the held-out items, the
    features."""
    denoiser: torch.nn.Module
    schedule: object
    ae: torch.nn.Module
    diffusion: object
    spec: TaskSpec
    items: dict
    side: int
    guidance: float
    feature_fn: object
    fd_name: str
    protocol: dict
    real: torch.Tensor
    floor: dict
    device: torch.device
    scorable: bool


def _device(device: str | torch.device) -> torch.device:
    return pick_device(device) if isinstance(device, str) else torch.device(device)


def prepare(ckpt_path: str | Path, data_root: str | None, n: int, guidance: float,
            device: str | torch.device, features: str, *, seed: int = 0,
            steps: tuple[int, ...] = (), **feature_options) -> Prepared:
    """Load a checkpoint trained here, pick the held-out items and the features, and measure the
    real-vs-real floor. `steps`: the step counts that will be sampled, checked before any work;
    `feature_options`: `prepare_model`'s."""
    device, ckpt_path = _device(device), Path(ckpt_path)
    ckpt = load_checkpoint(ckpt_path, kind="ldm", device=device)
    train_config = ckpt["train_config"]
    if train_config["dataset"] != "shapes" and not data_root:
        raise UsageError(f"{ckpt_path} was trained on {train_config['dataset']} images: give their "
                         "folder with --data (the checkpoint does not store it)")
    denoiser, schedule, ae, diffusion = load_ldm(ckpt)
    for k in steps:
        check_sampling_steps(schedule.T, k)
    return prepare_model((denoiser.to(device), schedule.to(device), ae.to(device), diffusion),
                         train_config, ckpt["image_size"], data_root, n, guidance, device,
                         features, source=str(ckpt_path), feature_dir=ckpt_path.parent,
                         seed=seed, **feature_options)


def prepare_pretrained(folder: str, data_root: str | None, dataset: str, n: int, guidance: float,
                       device: str | torch.device, features: str, *, seed: int = 0,
                       steps: tuple[int, ...] = (), **feature_options) -> Prepared:
    """The same for a released model (`tinyldm.pretrained.load`: a diffusers-format folder or a hub
    id), measured against the held-out split of `data_root` read as `dataset` at the model's own
    image size: unconditional releases draw one image per held-out image, the text-to-image release
    one per held-out caption, the super-resolution release upscales each held-out image's 4x
    smaller copy. The tinyldm feature networks are trained on that data's training split and kept in
    runs/features/<data>-<size>px/ (pass --contrastive / --classifier to use another file)."""
    from tinyldm.pretrained import load

    device = _device(device)
    if not data_root:
        raise UsageError(f"--pretrained {folder} needs --data: the folder of real images its "
                         "samples are compared with (e.g. CelebA-HQ for CompVis/ldm-celebahq-256)")
    model = load(folder, device=device)
    for k in steps:
        check_sampling_steps(model.schedule.T, k)
    concat = model.denoiser.unet.cfg.concat_channels
    train_config = {"dataset": dataset, "image_size": model.image_size, "n_train": 0,
                    "cond": "text" if model.prompted else "none",
                    "task": "superres" if concat else "generate", "sr_factor": 4}
    if model.prompted and dataset == "shapes":
        raise UsageError("the text-to-image release is measured on captioned images: give a folder "
                         "with captions (--dataset folder)")
    name = f"{Path(data_root).resolve().name}-{model.image_size}px"
    return prepare_model((model.denoiser, model.schedule, model.autoencoder, model.diffusion),
                         train_config, model.image_size, data_root, n, guidance, device, features,
                         source=model.source, feature_dir=Path("runs/features") / name, seed=seed,
                         **feature_options)


def prepare_model(model: tuple, train_config: dict, image_size: int, data_root: str | None,
                  n: int, guidance: float, device: torch.device, features: str | None, *,
                  source: str, feature_dir: Path, seed: int = 0, classifier: str | None = None,
                  classifier_steps: int = 600, contrastive: str | None = None,
                  contrastive_steps: int = 600, inception_weights: str | None = None) -> Prepared:
    """`model` = (denoiser, schedule, autoencoder, diffusion config) on `device`, trained on the
    data `train_config` describes: its first n held-out items, the features (None: none, for a
    task score alone; the tinyldm networks are read from, or trained into, `feature_dir`) and the
    real-vs-real floor."""
    denoiser, schedule, ae, diffusion = model
    spec = TaskSpec.from_config(train_config)
    data, shapes = data_configs(train_config, data_root)
    items = heldout_items(spec, data, shapes, n, allow_fewer=True)
    N = len(items["image"])
    if N < 2:
        raise UsageError(f"the held-out split has {N} image: distribution metrics need at least 2 "
                         "(add images to the folder: about 5% of its files are held out)")
    if N < n:
        print(f"the held-out split has only {N} images, fewer than the {n} asked for: using all "
              f"{N} (and {N} training images for the floor)")
    if spec.cond == "text" and not any(items["caption"]):
        raise UsageError(f"{source} is text-conditioned, and the held-out images of {data_root} "
                         "have no captions: give a folder with captions (metadata.jsonl or a .txt "
                         "beside each image; docs/data.md)")
    guidance = guidance if spec.cond != "none" else 1.0
    protocol = {"checkpoint": source, "n": N, "n_requested": n,
                "reference": f"first {N} held-out images of {train_config['dataset']} at "
                             f"{image_size} px", "guidance": guidance, "seed": seed,
                "cond": spec.cond, "task": spec.task}
    feature_fn, fd_name, real, floor = None, None, None, None
    if features is not None:
        train_set = make_dataset(data, "train", shapes=shapes)
        kind, why = choose_features(features, train_set, classifier=classifier,
                                    contrastive=contrastive)
        print(f"features: {kind} ({why})")
        feature_fn, fd_name, details = feature_function(
            kind, train_set, lambda: make_dataset(data, "eval", shapes=shapes), feature_dir,
            device, classifier=classifier, classifier_steps=classifier_steps,
            contrastive=contrastive, contrastive_steps=contrastive_steps,
            inception_weights=inception_weights)
        floor_idx, how = floor_indices(train_set, items["class_id"], seed=seed)
        floor_images = torch.stack([train_set[i]["image"] for i in floor_idx])
        real = extract(feature_fn, items["image"])
        protocol.update(details, feature_kind=kind, feature_dim=real.shape[1], fd_name=fd_name,
                        floor=f"the same {N} held-out images vs {len(floor_images)} training "
                        f"images, {how}")
        floor = distribution_metrics(real, extract(feature_fn, floor_images), seed=seed)
    return Prepared(denoiser, schedule, ae, diffusion, spec, items,
                    image_size // ae.downsample_factor, guidance, feature_fn, fd_name,
                    protocol, real, floor, device,
                    has_task_score(spec, train_config["dataset"]))


def measure(p: Prepared, *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0,
            amp: bool = True, bootstrap: int = 100) -> dict:
    """Sample one image per held-out item with `sampler` and measure them: metrics (with a 95%
    bootstrap interval of the FD over `bootstrap` resamples; 0: none), task score, time."""
    check_sampling_steps(p.schedule.T, steps)
    g = torch.Generator(p.device).manual_seed(seed)
    start = time.perf_counter()
    with torch.autocast(p.device.type, dtype=torch.bfloat16,
                        enabled=p.device.type == "cuda" and amp), torch.no_grad():
        images = generate_from_items(p.denoiser, p.schedule, p.ae, p.spec, p.items,
                                     (p.side, p.side), p.device, prediction=p.diffusion.prediction,
                                     steps=steps, eta=eta, method=sampler,
                                     guidance_scale=p.guidance, generator=g).float()
    seconds = time.perf_counter() - start
    out = {"sample_seconds_per_image": seconds / len(images),
           "network_evaluations": steps + (sampler == "plms")}
    if p.feature_fn is not None:
        fake = extract(p.feature_fn, images)
        out["metrics"] = distribution_metrics(p.real, fake, seed=seed)
        if bootstrap:
            out["metrics"]["fd_interval"] = list(frechet_bootstrap(
                p.real, fake, resamples=bootstrap, generator=torch.Generator().manual_seed(seed)))
            out["metrics"]["fd_bootstrap_resamples"] = bootstrap
    if p.scorable:
        out["task_score"] = score_items(p.spec, p.items, images)
    return out


def protocol_tag(protocol: dict) -> str:
    """The protocol in one line, printed after every figure: N, reference set, sampler and steps,
    guidance and seed, features, and the bootstrap."""
    sampler = (f"{protocol['sampler']} {protocol['steps']} steps, eta {protocol['eta']:g}, "
               if "sampler" in protocol else "")
    boot = protocol.get("bootstrap")
    return (f"[N={protocol['n']} generated vs the {protocol['reference']}; {sampler}guidance "
            f"{protocol['guidance']:g}, seed {protocol['seed']}; features: "
            f"{protocol.get('features', 'none')}"
            + (f"; FD interval: 95% bootstrap centred on the FD, {boot} resamples" if boot else "")
            + f"; model: {protocol['checkpoint']}]")


def report(protocol: dict, fd_name: str | None, measured: dict, floor: dict | None) -> dict:
    """Print every figure with its protocol; returns the result the JSON holds."""
    tag = protocol_tag(protocol)
    result = {"protocol": protocol,
              "sample_seconds_per_image": measured["sample_seconds_per_image"]}
    if fd_name is not None:
        metrics = measured["metrics"]
        result.update(metrics=metrics, real_vs_train_floor=floor)
        interval = metrics.get("fd_interval")
        inside = f" (95% interval {interval[0]:.3f} to {interval[1]:.3f})" if interval else ""
        print(f"{fd_name}: {metrics['fd']:.3f}{inside}; real-vs-real floor at N={protocol['n']}: "
              f"{floor['fd']:.3f} {tag}")
        print(f"KID {metrics['kid']:.4f} +- {metrics['kid_std']:.4f} [floor {floor['kid']:.4f}]; "
              f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} "
              f"(k = {metrics['k']}) {tag}")
    if "task_score" in measured:
        result["task_score"] = measured["task_score"]
        print("task score: " + ", ".join(f"{k} {v:.3f}" for k, v in measured["task_score"].items())
              + f" {tag}")
    print(f"{result['sample_seconds_per_image'] * 1e3:.1f} ms per image ({protocol['sampler']}, "
          f"{protocol['steps']} steps)")
    return result


def measure_checkpoint(ckpt_path: str | Path, data_root: str | None = None, n: int = 1000,
                       steps: int = 50, guidance: float = 3.0, device: str | torch.device = "auto",
                       features: str = "auto", *, eta: float = 0.0, seed: int = 0, amp: bool = True,
                       json_path: str | Path | None = None, sampler: str = "ddim",
                       bootstrap: int = 100, pretrained: str | None = None,
                       dataset: str = "folder", **feature_options) -> dict:
    """Sample one image per held-out image (up to n) from the checkpoint (or the released model
    `pretrained`, against `data_root` read as `dataset`), measure them against those images and the
    real-vs-real floor, print every figure with the protocol, and return (and write to `json_path`)
    {"protocol", "metrics", "real_vs_train_floor", "sample_seconds_per_image", and "task_score"
    where the data allow one}. `data_root`: the data's folder, for checkpoints of folder / CelebA /
    LSUN data. `feature_options`: `prepare_model`'s classifier / contrastive / inception options."""
    common = dict(seed=seed, steps=(steps,), **feature_options)
    p = (prepare_pretrained(pretrained, data_root, dataset, n, guidance, device, features, **common)
         if pretrained else prepare(ckpt_path, data_root, n, guidance, device, features, **common))
    measured = measure(p, sampler=sampler, steps=steps, eta=eta, seed=seed, amp=amp,
                       bootstrap=bootstrap)
    protocol = {**p.protocol, "sampler": sampler, "steps": steps, "eta": eta,
                "bootstrap": bootstrap}
    result = report(protocol, p.fd_name, measured, p.floor)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


def sweep_samplers(ckpt_path: str | Path, samplers: list[str], steps: list[int], n: int = 500,
                   data_root: str | None = None, guidance: float = 3.0,
                   device: str | torch.device = "auto", features: str = "auto", *, eta: float = 0.0,
                   seed: int = 0, amp: bool = True, json_path: str | Path | None = None,
                   bootstrap: int = 100, pretrained: str | None = None, dataset: str = "folder",
                   **feature_options) -> list[dict]:
    """Quality against network evaluations: every sampler at every step count on the same held-out
    items and features; prints a table (task score where the data have one, FD with its bootstrap
    interval, ms per image) under the protocol, and returns its rows. `feature_options`:
    prepare_model()'s classifier / contrastive / inception options."""
    common = dict(seed=seed, steps=tuple(steps), **feature_options)
    p = (prepare_pretrained(pretrained, data_root, dataset, n, guidance, device, features, **common)
         if pretrained else prepare(ckpt_path, data_root, n, guidance, device, features, **common))
    protocol = {**p.protocol, "eta": eta, "bootstrap": bootstrap}
    print(f"protocol: {protocol_tag(protocol)}")
    print(f"{'sampler':<8}{'steps':>6}{'NFE':>5}{'task score':>12}{p.fd_name[:30]:>32}"
          f"{'95% interval':>18}{'ms/image':>10}")
    rows = []
    for sampler in samplers:
        for k in steps:
            m = measure(p, sampler=sampler, steps=k, eta=eta, seed=seed, amp=amp,
                        bootstrap=bootstrap)
            score = m.get("task_score", {}).get("all")
            fd, interval = m["metrics"]["fd"], m["metrics"].get("fd_interval")
            rows.append({"sampler": sampler, "steps": k, "nfe": m["network_evaluations"],
                         "task_score": score, "fd": fd, "fd_interval": interval,
                         "ms_per_image": m["sample_seconds_per_image"] * 1e3})
            shown = f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else "-"
            print(f"{sampler:<8}{k:>6}{m['network_evaluations']:>5}"
                  f"{'' if score is None else f'{score:.1%}':>12}{fd:>32.3f}{shown:>18}"
                  f"{m['sample_seconds_per_image'] * 1e3:>10.1f}", flush=True)
    print(f"real-vs-real floor of the FD at N={p.protocol['n']}: {p.floor['fd']:.3f}")
    if json_path:
        Path(json_path).write_text(json.dumps({"protocol": protocol, "floor": p.floor,
                                               "rows": rows}, indent=1))
    return rows


def evaluate_checkpoint(args: argparse.Namespace) -> dict | list:
    """The command line's flags -> `measure_checkpoint`, or `sweep_samplers` with --sweep_steps."""
    common = dict(seed=args.seed, amp=args.amp, classifier=args.classifier,
                  classifier_steps=args.classifier_steps, contrastive=args.contrastive,
                  contrastive_steps=args.contrastive_steps, bootstrap=args.bootstrap,
                  inception_weights=args.inception_weights, json_path=args.json,
                  pretrained=args.pretrained, dataset=args.dataset)
    if args.sweep_steps:
        return sweep_samplers(args.ckpt, args.sweep_samplers, args.sweep_steps, args.n,
                              data_root=args.data, guidance=args.guidance, device=args.device,
                              features=args.features, eta=args.eta, **common)
    return measure_checkpoint(args.ckpt, args.data, args.n, args.steps, args.guidance, args.device,
                              args.features, eta=args.eta, sampler=args.sampler, **common)


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(prog="python -m tinyldm.tools.evaluate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="ldm.pt from train_ldm.py")
    model.add_argument("--pretrained", metavar="ID_OR_DIR", help="a released model (diffusers "
                       "folder or hub id), measured against --data")
    p.add_argument("--dataset", default="folder", choices=("folder", "celeba", "lsun"),
                   help="--pretrained: how --data is read (its held-out split is the reference)")
    p.add_argument("--n", type=int, default=1000, help="reference and generated images (compare at "
                   "equal N only); a smaller held-out split gives all it has")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=list(METHODS), default="ddim")
    p.add_argument("--sweep_steps", type=int, nargs="+", help="quality against steps: every "
                   "--sweep_samplers at each of these step counts, one table")
    p.add_argument("--sweep_samplers", nargs="+", choices=list(METHODS),
                   default=["ddim", "plms", "dpmpp"])
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--guidance", type=float, default=3.0,
                   help="guidance scale (models with a cross-attended condition)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", choices=FEATURES, default="auto",
                   help="auto: classifier when every training image has a class label, "
                   "else contrastive")
    p.add_argument("--classifier", help="a feature classifier checkpoint (default: "
                   "<ckpt dir>/feature_classifier.pt, trained if missing)")
    p.add_argument("--classifier_steps", type=int, default=600)
    p.add_argument("--contrastive", help="a contrastive feature network checkpoint (default: "
                   "<ckpt dir>/feature_contrastive.pt, trained on the training images if missing)")
    p.add_argument("--contrastive_steps", type=int, default=600)
    p.add_argument("--inception_weights", help="a local copy of pytorch-fid's weights file")
    p.add_argument("--data", help="the data root, for data sets that are not built in")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="bf16 autocast for sampling on CUDA")
    p.add_argument("--bootstrap", type=int, default=100, help="resamples of the FD's 95%% "
                   "bootstrap interval (0: none)")
    p.add_argument("--json", help="write the protocol and the numbers here")
    args = p.parse_args(argv)
    if args.bootstrap != 0 and not 2 <= args.bootstrap <= 100_000:
        raise UsageError(f"--bootstrap must be 0 (none) or 2 to 100000 resamples, got "
                         f"{args.bootstrap}")
    check_sampling_flags(n=args.n, steps=args.steps, eta=args.eta, guidance=args.guidance,
                         seed=args.seed)
    for k in args.sweep_steps or []:
        check_sampling_flags(n=args.n, steps=k, eta=args.eta, guidance=args.guidance,
                             seed=args.seed)
    if args.json:
        check_writable(args.json, "--json")
    return evaluate_checkpoint(args)


if __name__ == "__main__":
    run(main)
