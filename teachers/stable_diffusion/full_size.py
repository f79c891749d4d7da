"""The full-size SD1.5, SD2.1 and SDXL models (published configs) for `--dry-run`'s estimate."""
from onestep.teachers.capabilities import FullSizeSpec
from onestep.teachers.full_size import CLIP_L, OPENCLIP_BIGG_PROJ, OPENCLIP_H, SD_VAE

_SD15_UNET = ("UNet2DConditionModel", dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                           block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                           attention_head_dim=8,
                                           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
_SD21_UNET = ("UNet2DConditionModel", dict(_SD15_UNET[1], sample_size=96, cross_attention_dim=1024,
                                           attention_head_dim=(5, 10, 20, 20), use_linear_projection=True))
_SDXL_UNET = ("UNet2DConditionModel", dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                           block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                                           attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                                           use_linear_projection=True, addition_embed_type="text_time",
                                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"),
                                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")))
SD_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {"denoiser": _SD15_UNET, "vae": SD_VAE, "text_encoder": CLIP_L},
    "stabilityai/stable-diffusion-2-1": {"denoiser": _SD21_UNET, "vae": SD_VAE, "text_encoder": OPENCLIP_H},
}
SDXL_MODELS = {
    "stabilityai/stable-diffusion-xl-base-1.0": {"denoiser": _SDXL_UNET, "vae": SD_VAE, "text_encoder": CLIP_L,
                                                 "text_encoder_2": OPENCLIP_BIGG_PROJ},
}
SD_FULL_SIZE = FullSizeSpec(SD_MODELS, default="stable-diffusion-v1-5/stable-diffusion-v1-5")
SDXL_FULL_SIZE = FullSizeSpec(SDXL_MODELS, default="stabilityai/stable-diffusion-xl-base-1.0")

__all__ = ["SD_FULL_SIZE", "SDXL_FULL_SIZE", "SD_MODELS", "SDXL_MODELS"]
