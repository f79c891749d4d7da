"""f-distill against closed forms: h = r^2 f'', reverse KL = DMD, the generator gradient of an
affine generator on a Gaussian target, a discriminator recovering log p/q, zero gradient at the target."""
import json
import math

import pytest
import torch
from onestep.objectives.fdistill import DIVERGENCES, FDistill, FDistillConfig
from onestep.teachers.gmm import GaussianMixture, GMMTeacher
from torch import nn
from torch.nn import functional as F

from onestep.config import ConfigError
from onestep.student import MLPAvgVelocity


class AffineGenerator(nn.Module):
    """A 'student' whose one-step map is G(z) = a z + b (u(z, 0, 1) = z - G(z)), so q = N(b, a^2 I)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a), dtype=torch.float64))
        self.b = nn.Parameter(torch.as_tensor(b, dtype=torch.float64).clone())

    def forward(self, z, r, t, cond=None):
        return z - (self.a * z + self.b)


class GaussianVelocity(nn.Module):
    """The exact flow velocity of N(mean, std^2 I): an exact fake score for an affine generator."""

    def __init__(self, mean, std):
        super().__init__()
        self.teacher = GMMTeacher(GaussianMixture([list(mean)], [std]))
        self.unused = nn.Parameter(torch.zeros((), dtype=torch.float64))  # a param group must not be empty

    def forward(self, x, r, t, cond=None):
        return self.teacher.velocity(x, t) + 0 * self.unused


def gaussian_logpdf(x, mean, var):
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var))


def exact_log_ratio(x_t, t, p, q):
    """log p_t(x_t) / q_t(x_t) for isotropic Gaussians p = (mean, std), q = (mean, std) noised to flow time t."""
    def logpdf(mean, std):
        a = (1 - t)[:, None]
        var = a ** 2 * std ** 2 + t[:, None] ** 2
        return gaussian_logpdf(x_t, a * torch.as_tensor(mean, dtype=x_t.dtype), var).sum(1)
    return logpdf(*p) - logpdf(*q)


class ExactRatio(FDistill):
    """f-distill whose 'discriminator' returns the exact log p_t / q_t of two isotropic Gaussians."""

    def __init__(self, *args, p=(0.0, 1.0), q=(0.0, 1.0), **kw):
        super().__init__(*args, **kw)
        self.p, self.q = p, q

    def discriminator_logits(self, x_t, t, cond=None, frozen=False):
        return exact_log_ratio(x_t, t, self.p, self.q)[:, None]


def one_gaussian_teacher(mean, std):
    return GMMTeacher(GaussianMixture([list(mean)], [std]))


def exact_cfg(divergence, t, **kw):
    return FDistillConfig(divergence=divergence, time_range=[t, t], critic_per_generator=1, gan_weight=0.0,
                          ratio_bins=0, normalize_h=False, dmd_normalizer=False, ratio_clip=[1e-30, 1e30],
                          logit_clamp=60.0, **kw)


GENERATOR_STEP = 1  # critic_per_generator=1: steps 1, 3, ... are generator steps


# --- h = r^2 f'' --------------------------------------------------------------------------------------

def test_h_is_r_squared_f_second_derivative_for_every_divergence():
    sympy = pytest.importorskip("sympy")  # installed with torch
    r = sympy.symbols("r", positive=True)
    spec_f = {  # the paper's table of f, written out again independently of the implementation
        "reverse_kl": -sympy.log(r), "softened_reverse_kl": (r + 1) * sympy.log((r + 1) / (2 * r)),
        "js": r * sympy.log(r) - (r + 1) * sympy.log((r + 1) / 2), "squared_hellinger": (sympy.sqrt(r) - 1) ** 2,
        "forward_kl": r * sympy.log(r), "jeffreys": (r - 1) * sympy.log(r), "neyman_chi2": (1 - r) ** 2 / r,
    }
    spec_h = {"reverse_kl": 1, "softened_reverse_kl": 1 / (1 + r), "js": r / (1 + r),
              "squared_hellinger": sympy.sqrt(r) / 2, "forward_kl": r, "jeffreys": 1 + r, "neyman_chi2": 2 / r}
    assert set(spec_f) == set(DIVERGENCES)
    grid = torch.logspace(-2, 2, 41, dtype=torch.float64)
    for name, f in spec_f.items():
        assert sympy.simplify(r ** 2 * sympy.diff(f, r, 2) - spec_h[name]) == 0, name
        h_sym = sympy.lambdify(r, r ** 2 * sympy.diff(f, r, 2), "math")
        f_sym = sympy.lambdify(r, f, "math")
        div = DIVERGENCES[name]
        ref_h = torch.tensor([float(h_sym(float(v))) for v in grid], dtype=torch.float64)
        ref_f = torch.tensor([float(f_sym(float(v))) for v in grid], dtype=torch.float64)
        assert torch.allclose(div.h(grid), ref_h, rtol=1e-12), name
        assert torch.allclose(div.f(grid), ref_f, rtol=1e-12, atol=1e-12), name
        # and the implementation's own f, by central second differences (relative step)
        eps = 1e-3 * grid
        fpp = (div.f(grid + eps) - 2 * div.f(grid) + div.f(grid - eps)) / eps ** 2
        assert torch.allclose(grid ** 2 * fpp, div.h(grid), rtol=1e-4), name


# --- reverse KL is DMD ------------------------------------------------------------------------------------

def direct_dmd(student, teacher, fake_score, disc, batch, generator, n_critic, gan_weight, time_range,
               feature_layers=None):
    """DMD2 written out from its definition (h = 1): generator loss and critic losses,
    drawing z, t, eps in the documented order from `generator`."""
    x_real = batch["x"]
    n, d = x_real.shape

    def randn():
        return torch.randn(n, d, generator=generator).to(x_real.dtype)

    def times(lo, hi):
        return (lo + (hi - lo) * torch.rand(n, generator=generator)).to(x_real.dtype)

    ones, zeros = torch.ones(n, dtype=x_real.dtype), torch.zeros(n, dtype=x_real.dtype)
    out = {}
    for step in range(n_critic + 1):
        z = randn()
        if step < n_critic:       # critic: fake-score flow matching, logistic discriminator
            with torch.no_grad():
                x_fake = z - student(z, zeros, ones)
            t = times(0.0, 1.0)
            eps = randn()
            x_t = (1 - t[:, None]) * x_fake + t[:, None] * eps
            loss_fake = (fake_score(x_t, t, t) - (eps - x_fake)).pow(2).mean()
            t2 = times(0.0, 1.0)
            eps2 = randn()
            xr_t = (1 - t2[:, None]) * x_real + t2[:, None] * eps2
            lf = disc(teacher.features(x_t, t, None, feature_layers), t)
            lr_ = disc(teacher.features(xr_t, t2, None, feature_layers), t2)
            out[f"critic{step}"] = (loss_fake, F.softplus(lf).mean() + F.softplus(-lr_).mean())
            continue
        x = z - student(z, zeros, ones)
        t = times(*time_range)
        eps = randn()
        x_t = (1 - t[:, None]) * x + t[:, None] * eps
        with torch.no_grad():
            d_real = teacher.x0(x_t, t)
            d_fake = x_t - t[:, None] * fake_score(x_t, t, t)
            weight = 1 / ((x - d_real).abs().mean(1, keepdim=True) + 1e-6)
            grad = (d_fake - d_real) * weight
        logits = torch.func.functional_call(disc, {k: v.detach() for k, v in disc.named_parameters()},
                                            (teacher.features(x_t, t, None, feature_layers), t))
        out["generator"] = 0.5 * F.mse_loss(x, (x - grad).detach()) + gan_weight * F.softplus(-logits).mean()
    return out


def test_reverse_kl_is_dmd_loss_and_gradients(gmm_teacher):
    torch.manual_seed(0)
    cfg = FDistillConfig(divergence="reverse_kl", critic_per_generator=2, gan_weight=1e-2)
    obj = FDistill(MLPAvgVelocity(2), gmm_teacher, cfg).double()
    obj.generator = torch.Generator().manual_seed(5)
    x, _ = gmm_teacher.mixture.sample(64, torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = {"x": x, "cond": None}
    ours = [obj.loss(batch, step) for step in range(3)]
    assert [obj.active_groups(s) for s in range(3)] == [["fake_score", "disc"]] * 2 + [["student"]]
    ref = direct_dmd(obj.student, gmm_teacher, obj.fake_score, obj.discriminator, batch,
                     torch.Generator().manual_seed(5),
                     n_critic=2, gan_weight=1e-2, time_range=cfg.time_range)
    for step in range(2):
        assert torch.equal(ours[step]["fake_score"], ref[f"critic{step}"][0])
        assert torch.equal(ours[step]["disc"], ref[f"critic{step}"][1])
    loss, ref_loss = ours[2]["student"], ref["generator"]
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-15), (loss - ref_loss).abs()
    params = list(obj.student.parameters())
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    worst = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
    assert worst <= 1e-15 * max(g.abs().max().item() for g in ref_grads) + 1e-300, worst
    # h is exactly 1 after normalisation for reverse KL, whatever the discriminator says
    h, _ = obj.ratio_weights(torch.randn(64, 3, dtype=torch.float64), torch.rand(64, dtype=torch.float64))
    assert torch.equal(h, torch.ones_like(h))


# --- the generator gradient against its closed form (affine generator, Gaussian target) --------------

def exact_divergence_gradient(divergence, mu, s, a, b, t):
    """grad_(a, b) D_f(p_t || q_t) for p = N(mu, s^2), q = N(b, a^2) in 1-D, by quadrature (float64)."""
    a = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    x = torch.linspace(-8, 8, 80001, dtype=torch.float64)
    log_p = gaussian_logpdf(x, (1 - t) * mu, torch.tensor((1 - t) ** 2 * s ** 2 + t ** 2, dtype=torch.float64))
    log_q = gaussian_logpdf(x, (1 - t) * b, (1 - t) ** 2 * a ** 2 + t ** 2)
    value = torch.trapezoid(log_q.exp() * DIVERGENCES[divergence].f((log_p - log_q).exp()), x)
    return torch.stack(torch.autograd.grad(value, (a, b)))


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_generator_gradient_matches_the_closed_form(divergence):
    mu, s, a, b, t = 0.5, 0.8, 0.6, 0.0, 0.4   # p wider than q: every h has finite variance under q
    teacher = one_gaussian_teacher([mu], s)
    student = AffineGenerator(a, [b])
    obj = ExactRatio(student, teacher, exact_cfg(divergence, t), fake_score=GaussianVelocity([b], a),
                     p=([mu], s), q=([b], a)).double()
    obj.generator = torch.Generator().manual_seed(0)
    n = 200_000
    loss = obj.loss({"x": torch.zeros(n, 1, dtype=torch.float64), "cond": None}, GENERATOR_STEP)["student"]
    estimate = torch.stack([g.reshape(()) for g in torch.autograd.grad(loss, (student.a, student.b))])
    # d loss / dx = g / n with g = -(t^2 / (1 - t)) h (s_p - s_q) and dx_t/dtheta = (1 - t) dG/dtheta
    exact = exact_divergence_gradient(divergence, mu, s, a, b, t) * t ** 2 / (1 - t) ** 2
    err = (estimate - exact).norm() / exact.norm()
    assert err < 0.02, (divergence, estimate.tolist(), exact.tolist(), float(err))


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_no_gradient_when_the_generator_is_the_target(divergence):
    mu, s = [0.3, -0.7], 0.6
    teacher = one_gaussian_teacher(mu, s)
    student = AffineGenerator(s, mu)
    cfg = FDistillConfig(divergence=divergence, critic_per_generator=1, gan_weight=0.0)
    # learned (random) discriminator heads: whatever ratio they claim, D_fake = D_T makes g = 0
    obj = FDistill(student, teacher, cfg, fake_score=GaussianVelocity(mu, s)).double()
    x, _ = teacher.mixture.sample(256, torch.Generator().manual_seed(0), dtype=torch.float64)
    out = obj.loss({"x": x, "cond": None}, GENERATOR_STEP)
    grads = torch.autograd.grad(out["student"], list(student.parameters()))
    assert max(g.abs().max().item() for g in grads) < 1e-14
    assert out["log/loss_dm"] < 1e-28


@pytest.fixture(scope="module")
def digits_teacher():
    from onestep.teachers.digits import DigitsTeacher

    return DigitsTeacher.from_pretrained()


def test_fake_score_starts_as_the_teacher_so_the_first_generator_step_has_no_dm_gradient(digits_teacher):
    from onestep.student import student_from_teacher

    teacher = digits_teacher
    cfg = FDistillConfig(divergence="js", critic_per_generator=1, gan_weight=0.0)
    obj = FDistill(student_from_teacher(teacher), teacher, cfg)
    assert set(obj.param_groups()) == {"student", "fake_score", "disc"}
    x = torch.randn(4, 1, 16, 16)
    out = obj.loss({"x": x, "cond": None}, GENERATOR_STEP)
    assert out["log/loss_dm"] == 0.0     # D_phi = D_T bitwise: the critic steps must move first


# --- the density ratio ---------------------------------------------------------------------------------

def test_discriminator_recovers_the_log_density_ratio():
    """Only the heads train, between a fixed Gaussian teacher p and a fixed affine generator q (2-D)."""
    torch.manual_seed(0)
    mu, s, a, t = [0.8, -0.4], 0.8, 0.5, 0.3
    teacher = one_gaussian_teacher(mu, s)
    student = AffineGenerator(a, [0.0, 0.0]).float()
    cfg = FDistillConfig(divergence="js", critic_time_range=[t, t], critic_per_generator=1, head_hidden=64)
    obj = FDistill(student, teacher, cfg, fake_score=GaussianVelocity([0.0, 0.0], a).float())
    obj.generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(obj.discriminator.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    for step in range(500):
        x, _ = teacher.mixture.sample(256, data)
        loss = obj.critic_loss({"x": x, "cond": None})["disc"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    # test points from the equal mixture of p_t and q_t, where both densities matter
    g = torch.Generator().manual_seed(2)
    xp, _ = teacher.mixture.sample(1000, g, dtype=torch.float64)
    xq = a * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    x_t = (1 - t) * torch.cat([xp, xq]) + t * eps
    tt = torch.full((2000,), t, dtype=torch.float64)
    exact = exact_log_ratio(x_t, tt, (mu, s), ([0.0, 0.0], a))
    with torch.no_grad():
        learned = obj.discriminator_logits(x_t.float(), tt.float()).mean(1).double()
    mae = (learned - exact).abs().mean().item()
    corr = torch.corrcoef(torch.stack([learned, exact]))[0, 1].item()
    print(json.dumps({"log_ratio_mae": mae, "corr": corr, "exact_std": exact.std().item()}))
    assert corr > 0.98 and mae < 0.15 * exact.std().item()


def test_h_is_normalised_to_mean_one_and_bins_to_mean_one(gmm_teacher):
    cfg = FDistillConfig(divergence="forward_kl", ratio_bins=4, ratio_bin_ema=0.0)
    obj = FDistill(MLPAvgVelocity(2), gmm_teacher, cfg).double()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=g, dtype=torch.float64)
    coord = torch.rand(4000, generator=g, dtype=torch.float64)
    h, r = obj.ratio_weights(logits, coord)
    assert abs(h.mean().item() - 1) < 1e-14
    # forward KL: h = r, so the normalised h is r / mean(r), r itself has mean 1 in every bin
    index = (coord * 4).floor().long()
    for k in range(4):
        assert abs(r[index == k].mean().item() - 1) < 1e-12
    # clip and clamp: r before bin normalisation lies in [0.1, 20]
    raw = logits.mean(1).clamp(-10, 10).exp().clamp(0.1, 20)
    assert torch.allclose(r * obj.bin_mean[index], raw)
    # EMA of the bin means: with rate 0.5 the second batch's means blend with the first's
    obj.cfg.ratio_bin_ema = 0.5
    first = obj.bin_mean.clone()
    _, r2 = obj.ratio_weights(logits * 0 + 1.0, coord)  # every raw ratio e^1
    assert torch.allclose(obj.bin_mean, 0.5 * first + 0.5 * math.e)


def test_generator_step_gives_no_gradient_to_the_critics(gmm_teacher):
    torch.manual_seed(0)
    obj = FDistill(MLPAvgVelocity(2), gmm_teacher,
                   FDistillConfig(divergence="js", critic_per_generator=1, gan_weight=0.1))
    x, _ = gmm_teacher.mixture.sample(32, torch.Generator().manual_seed(0))
    loss = obj.loss({"x": x, "cond": None}, GENERATOR_STEP)["student"]
    critics = list(obj.fake_score.parameters()) + list(obj.discriminator.parameters())
    assert all(g is None for g in torch.autograd.grad(loss, critics, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(loss, list(obj.student.parameters())))
    # and the critic step gives none to the generator
    out = obj.loss({"x": x, "cond": None}, 0)
    for group in ("fake_score", "disc"):
        assert out[group].requires_grad
        assert all(g is None
                   for g in torch.autograd.grad(out[group], list(obj.student.parameters()), allow_unused=True))


def test_schedule_groups_and_options(gmm_teacher):
    obj = FDistill(MLPAvgVelocity(2), gmm_teacher, FDistillConfig(critic_per_generator=4, lr=1e-4, disc_lr=2e-4))
    assert [obj.active_groups(s) == ["student"] for s in range(10)] == [False] * 4 + [True] + [False] * 4 + [True]
    groups = obj.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == sum(1 for p in obj.parameters() if p.requires_grad)
    assert obj.default_optim("disc").lr == 2e-4 and obj.default_optim("fake_score").lr == 1e-4
    no_disc = FDistill(MLPAvgVelocity(2), gmm_teacher, FDistillConfig(divergence="reverse_kl", gan_weight=0.0))
    assert no_disc.discriminator is None and set(no_disc.param_groups()) == {"student", "fake_score"}
    assert no_disc.active_groups(0) == ["fake_score"]
    assert "bin_mean" in "".join(obj.trainable_state_dict())   # checkpointed with the run


@pytest.mark.parametrize("bad", [{"divergence": "kl"}, {"critic_per_generator": 0}, {"ratio_clip": [2.0, 20.0]},
                                 {"time_range": [0.5, 0.2]}, {"time_sampler": "edm"}, {"gan_weight": -1.0}])
def test_bad_options_are_config_errors(gmm_teacher, bad):
    with pytest.raises(ConfigError):
        FDistill(MLPAvgVelocity(2), gmm_teacher, FDistillConfig(**bad))
    with pytest.raises(ConfigError, match="teacher"):
        FDistill.check_config(FDistillConfig(), None)


def test_karras_noise_levels(gmm_teacher):
    obj = FDistill(MLPAvgVelocity(2), gmm_teacher, FDistillConfig(time_sampler="karras"))
    t, coord = obj.sample_times(20_000, [0.02, 0.98])
    sigma = t.double() / (1 - t.double())
    grid = obj.sigma_grid
    assert sigma.min() >= grid[20] * (1 - 1e-5) and sigma.max() <= grid[980] * (1 + 1e-5)
    assert abs(coord.mean().item() - 0.5) < 0.01


# --- the trainer: several groups, EMA, checkpoints, exact resume -------------------------------------

def test_resume_continues_exactly_with_every_group(tmp_path):
    from safetensors.torch import load_file

    from onestep.config import load_config
    from onestep.trainer import Trainer

    def cfg(name, steps):
        return load_config(None, [
            f"name={name}", f"output_dir={tmp_path}", "teacher.name=gmm", "student.init=scratch",
            "student.backbone=mlp", "data.name=gmm", "data.batch_size=16", f"train.steps={steps}",
            "train.progress=false", "train.checkpoint_every=4", "train.log_every=1", "objective.name=fdistill",
            "objective.critic_per_generator=2", "objective.ratio_bin_ema=0.5", "objective.r1_weight=1.0"])

    full = Trainer(cfg("full", 10)).fit()
    part = Trainer(cfg("part", 10))
    save = part.save_checkpoint

    def save_then_crash():
        save()
        if part.step == 4:
            raise KeyboardInterrupt
    part.save_checkpoint = save_then_crash
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = Trainer(cfg("part", 10)).fit()
    a, b = full.objective.trainable_state_dict(), resumed.objective.trainable_state_dict()
    assert a.keys() == b.keys() and any(k.startswith("discriminator.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for p, q in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(p, q)
    ck = load_file(tmp_path / "part" / "checkpoints" / "step-000010" / "trainable.safetensors")
    assert {k.split(".")[0] for k in ck} == {"student", "fake_score", "discriminator", "bin_mean", "bin_seen"}
    assert all((tmp_path / "part" / "checkpoints" / "step-000010" / f"optim-{g}.pt").is_file()
               for g in ("student", "fake_score", "disc"))
    # the bins really moved, and the generator trained (not just the critics)
    assert not torch.equal(a["bin_mean"], torch.ones_like(a["bin_mean"]))
    init = Trainer(cfg("init", 1)).objective.trainable_state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if k.startswith("student."))


@pytest.mark.slow
def test_forward_kl_and_js_cover_all_eight_modes(tmp_path):
    """benchmarks/gmm_modes.py, shortened: 8 well-separated modes, MLP generators from scratch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from gmm_modes import train_and_score

    rows = {name: train_and_score(name, 1500, str(tmp_path)) for name in ("forward_kl", "js", "reverse_kl")}
    print(json.dumps(rows))
    assert rows["forward_kl"]["modes_covered"] == 8 and rows["js"]["modes_covered"] == 8
    # reverse KL (DMD) is reported, not asserted: mode-seeking in theory, but here its generator starts
    # spread over the whole ring and its coverage is whatever the run gives
    assert 0 <= rows["reverse_kl"]["modes_covered"] <= 8


