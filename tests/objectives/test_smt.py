"""SMT / SMD against closed forms: mixture scores of Gaussians, the skew-JSD weight h_alpha,
the generator gradient of an affine generator, alpha = 1 is DMD, zero gradient at the target, and a
mixture-score net fitted by the mixture denoising loss."""
import json
import math
from dataclasses import asdict

import pytest
import torch
from onestep.objectives.smt import SMD, SMT, ExplicitMixtureScore, MixtureScore, SMDConfig, SMTConfig
from onestep.teachers.gmm import GaussianMixture, GMMTeacher
from torch import nn

from onestep import paths
from onestep.config import ConfigError
from onestep.student import MLPAvgVelocity


class AffineGenerator(nn.Module):
    """G(z) = a z + b as a student (u(z, 0, 1) = z - G(z)), so q = N(b, a^2 I)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a), dtype=torch.float64))
        self.b = nn.Parameter(torch.as_tensor(b, dtype=torch.float64).clone())

    def forward(self, z, r, t, cond=None):
        return z - (self.a * z + self.b)


def log_density(x, t, mean, std):
    """log N(x; (1 - t) mean, ((1 - t)^2 std^2 + t^2) I), per sample."""
    a = (1 - t)[:, None]
    var = a ** 2 * std ** 2 + t[:, None] ** 2
    return (-0.5 * ((x - a * torch.as_tensor(mean, dtype=x.dtype)) ** 2 / var + torch.log(2 * math.pi * var))).sum(1)


class ExactMixtureScore(nn.Module):
    """The exact velocity of alpha p + (1 - alpha) q at flow time t, p and q isotropic Gaussians."""

    def __init__(self, p, q):
        super().__init__()
        self.p, self.q = p, q
        self.components = [GaussianMixture([list(m)], [s]) for m, s in (p, q)]
        self.unused = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def x0_and_eps(self, x_t, t, alpha):
        t, alpha = paths.batch_time(t, x_t), paths.batch_time(alpha, x_t)
        post = [c.posterior(x_t, 1 - t, t) for c in self.components]
        logw = torch.stack([torch.log(alpha) + log_density(x_t, t, *self.p),
                            torch.log1p(-alpha) + log_density(x_t, t, *self.q)], 1)
        w = torch.softmax(logw, 1)
        x0 = w[:, :1] * post[0][0] + w[:, 1:] * post[1][0]
        eps = w[:, :1] * post[0][1] + w[:, 1:] * post[1][1]
        return x0, eps

    def forward(self, x_t, t, alpha, cond=None):
        x0, eps = self.x0_and_eps(x_t, t, alpha)
        return eps - x0 + 0 * self.unused

    def x0(self, x_t, t, alpha, cond=None):
        return self.x0_and_eps(x_t, t, alpha)[0]


class ExactExplicitMixture(ExplicitMixtureScore):
    """The explicit mixture with exact parts: v_p, v_q of two Gaussians and l = log p_t / q_t."""

    def __init__(self, p, q):
        super().__init__(None, nn.Identity(), nn.Identity())
        self.p, self.q = p, q
        self.exact_p, self.exact_q = ExactMixtureScore(p, q), ExactMixtureScore(q, q)
        self.unused = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def components(self, x_t, t, cond=None):
        t = paths.batch_time(t, x_t)
        one = torch.ones_like(t)
        log_r = log_density(x_t, t, *self.p) - log_density(x_t, t, *self.q)
        return self.exact_p(x_t, t, one), self.exact_q(x_t, t, one) + 0 * self.unused, log_r


def no_gan(**kw):
    return SMTConfig(gan_weight=0.0, critic_gan_weight=0.0, **kw)


def fixed_alpha(obj, value):
    obj.generator_alpha = lambda n, device=None: torch.full((n,), float(value))
    return obj


GENERATOR_STEP = 4  # critic_per_generator = 5: steps 4, 9, ... also train the generator


def h_alpha(r, alpha):
    return r / (alpha * r + 1 - alpha)


# --- identities -------------------------------------------------------------------------------------

def test_skew_jsd_is_an_f_divergence_with_h_alpha():
    sympy = pytest.importorskip("sympy")
    r, a = sympy.symbols("r alpha", positive=True)
    m = a * r + 1 - a                       # m_alpha / q
    # D^(alpha) = (1/alpha) KL(q || m) + (1/(1-alpha)) KL(p || m) = E_q[f_alpha(p/q)]
    f = -sympy.log(m) / a + r * sympy.log(r / m) / (1 - a)
    assert sympy.simplify(r ** 2 * sympy.diff(f, r, 2) - r / (a * r + 1 - a)) == 0


@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.9, 1.0])
def test_mixture_score_identity_pointwise(alpha):
    """(1/alpha)(s_0 - s_alpha) = -h_alpha(r) (s_p - s_q) at every point."""
    p, q = ([0.5, -0.2], 0.7), ([-0.4, 0.3], 0.5)
    net = ExactMixtureScore(p, q)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64) * 1.5
    t = torch.rand(500, generator=g, dtype=torch.float64) * 0.9 + 0.05

    def score(a):
        return paths.velocity_to_score(x, t, net(x, t, torch.full_like(t, a)))
    r = (log_density(x, t, *p) - log_density(x, t, *q)).exp()
    lhs = (score(0.0) - score(alpha)) / alpha
    rhs = -h_alpha(r, alpha)[:, None] * (score(1.0) - score(0.0))
    assert torch.allclose(lhs, rhs, rtol=1e-9, atol=1e-9)


# --- the generator gradient ---------------------------------------------------------------------------

def exact_skew_jsd_gradient(alpha, mu, s, a, b, t):
    """grad_(a, b) of D^(alpha)(q_t, p_t) for p = N(mu, s^2), q = N(b, a^2) in 1-D, by quadrature."""
    a = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    x = torch.linspace(-8, 8, 80001, dtype=torch.float64)
    vp = torch.tensor((1 - t) ** 2 * s ** 2 + t ** 2, dtype=torch.float64)
    vq = (1 - t) ** 2 * a ** 2 + t ** 2
    log_p = -0.5 * ((x - (1 - t) * mu) ** 2 / vp + torch.log(2 * math.pi * vp))
    log_q = -0.5 * ((x - (1 - t) * b) ** 2 / vq + torch.log(2 * math.pi * vq))
    log_m = torch.logaddexp(math.log(alpha) + log_p, math.log(1 - alpha) + log_q)
    value = (torch.trapezoid(log_q.exp() * (log_q - log_m), x) / alpha
             + torch.trapezoid(log_p.exp() * (log_p - log_m), x) / (1 - alpha))
    return torch.stack(torch.autograd.grad(value, (a, b)))


@pytest.mark.parametrize("mixture", ["amortized", "explicit"])
@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_generator_gradient_matches_the_closed_form(alpha, mixture):
    """Both mixture nets with exact parts: the amortized net's exact mixture velocity, and SMD's explicit
    D v_p + (1 - D) v_q with the exact log-ratio."""
    mu, s, a, b, t = 0.5, 0.8, 0.6, 0.0, 0.4
    teacher = GMMTeacher(GaussianMixture([[mu]], [s]))
    student = AffineGenerator(a, [b])
    cfg = no_gan(generator_weight="none", time_range=[t, t])
    if mixture == "amortized":
        obj = SMT(student, teacher, cfg, score_net=ExactMixtureScore(([mu], s), ([b], a)))
    else:
        obj = SMD(student, teacher, SMDConfig(**asdict(cfg)), score_net=ExactExplicitMixture(([mu], s), ([b], a)))
        assert obj.explicit and obj.gan_head is None
    obj = fixed_alpha(obj.double(), alpha)
    obj.generator = torch.Generator().manual_seed(0)
    n = 200_000
    loss = obj.loss({"x": torch.zeros(n, 1, dtype=torch.float64), "cond": None}, GENERATOR_STEP)["student"]
    estimate = torch.stack([g.reshape(()) for g in torch.autograd.grad(loss, (student.a, student.b))])
    exact = exact_skew_jsd_gradient(alpha, mu, s, a, b, t) * t ** 2 / (1 - t) ** 2
    err = (estimate - exact).norm() / exact.norm()
    assert err < 0.02, (alpha, estimate.tolist(), exact.tolist(), float(err))


def direct_dmd_gradient(obj, student, batch, seed):
    """DMD from the mixture net's alpha = 0 (fake) and alpha = 1 (real) denoisers, same draws as SMT."""
    gen = torch.Generator().manual_seed(seed)
    x_real = batch["x"]
    n, d = x_real.shape
    z = torch.randn(n, d, generator=gen).double()
    x = z - student(z, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64))
    lo, hi = obj.cfg.time_range
    t = (lo + (hi - lo) * torch.rand(n, generator=gen)).double()
    eps = torch.randn(n, d, generator=gen).double()
    x_t = (1 - t[:, None]) * x.detach() + t[:, None] * eps
    with torch.no_grad():
        f0 = obj.score_net.x0(x_t, t, torch.zeros_like(t))
        f1 = obj.score_net.x0(x_t, t, torch.ones_like(t))
        g = (f0 - f1) / ((x.detach() - f1).abs().mean(1, keepdim=True) + 1e-6)
    loss = 0.5 * (x - (x - g).detach()).pow(2).mean()
    return loss, torch.autograd.grad(loss, list(student.parameters()))


