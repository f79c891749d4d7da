"""TrigFlow conversion and sCM against closed forms and finite differences."""
import math

import pytest
import torch
from onestep.objectives.scm import SCM, SCMConfig
from tiny_models import DropoutField

from onestep import paths
from onestep.config import ConfigError
from onestep.student import MLPAvgVelocity
from onestep.trigflow import HALF_PI, TrigFlowStudent, consistency_times, consistency_x0, teacher_trig_field


def direct_trig_field(teacher, y, s, cond=None):
    """E[dy/ds | y] for y = cos s x + sin s eps, straight from the mixture's posterior:
    -sin s E[x|y] + cos s E[eps|y]."""
    x0, eps = teacher.mixture.posterior(y, torch.cos(s), torch.sin(s), cond)
    return -torch.sin(s)[:, None] * x0 + torch.cos(s)[:, None] * eps


def test_flow_to_trigflow_conversion_is_exact_on_the_mixture(gmm_teacher):
    g = torch.Generator().manual_seed(0)
    y = 2 * torch.randn(256, 2, generator=g, dtype=torch.float64)
    s = torch.rand(256, generator=g, dtype=torch.float64) * (HALF_PI - 2e-3) + 1e-3
    for cond in (None, torch.randint(0, 2, (256,), generator=g)):
        converted = teacher_trig_field(gmm_teacher, y, s, cond)
        direct = direct_trig_field(gmm_teacher, y, s, cond)
        assert (converted - direct).abs().max() < 1e-10


def test_student_at_init_equals_teacher_in_trigflow():
    from onestep.teachers.digits import DigitsTeacher

    from onestep.student import student_from_teacher

    teacher = DigitsTeacher.from_pretrained()
    student = student_from_teacher(teacher)
    g = torch.Generator().manual_seed(1)
    y, s = torch.randn(4, 1, 16, 16, generator=g), torch.rand(4, generator=g) * 1.5 + 0.03
    with torch.no_grad():
        diff = (TrigFlowStudent(student)(y, s) - teacher_trig_field(teacher, y, s)).abs().max()
    assert diff < 1e-5


def test_consistency_function_of_the_exact_field_is_the_flow_map(gmm_teacher, exact_field):
    """f / sigma_d = cos s y - sin s F(y, s) with F from u(., 0, tau) is Phi_{tau -> 0}(x_tau)."""
    g = torch.Generator().manual_seed(2)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    s = torch.rand(16, generator=g, dtype=torch.float64) * 1.4 + 0.1
    f = consistency_x0(y, s, TrigFlowStudent(exact_field)(y, s))
    x_tau, tau = y / (torch.sin(s) + torch.cos(s))[:, None], paths.trig_to_flow_t(s)
    assert (f - gmm_teacher.flow_map(x_tau, tau, torch.zeros_like(tau))).abs().max() < 1e-8


def scm_objective(student, teacher, **cfg):
    obj = SCM(student, teacher, SCMConfig(**cfg))
    obj.generator = torch.Generator().manual_seed(0)
    return obj


def test_tangent_vanishes_for_the_exact_consistency_function(gmm_teacher, exact_field):
    """With F = F_cm along the teacher ODE, g = cos s df/ds = 0 up to finite-difference error,
    while each of its two terms is O(1) (so a sign or factor error in either is caught)."""
    obj = scm_objective(exact_field, gmm_teacher, jvp="finite_difference", fd_step=1e-4, tangent_norm="none",
                        tangent_warmup=0)
    g = torch.Generator().manual_seed(3)
    x = gmm_teacher.mixture.sample(32, generator=g, dtype=torch.float64)[0]
    eps = torch.randn(32, 2, generator=g, dtype=torch.float64)
    s = torch.rand(32, generator=g, dtype=torch.float64) * 1.3 + 0.15
    y = torch.cos(s)[:, None] * x + torch.sin(s)[:, None] * eps
    dyds = obj.scm.ode_direction(x, eps, y, s, None)
    F_minus, J = obj.scm.time_derivative(y, s, dyds, None)
    g_vec, _ = obj.scm.tangent(y, s, dyds, F_minus, J, step=0)
    sd = obj.cfg.sigma_d
    first = (torch.cos(s)[:, None] ** 2 * sd * (F_minus - dyds)).norm(dim=1)
    assert first.mean() > 0.05                                    # the two terms are large ...
    assert (g_vec.norm(dim=1) / first).max() < 1e-5               # ... and cancel
    # the sCT direction (conditional path) is not the ODE: g is then far from zero
    dyds_data = torch.cos(s)[:, None] * eps - torch.sin(s)[:, None] * x
    F_m, J_data = obj.scm.time_derivative(y, s, dyds_data, None)
    g_data, _ = obj.scm.tangent(y, s, dyds_data, F_m, J_data, step=0)
    assert (g_data.norm(dim=1) / first).mean() > 0.1


