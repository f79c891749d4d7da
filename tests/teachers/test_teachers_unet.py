"""Pixel DDPM UNet teacher (CIFAR-10 style, class-conditional ImageNet-64 style): tiny UNet2DModels
saved in DDPMPipeline layout and loaded back through `from_pretrained`; the adapter's Euler steps in
flow time equal diffusers' DDIMScheduler (eps, v and sample prediction), its sampler equals the stock
DDIMPipeline, CFG with a null class equals the usual formula; one-line errors."""
from __future__ import annotations

import pytest
import torch
from onestep.teachers.loading import TeacherFilesMissingError, TeacherWeightsError
from onestep.teachers.unet import UNetTeacher

from onestep import paths

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _unet(num_class_embeds=None, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def _ddim(prediction_type, **kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="linear", clip_sample=False, prediction_type=prediction_type, **kw)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from diffusers import DDPMPipeline

    root = tmp_path_factory.mktemp("unet")
    out = {}
    for pt in PREDICTIONS:
        DDPMPipeline(unet=_unet(), scheduler=_ddim(pt)).save_pretrained(root / pt)
        out[pt] = root / pt
    DDPMPipeline(unet=_unet(num_class_embeds=11, seed=1), scheduler=_ddim("epsilon")).save_pretrained(root / "cond")
    out["cond"] = root / "cond"
    return out


def _ddim_reference(unet, sched, x, steps, labels=None):
    sched.set_timesteps(steps)
    for k in sched.timesteps:
        x = sched.step(unet(x, k, class_labels=labels).sample, k, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_euler_equals_ddim_float64(dirs, prediction_type):
    teacher = UNetTeacher.from_pretrained(str(dirs[prediction_type]), dtype="float64")
    sched = _ddim(prediction_type)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _ddim_reference(teacher.unet, sched, x.clone(), 10)
    out = teacher.sample(x, steps=10, grid="scheduler")
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"\nunet {prediction_type} float64 10 DDIM steps: max relative difference {err:.2e}")
    assert err < 1e-10


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_sampler_equals_stock_ddim_pipeline_float32(dirs, prediction_type):
    """teacher.sample(grid="scheduler") == stock DDIMPipeline (eta 0) from the same noise, float32."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    teacher = UNetTeacher.from_pretrained(str(dirs[prediction_type]))
    stock = DDPMPipeline.from_pretrained(str(dirs[prediction_type]))
    pipe = DDIMPipeline(unet=stock.unet, scheduler=DDIMScheduler.from_config(stock.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10, eta=0.0,
                  output_type="np").images  # the pipeline draws torch.randn with this generator
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = teacher.sample(x, steps=10, grid="scheduler")
    mine = (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # the pipeline's postprocessing
    err = abs(mine - images).max()
    print(f"\nunet {prediction_type} float32 10 steps vs DDIMPipeline images: max difference {err:.2e}")
    assert err < 1e-5


def test_class_conditional_with_null_class_and_cfg(dirs):
    teacher = UNetTeacher.from_pretrained(str(dirs["cond"]), dtype="float64", null_class=10)
    assert teacher.num_classes == 10
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    labels = torch.tensor([0, 4, 9])
    w = 3.0
    k = teacher.time.schedule.timestep(t)
    a, b = paths.vp_coefficients(teacher.time.schedule.alpha_bar(k))
    xn = paths.flow_to_gaussian_x(x, a, b)
    e_c = teacher.unet(xn, k, class_labels=labels).sample
    e_u = teacher.unet(xn, k, class_labels=torch.full_like(labels, 10)).sample
    expected = paths.prediction_to_velocity(e_u + w * (e_c - e_u), "epsilon", xn, a, b)
    torch.testing.assert_close(teacher.velocity(x, t, labels, guidance=w), expected, rtol=1e-10, atol=1e-10)
    # label -1 is the null class; without a null class guidance is refused in one line
    torch.testing.assert_close(teacher.velocity(x, t, torch.full_like(labels, -1)),
                               teacher.velocity(x, t, torch.full_like(labels, 10)))
    plain = UNetTeacher.from_pretrained(str(dirs["cond"]), dtype="float64")
    assert plain.num_classes == 11
    with pytest.raises(ValueError, match="null_class"):
        plain.velocity(x, t, labels, guidance=2.0)


def test_features_and_time_outside_schedule(dirs):
    teacher = UNetTeacher.from_pretrained(str(dirs["v_prediction"]), dtype="float64")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    feats = teacher.features(x, torch.tensor([0.3, 0.99], dtype=torch.float64))
    assert len(feats) == 3 and teacher.default_feature_layers == ("down_blocks.0", "down_blocks.1", "mid_block")
    sum(f.sum() for f in feats).backward()
    assert torch.isfinite(x.grad).all()
    assert all(not m._forward_hooks for m in teacher.unet.modules())
    out = teacher.sample(torch.randn(2, 3, 8, 8, dtype=torch.float64), steps=3)  # uniform grid from t = 1
    assert torch.isfinite(out).all()


def test_errors_are_one_line(dirs, tmp_path, monkeypatch):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(dirs["epsilon"], broken)
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(TeacherFilesMissingError) as err:
        UNetTeacher.from_pretrained(str(broken))
    assert "\n" not in str(err.value) and "scheduler_config.json" in str(err.value) and "teacher.path" in str(err.value)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises((TeacherWeightsError, TeacherFilesMissingError)) as err:
        UNetTeacher.from_pretrained(str(broken), scheduler_subfolder=None)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TeacherFilesMissingError) as err:
        UNetTeacher.from_pretrained("google/ddpm-cifar10-32")
    msg = str(err.value)
    assert "\n" not in msg and "google/ddpm-cifar10-32" in msg and "teacher.path" in msg and "HF_HUB_OFFLINE" in msg
    print("\n" + msg)


def test_registered_and_built_from_a_config(dirs):
    """teacher.name=unet in a run config builds the adapter through from_config (the real loading path)."""
    from onestep.build import build_teacher
    from onestep.config import ConfigError, load_config
    from onestep.registry import TEACHERS, load_builtin

    load_builtin()
    assert {"unet", "edm", "stable_diffusion", "sdxl", "sd3", "flux", "sana"} <= set(TEACHERS.names())
    cfg = load_config("demo", ["teacher.name=unet", f"teacher.path={dirs['cond']}", "teacher.null_class=10",
                               "teacher.dtype=float64"])
    teacher = build_teacher(cfg)
    assert isinstance(teacher, UNetTeacher) and teacher.num_classes == 10
    assert next(teacher.unet.parameters()).dtype == torch.float64
    with pytest.raises(ConfigError, match="teacher.dtype='half' is not allowed"):
        load_config("demo", ["teacher.name=unet", "teacher.dtype=half"])
