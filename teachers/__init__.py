"""Teachers: frozen multi-step models seen through one interface in flow time (t = 1 is noise).

Importing this package registers the built-in teachers in `onestep.registry.TEACHERS`: the analytic
and digits teachers, and adapters for diffusers model families (heavy libraries are imported only
when a model is loaded):

    unet              pixel DDPM UNet2DModel (CIFAR-10 style; class-conditional ImageNet-64 style)  teachers/unet.py
    edm               EDM/Karras-preconditioned denoisers D(x, sigma, class)                        teachers/edm.py
    stable_diffusion  SD1.x / SD2.x                                                                  teachers/stable_diffusion.py
    sdxl              SDXL                                                                           teachers/stable_diffusion.py
    sd3, flux, sana   rectified-flow transformers                                                    teachers/flow_transformer.py
"""
from onestep.teachers.base import Teacher
from onestep.teachers.digits import DigitsTeacher
from onestep.teachers.edm import EDMPrecond, EDMTeacher
from onestep.teachers.flow_transformer import FluxTeacher, SanaTeacher, SD3Teacher
from onestep.teachers.gmm import GaussianMixture, GMMTeacher
from onestep.teachers.latent import PromptCondition
from onestep.teachers.loading import TeacherFilesMissingError, TeacherWeightsError
from onestep.teachers.stable_diffusion import SDXLTeacher, StableDiffusionTeacher
from onestep.teachers.unet import UNetTeacher

__all__ = [
    "Teacher", "DigitsTeacher", "GaussianMixture", "GMMTeacher", "UNetTeacher", "EDMPrecond", "EDMTeacher",
    "StableDiffusionTeacher", "SDXLTeacher", "SD3Teacher", "FluxTeacher", "SanaTeacher", "PromptCondition", "TeacherFilesMissingError", "TeacherWeightsError",
]
