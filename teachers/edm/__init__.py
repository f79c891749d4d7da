"""EDM / Karras-preconditioned denoisers D(x, sigma, class).

`teacher.py` the adapter, `tiny.py` its tiny builder, `full_size.py` its full-size spec."""
from onestep.teachers.edm.teacher import EDMPrecond, EDMTeacher, EDMTeacherConfig, karras_sigmas

__all__ = ["EDMPrecond", "EDMTeacher", "EDMTeacherConfig", "karras_sigmas"]
