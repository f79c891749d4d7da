"""SD3, FLUX and SANA adapters on tiny pipelines saved to temp folders and loaded back through
`from_pretrained`: the adapter's Euler sampler in flow time equals the stock pipeline's latents
(output_type="latent", same prompt, noise, steps, shift), with and without guidance; the velocity is the
network's own at timestep = sigma * 1000 (FLUX: sigma); VAE scaling/shift; features; one-line errors."""
from __future__ import annotations

import pytest
import torch
from onestep.teachers.flow_transformer import FluxTeacher, SanaTeacher, SD3Teacher
from onestep.teachers.loading import TeacherFilesMissingError
from tiny_models import clip_text_encoder, clip_tokenizer, t5_encoder, tiny_vae

PROMPTS = ["a cat", "the dog"]
SEQ = 16  # max_sequence_length of the T5 / Gemma prompts, small for speed


def _latents(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _report(name, diff, ref):
    print(f"\n{name}: max |adapter - pipeline| {diff:.2e} (max |latent| {ref.abs().max():.2f})")


# ------------------------------------------------------------------------------------------------
# SD3


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("sd3")
    tok = clip_tokenizer(root / "vocab")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text_encoder(len(tok), hidden=8, projection=8, seed=1), tokenizer=tok,
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=8, seed=2), tokenizer_2=tok,
        text_encoder_3=t5_encoder(len(tok), d_model=16), tokenizer_3=tok)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sd3_sampler_equals_stock_pipeline(sd3_dir, guidance):
    from diffusers import StableDiffusion3Pipeline

    teacher = SD3Teacher.from_pretrained(str(sd3_dir), dtype="float32", max_sequence_length=SEQ)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    pipe.set_progress_bar_config(disable=True)
    latents = _latents((2, 4, 8, 8), 0)
    ref = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=5, guidance_scale=guidance, height=16, width=16,
               max_sequence_length=SEQ, output_type="latent").images
    cond = teacher.encode_prompt(PROMPTS)
    out = teacher.sample(latents, cond, steps=5, guidance=guidance)
    diff = (out - ref).abs().max().item()
    _report(f"SD3 5 steps shift 3 CFG {guidance}", diff, ref)
    assert diff < 1e-4


def test_sd3_velocity_is_the_network_at_sigma_times_1000(sd3_dir):
    teacher = SD3Teacher.from_pretrained(str(sd3_dir), dtype="float64", max_sequence_length=SEQ)
    cond = teacher.encode_prompt(PROMPTS)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.25, 0.9], dtype=torch.float64)
    raw = teacher.denoiser(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.prompt_embeds,
                           pooled_projections=cond.pooled_prompt_embeds).sample
    torch.testing.assert_close(teacher.velocity(x, t, cond), raw, rtol=0, atol=0)
    # the grid is the scheduler's shifted sigmas, shift(u) = 3 u / (1 + 2 u), on the uniform grid from 1 to
    # the scheduler's sigma_min (which diffusers stores already shifted: shift(1/1000))
    sig = teacher.flow_times(4)
    assert sig[0].item() == pytest.approx(1.0) and sig[-1].item() == 0.0
    shift = lambda u: 3 * u / (1 + 2 * u)  # noqa: E731
    u = torch.linspace(1.0, shift(torch.tensor(1 / 1000, dtype=torch.float64)).item(), 4, dtype=torch.float64)
    torch.testing.assert_close(sig[:-1], shift(u), rtol=1e-6, atol=1e-6)
    # VAE with shift and scaling
    images = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    z = teacher.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(teacher.encode(images), (z - 0.06) * 1.5)
    torch.testing.assert_close(teacher.decode(teacher.encode(images)), teacher.vae.decode(z).sample)
    # features: image tokens of the first blocks, hooks removed
    feats = teacher.features(x, 0.5, cond)
    assert teacher.default_feature_layers == ("transformer_blocks.0", "transformer_blocks.1")
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16)] * 2
    assert all(not m._forward_hooks for m in teacher.denoiser.modules())


def test_sd3_without_t5_and_errors(sd3_dir, tmp_path, monkeypatch):
    import shutil

    teacher = SD3Teacher.from_pretrained(str(sd3_dir), load_t5=False, max_sequence_length=SEQ)
    cond = teacher.encode_prompt(PROMPTS)
    assert cond.prompt_embeds[:, 77:].abs().sum() == 0  # the pipeline's zeros in place of T5
    broken = tmp_path / "b"
    shutil.copytree(sd3_dir, broken)
    shutil.rmtree(broken / "tokenizer_3")
    with pytest.raises(TeacherFilesMissingError) as err:
        SD3Teacher.from_pretrained(str(broken))
    assert "\n" not in str(err.value) and "tokenizer_3" in str(err.value) and "teacher.path" in str(err.value)
    SD3Teacher.from_pretrained(str(broken), load_t5=False, max_sequence_length=SEQ)  # not needed without T5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TeacherFilesMissingError) as err:
        SD3Teacher.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    msg = str(err.value)
    assert "\n" not in msg and "stabilityai/stable-diffusion-3.5-medium" in msg and "HF_HUB_OFFLINE" in msg


# ------------------------------------------------------------------------------------------------
# FLUX


