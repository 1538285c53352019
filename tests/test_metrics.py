"""Metrics against closed forms and independent (naive or scipy) implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from vfmtok.evaluation.metrics import (codebook_statistics, feature_statistics, frechet_distance, frechet_distance_of,
                                inception_score, precision_recall, psnr, ssim)


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
    closed = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_matches_an_independent_scipy_computation():
    rng = np.random.default_rng(1)
    for d in (3, 32, 128):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8, abs=1e-8)


def test_fid_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(50, 200))  # fewer samples than dimensions
    stats = feature_statistics(features)
    value = frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
    assert math.isfinite(value) and abs(value) < 1e-7


def test_low_rank_frechet_distance_equals_the_dense_one_and_scipy():
    """Statistics of fewer samples than dimensions take the N x N path of frechet_distance_of; it must give the
    dense eigen-form's value and scipy's sqrtm-based one, whichever side (or both) is low-rank."""
    rng = np.random.default_rng(5)
    d = 96
    sets = {"small": rng.normal(size=(20, d)), "other_small": rng.normal(0.3, 1.2, size=(35, d)),
            "large": rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) / 8}
    stats = {name: feature_statistics(x) for name, x in sets.items()}
    assert stats["small"].factor is not None and stats["large"].factor is None
    for a, b in (("small", "large"), ("large", "small"), ("small", "other_small")):
        sa, sb = stats[a], stats[b]
        dense = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
        covmean = scipy.linalg.sqrtm(sa.sigma @ sb.sigma).real
        reference = ((sa.mu - sb.mu) ** 2).sum() + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * np.trace(covmean)
        assert frechet_distance_of(sa, sb) == pytest.approx(dense, rel=1e-9)
        assert frechet_distance_of(sa, sb) == pytest.approx(reference, rel=1e-6)
    assert abs(frechet_distance_of(stats["small"], stats["small"])) < 1e-8


def test_feature_statistics_equal_numpy_and_do_not_depend_on_order():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(300, 8)) * 3 + 1
    stats = feature_statistics(torch.from_numpy(features).float())
    np.testing.assert_allclose(stats.mu, features.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float32).astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)
    shuffled = feature_statistics(features[rng.permutation(300)])
    assert frechet_distance(stats.mu, stats.sigma, shuffled.mu, shuffled.sigma) == pytest.approx(0, abs=1e-6)


def naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centres, r):
        d = ((points[:, None] - centres[None]) ** 2).sum(-1)
        return float(np.mean([(row <= r).any() for row in d]))

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_match_a_naive_implementation_and_not_the_batch_size():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(120, 5))
    fake = rng.normal(size=(90, 5)) * 1.5 + 0.7
    expected = naive_precision_recall(real, fake, 3)
    assert precision_recall(real, fake, k=3, batch_size=1000) == pytest.approx(expected)
    assert precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def test_inception_score_closed_forms():
    uniform = np.zeros((100, 10))
    assert inception_score(uniform, splits=10)[0] == pytest.approx(1.0)
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # each split holds every class equally often
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def naive_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. 2004, one window position at a time (11x11 Gaussian, sigma 1.5)."""
    offsets = np.arange(11) - 5
    g = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - 10):
            for j in range(a.shape[2] - 10):
                x, y = a[c, i:i + 11, j:j + 11], b[c, i:i + 11, j:j + 11]
                mx, my = (w * x).sum(), (w * y).sum()
                vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
                cxy = (w * (x - mx) * (y - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_match_independent_implementations():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 3, 20, 24, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 20, 24, generator=g)).clamp(0, 1)
    for i in range(2):
        mse = ((a[i].double() - b[i].double()) ** 2).mean().item()
        assert psnr(a, b)[i].item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
        assert ssim(a, b)[i].item() == pytest.approx(naive_ssim(a[i].double().numpy(), b[i].double().numpy()),
                                                     rel=1e-7)
    assert ssim(a, a).min().item() == pytest.approx(1.0) and torch.isinf(psnr(a, a)).logical_not().all()
    # data_range matters: the published SSIMs used 2.0 on [0, 1] images, which inflates them
    assert ssim(a, b, data_range=2.0).mean() > ssim(a, b).mean()


def test_codebook_statistics_closed_form():
    codes = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    stats = codebook_statistics(codes, 8)
    assert stats["usage"] == 0.5 and stats["perplexity"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="outside a codebook"):
        codebook_statistics(torch.tensor([9]), 8)
