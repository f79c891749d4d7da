"""Toy-distribution metrics against scipy's 1-D implementations and simple known answers."""
import numpy as np
import pytest
import scipy.stats
import torch
from onestep.evaluation.toy import energy_distance, mode_coverage, sliced_wasserstein


@pytest.mark.parametrize("n,m", [(200, 200), (150, 257), (1, 40)])
def test_one_dimensional_matches_scipy(n, m):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=n), rng.standard_t(3, size=m) + 0.5
    assert sliced_wasserstein(x[:, None], y[:, None], num_projections=8) == pytest.approx(
        scipy.stats.wasserstein_distance(x, y), rel=1e-6, abs=1e-9)
    assert energy_distance(x, y) == pytest.approx(scipy.stats.energy_distance(x, y), rel=1e-6, abs=1e-9)


def test_same_distribution_is_small_and_shift_is_detected():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    assert sliced_wasserstein(x, y) < 0.15  # ~0.07: sampling noise of n = 1000
    assert energy_distance(x, y) < 0.15
    # Shift (2, 2): the mean |<shift, u>| over unit directions u is |shift| * 2 / pi = 1.8.
    assert sliced_wasserstein(x, y + 2.0) == pytest.approx(1.8, abs=0.15)
    assert energy_distance(x, y + 2.0) > 10 * energy_distance(x, y)


@pytest.mark.parametrize("shift", [0.5, -2.0, 4.0])
def test_shifted_gaussians_w1_is_the_shift(shift):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=4000), rng.normal(size=5000) + shift
    assert sliced_wasserstein(x, y) == pytest.approx(abs(shift), abs=0.06)


def test_directions_are_reproducible():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 3)), rng.normal(size=(200, 3)) * 1.5
    a = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(5))
    b = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(5))
    assert a == b == pytest.approx(sliced_wasserstein(x, y), rel=0.1)  # default seed: a similar estimate


def test_mode_coverage_three_of_four_modes():
    means = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0]])
    std = 0.2
    rng = np.random.default_rng(3)
    comp = rng.integers(0, 3, size=900)  # the 4th mode is never sampled
    samples = means[comp] + std * rng.normal(size=(900, 2))
    out = mode_coverage(samples, means, std)
    assert out["modes_covered"] == 0.75
    assert out["high_quality"] > 0.97
    assert out["mode_counts"][3] == 0
    # Off-mode junk lowers quality; one stray sample covers a mode only with min_count=1.
    junk = np.vstack([samples, [[0.0, 0.0]] * 100, means[3:4]])
    out = mode_coverage(junk, means, np.full(4, std))
    assert out["modes_covered"] == 1.0 and out["high_quality"] < 0.92
    assert mode_coverage(junk, means, std, min_count=10)["modes_covered"] == 0.75
