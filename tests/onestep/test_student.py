"""Students: zero-initialised interval embedding, and the k-step sampler."""
import copy

import pytest
import torch
from diffusers import UNet2DModel
from onestep.teachers.digits import DIGITS_UNET_CONFIG, DigitsTeacher

from onestep.sampling import sample_avg_velocity
from onestep.student import AvgVelocityUNet, MLPAvgVelocity, student_from_teacher


def random_digits_teacher(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(**DIGITS_UNET_CONFIG)
    with torch.no_grad():  # random weights everywhere, so equality is not a zero-output accident
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return DigitsTeacher(AvgVelocityUNet(unet))


def test_student_equals_teacher_at_init():
    teacher = random_digits_teacher()
    student = student_from_teacher(teacher)
    assert student.has_interval_embedding and not teacher.model.has_interval_embedding
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    v = teacher.velocity(x, t)
    with torch.no_grad():
        assert (student(x, t, t) - v).abs().max() < 1e-6
        # the interval embedding is zero-initialised: also u(x, r, t) = v(x, t) at step 0
        assert (student(x, t * 0.3, t) - v).abs().max() < 1e-6
        # once the embedding moves, r matters
        student.unet.class_embedding.linear_2.bias.add_(0.5)
        assert (student(x, t * 0.3, t) - v).abs().max() > 1e-3
    assert not any(p.requires_grad for p in teacher.parameters())


def test_velocity_model_rejects_intervals():
    teacher = random_digits_teacher()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="r must equal t"):
        teacher.model(x, t * 0.5, t)


def test_mlp_interval_embedding_is_zero_at_init():
    torch.manual_seed(0)
    net = MLPAvgVelocity(3)
    z, t = torch.randn(5, 3), torch.rand(5)
    assert torch.equal(net(z, t, t), net(z, 0.2 * t, t))


def test_mlp_student_from_a_frozen_mlp_teacher_is_trainable_and_starts_at_its_velocity():
    torch.manual_seed(0)
    backbone = MLPAvgVelocity(3).double()
    torch.nn.init.normal_(backbone.interval_embed[-1].weight)   # a trained backbone: nonzero interval head
    backbone.requires_grad_(False)                               # as teachers hold it

    class MLPTeacher:
        def backbone(self):
            return backbone

    student = student_from_teacher(MLPTeacher(), interval_scale=7.0)
    assert all(p.requires_grad for p in student.parameters())
    assert student.interval_scale == 7.0 and not any(p.requires_grad for p in backbone.parameters())
    z, t = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(student(z, 0.2 * t, t), student(z, t, t))     # interval head zeroed again
        assert (student(z, t, t) - backbone(z, t, t)).abs().max() < 1e-12  # r = t: the teacher's velocity


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_sampler_with_exact_field_reproduces_flow_map(exact_field, gmm_teacher, steps):
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = gmm_teacher.flow_map(z, 1.0, 0.0)
    out = sample_avg_velocity(exact_field, z, steps=steps)
    assert (out - exact).abs().max() < 1e-8
    # a non-uniform grid too
    out = sample_avg_velocity(exact_field, z, times=[1.0, 0.8, 0.15, 0.0])
    assert (out - exact).abs().max() < 1e-8


def test_digits_teacher_features_by_layer_name_and_hooks_removed():
    import pytest
    from onestep.teachers.digits import DigitsTeacher

    teacher = DigitsTeacher.from_pretrained()
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    feats = teacher.features(x, 0.5)
    assert [f.shape[1] for f in feats] == [64, 64, 64] and feats[-1].shape[-1] == 4
    feats[-1].pow(2).sum().backward()                       # gradients reach the input
    assert x.grad.abs().sum() > 0
    unet = teacher.backbone().unet
    assert all(not m._forward_hooks for m in unet.modules())  # every hook removed
    with pytest.raises(ValueError, match="not in AvgVelocityUNet"):
        teacher.features(x, 0.5, layers=["unet.nope"])
    assert all(not m._forward_hooks for m in unet.modules())


def test_time_smoothing_is_the_jitter_average_of_the_embedding():
    """smooth_time_embedding(sigma) folds E_d[sinusoids(scale (t + d))], d ~ N(0, sigma^2), into the first
    Linear of both time embeddings; reference: Gauss-Hermite quadrature of the unsmoothed layers."""
    import numpy as np

    teacher = random_digits_teacher()
    plain = student_from_teacher(teacher, interval_scale=300.0).double()
    with torch.no_grad():
        plain.unet.class_embedding.linear_2.weight.normal_()  # the interval path must matter too
    smooth = copy.deepcopy(plain).smooth_time_embedding(0.004)
    nodes, weights = np.polynomial.hermite.hermgauss(80)   # int exp(-x^2) f(x) dx
    jitter = torch.tensor(nodes * np.sqrt(2) * 0.004)
    w = torch.tensor(weights / np.sqrt(np.pi))
    t = torch.tensor([0.13, 0.5, 0.91], dtype=torch.float64)
    for layer, scale in ((lambda m: m.unet.time_embedding.linear_1, 1000.0),
                         (lambda m: m.unet.class_embedding.linear_1, 300.0)):
        proj = plain.unet.time_proj
        averaged = sum(wi * proj((t + d) * scale) for wi, d in zip(w, jitter))
        expect = layer(plain)(averaged.double())
        got = layer(smooth)(proj(t * scale).double())
        # diffusers computes the sinusoids in float32 (arguments up to ~1000 rad): ~1e-5 is its rounding
        assert (got - expect).abs().max() < 2e-5
        assert (layer(plain)(proj(t * scale).double()) - expect).abs().max() > 1e-2   # it does change


