"""Students built from every teacher family (unet, edm, stable_diffusion, sdxl, sd3, flux, sana) by
`student_from_teacher`: at init u(z, r, t, cond) is the teacher's velocity; the interval embedding,
once moved, makes u depend on r; only the backbone copy and the interval MLP train; deepcopy and
state_dict round trips; forward-mode JVP (torch.func) through a UNet and a transformer student."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import clip_text_encoder, clip_tokenizer, t5_encoder, tiny_sd_unet, tiny_vae

from onestep.student import TeacherStudent, student_from_teacher

PROMPTS = ["a cat", "the dog", "a cat and the dog"]
SEQ = 16  # max_sequence_length of T5 / Gemma prompts
# spans the VP schedules' clamped ends (t < t_min, t > t_max), EDM's sigma_max clamp and t = 1
TIMES = torch.tensor([0.01, 0.35, 0.8, 1.0])


def _ddim_config(prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type).config)


def _pixel_unet(num_class_embeds, seed):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def _unet_teacher(tmp):
    from onestep.teachers.unet import UNetTeacher

    # class 10 is the null class: labels -1 exercise it
    return UNetTeacher(_pixel_unet(11, 0), _ddim_config("v_prediction"), null_class=10)


def _edm_teacher(tmp):
    from onestep.teachers.edm import EDMTeacher

    return EDMTeacher.from_unet(_pixel_unet(11, 1), null_class=10, c_noise_scale=250.0)


def _sd_teacher(tmp):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from onestep.teachers.stable_diffusion import StableDiffusionTeacher

    tok = clip_tokenizer(tmp / "vocab")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok,
                                   unet=tiny_sd_unet(), scheduler=DDIMScheduler.from_config(_ddim_config()),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionTeacher(pipe)


def _sdxl_teacher(tmp):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from onestep.teachers.stable_diffusion import SDXLTeacher

    tok = clip_tokenizer(tmp / "vocab")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1),
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=12, seed=2), tokenizer=tok, tokenizer_2=tok,
        unet=tiny_sd_unet(cross_attention_dim=16, sdxl_projection=12),
        scheduler=DDIMScheduler.from_config(_ddim_config("v_prediction")), force_zeros_for_empty_prompt=True)
    return SDXLTeacher(pipe)


def _sd3_teacher(tmp):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from onestep.teachers.flow_transformer import SD3Teacher

    tok = clip_tokenizer(tmp / "vocab")
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
    return SD3Teacher(pipe, None, SEQ)


def _flux_teacher(tmp):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from onestep.teachers.flow_transformer import FluxTeacher

    tok = clip_tokenizer(tmp / "vocab")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                        vae=tiny_vae(shift_factor=0.1, scaling_factor=0.3, use_quant_conv=False,
                                     use_post_quant_conv=False),
                        text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1), tokenizer=tok,
                        text_encoder_2=t5_encoder(len(tok), d_model=16), tokenizer_2=tok)
    return FluxTeacher(pipe, 16, SEQ, guidance=3.5)  # 16 px: 8x8 latents (the default is 1024 px)


def _sana_teacher(tmp):
    from onestep.teachers.flow_transformer import SanaTeacher
    from onestep.teachers.flow_transformer.tiny import tiny_sana_pipeline

    return SanaTeacher(tiny_sana_pipeline(clip_tokenizer(tmp / "vocab")), None, SEQ)


BUILDERS = {"unet": _unet_teacher, "edm": _edm_teacher, "stable_diffusion": _sd_teacher, "sdxl": _sdxl_teacher,
            "sd3": _sd3_teacher, "flux": _flux_teacher, "sana": _sana_teacher}
FAMILIES = list(BUILDERS)


def _randomise(module, scale=0.05, seed=0):
    """Random noise on every weight: zero-initialised layers of a freshly built tiny model (diffusers
    zero-inits output projections) would otherwise make equalities hold trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """teachers(family, dtype=float32): one frozen tiny teacher per (family, dtype), built on first use."""
    built = {}

    def get(family, dtype=torch.float32):
        if (family, dtype) not in built:
            teacher = BUILDERS[family](tmp_path_factory.mktemp(family))
            _randomise(teacher.backbone(), seed=0)
            built[family, dtype] = teacher.to(dtype).freeze()
        return built[family, dtype]

    return get


