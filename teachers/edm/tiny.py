"""The tiny EDM family, for tests, `--dry-run` and `--smoke`: a tiny pixel UNet2DModel (the raw network F)
saved as `unet/`."""
from __future__ import annotations

from pathlib import Path

from onestep.teachers.tiny import TINY_CLASSES
from onestep.teachers.unet.tiny import tiny_pixel_unet


def save_tiny(cfg: dict, folder: Path, class_conditional: bool) -> dict:
    null_class = cfg.get("null_class")
    classes = TINY_CLASSES + (1 if null_class is not None else 0) if class_conditional or null_class is not None \
        else None
    tiny_pixel_unet(classes, seed=1).save_pretrained(folder / "unet", safe_serialization=True)
    return {"path": str(folder), "subfolder": "unet", "null_class": TINY_CLASSES if null_class is not None else None}


__all__ = ["save_tiny"]