def _flux_dir(root, guidance_embeds):
    from onestep.teachers.flow_transformer.tiny import tiny_flux_pipeline

    tiny_flux_pipeline(clip_tokenizer(root / "vocab"), guidance_embeds).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    return {g: _flux_dir(tmp_path_factory.mktemp(f"flux{g}"), g) for g in (True, False)}


@pytest.mark.parametrize("distilled", [True, False], ids=["guidance-embedded", "true-cfg"])
def test_flux_sampler_equals_stock_pipeline(flux_dirs, distilled):
    from diffusers import FluxPipeline

    teacher = FluxTeacher.from_pretrained(str(flux_dirs[distilled]), dtype="float32", max_sequence_length=SEQ)
    pipe = FluxPipeline.from_pretrained(str(flux_dirs[distilled]))
    pipe.set_progress_bar_config(disable=True)
    latents = _latents((2, 16, 8, 8), 1)   # FLUX's 16 latent channels, packed 2x2 into 64-channel tokens
    packed = FluxPipeline._pack_latents(latents, 2, 16, 8, 8)
    if distilled:  # one pass, guidance scale as an input embedding
        ref = pipe(PROMPTS, latents=packed.clone(), num_inference_steps=4, guidance_scale=2.5, height=16, width=16,
                   max_sequence_length=SEQ, output_type="latent").images
        out = teacher.sample(latents, teacher.encode_prompt(PROMPTS), steps=4, guidance=2.5)
    else:  # true CFG with the empty negative prompt
        ref = pipe(PROMPTS, negative_prompt=["", ""], true_cfg_scale=3.0, latents=packed.clone(),
                   num_inference_steps=4, height=16, width=16, max_sequence_length=SEQ, output_type="latent").images
        out = teacher.sample(latents, teacher.encode_prompt(PROMPTS), steps=4, guidance=3.0)
    diff = (FluxPipeline._pack_latents(out, 2, 16, 8, 8) - ref).abs().max().item()
    _report(f"FLUX {'guidance-embedded 2.5' if distilled else 'true CFG 3'} 4 steps dynamic shift", diff, ref)
    assert diff < 1e-4


def test_flux_velocity_features_and_vae(flux_dirs):
    teacher = FluxTeacher.from_pretrained(str(flux_dirs[True]), dtype="float64", max_sequence_length=SEQ, guidance=3.5)
    assert teacher.guidance_embeds and teacher.sample_shape[0] == 16
    cond = teacher.encode_prompt(PROMPTS)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    # guidance None means the configured embedded scale
    torch.testing.assert_close(teacher.velocity(x, 0.4, cond), teacher.velocity(x, 0.4, cond, guidance=3.5))
    assert (teacher.velocity(x, 0.4, cond, guidance=1.0) - teacher.velocity(x, 0.4, cond)).abs().max() > 0
    feats = teacher.features(x, 0.5, cond)
    assert teacher.default_feature_layers == ("transformer_blocks.0",)
    assert feats[0].shape == (2, 16, 16)  # image tokens (2x2-packed 8x8 latents)
    assert all(not m._forward_hooks for m in teacher.denoiser.modules())
    images = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    z = teacher.vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(teacher.encode(images), (z - 0.1) * 0.3)
    torch.testing.assert_close(teacher.decode(teacher.encode(images)), teacher.vae.decode(z).sample)


# ------------------------------------------------------------------------------------------------
# SANA


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    from onestep.teachers.flow_transformer.tiny import tiny_sana_pipeline

    root = tmp_path_factory.mktemp("sana")
    tiny_sana_pipeline(clip_tokenizer(root / "vocab")).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sana_sampler_equals_stock_pipeline(sana_dir, guidance):
    from diffusers import SanaPipeline

    teacher = SanaTeacher.from_pretrained(str(sana_dir), dtype="float32", max_sequence_length=SEQ)
    pipe = SanaPipeline.from_pretrained(str(sana_dir))
    pipe.set_progress_bar_config(disable=True)
    vsf = pipe.vae_scale_factor
    latents = _latents((2, 32, 16, 16), 2)  # SANA's 32 latent channels; the pipeline wants sides divisible by 32
    ref = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=4, guidance_scale=guidance, height=16 * vsf,
               width=16 * vsf, max_sequence_length=SEQ, output_type="latent", use_resolution_binning=False).images
    out = teacher.sample(latents, teacher.encode_prompt(PROMPTS), steps=4, guidance=guidance)
    diff = (out - ref).abs().max().item()
    _report(f"SANA 4 steps shift 3 CFG {guidance}", diff, ref)
    assert diff < 1e-4


def test_sana_features_and_vae(sana_dir):
    teacher = SanaTeacher.from_pretrained(str(sana_dir), dtype="float32", max_sequence_length=SEQ)
    cond = teacher.encode_prompt(PROMPTS)
    assert cond.attention_mask is not None and cond.attention_mask.shape == (2, SEQ)
    x = torch.randn(2, 32, 8, 8)
    feats = teacher.features(x, 0.5, cond)
    assert len(feats) == 2 and all(not m._forward_hooks for m in teacher.denoiser.modules())
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    z = teacher.vae.encode(images).latent
    torch.testing.assert_close(teacher.encode(images), z * 0.41)
    torch.testing.assert_close(teacher.decode(teacher.encode(images)), teacher.vae.decode(z).sample)
