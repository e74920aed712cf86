"""Reconstruction metrics: PSNR and SSIM, for images in [-1, 1] compared on the [0, 1] scale.

* PSNR = 10 log10(L^2 / MSE) with peak L = 1, computed per image and averaged over the batch.
* SSIM: Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to
  Structural Similarity", IEEE TIP 2004. Eq. (13):

      SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2)
                   / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

  with C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03, and local statistics weighted by an
  11x11 Gaussian window of std 1.5 (Sec. III-C), evaluated where the window fits inside the image
  ("valid"), averaged over positions (the mean SSIM index, Eq. (17)), channels and then images.
  Population (biased) local variances, as in the paper; this matches scikit-image's
  `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
  Images smaller than the window use a window as large as the image.

Distribution metrics, on feature vectors (N, D) of real and generated images (which network makes
the features is `tinyldm.evaluation.features`' business; only Inception-v3 features make the numbers
"FID" / "KID"):

* Frechet distance (Heusel et al., arXiv 1706.08500, Eq. 6; Dowson & Landau 1982): fit a Gaussian to
  each set and take the squared 2-Wasserstein distance between them,

      d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)),

  with Tr (S_1 S_2)^(1/2) = Tr (S_1^(1/2) S_2 S_1^(1/2))^(1/2), a symmetric PSD matrix whose square
  root is taken through its eigen-decomposition in float64 (negative round-off eigenvalues clipped
  to 0). S is the unbiased (N - 1) covariance, as in the reference implementations.
  With fewer images than dimensions the trace term is computed in sample space (a nuclear norm;
  `frechet_from_features`). `frechet_bootstrap`: a bootstrap interval of it, centred on the figure
  (Efron & Tibshirani 1993).
* Kernel distance (KID; Binkowski et al., arXiv 1801.01401, Sec. 3 and App. C): the unbiased
  estimate of the squared MMD with the cubic polynomial kernel k(x, y) = (x . y / D + 1)^3, averaged
  over random subsets of equal size m drawn from both sets:

      MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                - 2 mean_ij k(x_i, y_j).

  Unbiased, so it can come out slightly negative when the two sets share a distribution.
* Precision and recall (Kynkaanniemi et al., arXiv 1904.06991, Eqs. 1-3): each real feature owns a
  ball reaching its k-th nearest real neighbour; precision is the share of generated features inside
  some real ball, recall the share of real features inside some generated ball (balls from generated
  neighbours).

And a VQ codebook's health: `codebook_stats`, the share of codes in use and the perplexity of the
code histogram.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of equal shape, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")


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
    x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
    k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image mean SSIM of images in [-1, 1] (clamped, compared on [0, 1]), shape (B,)."""
    _check_pair(x, y)
    B, C, H, W = x.shape
    size = min(window_size, H, W)
    g = gaussian_window(size, sigma).to(x.device)
    x, y = _to_unit(x).double(), _to_unit(y).double()

    # separable depthwise Gaussian, "valid" positions only
    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, g.view(1, 1, size, 1).expand(C, 1, size, 1), groups=C)
        # (B, C, H-s+1, W-s+1)
        return F.conv2d(t, g.view(1, 1, 1, size).expand(C, 1, 1, size), groups=C)

    c1, c2 = (k1 * 1.0) ** 2, (k2 * 1.0) ** 2  # dynamic range L = 1
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    # Eq. (13)
    ssim_map = (((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2))
                / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return ssim_map.mean(dim=(1, 2, 3)).float()  # Eq. (17), then over channels


# ----------------------------------------------------------------------------------------------
# Distribution metrics on features


def _check_features(*feats: torch.Tensor) -> None:
    for f in feats:
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"expected features (N >= 2, D), got {tuple(f.shape)}")
    if len({f.shape[1] for f in feats}) > 1:
        raise ValueError(f"feature widths differ: {[f.shape[1] for f in feats]}")


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    _check_features(features)
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (round-off symmetrised
    away)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                     sigma2: torch.Tensor) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = sqrtm_psd(sigma1)
    # (S_1^(1/2) S_2 S_1^(1/2))^(1/2): same trace as (S_1 S_2)^(1/2)
    cross = sqrtm_psd(root1 @ sigma2 @ root1)
    d2 = ((mu1 - mu2).square().sum() + torch.trace(sigma1) + torch.trace(sigma2)
          - 2 * torch.trace(cross))
    return max(float(d2), 0.0)


