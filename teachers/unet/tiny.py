"""The tiny pixel UNet family (CIFAR-10 / ImageNet-64 style), for tests, `--dry-run` and `--smoke`: a
UNet2DModel and a DDIM scheduler saved as `unet/` + `scheduler/`, as the hub models are laid out."""
from __future__ import annotations

from pathlib import Path

import torch
from onestep.teachers.tiny import TINY_CLASSES, tiny_vp_scheduler


def tiny_pixel_unet(num_class_embeds: int | None = None, seed: int = 0, sample_size: int = 8):
    """A UNet2DModel on 3 x 8 x 8 images with one attention block (CIFAR-10 / ImageNet-64 style)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def save_tiny(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    null_class = cfg.get("null_class")
    classes = TINY_CLASSES + (1 if null_class is not None else 0) if class_conditional or null_class is not None \
        else None
    scheduler = tiny_vp_scheduler(cfg.get("prediction_type") or "epsilon", latent=False)
    tiny_pixel_unet(classes).save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    return {"path": str(folder), "subfolder": "unet", "scheduler_subfolder": "scheduler",
            "null_class": TINY_CLASSES if null_class is not None else None}


__all__ = ["tiny_pixel_unet", "save_tiny"]
