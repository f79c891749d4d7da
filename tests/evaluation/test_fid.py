"""Our Fréchet distance against scipy's sqrtm formula, clean-fid, and closed forms."""
import numpy as np
import pytest
import scipy.linalg
import torch
from onestep.evaluation.fid import feature_statistics, fid_from_features, frechet_distance


def scipy_fid(mu1, s1, mu2, s2):
    """The textbook formula (pytorch-fid without its eps fallback)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def random_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features, not isotropic
    return rng.normal(size=(n, d)) @ mix + shift


# (n_a, n_b, dim): full-rank, and rank-deficient covariances (fewer samples than dimensions).
CASES = [(500, 400, 2), (300, 300, 16), (1000, 800, 64), (40, 50, 64), (20, 30, 128)]


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # inside clean-fid, scipy >= 1.16
@pytest.mark.parametrize("na,nb,d", CASES)
def test_matches_scipy_sqrtm_and_cleanfid(na, nb, d):
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    a, b = random_features(na, d, seed=1), random_features(nb, d, seed=2, shift=0.3)
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-6)
    assert ours == pytest.approx(float(cleanfid_frechet(mu1, s1, mu2, s2)), rel=1e-6)
    assert ours == pytest.approx(fid_from_features(a, b), rel=1e-12)


def test_statistics_are_unbiased_like_numpy():
    x = random_features(50, 8, seed=3)
    mu, sigma = feature_statistics(torch.from_numpy(x).float())
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d", [(300, 32), (10, 64)])
def test_zero_for_identical_statistics(n, d):
    mu, sigma = feature_statistics(random_features(n, d, seed=4))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * np.trace(sigma))


def test_symmetric():
    a, b = random_features(100, 32, seed=5), random_features(30, 32, seed=6, shift=1.0)
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)


def test_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(7)
    d = 20
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    va, vb = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    va[:3] = 0.0  # degenerate directions are allowed
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(expected, rel=1e-10)
    # The same Gaussians in a rotated basis: the distance is rotation invariant.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(va) @ q.T, q @ mu2, q @ np.diag(vb) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
