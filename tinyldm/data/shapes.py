"""The shapes dataset: procedural, seeded, download-free images with captions, and an exact
evaluator.

Why it exists. The LDM paper (arXiv 2112.10752) conditions one denoiser on text (Sec. 4.3.1, LAION),
classes (ImageNet), layouts (Sec. 4.3.1, COCO / OpenImages boxes) and semantic maps (Sec. 4.3.2).
Those data sets are large and their metrics (FID, CLIP score) need downloads. Here every one of
those conditions exists for a tiny image that renders in well under a millisecond, and "did the
model draw what it was asked for?" has an exact answer, from classical image analysis, not a
network.

The data (all fixed by `(seed, split, index)`; see `render`):
    * a light grey background, plain or with faint smooth texture;
    * 1..9 objects (`min_shapes`..`max_shapes`, default 1), each a `COLORS` x `SHAPES` class in its
      own cell of a 3x3 grid (`POSITIONS`: "top left" ... "bottom right"), jittered in position,
      size and hue. Objects in different cells never overlap, so each is one connected region;
    * a caption in one of several phrasings (`TEMPLATES`): "a red circle in the top left",
      "top left: a red circle", ...; objects are joined by " and " or "; ";
    * `class_id = color_index * len(SHAPES) + shape_index` (`CLASS_NAMES`), a layout (class and
      box per object, boxes as (x0, y0, x1, y1) fractions of the image side) and a semantic
      segmentation map (0 = background, 1 + class_id inside an object).
Splits: "train" (`n_train` images) and "eval" (`n_eval`) draw from different random streams, so no
eval image is a train image. They share the 162 (colour, shape, position) combinations on purpose.

The evaluator (`detect_shapes`, `score_images`), per image:
    1. background colour = per-channel median (each object covers 3-6% of the image);
    2. foreground = pixels farther than `FOREGROUND_DISTANCE` from it (RGB in [0, 1]);
    3. objects = 4-connected foreground components of at least `MIN_AREA_FRACTION` of the image;
    4. colour = majority vote of the object's core pixels (those with >= 60% of its largest
       contrast). A pixel is a blend a * colour + (1 - a) * background, so it votes for the `COLORS`
       entry whose blend line passes closest; pixels far from every line do not vote, and without a
       majority the colour is None (wrong for any prompt);
    5. shape from moments of the soft mask (contrast / core contrast, clipped to 1): a triangle's
       mass is skewed (|skewness| ~0.55), a square's projection is flatter along its axes than along
       its diagonals (kurtosis 1.8 vs 2.4), a disc's is the same in every direction;
    6. position = grid cell of the centroid; box = extent of the component.
Requested objects are matched to the largest detections (one each, greedily by agreement), so a
missing object scores wrong on every attribute. Ground truth scores 100% (>= 99% after mild blur
and noise); noise and wrong prompts score at or below chance (1/6, 1/3, 1/9; tests show all three).

Left out: rotation, occlusion, size words in captions, held-out combinations (all easy to add).
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

# --- vocabulary --------------------------------------------------------------------------------

COLORS = {  # name -> RGB in 0..255, chosen far from each other and from the grey background
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")


def position_name(row: int, col: int) -> str:
    """Name of grid cell (row, col): "top left", "top center", "middle left", "center", ..."""
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))  # index = 3 * row + col
CLASS_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)  # index = class_id
TEMPLATES = (  # (one object, joiner between objects)
    ("a {color} {shape} in the {position}", " and "),
    ("{position}: a {color} {shape}", "; "),
    ("a {color} {shape} at the {position}", " and "),
    ("there is a {color} {shape} in the {position}", " and "),
    ("{color} {shape}, {position}", "; "),
)
_TEMPLATE_WORDS = {w for t, j in TEMPLATES for w in re.findall(r"[a-z]+|[^\sa-z{}]", t + j)}
_NAME_WORDS = {"an"} | set(COLORS) | set(SHAPES) | set(ROWS) | set(COLS)
VOCABULARY = tuple(sorted((_TEMPLATE_WORDS - {"color", "shape", "position"}) | _NAME_WORDS))
"""Every token a caption can contain: lowercase words and ":", ";", "," (split with
`[a-z]+|[:;,]`)."""


def class_id(color: str, shape: str) -> int:
    return list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


def seg_palette() -> Tensor:
    """(1 + 18, 3) uint8 colours for drawing a segmentation map: light grey background, each class
    in its colour (use with `viz.label_image`)."""
    return torch.tensor([[235, 235, 235]] + [COLORS[name.split(" ")[0]] for name in CLASS_NAMES],
                        dtype=torch.uint8)


@dataclass(frozen=True)
class ShapeSpec:
    """What one object should look like. None means "not specified" (not scored)."""

    color: str | None
    shape: str | None
    position: str | None


def caption(specs: list[ShapeSpec], template: int = 0) -> str:
    """Caption for a list of fully specified objects in phrasing `template` (0 is the canonical
    one)."""
    text, joiner = TEMPLATES[template]
    out = joiner.join(text.format(color=s.color, shape=s.shape, position=s.position) for s in specs)
    return re.sub(r"\ba (?=[aeiou])", "an ", out)  # "an orange circle"


def all_prompts() -> list[str]:
    """The 162 single-object prompts in canonical phrasing (for per-prompt evaluation)."""
    return [caption([ShapeSpec(c, s, p)]) for c in COLORS for s in SHAPES for p in POSITIONS]


_SHAPE_WORDS = {"circle": "circle", "disc": "circle", "disk": "circle", "square": "square",
                "triangle": "triangle"}
_ROW_WORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COL_WORDS = {"left": 0, "right": 2}


def parse_prompt(prompt: str) -> list[ShapeSpec]:
    """Read the objects back from a caption or any similar prompt ("upper left: a blue disc" is
    fine).

    Objects are clauses separated by "and", ";" or a newline; each names one shape, at most one
    colour, and a position built from a row word (top/upper, bottom/lower), a column word
    (left, right) or center/centre/middle. Missing attributes come back as None.
    """
    specs = []
    for clause in re.split(r";|\band\b|\n", prompt.lower()):  # one object per clause
        words = re.findall(r"[a-z]+", clause)
        shapes = [_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS]
        if not shapes:
            continue
        colors = [w for w in words if w in COLORS]
        if len(shapes) > 1 or len(colors) > 1:
            raise ValueError(f"clause {clause.strip()!r} of prompt {prompt!r} names several shapes "
                             "or colours; separate objects with 'and' or ';'")
        rows = [_ROW_WORDS[w] for w in words if w in _ROW_WORDS]
        cols = [_COL_WORDS[w] for w in words if w in _COL_WORDS]
        centred = any(w in ("center", "centre", "middle") for w in words)
        position = None
        if rows or cols or centred:
            position = position_name(rows[0] if rows else 1, cols[0] if cols else 1)
        specs.append(ShapeSpec(colors[0] if colors else None, shapes[0], position))
    if not specs:
        raise ValueError(f"no shape ({', '.join(SHAPES)}) named in prompt {prompt!r}; "
                         "expected e.g. 'a red circle in the top left'")
    return specs


def specs_from_layout(box_classes: Tensor, boxes: Tensor) -> list[ShapeSpec]:
    """Turn one image's layout (class ids (K,), boxes (K, 4) fractions; class -1 = padding) into
    specs."""
    specs = []
    for c, (x0, y0, x1, y1) in zip(box_classes.tolist(), boxes.tolist(), strict=True):
        if c < 0:
            continue
        # cell of the box centre
        row, col = min(int(1.5 * (y0 + y1)), 2), min(int(1.5 * (x0 + x1)), 2)
        color, shape = list(COLORS)[c // len(SHAPES)], SHAPES[c % len(SHAPES)]
        specs.append(ShapeSpec(color, shape, position_name(row, col)))
    return specs


# --- rendering ---------------------------------------------------------------------------------

# half-extent of an object, as a fraction of the image side: 8-9 px discs at 32 px
SIZE_RANGE = (0.12, 0.14)
# position jitter; 1/6 - JITTER - max size > 0 keeps objects inside their cells
JITTER = 0.01
COLOR_JITTER = 12           # per channel, 0..255
SUPERSAMPLE = 4             # antialiasing: 4 x 4 samples per pixel


@dataclass
class ShapesConfig:
    image_size: int = 64
    min_shapes: int = 1
    max_shapes: int = 1
    background: str = "plain"  # "plain" or "texture"
    n_train: int = 50_000
    n_eval: int = 1_000
    seed: int = 0

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes <= 9:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 9 (one per grid cell), "
                             f"got {self.min_shapes}, {self.max_shapes}")
        if self.background not in ("plain", "texture"):
            raise ValueError(f"background must be 'plain' or 'texture', got {self.background!r}")


@dataclass
class ShapesSample:
    image: np.ndarray  # (H, W, 3) uint8
    seg: np.ndarray    # (H, W) int64: 0 background, 1 + class_id
    specs: list[ShapeSpec]
    boxes: np.ndarray  # (K, 4) float32 (x0, y0, x1, y1) as fractions of the side
    caption: str


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
    """Which points (x, y) lie in the shape centred at (cx, cy) with half-extent s (pixels)."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= s**2
    if shape == "square":
        return (np.abs(x - cx) <= 0.8 * s) & (np.abs(y - cy) <= 0.8 * s)
    # triangle, apex up: its half-width grows from 0 at y = cy - s to s at the base y = cy + s
    return (y <= cy + s) & (np.abs(x - cx) <= (y - cy + s) / 2)


