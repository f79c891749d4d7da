"""Mode coverage in feature space: improved precision/recall (Kynkäänniemi et al. 2019) and
density/coverage (Naeem et al. 2020), both from k-nearest-neighbour balls.

With real features X (N) and generated features Y (M), and NND_k(x) the distance from x to its k-th
nearest neighbour in its own set (itself excluded):

* precision = (1/M) #{j : Y_j lies in some ball B(X_i, NND_k(X_i))}, with `<=` as the paper's code;
  recall    = (1/N) #{i : X_i lies in some ball B(Y_j, NND_k(Y_j))}.  Default k = 3.
* density   = 1/(k M) sum_j #{i : ||Y_j - X_i|| < NND_k(X_i)};
  coverage  = (1/N) #{i : some Y_j has ||Y_j - X_i|| < NND_k(X_i)}.  Default k = 5, strict `<` as
  the paper's code. Density can exceed 1; coverage is in [0, 1].

Distances are exact float64 Euclidean (torch.cdist on chunks, bounded memory).
"""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x), dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be [num_samples, dim], got shape {tuple(t.shape)}")
    return t


def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int):
    """Yield (row offset, exact distances [chunk, len(b)])."""
    for s in range(0, len(a), chunk):
        yield s, torch.cdist(a[s:s + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(x, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from every row of x to its k-th nearest other row."""
    x = _as_tensor(x, "features")
    if not 1 <= k < len(x):
        raise ValueError(f"need 1 <= k < number of samples ({len(x)}), got k={k}")
    out = torch.empty(len(x), dtype=torch.float64)
    for s, d in _pairwise(x, x, chunk):
        out[s:s + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, k]  # column 0 is the point itself
    return out


def _inside_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, strict: bool, chunk: int):
    """For each point: number of balls B(centre, radius) containing it; for each centre: whether
    some point lies in its ball."""
    counts = torch.zeros(len(points), dtype=torch.long)
    covered = torch.zeros(len(centres), dtype=torch.bool)
    for s, d in _pairwise(points, centres, chunk):
        inside = d < radii[None, :] if strict else d <= radii[None, :]
        counts[s:s + len(d)] = inside.sum(dim=1)
        covered |= inside.any(dim=0)
    return counts, covered


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` w.r.t. `real` features."""
    real, fake = _as_tensor(real, "real"), _as_tensor(fake, "fake")
    fake_in_real, _ = _inside_counts(fake, real, knn_radii(real, k, chunk), strict=False, chunk=chunk)
    real_in_fake, _ = _inside_counts(real, fake, knn_radii(fake, k, chunk), strict=False, chunk=chunk)
    return {"precision": float((fake_in_real > 0).double().mean()), "recall": float((real_in_fake > 0).double().mean()),
            "precision_recall_k": k}


def density_coverage(real, fake, k: int = 5, chunk: int = 1024) -> dict:
    """Density and coverage (Naeem et al. 2020) of `fake` w.r.t. `real` features."""
    real, fake = _as_tensor(real, "real"), _as_tensor(fake, "fake")
    counts, covered = _inside_counts(fake, real, knn_radii(real, k, chunk), strict=True, chunk=chunk)
    return {"density": float(counts.sum().double() / (k * len(fake))), "coverage": float(covered.double().mean()),
            "density_coverage_k": k}
