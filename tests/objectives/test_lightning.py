"""Progressive adversarial distillation: trailing grids, stage targets, pure noise, schedule."""
import dataclasses
import json

import pytest
import torch
from onestep.objectives.lightning import Lightning, LightningConfig
from onestep.teachers.gmm import GMMTeacher

from onestep import paths
from onestep.paths import trailing_timesteps
from onestep.sampling import solve_ode
from onestep.student import AvgVelocityField, MLPAvgVelocity


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
    assert phases == (["mse"] * 3 + ["conditional"] * 2 + ["unconditional"] * 2 + ["conditional"] * 2
                      + ["unconditional"] * 2)
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

    capabilities = dataclasses.replace(GMMTeacher.capabilities, time="vp")   # declares its discrete VP schedule

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
    """8 -> 4 -> 2 -> 1 with MSE on the mixture, with the flow-time teacher (uniform grid) and a
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
        lightning(MLPAvgVelocity(2), gmm_teacher,
                  **{"teacher_steps": 8, "stages": [4, 2], "stage_iters": [1, 1], **bad})


# --- x0 ("sample") prediction in the 1-step stage of eps-prediction VP students -------------

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def tiny_vp_unet_student():
    """A float64 TeacherStudent of a tiny eps-prediction UNet2DModel on SD's schedule, its interval embedding
    random (so t - r changes the backbone's output)."""
    from diffusers import DDIMScheduler, UNet2DModel
    from onestep.teachers.unet import UNetTeacher

    from onestep.student import student_from_teacher

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, add_attention=False, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    teacher = UNetTeacher(unet, dict(DDIMScheduler(**SD_BETAS, clip_sample=False).config), "epsilon")
    student = student_from_teacher(teacher).double()
    with torch.no_grad():
        student.interval_embedding.linear_2.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return teacher, student


def test_sample_reading_takes_diffusers_ddim_steps_with_prediction_type_sample():
    """The student's step z_r = z_t - (t - r) u between trailing timesteps, with its backbone's output read as x0,
    is diffusers' own DDIM step with prediction_type="sample" on that output (float64)."""
    from diffusers import DDIMScheduler

    _, student = tiny_vp_unet_student()
    assert student.prediction_type == "epsilon"
    student.set_prediction_type("sample")
    assert student.prediction_type == "sample"
    ddim = {kind: DDIMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing="trailing", prediction_type=kind)
            for kind in ("sample", "epsilon")}
    for scheduler in ddim.values():
        scheduler.set_timesteps(4)   # 999, 749, 499, 249
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()   # its float32 values, float64 arithmetic
    abar = ddim["sample"].alphas_cumprod
    outputs = []
    student.backbone.conv_out.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))   # native VP sample
    for k, k_next in ((749, 499), (499, 249)):
        t, r = (student.adapter.time.schedule.flow_t(torch.full((2,), float(s), dtype=torch.float64))
                for s in (k, k_next))
        with torch.no_grad():
            z = paths.vp_to_flow_x(x, abar[k])
            z_next = z - paths.expand_like(t - r, z) * student(z, r, t)
        got = paths.flow_to_gaussian_x(z_next, *paths.vp_coefficients(abar[k_next]))
        want = ddim["sample"].step(outputs[-1], k, x).prev_sample
        assert (got - want).abs().max() < 1e-12, (k, float((got - want).abs().max()))
        # the same output read as eps is another step: the comparison can fail
        assert (got - ddim["epsilon"].step(outputs[-1], k, x).prev_sample).abs().max() > 1e-2


def test_sample_reading_one_step_returns_the_backbone_output():
    """At flow time 1 (pure noise, timestep 999) the one step of a student reading x0 is its backbone's output, and
    an error of that output passes through unchanged; read as eps it is (x - b eps^) / a, every error times b / a."""
    _, student = tiny_vp_unet_student()
    a, b = paths.vp_coefficients(student.adapter.time.schedule.alphas_cumprod[999])
    noise = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    delta = 1e-3 * torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    outputs, shift = [], [0.0]

    def shifted_output(module, args, out):   # the backbone's last layer, moved by `shift`, recorded
        outputs.append(out + shift[0])
        return outputs[-1]

    student.backbone.conv_out.register_forward_hook(shifted_output)
    gains = {}
    for kind in ("sample", "epsilon"):
        student.set_prediction_type(kind)
        shift[0] = 0.0
        one = student.sample(noise, steps=1)
        backbone = outputs[-1]
        shift[0] = delta
        gains[kind] = float(((student.sample(noise, steps=1) - one) * delta).sum() / delta.pow(2).sum())
        if kind == "sample":
            assert (one - backbone).abs().max() < 1e-12
        else:
            assert (one - (noise - b * backbone) / a).abs().max() < 1e-12
    assert abs(gains["sample"] - 1.0) < 1e-9
    assert abs(gains["epsilon"] + float(b / a)) < 1e-6 and float(b / a) > 14   # 14.6 on SD's schedule