def _half_extent(shape: str, s: float) -> float:
    return 0.8 * s if shape == "square" else s


def render(config: ShapesConfig, index: int, split: str = "train") -> ShapesSample:
    """Draw image `index` of `split` ("train" or "eval"); the same arguments always give the same
    image."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    n = config.n_train if split == "train" else config.n_eval
    if not 0 <= index < n:
        raise IndexError(f"index {index} out of range for the {split} split of {n} images")
    rng = np.random.default_rng([config.seed, split == "eval", index])
    S, ss = config.image_size, SUPERSAMPLE

    grey = rng.uniform(215, 235) + rng.uniform(-4, 4, size=3)  # slightly tinted light grey
    image = np.broadcast_to(grey, (S, S, 3)).astype(np.float32)
    # faint smooth waves: 3 random plane waves of 1-3 cycles per image
    if config.background == "texture":
        y, x = np.mgrid[0:S, 0:S].astype(np.float32) / S
        for _ in range(3):
            fx, fy = rng.uniform(-3, 3, size=2)
            wave = np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
            image = image + rng.uniform(2, 5) * wave[..., None]
    seg = np.zeros((S, S), dtype=np.int64)

    specs, boxes = [], []
    k = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    for cell in rng.choice(9, size=k, replace=False):
        color, shape = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        row, col = divmod(int(cell), 3)
        cx = ((col + 0.5) / 3 + rng.uniform(-JITTER, JITTER)) * S  # centre, in pixels
        cy = ((row + 0.5) / 3 + rng.uniform(-JITTER, JITTER)) * S
        s = rng.uniform(*SIZE_RANGE) * S
        rgb = (np.array(COLORS[color], dtype=np.float32)
               + rng.uniform(-COLOR_JITTER, COLOR_JITTER, size=3))

        # Coverage of each pixel in the object's window, from ss x ss samples at sub-pixel centres.
        e = _half_extent(shape, s)
        x0, x1 = max(int(cx - e), 0), min(int(np.ceil(cx + e)), S)
        y0, y1 = max(int(cy - e), 0), min(int(np.ceil(cy + e)), S)
        xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
        ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
        hit = _inside(shape, xs[None, :], ys[:, None], cx, cy, s)
        alpha = hit.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3), dtype=np.float32)  # (h, w)
        window = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = window + alpha[..., None] * (rgb - window)
        seg[y0:y1, x0:x1][alpha >= 0.5] = 1 + class_id(color, shape)

        specs.append(ShapeSpec(color, shape, position_name(row, col)))
        boxes.append(((cx - e) / S, (cy - e) / S, (cx + e) / S, (cy + e) / S))

    text = caption(specs, template=int(rng.integers(len(TEMPLATES))))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return ShapesSample(image, seg, specs, np.array(boxes, dtype=np.float32), text)


class ShapesDataset(Dataset):
    """torch Dataset over `render`. Each item is a dict:

        image        (3, H, W) float32 in [-1, 1]
        caption      str
        class_id     int, the class of the first object (the only one by default)
        boxes        (max_shapes, 4) float32, (x0, y0, x1, y1) fractions; zero rows pad
        box_classes  (max_shapes,) int64 class ids; -1 pads
        seg          (H, W) int64, 0 background, 1 + class_id
    Fixed sizes, so torch's default collate batches it. Never flip it: that changes the positions.
    """

    def __init__(self, config: ShapesConfig, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.config, self.split = config, split
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return self.config.n_train if self.split == "train" else self.config.n_eval

    def __getitem__(self, index: int) -> dict:
        sample = render(self.config, index, self.split)
        K = self.config.max_shapes
        boxes, box_classes = torch.zeros(K, 4), torch.full((K,), -1, dtype=torch.long)
        boxes[: len(sample.specs)] = torch.from_numpy(sample.boxes)
        box_classes[: len(sample.specs)] = torch.tensor([class_id(s.color, s.shape)
                                                         for s in sample.specs])
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
        return {"image": image, "caption": sample.caption, "class_id": int(box_classes[0]),
                "boxes": boxes, "box_classes": box_classes, "seg": torch.from_numpy(sample.seg)}


# --- the evaluator -----------------------------------------------------------------------------

# RGB distance in [0, 1] units; the closest colour is ~0.75 from the background
FOREGROUND_DISTANCE = 0.25
# farther than this from every colour's blend line, a pixel does not vote
MAX_COLOR_DISTANCE = 0.2
CORE_FRACTION = 0.6          # pixels at >= 60% of the object's largest contrast are its core
MIN_AREA_FRACTION = 0.004    # the smallest object covers ~2.9% of the image
SKEW_THRESHOLD = 0.25        # |skewness|: triangle ~0.55, circle and square ~0
KURTOSIS_THRESHOLD = 0.25    # diagonal minus axis kurtosis: square ~0.6, circle ~0
_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # (6, 3)


@dataclass
class Detection:
    color: str | None
    shape: str
    position: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) fractions
    area: float                             # fraction of the image


def _components(mask: Tensor) -> Tensor:
    """4-connected components of a (B, H, W) bool mask: each foreground pixel gets the smallest flat
    index in its component, background gets H * W. Min-propagation plus pointer jumping."""
    B, H, W = mask.shape
    n = H * W
    labels = torch.where(mask, torch.arange(n).view(1, H, W), n)
    while True:
        padded = F.pad(labels, (1, 1, 1, 1), value=n)  # (B, H + 2, W + 2)
        new = torch.minimum(torch.minimum(padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]),
                            torch.minimum(padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]))
        new = torch.where(mask, torch.minimum(labels, new), n)
        flat = torch.cat([new.view(B, n), torch.full((B, 1), n)], dim=1)  # (B, n + 1); index n -> n
        new = torch.gather(flat, 1, new.view(B, n)).view(B, H, W)  # jump to my label's label
        if torch.equal(new, labels):
            return labels
        labels = new


@contextmanager
def _one_thread():
    """Run torch on one thread: the evaluator is many small ops, for which thread synchronisation
    costs more than it saves, and 20-50x more while DataLoader workers keep the other cores busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@_one_thread()
