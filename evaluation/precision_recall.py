"""Mode coverage in feature space: improved precision/recall (Kynkäänniemi et al. 2019) and
density/coverage (Naeem et al. 2020), both from k-nearest-neighbour balls.

With real features X (N) and generated features Y (M), and NND_k(x) the distance from x to its k-th
nearest neighbour in its own set (itself excluded):

* precision = (1/M) #{j : Y_j lies in some ball B(X_i, NND_k(X_i))}, with `<=` as the paper's code;
  recall    = (1/N) #{i : X_i lies in some ball B(Y_j, NND_k(Y_j))}.  Default k = 3.
* density   = 1/(k M) sum_j #{i : ||Y_j - X_i|| < NND_k(X_i)};
  coverage  = (1/N) #{i : some Y_j has ||Y_j - X_i|| < NND_k(X_i)}.  Default k = 5, strict `<` as
  the paper's code. Density can exceed 1; coverage is in [0, 1].

How the distances are computed
------------------------------
The reference (`exact=True`) takes exact float64 Euclidean distances (torch.cdist without its
matrix-product shortcut) chunk by chunk on the CPU: exact, but hours at 50k x 50k Inception features.

The default gives the same results, bit for bit, much faster. Squared distances come from the
matrix-product formula |x|^2 + |y|^2 - 2 x.y on `device` in `dtype` (float32 by default), one chunk of
rows against all columns at a time, so memory is O(chunk x N) and the N x M matrix never exists. The
formula's rounding error has a proven bound (`_Screen`); a comparison `d <= r` (or `<`) that the
approximate distance decides with that margin is taken as it is, and only the undecided pairs (a small
band around each ball's radius) are recomputed exactly as the reference computes them. The k-th
neighbour distances are found the same way: all neighbours that can be among the k nearest within the
bound are recomputed exactly and ranked. Counts are therefore those of the reference, ties included.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

EXACT_MODE = "donot_use_mm_for_euclid_dist"  # torch.cdist's direct formula: sum of squared differences


def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x), dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be [num_samples, dim], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} features hold NaN or infinite values")
    return t


def _check_k(n: int, k: int) -> None:
    if not 1 <= k < n:
        raise ValueError(f"need 1 <= k < number of samples ({n}), got k={k}")


def _default_chunk(n: int) -> int:
    # about 16M entries per chunk matrix: a few hundred MB with the float64 thresholds beside it
    return int(min(4096, max(64, (1 << 24) // max(n, 1))))


# ---------------------------------------------------------------------------------- exact reference

def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int):
    """Yield (row offset, exact distances [chunk, len(b)])."""
    for s in range(0, len(a), chunk):
        yield s, torch.cdist(a[s:s + chunk], b, compute_mode=EXACT_MODE)


def _exact_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    out = torch.empty(len(x), dtype=torch.float64)
    for s, d in _pairwise(x, x, chunk):
        out[s:s + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, k]  # column 0 is the point itself
    return out


def _exact_inside_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, strict: bool, chunk: int):
    """For each point: number of balls B(centre, radius) containing it; for each centre: whether
    some point lies in its ball."""
    counts = torch.zeros(len(points), dtype=torch.long)
    covered = torch.zeros(len(centres), dtype=torch.bool)
    for s, d in _pairwise(points, centres, chunk):
        inside = d < radii[None, :] if strict else d <= radii[None, :]
        counts[s:s + len(d)] = inside.sum(dim=1)
        covered |= inside.any(dim=0)
    return counts, covered


def _exact_pairs(a: torch.Tensor, b: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """||a[i] - b[j]|| for index pairs, bit for bit the value the reference's cdist gives for that
    pair (its direct formula reduces each pair on its own, whatever the batch around it)."""
    out = torch.empty(len(i), dtype=torch.float64)
    step = max(1, (1 << 22) // max(a.shape[1], 1))  # bounded memory for the gathered rows
    for s in range(0, len(i), step):
        ii, jj = i[s:s + step], j[s:s + step]
        out[s:s + len(ii)] = torch.cdist(a[ii].unsqueeze(1), b[jj].unsqueeze(1), compute_mode=EXACT_MODE)[:, 0, 0]
    return out


# ------------------------------------------------------------------------------ screened distances

@contextlib.contextmanager
def _full_float32_matmul():
    """TF32 or bf16 matmuls ("high"/"medium" precision) would void the error bound."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


