"""The analytic Gaussian-mixture teacher (exact velocity, flow map and samples)."""
from onestep.teachers.gmm.teacher import GaussianMixture, GMMTeacher, GMMTeacherConfig, four_component_mixture

__all__ = ["GaussianMixture", "GMMTeacher", "GMMTeacherConfig", "four_component_mixture"]
