"""Fréchet distance between Gaussian fits of two feature sets (the "F" in FID, KID's cousin).

Any feature extractor works: the digits CNN of `onestep.evaluation.features` or Inception.
Everything here is float64 numpy.
"""
from __future__ import annotations

import numpy as np


def _as_float64_2d(features) -> np.ndarray:
    if hasattr(features, "detach"):  # torch tensor, possibly on a GPU
        features = features.detach().to("cpu").double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array [num_samples, dim], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {x.shape[0]}")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (`np.cov(rowvar=False)`, as clean-fid and pytorch-fid)."""
    x = _as_float64_2d(features)
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    # A sample covariance is PSD in exact arithmetic; rounding can leave eigenvalues of about
    # -1e-16 * max|w| (always, when there are fewer samples than dimensions). Clip them to zero.
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, S1) and N(mu2, S2):

        d = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    tr((S1 S2)^{1/2}) equals tr((A S2 A)^{1/2}) with A = S1^{1/2}: S1 S2 is similar to the symmetric
    PSD matrix A S2 A, so they share eigenvalues. We therefore take `eigh` of A S2 A instead of
    `scipy.linalg.sqrtm` of the non-symmetric S1 S2, which is the usual source of complex values,
    NaNs and the `eps * I` fudge when covariances are singular (fewer samples than dimensions).
    The result is clipped at 0 (it is a squared distance).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    a = _psd_sqrt(sigma1)
    m = a @ sigma2 @ a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(d, 0.0))


def fid_from_features(feats_a, feats_b) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))