def frechet_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """`frechet_distance` of the two sets' means and covariances. With fewer images than feature
    dimensions (N < D: e.g. 1000 Inception features of 2048), in sample space: with centred data
    matrices A_i (N_i, D), S_i = A_i^T A_i / (N_i - 1), the eigenvalues of S_1 S_2 are the squared
    singular values of A_1 A_2^T / sqrt((N_1 - 1)(N_2 - 1)), so Tr (S_1 S_2)^(1/2) is that matrix's
    nuclear norm: an N x N problem instead of two D x D ones, the same number."""
    _check_features(real, fake)
    n1, n2, d = len(real), len(fake), real.shape[1]
    if min(n1, n2) >= d:
        return frechet_distance(*feature_stats(real), *feature_stats(fake))
    x1, x2 = real.double(), fake.double()
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a1, a2 = x1 - mu1, x2 - mu2
    cross = torch.linalg.matrix_norm(a1 @ a2.T, ord="nuc") / ((n1 - 1) * (n2 - 1)) ** 0.5
    d2 = ((mu1 - mu2).square().sum() + a1.square().sum() / (n1 - 1)
          + a2.square().sum() / (n2 - 1) - 2 * cross)
    return max(float(d2), 0.0)


def frechet_bootstrap(real: torch.Tensor, fake: torch.Tensor, *, resamples: int = 100,
                      level: float = 0.95,
                      generator: torch.Generator | None = None) -> tuple[float, float]:
    """A bootstrap interval of the Frechet distance, centred on the figure: both feature sets
    resampled with replacement (each at its own size) `resamples` times, the FD of each draw, then
    the (1 - level) / 2 and (1 + level) / 2 quantiles of those FDs shifted so that their median is
    the FD of the sets themselves. The shift removes what resampling adds: a draw with replacement
    repeats images, and repeats raise an FD (at 62 images in 128 dimensions, every draw's FD lay
    above the figure), so the plain percentile interval can exclude its own estimate. The centred
    one always contains it (the median lies between the two quantiles) and keeps the bootstrap's
    spread: how much the figure moves with the draw of N images (Efron & Tibshirani 1993, Ch. 10
    and 14 on bootstrap bias and its correction). It does not remove the FD's own small-N bias,
    which the real-vs-real floor at the same N shows."""
    _check_features(real, fake)
    if resamples < 2:
        raise ValueError(f"a bootstrap needs at least 2 resamples, got {resamples}")
    values = torch.tensor([
        frechet_from_features(real[torch.randint(len(real), (len(real),), generator=generator)],
                              fake[torch.randint(len(fake), (len(fake),), generator=generator)])
        for _ in range(resamples)], dtype=torch.float64)
    fd = frechet_from_features(real, fake)
    q = torch.tensor([(1 - level) / 2, 0.5, (1 + level) / 2], dtype=torch.float64)
    lo, median, hi = torch.quantile(values, q).tolist()
    # the interval of values - median + fd (min / max: a last bit of rounding never moves fd out)
    return max(min(lo - median + fd, fd), 0.0), max(hi - median + fd, fd)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    m, d = x.shape
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    off = m * (m - 1)
    return ((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
            - 2 * kxy.mean())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100,
                    subset_size: int = 1000,
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID: mean and standard deviation over `subsets` draws of the unbiased MMD^2 (cubic kernel)
    between `subset_size` real and `subset_size` generated features (capped at the smaller set's
    size)."""
    _check_features(real, fake)
    m = min(subset_size, len(real), len(fake))
    real, fake = real.double(), fake.double()
    values = torch.stack([
        _mmd2_unbiased(real[torch.randperm(len(real), generator=generator)[:m]],
                       fake[torch.randperm(len(fake), generator=generator)[:m]])
        for _ in range(subsets)])
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour balls."""
    _check_features(real, fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision / recall with k = {k} need more than {k} features in each set")
    real, fake = real.double(), fake.double()

    def radii(f: torch.Tensor) -> torch.Tensor:  # distance to the k-th nearest other point
        return torch.cdist(f, f).kthvalue(k + 1, dim=1).values  # the 1st is the point itself, at 0

    def covered(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= r[None, :]).any(dim=1).double().mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def codebook_stats(indices: torch.Tensor, n_codes: int) -> dict[str, float]:
    """Usage (fraction of codes hit) and perplexity exp(H(p)) of the code histogram in `indices`."""
    counts = torch.bincount(indices.flatten().cpu(), minlength=n_codes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(entropy.exp())}
