"""What a train_ldm.py run shows and ends with: its sample grids and its final measurement.

* `SampleGrid`: the fixed prompts (shapes), one image per class, or the first held-out inputs
  (layouts, tasks, captioned folders); `save_samples` draws them with the EMA weights and a fixed
  seed.
* `evaluate_run`: the end-of-run score. Text on shapes: prompt faithfulness (colour, shape and
  position all right, by the exact evaluator); classes, layouts and tasks: their own score on
  held-out inputs (`tinyldm.data.tasks.score_items`); other data: the feature distance to held-out
  images that `python -m tinyldm.tools.evaluate` measures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..autoencoder import Autoencoder
from ..cli import UsageError
from ..conditioning import split_words
from ..data.latent_batches import task_spec
from ..data.shapes import CLASS_NAMES, ShapeSpec, all_prompts, score_images
from ..data.tasks import (
    data_configs,
    generate_from_items,
    has_task_score,
    heldout_items,
    item_conditions,
    scorable,
    score_items,
)
from ..ldm import Denoiser, DiffusionConfig, generate
from ..schedule import NoiseSchedule
from .viz import save_image_grid

FIXED_PROMPTS = [  # the sample grids' prompts, in the shapes dataset's phrasings
    "a red circle in the top left", "a blue square in the center",
    "a green triangle in the bottom right", "top right: a yellow circle",
    "a purple square in the middle left", "an orange triangle at the top center",
    "a blue circle in the bottom left", "a red triangle in the center",
]


def generate_in_chunks(denoiser: Denoiser, schedule: NoiseSchedule, ae: Autoencoder, conditions,
                       n: int, *, chunk: int = 64, **options) -> torch.Tensor:
    """`ldm.generate` for n conditions (a list, a tensor, or None: unconditional), `chunk` at a
    time, one generator for all (`options["generator"]`); images (n, 3, H, W) on the CPU."""
    images = []
    for i in range(0, n, chunk):
        part = conditions[i : i + chunk] if conditions is not None else None
        images.append(generate(denoiser, schedule, ae, part, n=min(chunk, n - i), **options).cpu())
    return torch.cat(images)


@dataclass
class SampleGrid:
    """What the sample grids show: the fixed prompts or classes, or the first held-out inputs
    (layouts, tasks)."""
    condition: list[str] | torch.Tensor | dict | None
    concat: torch.Tensor | None
    n: int
    latent_hw: tuple[int, int]
    device: torch.device
    said_young: bool = False  # the young EMA's health line is printed once

    @classmethod
    def for_run(cls, config, class_names: list[str], data_root: str | None,
                latent_hw: tuple[int, int], device: torch.device, ae: Autoencoder,
                max_len: int) -> SampleGrid:
        held_out_captions = config.cond == "text" and config.dataset != "shapes"
        # the first 8 held-out inputs
        if config.cond == "layout" or config.task != "generate" or held_out_captions:
            spec = task_spec(config)
            items = heldout_items(spec, *data_configs(asdict(config), data_root), 8,
                                  allow_fewer=True)
            condition, concat = item_conditions(spec, items, latent_hw, device, ae)
            # words past the text encoder's length are left out of the grid's prompts
            if held_out_captions:
                condition = [" ".join(split_words(c)[: max_len - 2]) for c in condition]
            return cls(condition, concat, len(items["image"]), latent_hw, device)
        return cls(sample_prompts(config, class_names), None, 8, latent_hw, device)


def sample_prompts(config, class_names: list[str], n: int = 8):
    if config.cond == "text":
        return FIXED_PROMPTS[:n]
    if config.cond == "class":
        return torch.arange(n) % max(len(class_names), 1)
    return None


def save_samples(out: Path, step: int, state, grid: SampleGrid, *, raw: bool = True) -> Path:
    """<out>/samples_XXXXXXX.png of `step`: one row of images for the grid's conditions, the EMA's
    weights, a fixed seed. `state` is train_ldm.py's (its ema, denoiser, schedule, data.ae,
    diffusion and config). While the EMA is young (fewer updates than its time constant
    1 / (1 - decay)), and with `raw`, a second row from the raw weights, same seed: an EMA that
    still remembers the first steps draws noise for a while when the raw weights already draw
    images."""
    ema, config = state.ema, state.config
    rows = [ema.model] + ([state.denoiser] if raw and young(ema) else [])
    if len(rows) == 2 and not grid.said_young:
        grid.said_young = True
        print(f"\nhealth: the EMA (decay {ema.decay}) has averaged {ema.num_updates} of the "
              f"~{1 / (1 - ema.decay):.0f} steps it remembers: until then each sample grid's "
              "second row shows the raw weights (same seed). Raw images while the EMA row is "
              "noise: the run is fine, the EMA is still young")
    images = []
    for weights in rows:
        g = torch.Generator(grid.device).manual_seed(0)
        images.append(generate(weights, state.schedule, state.data.ae, grid.condition, n=grid.n,
                               latent_size=grid.latent_hw, prediction=state.diffusion.prediction,
                               steps=config.eval_steps, guidance_scale=config.eval_cfg,
                               generator=g, concat=grid.concat))
    return save_image_grid(torch.cat(images), out / f"samples_{step:07d}.png", nrow=grid.n)


class QualityCurve:
    """The quality-against-steps curve's points: `python -m tinyldm.tools.evaluate`'s measurement of
    the EMA weights on a fixed held-out set (the first `curve_images` held-out items, seed 0,
    `eval_steps` DDIM steps, guidance `eval_cfg`), every time the same. Where the shapes evaluator
    or the task has a score (text, classes, layouts, super-resolution, inpainting), that score;
    other data: the Frechet distance in the final evaluation's features, whose network is trained
    at the first point and saved in the run's folder, where the final evaluation finds it."""

    def __init__(self, model: tuple, config, data_root: str | None, device: torch.device,
                 out: Path):
        self.model, self.config, self.data_root = model, config, data_root
        self.device, self.out, self.prepared = device, out, None

    def __call__(self, step: int) -> dict | None:
        """The point of `step`, or None (with one line, once) where the data allow no measurement,
        e.g. a folder that holds out a single image: the run goes on without a curve."""
        from tinyldm.tools.evaluate import measure, prepare_model

        c = self.config
        if self.prepared is None:
            tasky = has_task_score(task_spec(c), c.dataset)
            try:
                self.prepared = prepare_model(
                    self.model, asdict(c), c.image_size, self.data_root, c.curve_images,
                    c.eval_cfg, self.device, None if tasky else "auto",
                    source="the run's EMA weights", feature_dir=self.out,
                    classifier_steps=c.feature_steps, contrastive_steps=c.feature_steps)
            except UsageError as why:
                print(f"\nno quality curve: {why}")
                self.prepared = False
        if self.prepared is False:
            return None
        p = self.prepared
        m = measure(p, steps=c.eval_steps, bootstrap=0)
        if "task_score" in m:
            key = next(k for k in ("all", "psnr", "hole_psnr") if k in m["task_score"])
            name = {"all": "faithfulness", "psnr": "PSNR (dB)", "hole_psnr": "hole PSNR (dB)"}[key]
            value, better = m["task_score"][key], "higher"
        else:
            name, value, better = p.fd_name, m["metrics"]["fd"], "lower"
        return {"quality": value, "quality_name": f"{name}, {p.protocol['n']} held-out items",
                "quality_better": better}


