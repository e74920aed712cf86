"""Distribution metrics against closed forms on Gaussians and brute-force references."""

import math

import pytest
import torch

from tinyldm.evaluation.metrics import (
    feature_stats,
    frechet_bootstrap,
    frechet_distance,
    frechet_from_features,
    kernel_distance,
    precision_recall,
    sqrtm_psd,
)


def random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def denman_beavers_sqrt(a: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """An independent matrix square root (Denman-Beavers iteration), for the test only."""
    y, z = a.clone(), torch.eye(len(a), dtype=a.dtype)
    for _ in range(iters):
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    return y


def test_sqrtm_squares_back():
    a = random_spd(6, 0)
    root = sqrtm_psd(a)
    torch.testing.assert_close(root @ root, a)
    torch.testing.assert_close(root, denman_beavers_sqrt(a))


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    """Commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2 with s the std
    devs."""
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])
    expected = (mu1 - mu2).square().sum() + (s1 - s2).square().sum()
    got = frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert got == pytest.approx(float(expected), rel=1e-12)


def test_frechet_distance_with_non_commuting_covariances():
    """Against Tr(S1 + S2 - 2 (S1 S2)^(1/2)) computed with an independent square root of the
    non-symmetric product S1 S2 (the textbook form), and the metric's basic properties."""
    a, b = random_spd(5, 1), random_spd(5, 2)
    assert not torch.allclose(a @ b, b @ a)
    mu = torch.zeros(5, dtype=torch.float64)
    expected = torch.trace(a + b - 2 * denman_beavers_sqrt(a @ b))
    assert frechet_distance(mu, a, mu, b) == pytest.approx(float(expected), rel=1e-9)
    assert frechet_distance(mu, a, mu, b) == pytest.approx(frechet_distance(mu, b, mu, a), rel=1e-9)
    assert frechet_distance(mu, a, mu, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_from_samples_converges_to_the_population_value():
    g = torch.Generator().manual_seed(0)
    a, b = random_spd(4, 3), random_spd(4, 4)
    mu2 = torch.tensor([0.5, 0.0, -0.5, 1.0], dtype=torch.float64)
    n = 40_000
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) @ sqrtm_psd(a)
    y = torch.randn(n, 4, generator=g, dtype=torch.float64) @ sqrtm_psd(b) + mu2
    mean, cov = feature_stats(x)
    assert torch.allclose(cov, a, atol=0.05) and mean.abs().max() < 0.05
    population = frechet_distance(torch.zeros(4), a, mu2, b)
    assert frechet_from_features(x, y) == pytest.approx(population, rel=0.03)


def brute_force_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kernel_distance_is_the_unbiased_mmd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g) + 0.7
    mean, std = kernel_distance(x, y, subsets=1, subset_size=12)
    assert mean == pytest.approx(brute_force_mmd2(x.double(), y.double()), rel=1e-9) and std == 0.0


def test_kernel_distance_is_unbiased_and_grows_with_the_shift():
    """Same distribution: the estimate averages to 0 (it goes negative half the time); shifted:
    positive."""
    g = torch.Generator().manual_seed(1)
    draws = [kernel_distance(torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g),
                             subsets=1, generator=g)[0] for _ in range(300)]
    mean, se = sum(draws) / len(draws), torch.tensor(draws).std().item() / math.sqrt(len(draws))
    assert abs(mean) < 3 * se and min(draws) < 0
    shifts = [kernel_distance(torch.randn(200, 8, generator=g),
                              torch.randn(200, 8, generator=g) + s, subsets=5, generator=g)[0]
              for s in (0.25, 0.5, 1.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]


def test_precision_and_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2, generator=g)
    same = torch.randn(400, 2, generator=g)
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    far = torch.randn(400, 2, generator=g) + 20
    assert precision_recall(real, far) == (0.0, 0.0)
    # every sample near the mode: precise, poor recall
    collapsed = 0.1 * torch.randn(400, 2, generator=g)
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.3
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], same[:3])
    with pytest.raises(ValueError, match="widths differ"):
        frechet_from_features(real, torch.randn(10, 3))


