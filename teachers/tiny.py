"""Tiny models of every teacher family, built from configs in code and saved as the real layout.

`onestep distill --dry-run` (onestep/dryrun.py) uses these to build a recipe's teacher, student and
objective at a tiny size without downloading anything: `save_tiny_teacher(name, cfg, folder)` writes a
tiny pipeline of the family (the same diffusers classes and the same folder layout as the hub model:
`unet/` + `scheduler/` for pixel UNets, a whole pipeline folder for the latent families) and returns
the teacher options that load it back through the adapter's own `from_pretrained`, so the dry run runs
the real loading path.

The CLIP tokenizer is built from a byte-level vocabulary written into the folder (every byte as a
token, with and without the end-of-word mark, plus a few merges); it also stands in for the T5 and
Gemma tokenizers, as in the adapter tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

#: classes of a tiny class-conditional teacher (plus one null class where the recipe has one)
TINY_CLASSES = 10
#: image side of the tiny latent teachers: the tiny VAE halves it, so latents are 8 x 8
TINY_RESOLUTION = 16
#: prompt length of the tiny T5 / Gemma encoders
TINY_SEQUENCE = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map (the vocabulary's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(folder: str | Path, model_max_length: int = 77):
    """A CLIPTokenizer over single bytes plus the merges of a few common pairs (vocab of ~520)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


def clip_text_encoder(vocab_size: int, hidden: int = 16, projection: int | None = None, seed: int = 0):
    """A 2-layer CLIP text encoder; with `projection` the WithProjection variant (SDXL's second, SD3's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_encoder(vocab_size: int, d_model: int = 16, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **extra):
    """An AutoencoderKL with two blocks: 8x8 latents from 16x16 images (factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=16, **extra).eval()


def tiny_pixel_unet(num_class_embeds: int | None = None, seed: int = 0, sample_size: int = 8):
    """A UNet2DModel on 3 x 8 x 8 images with one attention block (CIFAR-10 / ImageNet-64 style)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def tiny_sd_unet(cross_attention_dim: int = 16, sdxl_projection: int | None = None, seed: int = 0):
    """A UNet2DConditionModel on 4x8x8 latents; with `sdxl_projection` SDXL's text_time embedding."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl_projection is not None:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=6 * 4 + sdxl_projection)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **extra).eval()


def _vp_scheduler(prediction_type: str, latent: bool):
    """DDIM with SD's scaled-linear betas (latent families) or DDPM's linear ones (pixel UNets)."""
    from diffusers import DDIMScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear") if latent else \
        dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    return DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


# ------------------------------------------------------------------------------------------------
# one saver per family: write the tiny model into `folder`, return the teacher options that load it