def young(ema) -> bool:
    """Fewer updates than the EMA's time constant, 1 / (1 - decay) steps."""
    return ema.num_updates < 1 / (1 - ema.decay)


def evaluate_run(model: Denoiser, schedule, ae: Autoencoder, config, diffusion: DiffusionConfig,
                 latent_hw: tuple[int, int], device: torch.device, data_root: str | None,
                 ckpt_path: Path) -> dict:
    """The end-of-run score, printed: prompt faithfulness for text on shapes, else the task's own
    score on held-out inputs where it has one, else (other data) the feature distance between
    samples and held-out images that `python -m tinyldm.tools.evaluate` measures; {} with
    --eval_images 0."""
    spec = task_spec(config)
    if config.eval_images <= 0:
        return {}
    if config.dataset == "shapes" and config.cond == "text" and config.task == "generate":
        result = evaluate_shapes(model, schedule, ae, config, diffusion, latent_hw, device)
        print(f"prompt faithfulness (color, shape and position all right): "
              f"{result['prompt_faithfulness']:.1%} over {result['images']} prompts "
              f"[color {result['color']:.1%}, shape {result['shape']:.1%}, "
              f"position {result['position']:.1%}], {config.eval_steps} DDIM steps, "
              f"guidance {config.eval_cfg}")
        return result
    if scorable(spec, config.dataset) and (config.cond in ("class", "layout")
                                           or config.task != "generate"):
        scores = evaluate_task(model, schedule, ae, config, diffusion, latent_hw, device, data_root)
        shown = {k: round(v, 4) for k, v in scores.items()
                 if isinstance(v, float) and k != "seconds_per_image"}
        print(f"evaluation (cond={config.cond}, task={config.task}, {scores['images']} held-out "
              f"inputs, {config.eval_steps} DDIM steps, guidance {config.eval_cfg}): {shown}")
        return scores
    if config.dataset == "shapes":
        return {}
    from tinyldm.tools.evaluate import measure_checkpoint

    print(f"evaluation: python -m tinyldm.tools.evaluate --ckpt {ckpt_path} --data {data_root} --n "
          f"{config.eval_images} --steps {config.eval_steps} --guidance {config.eval_cfg}")
    try:
        measured = measure_checkpoint(ckpt_path, data_root, n=config.eval_images,
                                      steps=config.eval_steps, guidance=config.eval_cfg,
                                      device=device, classifier_steps=config.feature_steps,
                                      contrastive_steps=config.feature_steps,
                                      json_path=ckpt_path.parent / "metrics.json")
    except UsageError as stop:
        # the model is trained and saved; only its measurement cannot be made
        print(f"evaluation skipped: {stop}")
        return {"evaluation_skipped": str(stop)}
    metrics, floor = measured["metrics"], measured["real_vs_train_floor"]
    return {"fd_name": measured["protocol"]["fd_name"], "fd": metrics["fd"],
            "fd_floor": floor["fd"], "kid": metrics["kid"], "precision": metrics["precision"],
            "recall": metrics["recall"], "images": measured["protocol"]["n"]}


