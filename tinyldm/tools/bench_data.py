"""Measure the data pipeline: loader images/s (shapes, a folder of JPEGs) and the shapes evaluator's
scores.

    python -m tinyldm.tools.bench_data                 # shapes at 64 px; 2000 generated 128 px
                                                         JPEGs read at 64 px
    python -m tinyldm.tools.bench_data --folder PATH   # your own folder instead of generated JPEGs
    python -m tinyldm.tools.bench_data --workers 0 2 4 --n_jpegs 500 --skip_evaluator

Loader rates are for full passes of a DataLoader (batch 64, shuffled; the first batch, which pays
for worker start-up, is not timed). The generated JPEGs are textured shapes renders plus pixel
noise, saved at quality 90, so that decoding costs about what a photo of that size costs. The
evaluator section scores the eval split against its own captions (ground truth), after a mild blur +
noise, against noise and against shuffled captions (chance: colour 1/6, shape 1/3, position 1/9, all
1/162).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tinyldm.data.images import DataConfig, folder_dataset
from tinyldm.data.shapes import ShapesConfig, ShapesDataset, render, score_images


def images_per_second(dataset: Dataset, *, num_workers: int, batch_size: int = 64) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up is not the loader's throughput
    n, start = 0, time.perf_counter()
    for batch in it:
        n += len(batch["image"])
    return n / (time.perf_counter() - start)


def write_jpegs(folder: Path, n: int, size: int = 128) -> None:
    config = ShapesConfig(image_size=size, background="texture", max_shapes=3, n_train=n)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = render(config, i).image.astype(np.float32) + rng.normal(0, 8, size=(size, size, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg",
                                                                       quality=90)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", help="a folder of images to read instead of generated JPEGs")
    p.add_argument("--n_jpegs", type=int, default=2000)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--n_eval", type=int, default=1000, help="images per evaluator measurement")
    p.add_argument("--skip_evaluator", action="store_true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    shapes = ShapesDataset(ShapesConfig(image_size=args.image_size, n_train=4096))
    for w in args.workers:
        rate = images_per_second(shapes, num_workers=w)
        print(f"shapes {args.image_size} px, workers={w}: {rate:,.0f} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = tmp
            write_jpegs(Path(tmp), args.n_jpegs)
        images = folder_dataset(DataConfig(source="folder", root=folder,
                                           image_size=args.image_size), "all")
        for w in args.workers:
            rate = images_per_second(images, num_workers=w)
            print(f"folder {folder} ({len(images)} images) at {args.image_size} px, workers={w}: "
                  f"{rate:,.0f} images/s")
        print(images.summary())

    if args.skip_evaluator:
        return
    for size in (32, 64):
        held_out = ShapesDataset(ShapesConfig(image_size=size, n_eval=args.n_eval), "eval")
        items = [held_out[i] for i in range(len(held_out))]
        x, prompts = torch.stack([it["image"] for it in items]), [it["caption"] for it in items]
        g = torch.Generator().manual_seed(0)
        perturbed = (blur(x, 0.5) + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        noise = torch.rand(x.shape, generator=g) * 2 - 1
        cases = {"ground truth": x, "blur 0.5 px + noise 0.05": perturbed, "uniform noise": noise}
        for name, images in cases.items():
            start = time.perf_counter()
            score = score_images(images, prompts)
            rate = len(images) / (time.perf_counter() - start)
            print(f"evaluator {size} px, {name:>24}: {score.summary()}  [{rate:,.0f} images/s]")
        score = score_images(x, prompts[1:] + prompts[:1])
        print(f"evaluator {size} px, {'shuffled prompts':>24}: {score.summary()}")


if __name__ == "__main__":
    main()
