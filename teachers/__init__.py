"""Teachers: frozen multi-step models seen through one interface in flow time (t = 1 is noise).

One folder per teacher family: its adapter (`teacher.py`, registered in `onestep.registry.TEACHERS` with
declared capabilities, see `capabilities.py`), its tiny builder (`tiny.py`: tests, `--dry-run`, `--smoke`)
and its full-size spec (`full_size.py`: `--dry-run`'s estimate). Heavy libraries are imported only when a
model is loaded. What several families share stays here: `base.py` (the Teacher interface), `capabilities.py`,
`latent.py` (VAE and prompts), `vp.py` (discrete VP time), `loading.py`, `tiny.py` and `full_size.py`.

    digits            the shipped digits teacher                                     teachers/digits/
    gmm               the analytic Gaussian mixture                                  teachers/gmm/
    unet              pixel DDPM UNet2DModel (CIFAR-10; class-cond. ImageNet-64)     teachers/unet/
    edm               EDM/Karras-preconditioned denoisers D(x, sigma, class)         teachers/edm/
    stable_diffusion  SD1.x / SD2.x                                                  teachers/stable_diffusion/
    sdxl              SDXL                                                           teachers/stable_diffusion/
    sd3, flux, sana   rectified-flow transformers                                    teachers/flow_transformer/

Importing this package registers the built-in families: one import line each, below. A new family is a
folder like these and one line here (or, outside onestep, an import of its module before the config is
validated).
"""
# one import line per built-in family registers it (its folder's teacher.py holds @TEACHERS.register)
from onestep.teachers.base import Teacher
from onestep.teachers.capabilities import FullSizeSpec, TeacherCapabilities
from onestep.teachers.digits import DigitsTeacher
from onestep.teachers.edm import EDMPrecond, EDMTeacher
from onestep.teachers.flow_transformer import FluxTeacher, SanaTeacher, SD3Teacher
from onestep.teachers.gmm import GaussianMixture, GMMTeacher
from onestep.teachers.latent import PromptCondition
from onestep.teachers.loading import TeacherFilesMissingError, TeacherWeightsError
from onestep.teachers.stable_diffusion import SDXLTeacher, StableDiffusionTeacher
from onestep.teachers.unet import UNetTeacher

__all__ = [
    "Teacher", "TeacherCapabilities", "FullSizeSpec", "DigitsTeacher", "GaussianMixture", "GMMTeacher", "UNetTeacher",
    "EDMPrecond", "EDMTeacher", "StableDiffusionTeacher", "SDXLTeacher", "SD3Teacher", "FluxTeacher", "SanaTeacher",
    "PromptCondition", "TeacherFilesMissingError", "TeacherWeightsError",
]
