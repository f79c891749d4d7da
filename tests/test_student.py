"""Students: zero-initialised interval embedding, and the k-step sampler."""
import pytest
import torch
from diffusers import UNet2DModel

from onestep.sampling import sample_avg_velocity
from onestep.student import AvgVelocityUNet, MLPAvgVelocity, student_from_teacher
from onestep.teachers.digits import DIGITS_UNET_CONFIG, DigitsTeacher


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