def test_the_fd_bootstrap_interval_is_seeded_narrows_with_n_and_covers_a_fresh_draw():
    """frechet_bootstrap: the same generator gives the same interval; four times the images give a
    narrower one; and the interval from one draw of N real and N generated features covers the FD
    of most independent draws of the same two distributions (its purpose: how much the figure moves
    with the draw of N images)."""
    def pair(n, g):
        return torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g) * 1.3 + 0.5

    g = torch.Generator().manual_seed(0)
    real, fake = pair(200, g)
    a = frechet_bootstrap(real, fake, resamples=50, generator=torch.Generator().manual_seed(3))
    b = frechet_bootstrap(real, fake, resamples=50, generator=torch.Generator().manual_seed(3))
    assert a == b and a[0] < frechet_from_features(real, fake) < a[1]
    small = frechet_bootstrap(*pair(100, g), resamples=100, generator=g)
    large = frechet_bootstrap(*pair(1600, g), resamples=100, generator=g)
    assert large[1] - large[0] < 0.5 * (small[1] - small[0])
    covered = 0
    for _ in range(5):  # the share of fresh draws inside, over five first draws
        lo, hi = frechet_bootstrap(*pair(300, g), resamples=200, generator=g)
        covered += sum(lo <= frechet_from_features(*pair(300, g)) <= hi for _ in range(40))
    assert covered >= 0.7 * 200  # about 83% expected: two draws differ by sqrt(2) x one spread
    with pytest.raises(ValueError, match="at least 2 resamples"):
        frechet_bootstrap(real, fake, resamples=1)


def test_the_fd_bootstrap_interval_contains_its_figure_where_resampling_biases_every_draw():
    """62 held-out images in 128 dimensions: repeated images raise every resample's FD above the
    figure, so the plain percentile interval lies wholly above it. The centred interval contains the
    figure, keeps the resamples' spread, and does so for any sizes, dimensions and gaps."""
    g = torch.Generator().manual_seed(7)
    scale = torch.linspace(0.2, 2.0, 128)
    real = torch.randn(62, 128, generator=g) * scale
    fake = torch.randn(62, 128, generator=g) * scale
    fd = frechet_from_features(real, fake)
    draws = torch.Generator().manual_seed(1)
    values = torch.tensor([frechet_from_features(real[torch.randint(62, (62,), generator=draws)],
                                                 fake[torch.randint(62, (62,), generator=draws)])
                           for _ in range(100)], dtype=torch.float64)
    assert values.min() > fd  # the bias the percentile interval inherits
    lo, hi = frechet_bootstrap(real, fake, resamples=100,
                               generator=torch.Generator().manual_seed(1))
    assert lo <= fd <= hi
    spread = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert hi - lo == pytest.approx(float(spread[1] - spread[0]), rel=1e-6)
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n1, n2, d = (int(v) for v in torch.randint(3, 90, (3,), generator=g))
        real = torch.randn(n1, d, generator=g) * torch.rand(d, generator=g) * 3
        fake = torch.randn(n2, d, generator=g) + torch.rand(1, generator=g) * 2
        fd = frechet_from_features(real, fake)
        lo, hi = frechet_bootstrap(real, fake, resamples=int(2 + seed % 7), generator=g)
        assert 0 <= lo <= fd <= hi, (seed, lo, fd, hi)


@pytest.mark.parametrize("n1, n2, d", [(30, 40, 64), (64, 9, 200), (5, 5, 600)])
def test_the_sample_space_frechet_distance_is_the_covariance_one(n1, n2, d):
    """With fewer images than dimensions the FD is computed from the N x N cross product's nuclear
    norm; it is the same number as the D x D route through the covariances."""
    g = torch.Generator().manual_seed(n1 + d)
    real = torch.randn(n1, d, generator=g) * torch.linspace(0.1, 2, d)
    fake = torch.randn(n2, d, generator=g) + 0.3
    direct = frechet_distance(*feature_stats(real), *feature_stats(fake))
    assert frechet_from_features(real, fake) == pytest.approx(direct, rel=1e-6)