class _Screen:
    """Approximate squared distances between rows of named feature sets, with an error bound.

    Error bound. With u the unit roundoff of `dtype` and D the dimension, the matrix-product formula on
    rounded, centred vectors is within (D + 6) u (|x| + |y|)^2 of the true squared distance (each of
    |x|^2, |y|^2 and x.y is a sum of D products: at most D u times the sum of their magnitudes; rounding
    the vectors to `dtype` adds about 2 u (|x| + |y|)^2). The reference's own float64 value is within
    (D + 3) u_64 d^2 <= (D + 3) u (|x| + |y|)^2 of the truth; squaring a radius, and the few roundings
    of the thresholds below, add a few u (d^2 + r^2) more. `tol * (2|x|^2 + 2|y|^2 + r^2)`, with
    tol = (2 D + 32) u and (|x| + |y|)^2 <= 2|x|^2 + 2|y|^2, covers all of it with room to spare. Norms
    are of features centred on the real mean, which keeps them (and the bound) small.
    """

    def __init__(self, sets: dict, device, dtype: torch.dtype):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.cpu, self.device, self.dtype = sets, torch.device(device), dtype
        centre = sets["real"].mean(dim=0)
        self.tol = (2 * centre.numel() + 32) * torch.finfo(dtype).eps / 2
        self.rows, self.sq_norms, self.margin = {}, {}, {}
        for name, x in sets.items():
            c = x - centre
            # each row's share of the bound, tol * 2|x|^2, in float64
            self.margin[name] = (2 * self.tol) * (c * c).sum(dim=1).to(self.device)
            r = c.to(self.device, dtype)
            self.rows[name] = r
            self.sq_norms[name] = (r * r).sum(dim=1)  # in `dtype`, as the formula uses them

    def squared(self, a: str, lo: int, hi: int, b: str) -> torch.Tensor:
        """Approximate squared distances of rows lo:hi of set a to all rows of set b [hi - lo, len(b)]."""
        with _full_float32_matmul():
            d2 = self.rows[a][lo:hi] @ self.rows[b].T
        return d2.mul_(-2).add_(self.sq_norms[a][lo:hi, None]).add_(self.sq_norms[b][None, :]).clamp_(min=0)

    def band(self, name: str, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r^2 - m, r^2 + m) in `dtype` for the balls of set `name`, m = tol * (2|x|^2 + r^2): the
        ball's part of the bound; the other point's part, tol * 2|y|^2, is added to its distances."""
        r2 = radii.to(self.device) ** 2
        m = self.margin[name] + self.tol * r2
        return (r2 - m).to(self.dtype), (r2 + m).to(self.dtype)


def _pairs(mask: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = mask.nonzero(as_tuple=True)
    return rows.cpu() + lo, cols.cpu()


def _screened_radii(screen: _Screen, name: str, ks: tuple, chunk: int, stats: dict) -> dict:
    """{k: distance of every row of set `name` to its k-th nearest other row}, as the reference."""
    x = screen.cpu[name]
    n, top = len(x), max(ks) + 1
    radii = {k: torch.empty(n, dtype=torch.float64) for k in ks}
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        d2 = screen.squared(name, lo, hi, name)
        m_row, m_col = screen.margin[name][lo:hi], screen.margin[name]
        values, idx = d2.topk(top, dim=1, largest=False)
        # The `top` smallest reference values are at most these bounds, so the reference's top-th
        # smallest is at most their maximum; every neighbour that can be that close is a candidate.
        ceiling = (values.double() + m_col[idx]).amax(dim=1) + 2 * m_row
        d2 -= m_col.to(screen.dtype)[None, :]
        rows, cols = _pairs(d2 <= ceiling.to(screen.dtype)[:, None], lo)
        dist = _exact_pairs(x, x, rows, cols)
        stats["approximate"] = stats.get("approximate", 0) + d2.numel()
        stats["exact"] = stats.get("exact", 0) + len(rows)
        # rank the candidates of each row by exact distance (sort by value, then stably by row)
        order = torch.argsort(dist, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]
        counts = torch.bincount(rows - lo, minlength=hi - lo)
        starts = counts.cumsum(0) - counts
        for k in ks:  # position k: the point itself (distance 0) is among the candidates, at position 0
            radii[k][lo:hi] = dist[order][starts + k]
    return radii


def coverage_metrics(real, fake, precision_recall_k: int | None = 3, density_coverage_k: int | None = 5, *,
                     device="cpu", dtype: torch.dtype = torch.float32, chunk: int | None = None,
                     stats: dict | None = None) -> dict:
    """Precision, recall (k = `precision_recall_k`), density and coverage (k = `density_coverage_k`;
    None leaves a pair out) in one go: three chunked distance passes (real-real, fake-fake, fake-real)
    on `device` instead of seven. Identical to the exact reference (see the module docstring). `stats`,
    a dict, receives how many distances were computed approximately and how many exactly."""
    real, fake = _as_tensor(real, "real"), _as_tensor(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    kp, kd = precision_recall_k, density_coverage_k
    if kp is None and kd is None:
        raise ValueError("nothing to compute: both precision_recall_k and density_coverage_k are None")
    _check_k(len(real), max(k for k in (kp, kd) if k is not None))
    if kp is not None:
        _check_k(len(fake), kp)
    stats = {} if stats is None else stats
    stats.setdefault("approximate", 0)
    stats.setdefault("exact", 0)
    screen = _Screen({"real": real, "fake": fake}, device, dtype)
    dev = screen.device
    real_r = _screened_radii(screen, "real", tuple(k for k in (kp, kd) if k is not None),
                             chunk or _default_chunk(len(real)), stats)
    if kp is not None:
        fake_r = _screened_radii(screen, "fake", (kp,), chunk or _default_chunk(len(fake)), stats)
        rp, fp = real_r[kp].to(dev), fake_r[kp].to(dev)
        precise = torch.zeros(len(fake), dtype=torch.bool, device=dev)   # fake j in some real ball (<=)
        recalled = torch.zeros(len(real), dtype=torch.bool, device=dev)  # real i in some fake ball (<=)
    if kd is not None:
        rd = real_r[kd].to(dev)
        covered = torch.zeros(len(real), dtype=torch.bool, device=dev)   # some fake j strictly in real i's ball
        density = torch.zeros(len(fake), dtype=torch.long, device=dev)   # real balls strictly holding fake j
    # the real balls' bands (precision, density: columns) and the fake balls' band (recall: rows)
    column_tests = ([("precision", *screen.band("real", rp))] if kp is not None else []) + \
                   ([("density", *screen.band("real", rd))] if kd is not None else [])
    fake_band = screen.band("fake", fp) if kp is not None else None
    fake_margin, real_margin = screen.margin["fake"].to(dtype), screen.margin["real"].to(dtype)[None, :]
    step = chunk or _default_chunk(len(real))
    for lo in range(0, len(fake), step):
        hi = min(lo + step, len(fake))
        d2 = screen.squared("fake", lo, hi, "real")
        stats["approximate"] += d2.numel()
        # Each comparison is certainly true (d^2 plus the bound below the band), certainly false (d^2
        # minus the bound above it) or undecided. Certain answers are the reference's; undecided pairs
        # are recomputed exactly below.
        undecided = torch.zeros(d2.shape, dtype=torch.bool, device=dev)
        inside = {}
        if column_tests:  # real balls are columns; the fake row's share of the bound shifts d^2
            up, down = d2 + fake_margin[lo:hi, None], d2 - fake_margin[lo:hi, None]
            for name, below, above in column_tests:
                inside[name] = up < below[None, :]
                undecided |= ~inside[name] & (down <= above[None, :])
            del up, down
        if fake_band is not None:  # fake balls are rows; the real column's share shifts d^2
            up, down = d2 + real_margin, d2 - real_margin
            inside["recall"] = up < fake_band[0][lo:hi, None]
            undecided |= ~inside["recall"] & (down <= fake_band[1][lo:hi, None])
            del up, down
        rows, cols = _pairs(undecided, lo)
        dist = _exact_pairs(fake, real, rows, cols).to(dev)
        stats["exact"] += len(rows)
        rows, cols = rows.to(dev), cols.to(dev)
        if kp is not None:
            precise[lo:hi] |= inside["precision"].any(dim=1)
            recalled |= inside["recall"].any(dim=0)
            precise[rows[dist <= rp[cols]]] = True
            recalled[cols[dist <= fp[rows]]] = True
        if kd is not None:
            covered |= inside["density"].any(dim=0)
            density[lo:hi] += (inside["density"] & ~undecided).sum(dim=1)  # undecided pairs: counted below
            strictly = dist < rd[cols]
            covered[cols[strictly]] = True
            density.index_add_(0, rows[strictly], torch.ones_like(rows[strictly]))
    out = {}
    if kp is not None:
        out.update(precision=float(precise.double().mean()), recall=float(recalled.double().mean()),
                   precision_recall_k=kp)
    if kd is not None:
        out.update(density=float(density.sum().double() / (kd * len(fake))), coverage=float(covered.double().mean()),
                   density_coverage_k=kd)
    return out


# ------------------------------------------------------------------------------------- public API

def knn_radii(x, k: int, chunk: int | None = None, *, device="cpu", dtype: torch.dtype = torch.float32,
              exact: bool = False) -> torch.Tensor:
    """Distance from every row of x to its k-th nearest other row (float64, CPU)."""
    x = _as_tensor(x, "features")
    _check_k(len(x), k)
    chunk = chunk or _default_chunk(len(x))
    if exact:
        return _exact_radii(x, k, chunk)
    return _screened_radii(_Screen({"real": x}, device, dtype), "real", (k,), chunk, {})[k]


def precision_recall(real, fake, k: int = 3, chunk: int | None = None, *, device="cpu",
                     dtype: torch.dtype = torch.float32, exact: bool = False) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` w.r.t. `real` features.
    `exact=True`: the slow float64 reference on the CPU (same results)."""
    if not exact:
        out = coverage_metrics(real, fake, k, None, device=device, dtype=dtype, chunk=chunk)
        return {key: out[key] for key in ("precision", "recall", "precision_recall_k")}
    real, fake = _as_tensor(real, "real"), _as_tensor(fake, "fake")
    _check_k(len(real), k)
    _check_k(len(fake), k)
    chunk = chunk or 1024
    fake_in_real, _ = _exact_inside_counts(fake, real, _exact_radii(real, k, chunk), strict=False, chunk=chunk)
    real_in_fake, _ = _exact_inside_counts(real, fake, _exact_radii(fake, k, chunk), strict=False, chunk=chunk)
    return {"precision": float((fake_in_real > 0).double().mean()), "recall": float((real_in_fake > 0).double().mean()),
            "precision_recall_k": k}


def density_coverage(real, fake, k: int = 5, chunk: int | None = None, *, device="cpu",
                     dtype: torch.dtype = torch.float32, exact: bool = False) -> dict:
    """Density and coverage (Naeem et al. 2020) of `fake` w.r.t. `real` features.
    `exact=True`: the slow float64 reference on the CPU (same results)."""
    if not exact:
        out = coverage_metrics(real, fake, None, k, device=device, dtype=dtype, chunk=chunk)
        return {key: out[key] for key in ("density", "coverage", "density_coverage_k")}
    real, fake = _as_tensor(real, "real"), _as_tensor(fake, "fake")
    _check_k(len(real), k)
    chunk = chunk or 1024
    counts, covered = _exact_inside_counts(fake, real, _exact_radii(real, k, chunk), strict=True, chunk=chunk)
    return {"density": float(counts.sum().double() / (k * len(fake))), "coverage": float(covered.double().mean()),
            "density_coverage_k": k}
