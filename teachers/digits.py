"""The digits teacher: a flow-matching diffusers `UNet2DModel` on scikit-learn's digits at 16x16.

It is trained by `onestep teacher-train` (configs/digits_teacher.yaml, objective `flow_matching`);
the weights that `onestep demo` uses ship in `onestep/assets/digits_teacher/` in diffusers' own
format (`config.json` + `diffusion_pytorch_model.safetensors`), so `from_pretrained` is the real
diffusers loading path.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from onestep.registry import TEACHERS
from onestep.student import AvgVelocityUNet
from onestep.teachers.base import Teacher

TIME_SCALE = 1000.0  # the UNet sees timestep = 1000 * flow time

#: the backbone of the digits teacher (about 1.0M parameters, no attention: fast on CPU)
DIGITS_UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    add_attention=False,
)


def shipped_weights_dir() -> Path:
    import onestep

    return Path(onestep.__file__).resolve().parent / "assets" / "digits_teacher"


def new_digits_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**DIGITS_UNET_CONFIG)


@dataclass
class DigitsTeacherConfig:
    path: Optional[str] = None  # folder written by `onestep teacher-train`; None: the shipped weights


@TEACHERS.register("digits")
class DigitsTeacher(Teacher):
    """Unconditional velocity teacher on 1x16x16 digits in [-1, 1]."""

    Config = DigitsTeacherConfig
    sample_shape = (1, 16, 16)

    def __init__(self, model: AvgVelocityUNet):
        super().__init__()
        self.model = model
        self.freeze()

    def _velocity(self, x, t, cond):
        if cond is not None:
            raise ValueError("the digits teacher is unconditional")
        return self.model(x, t, t)

    def backbone(self) -> AvgVelocityUNet:
        return self.model

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device=None, dtype=None) -> "DigitsTeacher":
        """Load a digits teacher saved with `save_pretrained` (default: the weights shipped with onestep)."""
        from diffusers import UNet2DModel

        path = Path(path) if path is not None else shipped_weights_dir()
        weights = path / "diffusion_pytorch_model.safetensors"
        for f in (path / "config.json", weights):
            if not f.is_file():
                raise FileNotFoundError(
                    f"digits teacher file missing: {f}; set teacher.path to a folder written by "
                    "`onestep teacher-train`, or run `onestep teacher-train` to make one"
                )
        unet = UNet2DModel.from_pretrained(path, use_safetensors=True)
        if dtype is not None or device is not None:
            unet = unet.to(device=device, dtype=dtype)
        return cls(AvgVelocityUNet(unet, TIME_SCALE))

    @classmethod
    def from_config(cls, cfg: DigitsTeacherConfig) -> "DigitsTeacher":
        return cls.from_pretrained(cfg.path)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.unet.save_pretrained(path, safe_serialization=True)