def test_alpha_one_is_dmd_with_a_learned_mixture_net():
    torch.manual_seed(0)
    teacher = GMMTeacher(GaussianMixture([[0.5, 0.5]], [0.7]))
    student = MLPAvgVelocity(2).double()
    net = MixtureScore(MLPAvgVelocity(2).double())
    with torch.no_grad():
        net.net.interval_embed[-1].weight.normal_()   # so that alpha matters
    obj = fixed_alpha(SMT(student, teacher, no_gan(), score_net=net).double(), 1.0)
    obj.generator = torch.Generator().manual_seed(3)
    x, _ = teacher.mixture.sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = {"x": x, "cond": None}
    loss = obj.loss(batch, GENERATOR_STEP)["student"]
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref_loss, ref_grads = direct_dmd_gradient(obj, student, batch, seed=3)
    assert ref_loss > 0 and torch.allclose(loss, ref_loss, rtol=1e-14, atol=0)
    for g1, g2 in zip(grads, ref_grads):
        assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-16)


def test_adaptive_weight_with_exact_scores_is_dmd_for_every_alpha():
    """With exact scores (P_alpha - P_0) = alpha h_alpha(r) (P_1 - P_0), so the adaptive weight cancels
    h_alpha: the generator gradient is DMD's, whatever alpha (per sample) is drawn."""
    p, q = ([0.5], 0.8), ([0.0], 0.6)
    teacher = GMMTeacher(GaussianMixture([p[0]], [p[1]]))
    student = AffineGenerator(0.6, [0.0])
    obj = SMT(student, teacher, no_gan(), score_net=ExactMixtureScore(p, q)).double()
    obj.generator = torch.Generator().manual_seed(4)
    batch = {"x": torch.zeros(512, 1, dtype=torch.float64), "cond": None}
    loss = obj.loss(batch, GENERATOR_STEP)["student"]
    grads = torch.autograd.grad(loss, list(student.parameters()))
    ref_loss, ref_grads = direct_dmd_gradient(obj, student, batch, seed=4)
    # direct_dmd_gradient draws no alpha: compare gradients, which do not depend on the alpha draws
    for g1, g2 in zip(grads, ref_grads):
        assert torch.allclose(g1, g2, rtol=1e-9), (g1, g2)


