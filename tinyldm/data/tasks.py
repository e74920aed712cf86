"""Each task's inputs and score: what the latent cache keeps for training, the held-out items a
trained model is evaluated on, the tensor concatenated to z_t, and the number that says how well the
task worked.

`image_conditions.py` holds the maths of each input (maps, low-res images, masks); this module wires
them to the data and the sampler, with nothing but explicit arguments, so `train_ldm.py`,
`sample.py` and the notebooks share one definition of every task:

    spec = TaskSpec(task="superres", cond="none", sr_factor=4)
    items = heldout_items(spec, DataConfig(source="shapes", image_size=32),
                          ShapesConfig(image_size=32), n=64)
    images = generate_from_items(denoiser, schedule, ae, spec, items, (8, 8), device, steps=50)
    score_items(spec, items, images)
    # {"psnr": ..., "ssim": ..., "bicubic_psnr": ..., "bicubic_ssim": ...}

The tasks (paper Secs. 4.3-4.5): "generate" (from the cross-attended condition alone), "semantic"
(the segmentation map as class fractions per latent pixel), "superres" (the image
bicubic-downsampled by `sr_factor`), "inpaint" (the masked image's latent and the mask). `cond` is
the cross-attended condition: "text", "class", "layout" or "none".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from tinyldm.cli import UsageError
from tinyldm.data.image_conditions import (
    composite,
    downsample,
    inpaint_condition,
    masked_image,
    masked_psnr,
    random_mask,
    semantic_condition,
    superres_condition,
    upsample_bicubic,
)
from tinyldm.data.images import DataConfig, make_dataset
from tinyldm.data.shapes import CLASS_NAMES, ShapesConfig, score_images, specs_from_layout
from tinyldm.evaluation.metrics import psnr, ssim
from tinyldm.ldm import generate

TASKS = ("generate", "semantic", "superres", "inpaint")
CONDS = ("text", "class", "layout", "none")
# per task
CACHED = {"generate": (), "semantic": ("seg",), "superres": ("lowres",), "inpaint": ("pixels",)}
HELDOUT_MASK_SEED = 1234  # the held-out inpainting masks are the same every time


@dataclass(frozen=True)
class TaskSpec:
    task: str = "generate"  # generate | semantic | superres | inpaint
    cond: str = "text"      # the cross-attended condition: text | class | layout | none
    sr_factor: int = 4      # superres: the downsampling factor of the low-res input

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.cond not in CONDS:
            raise ValueError(f"cond must be one of {', '.join(CONDS)}, got {self.cond!r}")
        if self.sr_factor < 1:
            raise ValueError(f"sr_factor must be >= 1, got {self.sr_factor}")

    @classmethod
    def from_config(cls, train_config: dict) -> TaskSpec:
        """From a checkpoint's `train_config` (older checkpoints, without the task fields,
        generate)."""
        return cls(task=train_config.get("task", "generate"), cond=train_config.get("cond", "text"),
                   sr_factor=train_config.get("sr_factor", 4))

    @property
    def has_concat(self) -> bool:
        return self.task != "generate"


def data_configs(train_config: dict,
                 root: str | None = None) -> tuple[DataConfig, ShapesConfig | None]:
    """The training data of a run, from its `train_config` (dataset, image_size, n_train,
    max_shapes): the DataConfig (the first n_train images, unflipped: flips are applied to the
    cached latents) and, for the shapes dataset, its ShapesConfig."""
    size, n_train = train_config["image_size"], train_config.get("n_train") or None
    data = DataConfig(source=train_config["dataset"], root=root or "", image_size=size, hflip=False,
                      max_images=n_train)
    if train_config["dataset"] != "shapes":
        return data, None
    return data, ShapesConfig(image_size=size,
                              n_train=train_config.get("n_train", ShapesConfig.n_train),
                              max_shapes=train_config.get("max_shapes", ShapesConfig.max_shapes))


def concat_channels(spec: TaskSpec, latent_channels: int) -> int:
    """Channels of the task's concat input: class fractions + background, RGB, or latent + mask."""
    return {"generate": 0, "semantic": len(CLASS_NAMES) + 1, "superres": 3,
            "inpaint": latent_channels + 1}[spec.task]