def detect_shapes(images: Tensor) -> list[list[Detection]]:
    """Find the objects in (B, 3, H, W) images in [-1, 1]; per image, largest first. Steps 1-6 of
    the module docstring. The soft mask used for the moments covers the component grown by one
    pixel, so it keeps the anti-aliased edge, which is what makes 32 px images work."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8 or images.min() < -1.5 or images.max() > 1.5:
        raise ValueError("expected float images in [-1, 1] (x / 127.5 - 1 for uint8 pixels)")
    B, _, H, W = images.shape
    if B > 64:  # bound the memory: all per-pixel tensors below scale with B * H * W
        return [d for i in range(0, B, 64) for d in detect_shapes(images[i : i + 64])]
    n = H * W
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
    background = x.flatten(2).median(dim=2).values  # (B, 3)
    # (B, H, W); faster than .norm
    contrast = (x - background[:, :, None, None]).square().sum(dim=1).sqrt()
    labels = _components(contrast > FOREGROUND_DISTANCE)
    near = -F.max_pool2d(-labels[:, None].float(), 3, stride=1, padding=1)[:, 0].long()
    region = torch.where(labels < n, labels, near)  # each object grown by one pixel

    b, py, px = (region < n).nonzero(as_tuple=True)  # pixels of all grown objects in the batch
    inside = labels[b, py, px] < n
    comp, inv = torch.unique(b * n + region[b, py, px], return_inverse=True)
    m = len(comp)

    def reduce(values: Tensor, how: str = "sum") -> Tensor:  # per object
        return torch.zeros(m).scatter_reduce(0, inv, values.float(), how, include_self=False)

    area = reduce(inside)
    x0, x1 = (reduce(torch.where(inside, px, W), "amin"),
              reduce(torch.where(inside, px, -1), "amax") + 1)
    y0, y1 = (reduce(torch.where(inside, py, H), "amin"),
              reduce(torch.where(inside, py, -1), "amax") + 1)
    # Colour: a core pixel is a blend a * colour + (1 - a) * background; it votes for the named
    # colour whose blend line passes closest to it, or for none (index 6) if all are
    # MAX_COLOR_DISTANCE away.
    c = contrast[b, py, px]
    core = inside & (c >= CORE_FRACTION * reduce(c * inside, "amax")[inv])
    bg = background[b[core]]  # (P, 3)
    d = x.permute(0, 2, 3, 1)[b[core], py[core], px[core]] - bg  # (P, 3)
    e = _PALETTE[None] - bg[:, None]  # (P, 6, 3)
    a = ((d[:, None] * e).sum(-1) / e.square().sum(-1)).clamp(0, 1)  # (P, 6) blend weights
    dist, nearest = (d[:, None] - a[..., None] * e).square().sum(-1).sqrt().min(dim=1)
    nearest[dist > MAX_COLOR_DISTANCE] = len(COLORS)
    votes = torch.zeros(m, len(COLORS) + 1).index_put_((inv[core], nearest),
                                                       torch.ones(len(nearest)),
                                                       accumulate=True)  # (m, 7)
    top_votes, top_color = votes[:, : len(COLORS)].max(dim=1)
    # Shape: moments of the soft mask w.
    w = (c / (reduce(c * core) / reduce(core))[inv]).clamp(max=1.0)
    mass = reduce(w)
    cx, cy = reduce(w * (px + 0.5)) / mass, reduce(w * (py + 0.5)) / mass

    def moment(v: Tensor, p: int) -> Tensor:
        return reduce(w * v**p) / mass

    X, Y = px + 0.5 - cx[inv], py + 0.5 - cy[inv]
    skew = (moment(X, 3) ** 2 / moment(X, 2) ** 3 + moment(Y, 3) ** 2 / moment(Y, 2) ** 3).sqrt()
    U, V = (X + Y) / 2**0.5, (X - Y) / 2**0.5
    kurtosis = [moment(v, 4) / moment(v, 2) ** 2 for v in (X, Y, U, V)]
    # a diamond is a square
    spread = ((kurtosis[2] + kurtosis[3]) - (kurtosis[0] + kurtosis[1])).abs() / 2

    detections: list[list[Detection]] = [[] for _ in range(B)]
    for j in (area >= MIN_AREA_FRACTION * n).nonzero().flatten().tolist():
        color = list(COLORS)[top_color[j]] if top_votes[j] > votes[j].sum() / 2 else None
        shape = ("triangle" if skew[j] > SKEW_THRESHOLD else
                 "square" if spread[j] > KURTOSIS_THRESHOLD else "circle")
        row, col = min(int(3 * cy[j] / H), 2), min(int(3 * cx[j] / W), 2)
        box = (x0[j].item() / W, y0[j].item() / H, x1[j].item() / W, y1[j].item() / H)
        found = Detection(color, shape, position_name(row, col), box, area[j].item() / n)
        detections[int(comp[j]) // n].append(found)
    for d in detections:
        d.sort(key=lambda det: -det.area)
    return detections


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


@dataclass
class ShapesScore:
    """Accuracies in [0, 1]: the mean over images of each image's mean over its requested objects;
    `all` counts an image only if every specified attribute of every object is right."""

    color: float
    shape: float
    position: float
    all: float
    # mean box IoU of requested vs detected objects, when boxes were given
    iou: float | None
    per_image: list[dict] = field(repr=False)
    # prompt -> the same means over its images
    by_prompt: dict[str, dict[str, float]] = field(repr=False)

    def summary(self) -> str:
        iou = "" if self.iou is None else f"  box IoU {self.iou:.3f}"
        return (f"color {self.color:.3f}  shape {self.shape:.3f}  position {self.position:.3f}  "
                f"all {self.all:.3f}{iou}  ({len(self.per_image)} images)")


ATTRIBUTES = ("color", "shape", "position")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _describe(specs: list[ShapeSpec]) -> str:
    """A prompt-like name for specs that leave attributes open: "a circle and a red shape in the
    center"."""
    words = [("a", s.color, s.shape or "shape", s.position and f"in the {s.position}")
             for s in specs]
    parts = [" ".join(w for w in object_words if w) for object_words in words]
    return re.sub(r"\ba (?=[aeiou])", "an ", " and ".join(parts))


