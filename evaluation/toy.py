"""Sample-based metrics for low-dimensional toy distributions (Gaussian mixtures), where exact
samples of the target are cheap, so we compare generated samples against target samples directly.

Inputs are [N, D] (or [N] for 1-D) numpy arrays or torch tensors; all arithmetic is float64 numpy.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_samples(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be [N] or [N, D] with N >= 1, got shape {x.shape}")
    return x


def _wasserstein1_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact 1-D W1 for every column of the column-sorted a [n, P] and b [m, P].

    W1 = integral over t in (0, 1) of |Qa(t) - Qb(t)|, with Q the step quantile function of the
    empirical distribution. Both are constant between consecutive points of {i/n} U {j/m}, so the
    integral is an exact finite sum; this also covers n != m (scipy.stats.wasserstein_distance
    computes the same number through the CDFs).
    """
    n, m = a.shape[0], b.shape[0]
    t = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    mid, width = (t[:-1] + t[1:]) / 2, np.diff(t)
    ia = np.minimum((mid * n).astype(np.int64), n - 1)
    ib = np.minimum((mid * m).astype(np.int64), m - 1)
    return (np.abs(a[ia] - b[ib]) * width[:, None]).sum(axis=0)


def sliced_wasserstein(x, y, num_projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-1 distance: the mean over random unit directions u of the exact 1-D W1
    between the projections <x, u> and <y, u>. Not squared; x and y may have different sizes.

    Directions are drawn with `generator` (a torch.Generator); without one a fixed seed (0) is used,
    so the metric is deterministic. In 1-D every direction is +-1, so the result is exactly
    scipy.stats.wasserstein_distance(x, y).
    """
    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    dirs = torch.randn(num_projections, x.shape[1], generator=generator, dtype=torch.float64).numpy()
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    w = []
    for d in np.array_split(dirs, max(1, num_projections // 64)):  # chunks bound the memory
        w.append(_wasserstein1_sorted(np.sort(x @ d.T, axis=0), np.sort(y @ d.T, axis=0)))
    return float(np.concatenate(w).mean())


def _mean_pairwise_distance(a: np.ndarray, b: np.ndarray, max_elements: int = 1 << 22) -> float:
    """Mean Euclidean distance over all pairs (a_i, b_j), i = j included; chunked to bound memory.

    Differences are taken explicitly (not via the |a|^2 + |b|^2 - 2ab expansion) because the
    expansion loses all precision for nearby points, which is exactly the regime we care about.
    """
    chunk = max(1, max_elements // (b.shape[0] * a.shape[1]))
    total = 0.0
    for s in range(0, a.shape[0], chunk):
        d = a[s : s + chunk, None, :] - b[None, :, :]
        total += np.sqrt((d * d).sum(axis=-1)).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x, y) -> float:
    """Energy distance sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) with Euclidean norms.

    This is the square root of Székely's E-statistic, computed with V-statistics (all pairs,
    including i = j), which is the convention of scipy.stats.energy_distance: in 1-D the two agree.
    It is zero iff the two empirical distributions are equal. Cost O(N M D) time; memory is bounded.
    """
    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    e2 = 2 * _mean_pairwise_distance(x, y) - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y)
    # The V-statistic is non-negative in exact arithmetic; clip rounding noise before the root.
    return float(np.sqrt(max(e2, 0.0)))


def mode_coverage(samples, means, stds, radius: float = 3.0, min_count: int = 1) -> dict:
    """Mode coverage of a Gaussian mixture with component means [K, D] and stds (a scalar, [K] for
    isotropic components, or [K, D] for diagonal ones).

    A sample is "near" component k when its std-normalised distance ||(x - mean_k) / std_k|| is at
    most `radius` (with scalar stds: inside the ball of radius `radius * std_k` around mean_k).
    Returns
      modes_covered: fraction of components with at least `min_count` samples near them
                     (min_count=1 is the usual definition; raise it so that a few stray samples do
                     not count as covering a mode),
      high_quality:  fraction of samples near at least one component,
      mode_counts:   number of samples near each component (a sample near two overlapping
                     components counts for both).
    The 3-std ball holds ~99 % of a 2-D Gaussian but much less in high dimension: meant for 1-3 D.
    """
    x = _as_samples(samples, "samples")
    mu = _as_samples(means, "means")
    if mu.shape[1] != x.shape[1]:
        raise ValueError(f"means have dimension {mu.shape[1]}, samples {x.shape[1]}")
    s = np.asarray(stds.detach().cpu() if isinstance(stds, torch.Tensor) else stds, dtype=np.float64)
    if s.ndim == 0:
        s = np.full((mu.shape[0], 1), float(s))
    elif s.ndim == 1:
        s = s[:, None]
    if s.shape[0] != mu.shape[0] or s.shape[1] not in (1, mu.shape[1]):
        raise ValueError(f"stds must be a scalar, [K] or [K, D] for K={mu.shape[0]}, got {s.shape}")
    z = (x[:, None, :] - mu[None, :, :]) / s[None, :, :]  # [N, K, D]
    near = np.sqrt((z * z).sum(axis=-1)) <= radius  # [N, K]
    counts = near.sum(axis=0)
    return {
        "modes_covered": float((counts >= min_count).mean()),
        "high_quality": float(near.any(axis=1).mean()),
        "mode_counts": counts.tolist(),
    }
