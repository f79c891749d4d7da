"""Rectified-flow transformers: SD3 / SD3.5, FLUX.1 and SANA (one base adapter, three families).

`teacher.py` the adapters, `tiny.py` their tiny builders, `full_size.py` their full-size specs."""
from onestep.teachers.flow_transformer.teacher import (
    FluxTeacher,
    FluxTeacherConfig,
    SanaTeacher,
    SanaTeacherConfig,
    SD3Teacher,
    SD3TeacherConfig,
)

__all__ = ["SD3Teacher", "SD3TeacherConfig", "FluxTeacher", "FluxTeacherConfig", "SanaTeacher", "SanaTeacherConfig"]
