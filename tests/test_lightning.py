"""Progressive adversarial distillation (spec §8(h)): trailing grids, stage targets, pure noise, schedule."""
import pytest
import torch

from onestep import paths
from onestep.objectives.lightning import Lightning, LightningConfig, trailing_timesteps
from onestep.sampling import solve_ode
from onestep.student import AvgVelocityField, MLPAvgVelocity
from onestep.teachers.gmm import GMMTeacher


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 32, 128])
def test_trailing_timesteps_equal_diffusers(steps):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(timestep_spacing="trailing")
    sched.set_timesteps(steps)
    assert trailing_timesteps(steps) == sched.timesteps.tolist()


class EulerMapStudent(AvgVelocityField):
    """u(z, r, t) = (z - Euler_{t -> r}(z)) / (t - r): the teacher's Euler map on a uniform `fine`-step grid,
    i.e. a 'perfect' student of every stage built on that grid."""

    def __init__(self, teacher, fine: int):
        super().__init__()
        self.teacher, self.fine = teacher, fine
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, r, t, cond=None):
        out = torch.empty_like(z)
        for i in range(z.shape[0]):
            a, b = float(t[i]), float(r[i])
            k = round((a - b) * self.fine)
            grid = torch.linspace(a, b, k + 1, dtype=torch.float64)
            out[i] = (z[i] - solve_ode(lambda x, s: self.teacher.velocity(x, s), z[i:i + 1], times=grid)[0]) / (a - b)
        return out + 0 * self.dummy


def lightning(student, teacher, **cfg):
    obj = Lightning(student, teacher, LightningConfig(**cfg))
    obj.generator = torch.Generator().manual_seed(0)
    return obj


def stage_mse(obj, teacher, step, n=24):
    x = teacher.mixture.sample(n, generator=torch.Generator().manual_seed(step), dtype=torch.float64)[0]
    return float(obj.loss({"x": x}, step)["log/mse"])


def test_student_equal_to_the_previous_models_n_step_map_has_zero_mse(gmm_teacher):
    cfg = dict(teacher_steps=16, stages=[4, 2, 1], stage_iters=[1, 1, 1], mse_stages=3)
    obj = lightning(EulerMapStudent(gmm_teacher, 16).double(), gmm_teacher, **cfg)
    for step in range(3):                   # stage 0: the teacher's 4 Euler steps; stages 1, 2: the previous model
        assert stage_mse(obj, gmm_teacher, step) < 1e-24
    # a student on another grid is not the teacher's 16-step map: the MSE sees it
    wrong = lightning(EulerMapStudent(gmm_teacher, 4).double(), gmm_teacher, **cfg)
    assert stage_mse(wrong, gmm_teacher, 0) > 1e-6


def test_first_timestep_input_is_pure_noise(gmm_teacher):
    """At t = 1 the student sees eps alone: the same objective draws with different data give the same inputs."""
    seen = []

    class Spy(MLPAvgVelocity):
        def forward(self, z, r, t, cond=None):
            seen.append((z.detach().clone(), t.detach().clone()))
            return super().forward(z, r, t, cond)

    torch.manual_seed(0)
    student = Spy(2)
    inputs = []
    for data_seed in (1, 2):
        obj = lightning(student, gmm_teacher, teacher_steps=8, stages=[2, 1], stage_iters=[1, 1], mse_stages=2)
        seen.clear()
        x = gmm_teacher.mixture.sample(64, generator=torch.Generator().manual_seed(data_seed))[0]
        obj.loss({"x": x}, 0)
        z, t = seen[-1]
        assert (t == 1).any() and (t < 1).any()
        inputs.append((z[t == 1], z[t < 1]))
    assert torch.equal(inputs[0][0], inputs[1][0])            # pure noise: independent of the data
    assert not torch.equal(inputs[0][1], inputs[1][1])        # the noised data elsewhere


def test_vp_teacher_grid_is_trailing_with_pure_noise_on_top(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    from onestep.teachers.unet import UNetTeacher

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path)
    teacher = UNetTeacher.from_pretrained(str(tmp_path)).freeze()
    from onestep.student import student_from_teacher

    obj = lightning(student_from_teacher(teacher), teacher, teacher_steps=8, stages=[4], stage_iters=[1], mse_stages=1)
    assert obj.grid_kind == "trailing"
    abar = sched.alphas_cumprod.double()
    want = [1.0] + [float(paths.vp_alpha_bar_to_flow_t(abar[k])) for k in (749, 499, 249)] + [0.0]
    assert torch.allclose(obj.grid(4), torch.tensor(want, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 8, 8)
    assert torch.isfinite(obj.loss({"x": x}, 0)["student"])


def test_stage_schedule_and_previous_model(gmm_teacher):
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=16)
    obj = lightning(student, gmm_teacher, teacher_steps=8, stages=[4, 2, 1], stage_iters=[3, 4, 4], mse_stages=1,
                    conditional_share=0.5)
    phases = [obj.phase(s) for s in range(11)]
    assert phases == ["mse"] * 3 + ["conditional"] * 2 + ["unconditional"] * 2 + ["conditional"] * 2 + ["unconditional"] * 2
    assert [obj.active_groups(s) for s in range(3, 7)] == [["student"], ["disc"], ["student"], ["disc"]]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = gmm_teacher.mixture.sample(16, generator=torch.Generator().manual_seed(0))[0]
    for step in range(5):
        if step == 3:   # stage 1 starts at step 3: the previous model is the student as it was then
            snapshot = {k: v.clone() for k, v in student.state_dict().items()}
        out = obj.loss({"x": x}, step)
        if "student" in out:
            opt.zero_grad()
            out["student"].backward(inputs=list(student.parameters()))
            opt.step()
    for k, v in obj.previous.state_dict().items():
        assert torch.equal(v, snapshot[k])
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in snapshot.items())   # the student moved on
    assert any(k.startswith("previous.") for k in obj.trainable_state_dict())              # checkpointed


