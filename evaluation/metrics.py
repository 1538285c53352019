"""Image-generation and reconstruction metrics on features and pixels, as the ADM evaluator defines them
(Dhariwal & Nichol 2021, openai/guided-diffusion ``evaluations/evaluator.py``), computed in float64 so that the
numbers do not depend on the batch size or the BLAS build.

* :func:`frechet_distance` -- FID / sFID between two Gaussians. ``tr(sqrt(S1 S2))`` is computed as the sum of the
  square roots of the eigenvalues of the symmetric PSD matrix ``sqrt(S1) S2 sqrt(S1)`` (same spectrum as ``S1 S2``),
  with ``eigh`` only: no complex parts, no NaN, unlike ``scipy.linalg.sqrtm`` on rank-deficient covariances.
* :func:`precision_recall` -- improved precision / recall (Kynkaanniemi et al. 2019) with k-NN radii (k = 3).
* :func:`inception_score` -- exp(E KL(p(y|x) || p(y))) over splits.
* :func:`psnr` and :func:`ssim` -- on images in [0, 1] (data range 1), per image, then averaged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from vfmtok.tokenizer.utils.errors import InvalidValueError

__all__ = ["GaussianStatistics", "feature_statistics", "frechet_distance", "frechet_distance_of",
           "precision_recall", "inception_score", "psnr", "ssim", "codebook_statistics"]

# Fewer samples than feature dimensions gives a rank-deficient covariance: the distance is still defined and finite,
# but biased and noisy; reports carry a warning below this count.
MIN_SAMPLES_FOR_FID = 2048
_RELATIVE_EIGENVALUE_FLOOR = 1e-10


@dataclass
class GaussianStatistics:
    """Mean (D,) and covariance (D, D) of a feature set, float64, with the number of samples they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    # With fewer samples than dimensions: the centred features / sqrt(N - 1), so that sigma = factor.T @ factor.
    # The Frechet distance then needs an N x N eigenproblem instead of two D x D ones (exactly the same value).
    factor: Optional[np.ndarray] = None

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.sigma.shape != (self.mu.size, self.mu.size):
            raise InvalidValueError(f"covariance of shape {self.sigma.shape} does not fit a mean of {self.mu.size} "
                                    "dimensions")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise InvalidValueError("feature statistics hold non-finite values")


def _as_float64(features) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    if array.ndim != 2:
        raise InvalidValueError(f"features must be a (N, D) array, got shape {array.shape}")
    return array