def test_unknown_feature_layers_are_config_errors(digits_teacher):
    from onestep.student import student_from_teacher

    with pytest.raises(ConfigError, match=r"objective\.feature_layers: feature layers \['1'\] not in .*unet"):
        FDistill(student_from_teacher(digits_teacher), digits_teacher, FDistillConfig(feature_layers=["1"]))


def test_approximate_r1_is_the_logit_change_under_a_small_perturbation(gmm_teacher):
    torch.manual_seed(0)
    cfg = FDistillConfig(divergence="js", critic_per_generator=1, r1_weight=100.0, r1_noise=0.1)
    obj = FDistill(MLPAvgVelocity(2), gmm_teacher, cfg).double()
    x, _ = gmm_teacher.mixture.sample(64, torch.Generator().manual_seed(0), dtype=torch.float64)
    obj.generator = torch.Generator().manual_seed(1)
    with_r1 = obj.loss({"x": x, "cond": None}, 0)
    obj.cfg.r1_weight = 0.0
    obj.generator = torch.Generator().manual_seed(1)
    without = obj.loss({"x": x, "cond": None}, 0)
    # the R1 draws come after all the others, so both calls saw the same real and fake inputs
    assert torch.equal(with_r1["fake_score"], without["fake_score"])
    assert with_r1["log/loss_r1"] > 0
    assert torch.allclose(with_r1["disc"], without["disc"] + 100.0 * with_r1["log/loss_r1"], rtol=1e-12)


