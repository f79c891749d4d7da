"""The digits teacher: an unconditional velocity UNet on 1x16x16 digits, with weights shipped in onestep."""
from onestep.teachers.digits.teacher import (
    DIGITS_UNET_CONFIG,
    SHIPPED,
    TIME_SCALE,
    DigitsTeacher,
    DigitsTeacherConfig,
    TeacherWeightsError,
    new_digits_unet,
    save_digits_unet,
    shipped_weights_dir,
)

__all__ = ["DigitsTeacher", "DigitsTeacherConfig", "DIGITS_UNET_CONFIG", "SHIPPED", "TIME_SCALE", "TeacherWeightsError",
           "new_digits_unet", "save_digits_unet", "shipped_weights_dir"]
