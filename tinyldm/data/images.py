"""Training images from disk (folders, CelebA, LSUN), and the shapes dataset, behind one item
format.

What comes in, what goes out. Every dataset here yields the same item dict,
    {"image": (3, H, W) float32 in [-1, 1], "caption": str ("" if none),
     "class_id": int (-1 if none)},
so torch's default collate batches it, and the trainers do not care where it came from:
    * "shapes": the procedural default (`tinyldm.data.shapes`; its items also carry boxes and a seg
      map);
    * "folder": every .jpg .jpeg .png .webp .bmp under `root`, recursively. Captions come from
      `metadata.jsonl` lines {"file_name": ..., "text": ...} (the Hugging Face imagefolder
      convention; file names relative to the jsonl's folder) or from a `.txt` beside the image;
      class labels from the first sub-folder (torchvision's ImageFolder convention, detected when
      `root` holds only sub-folders, or forced with `class_folders`);
    * "celeba": `img_align_celeba/`, `list_attr_celeba.txt`, `list_eval_partition.txt` (its official
      split), the 128 x 128 face box that DDIM and NCSN use for 64 px CelebA, any of the 40
      attributes as the class, and captions written from the attributes by `celeba_caption`;
    * "lsun": an extracted folder, or the official LMDB export (a folder with `data.mdb`) through
      the optional `lmdb` package (`pip install tinyldm[lsun]`).
Images are centre-cropped to a square (CelebA: its face box), resized with bicubic filtering, and
optionally flipped. JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that still leaves twice the
output size (PIL's `draft`; bicubic does the rest), which is most of the speed on large photos.
Grey, RGBA, palette, CMYK and 16-bit images become 8-bit RGB (alpha over white). Splits: "train" and
"eval" (held out) by a hash of the file name, so adding files moves no other file across (CelebA:
its official partition); "all" for everything. `max_images` keeps the first N of the split.

Bad files never stop an epoch: an image that fails to decode, is not a regular file (a FIFO named
a.png), or whose header declares more pixels than `max_pixels(image_size)` (checked before decoding:
a small file can declare a huge image) is warned about, flagged in a tensor in shared memory (so
DataLoader workers' findings reach the main process) and replaced by the next readable one;
`dataset.summary()` reports them. A folder's walk skips, and names, entries that are not regular
files. An empty folder, a missing CelebA file or a malformed metadata.jsonl line is an error that
names the path (and line and field) and what was expected.

The latent cache that the LDM trainer reads lives in `tinyldm.data.latents`.
"""

import hashlib
import io
import json
import os
import posixpath
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from math import ceil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tinyldm.cli import UsageError
from tinyldm.data.shapes import ShapesConfig, ShapesDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SOURCES = ("shapes", "folder", "celeba", "lsun")


def check_data_flags(dataset: str, data: str | None, hflip: bool) -> None:
    """Refuse a data flag that the chosen dataset would ignore or get wrong, naming the flag to use
    instead."""
    if dataset != "shapes" and data is None:
        raise UsageError(f"--dataset {dataset} needs --data PATH: the folder of images (folder), "
                         "the CelebA root (celeba) or the LSUN folder or LMDB export (lsun)")
    if dataset == "shapes" and data is not None:
        raise UsageError(f"--data {data} would be ignored: the dataset is the built-in shapes "
                         "(the preset's). Add --dataset folder (or celeba, lsun) to train on "
                         "those images")
    if dataset == "shapes" and hflip:
        raise UsageError("--hflip does not apply to the shapes dataset: its captions, boxes and "
                         "maps say left and right, which a mirrored image would contradict. Drop "
                         "--hflip (it is for folder / celeba / lsun)")


SPLITS = ("train", "eval", "test", "all")  # CelebA: "eval" is its official "eval"; "test" its test


