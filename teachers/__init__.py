"""Teachers: frozen multi-step models seen through one interface in flow time (t = 1 is noise).

Importing this package registers the built-in teachers in `onestep.registry.TEACHERS`.
"""
from onestep.teachers.base import Teacher
from onestep.teachers.digits import DigitsTeacher
from onestep.teachers.gmm import GaussianMixture, GMMTeacher

__all__ = ["Teacher", "DigitsTeacher", "GaussianMixture", "GMMTeacher"]
