"""The full-size EDM ImageNet-64 network for `--dry-run`'s estimate."""
from onestep.teachers.capabilities import FullSizeSpec

# the ADM architecture of the EDM / consistency-models ImageNet-64 models, as diffusers'
# scripts/convert_consistency_to_diffusers.py writes it (1000 classes, scale-shift time conditioning)
_IMAGENET64_ADM_UNET = ("UNet2DModel", dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=3,
                                            block_out_channels=(192, 384, 576, 768), attention_head_dim=64,
                                            num_class_embeds=1000, resnet_time_scale_shift="scale_shift",
                                            downsample_type="resnet", upsample_type="resnet",
                                            down_block_types=("ResnetDownsampleBlock2D",) + ("AttnDownBlock2D",) * 3,
                                            up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)))

EDM_MODELS = {"imagenet64-adm": {"denoiser": _IMAGENET64_ADM_UNET}}
EDM_FULL_SIZE = FullSizeSpec(EDM_MODELS, default="imagenet64-adm", pipeline=False)

__all__ = ["EDM_FULL_SIZE", "EDM_MODELS"]