@dataclass
class DataConfig:
    source: str = "shapes"               # one of SOURCES
    root: str = ""                       # the folder, CelebA root, or LSUN folder / LMDB directory
    image_size: int = 64
    # random horizontal flips (not for shapes: captions say left/right)
    hflip: bool = False
    max_images: int | None = None        # keep only the first N images of the split
    # folder / LSUN: share held out for "eval", by file name hash
    eval_fraction: float = 0.05
    split_seed: int = 0
    # folder: labels from sub-folders; None = if root holds only folders
    class_folders: bool | None = None
    celeba_attribute: str | None = None  # CelebA: the class (0 without, 1 with), e.g. "Smiling"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "shapes" and not self.root:
            raise ValueError(f"source {self.source!r} needs root (the data folder)")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {self.max_images}")


# --- decoding one image ------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit grey rescaled, alpha composited over white, rest
    converted."""
    if img.mode == "RGB":
        return img
    # 16-bit grey PNG ("I;16"), 32-bit int or float grey
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:  # 0..65535 -> 0..255
            a = a / 257
        elif img.mode == "F" and a.max() <= 1:  # floats in [0, 1]
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    # palette (may hold transparency) or alpha
    if img.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        img = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)),
                                     img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def max_pixels(image_size: int) -> int:
    """The most pixels an image's header may declare for `image_size` training: 64 M (a 48 MP
    photograph passes), or (16 x image_size)^2 for large sizes."""
    return max(64_000_000, (16 * image_size) ** 2)


def load_image(source, image_size: int,
               crop: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Decode a file (path or file object) into an RGB image_size x image_size PIL image: the crop
    box (fractions of width and height; None = the centred square) resized with bicubic
    filtering. Raises ValueError, before decoding, for a path that is not a regular file and for a
    header that declares more than max_pixels(image_size) pixels."""
    if isinstance(source, str | os.PathLike) and not stat.S_ISREG(os.stat(source).st_mode):
        raise ValueError("not a regular file")
    with warnings.catch_warnings():  # PIL's own bomb warning: the bound below decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(source)
    with opened as img:
        w, h = img.size
        if w * h > max_pixels(image_size):
            raise ValueError(f"its header declares {w} x {h} pixels, more than the "
                             f"{max_pixels(image_size):,} allowed for {image_size} px images")
        fw, fh = (crop[2] - crop[0], crop[3] - crop[1]) if crop else (min(w, h) / w, min(w, h) / h)
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale, keeping >= 2x the output size so bicubic does
        # the rest
        img.draft(None, (ceil(2 * image_size / fw), ceil(2 * image_size / fh)))
        img.load()  # a corrupt or truncated file fails here
        img = to_rgb(img)
    w, h = img.size
    if crop:
        box = (crop[0] * w, crop[1] * h, crop[2] * w, crop[3] * h)
    else:
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    # Crop first: resize(box=...) would let the bicubic filter reach past the box into the margins.
    img = img.crop(tuple(round(v) for v in box))
    return img.resize((image_size, image_size), Image.Resampling.BICUBIC)


def _import_lmdb():
    try:
        import lmdb
    except ImportError as err:
        raise ImportError("reading LSUN's LMDB export needs the optional `lmdb` package: "
                          "pip install tinyldm[lsun]  (or: pip install lmdb). "
                          "Alternatively extract the images to a folder "
                          "and point root at it.") from err
    return lmdb


