"""Image-to-image tasks: the "concat" conditions of semantic synthesis, super-resolution and
inpainting.

Contract with the paper
-----------------------
LDM (Rombach et al., arXiv 2112.10752), Sec. 3.3 and 4.3.2: "by concatenating spatially aligned
conditioning information to the input of eps_theta, LDMs can serve as efficient general-purpose
image-to-image translation models." The condition is a tensor `concat` (B, C_c, h, w) at the latent
size (h = H / f) that the UNet stacks onto z_t (`UNetConfig.concat_channels = C_c`). This file
builds those tensors (and the few image operations around them) as pure functions; the model is
unchanged.

* Semantic synthesis (Sec. 4.3.2): "concatenate downsampled versions of the semantic maps with the
  latent image representation of a f = 4 model". `semantic_condition`: one-hot map, (num_classes +
  1) channels (channel 0 = background), downsampled by *area averaging*, so each channel of a latent
  pixel is the exact fraction of its f x f pixels covered by that class and the channels sum to 1.
  (CompVis rescale the map with a learned 1x1 conv and bilinear steps instead; averaging is
  parameter-free.)
* Super-resolution (Sec. 4.4): "we follow SR3 and fix the image degradation to a bicubic
  interpolation with 4x-downsampling ... and concatenate the low-resolution conditioning y and the
  inputs to the UNet, i.e. tau_theta is the identity." `downsample` is that degradation (antialiased
  bicubic, clamped to [-1, 1]); `upsample_bicubic` is the bicubic baseline the model is compared
  against. With a f = 4 autoencoder and 4x degradation the low-resolution image already has the
  latent size (32 px shapes: 8 x 8 image, 8 x 8 x 4 latent; the paper: ImageNet 64 -> 256, 64 x 64
  latent), so the concat input is the LR image itself, 3 channels; `superres_condition` resizes it
  bicubically only when sizes differ.
* Inpainting (Sec. 4.5): "we follow the protocol of LaMa" (Suvorov et al., arXiv 2109.07161): large
  masks of thick irregular strokes and boxes (the paper also reports the subset with 40-50% masked).
  `random_mask` draws such masks with torch ops only (module constants below give the sizes;
  coverage is kept in [min_coverage, max_coverage], default 10%..60%). Mask convention: 1 = missing
  (to be generated), 0 = known. As in CompVis' inpainting script, the masked image x * (1 - m) sets
  missing pixels to 0 (mid grey in [-1, 1]); the caller encodes it, z_masked = E(x * (1 - m)), and
  the concat input is [z_masked, m at the latent size] (c + 1 channels). The mask is downsampled by
  *max-pooling*: a latent pixel is marked missing if any of its f x f pixels is (CompVis use nearest
  interpolation, which samples one pixel per block and can drop strokes thinner than f). `composite`
  is the final paste that keeps the known pixels bit for bit; `masked_psnr` scores the hole only.

Sizes: the latent size must divide the image size (h = H / f) for the segmentation map and the mask,
so that "fraction of the block" and "any pixel of the block" are exact. Super-resolution resizes are
free.

Left out: the paper's general-degradation super-resolution (LDM-BSR: blur, noise, JPEG), LaMa's
exact mask generator parameters (they are for 256-512 px images), a learned rescaler for semantic
maps, and RePaint-style resampling (an unconditional model inpainting by replacing the known region
at each step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tinyldm.evaluation.metrics import _to_unit

# --- semantic synthesis (Sec. 4.3.2) -----------------------------------------------------------


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


def _block(H: int, W: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """The integer downsampling factors (H / h, W / w) of an image (H, W) to a latent of `size`."""
    h, w = _size(size)
    if H % h or W % w:
        raise ValueError(f"the latent size {(h, w)} must divide the image size {(H, W)} "
                         "(h = H / f)")
    return H // h, W // w


def semantic_condition(seg: Tensor, num_classes: int, size: int | tuple[int, int]) -> Tensor:
    """One-hot segmentation map (B, H, W) -> class fractions per latent pixel
    (B, num_classes + 1, h, w).

    seg: int64 ids, 0 = background, 1 + class_id inside an object (as `ShapesDataset`'s "seg").
    Channel k of the result is the fraction of the latent pixel's (H/h) x (W/w) block whose id is k;
    channels sum to 1.
    """
    if seg.ndim != 3 or seg.dtype.is_floating_point or seg.dtype == torch.bool:
        raise ValueError(f"seg must be an integer (B, H, W) map, got {seg.dtype} "
                         f"of shape {tuple(seg.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if seg.numel() and (seg.min() < 0 or seg.max() > num_classes):
        raise ValueError(f"seg ids must be in 0..{num_classes} (0 = background, 1 + class_id), "
                         f"got {int(seg.min())}..{int(seg.max())}")
    B, H, W = seg.shape
    fh, fw = _block(H, W, size)
    one_hot = F.one_hot(seg.long(), num_classes + 1).permute(0, 3, 1, 2).float()  # (B, K + 1, H, W)
    return F.avg_pool2d(one_hot, kernel_size=(fh, fw))  # (B, K + 1, h, w): area fractions


# --- super-resolution (Sec. 4.4) ---------------------------------------------------------------


def _check_images(x: Tensor, name: str = "x") -> None:
    if x.ndim != 4 or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float (B, C, H, W) batch, got {x.dtype} "
                         f"of shape {tuple(x.shape)}")


def downsample(x: Tensor, factor: int = 4) -> Tensor:
    """The SR3 / LDM-SR degradation: bicubic downsampling by `factor` with antialiasing, clamped to
    [-1, 1].

    (B, C, H, W) -> (B, C, H / factor, W / factor); this low-resolution image is what the model
    sees. Antialiasing widens the bicubic kernel by `factor` (a low-pass filter, as PIL's resize),
    so the LR image is not aliased; bicubic overshoot near edges is clamped back into the image
    range.
    """
    _check_images(x)
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    B, C, H, W = x.shape
    if H % factor or W % factor:
        raise ValueError(f"image size {(H, W)} is not divisible by factor {factor}")
    x_lr = F.interpolate(x, size=(H // factor, W // factor), mode="bicubic", antialias=True,
                         align_corners=False)
    return x_lr.clamp(-1.0, 1.0)  # (B, C, H / factor, W / factor)


def upsample_bicubic(x_lr: Tensor, size: int | tuple[int, int]) -> Tensor:
    """The bicubic baseline: (B, C, h, w) -> (B, C, *size), clamped to [-1, 1]."""
    _check_images(x_lr, "x_lr")
    return F.interpolate(x_lr, size=_size(size), mode="bicubic",
                         align_corners=False).clamp(-1.0, 1.0)


def superres_condition(x_lr: Tensor, size: int | tuple[int, int]) -> Tensor:
    """The concat input of a super-resolution LDM: the LR image at the latent size (B, 3, *size).

    tau_theta is the identity (Sec. 4.4): returned unchanged when x_lr already has the latent size
    (f = 4 and 4x degradation); otherwise resized bicubically (antialiased when shrinking).
    """
    _check_images(x_lr, "x_lr")
    h, w = _size(size)
    if x_lr.shape[-2:] == (h, w):
        return x_lr
    shrink = h < x_lr.shape[-2] or w < x_lr.shape[-1]
    return F.interpolate(x_lr, size=(h, w), mode="bicubic", antialias=shrink,
                         align_corners=False).clamp(-1.0, 1.0)


# --- inpainting (Sec. 4.5) ---------------------------------------------------------------------

# Mask elements, as fractions of the image side (LaMa's are in pixels of 256 px images). With these,
# mixed masks cover 33% of the image on average, about one in five 40..50% (the paper's hardest
# subset); strokes alone 26%; a 32 px image gets strokes 2.5..6.5 px wide.
BOX_SIDE = (0.3, 0.7)  # a box's height and width, each uniform in this range (area 9%..49%)
STROKE_WIDTH = (0.08, 0.2)  # a stroke's thickness
STROKE_SEGMENT = (0.2, 0.5)  # length of each segment of a stroke
STROKE_VERTICES = (2, 5)  # vertices per polyline (1..4 segments), uniform
ELEMENTS = (1, 5)  # elements drawn per image before the coverage floor is enforced, uniform
P_BOX = 0.25  # in "mixed" masks, the chance that an element is a box rather than a stroke
MAX_TRIES = 1000  # rejected elements per image before giving up (a range too narrow to hit)


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in lo..hi inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _box(H: int, W: int, generator: torch.Generator | None) -> Tensor:
    """One axis-aligned rectangle, sides uniform in BOX_SIDE of the image side, uniformly placed.
    (H, W) bool."""
    bh = max(1, round(_uniform(*BOX_SIDE, generator) * H))
    bw = max(1, round(_uniform(*BOX_SIDE, generator) * W))
    y0, x0 = _randint(0, H - bh, generator), _randint(0, W - bw, generator)
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0 : y0 + bh, x0 : x0 + bw] = True
    return m


def _stroke(H: int, W: int, generator: torch.Generator | None) -> Tensor:
    """One thick polyline (a chain of capsules: segments with round caps). (H, W) bool.

    Starts at a uniform point; each vertex moves in a uniform direction by STROKE_SEGMENT x side,
    clamped to the image. A pixel is covered if its centre lies within width / 2 of some segment.
    """
    side = min(H, W)
    radius = max(0.5, _uniform(*STROKE_WIDTH, generator) * side / 2)
    ys = torch.arange(H, dtype=torch.float32).view(H, 1) + 0.5  # pixel centres
    xs = torch.arange(W, dtype=torch.float32).view(1, W) + 0.5
    ay, ax = _uniform(0, H, generator), _uniform(0, W, generator)
    m = torch.zeros(H, W, dtype=torch.bool)
    for _ in range(_randint(*STROKE_VERTICES, generator) - 1):
        angle, length = (_uniform(0, 2 * math.pi, generator),
                         _uniform(*STROKE_SEGMENT, generator) * side)
        by = min(max(ay + length * math.sin(angle), 0.0), float(H))
        bx = min(max(ax + length * math.cos(angle), 0.0), float(W))
        # distance from each pixel centre p to the segment a-b: project onto it, clamp to the ends
        dy, dx = by - ay, bx - ax
        # (H, W)
        t = (((ys - ay) * dy + (xs - ax) * dx) / max(dy * dy + dx * dx, 1e-12)).clamp(0.0, 1.0)
        dist2 = (ys - (ay + t * dy)) ** 2 + (xs - (ax + t * dx)) ** 2
        m |= dist2 <= radius**2
        ay, ax = by, bx
    return m


def _one_mask(H: int, W: int, kind: str, lo: float, hi: float,
              generator: torch.Generator | None) -> Tensor:
    if kind == "box":  # a single rectangle, redrawn until its area is in range
        for _ in range(MAX_TRIES):
            m = _box(H, W, generator)
            if lo <= m.float().mean() <= hi:
                return m
        raise ValueError(f"no box of sides {BOX_SIDE} x ({H}, {W}) covers {lo:.0%}..{hi:.0%}; "
                         "widen the range")

    def element() -> Tensor:
        if kind == "mixed" and float(torch.rand((), generator=generator)) < P_BOX:
            return _box(H, W, generator)
        return _stroke(H, W, generator)

    m = torch.zeros(H, W, dtype=torch.bool)
    n_elements, tries = _randint(*ELEMENTS, generator), 0
    # Draw n_elements, then keep drawing until the floor is met; an element that would push the
    # coverage above `hi` is rejected but counts as drawn. One element covers at most about half the
    # image, so from below the default floor (10%) the next one is almost never rejected.
    while n_elements > 0 or m.float().mean() < lo:
        candidate = m | element()
        if candidate.float().mean() <= hi:
            m = candidate
        else:
            tries += 1
            if tries > MAX_TRIES:
                raise ValueError(f"could not draw a {kind} mask covering {lo:.0%}..{hi:.0%} "
                                 f"of ({H}, {W})")
        n_elements -= 1
    return m


def random_mask(B: int, H: int, W: int, *, kind: str = "mixed", min_coverage: float = 0.1,
                max_coverage: float = 0.6, generator: torch.Generator | None = None) -> Tensor:
    """Large inpainting masks in the spirit of LaMa (Sec. 4.5): (B, 1, H, W) float, 1 = missing,
    0 = known.

    kind: "strokes" = 1..5 (more if needed) thick random polylines; "mixed" = the same with each
    element a box with probability P_BOX; "box" = one rectangle. Every mask covers between
    min_coverage and max_coverage of the image (elements that overshoot are redrawn; strokes are
    added until the floor is met). All randomness comes from `generator` (CPU), so the same seed
    gives the same masks.
    """
    if kind not in ("mixed", "box", "strokes"):
        raise ValueError(f"kind must be 'mixed', 'box' or 'strokes', got {kind!r}")
    if B < 1 or H < 1 or W < 1:
        raise ValueError(f"B, H and W must be positive, got {(B, H, W)}")
    if not 0.0 <= min_coverage < max_coverage <= 1.0:
        raise ValueError("need 0 <= min_coverage < max_coverage <= 1, "
                         f"got {min_coverage}, {max_coverage}")
    masks = [_one_mask(H, W, kind, min_coverage, max_coverage, generator) for _ in range(B)]
    return torch.stack(masks)[:, None].float()  # (B, 1, H, W)


def _check_mask(mask: Tensor, x: Tensor) -> None:
    B, C, H, W = x.shape
    if mask.shape != (B, 1, H, W):
        raise ValueError(f"mask must have shape {(B, 1, H, W)} for images {tuple(x.shape)}, "
                         f"got {tuple(mask.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must be binary: 1 = missing, 0 = known")


def masked_image(x: Tensor, mask: Tensor) -> Tensor:
    """x * (1 - mask): missing pixels set to 0 (mid grey in [-1, 1]); (B, C, H, W). Encode it for
    the concat."""
    _check_images(x)
    _check_mask(mask, x)
    return x * (1 - mask)


def mask_to_latent(mask: Tensor, size: int | tuple[int, int], *, mode: str = "max") -> Tensor:
    """A pixel mask (B, 1, H, W) at the latent size (B, 1, h, w).

    mode="max": 1 where any pixel of the (H/h) x (W/w) block is missing (binary; nothing in the hole
    is treated as known). mode="area": the fraction of the block that is missing.
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    fh, fw = _block(mask.shape[2], mask.shape[3], size)
    if mode == "max":
        return F.max_pool2d(mask.float(), kernel_size=(fh, fw))
    if mode == "area":
        return F.avg_pool2d(mask.float(), kernel_size=(fh, fw))
    raise ValueError(f"mode must be 'max' or 'area', got {mode!r}")


def inpaint_condition(z_masked: Tensor, mask: Tensor, *, mode: str = "max") -> Tensor:
    """The concat input of an inpainting LDM: [z_masked, mask at the latent size], (B, c + 1, h, w).

    z_masked = E(masked_image(x, mask)) (B, c, h, w), encoded (and scaled) by the caller like z0.
    """
    if z_masked.ndim != 4:
        raise ValueError(f"z_masked must be a (B, c, h, w) latent, got {tuple(z_masked.shape)}")
    B, c, h, w = z_masked.shape
    if mask.shape[0] != B:
        raise ValueError(f"{B} latents but {mask.shape[0]} masks")
    m = mask_to_latent(mask, (h, w), mode=mode).to(z_masked)  # (B, 1, h, w)
    return torch.cat([z_masked, m], dim=1)  # (B, c + 1, h, w)


def composite(x_generated: Tensor, x_known: Tensor, mask: Tensor) -> Tensor:
    """mask * x_generated + (1 - mask) * x_known, the final paste (B, C, H, W).

    Computed with torch.where, so known pixels are copied bit for bit (even -0.0, even if the
    generated image has NaNs there); mask must be binary.
    """
    _check_images(x_known, "x_known")
    if x_generated.shape != x_known.shape:
        raise ValueError(f"x_generated {tuple(x_generated.shape)} and "
                         f"x_known {tuple(x_known.shape)} differ")
    _check_mask(mask, x_known)
    return torch.where(mask.bool(), x_generated, x_known)


def masked_psnr(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Per-image PSNR in dB over the missing region only (mask == 1), shape (B,).

    Same conventions as `tinyldm.evaluation.metrics.psnr`: images in [-1, 1] (clamped), compared on
    [0, 1] (peak 1, i.e. data range 2 in [-1, 1]); MSE over the hole's pixels and all channels.
    Every mask needs a hole.
    """
    _check_images(x)
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    _check_mask(mask, x)
    B, C, H, W = x.shape
    n = mask.sum(dim=(1, 2, 3)) * C  # values in each hole
    if (n == 0).any():
        raise ValueError("every mask needs at least one missing pixel for a masked PSNR")
    se = ((_to_unit(x) - _to_unit(y)).pow(2) * mask).sum(dim=(1, 2, 3))
    mse = se / n
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


# --- Beyond the training size (Sec. 4.3.2, Fig. 9) ---------------------------------------------

def tile(x: Tensor, k: int) -> Tensor:
    """(B * k * k, ...,  H, W) -> (B, ..., k * H, k * W): each run of k * k images (or maps, masks)
    becomes one k x k mosaic, row by row. A convolutional model conditioned on the mosaic sees a
    larger scene at the training scale, which is how the paper samples its semantic-synthesis model
    beyond 256 px."""
    if k < 1 or x.shape[0] % (k * k):
        raise ValueError(f"need a multiple of k * k = {k * k} images to tile, got {x.shape[0]}")
    *lead, H, W = x.shape[1:]
    x = x.reshape(-1, k, k, *lead, H, W)  # (B, k, k, ..., H, W)
    x = x.movedim((1, 2), (-4, -2))  # (B, ..., k, H, k, W)
    return x.reshape(x.shape[0], *lead, k * H, k * W)


def untile(x: Tensor, k: int) -> Tensor:
    """The inverse of `tile`: (B, ..., k * H, k * W) -> (B * k * k, ..., H, W)."""
    *lead, kH, kW = x.shape[1:]
    if kH % k or kW % k:
        raise ValueError(f"a {kH} x {kW} mosaic does not split into {k} x {k} tiles")
    x = x.reshape(x.shape[0], *lead, k, kH // k, k, kW // k)  # (B, ..., k, H, k, W)
    x = x.movedim((-4, -2), (1, 2))  # (B, k, k, ..., H, W)
    return x.reshape(-1, *lead, kH // k, kW // k)
