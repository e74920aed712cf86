"""Folders of real photographs to try `--data DIR` on, written from images that scikit-image ships
(no download).

    python -m tinyldm.data.example_folders faces runs/faces
        # 100 faces, no captions -> --cond none
    python -m tinyldm.data.example_folders textures runs/textures
        # 6 photographs' crops, one sub-folder each
    python -m tinyldm.data.example_folders captioned runs/captioned
        # the same crops, a caption each

* **faces**: the 100 faces of scikit-image's LFW subset (`skimage.data.lfw_subset()`, 25 x 25 grey
  crops of Labeled Faces in the Wild; the subset's other 100 images are not faces and are left out).
* **textures**: random square crops (64-160 px windows, resized to 32 px) of six photographs
  scikit-image ships (the Hubble deep field, an immunohistochemistry slide, a retina, grass, a brick
  wall, a cup of coffee), in one sub-folder per photograph: `--cond auto` reads them as classes.
* **captioned**: the same kind of crops with a caption each in metadata.jsonl, saying what the
  photograph is, how close the crop is and how bright it is ("a close-up of a brick wall, dark"):
  `--cond auto` -> text.

These are small, and a model trained on them for minutes on a CPU mostly learns them by heart; they
are here to show the folder path end to end on photographs, not to measure a model against the
paper's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..cli import UsageError

# sub-folder name -> (scikit-image loader, what the caption calls it, the photograph's region to
# crop from as fractions (top, left, bottom, right): the retina's black surround is left out)
TEXTURES = {
    "stars": ("hubble_deep_field", "the night sky full of galaxies", (0.0, 0.0, 1.0, 1.0)),
    "tissue": ("immunohistochemistry", "stained tissue under a microscope", (0.0, 0.0, 1.0, 1.0)),
    "retina": ("retina", "the back of an eye", (0.25, 0.25, 0.75, 0.75)),
    "grass": ("grass", "grass", (0.0, 0.0, 1.0, 1.0)),
    "brick": ("brick", "a brick wall", (0.0, 0.0, 1.0, 1.0)),
    "coffee": ("coffee", "a cup of coffee", (0.0, 0.0, 1.0, 1.0)),
}


def _skimage_data():
    try:
        from skimage import data
    except ImportError as e:
        raise UsageError("the example folders are made from scikit-image's sample images: "
                         "pip install scikit-image (it is in the dev extra: "
                         "pip install -e '.[dev]')") from e
    return data


def faces_folder(out: str | Path) -> Path:
    """100 grey 25 x 25 face photographs as PNG files in `out` (no captions, no classes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, face in enumerate(_skimage_data().lfw_subset()[:100]):  # (25, 25) floats in [0, 1]
        Image.fromarray(np.round(face * 255).astype(np.uint8)).save(out / f"face_{i:03d}.png")
    return out


def _crops(n: int, size: int, seed: int):
    """(sub-folder, crop as a PIL image, caption) for n random crops of each photograph,
    reproducibly."""
    data, rng = _skimage_data(), np.random.default_rng(seed)
    for name, (loader, subject, (top, left, bottom, right)) in TEXTURES.items():
        photo = np.asarray(getattr(data, loader)())
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        h, w = photo.shape[:2]
        region = photo[int(top * h): int(bottom * h), int(left * w): int(right * w)]
        crops = []
        for _ in range(n):
            side = int(rng.integers(64, min(161, *region.shape[:2])))
            y, x = (int(rng.integers(0, d - side + 1)) for d in region.shape[:2])
            crops.append((side, Image.fromarray(region[y: y + side, x: x + side]).resize(
                (size, size), Image.LANCZOS)))
        median = np.median([np.asarray(c).mean() for _, c in crops])
        for side, crop in crops:
            zoom = "a close-up of" if side < 112 else "a wide view of"
            light = "bright" if np.asarray(crop).mean() > median else "dark"
            yield name, crop, f"{zoom} {subject}, {light}"


def textures_folder(out: str | Path, *, n_per_class: int = 60, size: int = 32,
                    seed: int = 0) -> Path:
    """n_per_class crops of each of the six photographs, in one sub-folder per photograph
    (classes)."""
    out = Path(out)
    counts: dict[str, int] = {}
    for name, crop, _ in _crops(n_per_class, size, seed):
        (out / name).mkdir(parents=True, exist_ok=True)
        counts[name] = counts.get(name, 0) + 1
        crop.save(out / name / f"{name}_{counts[name]:03d}.png")
    return out


def captioned_folder(out: str | Path, *, n_per_class: int = 60, size: int = 32,
                     seed: int = 0) -> Path:
    """The same kind of crops in one folder, each with a caption in metadata.jsonl."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (_, crop, caption) in enumerate(_crops(n_per_class, size, seed)):
        crop.save(out / f"crop_{i:04d}.png")
        lines.append(json.dumps({"file_name": f"crop_{i:04d}.png", "text": caption}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("faces", "textures", "captioned"))
    p.add_argument("out", help="the folder to write (created)")
    p.add_argument("--n_per_class", type=int, default=60,
                   help="textures / captioned: crops per photograph")
    args = p.parse_args(argv)
    if args.kind == "faces":
        out = faces_folder(args.out)
    else:
        make = textures_folder if args.kind == "textures" else captioned_folder
        out = make(args.out, n_per_class=args.n_per_class)
    n = sum(1 for f in out.rglob("*.png"))
    print(f"{args.kind}: {n} images in {out}; train on them with: python train_ldm.py --data {out}")
    return out


if __name__ == "__main__":
    main()
