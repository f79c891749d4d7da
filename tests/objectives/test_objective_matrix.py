"""Every objective on every teacher family, through the trainer, in fp32 and under bf16 autocast with a bf16
teacher (the real recipes' setting): each optimizer group takes a step; its loss is finite, gradients reach the
parameters of exactly the groups that step (no frozen weight, no idle group, none of an active group left out),
and no frozen teacher weight moves. Objectives with a JVP (MeanFlow,
sCM, sCM + LADD) run it exactly (torch.func.jvp) through the student's forward-AD attention (`fused`). Every
combination runs (none has needed a refusal: the EDM teacher clamps t at sigma_min, so Lightning's
discriminator reads clean samples at t = 0 as it does on every other family).

The fast suite runs every objective on one transformer family (SD3) and one objective on every family, in both
precisions; `make test-slow` runs the whole matrix."""
from __future__ import annotations

import math

import pytest
import torch
from onestep.teachers.tiny import save_tiny_teacher

from onestep.config import load_config
from onestep.trainer import Trainer

FAMILIES = ["gmm", "digits", "unet", "edm", "stable_diffusion", "sdxl", "sd3", "flux", "sana"]
OBJECTIVES = ["flow_matching", "splitmeanflow", "meanflow", "fdistill", "smt", "smd", "scm", "scm_ladd", "lightning",
              "rcm", "ladd"]
#: short schedules: every group steps within a few steps
OBJECTIVE_OPTIONS = {
    "fdistill": ["objective.critic_per_generator=1"],
    "smt": ["objective.critic_per_generator=1"],
    "smd": ["objective.critic_per_generator=1"],
    "meanflow": ["objective.jvp=single"],
    "scm": ["objective.jvp=single", "objective.tangent_warmup=1"],
    "scm_ladd": ["objective.jvp=single", "objective.tangent_warmup=1"],
    "rcm": ["objective.jvp=single", "objective.tangent_warmup=1"],
    "lightning": ["objective.teacher_steps=4", "objective.stages=[2,1]", "objective.stage_iters=[1,2]"],
}
JVP = {"meanflow", "scm", "scm_ladd", "rcm"}

FAST = {(o, "sd3") for o in OBJECTIVES} | {("splitmeanflow", f) for f in FAMILIES}


def _cases():
    for objective in OBJECTIVES:
        for family in FAMILIES:
            for precision in ("fp32", "bf16"):
                marks = () if (objective, family) in FAST else (pytest.mark.slow,)
                yield pytest.param(objective, family, precision, marks=marks, id=f"{objective}-{family}-{precision}")


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    built = {}

    def get(family):
        if family not in built:
            if family in ("gmm", "digits"):
                built[family] = {"name": family}
            else:
                base = {"name": family, **({"path": "x"} if family == "edm" else {})}
                built[family] = save_tiny_teacher(family, base, root / family)
        return built[family]
    return get


def _overrides(objective, family, precision, teacher: dict, out) -> list[str]:
    teacher = dict(teacher)
    if precision == "bf16" and family not in ("gmm", "digits"):
        teacher["dtype"] = "bfloat16"
    section = [f"teacher.{k}={'null' if v is None else v}" for k, v in teacher.items()]
    if family == "gmm":
        data = ["data.name=gmm", "student.init=scratch", "student.backbone=mlp"]
    elif family == "digits":
        data = ["data.name=digits", "student.init=teacher"]
    elif family in ("unet", "edm"):
        data = ["data.name=teacher_samples", "data.teacher_steps=1", "student.init=teacher"]
    else:
        data = ["data.name=prompts", f"data.path={out / 'prompts.txt'}", "data.teacher_steps=1", "student.init=teacher"]
    attention = ["student.attention=fused"] if objective in JVP and family not in ("gmm",) else []
    return [f"name={objective}-{family}-{precision}", f"output_dir={out}", *section, *data, *attention,
            "data.batch_size=4", "train.steps=8", "train.progress=false", "train.device=cpu",
            f"train.mixed_precision={'bf16' if precision == 'bf16' else 'no'}", "train.checkpoint_every=1000",
            f"objective.name={objective}", *OBJECTIVE_OPTIONS.get(objective, [])]


def _snapshot(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("objective, family, precision", list(_cases()))
def test_every_group_trains_and_nothing_frozen_moves(objective, family, precision, tiny_teachers, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\nthe dog\n", encoding="utf-8")
    overrides = _overrides(objective, family, precision, tiny_teachers(family), tmp_path)
    trainer = Trainer(load_config(None, overrides))
    obj, teacher = trainer.objective, trainer.teacher
    teacher_before = _snapshot(teacher) if teacher is not None else {}
    owner = {id(p): g for g, ps in trainer.groups.items() for p in ps}
    named = dict(obj.named_parameters())
    # which parameters hold a gradient when the optimizers step: read at the step's first zero_grad
    seen: list[set] = []
    zero_grad = trainer.parallel.zero_grad

    def record_then_zero(group):
        if len(seen) < trainer.step + 1:
            seen.append({n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0})
        zero_grad(group)
    trainer.parallel.zero_grad = record_then_zero
    # a step can leave an active group without gradient legitimately: a student initialised from the teacher has
    # zero loss on r = t samples, and a small batch may draw only those; so every group must get a gradient in
    # some step it is active in, and no step may give one to anything else
    trained: set[str] = set()
    while set(trainer.groups) - trained and trainer.step < 8:
        active = set(obj.active_groups(trainer.step))
        logs = trainer.train_step()
        trainer.step += 1
        assert trainer.nonfinite_in_a_row == 0, logs
        assert all(math.isfinite(v) for k, v in logs.items() if isinstance(v, float)), logs
        with_grad = seen[-1]
        outside = sorted(n for n in with_grad if owner.get(id(named[n])) not in active)
        assert not outside, (trainer.step, active, outside[:3])          # no frozen weight, no idle group
        trained |= {owner[id(named[n])] for n in with_grad}
    assert trained == set(trainer.groups), (set(trainer.groups) - trained)   # every group, within 8 steps
    if teacher is not None:
        assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