def test_time_smoothing_makes_the_time_derivative_of_the_digits_teacher_smooth():
    """The shipped digits teacher embeds 1000 t: its exact d/dt disagrees with a +-0.001 central
    difference by ~13 % (fine-scale jitter); averaged over sigma = 0.005 the two agree (measured 0.09 %)
    while the velocity itself moves by < 1 % (measured 0.44 %)."""
    teacher = DigitsTeacher.from_pretrained()
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 0.7)

    def mismatch(student):
        f = lambda s: student(x, s - 0.3, s)  # noqa: E731
        with torch.no_grad():
            _, jvp = torch.func.jvp(f, (t,), (torch.ones_like(t),))
            fd = (f(t + 1e-3) - f(t - 1e-3)) / 2e-3
        return ((jvp - fd).norm() / fd.norm()).item()

    plain = student_from_teacher(teacher)
    smooth = student_from_teacher(teacher).smooth_time_embedding(0.005)
    assert mismatch(plain) > 0.05 and mismatch(smooth) < 0.01
    with torch.no_grad():
        v = teacher.velocity(x, t)
        assert ((smooth(x, t, t) - v).norm() / v.norm()).item() < 0.01


def test_dense_time_teacher_round_trip_and_student(tmp_path):
    """A teacher with time scale 1 (SANA-Sprint's dense time embedding) keeps it through save/load
    (onestep.json), and a student initialised from it sees the same timestep."""
    from onestep.build import build_student
    from onestep.config import load_config

    teacher = random_digits_teacher()
    teacher.model.time_scale = 1.0
    teacher.save_pretrained(tmp_path / "dense")
    loaded = DigitsTeacher.from_pretrained(tmp_path / "dense")
    assert loaded.model.time_scale == 1.0
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.05, 0.5, 0.9])
    expect = teacher.model.unet(x, t * 1.0).sample  # the UNet's timestep is t itself
    assert (loaded.velocity(x, t) - expect).abs().max() < 1e-6
    assert (loaded.velocity(x, t) - teacher.model.unet(x, t * 1000.0).sample).abs().max() > 1e-3
    # saving at the default scale removes the stale sidecar: the folder is a plain diffusers folder again
    teacher.model.time_scale = 1000.0
    teacher.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense" / "onestep.json").exists()
    assert DigitsTeacher.from_pretrained(tmp_path / "dense").model.time_scale == 1000.0

    cfg = load_config("digits_meanflow", [f"teacher.path={tmp_path / 'dense'}"])
    student = build_student(cfg, loaded)
    assert student.time_scale == 1.0 and student.interval_scale == 1.0
    with torch.no_grad():
        assert (student(x, t, t) - loaded.velocity(x, t)).abs().max() < 1e-6


def test_teacher_fine_tune_student_is_a_trainable_velocity_copy():
    """configs/digits_teacher_dense: init=teacher without an interval embedding and a new time scale."""
    from onestep.build import build_student
    from onestep.config import load_config

    teacher = random_digits_teacher()
    cfg = load_config("digits_teacher_dense", [])
    student = build_student(cfg, teacher)
    assert isinstance(student, AvgVelocityUNet) and not student.has_interval_embedding
    assert student.time_scale == 1.0 and teacher.model.time_scale == 1000.0
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.8])
    with torch.no_grad():  # same weights, the timestep t instead of 1000 t
        assert (student(x, t, t) - teacher.model.unet(x, t).sample).abs().max() < 1e-6
        student.unet.conv_out.bias.add_(1.0)  # a copy: the teacher does not move
    assert (teacher.velocity(x, t) - teacher.model.unet(x, t * 1000).sample).abs().max() < 1e-6


def test_shipped_dense_teacher_and_bad_choice():
    from onestep.teachers.digits import SHIPPED

    from onestep.config import ConfigError, load_config

    assert set(SHIPPED) == {"standard", "dense"}
    dense = DigitsTeacher.from_pretrained(shipped="dense")
    standard = DigitsTeacher.from_pretrained()
    assert dense.model.time_scale == 1.0 and standard.model.time_scale == 1000.0
    # the fine-tune kept what the teacher computes: on noised training digits the two velocities differ by
    # ~5 % (measured 4-6 % at t = 0.05, 0.3, 0.8), far less than either differs from the per-sample target z - x0
    from onestep.data import load_digits

    x0 = load_digits("train").images[:64]
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for t in (0.05, 0.3, 0.8):
        tt = torch.full((64,), t)
        x = (1 - t) * x0 + t * z
        v_dense, v_std = dense.velocity(x, tt), standard.velocity(x, tt)
        assert (v_dense - v_std).norm() < 0.1 * v_std.norm()
        assert (z - x0 - v_std).norm() > 0.2 * v_std.norm()  # (measured 0.26-0.39)
    with pytest.raises(ConfigError, match="teacher.shipped must be one of standard, dense"):
        load_config("demo", ["teacher.shipped=fancy"])
