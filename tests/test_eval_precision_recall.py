"""Precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) against
brute-force numpy loops written from the papers' definitions, plus limiting cases."""
import numpy as np
import pytest

from onestep.evaluation.precision_recall import density_coverage, knn_radii, precision_recall


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