def _save_unet(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    null_class = cfg.get("null_class")
    classes = TINY_CLASSES + (1 if null_class is not None else 0) if class_conditional or null_class is not None \
        else None
    tiny_vp_scheduler = _vp_scheduler(cfg.get("prediction_type") or "epsilon", latent=False)
    tiny_pixel_unet(classes).save_pretrained(folder / "unet", safe_serialization=True)
    tiny_vp_scheduler.save_pretrained(folder / "scheduler")
    return {"path": str(folder), "subfolder": "unet", "scheduler_subfolder": "scheduler",
            "null_class": TINY_CLASSES if null_class is not None else None}


def _save_edm(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    null_class = cfg.get("null_class")
    classes = TINY_CLASSES + (1 if null_class is not None else 0) if class_conditional or null_class is not None \
        else None
    tiny_pixel_unet(classes, seed=1).save_pretrained(folder / "unet", safe_serialization=True)
    return {"path": str(folder), "subfolder": "unet", "null_class": TINY_CLASSES if null_class is not None else None}


def _save_sd(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    from diffusers import StableDiffusionPipeline

    tok = clip_tokenizer(folder / "vocab")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok,
                                   unet=tiny_sd_unet(), scheduler=_vp_scheduler(cfg.get("prediction_type") or "epsilon",
                                                                                latent=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return {"path": str(folder / "pipe"), "resolution": TINY_RESOLUTION}


def _save_sdxl(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    from diffusers import StableDiffusionXLPipeline

    tok = clip_tokenizer(folder / "vocab")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1),
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=12, seed=2), tokenizer=tok, tokenizer_2=tok,
        unet=tiny_sd_unet(cross_attention_dim=16, sdxl_projection=12),
        scheduler=_vp_scheduler(cfg.get("prediction_type") or "epsilon", latent=True),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder / "pipe")
    return {"path": str(folder / "pipe"), "resolution": TINY_RESOLUTION}


def _save_sd3(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = clip_tokenizer(folder / "vocab")
    torch.manual_seed(0)
    # SD3's real latent layout: 16 channels, 2x2 patches (the tiny VAE's 8x8 latents are 4x4 tokens)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    load_t5 = cfg.get("load_t5", True)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(16, shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text_encoder(len(tok), hidden=8, projection=8, seed=1), tokenizer=tok,
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=8, seed=2), tokenizer_2=tok,
        text_encoder_3=t5_encoder(len(tok), d_model=16) if load_t5 else None, tokenizer_3=tok if load_t5 else None)
    pipe.save_pretrained(folder / "pipe")
    return {"path": str(folder / "pipe"), "resolution": TINY_RESOLUTION, "max_sequence_length": TINY_SEQUENCE}


def tiny_flux_pipeline(tok, guidance_embeds: bool = True):
    """A FluxPipeline with one double and one single block, dynamic shifting, around tokenizer `tok`; FLUX's real
    latent layout: 16 latent channels packed 2x2 into 64-channel tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer.eval(), scheduler=scheduler,
                        vae=tiny_vae(16, shift_factor=0.1, scaling_factor=0.3, use_quant_conv=False,
                                     use_post_quant_conv=False),
                        text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1), tokenizer=tok,
                        text_encoder_2=t5_encoder(len(tok), d_model=16), tokenizer_2=tok)
    return pipe


def _save_flux(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    # FLUX.1-dev is guidance-distilled (guidance embedding); schnell is not
    guidance_embeds = "schnell" not in str(cfg.get("path", "")).lower()
    tiny_flux_pipeline(clip_tokenizer(folder / "vocab"), guidance_embeds).save_pretrained(folder / "pipe")
    return {"path": str(folder / "pipe"), "resolution": TINY_RESOLUTION, "max_sequence_length": TINY_SEQUENCE}


def tiny_sana_pipeline(tok):
    """A SanaPipeline with a 2-block transformer, a tiny DC-AE and a 1-layer Gemma2 around tokenizer `tok`; SANA's
    real latent layout: 32 channels, patch size 1."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=4,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=8, sample_size=8)
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 32), decoder_block_out_channels=(8, 32),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41)
    gemma = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    return SanaPipeline(tokenizer=tok, text_encoder=gemma.eval(), vae=vae.eval(), transformer=transformer.eval(),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _save_sana(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    pipe = tiny_sana_pipeline(clip_tokenizer(folder / "vocab"))
    pipe.save_pretrained(folder / "pipe")
    # SanaPipeline takes image sides divisible by 32 only: 16 x 16 latents through the tiny DC-AE's factor 2
    return {"path": str(folder / "pipe"), "resolution": 2 * TINY_RESOLUTION, "max_sequence_length": TINY_SEQUENCE}


TINY_SAVERS = {"unet": _save_unet, "edm": _save_edm, "stable_diffusion": _save_sd, "sdxl": _save_sdxl,
               "sd3": _save_sd3, "flux": _save_flux, "sana": _save_sana}


def save_tiny_teacher(name: str, teacher_cfg: dict, folder: str | Path, class_conditional: bool = False) -> dict:
    """Write a tiny model of teacher family `name` into `folder` and return `teacher_cfg` with the options
    that load it back (path, subfolders, tiny resolution and prompt length, float32 on the CPU).

    `class_conditional`: give a pixel UNet / EDM teacher a class embedding (TINY_CLASSES classes, plus a
    null class when the recipe names one)."""
    if name not in TINY_SAVERS:
        raise ValueError(f"no tiny model of teacher {name!r}; tiny models exist for {', '.join(TINY_SAVERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = TINY_SAVERS[name](dict(teacher_cfg), folder, class_conditional)
    # a tiny model is built in float32 on the CPU whatever the recipe asks of the full-size one
    return {**teacher_cfg, **options, "dtype": "float32", "device": None, "variant": None, "revision": None}


__all__ = ["TINY_CLASSES", "TINY_RESOLUTION", "TINY_SEQUENCE", "TINY_SAVERS", "save_tiny_teacher", "clip_tokenizer",
           "clip_text_encoder", "t5_encoder", "tiny_vae", "tiny_pixel_unet", "tiny_sd_unet", "tiny_flux_pipeline", "tiny_sana_pipeline"]
