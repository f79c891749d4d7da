"""The tiny SD1.x/2.x and SDXL pipelines, for tests, `--dry-run` and `--smoke`: the real pipeline classes
around a tiny UNet2DConditionModel, VAE and CLIP text encoder(s), saved as a whole pipeline folder."""
from __future__ import annotations

from pathlib import Path

import torch
from onestep.teachers.tiny import TINY_RESOLUTION, clip_text_encoder, clip_tokenizer, tiny_vae, tiny_vp_scheduler


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


def save_tiny_sd(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    from diffusers import StableDiffusionPipeline

    tok = clip_tokenizer(folder / "vocab")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok,
                                   unet=tiny_sd_unet(),
                                   scheduler=tiny_vp_scheduler(cfg.get("prediction_type") or "epsilon", latent=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return {"path": str(folder / "pipe"), "resolution": TINY_RESOLUTION}


def save_tiny_sdxl(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    from diffusers import StableDiffusionXLPipeline

    tok = clip_tokenizer(folder / "vocab")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1),
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=12, seed=2), tokenizer=tok, tokenizer_2=tok,
        unet=tiny_sd_unet(cross_attention_dim=16, sdxl_projection=12),
        scheduler=tiny_vp_scheduler(cfg.get("prediction_type") or "epsilon", latent=True),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder / "pipe")
    return {"path": str(folder / "pipe"), "resolution": TINY_RESOLUTION}


__all__ = ["tiny_sd_unet", "save_tiny_sd", "save_tiny_sdxl"]
