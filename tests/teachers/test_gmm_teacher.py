"""The analytic Gaussian-mixture teacher against independent references."""
import math

import pytest
import torch
from onestep.teachers.gmm import GaussianMixture, GMMTeacher, four_component_mixture

from onestep import paths


def single_gaussian_flow(m, s, z, t, r):
    """Closed-form flow map of N(m, s^2 I): affine, sigma_tau = sqrt((1-tau)^2 s^2 + tau^2)."""
    sig = lambda tau: torch.sqrt((1 - tau) ** 2 * s ** 2 + tau ** 2)
    return (1 - r) * m + (sig(r) / sig(t)) * (z - (1 - t) * m)


def test_single_gaussian_velocity_and_flow_map_are_closed_form():
    m, s = torch.tensor([0.7, -1.2], dtype=torch.float64), 0.4
    teacher = GMMTeacher(GaussianMixture(m[None], [s]))
    z = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.98 + 0.01
    # velocity = d/dr Phi_{t->r}(z) at r = t, by central differences of the closed form
    h = 1e-6
    fd = (single_gaussian_flow(m, s, z, t[:, None], (t + h)[:, None])
          - single_gaussian_flow(m, s, z, t[:, None], (t - h)[:, None])) / (2 * h)
    assert torch.allclose(teacher.velocity(z, t), fd, atol=1e-8)
    r = t * torch.rand(16, dtype=torch.float64)
    exact = single_gaussian_flow(m, s, z, t[:, None], r[:, None])
    assert torch.allclose(teacher.flow_map(z, t, r), exact, atol=1e-9)


def test_mixture_score_is_gradient_of_log_density():
    mix = four_component_mixture()
    teacher = GMMTeacher(mix)
    x = torch.randn(32, 2, dtype=torch.float64) * 2
    t = torch.rand(32, dtype=torch.float64) * 0.9 + 0.05

    def log_p(x):  # log p_t(x) of the flow path x = (1-t) x0 + t eps, directly
        a, b = (1 - t)[:, None], t[:, None]
        var = a ** 2 * mix.stds[None] ** 2 + b ** 2                       # [B, K]
        d2 = ((x[:, None] - a[:, :, None] * mix.means[None]) ** 2).sum(-1)
        return torch.logsumexp(torch.log(mix.weights) - d2 / (2 * var) - math.log(2 * math.pi) * 1 - torch.log(var), -1)

    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(log_p(xg).sum(), xg)
    assert torch.allclose(teacher.score(x, t), grad, atol=1e-10)
    # posterior identity: x = a x0_hat + b eps_hat
    assert torch.allclose(paths.interpolate(teacher.x0(x, t), teacher.eps(x, t), t), x, atol=1e-12)


def test_class_conditional_velocity_and_cfg():
    mix = four_component_mixture()  # labels [0, 0, 1, 1]
    teacher = GMMTeacher(mix)
    class1 = GMMTeacher(GaussianMixture(mix.means[2:], mix.stds[2:], mix.weights[2:]))
    x = torch.randn(8, 2, dtype=torch.float64)
    t = torch.full((8,), 0.6, dtype=torch.float64)
    cond = torch.ones(8, dtype=torch.long)
    v_c = teacher.velocity(x, t, cond)
    assert torch.allclose(v_c, class1.velocity(x, t), atol=1e-12)
    v_null = teacher.velocity(x, t, teacher.null_condition(8))
    assert torch.allclose(v_null, teacher.velocity(x, t), atol=1e-12)
    w = 3.0
    assert torch.allclose(teacher.velocity(x, t, cond, guidance=w), v_null + w * (v_c - v_null), atol=1e-12)


def test_velocity_is_stable_at_the_ends():
    teacher = GMMTeacher(four_component_mixture())
    x = torch.randn(8, 2, dtype=torch.float64)
    for t in (0.0, 1e-9, 1 - 1e-9, 1.0):
        assert torch.isfinite(teacher.velocity(x, t)).all()
    # at t = 1 the marginal is N(0, I) and E[x0 | x] = mean of the data: v = x - E[x0]
    v1 = teacher.velocity(x, 1.0)
    assert torch.allclose(v1, x - (four_component_mixture().weights[:, None] * four_component_mixture().means).sum(0),
                          atol=1e-12)


@pytest.mark.parametrize("solver,steps,tol", [("euler", 400, 2e-2), ("heun", 100, 2e-3)])
def test_teacher_sampler_converges_to_exact_flow_map(solver, steps, tol):
    teacher = GMMTeacher(four_component_mixture())
    z = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = teacher.flow_map(z, 1.0, 0.0)
    assert (teacher.sample(z, steps=steps, solver=solver) - exact).abs().max() < tol


def test_samples_have_mixture_moments():
    mix = four_component_mixture()
    x, labels = mix.sample(200_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=2e-2)
    assert set(labels.unique().tolist()) == {0, 1}


def test_features_are_differentiable_in_x(gmm_teacher):
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    feats = gmm_teacher.features(x, 0.5)
    assert torch.equal(feats[0], x) and torch.allclose(feats[1], gmm_teacher.velocity(x.detach(), 0.5))
    feats[1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