class TaskInputs(torch.utils.data.Dataset):
    """A dataset whose items also hold what the task needs later: `lowres`, the image
    bicubic-downsampled by `sr_factor` (superres), or `pixels`, the image as uint8 (inpaint: masked
    and encoded afresh every step). Other tasks get the dataset back unchanged from `wrap`."""

    def __init__(self, dataset, spec: TaskSpec):
        self.dataset, self.spec = dataset, spec

    @staticmethod
    def wrap(dataset, spec: TaskSpec):
        return TaskInputs(dataset, spec) if spec.task in ("superres", "inpaint") else dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if self.spec.task == "superres":
            return {**item, "lowres": downsample(item["image"][None], self.spec.sr_factor)[0]}
        return {**item, "pixels": ((item["image"] + 1) * 127.5).round().to(torch.uint8)}

    # bad_files(), summary(), class_names, hflip of the wrapped dataset
    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def cache_keys(spec: TaskSpec) -> tuple[str, ...]:
    """What the latent cache keeps of each training item, beside the latents."""
    return (("caption", "class_id") + CACHED[spec.task]
            + (("box_classes", "boxes") if spec.cond == "layout" else ()))


def inpaint_concat(ae, x: Tensor, mask: Tensor) -> Tensor:
    """Sec. 4.5: the scaled latent of the masked image and the mask at latent size,
    (B, c + 1, h, w)."""
    with torch.no_grad():
        z_masked = ae.encode(masked_image(x, mask)) * ae.scale_factor
    return inpaint_condition(z_masked, mask)


def task_concat(spec: TaskSpec, items: dict, latent_hw: tuple[int, int], ae=None) -> Tensor | None:
    """The concat input (N, C_c, h, w) for the task, from cached or held-out items (semantic: their
    `seg`; superres: their `lowres`; inpaint: their `image` and `mask`, encoded by `ae`), or None
    for "generate"."""
    if spec.task == "semantic":
        return semantic_condition(items["seg"].long(), len(CLASS_NAMES), latent_hw)
    if spec.task == "superres":
        return superres_condition(items["lowres"], latent_hw)
    if spec.task == "inpaint":
        if ae is None:
            raise ValueError("task_concat for inpainting needs the autoencoder (ae=) to encode "
                             "the masked images")
        device = ae.scale_factor.device
        return inpaint_concat(ae, items["image"].to(device), items["mask"].to(device))
    return None


def heldout_items(spec: TaskSpec, data: DataConfig, shapes: ShapesConfig | None, n: int, *,
                  allow_fewer: bool = False) -> dict:
    """The first n items of the held-out split, collated: `image`, `caption`, `class_id`, and where
    the data or the task has them `seg`, `box_classes`, `boxes`, `lowres` (superres), `mask`
    (inpaint: the same seeded masks every call). A smaller split is an error, or with `allow_fewer`
    gives all it has."""
    dataset = make_dataset(replace(data, max_images=None, hflip=False), "eval", shapes=shapes)
    if len(dataset) < n and not allow_fewer:
        raise UsageError(f"the held-out split has {len(dataset)} images, fewer than the {n} asked "
                         "for (ask for fewer, or hold out more with a larger eval_fraction)")
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    out = {k: torch.stack([it[k] for it in items])
           for k in ("image", "seg", "box_classes", "boxes") if k in items[0]}
    out["lowres"] = downsample(out["image"], spec.sr_factor) if spec.task == "superres" else None
    if spec.task == "inpaint":
        out["mask"] = random_mask(n, *out["image"].shape[-2:],
                                  generator=torch.Generator().manual_seed(HELDOUT_MASK_SEED))
    out["caption"] = [it.get("caption", "") for it in items]
    out["class_id"] = torch.tensor([it.get("class_id", -1) for it in items])
    return out


