"""The tiny SD3, FLUX and SANA pipelines, for tests, `--dry-run` and `--smoke`: the real pipeline classes
around tiny transformers, VAEs and text encoders, in each family's real latent layout."""
from __future__ import annotations

from pathlib import Path

import torch
from onestep.teachers.tiny import (
    TINY_RESOLUTION,
    TINY_SEQUENCE,
    clip_text_encoder,
    clip_tokenizer,
    t5_encoder,
    tiny_vae,
)


def save_tiny_sd3(cfg: dict, folder: Path, class_conditional: bool) -> dict:
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


def save_tiny_flux(cfg: dict, folder: Path, class_conditional: bool) -> dict:
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


def save_tiny_sana(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    pipe = tiny_sana_pipeline(clip_tokenizer(folder / "vocab"))
    pipe.save_pretrained(folder / "pipe")
    # SanaPipeline takes image sides divisible by 32 only: 16 x 16 latents through the tiny DC-AE's factor 2
    return {"path": str(folder / "pipe"), "resolution": 2 * TINY_RESOLUTION, "max_sequence_length": TINY_SEQUENCE}


__all__ = ["tiny_flux_pipeline", "tiny_sana_pipeline", "save_tiny_sd3", "save_tiny_flux", "save_tiny_sana"]
