"""rCM (sCM + DMD) and plain LADD, composed from sCM's, f-distill's and sCM + LADD's pieces: each reduces exactly to
the objective it is made of when the other term's weight is 0; critics train only themselves."""
import copy

import pytest
import torch
from onestep.objectives.fdistill import FDistill, FDistillConfig
from onestep.objectives.ladd import LADD, SCMLADD, LADDConfig, SCMLADDConfig
from onestep.objectives.rcm import RCM, RCMConfig
from onestep.objectives.scm import SCM, SCMConfig

from onestep.config import ConfigError, load_config
from onestep.student import MLPAvgVelocity


def student():
    torch.manual_seed(0)
    return MLPAvgVelocity(2, hidden=16, num_classes=2)


def seeded(obj, seed=0):
    obj.generator = torch.Generator().manual_seed(seed)
    return obj


def batch(teacher, n=16, seed=2):
    x, labels = teacher.mixture.sample(n, generator=torch.Generator().manual_seed(seed))
    return {"x": x, "cond": labels}


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g for p, g in
            zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def assert_same(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


GENERATOR_STEP = 1   # critic_per_generator=1, the fake score first: steps 0, 2, ... critic; 1, 3, ... student


def test_schedule_is_critic_first_and_groups_are_student_and_fake_score(gmm_teacher):
    obj = RCM(student(), gmm_teacher, RCMConfig(critic_per_generator=2))
    assert [obj.active_groups(s) for s in range(4)] == [["fake_score"], ["fake_score"], ["student"], ["fake_score"]]
    groups = obj.param_groups()
    assert set(groups) == {"student", "fake_score"}
    assert any(p is q for p in groups["student"] for q in obj.scm.logvar.parameters())   # sCM's head trains too
    assert obj.student.sampler == "consistency"


@pytest.mark.parametrize("warmup", [1000, 0])
def test_dmd_weight_zero_is_the_scm_objective(gmm_teacher, warmup):
    s = student()
    scm = seeded(SCM(copy.deepcopy(s), gmm_teacher, SCMConfig(tangent_warmup=warmup)))
    rcm = seeded(RCM(copy.deepcopy(s), gmm_teacher, RCMConfig(tangent_warmup=warmup, dmd_weight=0.0)))
    b = batch(gmm_teacher)
    want, got = scm.loss(b, GENERATOR_STEP), rcm.loss(b, GENERATOR_STEP)
    assert torch.equal(want["student"], got["student"]) and "log/loss_dmd" not in got
    assert_same(grads(want["student"], scm.param_groups()["student"]),
                grads(got["student"], rcm.param_groups()["student"]))
    assert torch.equal(scm.generator.get_state(), rcm.generator.get_state())   # and nothing more drawn


def reverse_kl_pair(teacher, **rcm_cfg):
    s = student()
    fd = seeded(FDistill(copy.deepcopy(s), teacher, FDistillConfig(divergence="reverse_kl", gan_weight=0.0,
                                                                    critic_per_generator=1)))
    rcm = seeded(RCM(copy.deepcopy(s), teacher, RCMConfig(scm_weight=0.0, dmd_weight=1.0, **rcm_cfg)))
    assert fd.discriminator is None
    return fd, rcm


@pytest.mark.parametrize("normalizer", [True, False])
def test_scm_weight_zero_is_fdistills_dmd_generator_step(gmm_teacher, normalizer):
    fd, rcm = reverse_kl_pair(gmm_teacher, dmd_normalizer=normalizer)
    fd.cfg.dmd_normalizer = normalizer
    b = batch(gmm_teacher)
    want, got = fd.loss(b, GENERATOR_STEP), rcm.loss(b, GENERATOR_STEP)
    assert torch.equal(want["student"], got["student"]) and torch.equal(want["log/loss_dm"], got["log/loss_dmd"])
    student_params = lambda o: [p for p in o.student.parameters()]   # noqa: E731 (rcm's group also holds logvar)
    g = grads(got["student"], student_params(rcm))
    assert_same(grads(want["student"], student_params(fd)), g)
    assert sum(float(x.abs().sum()) for x in g) > 0
    # the fake score is a critic here: no gradient reaches it in the student's step
    assert all(x is None for x in torch.autograd.grad(rcm.loss(b, GENERATOR_STEP)["student"],
                                                      rcm.param_groups()["fake_score"], allow_unused=True))


def test_dmd_direction_is_the_score_difference_of_the_closed_form_teacher(gmm_teacher):
    """Independently of f-distill: with the normaliser off, L_DMD's gradient with respect to the sample x is
    (D_phi - D_T) / numel, D_T the mixture's posterior mean at x_t (closed form), D_phi the fake score's."""
    _, rcm = reverse_kl_pair(gmm_teacher, dmd_normalizer=False)
    cond = batch(gmm_teacher)["cond"]
    like = torch.zeros(16, 2)
    captured = {}
    plain = rcm.dmd.generator_sample

    def keep(*a):
        out = plain(*a)
        out[0].retain_grad()
        captured.update(x=out[0], x_t=out[1].detach(), t=out[2])
        return out
    rcm.dmd.generator_sample = keep
    loss, _ = rcm.dmd.generator_loss(like, cond, rcm.cfg.time_range)
    loss.backward()
    x_t, t = captured["x_t"], captured["t"]
    x0, _ = gmm_teacher.mixture.posterior(x_t, 1 - t, t, cond)   # x_t = (1 - t) x + t eps: E[x | x_t]
    with torch.no_grad():
        v = rcm.fake_score(x_t, t, t, cond)
    d_fake = x_t - t[:, None] * v
    want = (d_fake - x0.to(d_fake.dtype)) / like.numel()
    assert torch.allclose(captured["x"].grad, want, atol=1e-6, rtol=1e-4)


def test_fake_score_step_is_fdistills_critic_step(gmm_teacher):
    fd, rcm = reverse_kl_pair(gmm_teacher)
    b = batch(gmm_teacher)
    want, got = fd.loss(b, 0), rcm.loss(b, 0)
    assert set(k for k in got if not k.startswith("log/")) == {"fake_score"}
    assert torch.equal(want["fake_score"], got["fake_score"])
    assert_same(grads(want["fake_score"], fd.param_groups()["fake_score"]),
                grads(got["fake_score"], rcm.param_groups()["fake_score"]))
    assert all(g is None for g in torch.autograd.grad(rcm.loss(b, 0)["fake_score"], rcm.param_groups()["student"],
                                                      allow_unused=True))


def test_both_terms_add_with_their_weights(gmm_teacher):
    rcm = seeded(RCM(student(), gmm_teacher, RCMConfig(scm_weight=0.7, dmd_weight=0.3)))
    out = rcm.loss(batch(gmm_teacher), GENERATOR_STEP)
    want = 0.7 * out["log/loss_scm"] + 0.3 * out["log/loss_dmd"]
    assert abs(float(out["log/loss"]) - float(want)) < 1e-6


def test_bad_rcm_options_are_config_errors(gmm_teacher):
    for cfg, match in [(RCMConfig(scm_weight=0.0, dmd_weight=0.0), "both 0"), (RCMConfig(dmd_weight=-1.0), "dmd"),
                       (RCMConfig(time_range=[0.5, 0.2]), "time_range"), (RCMConfig(critic_per_generator=0), "critic"),
                       (RCMConfig(fake_score_lr=0.0), "fake_score_lr")]:
        with pytest.raises(ConfigError, match=match):
            RCM.check_config(cfg, gmm_teacher)
    with pytest.raises(ConfigError, match="teacher"):
        RCM.check_config(RCMConfig(), None)


# --- plain LADD ---------------------------------------------------------------------------------------

def test_ladd_student_step_is_the_adversarial_term_alone(gmm_teacher):
    obj = seeded(LADD(student(), gmm_teacher, LADDConfig(adv_weight=0.8)))
    assert obj.scm.logvar is None and obj.active_groups(0) == ["student"] and obj.active_groups(1) == ["disc"]
    out = obj.loss(batch(gmm_teacher), 0)
    assert "log/loss_scm" not in out and set(k for k in out if not k.startswith("log/")) == {"student"}
    assert abs(float(out["log/loss"]) - 0.8 * float(out["log/loss_adv"])) < 1e-6
    groups = obj.param_groups()
    assert set(groups) == {"student", "disc"}
    g = torch.autograd.grad(out["student"], groups["student"] + groups["disc"], allow_unused=True)
    assert sum(float(x.abs().sum()) for x in g[:len(groups["student"])] if x is not None) > 0
    assert all(x is None for x in g[len(groups["student"]):])                       # heads frozen
    # the same adversarial term scm_ladd adds to its sCM loss (same pieces; the sCM draws come first there)
    both = seeded(SCMLADD(student(), gmm_teacher, SCMLADDConfig(scm_weight=0.0, adv_weight=0.8)))
    both.discriminator.load_state_dict(obj.discriminator.state_dict())
    both.scm.forward = lambda b, step: (torch.zeros(()), {})                         # skip sCM's draws
    assert torch.equal(both.loss(batch(gmm_teacher), 0)["student"],
                       seeded(obj).loss(batch(gmm_teacher), 0)["student"])


def test_ladd_discriminator_step_trains_only_the_heads(gmm_teacher):
    obj = seeded(LADD(student(), gmm_teacher, LADDConfig()))
    out = obj.loss(batch(gmm_teacher), 1)
    groups = obj.param_groups()
    g = torch.autograd.grad(out["disc"], groups["disc"] + groups["student"], allow_unused=True)
    assert sum(float(x.abs().sum()) for x in g[:len(groups["disc"])] if x is not None) > 0
    assert all(x is None for x in g[len(groups["disc"]):])


def test_ladd_refuses_scm_loss_options(gmm_teacher):
    for key, value in [("jvp", "finite_difference"), ("learn_logvar", True), ("tangent_warmup", 10)]:
        with pytest.raises(ConfigError, match=f"objective.{key}.*scm_ladd"):
            LADD.check_config(LADDConfig(**{key: value}), gmm_teacher)
    with pytest.raises(ConfigError, match="ladd needs a teacher"):
        LADD.check_config(LADDConfig(), None)


# --- the digits recipes train ---------------------------------------------------------------------

@pytest.mark.parametrize("recipe, groups", [("digits_rcm", {"fake_score", "student"}),
                                            ("digits_ladd", {"disc", "student"})])
def test_digits_recipe_trains_every_group(recipe, groups, tmp_path):
    from onestep.trainer import Trainer

    cfg = load_config(recipe, [f"output_dir={tmp_path}", "data.batch_size=4", "train.steps=2", "train.progress=false",
                               "train.sample_steps=[1]", "train.checkpoint_every=1000", "train.device=cpu"])
    trainer = Trainer(cfg)
    assert set(trainer.groups) == groups
    before = {n: p.detach().clone() for n, p in trainer.objective.named_parameters() if not n.startswith("teacher.")}
    trainer.fit()
    after = dict(trainer.objective.named_parameters())
    moved = {n.split(".")[0] for n, p in before.items() if not torch.equal(p, after[n])}
    assert {"student", "fake_score" if "fake_score" in groups else "discriminator"} <= moved