def feature_statistics(features) -> GaussianStatistics:
    """Mean and (unbiased, N - 1) covariance of (N, D) features, accumulated in float64."""
    x = _as_float64(features)
    if len(x) < 2:
        raise InvalidValueError(f"feature statistics need at least 2 samples, got {len(x)}")
    mu = x.mean(axis=0)
    centred = x - mu
    factor = centred / np.sqrt(len(x) - 1) if len(x) - 1 < x.shape[1] else None
    return GaussianStatistics(mu, centred.T @ centred / (len(x) - 1), len(x), factor)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`` in float64 (see the module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise InvalidValueError(f"the two Gaussians do not match: means {mu1.shape} / {mu2.shape}, covariances "
                                f"{sigma1.shape} / {sigma2.shape}")
    root1 = _symmetric_sqrt(sigma1)
    return _frechet_from_inner(mu1, sigma1, mu2, sigma2, root1 @ sigma2 @ root1)


def _frechet_from_inner(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                        inner: np.ndarray) -> float:
    """The distance, given a symmetric matrix ``inner`` whose nonzero eigenvalues are those of ``S1 S2``."""
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    # Eigenvalues that are zero in exact arithmetic come out as +-1e-15 relative noise; their square roots (1e-8
    # relative each, hundreds of them for rank-deficient covariances) would bias the trace. Treat them as zero.
    eigenvalues[eigenvalues < _RELATIVE_EIGENVALUE_FLOOR * max(eigenvalues.max(), 0.0)] = 0.0
    trace_sqrt = np.sqrt(eigenvalues).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_of(a: GaussianStatistics, b: GaussianStatistics) -> float:
    """:func:`frechet_distance` of two statistics. When one came from fewer samples than dimensions (its
    ``factor`` F, with S = F^T F), ``F S_other F^T`` (N x N) has the nonzero eigenvalues of ``S_other S`` (those of
    AB and BA agree), so no D x D square root or eigenproblem is needed (a 2048-d FID of 150 samples against 300:
    0.26 s instead of 22 s on 2 CPU cores, same value to 1e-15 relative)."""
    factors = [(s.factor, other) for s, other in ((a, b), (b, a)) if s.factor is not None]
    if not factors:
        return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    if a.mu.shape != b.mu.shape:
        raise InvalidValueError(f"the two Gaussians do not match: means {a.mu.shape} / {b.mu.shape}")
    factor, other = min(factors, key=lambda pair: len(pair[0]))
    return _frechet_from_inner(a.mu, a.sigma, b.mu, b.sigma, factor @ other.sigma @ factor.T)


def _pairwise_squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances in float64 (exact enough for k-NN radii)."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def _knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for start in range(0, len(features), batch_size):
        d = _pairwise_squared_distances(features[start:start + batch_size], features)
        # the point itself is at distance 0: the (k + 1)-th smallest is the k-th neighbour
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius) of the manifold estimate."""
    inside = 0
    for start in range(0, len(points), batch_size):
        d = _pairwise_squared_distances(points[start:start + batch_size], centres)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real, fake, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision (fraction of ``fake`` inside the real manifold) and recall (fraction of ``real`` inside the
    fake manifold); each manifold is the union of balls reaching every point's k-th nearest neighbour."""
    real_t, fake_t = torch.from_numpy(_as_float64(real)), torch.from_numpy(_as_float64(fake))
    if real_t.shape[1] != fake_t.shape[1]:
        raise InvalidValueError(f"feature widths differ: {real_t.shape[1]} and {fake_t.shape[1]}")
    if min(len(real_t), len(fake_t)) <= k:
        raise InvalidValueError(f"precision / recall with k={k} need more than {k} samples in each set, got "
                                f"{len(real_t)} and {len(fake_t)}")
    real_radii, fake_radii = _knn_radii(real_t, k, batch_size), _knn_radii(fake_t, k, batch_size)
    return (_fraction_inside(fake_t, real_t, real_radii, batch_size),
            _fraction_inside(real_t, fake_t, fake_radii, batch_size))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std over splits) of ``exp(E_x KL(p(y|x) || p(y)))`` from classifier logits (N, classes)."""
    x = torch.from_numpy(_as_float64(logits))
    if len(x) < splits:
        raise InvalidValueError(f"the Inception Score with {splits} splits needs at least {splits} samples, got "
                                f"{len(x)}")
    probs = x.softmax(dim=1)
    scores = []
    for part in probs.tensor_split(splits):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def _check_unit_images(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise InvalidValueError(f"expected two (B, C, H, W) image batches of the same shape, got {tuple(a.shape)} and "
                                f"{tuple(b.shape)}")
    return a.double(), b.double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB, for images in [0, data_range]."""
    a, b = _check_unit_images(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (B,) (Wang et al. 2004): an 11x11 Gaussian window (sigma 1.5) over valid
    positions, ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with ``L = data_range``, averaged over positions and channels.
    The right ``data_range`` matters: images in [0, 1] need 1.0 (2.0 inflates the score)."""
    a, b = _check_unit_images(a, b)
    channels = a.shape[1]
    g = _gaussian_window(window, sigma, a.dtype, a.device)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)


def codebook_statistics(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of codes used at least once) and perplexity (exp of the entropy of the code histogram)."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size).double()
    if counts.numel() != codebook_size:
        raise InvalidValueError(f"codes reach {counts.numel() - 1}, outside a codebook of {codebook_size}")
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


def warn_if_few(num_samples: int) -> Optional[str]:
    """The warning a report carries for FIDs from fewer than ``MIN_SAMPLES_FOR_FID`` samples, or None."""
    if num_samples < MIN_SAMPLES_FOR_FID:
        return (f"only {num_samples} samples (< {MIN_SAMPLES_FOR_FID}, the feature width): the covariance is rank "
                "deficient and the FID is biased upwards; compare only numbers from the same sample count")
    return None