def test_jvp_equals_cos_sin_times_central_difference_along_the_ode(gmm_teacher):
    """Float64 MLP student: torch.func.jvp vs a central difference of F along (dy/ds, 1)."""
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=32, time_scale=1.0, interval_scale=1.0).double()
    torch.nn.init.normal_(student.interval_embed[-1].weight, std=0.3)     # so u(., 0, t) != u(., t, t)
    exact = scm_objective(student, gmm_teacher, jvp="single")
    g = torch.Generator().manual_seed(4)
    y = torch.randn(8, 2, generator=g, dtype=torch.float64)
    s = torch.rand(8, generator=g, dtype=torch.float64) * 1.3 + 0.1
    dyds = teacher_trig_field(gmm_teacher, y, s)
    F_minus, J = exact.scm.time_derivative(y, s, dyds, None)
    h = 1e-5
    F = lambda y_, s_: exact.scm.student_trig(y_, s_)  # noqa: E731
    with torch.no_grad():
        central = (F(y + h * dyds, s + h) - F(y - h * dyds, s - h)) / (2 * h)
    cs = (torch.cos(s) * torch.sin(s))[:, None]
    assert (J - cs * central).abs().max() < 1e-8
    assert (F_minus - F(y, s)).abs().max() < 1e-12
    fd = scm_objective(student, gmm_teacher, jvp="finite_difference", fd_step=1e-5)
    assert (fd.scm.time_derivative(y, s, dyds, None)[1] - J).abs().max() < 1e-7


def test_normalised_tangent_is_below_one_and_warms_up(gmm_teacher):
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=32).double()
    obj = scm_objective(student, gmm_teacher, tangent_warmup=100)
    g = torch.Generator().manual_seed(5)
    y = 3 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    s = torch.rand(64, generator=g, dtype=torch.float64) * 1.5 + 0.03
    dyds = teacher_trig_field(gmm_teacher, y, s)
    F_minus, J = obj.scm.time_derivative(y, s, dyds, None)
    g_norm, raw = obj.scm.tangent(y, s, dyds, F_minus, J, step=100)
    assert g_norm.norm(dim=1).max() < 1.0 and raw.max() > 1.0
    # at step 0 the warm-up removes the whole second term
    g0, _ = obj.scm.tangent(y, s, dyds, F_minus, J, step=0)
    cos = torch.cos(s)[:, None]
    expect = -cos ** 2 * obj.cfg.sigma_d * (F_minus - dyds)
    expect = expect / (expect.norm(dim=1, keepdim=True) + obj.cfg.tangent_norm_c)
    assert (g0 - expect).abs().max() < 1e-12


def test_loss_gradient_is_the_scm_direction(gmm_teacher):
    """grad of the loss = mean_b -2 w_b / (D e^logvar_b) g_b . dF_b/dtheta: the gradient reaches the student only
    through F (F-, J and g are constants)."""
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=16).double()
    obj = scm_objective(student, gmm_teacher, learn_logvar=True)
    torch.nn.init.normal_(obj.scm.logvar.linear.weight, std=0.1)
    x = gmm_teacher.mixture.sample(16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)[0]
    batch = {"x": x}
    state = obj.generator.get_state()
    loss = obj.loss(batch, step=5)["student"]
    params = list(student.parameters())
    got = torch.autograd.grad(loss, params, allow_unused=True)
    # the same draws again, by hand
    obj.generator.set_state(state)
    n = x.shape[0]
    s = obj.scm.sample_times(n).double()
    eps = obj.randn(n, 2).double()
    y = torch.cos(s)[:, None] * x + torch.sin(s)[:, None] * eps
    dyds = teacher_trig_field(gmm_teacher, y, s)
    F_minus, J = obj.scm.time_derivative(y, s, dyds, None)
    g, _ = obj.scm.tangent(y, s, dyds, F_minus, J, step=5)
    w = 1 / (obj.cfg.sigma_d * torch.tan(s)) / obj.scm.logvar(s).detach().exp()
    F = obj.scm.student_trig(y, s)
    want = torch.autograd.grad(F, params, grad_outputs=-2 * (w / (n * 2))[:, None] * g, allow_unused=True)
    for a, b in zip(got, want):
        if a is None:
            assert b is None or b.abs().max() == 0
            continue
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