def test_discriminator_heads_for_vector_token_and_map_features():
    from onestep.objectives.discriminators import FeatureDiscriminator
    from onestep.objectives.distribution_matching import call_with_frozen_parameters

    torch.manual_seed(0)
    # tokens as transformers return them, [B, N, C]: 7 tokens of 16 channels
    feats = [torch.randn(3, 5), torch.randn(3, 2), torch.randn(3, 7, 16), torch.randn(3, 8, 4, 4)]
    disc = FeatureDiscriminator(feats, hidden=16)
    t = torch.rand(3)
    logits = disc(feats, t)
    assert logits.shape == (3, 1 + 7 + 16)          # one vector logit, one per token, one per position
    # per sample: a sample's logits do not depend on the rest of the batch
    assert torch.allclose(disc([f[:1] for f in feats], t[:1]), logits[:1], atol=1e-6)
    # frozen call: gradient to the inputs, none to the parameters
    x = [f.clone().requires_grad_(True) for f in feats]
    call_with_frozen_parameters(disc, x, t).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in x)
    assert all(p.grad is None for p in disc.parameters())


def tiny_class_conditional_unet_teacher():
    """A pixel DDPM adapter (v-prediction, 10 classes + a null class) around a tiny random UNet."""
    from diffusers import DDIMScheduler, UNet2DModel
    from onestep.teachers.unet import UNetTeacher

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=11,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with torch.no_grad():  # diffusers zero-initialises output layers: make every layer matter
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    scheduler = dict(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction").config)
    return UNetTeacher(unet, scheduler, null_class=10)


def test_a_diffusers_adapter_teacher_with_labels_and_guidance():
    """The fake score of an adapter teacher is its student wrapper used at r = t (an exact copy at init), the
    discriminator reads the adapter's down/mid blocks, labels reach every network, D_T uses CFG."""
    from onestep.student import TeacherStudent, student_from_teacher

    teacher = tiny_class_conditional_unet_teacher()
    cfg = FDistillConfig(divergence="js", critic_per_generator=1, guidance=2.0, gan_weight=0.1)
    obj = FDistill(student_from_teacher(teacher), teacher, cfg)
    assert isinstance(obj.fake_score, TeacherStudent) and len(obj.discriminator.heads) == 3
    batch = {"x": torch.randn(6, 3, 8, 8), "cond": torch.tensor([0, 3, 9, 1, -1, 5])}
    critic = obj.loss(batch, 0)
    assert torch.isfinite(critic["fake_score"]) and torch.isfinite(critic["disc"])
    obj.cfg.guidance = None
    out = obj.loss(batch, 1)
    assert out["log/loss_dm"] == 0.0                   # the fake score is the (unguided) teacher, exactly
    obj.cfg.guidance = 2.0
    obj.generator = torch.Generator().manual_seed(0)
    guided = obj.loss(batch, 1)
    assert guided["log/loss_dm"] > 0                   # D_T is the guided teacher: the fake score is not
    grads = torch.autograd.grad(guided["student"], list(obj.student.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
