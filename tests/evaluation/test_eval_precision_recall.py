"""Precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) against
brute-force numpy loops written from the papers' definitions, plus limiting cases; the default
(screened, chunked, on a device) computation against the exact float64 reference on tied data."""
import numpy as np
import pytest
import torch
from onestep.evaluation import precision_recall as PR
from onestep.evaluation.precision_recall import coverage_metrics, density_coverage, knn_radii, precision_recall


def brute_radii(x, k):
    out = []
    for i in range(len(x)):
        d = sorted(np.sqrt(((x[i] - x[j]) ** 2).sum()) for j in range(len(x)) if j != i)
        out.append(d[k - 1])
    return np.array(out)


def brute_pr(real, fake, k):
    rr, rf = brute_radii(real, k), brute_radii(fake, k)
    dist = lambda a, b: np.sqrt(((a - b) ** 2).sum())
    precision = np.mean([any(dist(y, real[i]) <= rr[i] for i in range(len(real))) for y in fake])
    recall = np.mean([any(dist(x, fake[j]) <= rf[j] for j in range(len(fake))) for x in real])
    return precision, recall


def brute_dc(real, fake, k):
    rr = brute_radii(real, k)
    dist = lambda a, b: np.sqrt(((a - b) ** 2).sum())
    inside = np.array([[dist(fake[j], real[i]) < rr[i] for i in range(len(real))] for j in range(len(fake))])
    return inside.sum() / (k * len(fake)), inside.any(axis=0).mean()


@pytest.mark.parametrize("seed,n,m,d", [(0, 60, 45, 3), (1, 40, 70, 8), (2, 30, 30, 1)])
def test_against_brute_force(seed, n, m, d):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, d))
    fake = rng.normal(size=(m, d)) * 0.7 + 0.9  # shifted and narrower: neither score is trivially 0 or 1
    np.testing.assert_allclose(knn_radii(real, 3).numpy(), brute_radii(real, 3), rtol=1e-12)
    pr = precision_recall(real, fake, k=3, chunk=7)  # small chunks exercise the chunking
    p, r = brute_pr(real, fake, 3)
    assert (pr["precision"], pr["recall"]) == pytest.approx((p, r), abs=1e-12)
    assert d == 1 or (0 < p < 1 and 0 < r < 1)  # in 1-D the balls cover the line
    dc = density_coverage(real, fake, k=5, chunk=11)
    dens, cov = brute_dc(real, fake, 5)
    assert (dc["density"], dc["coverage"]) == pytest.approx((dens, cov), abs=1e-12)


def test_limits():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(200, 2))
    far = real + 100.0
    assert precision_recall(real, far)["precision"] == 0.0 and precision_recall(real, far)["recall"] == 0.0
    assert density_coverage(real, far)["coverage"] == 0.0
    # A mode-dropping generator: all samples in one half of the data. Precision stays high, recall
    # and coverage drop.
    half = real[real[:, 0] > 0.5]
    pr, dc = precision_recall(real, half), density_coverage(real, half)
    assert pr["precision"] > 0.9 and pr["recall"] < 0.6 and dc["coverage"] < 0.6


def test_bad_k():
    with pytest.raises(ValueError, match="k"):
        knn_radii(np.zeros((3, 2)), 3)


# ------------------------------------------------------------------ the screened (default) path

def tied_sets(seed: int, d: int):
    """Features with many exactly equal distances: points on a coarse lattice, duplicated points, fake
    points that copy real ones, far from the origin (so the matrix-product formula's rounding is large)."""
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 3, (160, d)) * 0.1 + 7.0
    fake = rng.integers(0, 3, (130, d)) * 0.1 + 7.0
    real[:20] = real[20:40]
    fake[:25] = real[50:75]
    noisy = rng.normal(size=(60, d)) * 0.05 + 7.1  # and some points off the lattice
    return np.concatenate([real, noisy]), np.concatenate([fake, noisy[:30] + 0.01])