class ImageDataset(Dataset):
    """Images decoded on demand, each with a caption and a class id. `items` are file paths or, with
    `lmdb_path`, keys in that LMDB. Unreadable images are skipped (see the module docstring)."""

    def __init__(self, name: str, items: list[str], *, image_size: int, hflip: bool = False,
                 captions: list[str] | None = None, class_ids: list[int] | None = None,
                 class_names: Iterable[str] = (),
                 crop: tuple[float, float, float, float] | None = None,
                 lmdb_path: str | None = None):
        n = len(items)
        if n == 0:
            raise ValueError(f"{name}: no images")
        for what, values in (("captions", captions), ("class_ids", class_ids)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name}: {len(values)} {what} for {n} images")
        self.name, self.items, self.image_size = name, list(items), image_size
        self.hflip, self.crop = hflip, crop
        self.captions = list(captions) if captions is not None else [""] * n
        self.class_ids = list(class_ids) if class_ids is not None else [-1] * n
        self.class_names = list(class_names)
        self.lmdb_path, self._env, self._env_pid = lmdb_path, None, None
        # shared with DataLoader workers
        self._bad = torch.zeros(n, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):  # an open LMDB environment cannot travel to a worker process
        return {**self.__dict__, "_env": None, "_env_pid": None}

    def _source(self, i: int):
        if self.lmdb_path is None:
            return self.items[i]
        if self._env is None or self._env_pid != os.getpid():  # one environment per process
            self._env = _import_lmdb().open(self.lmdb_path, readonly=True, lock=False,
                                            readahead=False, meminit=False)
            self._env_pid = os.getpid()
        with self._env.begin(write=False) as txn:
            value = txn.get(self.items[i].encode("latin-1"))
        if value is None:
            raise KeyError(f"key {self.items[i]!r} not in {self.lmdb_path}")
        return io.BytesIO(value)

    def __getitem__(self, index: int) -> dict:
        n = len(self.items)
        error = None
        # the image itself, else the next readable one
        for i in ((index + k) % n for k in range(n)):
            if self._bad[i]:
                continue
            try:
                img = load_image(self._source(i), self.image_size, self.crop)
            except Exception as err:
                # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                self._bad[i], error = True, err
                warnings.warn(f"{self.name}: skipping unreadable image {self.items[i]} "
                              f"({type(err).__name__}: {err})", stacklevel=2)
                continue
            # (3, H, W)
            image = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0
            if self.hflip and torch.rand(()) < 0.5:
                image = image.flip(-1)
            return {"image": image, "caption": self.captions[i], "class_id": self.class_ids[i]}
        raise RuntimeError(f"{self.name}: none of its {n} images can be read") from error

    def bad_files(self) -> list[str]:
        """The images found unreadable so far, by this process or any of its DataLoader workers."""
        return [self.items[i] for i in self._bad.nonzero().flatten().tolist()]

    def summary(self) -> str:
        bad = self.bad_files()
        if not bad:
            return f"{self.name}: {len(self)} images, none unreadable so far"
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        return f"{self.name}: {len(self)} images, {len(bad)} unreadable and skipped: {shown}"


# --- the sources -------------------------------------------------------------------------------


