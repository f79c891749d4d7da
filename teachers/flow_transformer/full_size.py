"""The full-size SD3 / SD3.5, FLUX.1 and SANA models (published configs) for `--dry-run`'s estimate."""
from onestep.teachers.capabilities import FullSizeSpec
from onestep.teachers.full_size import CLIP_L, CLIP_L_PROJ, FLOW_VAE, GEMMA2_2B, OPENCLIP_BIGG_PROJ, T5_XXL

_DC_AE_F32C32 = ("AutoencoderDC", dict(in_channels=3, latent_channels=32, attention_head_dim=32,
                                       encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                                       decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                                       encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                                       decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                                       encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
                                       decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                                       encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                                       decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                                       upsample_block_type="interpolate", downsample_block_type="Conv",
                                       decoder_norm_types="rms_norm", decoder_act_fns="silu"))

_SD35M_TRANSFORMER = ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                    num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                    joint_attention_dim=4096, caption_projection_dim=1536,
                                                    pooled_projection_dim=2048, pos_embed_max_size=384,
                                                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"))
_SD3M_TRANSFORMER = ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                   num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                   joint_attention_dim=4096, caption_projection_dim=1536,
                                                   pooled_projection_dim=2048, pos_embed_max_size=192))
_FLUX_DEV_TRANSFORMER = ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19,
                                                        num_single_layers=38, attention_head_dim=128,
                                                        num_attention_heads=24, joint_attention_dim=4096,
                                                        pooled_projection_dim=768, guidance_embeds=True,
                                                        axes_dims_rope=(16, 56, 56)))
_SANA_1600M_TRANSFORMER = ("SanaTransformer2DModel", dict(in_channels=32, out_channels=32, num_attention_heads=70,
                                                          attention_head_dim=32, num_layers=20,
                                                          num_cross_attention_heads=20, cross_attention_head_dim=112,
                                                          cross_attention_dim=2240, caption_channels=2304,
                                                          mlp_ratio=2.5, sample_size=32, patch_size=1))
_SANA_600M_TRANSFORMER = ("SanaTransformer2DModel", dict(in_channels=32, out_channels=32, num_attention_heads=36,
                                                         attention_head_dim=32, num_layers=28,
                                                         num_cross_attention_heads=16, cross_attention_head_dim=72,
                                                         cross_attention_dim=1152, caption_channels=2304,
                                                         mlp_ratio=2.5, sample_size=32, patch_size=1))
SD3_MODELS = {
    "stabilityai/stable-diffusion-3.5-medium": {"denoiser": _SD35M_TRANSFORMER, "vae": FLOW_VAE,
                                                "text_encoder": CLIP_L_PROJ, "text_encoder_2": OPENCLIP_BIGG_PROJ,
                                                "text_encoder_3": T5_XXL},
    "stabilityai/stable-diffusion-3-medium-diffusers": {"denoiser": _SD3M_TRANSFORMER, "vae": FLOW_VAE,
                                                        "text_encoder": CLIP_L_PROJ,
                                                        "text_encoder_2": OPENCLIP_BIGG_PROJ, "text_encoder_3": T5_XXL},
}
FLUX_MODELS = {
    "black-forest-labs/FLUX.1-dev": {"denoiser": _FLUX_DEV_TRANSFORMER, "vae": FLOW_VAE, "text_encoder": CLIP_L,
                                     "text_encoder_2": T5_XXL},
}
SANA_MODELS = {
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": {"denoiser": _SANA_1600M_TRANSFORMER, "vae": _DC_AE_F32C32,
                                                          "text_encoder": GEMMA2_2B},
    "Efficient-Large-Model/Sana_600M_1024px_diffusers": {"denoiser": _SANA_600M_TRANSFORMER, "vae": _DC_AE_F32C32,
                                                         "text_encoder": GEMMA2_2B},
}


def _sd3_left_out(teacher_cfg: dict) -> tuple[str, ...]:
    """SD3 without T5 (teacher.load_t5=false) has no third text encoder."""
    return () if teacher_cfg.get("load_t5", True) else ("text_encoder_3",)


SD3_FULL_SIZE = FullSizeSpec(SD3_MODELS, default="stabilityai/stable-diffusion-3.5-medium",
                             denoiser_subfolder="transformer", left_out=_sd3_left_out)
FLUX_FULL_SIZE = FullSizeSpec(FLUX_MODELS, default="black-forest-labs/FLUX.1-dev", denoiser_subfolder="transformer")
SANA_FULL_SIZE = FullSizeSpec(SANA_MODELS, default="Efficient-Large-Model/Sana_1600M_1024px_diffusers",
                              denoiser_subfolder="transformer")

__all__ = ["SD3_FULL_SIZE", "FLUX_FULL_SIZE", "SANA_FULL_SIZE", "SD3_MODELS", "FLUX_MODELS", "SANA_MODELS"]