@pytest.mark.parametrize("weight", ["adaptive", "dmd", "none"])
def test_no_gradient_when_the_generator_is_the_target(weight):
    mu, s = [0.3, -0.7], 0.6
    teacher = GMMTeacher(GaussianMixture([mu], [s]))
    student = AffineGenerator(s, mu)
    obj = SMT(student, teacher, no_gan(generator_weight=weight), score_net=ExactMixtureScore((mu, s), (mu, s))).double()
    x, _ = teacher.mixture.sample(256, torch.Generator().manual_seed(0), dtype=torch.float64)
    out = obj.loss({"x": x, "cond": None}, GENERATOR_STEP)
    grads = torch.autograd.grad(out["student"], list(student.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) < 1e-13


# --- the mixture denoising loss ------------------------------------------------------------------------

def test_mixture_score_net_fits_the_mixture_of_two_gaussians():
    """Fit a small alpha-conditioned MLP with the mixture denoising loss on 1-D Gaussians p (data) and q
    (a fixed affine generator); compare with grad log(alpha p_t + (1 - alpha) q_t)."""
    torch.manual_seed(0)
    p, q, t = ([1.0], 0.4), ([-1.0], 0.5), 0.5
    teacher = GMMTeacher(GaussianMixture([p[0]], [p[1]]))
    student = AffineGenerator(q[1], q[0]).float()
    net = MixtureScore(MLPAvgVelocity(1, hidden=64, emb_dim=16))
    obj = SMT(student, teacher, no_gan(score_time_range=[t, t]), score_net=net)
    obj.generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    data = torch.Generator().manual_seed(1)
    steps = 1500
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < steps // 2 else 0.2)
    for step in range(steps):
        x, _ = teacher.mixture.sample(256, data)
        loss = obj.loss({"x": x, "cond": None}, 0)["score"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    exact = ExactMixtureScore(p, q)
    x = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)[:, None]
    tt = torch.full((301,), t, dtype=torch.float64)
    errors = {}
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        al = torch.full_like(tt, alpha)
        ref = paths.velocity_to_score(x, tt, exact(x, tt, al))
        with torch.no_grad():
            got = paths.velocity_to_score(x, tt, net(x.float(), tt.float(), al.float()).double())
        # weight the points by the mixture density: the loss only sees where the mixture has mass
        dens = (alpha * log_density(x, tt, *p).exp() + (1 - alpha) * log_density(x, tt, *q).exp())
        errors[alpha] = (((got - ref)[:, 0] ** 2 * dens).sum() / (ref[:, 0] ** 2 * dens).sum()).sqrt().item()
    print(json.dumps({"relative_score_error": errors}))
    assert max(errors.values()) < 0.1, errors


def test_alpha_sampling():
    obj = SMT(MLPAvgVelocity(2), None, no_gan(point_mass_prob=0.5, alpha_levels=1000))
    g = obj.generator_alpha(40_000)
    assert g.min() >= 1e-3 and g.max() == 1.0 and abs(g.mean().item() - 0.5) < 0.01
    assert torch.allclose(g * 1000, (g * 1000).round(), atol=1e-3)       # the grid {1/1000, ..., 1}
    s = obj.score_alpha(40_000)
    for point in (0.0, 0.5, 1.0):                       # p_pm / 3 each, plus the grid's own 1/1001
        assert abs((s == point).float().mean().item() - (0.5 / 3 + 0.5 / 1001)) < 0.01
    assert ((s > 0) & (s < 1) & (s != 0.5)).float().mean() > 0.45


# --- SMD, the GAN regulariser, the schedule ------------------------------------------------------------

def test_smd_real_branch_regresses_onto_the_teacher():
    from onestep.teachers.digits import DigitsTeacher

    teacher = DigitsTeacher.from_pretrained()
    from onestep.student import student_from_teacher

    smd = SMD(student_from_teacher(teacher), teacher, SMDConfig(critic_gan_weight=0.0, gan_weight=0.0))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    out = smd.loss({"x": x, "cond": None}, 0)
    # at step 0 the mixture net is an exact copy of the teacher for every alpha: the real branch, whose
    # target is the teacher's denoiser (velocity), has zero error up to float rounding (the net and the
    # teacher run on batches of different sizes); the fake branch does not
    assert out["log/score_real_mse"] < 1e-12 and out["log/score_fake_mse"] > 1e-3
    smt = SMT(student_from_teacher(teacher), None, SMTConfig(critic_gan_weight=0.0, gan_weight=0.0))
    assert smt.loss({"x": x, "cond": None}, 0)["log/score_real_mse"] > 0   # SMT: the data target eps - x


def test_gan_regulariser_reaches_the_generator_only_through_x():
    torch.manual_seed(0)
    teacher = GMMTeacher(GaussianMixture([[0.5, 0.5]], [0.7]))
    obj = SMT(MLPAvgVelocity(2), teacher, SMTConfig(gan_weight=0.5, critic_gan_weight=0.5))
    assert obj.gan_layers == ["net.body.6"]   # the last hidden activation
    x, _ = teacher.mixture.sample(32, torch.Generator().manual_seed(0))
    out = obj.loss({"x": x, "cond": None}, GENERATOR_STEP)
    critics = list(obj.score_net.parameters()) + list(obj.gan_head.parameters())
    assert all(g is None for g in torch.autograd.grad(out["student"], critics, allow_unused=True, retain_graph=True))
    assert out["log/loss_gan"] > 0
    head_grads = torch.autograd.grad(out["score"], list(obj.gan_head.parameters()), retain_graph=True)
    assert all(g.abs().sum() > 0 for g in head_grads)
    assert all(g is None for g in torch.autograd.grad(out["score"], list(obj.student.parameters()), allow_unused=True))


def test_schedule_groups_and_options():
    obj = SMT(MLPAvgVelocity(2), None, SMTConfig(critic_per_generator=5, lr=1e-4, score_lr=5e-4), )
    assert [obj.active_groups(s) for s in range(6)] == [["score"]] * 4 + [["student", "score"]] + [["score"]]
    ids = [id(p) for ps in obj.param_groups().values() for p in ps]
    assert len(ids) == len(set(ids)) == sum(1 for p in obj.parameters() if p.requires_grad)
    assert obj.default_optim("score").lr == 5e-4 and obj.default_optim("student").lr == 1e-4
    assert SMD.distillation and not SMT.distillation
    assert SMDConfig().point_mass_prob == 0.25 and SMTConfig().point_mass_prob == 0.5


def test_generator_warmup_is_plain_denoising_along_r0_then_the_usual_schedule():
    obj = SMT(MLPAvgVelocity(2), None,
              SMTConfig(critic_per_generator=5, generator_warmup=3, gan_weight=0.0, critic_gan_weight=0.0))
    both, score = ["student", "score"], ["score"]
    assert [obj.active_groups(s) for s in range(10)] == [both] * 3 + [score, both] + [score] * 4 + [both]
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    obj.generator = torch.Generator().manual_seed(7)
    out = obj.loss({"x": x, "cond": None}, 0)
    # the same draws in the same order (z for the fake samples, then t and eps of the denoising loss)
    g = torch.Generator().manual_seed(7)
    torch.randn(16, 2, generator=g)
    t, eps = torch.rand(16, generator=g), torch.randn(16, 2, generator=g)
    x_t = (1 - t)[:, None] * x + t[:, None] * eps
    expected = (obj.student(x_t, torch.zeros(16), t) - (eps - x)).pow(2).mean()
    assert torch.allclose(out["student"], expected, rtol=1e-6) and out["log/loss_warmup"] == out["student"]
    assert "log/loss_dm" not in out and out["score"] > 0
    # the warm-up loss trains the generator only; the score loss the mixture net only
    student, critics = list(obj.student.parameters()), list(obj.score_net.parameters())
    assert all(g is None for g in torch.autograd.grad(out["student"], critics, allow_unused=True, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(out["score"], student, allow_unused=True))
    assert "log/loss_dm" in obj.loss({"x": x, "cond": None}, 4)   # after the warm-up: the SMT gradient
    with pytest.raises(ConfigError, match="generator_warmup"):
        SMT(MLPAvgVelocity(2), None, SMTConfig(generator_warmup=-1))


@pytest.mark.parametrize("bad", [{"critic_per_generator": 0}, {"point_mass_prob": 1.5}, {"generator_weight": "x"},
                                 {"score_weighting": "x"}, {"time_range": [0.9, 0.1]}])
def test_bad_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        SMT(MLPAvgVelocity(2), None, SMTConfig(**bad))
    with pytest.raises(ConfigError, match="teacher"):
        SMD.check_config(SMDConfig(), None)


def test_smd_with_a_diffusers_adapter_teacher():
    from test_fdistill import tiny_class_conditional_unet_teacher

    from onestep.student import TeacherStudent, student_from_teacher

    teacher = tiny_class_conditional_unet_teacher()
    obj = SMD(student_from_teacher(teacher), teacher, SMDConfig())
    assert isinstance(obj.score_net.net, TeacherStudent) and obj.gan_layers == ["net.backbone.mid_block"]
    assert obj.score_net.net.interval_scale == obj.cfg.alpha_scale
    batch = {"x": torch.randn(6, 3, 8, 8), "cond": torch.tensor([0, 3, 9, 1, -1, 5])}
    out = obj.loss(batch, 0)
    # every mixture starts as the teacher, its target: zero up to float rounding (the net and the teacher
    # run on batches of different sizes, whose kernels may round differently on another CPU)
    assert out["log/score_real_mse"] < 1e-12
    out = obj.loss(batch, GENERATOR_STEP)
    assert torch.isfinite(out["student"]) and torch.isfinite(out["score"])
    # the explicit mixture on the same adapter: its logit head reads the teacher's default features
    obj = SMD(student_from_teacher(teacher), teacher, SMDConfig(mixture="explicit"))
    assert isinstance(obj.score_net.fake, TeacherStudent)
    out = obj.loss(batch, GENERATOR_STEP)
    # the fake net starts as a copy of the teacher: every mixture equals it up to rounding
    assert out["log/score_real_mse"] < 1e-10 and torch.isfinite(out["student"]) and torch.isfinite(out["score"])


# --- SMD's explicit mixture (mixture: explicit) ------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_explicit_mixture_with_the_exact_log_ratio_is_the_mixture_score(alpha):
    """D = sigmoid(log r + logit alpha) mixes v_p and v_q into the velocity of alpha p + (1 - alpha) q,
    exactly 0 and 1 at the ends."""
    p, q = ([0.5, -0.2], 0.7), ([-0.4, 0.3], 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64) * 1.5
    t = torch.rand(500, generator=g, dtype=torch.float64) * 0.9 + 0.05
    al = torch.full_like(t, alpha)
    got = ExactExplicitMixture(p, q)(x, t, al)
    assert torch.allclose(got, ExactMixtureScore(p, q)(x, t, al), rtol=1e-9, atol=1e-10)


def test_explicit_smd_on_the_digits_teacher():
    """alpha = 1 is the teacher and alpha = 0 the fake net, exactly; the score loss trains the fake net
    and the logit head (not the teacher, not the generator); the generator's GAN term reaches the
    generator only through x; checkpoints hold the fake net and the head, not a second teacher."""
    from onestep.teachers.digits import DigitsTeacher

    from onestep.student import student_from_teacher

    teacher = DigitsTeacher.from_pretrained()
    obj = SMD(student_from_teacher(teacher), teacher, SMDConfig(mixture="explicit"))
    net = obj.score_net
    assert isinstance(net, ExplicitMixtureScore) and obj.gan_head is None
    assert {k.split(".")[1] for k in obj.state_dict() if k.startswith("score_net.")} == {"fake", "head"}
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(4, 1, 16, 16, generator=g), torch.full((4,), 0.4)
    with torch.no_grad():
        net.fake.unet.conv_out.bias.add_(0.1)   # so that fake and teacher differ
        assert torch.equal(net(x_t, t, torch.ones(4)), teacher.velocity(x_t, t, None))
        assert torch.equal(net(x_t, t, torch.zeros(4)), net.fake(x_t, t, t, None))
        half = net(x_t, t, torch.full((4,), 0.5))
        assert (half - teacher.velocity(x_t, t, None)).abs().max() > 1e-3
    x = torch.randn(8, 1, 16, 16, generator=g).clamp(-1, 1)
    out = obj.loss({"x": x, "cond": None}, GENERATOR_STEP)
    assert out["log/score_real_mse"] > 0 and out["log/loss_gan"] > 0 and out["log/loss_gan_critic"] > 0
    critics = list(net.parameters())
    assert all(g is None for g in torch.autograd.grad(out["student"], critics, allow_unused=True, retain_graph=True))
    grads = torch.autograd.grad(out["score"], [net.fake.unet.conv_out.bias, *net.head.parameters()], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(g is None for g in torch.autograd.grad(out["score"], list(obj.student.parameters()), allow_unused=True))
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="mixture"):
        SMD(student_from_teacher(teacher), teacher, SMDConfig(mixture="learned"))
    with pytest.raises(ConfigError, match="feature_layers"):
        SMD(student_from_teacher(teacher), teacher, SMDConfig(mixture="explicit", gan_layers=["net.unet.mid_block"]))