def test_dropout_masks_of_the_target_pass_match_the_trained_pass(gmm_teacher, monkeypatch):
    """With dropout, F - sg[F] = 0 only if F- (the JVP's primal) reuses F's masks; then per sample the loss is
    w * mean(g^2) (logvar 0 at init). Different masks would leave F - F- of the order of F itself."""
    torch.manual_seed(0)
    student = DropoutField().double().train()
    obj = scm_objective(student, gmm_teacher, tangent_warmup=0)
    tangents = []
    original = obj.scm.tangent
    monkeypatch.setattr(obj.scm, "tangent", lambda *a, **k: tangents.append(original(*a, **k)) or tangents[-1])
    x = gmm_teacher.mixture.sample(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[0]
    state = obj.generator.get_state()
    loss = obj.loss({"x": x}, step=10)["student"]
    obj.generator.set_state(state)
    s = obj.scm.sample_times(32).double()
    g = tangents[0][0]
    want = (1 / (obj.cfg.sigma_d * torch.tan(s)) * g.pow(2).mean(1)).mean()
    assert torch.allclose(loss, want, rtol=1e-12, atol=0)
    assert g.abs().max() > 1e-3  # the check above is not 0 = 0
    # the same pass with a fresh mask in the target (what a missing replay would give) is far from it
    F1, F2 = obj.scm.student_trig(x, s), obj.scm.student_trig(x, s)
    assert (F1 - F2).abs().max() > 0.1


def test_one_step_sampler_is_minus_F_at_half_pi(gmm_teacher):
    """One consistency step from pure noise is x0 = -F(z, pi/2) (in y units)."""
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=16).double()
    torch.nn.init.normal_(student.interval_embed[-1].weight, std=0.3)
    scm_objective(student, gmm_teacher)
    assert student.sampler == "consistency"
    z = torch.randn(32, 2, dtype=torch.float64)
    with torch.no_grad():
        one = student.sample(z, steps=1)
        F = TrigFlowStudent(student)(z, torch.full((32,), HALF_PI, dtype=torch.float64))
    assert (one + F).abs().max() < 1e-12


def test_consistency_grid_matches_the_trigflow_snr_for_the_data_std():
    """consistency_times(k, data_std): every interior flow time t has noise / signal = t / ((1 - t) data_std)
    equal to tan s of its TrigFlow time (linspace, or the 2-step intermediate); data_std 1 is sin / (sin + cos)."""
    for steps, data_std, intermediate in [(4, 0.5, 1.3), (3, 0.64, 1.3), (2, 0.5, 1.1), (2, 1.0, 1.3)]:
        times = consistency_times(steps, data_std, intermediate)
        trig = [intermediate] if steps == 2 else [HALF_PI * (1 - i / steps) for i in range(1, steps)]
        assert times[0] == 1.0 and times[-1] == 0.0 and len(times) == steps + 1
        for t, s in zip(times[1:-1], trig):
            assert abs(t / ((1 - t) * data_std) - math.tan(s)) < 1e-12
    assert consistency_times(4, 1.0) == [1.0] + [math.sin(s) / (math.sin(s) + math.cos(s))
                                                 for s in (3 * HALF_PI / 4, HALF_PI / 2, HALF_PI / 4)] + [0.0]
    with pytest.raises(ValueError, match="data_std must be > 0"):
        consistency_times(2, 0.0)


