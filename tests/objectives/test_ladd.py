"""LADD and sCM + LADD: hinge loss, misaligned pairs, frozen heads in the student step, alternation."""
import torch
from onestep.objectives.ladd import SCMLADD, LADDDiscriminator, SCMLADDConfig
from torch import nn

from onestep.student import MLPAvgVelocity


class FixedLogits(nn.Module):
    """A stand-in discriminator: the k-th call returns `values[k]` for every sample (and has a parameter)."""

    def __init__(self, values):
        super().__init__()
        self.values, self.calls = list(values), []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, cond=None, frozen_heads=False):
        self.calls.append((x_t, t, cond))
        return torch.full((x_t.shape[0], 1), self.values[len(self.calls) - 1]) + 0 * self.w


def objective(teacher, discriminator=None, conditional=True, **cfg):
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=16, num_classes=2 if conditional else None)
    obj = SCMLADD(student, teacher, SCMLADDConfig(**cfg), discriminator)
    obj.generator = torch.Generator().manual_seed(0)
    return obj


def test_hinge_loss_with_misaligned_pairs(gmm_teacher):
    disc = FixedLogits([0.3, -0.2, 2.0])                     # real, fake, misaligned (rolled real)
    obj = objective(gmm_teacher, disc)
    noised = []
    plain = obj.noise_for_discriminator
    obj.noise_for_discriminator = lambda x: (noised.append(x.detach().clone()), plain(x))[1]
    x, labels = gmm_teacher.mixture.sample(8, generator=torch.Generator().manual_seed(1))
    out = obj.loss({"x": x, "cond": labels}, step=1)
    assert set(k for k in out if not k.startswith("log/")) == {"disc"}
    want = 0.5 * (max(0, 1 - 0.3) + (max(0, 1 - 0.2) + max(0, 1 + 2.0)) / 2)
    assert abs(float(out["disc"].detach()) - want) < 1e-6
    assert len(disc.calls) == 3 and all(torch.equal(c[2], labels) for c in disc.calls)   # original captions
    assert torch.equal(noised[0], x) and torch.equal(noised[2], torch.roll(x, 1, dims=0))
    # unconditional data: no misaligned pairs
    disc2 = FixedLogits([0.3, -0.2])
    objective(gmm_teacher, disc2, conditional=False).loss({"x": x}, step=1)
    assert len(disc2.calls) == 2


def test_student_step_freezes_heads_and_combines_losses(gmm_teacher):
    obj = objective(gmm_teacher, adv_weight=0.5, scm_weight=1.0)
    assert obj.active_groups(0) == ["student"] and obj.active_groups(1) == ["disc"]
    x, labels = gmm_teacher.mixture.sample(16, generator=torch.Generator().manual_seed(2))
    out = obj.loss({"x": x, "cond": labels}, step=0)
    assert abs(float(out["log/loss"]) - float(out["log/loss_scm"] + 0.5 * out["log/loss_adv"])) < 1e-6
    groups = obj.param_groups()
    grads = torch.autograd.grad(out["student"], groups["student"] + groups["disc"], allow_unused=True)
    student_grads, head_grads = grads[:len(groups["student"])], grads[len(groups["student"]):]
    assert all(g is None for g in head_grads)
    assert sum(float(g.abs().sum()) for g in student_grads if g is not None) > 0
    # the adversarial term alone reaches the student through the frozen teacher's features
    adv_only = objective(gmm_teacher, adv_weight=1.0, scm_weight=0.0)
    out = adv_only.loss({"x": x, "cond": labels}, step=0)
    grads = torch.autograd.grad(out["student"], adv_only.param_groups()["student"], allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_discriminator_step_trains_only_the_heads(gmm_teacher):
    obj = objective(gmm_teacher)
    x, labels = gmm_teacher.mixture.sample(16, generator=torch.Generator().manual_seed(3))
    out = obj.loss({"x": x, "cond": labels}, step=1)
    groups = obj.param_groups()
    grads = torch.autograd.grad(out["disc"], groups["disc"] + groups["student"], allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads[:len(groups["disc"])] if g is not None) > 0
    assert all(g is None for g in grads[len(groups["disc"]):])


def test_heads_on_a_unet_teacher_leave_no_hooks():
    from onestep.teachers.digits import DigitsTeacher

    teacher = DigitsTeacher.from_pretrained().freeze()
    disc = LADDDiscriminator(teacher, ["unet.down_blocks.1", "unet.mid_block"], hidden=8)
    x = torch.randn(3, 1, 16, 16)
    logits = disc(x, torch.full((3,), 0.4))
    assert logits.shape[0] == 3 and logits.shape[1] > 2 and torch.isfinite(logits).all()
    assert all(not m._forward_hooks for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in disc.parameters())
