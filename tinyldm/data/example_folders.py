"""Folders of real images to try `--data DIR` on, written from images that scikit-image and Debian
ship (no download).

    python -m tinyldm.data.example_folders faces runs/faces
        # 100 faces, no captions -> --cond none
    python -m tinyldm.data.example_folders textures runs/textures
        # 6 photographs' crops, one sub-folder each
    python -m tinyldm.data.example_folders captioned runs/captioned
        # the same crops, a caption each
    python -m tinyldm.data.example_folders fashion --out runs/fashion [--per_class 600]
        # Fashion-MNIST: 10 sub-folders of clothing -> --cond class

* **faces**: the 100 faces of scikit-image's LFW subset (`skimage.data.lfw_subset()`, 25 x 25 grey
  crops of Labeled Faces in the Wild; the subset's other 100 images are not faces and are left out).
* **textures**: random square crops (64-160 px windows, resized to 32 px) of six photographs
  scikit-image ships (the Hubble deep field, an immunohistochemistry slide, a retina, grass, a brick
  wall, a cup of coffee), in one sub-folder per photograph: `--cond auto` reads them as classes.
* **captioned**: the same kind of crops with a caption each in metadata.jsonl, saying what the
  photograph is, how close the crop is and how bright it is ("a close-up of a brick wall, dark"):
  `--cond auto` -> text.

* **fashion**: Fashion-MNIST (Xiao et al. 2017; 28 x 28 grey photographs of Zalando's articles in 10
  classes, 6,000 training and 1,000 test images per class), from the Debian package
  `dataset-fashion-mnist` (`sudo apt-get install dataset-fashion-mnist`: files under
  /usr/share/datasets/fashion-mnist), or from the four `*-ubyte.gz` files of
  github.com/zalandoresearch/fashion-mnist in a folder given with `--source` (any system). The first
  `--per_class` images of each class of `--split` (train, or test for a held-out reference), padded
  to 32 x 32 with the background's black, one sub-folder per class.

The first three are small, and a model trained on them for minutes on a CPU mostly learns them by
heart; they are here to show the folder path end to end on photographs, not to measure a model
against the paper's. Fashion-MNIST is large enough to measure on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..cli import UsageError, run

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # dataset-fashion-mnist's files
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle_boot")  # label 0..9, in the data set's order

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


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed) as a uint8 array: labels (N,) or images (N, rows, cols).
    A missing, truncated or foreign file is refused naming it."""
    import gzip

    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: Fashion-MNIST needs its four *-ubyte.gz files "
                         "(sudo apt-get install dataset-fashion-mnist, or --source DIR)") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"{path} is not a readable gzip file ({e}): fetch it again") from None
    if len(raw) < 8 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise UsageError(f"{path} is not an IDX file of bytes (labels or images): fetch it again")
    header = 4 + 4 * raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
    body = raw[header:]
    if len(raw) < header or len(body) != int(np.prod(dims)):
        raise UsageError(f"{path} holds {len(body):,} bytes of data where its header says "
                         f"{int(np.prod(dims)):,} ({' x '.join(map(str, dims))}): the file is "
                         "truncated or damaged; fetch it again")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def fashion_folder(out: str | Path, *, per_class: int = 600, split: str = "train",
                   source: str | Path | None = None) -> Path:
    """The first `per_class` images of each Fashion-MNIST class of `split` ("train" or "test"),
    28 px padded to 32 px, as grey PNGs in one sub-folder per class."""
    folder = Path(source) if source is not None else FASHION_DIR
    if source is None and not folder.is_dir():
        raise UsageError(f"Fashion-MNIST is not installed ({folder} does not exist): sudo apt-get "
                         "install dataset-fashion-mnist (Debian, Ubuntu), or put the four "
                         "*-ubyte.gz files of github.com/zalandoresearch/fashion-mnist in a "
                         "folder and pass --source FOLDER")
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max() > 9:
        raise UsageError(f"{folder}: the {split} images {images.shape} and labels {labels.shape} "
                         "do not belong together: fetch the files again")
    out = Path(out)
    for label, name in enumerate(FASHION_CLASSES):
        chosen = np.flatnonzero(labels == label)[:per_class]
        if len(chosen) < per_class:
            raise UsageError(f"--per_class {per_class}: the {split} split has {len(chosen)} "
                             f"images of {name}")
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in chosen:
            Image.fromarray(np.pad(images[i], 2)).save(out / name / f"{name}_{i:05d}.png")
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("faces", "textures", "captioned", "fashion"))
    p.add_argument("folder", nargs="?", help="the folder to write (created); or --out")
    p.add_argument("--out", help="the folder to write (created)")
    p.add_argument("--n_per_class", "--per_class", dest="per_class", type=int, default=None,
                   help="images per class: textures / captioned crops per photograph (default "
                   "60), fashion images per class (default 600)")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="fashion: the training images, or the test images (a held-out reference)")
    p.add_argument("--source", help="fashion: a folder holding the four *-ubyte.gz files "
                   f"(default {FASHION_DIR}, where dataset-fashion-mnist installs them)")
    args = p.parse_args(argv)
    if (args.folder is None) == (args.out is None):
        p.error("give the folder to write, once: as the second argument or as --out")
    if args.per_class is not None and args.per_class < 1:
        p.error(f"--per_class {args.per_class}: must be a whole number >= 1")
    target = args.out or args.folder
    if args.kind == "faces":
        out = faces_folder(target)
    elif args.kind == "fashion":
        out = fashion_folder(target, per_class=args.per_class or 600, split=args.split,
                             source=args.source)
    else:
        make = textures_folder if args.kind == "textures" else captioned_folder
        out = make(target, n_per_class=args.per_class or 60)
    n = sum(1 for f in out.rglob("*.png"))
    print(f"{args.kind}: {n} images in {out}; train on them with: python train_ldm.py --data {out}")
    return out


if __name__ == "__main__":
    run(main)