def evaluate_task(denoiser: Denoiser, schedule, ae: Autoencoder, config, diffusion: DiffusionConfig,
                  latent_hw: tuple[int, int], device: torch.device, data_root: str | None) -> dict:
    """The number that says how well the task worked, on `eval_images` held-out items (see
    `tinyldm.data.tasks.score_items`); class: colour and shape accuracy of images generated for each
    class in turn."""
    n = config.eval_images
    g = torch.Generator(device).manual_seed(1234)
    kw = dict(prediction=diffusion.prediction, steps=config.eval_steps,
              guidance_scale=config.eval_cfg, generator=g)
    start = time.perf_counter()
    result = {"images": n, "ddim_steps": config.eval_steps, "guidance_scale": config.eval_cfg}
    if config.cond == "class" and config.task == "generate":
        ids = torch.arange(n) % len(CLASS_NAMES)
        images = generate_in_chunks(denoiser, schedule, ae, ids.to(device), n,
                                    latent_size=latent_hw, **kw)
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


def evaluate_shapes(denoiser: Denoiser, schedule, ae: Autoencoder, config,
                    diffusion: DiffusionConfig, latent_hw: tuple[int, int],
                    device: torch.device) -> dict:
    """Prompt faithfulness: images for `eval_images` prompts (cycling through all 162), scored
    exactly."""
    prompts = [all_prompts()[i % 162] for i in range(config.eval_images)]
    g = torch.Generator(device).manual_seed(1234)
    start = time.perf_counter()
    images = generate_in_chunks(denoiser, schedule, ae, prompts if config.cond == "text" else None,
                                len(prompts), latent_size=latent_hw,
                                prediction=diffusion.prediction, steps=config.eval_steps,
                                guidance_scale=config.eval_cfg, generator=g)
    seconds = time.perf_counter() - start
    score = score_images(images, prompts)
    return {"prompt_faithfulness": score.all, "color": score.color, "shape": score.shape,
            "position": score.position, "images": len(prompts), "ddim_steps": config.eval_steps,
            "guidance_scale": config.eval_cfg, "seconds_per_image": seconds / len(prompts)}