def _split_hash(key: str, config: DataConfig) -> float:
    digest = hashlib.blake2b(f"{config.split_seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64  # uniform in [0, 1)


def _in_eval(key: str, config: DataConfig) -> bool:
    return _split_hash(key, config) < config.eval_fraction


def _small_set_held_out(keys: Sequence[str], config: DataConfig, name: str) -> set[str] | None:
    """A small set where the hash rule holds out nothing: the round(eval_fraction * n) keys (at
    least one) with the lowest hashes are held out instead, so that a folder of a few dozen images
    has an evaluation split too. Still a function of the file names alone. None when the ordinary
    rule holds something out."""
    if len(keys) < 2 or config.eval_fraction <= 0 or any(_in_eval(key, config) for key in keys):
        return None
    k = max(1, round(config.eval_fraction * len(keys)))
    held_out = set(sorted(keys, key=lambda key: _split_hash(key, config))[:k])
    warnings.warn(f"{name}: {len(keys)} images, none of which the hash rule (eval_fraction="
                  f"{config.eval_fraction}) holds out: holding out the {k} with the lowest hash "
                  f"instead ({len(keys) - k} to train on)", stacklevel=2)
    return held_out


def _select(keys: Iterable[str], split: str, config: DataConfig, name: str) -> list[str]:
    """The `keys` in the hash-based split, the first `max_images` of them (stops reading there)."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"{name}: split must be 'train', 'eval' or 'all', got {split!r}")
    held_out = (_small_set_held_out(keys, config, name)
                if isinstance(keys, Sequence) and split != "all" else None)
    in_eval = ((lambda key: key in held_out) if held_out is not None
               else (lambda key: _in_eval(key, config)))
    chosen = []
    for key in keys:
        if split == "all" or in_eval(key) == (split == "eval"):
            chosen.append(key)
            if len(chosen) == config.max_images:
                break
    if not chosen:
        raise ValueError(f"{name}: the {split!r} split is empty "
                         f"(eval_fraction={config.eval_fraction}); "
                         "use more images or another eval_fraction")
    return chosen


def _walk(root: Path) -> tuple[list[str], set[str], list[str]]:
    """Sorted relative paths of the images, the .txt files and the metadata.jsonl files under
    root."""
    images, texts, metas, odd = [], set(), [], []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        for f in files:
            path, ext = (rel / f).as_posix(), os.path.splitext(f)[1].lower()
            if f.startswith("."):  # hidden, e.g. macOS "._x.jpg" resource forks
                continue
            if ext in IMAGE_EXTENSIONS + (".txt", ".jsonl"):
                try:  # a FIFO, socket or device named a.png would block or mislead the reader
                    regular = stat.S_ISREG(os.stat(Path(folder) / f).st_mode)
                except OSError:  # a dangling link
                    regular = False
                if not regular:
                    odd.append(path)
                    continue
            if ext in IMAGE_EXTENSIONS:
                images.append(path)
            elif ext == ".txt":
                texts.add(path)
            elif f == "metadata.jsonl":
                metas.append(path)
    if odd:
        warnings.warn(f"{root}: skipped what is not a regular file ({len(odd)}): "
                      f"{', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}", stacklevel=3)
    return sorted(images), texts, metas


def _read_captions(root: Path, images: list[str], texts: set[str],
                   metas: list[str]) -> list[str] | None:
    captions = {}
    for meta in metas:
        with open(root / meta, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                where = f"{root / meta}, line {line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UsageError(f"{where}: not UTF-8 text (byte {e.start}); save the file as "
                                     "UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict):
                    raise UsageError(f"{where}: expected a JSON object with string fields "
                                     f"'file_name' and 'text', got {line.strip()[:100]!r}")
                name, text = row.get("file_name"), row.get("text", row.get("caption"))
                for field, value in (("file_name", name), ("text", text)):
                    if not isinstance(value, str):
                        raise UsageError(f"{where}: field '{field}' must be a string, got "
                                         f"{json.dumps(value)[:60]}")
                captions[posixpath.normpath(posixpath.join(posixpath.dirname(meta),
                                                           name))] = text.strip()
    for image in images:
        sidecar = os.path.splitext(image)[0] + ".txt"
        if image not in captions and sidecar in texts:
            captions[image] = (root / sidecar).read_text(encoding="utf-8", errors="replace").strip()
    if not captions:
        return None
    missing = sum(image not in captions for image in images)
    if missing:
        warnings.warn(f"{root}: {missing} of {len(images)} images have no caption "
                      "(metadata.jsonl or .txt); they get the empty caption", stacklevel=3)
    return [captions.get(image, "") for image in images]


def folder_dataset(config: DataConfig, split: str = "train") -> ImageDataset:
    root = Path(config.root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    images, texts, metas = _walk(root)
    if not images:
        raise FileNotFoundError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {root} "
                                "or its sub-folders")
    captions = _read_captions(root, images, texts, metas)
    tops = [p.split("/")[0] if "/" in p else None for p in images]  # first sub-folder of each image
    use_classes = config.class_folders
    if use_classes is None:
        use_classes = None not in tops and len(set(tops)) >= 2
    class_names, class_ids = [], None
    if use_classes:
        if None in tops:
            raise ValueError(f"{root}: with class_folders, every image must sit in a class "
                             f"sub-folder; {images[tops.index(None)]} does not")
        class_names = sorted(set(tops))
        class_index = {name: i for i, name in enumerate(class_names)}
        class_ids = [class_index[t] for t in tops]
    index = {image: i for i, image in enumerate(images)}
    keep = [index[image] for image in _select(images, split, config, name=f"folder {root}")]
    return ImageDataset(f"folder {root}", [str(root / images[i]) for i in keep],
                        image_size=config.image_size, hflip=config.hflip,
                        captions=None if captions is None else [captions[i] for i in keep],
                        class_ids=None if class_ids is None else [class_ids[i] for i in keep],
                        class_names=class_names)


# the 128 x 128 face box in the 178 x 218 images
CELEBA_CROP = (25 / 178, 57 / 218, 153 / 178, 185 / 218)


def _read_celeba_attributes(path: Path) -> tuple[list[str], dict[str, list[bool]]]:
    lines = path.read_text().splitlines()
    names = lines[1].split() if len(lines) > 1 else []
    if len(names) != 40:
        raise ValueError(f"{path}: line 2 should name the 40 CelebA attributes, "
                         f"found {len(names)} names")
    table = {}
    for line_number, line in enumerate(lines[2:], 3):
        fields = line.split()
        if fields and (len(fields) != 41 or any(v not in ("1", "-1") for v in fields[1:])):
            raise ValueError(f"{path}, line {line_number}: expected a file name and 40 values "
                             "of 1 or -1")
        if fields:
            table[fields[0]] = [v == "1" for v in fields[1:]]
    return names, table


def celeba_caption(attributes: dict[str, bool]) -> str:
    """English from CelebA's attributes: "a smiling young woman with wavy blond hair, bangs and
    eyeglasses". "Attractive" is left out on purpose; "Blurry" makes it "a blurry photo of ..."."""
    a = attributes
    adjectives = [w for k, w in (("Smiling", "smiling"), ("Young", "young"), ("Chubby", "chubby"),
                                 ("Bald", "bald"), ("Pale_Skin", "pale")) if a.get(k)]
    hair = [w for k, w in (("Wavy_Hair", "wavy"), ("Straight_Hair", "straight")) if a.get(k)][:1]
    hair += [w for k, w in (("Black_Hair", "black"), ("Blond_Hair", "blond"),
                            ("Brown_Hair", "brown"), ("Gray_Hair", "gray")) if a.get(k)][:1]
    details = [" ".join(hair) + " hair"] if hair and not a.get("Bald") else []
    details += [w for k, w in (  # "!" negates: No_Beard = -1 means a beard
        ("Bangs", "bangs"), ("Receding_Hairline", "a receding hairline"),
        ("Eyeglasses", "eyeglasses"), ("Wearing_Hat", "a hat"), ("!No_Beard", "a beard"),
        ("Mustache", "a mustache"),
        ("Goatee", "a goatee"), ("Sideburns", "sideburns"), ("5_o_Clock_Shadow", "stubble"),
        ("Heavy_Makeup", "heavy makeup"), ("Wearing_Lipstick", "lipstick"),
        ("Wearing_Earrings", "earrings"),
        ("Wearing_Necklace", "a necklace"), ("Wearing_Necktie", "a necktie"),
        ("Mouth_Slightly_Open", "an open mouth"), ("High_Cheekbones", "high cheekbones"),
        ("Rosy_Cheeks", "rosy cheeks"), ("Arched_Eyebrows", "arched eyebrows"),
        ("Bushy_Eyebrows", "bushy eyebrows"), ("Narrow_Eyes", "narrow eyes"),
        ("Bags_Under_Eyes", "bags under the eyes"), ("Big_Nose", "a big nose"),
        ("Pointy_Nose", "a pointy nose"), ("Big_Lips", "big lips"),
        ("Double_Chin", "a double chin"), ("Oval_Face", "an oval face"),
    ) if (a.get(k[1:]) is False if k[0] == "!" else a.get(k))]
    words = " ".join(adjectives + ["man" if a.get("Male") else "woman"])
    text = ("an " if words[0] in "aeiou" else "a ") + words
    if details:
        text += (" with " + (", ".join(details[:-1]) + " and " if len(details) > 1 else "")
                 + details[-1])
    return "a blurry photo of " + text if a.get("Blurry") else text


def celeba_dataset(config: DataConfig, split: str = "train") -> ImageDataset:
    root = Path(config.root)
    folder = root / "img_align_celeba"
    if (folder / "img_align_celeba").is_dir():  # some archives nest the folder in itself
        folder = folder / "img_align_celeba"
    attr_file, partition_file = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    for path, what in ((folder, "the folder of aligned 178 x 218 face JPEGs"),
                       (attr_file, "the 40 binary attributes of each image"),
                       (partition_file, "the official train (0) / val (1) / test (2) partition")):
        if not path.exists():
            raise FileNotFoundError(f"CelebA: {path} not found; expected {what}, as in the "
                                    f"official CelebA release, under root {root}")
    if split not in SPLITS:
        raise ValueError(f"CelebA split must be one of {SPLITS}, got {split!r}")
    names, table = _read_celeba_attributes(attr_file)
    wanted = {"train": "0", "eval": "1", "test": "2"}.get(split)
    files = []
    for line_number, line in enumerate(partition_file.read_text().splitlines(), 1):
        fields = line.split()
        if fields and (len(fields) != 2 or fields[1] not in ("0", "1", "2")):
            raise ValueError(f"{partition_file}, line {line_number}: expected 'name 0|1|2', "
                             f"got {line!r}")
        if fields and wanted in (None, fields[1]) and fields[0] in table:
            files.append(fields[0])
    present = set(os.listdir(folder))
    missing = [f for f in files if f not in present]
    if missing:
        warnings.warn(f"CelebA: {len(missing)} images of the {split} split are missing from "
                      f"{folder} (e.g. {missing[0]}); skipped", stacklevel=2)
        files = [f for f in files if f in present]
    files = sorted(files)[: config.max_images]
    if not files:
        raise ValueError(f"CelebA: no images of the {split!r} split found in {folder}")
    class_names, class_ids = [], None
    if config.celeba_attribute is not None:
        if config.celeba_attribute not in names:
            raise ValueError(f"CelebA has no attribute {config.celeba_attribute!r}; "
                             f"choose from {names}")
        column = names.index(config.celeba_attribute)
        class_names = [f"not {config.celeba_attribute}", config.celeba_attribute]
        class_ids = [int(table[f][column]) for f in files]
    captions = [celeba_caption(dict(zip(names, table[f], strict=True))) for f in files]
    return ImageDataset(f"CelebA {root}", [str(folder / f) for f in files],
                        image_size=config.image_size, hflip=config.hflip, captions=captions,
                        class_ids=class_ids, class_names=class_names, crop=CELEBA_CROP)


def lsun_dataset(config: DataConfig, split: str = "train") -> ImageDataset:
    root = Path(config.root)
    if not (root / "data.mdb").is_file():
        if not root.is_dir():
            raise FileNotFoundError(f"LSUN: {root} is neither an LMDB export "
                                    "(a folder with data.mdb) nor a folder of images")
        return folder_dataset(replace(config, class_folders=False), split)
    lmdb = _import_lmdb()
    env = lmdb.open(str(root), readonly=True, lock=False, readahead=False, meminit=False)
    try:
        # LMDB lists keys in sorted order; _select stops at max_images
        with env.begin(write=False) as txn:
            listed = (key.decode("latin-1")
                      for key in txn.cursor().iternext(keys=True, values=False))
            keys = _select(listed, split, config, name=f"LSUN {root}")
    finally:
        env.close()
    return ImageDataset(f"LSUN {root}", keys,
                        image_size=config.image_size, hflip=config.hflip, lmdb_path=str(root))


def make_dataset(config: DataConfig, split: str = "train",
                 shapes: ShapesConfig | None = None) -> Dataset:
    """The dataset `config` describes. `shapes` sets the shapes dataset's own options."""
    if config.source == "shapes":
        if config.hflip:
            raise ValueError("hflip would swap left and right in the shapes dataset's captions")
        shapes = shapes or ShapesConfig(image_size=config.image_size)
        if shapes.image_size != config.image_size:
            raise ValueError(f"image_size {config.image_size} != "
                             f"shapes.image_size {shapes.image_size}")
        if config.max_images is not None:
            shapes = replace(shapes, n_train=min(shapes.n_train, config.max_images),
                             n_eval=min(shapes.n_eval, config.max_images))
        return ShapesDataset(shapes, split)
    read = {"folder": folder_dataset, "celeba": celeba_dataset, "lsun": lsun_dataset}[config.source]
    return read(config, split)


def make_image_datasets(source: str, root: str, *, image_size: int, n_eval: int | None = None,
                        **options) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets of `source` at `root`, eval capped at n_eval images; `options` are
    other DataConfig fields (they apply to train; eval is never flipped)."""
    config = DataConfig(source=source, root=root, image_size=image_size, **options)
    held_out = make_dataset(replace(config, max_images=n_eval, hflip=False), "eval")
    return make_dataset(config, "train"), held_out
