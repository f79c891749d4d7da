"""EDM-preconditioned teacher: D(x, sigma) recovered exactly from the flow velocity, the
preconditioning coefficients, class labels (index with a null class, and NVlabs-style one-hot),
CFG, Karras/Heun sampling, loading a UNet2DModel through from_pretrained, one-line errors."""
from __future__ import annotations

import math

import pytest
import torch
from onestep.teachers.edm import EDMPrecond, EDMTeacher, karras_sigmas
from onestep.teachers.loading import TeacherFilesMissingError
from torch import nn

from onestep import paths

F64 = torch.float64


class RawNet(nn.Module):
    """A small nonlinear F(x, c_noise, class_labels) standing in for an EDM network."""

    def __init__(self, channels=2, num_classes=None, one_hot=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.noise = nn.Linear(1, channels)
        self.one_hot = one_hot
        self.labels = (nn.Linear(num_classes, channels) if one_hot else nn.Embedding(num_classes, channels)) \
            if num_classes else None

    def forward(self, x, c_noise, class_labels=None):
        h = self.conv(x) + self.noise(c_noise[:, None])[:, :, None, None]
        if self.labels is not None:
            h = h + self.labels(class_labels)[:, :, None, None]
        return torch.tanh(h)


def _teacher(net_classes=None, one_hot=False, **kw):
    net = RawNet(num_classes=net_classes, one_hot=one_hot).double()
    precond = EDMPrecond(net, **kw)
    return EDMTeacher(precond, (2, 4, 4))


def test_denoiser_recovered_exactly_from_velocity():
    teacher = _teacher(sigma_data=0.5)
    x0, noise = torch.randn(4, 2, 4, 4, dtype=F64), torch.randn(4, 2, 4, 4, dtype=F64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 70.0], dtype=F64)
    x_edm = x0 + sigma[:, None, None, None] * noise
    t = paths.edm_sigma_to_flow_t(sigma)
    v = teacher.velocity(paths.edm_to_flow_x(x_edm, sigma), t)
    d_back = paths.velocity_to_x0(paths.edm_to_flow_x(x_edm, sigma), t, v)
    d_ref = teacher.precond(x_edm, sigma)
    err = (d_back - d_ref).abs().max().item()
    print(f"\nEDM: max |D from velocity - D(x, sigma)| {err:.2e} (float64)")
    assert err < 1e-12


def test_preconditioning_coefficients_are_karras():
    precond = EDMPrecond(RawNet().double(), sigma_data=0.7)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
    sd = 0.7
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-14)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-14)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-14)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-14, abs=1e-15)
    # D = c_skip x + c_out F(c_in x, c_noise)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    e = lambda c: c[:, None, None, None]  # noqa: E731
    expected = e(c_skip) * x + e(c_out) * precond.network(e(c_in) * x, c_noise)
    torch.testing.assert_close(precond(x, sigma), expected, rtol=1e-14, atol=1e-14)


def test_velocity_regular_up_to_t_one():
    teacher = _teacher()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    for t in (teacher.t_max, (teacher.t_max + 1) / 2, 1.0):
        assert torch.isfinite(teacher.velocity(x, t)).all()
    v_in = teacher.velocity(x, teacher.t_max - 1e-12)
    v_out = teacher.velocity(x, teacher.t_max + 1e-12)
    assert (v_in - v_out).abs().max() < 1e-6


@pytest.mark.parametrize("one_hot", [False, True])
def test_class_labels_and_cfg(one_hot):
    # one-hot: 5 classes, "no class" is the zero row; index: 5 classes plus embedding 5 as the null class
    teacher = _teacher(net_classes=5 if one_hot else 6, one_hot=one_hot, num_classes=5,
                       label_format="one_hot" if one_hot else "index", null_class=None if one_hot else 5)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=F64)
    labels = torch.tensor([0, 2, 4])
    w = 2.5
    v_c, v_u = teacher.velocity(x, t, labels), teacher.velocity(x, t, teacher.null_condition(3))
    torch.testing.assert_close(teacher.velocity(x, t, labels, guidance=w), v_u + w * (v_c - v_u))
    if one_hot:  # the null label reaches the network as the all-zero row
        assert teacher.precond.class_labels(torch.tensor([-1, 3]), 2, "cpu").tolist() == [[0.0] * 5, [0, 0, 0, 1.0, 0]]


def test_karras_heun_sampler_runs_and_grid():
    sig = karras_sigmas(5)
    assert sig[0].item() == pytest.approx(80.0) and sig[-2].item() == pytest.approx(0.002) and sig[-1] == 0
    teacher = _teacher()
    out = teacher.sample(torch.randn(2, 2, 4, 4, dtype=F64), steps=5)
    assert out.shape == (2, 2, 4, 4) and torch.isfinite(out).all()


def test_from_pretrained_unet_round_trip(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, num_class_embeds=4, add_attention=False,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "edm" / "unet")
    teacher = EDMTeacher.from_pretrained(str(tmp_path / "edm"), dtype="float64", null_class=3, c_noise_scale=1000.0)
    assert teacher.num_classes == 3 and teacher.sample_shape == (3, 8, 8)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    sigma = torch.tensor([0.3, 5.0], dtype=F64)
    labels = torch.tensor([1, 2])
    c_skip, c_out, c_in, c_noise = teacher.precond.coefficients(sigma)
    e = lambda c: c[:, None, None, None]  # noqa: E731
    raw = teacher.precond.network.unet(e(c_in) * x, c_noise, class_labels=labels).sample
    assert c_noise[0].item() == pytest.approx(1000 * math.log(0.3) / 4)
    torch.testing.assert_close(teacher.precond(x, sigma, labels), e(c_skip) * x + e(c_out) * raw)
    feats = teacher.features(paths.edm_to_flow_x(x, sigma), paths.edm_sigma_to_flow_t(sigma), labels)
    assert len(feats) == 3 and all(not m._forward_hooks for m in unet.modules())
    with pytest.raises(TeacherFilesMissingError) as err:
        EDMTeacher.from_pretrained(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value) and "teacher.path" in str(err.value)