class EpsMLP(torch.nn.Module):
    """An eps-prediction network on native VP coordinates and (fractional) timesteps, with diffusers' timestep
    embedding under the name TeacherStudent adds its interval embedding to."""

    def __init__(self, dim: int = 2, hidden: int = 64, frequencies: int = 32):
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__()
        self.time_proj = Timesteps(frequencies, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(frequencies, hidden)
        self.inp = torch.nn.Linear(dim, hidden)
        layers = []
        for _ in range(2):
            layers += [torch.nn.SiLU(), torch.nn.Linear(hidden, hidden)]
        self.body = torch.nn.Sequential(*layers, torch.nn.SiLU(), torch.nn.Linear(hidden, dim))

    def forward(self, x, k):
        return self.body(self.inp(x) + self.time_embedding(self.time_proj(k).to(x.dtype)))


class VPMixtureNet(VPMixtureTeacher):
    """The mixture's VP eps-prediction model computed by a network (a backbone students copy): what a student of
    an SD-style teacher is, in 2-D."""

    def __init__(self, mixture, net):
        super().__init__(mixture)
        self.net = net

    def backbone(self):
        return self.net

    def _velocity(self, x, t, cond):
        return self.time.velocity(self.net, x, t)


def fitted_eps_net(mixture, steps: int = 300):
    """EpsMLP regressed on the mixture's exact posterior eps at uniform integer timesteps."""
    torch.manual_seed(0)
    net = EpsMLP()
    schedule = VPMixtureTeacher(mixture).time.schedule
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x0 = mixture.sample(256, generator=g)[0]
        k = torch.randint(0, 1000, (256,), generator=g).float()
        a, b = paths.vp_coefficients(schedule.alpha_bar(k))
        x = paths.expand_like(a, x0) * x0 + paths.expand_like(b, x0) * torch.randn(x0.shape, generator=g)
        loss = (net(x, k) - mixture.posterior(x, a, b)[1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_one_step_stage_reading_x0_trains_better_than_reading_eps(gmm_teacher):
    """The teacher's 8 trailing Euler steps -> 1 student step (MSE), from pure noise, for a student of a VP eps
    network fitted to the mixture: the same 150 steps reading the backbone as x0 (auto) and as eps. Read as eps,
    Adam's first step moves the one-step output ~14.6 times as far and the loss jumps; read as x0 it does not, and
    the trained student lands closer to the stage's target (measured: 0.23 vs 0.43 mean distance; losses at most
    0.70 vs 12.3)."""
    from onestep.student import TeacherStudent

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # 2-D batches: one thread is fastest, and far faster on a busy machine
    try:
        mixture = gmm_teacher.mixture
        teacher = VPMixtureTeacher(mixture)
        net = fitted_eps_net(mixture)
        z = torch.randn(512, 2, generator=torch.Generator().manual_seed(3))
        results = {}
        for kind in ("auto", "epsilon"):
            student = TeacherStudent(VPMixtureNet(mixture, net))
            obj = lightning(student, teacher, teacher_steps=8, stages=[1], stage_iters=[150], mse_stages=1,
                            one_step_prediction=kind)
            target = obj.previous_jump(0, z, torch.tensor(0))       # the teacher's 8 trailing steps from t = 1
            opt = torch.optim.Adam(student.parameters(), lr=2e-3)
            g = torch.Generator().manual_seed(2)
            losses = []
            for step in range(obj.total_steps):
                loss = obj.loss({"x": mixture.sample(256, generator=g)[0]}, step)["student"]
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            one = student.sample(z, steps=1)
            results[kind] = (student.prediction_type, float((one - target).norm(dim=1).mean()), max(losses))
    finally:
        torch.set_num_threads(threads)
    (kind_x0, err_x0, worst_x0), (kind_eps, err_eps, worst_eps) = results["auto"], results["epsilon"]
    print(f"\n1-step error to the stage target: x0 {err_x0:.3f}, eps {err_eps:.3f}; "
          f"largest loss: x0 {worst_x0:.3f}, eps {worst_eps:.3f}")
    assert (kind_x0, kind_eps) == ("sample", "epsilon")
    assert all(map(torch.isfinite, map(torch.tensor, (err_x0, err_eps, worst_x0, worst_eps))))
    assert err_x0 < 0.75 * err_eps
    assert worst_eps > 5 * worst_x0


def test_velocity_students_and_flow_teachers_keep_their_reading(gmm_teacher):
    """MLP students (and every non-VP student) predict a velocity: auto changes nothing, and asking for a
    reading is a config error."""
    from onestep.config import ConfigError

    obj = lightning(MLPAvgVelocity(2), VPMixtureTeacher(gmm_teacher.mixture), teacher_steps=4, stages=[2, 1],
                    stage_iters=[1, 1], mse_stages=2)
    assert obj.base_prediction is None
    obj.loss({"x": gmm_teacher.mixture.sample(8, generator=torch.Generator().manual_seed(0))[0]}, 1)
    with pytest.raises(ConfigError, match="one_step_prediction=sample needs a student built from a discrete VP"):
        lightning(MLPAvgVelocity(2), gmm_teacher, teacher_steps=4, stages=[2, 1], stage_iters=[1, 1],
                  one_step_prediction="sample")
    with pytest.raises(ConfigError, match="one_step_prediction must be one of"):
        lightning(MLPAvgVelocity(2), gmm_teacher, teacher_steps=4, stages=[2, 1], stage_iters=[1, 1],
                  one_step_prediction="x0")


def test_resume_and_rebuilt_students_in_the_one_step_stage_read_x0(tmp_path):
    """A run of a tiny pixel DDPM (eps) with stages [2, 1] x 2 steps: a checkpoint whose last trained step was in the
    1-step stage reads x0 when the trainer resumes from it (before any loss runs) and when export / evaluation
    rebuild its student; the checkpoint at the stage boundary (trained only in the 2-step stage) reads eps."""
    from onestep.teachers.tiny import save_tiny_teacher

    from onestep.config import load_config
    from onestep.runs import load_run, load_student
    from onestep.trainer import Trainer

    teacher_opts = save_tiny_teacher("unet", {}, tmp_path / "teacher")
    overrides = [f"output_dir={tmp_path}", "name=run", "teacher.name=unet", f"teacher.path={teacher_opts['path']}",
                 "teacher.subfolder=unet", "teacher.scheduler_subfolder=scheduler", "student.init=teacher",
                 "objective.name=lightning", "objective.teacher_steps=4", "objective.stages=[2,1]",
                 "objective.stage_iters=[2,2]", "objective.mse_stages=2", "data.name=teacher_samples",
                 "data.teacher_steps=2", "data.batch_size=2", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                 "train.progress=false", "train.sample_steps=[1]"]
    trainer = Trainer(load_config(None, overrides + ["train.steps=3"])).fit()
    assert trainer.student.prediction_type == "sample"          # step 2 was the 1-step stage's first
    resumed = Trainer(load_config(None, overrides + ["train.steps=4"]))
    assert resumed.student.prediction_type == "epsilon"         # a new student starts in the 2-step stage
    assert resumed.maybe_resume() and resumed.step == 3
    assert resumed.student.prediction_type == "sample"
    ema = resumed.ema_student()
    run = tmp_path / "run"
    rebuilt = {n: load_student(load_run(run, f"step-{n}"))[0] for n in (1, 2, 3)}
    assert {n: s.prediction_type for n, s in rebuilt.items()} == {1: "epsilon", 2: "epsilon", 3: "sample"}
    noise = torch.randn(2, *resumed.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    want = ema.sample(noise, steps=1)
    assert (rebuilt[3].sample(noise, steps=1) - want).abs().max() < 1e-6
    rebuilt[3].set_prediction_type("epsilon")                   # the same weights read as eps: another sample
    assert (rebuilt[3].sample(noise, steps=1) - want).abs().max() > 1e-2
    resumed.fit(resume=False)
    assert resumed.step == 4 and resumed.student.prediction_type == "sample"


def test_export_of_a_one_step_stage_sd_student_is_ddim_sample_in_stock_diffusers(tmp_path):
    """An SD1.x-style student (tiny pipeline, eps teacher) in the 1-step stage exports with a DDIM scheduler that
    says prediction_type "sample"; stock diffusers, in a process where `import onestep` fails, reproduces
    onestep's 1-step sample. The boundary checkpoint (2-step stage) keeps the teacher's "epsilon"."""
    import copy
    import json

    from safetensors.torch import load_file, save_file
    from test_export_families import PROMPT, _perturb_full, _randomise, _sd, isolated
    from tiny_models import clip_tokenizer

    from onestep.build import build_student, build_teacher
    from onestep.checkpoint import write_checksums
    from onestep.config import load_config, to_yaml
    from onestep.export import export_run
    from onestep.runs import load_run, load_student

    pipe = _sd(clip_tokenizer(tmp_path / "vocab"))
    _randomise(pipe.unet, seed=1)
    pipe.save_pretrained(tmp_path / "teacher")
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=sd", "teacher.name=stable_diffusion",
                             f"teacher.path={tmp_path / 'teacher'}", "objective.name=lightning",
                             "objective.teacher_steps=4",
                             "objective.stages=[2,1]", "objective.stage_iters=[2,2]", "objective.mse_stages=2"])
    run = tmp_path / "sd"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    student = build_student(cfg, build_teacher(cfg))
    _perturb_full(student, seed=7)
    params = {k: v.detach().contiguous() for k, v in student.named_parameters()}
    for step in (2, 3):   # the same weights at the stage boundary and one step into the 1-step stage
        ckpt = run / "checkpoints" / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        save_file(params, ckpt / "ema.safetensors")
        save_file({f"student.{k}": v for k, v in params.items()}, ckpt / "trainable.safetensors")
        write_checksums(ckpt)
    folders = {step: export_run(run, tmp_path / f"step{step}", steps=1, checkpoint=f"step-{step}") for step in (2, 3)}
    scheduler = {step: json.loads((d / "scheduler" / "scheduler_config.json").read_text())
                 for step, d in folders.items()}
    assert scheduler[3]["_class_name"] == "DDIMScheduler" and scheduler[3]["prediction_type"] == "sample"
    assert scheduler[2]["prediction_type"] == "epsilon"
    assert 'prediction_type="sample"' in (folders[3] / "README.md").read_text()
    rebuilt, teacher = load_student(load_run(run, "step-3"))
    noise = torch.randn(1, *teacher.sample_shape, generator=torch.Generator().manual_seed(5))
    cond = rebuilt.adapter.encode_prompt([PROMPT])
    want = rebuilt.sample(noise, cond, steps=1)
    save_file({"noise": noise}, tmp_path / "noise.safetensors")
    isolated(f"""
noise = load_file("noise.safetensors")["noise"]
pipe = DiffusionPipeline.from_pretrained({str(folders[3])!r})
assert pipe.scheduler.config.prediction_type == "sample"
save_file({{"latents": run(pipe, "stable_diffusion", noise,
                          dict(guidance_scale=1.0, num_inference_steps=1)).contiguous()}},
          "latents.safetensors")
""", tmp_path)
    got = load_file(tmp_path / "latents.safetensors")["latents"]
    diff = (got - want).abs().max().item()
    print(f"\nstock StableDiffusionPipeline (DDIM, sample) vs onestep's 1-step sample: {diff:.2e}")
    assert got.shape == want.shape and diff < 1e-4
    as_eps = copy.deepcopy(rebuilt)
    as_eps.set_prediction_type("epsilon")   # what an export with the teacher's scheduler would have been
    assert (got - as_eps.sample(noise, cond, steps=1)).abs().max().item() > 1e-2


# --- the student carries the grid it trains on ---------------------------------------------------------------

LIGHTNING_RUN = ("objective.name=lightning", "objective.teacher_steps=8", "objective.stages=[4,2,1]",
                 "objective.stage_iters=[1,1,1]", "objective.mse_stages=3")


def test_vp_students_sample_the_trailing_grid_they_train_on(tmp_path):
    """A tiny pixel DDPM's lightning student: `student.sample(noise, steps=k)` (what eval, export and the
    benchmarks call) is sampling on `objective.grid(k)`, the trailing grid, not the uniform one; for the
    student the trainer builds and for one rebuilt from a checkpoint (`load_student`, as export / eval do).
    Export at k = 1 (grid [1, 0]): stock DDPMPipeline + 1-step trailing DDIM reproduces the rebuilt student;
    k >= 2 is refused (t - r differs per step, so the interval embedding cannot be folded)."""
    from diffusers import DiffusionPipeline
    from test_export_families import _pixel_teacher_dir, make_run

    from onestep.build import build_objective, build_student
    from onestep.export import ExportError, export_run
    from onestep.runs import load_run, load_student
    from onestep.sampling import time_grid

    run = make_run(tmp_path, "unet", _pixel_teacher_dir(tmp_path / "teacher"), extra=LIGHTNING_RUN)
    info = load_run(run)
    rebuilt, teacher = load_student(info)                 # the checkpoint's (perturbed) weights
    obj = build_objective(info.cfg, build_student(info.cfg, teacher), teacher)   # as the trainer builds them
    assert obj.grid_kind == "trailing"
    # what evaluation records as the student's sampler (onestep.demo.evaluate_digits' protocol)
    assert rebuilt.sampler_description().endswith("the teacher's trailing VP grid")
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for k in (2, 4):
        grid = obj.grid(k)
        assert torch.equal(rebuilt.default_times(k), grid) and torch.equal(obj.student.default_times(k), grid)
        for name, student in (("trained", obj.student), ("rebuilt", rebuilt)):
            got = student.sample(noise, steps=k)
            assert torch.equal(got, student.sample(noise, steps=k, times=grid))
            uniform = (got - student.sample(noise, steps=k, times=time_grid(k, dtype=torch.float64))).abs().max().item()
            print(f"\n{name} student, {k} steps: max |default - uniform grid| {uniform:.3f}")
            assert uniform > 1e-2
        assert torch.equal(obj.sample(noise, steps=k), obj.student.sample(noise, steps=k))
    # this hand-made checkpoint has no sampler.json (as before it existed): load_student asked the objective,
    # which gives the trained student's spec; the export's manifest records it
    from onestep.sampling import SamplerSpec

    spec = obj.student.sampler_spec()
    assert rebuilt.sampler_spec() == spec and spec.grid == "trailing"
    out = export_run(run, tmp_path / "k1", steps=1)      # its self-check compares with rebuilt.sample(steps=1)
    assert SamplerSpec.from_dict(json.loads((out / "onestep_export.json").read_text())["sampler"]) == spec
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "trailing"
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(4), output_type="pt").images
    want = (rebuilt.sample(noise, steps=1, times=obj.grid(1)) / 2 + 0.5).clamp(0, 1)
    diff = (got - want).abs().max().item()
    print(f"stock DDPMPipeline (1-step trailing DDIM) vs the rebuilt student on obj.grid(1): {diff:.2e}")
    assert diff < 1e-4
    for k in (2, 4):
        for format in ("onestep", "diffusers"):   # neither format's advice may point to the other
            with pytest.raises(ExportError, match="trailing timestep grid"):
                export_run(run, tmp_path / f"k{k}", format=format, steps=k)


def test_flow_time_teachers_keep_the_uniform_grid(gmm_teacher):
    torch.manual_seed(0)
    obj = lightning(MLPAvgVelocity(2), gmm_teacher, teacher_steps=8, stages=[4, 2, 1], stage_iters=[1, 1, 1],
                    mse_stages=3)
    assert obj.grid_kind == "uniform" and obj.student.trailing_schedule is None
    assert obj.student.sampler_description() == "z_r = z_t - (t - r) u(z_t, r, t), uniform grid"
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    for k in (2, 4):
        assert torch.equal(obj.grid(k), torch.linspace(1.0, 0.0, k + 1, dtype=torch.float64))
        assert torch.equal(obj.student.sample(noise, steps=k), obj.student.sample(noise, steps=k, times=obj.grid(k)))