def _inputs(teacher, seed=0, dtype=torch.float32):
    """(z, t, cond): non-trivial conditions where the family takes them (one of them the null one)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(TIMES), *teacher.sample_shape, generator=gen, dtype=dtype)
    if teacher.num_classes is not None:
        cond = torch.tensor([3, 0, -1, 7])  # -1: the null class
    elif hasattr(teacher, "encode_prompt"):
        cond = teacher.cat_conditions([teacher.encode_prompt(PROMPTS), teacher.null_condition(1)])
    else:
        cond = None
    return z, TIMES.to(dtype), cond


def _perturb_interval(student, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.interval_embedding.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("family", FAMILIES)
def test_student_is_the_teacher_at_init(teachers, family, dtype):
    """float32 is exact except SANA (~5e-7): CPU matmuls pick another kernel for the non-contiguous input of
    its linear attention's output projection when the weight requires grad, as the student's does."""
    teacher = teachers(family, dtype)
    student = student_from_teacher(teacher)
    assert isinstance(student, TeacherStudent) and student.sample_shape == teacher.sample_shape
    assert all(p.dtype == dtype for p in student.parameters())
    z, t, cond = _inputs(teacher, dtype=dtype)
    v = teacher.velocity(z, t, cond)
    with torch.no_grad():
        err = (student(z, t, t, cond) - v).abs().max().item()
        # the interval MLP's last layer is zero: u(z, r, t) = v(z, t) for every r at init
        err_r = (student(z, 0.3 * t, t, cond) - v).abs().max().item()
    print(f"\n{family} {str(dtype)[6:]}: max |u(z, t, t) - v_teacher| {err:.1e}, "
          f"max |u(z, 0.3t, t) - v_teacher| {err_r:.1e} "
          f"(max |v| {v.abs().max():.2f}); time embedding {student.time_embedding_name}")
    assert v.abs().max() > 1e-2  # a velocity worth comparing
    assert err < 1e-6 and err_r < 1e-6
    # the hook lives only inside forward
    assert all(not m._forward_hooks for m in student.backbone.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_interval_embedding_makes_r_matter(teachers, family):
    teacher = teachers(family)
    student = student_from_teacher(teacher)
    z, t, cond = _inputs(teacher)
    v = teacher.velocity(z, t, cond)
    _perturb_interval(student)
    with torch.no_grad():
        u_t, u_r = student(z, t, t, cond), student(z, 0.3 * t, t, cond)
    change = (u_r - u_t).abs().amax(dim=tuple(range(1, z.ndim)))
    assert bool((change > 1e-4).all()), change  # every sample: r reaches the output
    # the teacher's own backbone is untouched by the student's hook
    torch.testing.assert_close(teacher.velocity(z, t, cond), v, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_backbone_and_interval_mlp_train(teachers, family):
    teacher = teachers(family)
    student = student_from_teacher(teacher)
    params = list(student.parameters())
    expected = {id(p) for p in student.backbone.parameters()} | {id(p) for p in student.interval_embedding.parameters()}
    assert {id(p) for p in params} == expected and all(p.requires_grad for p in params)
    # the backbone is a copy: no parameter shared with the teacher, which stays frozen
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not expected & teacher_ids and not any(p.requires_grad for p in teacher.parameters())
    assert all(k.split(".")[0] in ("backbone", "interval_embedding") for k in student.state_dict())
    # frozen VAE / text encoders are the teacher's, used by the adapter but outside the student
    adapter = student.adapter
    assert adapter.backbone() is student.backbone
    for name in ("vae", "text_encoders"):
        if hasattr(teacher, name):
            assert getattr(adapter, name) is getattr(teacher, name)
    # a gradient reaches the backbone and the interval MLP's last layer (which starts at zero)
    z, t, cond = _inputs(teacher)
    student(z, 0.5 * t, t, cond).square().mean().backward()
    assert student.interval_embedding.linear_2.weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in student.backbone.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("family", ["edm", "sdxl", "flux", "sana"])
def test_deepcopy_and_state_dict_round_trip(teachers, family):
    teacher = teachers(family)
    student = student_from_teacher(teacher)
    _perturb_interval(student)
    _randomise(student.backbone, scale=0.01, seed=3)  # trained away from the teacher
    z, t, cond = _inputs(teacher)
    r = 0.3 * t
    with torch.no_grad():
        ref = student(z, r, t, cond)
        twin = copy.deepcopy(student)
        assert twin.backbone is not student.backbone and twin.adapter.backbone() is twin.backbone
        assert twin.adapter is not student.adapter
        for name in ("vae", "text_encoders", "pipeline"):  # frozen parts shared, not copied
            if hasattr(teacher, name):
                assert getattr(twin.adapter, name) is getattr(teacher, name)
        torch.testing.assert_close(twin(z, r, t, cond), ref, rtol=0, atol=0)
        # the copy computes with its own weights
        twin.interval_embedding.linear_2.bias.add_(1.0)
        assert (twin(z, r, t, cond) - ref).abs().max() > 1e-4
        torch.testing.assert_close(student(z, r, t, cond), ref, rtol=0, atol=0)

        fresh = student_from_teacher(teacher)
        assert (fresh(z, r, t, cond) - ref).abs().max() > 1e-4
        fresh.load_state_dict(student.state_dict())
        torch.testing.assert_close(fresh(z, r, t, cond), ref, rtol=0, atol=0)
        assert all(not m._forward_hooks for m in list(student.modules()) + list(twin.modules()))


@pytest.mark.parametrize("family", ["stable_diffusion", "sd3"])
def test_forward_jvp_matches_autograd(teachers, family):
    """MeanFlow's d/dt u(z_t, r, t) along (dz/dt, dr/dt, dt/dt) = (v, 0, 1): torch.func.jvp (forward mode)
    through the student with onestep's math attention equals autograd's double-backward JVP."""
    from onestep.kernels import set_attention_backend

    teacher = teachers(family)
    student = student_from_teacher(teacher)
    assert set_attention_backend(student, "math") > 0
    _perturb_interval(student)
    student = student.double()
    z, t, cond = _inputs(teacher)
    z, t = z.double(), torch.tensor([0.2, 0.45, 0.7, 0.9], dtype=torch.float64)  # inside the VP schedule
    r = 0.4 * t
    v = torch.randn_like(z)

    def u(z_, r_, t_):
        return student(z_, r_, t_, cond)

    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    out_fwd, du_fwd = torch.func.jvp(u, (z, r, t), tangents)
    out_ref, du_ref = torch.autograd.functional.jvp(u, (z, r, t), tangents)
    torch.testing.assert_close(out_fwd, out_ref)
    err = (du_fwd - du_ref).abs().max().item()
    print(f"\n{family}: max |jvp forward - autograd| {err:.1e} (max |du| {du_ref.abs().max():.2f})")
    torch.testing.assert_close(du_fwd, du_ref, rtol=1e-9, atol=1e-9)
    assert du_ref.abs().max() > 1e-3
