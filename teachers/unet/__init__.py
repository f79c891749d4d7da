"""Pixel DDPM UNets (`UNet2DModel`: CIFAR-10 style; class-conditional ImageNet-64 style).

`teacher.py` the adapter, `tiny.py` its tiny builder, `full_size.py` its full-size spec."""
from onestep.teachers.unet.teacher import UNetTeacher, UNetTeacherConfig, unet_feature_layers

__all__ = ["UNetTeacher", "UNetTeacherConfig", "unet_feature_layers"]