def item_conditions(spec: TaskSpec, items: dict, latent_hw: tuple[int, int], device: torch.device,
                    ae=None):
    """(condition, concat) for generating from held-out items: their captions / classes / layouts,
    and their task inputs."""
    condition = None
    if spec.cond == "text":
        condition = list(items["caption"])
    elif spec.cond == "class":
        condition = items["class_id"].to(device)
    elif spec.cond == "layout":
        condition = {"box_classes": items["box_classes"].to(device),
                     "boxes": items["boxes"].to(device)}
    concat = task_concat(spec, items, latent_hw, ae)
    return condition, None if concat is None else concat.to(device)


def generate_from_items(denoiser, schedule, ae, spec: TaskSpec, items: dict,
                        latent_hw: tuple[int, int], device: torch.device, batch_size: int = 64,
                        **generate_options) -> Tensor:
    """Images (N, 3, H, W) on the CPU for held-out items, `batch_size` at a time; `generate_options`
    go to `ldm.generate` (prediction, steps, guidance_scale, generator, ...). Inpainting: the known
    pixels are pasted back (`composite`), so they are exactly the original's."""
    images = []
    for i in range(0, len(items["image"]), batch_size):
        part = {k: v[i : i + batch_size] for k, v in items.items() if v is not None}
        condition, concat = item_conditions(spec, part, latent_hw, device, ae)
        images.append(generate(denoiser, schedule, ae, condition, n=len(part["image"]),
                               concat=concat, latent_size=latent_hw, **generate_options).cpu())
    images = torch.cat(images)
    return composite(images, items["image"], items["mask"]) if spec.task == "inpaint" else images


def scorable(spec: TaskSpec, dataset: str) -> bool:
    """Whether `score_items` has a number for this task on this data: superres and inpaint anywhere,
    the rest only where the shapes evaluator can read the images back."""
    return spec.task in ("superres", "inpaint") or dataset == "shapes"


def has_task_score(spec: TaskSpec, dataset: str) -> bool:
    """Whether a model of `spec` on `dataset` is measured by `score_items`: the data allow a score
    (`scorable`), and the model has something to be faithful to (a condition or a task input);
    otherwise only the feature distance measures it."""
    return scorable(spec, dataset) and (spec.cond != "none" or spec.has_concat)


def score_items(spec: TaskSpec, items: dict, images: Tensor) -> dict:
    """superres: PSNR / SSIM against the originals, and the bicubic baseline's; inpaint: PSNR inside
    the hole, and a grey fill's; layouts, maps and inpainted shapes: the shapes evaluator's accuracy
    on the held-out objects (all / colour / shape / position) and the mean box IoU."""
    if spec.task == "superres":
        bicubic = upsample_bicubic(items["lowres"], images.shape[-2:])
        return {"psnr": psnr(images, items["image"]).mean().item(),
                "ssim": ssim(images, items["image"]).mean().item(),
                "bicubic_psnr": psnr(bicubic, items["image"]).mean().item(),
                "bicubic_ssim": ssim(bicubic, items["image"]).mean().item()}
    result = {}
    if spec.task == "inpaint":
        x, mask = items["image"], items["mask"]
        result.update(hole_psnr=masked_psnr(images, x, mask).mean().item(),
                      grey_fill_hole_psnr=masked_psnr(masked_image(x, mask), x, mask).mean().item(),
                      mask_coverage=mask.mean().item())
        if "box_classes" not in items:  # not the shapes dataset: no objects to check
            return result
    if "box_classes" not in items:
        raise ValueError("only the shapes dataset's held-out items (with their boxes) can be "
                         f"scored for task={spec.task!r}, cond={spec.cond!r}")
    layouts = list(zip(items["box_classes"], items["boxes"], strict=True))
    wanted = [specs_from_layout(c, b) for c, b in layouts]
    score = score_images(images, wanted, boxes=[b[c >= 0].tolist() for c, b in layouts])
    return {**result, "all": score.all, "color": score.color, "shape": score.shape,
            "position": score.position, "box_iou": score.iou}


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
