"""Reconstruction metrics: PSNR and SSIM, for images in [-1, 1] compared on the [0, 1] scale.

* PSNR = 10 log10(L^2 / MSE) with peak L = 1, computed per image and averaged over the batch.
* SSIM: Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to
  Structural Similarity", IEEE TIP 2004. Eq. (13):

      SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

  with C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03, and local statistics weighted by an
  11x11 Gaussian window of std 1.5 (Sec. III-C), evaluated where the window fits inside the image
  ("valid"), averaged over positions (the mean SSIM index, Eq. (17)), channels and then images.
  Population (biased) local variances, as in the paper; this matches scikit-image's
  `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
  Images smaller than the window use a window as large as the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of equal shape, got {tuple(x.shape)}, {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (clamped), shape (B,)."""
    _check_pair(x, y)
    mse = (_to_unit(x) - _to_unit(y)).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """A normalized separable 1-D Gaussian of `size` taps."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image mean SSIM of images in [-1, 1] (clamped, compared on [0, 1]), shape (B,)."""
    _check_pair(x, y)
    B, C, H, W = x.shape
    size = min(window_size, H, W)
    g = gaussian_window(size, sigma).to(x.device)
    x, y = _to_unit(x).double(), _to_unit(y).double()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable depthwise Gaussian, "valid" positions only
        t = F.conv2d(t, g.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)
        return F.conv2d(t, g.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)  # (B, C, H-s+1, W-s+1)

    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2  # dynamic range L = 1
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    # Eq. (13)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).float()  # Eq. (17), then over channels