def test_adversarial_steps_train_only_their_player(gmm_teacher):
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=16)
    obj = lightning(student, gmm_teacher, teacher_steps=4, stages=[2, 1], stage_iters=[1, 4], mse_stages=1)
    x = gmm_teacher.mixture.sample(16, generator=torch.Generator().manual_seed(1))[0]
    groups = obj.param_groups()
    for step, player in ((1, "student"), (2, "disc"), (3, "student")):   # conditional G, conditional D, unconditional G
        out = obj.loss({"x": x}, step)
        assert list(k for k in out if not k.startswith("log/")) == [player]
        other = "disc" if player == "student" else "student"
        grads = torch.autograd.grad(out[player], groups[player] + groups[other], allow_unused=True)
        own, rest = grads[:len(groups[player])], grads[len(groups[player]):]
        assert any(g is not None and g.abs().sum() > 0 for g in own)
        assert all(g is None or g.abs().sum() == 0 for g in rest)


class VPMixtureTeacher(GMMTeacher):
    """The mixture seen as a discrete VP eps-prediction model (SD's scaled-linear 1000-step schedule): the
    exact posterior eps at integer timesteps, turned into flow time by the VP adapters' own DiscreteVPModelTime
    (log-SNR interpolation between steps; above the top step, pure noise and the x0 prediction)."""

    def __init__(self, mixture):
        from onestep.teachers.vp import DiscreteVPModelTime

        super().__init__(mixture)
        self.time = DiscreteVPModelTime({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                         "num_train_timesteps": 1000}, "epsilon")

    def _velocity(self, x, t, cond):
        def predict(x_native, k):
            a, b = paths.vp_coefficients(self.time.schedule.alpha_bar(k))
            return self.mixture.posterior(x_native, a.to(x.dtype), b.to(x.dtype), cond)[1]
        return self.time.velocity(predict, x, t)


@pytest.mark.parametrize("family", ["flow", pytest.param("vp", marks=pytest.mark.slow)])   # vp: ~35 s
def test_progressive_mse_approaches_the_flow_map(gmm_teacher, family):
    """Spec §8(h)(4): 8 -> 4 -> 2 -> 1 with MSE on the mixture, with the flow-time teacher (uniform grid) and a
    VP teacher (trailing timesteps, pure noise at the top); the one-step student lands far closer to the exact
    flow map Phi_{1 -> 0} than one Euler step of the exact velocity (the student at initialisation)."""
    exact_teacher = gmm_teacher
    if family == "vp":
        gmm_teacher = VPMixtureTeacher(exact_teacher.mixture)
    torch.manual_seed(0)
    student = MLPAvgVelocity(2, hidden=64, time_scale=1.0, interval_scale=1.0)
    obj = lightning(student, gmm_teacher, teacher_steps=32, stages=[8, 4, 2, 1], stage_iters=[150] * 4, mse_stages=4)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(2)
    for step in range(obj.total_steps):
        loss = obj.loss({"x": gmm_teacher.mixture.sample(128, generator=g)[0]}, step)["student"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert obj.grid_kind == ("trailing" if family == "vp" else "uniform")
    exact = exact_teacher.flow_map(z, torch.ones(256, dtype=torch.float64), torch.zeros(256, dtype=torch.float64))
    euler = z - exact_teacher.velocity(z, 1.0)
    with torch.no_grad():
        one = student.double().sample(z, steps=1)
    err, err_euler = (one - exact).norm(dim=1).mean(), (euler - exact).norm(dim=1).mean()
    assert err < 0.35 * err_euler, (float(err), float(err_euler))


@pytest.mark.parametrize("bad", [{"stages": [4, 3]}, {"stages": [8, 4], "stage_iters": [1]}, {"teacher_steps": 6},
                                 {"grid": "leading"}, {"mse_stages": 5}, {"conditional_share": 2.0}])
def test_bad_schedules_are_config_errors(gmm_teacher, bad):
    from onestep.config import ConfigError

    with pytest.raises(ConfigError):
        lightning(MLPAvgVelocity(2), gmm_teacher, **{"teacher_steps": 8, "stages": [4, 2], "stage_iters": [1, 1], **bad})