def exact(real, fake):
    return {**precision_recall(real, fake, 3, exact=True), **density_coverage(real, fake, 5, exact=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed,d,chunk", [(0, 2, 7), (1, 3, 64), (2, 8, None), (3, 40, 13)])
def test_screened_equals_exact_with_ties(seed, d, chunk, dtype):
    real, fake = tied_sets(seed, d)
    stats = {}
    got = coverage_metrics(real, fake, 3, 5, dtype=dtype, chunk=chunk, device="cpu", stats=stats)
    assert got == exact(real, fake)  # counts are discrete: equal, not close
    assert 0 < stats["exact"] < stats["approximate"]
    assert precision_recall(real, fake, 3, chunk=chunk, dtype=dtype) == precision_recall(real, fake, 3, exact=True)
    assert density_coverage(real, fake, 5, chunk=chunk, dtype=dtype) == density_coverage(real, fake, 5, exact=True)
    assert torch.equal(knn_radii(real, 4, chunk, dtype=dtype), knn_radii(real, 4, chunk, exact=True))


def test_without_the_error_bound_the_ties_break(monkeypatch):
    """The exact recomputation is what makes the screened path exact: with a zero bound (approximate
    distances taken as they are) the float32 results differ from the reference on tied data."""
    original = PR._Screen.__init__

    def no_bound(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.tol = 0.0
        self.margin = {name: m * 0 for name, m in self.margin.items()}

    differ = 0
    for seed in range(4):  # all four differ in float32 (checked when this test was written)
        real, fake = tied_sets(seed, 3)
        want = exact(real, fake)
        with monkeypatch.context() as m:
            m.setattr(PR._Screen, "__init__", no_bound)
            differ += coverage_metrics(real, fake, 3, 5) != want
        assert coverage_metrics(real, fake, 3, 5) == want
    assert differ == 4


def test_the_bound_holds_and_is_small():
    """The approximate squared distances are within the bound of the reference's, by a wide margin,
    and the bound is a small fraction of the distances (few pairs need an exact recomputation)."""
    rng = np.random.default_rng(5)
    x = torch.as_tensor(np.maximum(rng.normal(size=(400, 512)) + 0.3, 0) * 3 + 50)
    screen = PR._Screen({"real": x}, "cpu", torch.float32)
    approx = screen.squared("real", 0, len(x), "real").double()
    ref = torch.cdist(x, x, compute_mode=PR.EXACT_MODE) ** 2
    bound = screen.margin["real"][:, None] + screen.margin["real"][None, :]
    assert ((approx - ref).abs() / bound).max() < 0.1
    off = ~torch.eye(len(x), dtype=torch.bool)
    assert (bound[off] / ref[off]).median() < 1e-3


def test_memory_is_chunk_by_n(monkeypatch):
    """No distance matrix larger than chunk x N is made: every approximate block and every exact cdist
    call has at most `chunk` rows (the exact recomputations are of gathered pairs, one row each)."""
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(300, 5)), rng.normal(size=(250, 5)) + 0.3
    shapes = []
    squared, cdist = PR._Screen.squared, torch.cdist

    def record_squared(self, a, lo, hi, b):
        out = squared(self, a, lo, hi, b)
        shapes.append(tuple(out.shape))
        return out

    def record_cdist(x1, x2, *args, **kwargs):
        out = cdist(x1, x2, *args, **kwargs)
        shapes.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(PR._Screen, "squared", record_squared)
    monkeypatch.setattr(PR.torch, "cdist", record_cdist)
    coverage_metrics(real, fake, 3, 5, chunk=32)
    assert shapes and max(s[0] for s in shapes) <= 32
    assert {s[1] for s in shapes if s[0] > 1} <= {300, 250}  # blocks of rows against a whole set


def test_bad_features_are_one_line():
    with pytest.raises(ValueError, match="NaN"):
        coverage_metrics(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="dimension"):
        coverage_metrics(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dtype"):
        coverage_metrics(np.random.rand(9, 2), np.random.rand(9, 2), dtype=torch.float16)
