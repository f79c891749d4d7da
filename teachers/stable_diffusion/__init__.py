"""Stable Diffusion 1.x / 2.x and SDXL: latent UNets with a discrete VP schedule.

`teacher.py` the adapters, `tiny.py` their tiny builders, `full_size.py` their full-size specs."""
from onestep.teachers.stable_diffusion.teacher import (
    SDXLTeacher,
    SDXLTeacherConfig,
    StableDiffusionTeacher,
    StableDiffusionTeacherConfig,
)

__all__ = ["StableDiffusionTeacher", "StableDiffusionTeacherConfig", "SDXLTeacher", "SDXLTeacherConfig"]