def test_sampler_grid_options_reach_trained_and_rebuilt_students(gmm_teacher):
    """objective.sampler_data_std / sampler_intermediate set the student's default k-step grid, both when the
    objective is built and when a student is rebuilt from a checkpoint (the objective's sampler_spec)."""
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=16).double()
    torch.nn.init.normal_(student.interval_embed[-1].weight, std=0.3)
    scm_objective(student, gmm_teacher, sampler_data_std=0.5, sampler_intermediate=1.1)
    z = torch.randn(64, 2, dtype=torch.float64)
    for steps, intermediate in [(2, 1.1), (4, 1.3)]:
        want = student.sample(z, steps=steps, times=consistency_times(steps, 0.5, intermediate))
        assert (student.sample(z, steps=steps) - want).abs().max() == 0
        assert (student.sample(z, steps=steps, times=consistency_times(steps)) - want).abs().max() > 1e-3
    assert "data_std 0.5, 2-step intermediate 1.1" in student.sampler_description()
    rebuilt = MLPAvgVelocity(2, hidden=16).double()
    rebuilt.set_sampler_spec(SCM.sampler_spec(SCMConfig(sampler_data_std=0.5, sampler_intermediate=1.1), 10))
    assert (rebuilt.default_times(2)
            - torch.tensor(consistency_times(2, 0.5, 1.1), dtype=torch.float64)).abs().max() == 0
    with pytest.raises(ConfigError, match="sampler_intermediate in"):
        scm_objective(student, gmm_teacher, sampler_intermediate=2.0)


def test_consistency_sampler_with_the_exact_field(gmm_teacher, exact_field):
    """Multi-step consistency sampling with the exact consistency function: every step's jump is the exact
    flow map; re-noised with known noise, the two-step result equals the hand-made chain."""
    exact_field.sampler = "consistency"
    assert exact_field.sampler_description().startswith("consistency: ")
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    times = consistency_times(2)
    assert times[0] == 1.0 and times[-1] == 0.0
    assert abs(times[1] - math.sin(1.3) / (math.sin(1.3) + math.cos(1.3))) < 1e-15
    out = exact_field.sample(z, steps=2)
    one = lambda z_, t: gmm_teacher.flow_map(z_, torch.full((len(z_),), t, dtype=torch.float64),  # noqa: E731
                                            torch.zeros(len(z_), dtype=torch.float64))
    x0 = one(z, 1.0)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    z1 = (1 - times[1]) * x0 + times[1] * eps
    assert (out - one(z1, times[1])).abs().max() < 1e-8


def test_scm_short_run_improves_the_one_step_sampler(gmm_teacher):
    """A short sCD run on the 2-D mixture: the student's one-step samples move towards the data (energy
    distance to exact samples falls well below the teacher's one Euler step, the student at init)."""
    from onestep.evaluation.toy import energy_distance

    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=64, time_scale=1.0, interval_scale=1.0)
    obj = scm_objective(student, gmm_teacher, jvp="single", tangent_warmup=50, p_mean=0.0, p_std=1.6)
    # start from a velocity model of the teacher: fit u(., t, t) to the teacher first (flow matching)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(8)
    for _ in range(250):
        x = gmm_teacher.mixture.sample(128, generator=g)[0]
        t = torch.rand(128, generator=g)
        x_t = paths.interpolate(x, torch.randn(128, 2, generator=g), t)
        loss = (student(x_t, t, t) - gmm_teacher.velocity(x_t, t)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(9))
    real = gmm_teacher.mixture.sample(2000, generator=torch.Generator().manual_seed(10))[0]
    before = energy_distance(student.sample(z, steps=1), real)
    opt = torch.optim.Adam(list(student.parameters()) + list(obj.scm.logvar.parameters()), lr=1e-3, betas=(0.9, 0.99))
    for step in range(250):
        loss = obj.loss({"x": gmm_teacher.mixture.sample(128, generator=g)[0]}, step)["student"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = energy_distance(student.sample(z, steps=1), real)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("bad", [{"velocity": "nope"}, {"jvp": "exact"}, {"tangent_norm": "l1"}, {"time_clamp": 0.0},
                                 {"sigma_d": -1.0}, {"fd_step": 0.5}])
def test_bad_options_are_config_errors(gmm_teacher, bad):
    from onestep.config import ConfigError

    with pytest.raises(ConfigError):
        scm_objective(MLPAvgVelocity(2), gmm_teacher, **bad)
