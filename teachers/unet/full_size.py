"""The full-size pixel DDPM UNet (google/ddpm-cifar10-32, published config) for `--dry-run`'s estimate."""
from onestep.teachers.capabilities import FullSizeSpec

_DDPM_CIFAR10_UNET = ("UNet2DModel", dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                                          block_out_channels=(128, 256, 256, 256), norm_eps=1e-6, freq_shift=1,
                                          flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None,
                                          down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                            "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
UNET_MODELS = {"google/ddpm-cifar10-32": {"denoiser": _DDPM_CIFAR10_UNET}}
UNET_FULL_SIZE = FullSizeSpec(UNET_MODELS, default="google/ddpm-cifar10-32", pipeline=False)

__all__ = ["UNET_FULL_SIZE", "UNET_MODELS"]
