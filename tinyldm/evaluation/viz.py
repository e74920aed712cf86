"""Pictures for people: image grids as arrays (for PNG files and for matplotlib in the notebooks).

Images everywhere in tinyldm are float tensors (N, C, H, W) in [-1, 1] with C = 1 or 3. matplotlib
is optional (the `notebooks` extra) and imported only by `show_images`; `save_image_grid` writes a
PNG with pillow.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, *, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 array (rows, cols, 3) on a white
    background."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    N, C, H, W = images.shape
    nrow = max(1, min(nrow, N))
    ncol = math.ceil(N / nrow)
    grid = torch.ones(C, ncol * (H + pad) + pad, nrow * (W + pad) + pad)
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad) : pad + r * (H + pad) + H,
             pad + c * (W + pad) : pad + c * (W + pad) + W] = x[i]
    grid = grid.expand(3, -1, -1) if C == 1 else grid
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def show_images(images: torch.Tensor, *, nrow: int = 8, title: str | None = None, ax=None,
                scale: float = 0.6, pad: int = 1):
    """Draw an image grid with matplotlib (nearest-neighbour, no axes). Returns the Axes.

    `scale` is inches per image, so 32 px shapes stay readable without a large PNG in the notebook.
    """
    import matplotlib.pyplot as plt

    grid = image_grid(images, nrow=nrow, pad=pad)
    if ax is None:
        n_cols = max(1, min(nrow, len(images)))
        n_rows = math.ceil(len(images) / n_cols)
        _, ax = plt.subplots(figsize=(max(1.0, scale * n_cols),
                                      max(1.0, scale * n_rows) + (0.3 if title else 0)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def label_image(labels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """A label map (B, H, W) of ids 0..K-1 painted with palette (K, 3) uint8 colours -> (B, 3, H, W)
    in [-1, 1]."""
    if labels.ndim != 3 or labels.dtype.is_floating_point:
        raise ValueError(f"expected integer labels (B, H, W), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= len(palette):
        raise ValueError(f"label ids must be in 0..{len(palette) - 1}")
    rgb = palette.float()[labels.long()]  # (B, H, W, 3)
    return rgb.permute(0, 3, 1, 2) / 127.5 - 1.0


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int = 8,
                    pad: int = 2) -> Path:
    """Tile (N, C, H, W) images in [-1, 1] (C = 1 or 3) into one PNG, written atomically."""
    from PIL import Image

    array = image_grid(images, nrow=nrow, pad=pad)
    return _save_png(Image.fromarray(array[:, :, 0] if images.shape[1] == 1 else array), path)


def _save_png(image, path: str | os.PathLike) -> Path:
    """A PIL image to `path` as PNG via a temporary file and a rename: a reader never sees half a
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# Plot area of one panel of `save_curve`'s PNG, in pixels: left, top, right, bottom.
CURVE_SIZE, CURVE_BOX = (480, 240), (64, 24, 464, 200)
BLUE, GREY = (31, 119, 180), (170, 170, 170)


def _panel(draw, dy: int, series: list[tuple], title: str, log_y: bool) -> None:
    """One plot at height offset `dy`: `series` = [(steps, values, colour)], drawn in order on
    shared axes (the first series is the run's, later ones a reference's)."""
    ys_all = [[math.log10(v) if log_y else v for v in values] for _, values, _ in series]
    xs = [x for steps, _, _ in series for x in steps]
    flat = [y for ys in ys_all for y in ys]
    x0, x1, y0, y1 = min(xs), max(xs), min(flat), max(flat)
    left, top, right, bottom = CURVE_BOX
    top, bottom = top + dy, bottom + dy
    to_x = lambda s: left + (right - left) * ((s - x0) / (x1 - x0)  # noqa: E731
                                              if x1 > x0 else 0.5)
    to_y = lambda y: bottom - (bottom - top) * ((y - y0) / (y1 - y0)  # noqa: E731
                                                if y1 > y0 else 0.5)
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    for (steps, _, colour), ys in reversed(list(zip(series, ys_all, strict=True))):
        points = [(to_x(x), to_y(y)) for x, y in zip(steps, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points if len(points) < 12 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    label = (lambda y: f"{10 ** y:.3g}") if log_y else (lambda y: f"{y:.3g}")
    draw.text((4, top - 6), label(y1), fill="black")
    draw.text((4, bottom - 6), label(y0), fill="black")
    draw.text((left, bottom + 6), f"{x0:g}", fill="black")
    draw.text((right - 40, bottom + 6), f"{x1:g}", fill="black")
    draw.text((left, dy + 4), title + (" (log scale)" if log_y else ""), fill="black")


def save_curve(steps: list[float], values: list[float], path: str | os.PathLike, *, title: str,
               log_y: bool = True) -> Path:
    """A line plot of `values` against `steps` as a PNG, drawn with pillow alone (no matplotlib
    needed), written atomically: for watching a long run's loss beside its sample grids. With
    `log_y` the vertical axis is log10(value), where a loss falling by a constant factor per step is
    a straight line."""
    if len(steps) != len(values) or not steps:
        raise ValueError(f"need as many steps as values, and at least one: got {len(steps)} and "
                         f"{len(values)}")
    return save_panels([([(steps, values, BLUE)], title, log_y)], path)


def save_panels(plots: list[tuple], path: str | os.PathLike) -> Path:
    """Plots one under another in one PNG, each (series, title, log_y) with series = [(steps,
    values, colour)] on shared axes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (CURVE_SIZE[0], CURVE_SIZE[1] * len(plots)), "white")
    draw = ImageDraw.Draw(image)
    for i, (series, title, log_y) in enumerate(plots):
        _panel(draw, i * CURVE_SIZE[1], series, title, log_y)
    return _save_png(image, path)


def save_loss_curve(log_path: str | os.PathLike, path: str | os.PathLike, *,
                    key: str = "loss", reference: dict | None = None) -> Path | None:
    """`save_curve` of the records of a JSONL training log (tinyldm.training.loop.JSONLLogger) that
    hold `key`, and below it the quality curve where the log has one (records with "quality"); a
    `reference` run's curves (`tinyldm.evaluation.curves`) in grey behind both, the quality's only
    where it measured the same thing. None while there are fewer than two loss records."""
    import json

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and r[key] > 0]
    if len(points) < 2:
        return None
    ref = reference or {}
    steps, values = (list(v) for v in zip(*points, strict=True))
    loss = [(steps, values, BLUE)]
    title = f"{key} per step, {Path(log_path).parent.name}"
    if ref.get("loss"):
        loss.append(([q[0] for q in ref["loss"]], [q[1] for q in ref["loss"]], GREY))
        title += f" (grey: {ref['name']})"
    plots = [(loss, title, True)]
    quality = [r for r in records if isinstance(r.get("quality"), (int, float))]
    if quality:
        last = quality[-1]
        series = [([r["step"] for r in quality], [r["quality"] for r in quality], BLUE)]
        if ref.get("quality") and ref.get("quality_name") == last.get("quality_name"):
            series.append(([q[0] for q in ref["quality"]], [q[2] for q in ref["quality"]], GREY))
        plots.append((series, f"{last.get('quality_name', 'quality')} "
                      f"({last.get('quality_better', '?')} is better)", False))
    return save_panels(plots, path)