def _match(specs: list[ShapeSpec], found: list[Detection], boxes: list | None) -> dict[int, int]:
    """Greedy one-to-one matching of requested objects to detections, most attributes in common
    first (box IoU breaks ties): {index in specs: index in found}."""

    def agreement(r: int, d: int) -> float:
        same = sum(getattr(specs[r], a) == getattr(found[d], a) for a in ATTRIBUTES)
        return same + (0.5 * box_iou(boxes[r], found[d].box) if boxes else 0.0)

    match: dict[int, int] = {}
    for _, r, d in sorted(((agreement(r, d), r, d) for r in range(len(specs))
                           for d in range(len(found))), reverse=True):
        if r not in match and d not in match.values():
            match[r] = d
    return match


def score_images(images: Tensor, prompts: list, boxes: list | None = None) -> ShapesScore:
    """Score (B, 3, H, W) images in [-1, 1] against what was asked for: per image either a prompt
    string (see `parse_prompt`) or a list of `ShapeSpec`; optionally per image a (K, 4) array of
    requested boxes, in the order of that image's objects, for layout-to-image models."""
    if len(prompts) != len(images) or (boxes is not None and len(boxes) != len(images)):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts"
                         + ("" if boxes is None else f" and {len(boxes)} box lists"))
    per_image = []
    for i, found in enumerate(detect_shapes(images)):
        prompt = prompts[i]
        specs = parse_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        wanted_boxes = None if boxes is None else [tuple(map(float, bx)) for bx in boxes[i]]
        if wanted_boxes is not None and len(wanted_boxes) != len(specs):
            raise ValueError(f"image {i}: {len(specs)} objects requested but "
                             f"{len(wanted_boxes)} boxes given")
        candidates = found[: len(specs)]  # the largest detections, one per requested object
        match = _match(specs, candidates, wanted_boxes)

        record = {"prompt": prompt if isinstance(prompt, str) else _describe(specs)}
        for a in ATTRIBUTES:
            hits = [r in match and getattr(candidates[match[r]], a) == getattr(s, a)
                    for r, s in enumerate(specs) if getattr(s, a) is not None]
            record[a] = _mean(hits) if hits else None
        record["all"] = float(all(record[a] in (None, 1.0) for a in ATTRIBUTES))
        if wanted_boxes is not None:
            record["iou"] = _mean([box_iou(b, candidates[match[r]].box) if r in match else 0.0
                                   for r, b in enumerate(wanted_boxes)])
        record["detections"] = found
        per_image.append(record)

    def means(records: list[dict]) -> dict[str, float]:
        keys = ATTRIBUTES + ("all",) + (("iou",) if boxes is not None else ())
        return {k: _mean([r[k] for r in records if r[k] is not None]) for k in keys}

    groups: dict[str, list[dict]] = {}
    for r in per_image:
        groups.setdefault(r["prompt"], []).append(r)
    overall = means(per_image)
    return ShapesScore(overall["color"], overall["shape"], overall["position"], overall["all"],
                       overall.get("iou"), per_image, {p: means(rs) for p, rs in groups.items()})
