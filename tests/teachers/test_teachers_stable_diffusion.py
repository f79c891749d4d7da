"""SD1.x/2.x and SDXL adapters on tiny pipelines saved to temp folders and loaded back through
`from_pretrained`: flow-time Euler == diffusers' DDIMScheduler steps (eps and v), CFG == the pipeline's,
the whole sampler == the stock pipeline (output_type="latent"), VAE round trip, one-line errors."""
from __future__ import annotations

import pytest
import torch
from onestep.teachers.latent import PromptCondition
from onestep.teachers.loading import TeacherFilesMissingError
from onestep.teachers.stable_diffusion import SDXLTeacher, StableDiffusionTeacher
from tiny_models import clip_text_encoder, clip_tokenizer, tiny_sd_unet, tiny_vae

from onestep import paths

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
PROMPTS = ["a cat", "the dog"]


def _ddim(prediction_type, **kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type, **kw)


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """{prediction_type: folder} of tiny SD pipelines (DDIM scheduler config)."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd")
    tok = clip_tokenizer(root / "vocab")
    dirs = {}
    for pt in ("epsilon", "v_prediction"):
        pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok,
                                       unet=tiny_sd_unet(), scheduler=_ddim(pt), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(root / pt)
        dirs[pt] = root / pt
    return dirs


@pytest.fixture(scope="module")
def sd64(sd_dirs):
    return {pt: StableDiffusionTeacher.from_pretrained(str(d), dtype="float64") for pt, d in sd_dirs.items()}


def _stock_pipeline(cls, folder, dtype):
    pipe = cls.from_pretrained(str(folder), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_steps_equal_ddim_steps_float64(sd64, prediction_type):
    """Adapter's flow velocity, Euler in flow time at DDIM's timesteps == DDIMScheduler.step (float64)."""
    teacher = sd64[prediction_type]
    cond = teacher.encode_prompt(PROMPTS)
    ddim = _ddim(prediction_type)
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    ddim.final_alpha_cumprod = torch.as_tensor(ddim.final_alpha_cumprod).double()
    ddim.set_timesteps(8)
    schedule = teacher.time.schedule
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, worst = x.clone(), 0.0
    for i, k in enumerate(ddim.timesteps):
        eps = teacher.denoiser(ref, k, encoder_hidden_states=cond.prompt_embeds).sample
        ref = ddim.step(eps, k, ref).prev_sample
        t = schedule.flow_t(k.double())
        t_next = schedule.flow_t(ddim.timesteps[i + 1].double()) if i + 1 < len(ddim.timesteps) else \
            paths.vp_alpha_bar_to_flow_t(ddim.final_alpha_cumprod)
        x_flow = paths.vp_to_flow_x(x, schedule.alpha_bar(k.double()))
        x_flow = x_flow + (t_next - t) * teacher.velocity(x_flow, t, cond)
        x = paths.flow_to_vp_x(x_flow, t_next)
        worst = max(worst, ((x - ref).abs().max() / ref.abs().max()).item())
    print(f"\nSD {prediction_type} float64: max relative difference from DDIMScheduler over 8 steps {worst:.2e}")
    assert worst < 1e-10


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampler_equals_stock_pipeline_with_cfg(sd_dirs, prediction_type):
    """teacher.sample(grid="scheduler") == StableDiffusionPipeline(latents=..., guidance_scale=w), float32."""
    from diffusers import StableDiffusionPipeline

    teacher = StableDiffusionTeacher.from_pretrained(str(sd_dirs[prediction_type]))
    pipe = _stock_pipeline(StableDiffusionPipeline, sd_dirs[prediction_type], torch.float32)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=6, guidance_scale=4.0,
               output_type="latent").images
    out = teacher.sample(latents, teacher.encode_prompt(PROMPTS), steps=6, guidance=4.0, grid="scheduler")
    diff = (out - ref).abs().max().item()
    print(f"\nSD {prediction_type} float32 6 DDIM steps, CFG 4: max |adapter - pipeline| {diff:.2e} "
          f"(max |latent| {ref.abs().max():.2f})")
    assert diff < 1e-4


def test_cfg_is_pipeline_formula_and_null_is_empty_prompt(sd64):
    teacher = sd64["epsilon"]
    cond = teacher.encode_prompt(PROMPTS)
    null = teacher.null_condition(2)
    torch.testing.assert_close(null.prompt_embeds, teacher.pipeline.encode_prompt(["", ""], "cpu", 1, False)[0])
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    w = 5.0
    k = teacher.time.schedule.timestep(t)
    a, b = paths.vp_coefficients(teacher.time.schedule.alpha_bar(k))
    x_native = paths.flow_to_gaussian_x(x, a, b)
    e_c = teacher.denoiser(x_native, k, encoder_hidden_states=cond.prompt_embeds).sample
    e_u = teacher.denoiser(x_native, k, encoder_hidden_states=null.prompt_embeds).sample
    eps = e_u + w * (e_c - e_u)  # the pipeline's guidance formula, in its own (eps) space
    expected = paths.prediction_to_velocity(eps, "epsilon", x_native, a, b)
    torch.testing.assert_close(teacher.velocity(x, t, cond, guidance=w), expected, rtol=1e-10, atol=1e-10)
    # one prompt for the whole batch is broadcast (also under CFG)
    one = teacher.encode_prompt(["a cat"])
    torch.testing.assert_close(teacher.velocity(x, t, one, guidance=w),
                               teacher.velocity(x, t, one.expand(2), guidance=w))
    # cond=None is the unconditional (empty prompt) velocity
    torch.testing.assert_close(teacher.velocity(x, t), teacher.velocity(x, t, null), rtol=0, atol=0)


def test_velocity_outside_the_schedule_is_regular(sd64):
    """Above t_max (noisier than step 999) and below t_min the velocity stays finite up to t = 1 / 0."""
    teacher = sd64["v_prediction"]
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    s = teacher.time.schedule
    for t in (1.0, (1 + s.t_max) / 2, s.t_min / 2, 1e-6):
        assert torch.isfinite(teacher.velocity(x, t)).all()
    # continuous across t_max
    v_in, v_out = teacher.velocity(x, s.t_max - 1e-9), teacher.velocity(x, s.t_max + 1e-9)
    assert (v_in - v_out).abs().max() < 1e-5


def test_vae_round_trip_matches_the_vae(sd64):
    teacher = sd64["epsilon"]
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    z = teacher.encode(images)
    vae = teacher.vae
    sf = vae.config.scaling_factor
    torch.testing.assert_close(z, vae.encode(images).latent_dist.mode() * sf)
    torch.testing.assert_close(teacher.decode(z), vae.decode(z / sf).sample)
    assert z.shape == (2, *teacher.sample_shape)


def test_features_hooks_removed(sd64):
    teacher = sd64["epsilon"]
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    feats = teacher.features(x, 0.5, teacher.encode_prompt(PROMPTS))
    assert [f.shape[0] for f in feats] == [2] * len(teacher.default_feature_layers)
    assert teacher.default_feature_layers == ("down_blocks.0", "down_blocks.1", "mid_block")
    feats[-1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not m._forward_hooks for m in teacher.denoiser.modules())


def test_prompt_condition_batch_ops(sd64):
    teacher = sd64["epsilon"]
    cond = teacher.encode_prompt(PROMPTS)
    both = PromptCondition.cat([cond, teacher.null_condition(2)])
    assert len(both) == 4 and len(cond[0]) == 1 and len(cond.repeat(3)) == 6
    mixed = cond.select(torch.tensor([True, False]), teacher.null_condition(2))
    torch.testing.assert_close(mixed.prompt_embeds[1], teacher.null_condition(1).prompt_embeds[0])


# ------------------------------------------------------------------------------------------------
# SDXL


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("sdxl")
    tok = clip_tokenizer(root / "vocab")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1),
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=12, seed=2), tokenizer=tok, tokenizer_2=tok,
        unet=tiny_sd_unet(cross_attention_dim=16, sdxl_projection=12), scheduler=_ddim("epsilon"),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def test_sdxl_sampler_equals_stock_pipeline_with_cfg(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    teacher = SDXLTeacher.from_pretrained(str(sdxl_dir))
    pipe = _stock_pipeline(StableDiffusionXLPipeline, sdxl_dir, torch.float32)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=5, guidance_scale=3.0, height=16, width=16,
               output_type="latent").images
    cond = teacher.encode_prompt(PROMPTS)
    assert cond.add_time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    out = teacher.sample(latents, cond, steps=5, guidance=3.0, grid="scheduler")
    diff = (out - ref).abs().max().item()
    print(f"\nSDXL float32 5 DDIM steps, CFG 3: max |adapter - pipeline| {diff:.2e}")
    assert diff < 1e-4
    # the null condition is zeros, as the pipeline's force_zeros_for_empty_prompt
    null = teacher.null_condition(2)
    assert null.prompt_embeds.abs().sum() == 0 and null.pooled_prompt_embeds.abs().sum() == 0


def test_sdxl_euler_equals_ddim_float64(sdxl_dir):
    teacher = SDXLTeacher.from_pretrained(str(sdxl_dir), dtype="float64")
    cond = teacher.encode_prompt(PROMPTS)
    ddim = _ddim("epsilon")
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    ddim.final_alpha_cumprod = torch.as_tensor(ddim.final_alpha_cumprod).double()
    ddim.set_timesteps(4)
    added = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.add_time_ids}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = x.clone()
    for k in ddim.timesteps:
        eps = teacher.denoiser(ref, k, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
        ref = ddim.step(eps, k, ref).prev_sample
    out = teacher.sample(x, cond, steps=4, grid="scheduler")
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"\nSDXL float64 4 DDIM steps: max relative difference {err:.2e}")
    assert err < 1e-10


# ------------------------------------------------------------------------------------------------
# errors


def test_missing_component_is_one_line_naming_the_file(sd_dirs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_dirs["epsilon"], broken)
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(TeacherFilesMissingError) as err:
        StableDiffusionTeacher.from_pretrained(str(broken))
    msg = str(err.value)
    assert "\n" not in msg and str(broken / "vae" / "config.json") in msg and "teacher.path" in msg
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(sd_dirs["epsilon"] / "vae" / "config.json", broken / "vae" / "config.json")
    weights.unlink()
    with pytest.raises(TeacherFilesMissingError) as err:
        StableDiffusionTeacher.from_pretrained(str(broken))
    msg = str(err.value)
    assert "\n" not in msg and "diffusion_pytorch_model.safetensors" in msg and "teacher.path" in msg


def test_offline_hub_id_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TeacherFilesMissingError) as err:
        StableDiffusionTeacher.from_pretrained("onestep-tests/not-cached-sd")
    msg = str(err.value)
    assert "\n" not in msg and "onestep-tests/not-cached-sd" in msg and "teacher.path" in msg
    assert "HF_HUB_OFFLINE" in msg
