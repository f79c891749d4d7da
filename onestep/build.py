"""Turn a validated RunConfig into objects: teacher, student, objective, data."""
from __future__ import annotations

from onestep.config import RunConfig, section_config
from onestep.registry import OBJECTIVES, TEACHERS, load_builtin


def build_teacher(cfg: RunConfig):
    load_builtin()
    if cfg.teacher.get("name") in (None, "none"):
        return None
    cls, tcfg = section_config("teacher", cfg.teacher, TEACHERS)
    return cls.from_config(tcfg).freeze()


def build_student(cfg: RunConfig, teacher):
    student = _build_student(cfg, teacher)
    if cfg.student.attention is not None:
        from onestep.config import ConfigError
        from onestep.kernels import set_attention_backend

        try:
            set_attention_backend(student, cfg.student.attention)
        except (RuntimeError, ValueError) as e:  # e.g. xformers missing or on CPU: the config's problem
            raise ConfigError(f"student.attention={cfg.student.attention}: {e}") from None
    return student


def _build_student(cfg: RunConfig, teacher):
    from onestep.student import AvgVelocityUNet, MLPAvgVelocity, student_from_teacher

    s = cfg.student
    if s.init == "teacher":
        if teacher is None:
            raise ValueError("student.init=teacher needs a teacher; set teacher.name or student.init=scratch")
        return student_from_teacher(teacher, s.interval_scale)
    if s.backbone == "digits_unet":
        from onestep.teachers.digits import TIME_SCALE, new_digits_unet

        unet = new_digits_unet()
        if s.interval_embedding:
            return AvgVelocityUNet.from_velocity_unet(unet, TIME_SCALE, s.interval_scale)
        return AvgVelocityUNet(unet, TIME_SCALE)
    dim = teacher.sample_shape[0] if teacher is not None else 2
    return MLPAvgVelocity(dim, interval_scale=s.interval_scale)


def build_data(cfg: RunConfig, teacher):
    from onestep.data import MixtureData, TensorData, load_digits

    if cfg.data.name == "digits":
        return TensorData(load_digits("train").images)
    from onestep.teachers.gmm import GMMTeacher

    if not isinstance(teacher, GMMTeacher):
        raise ValueError("data.name=gmm draws from the teacher's mixture: set teacher.name=gmm")
    return MixtureData(teacher.mixture)


def build_objective(cfg: RunConfig, student, teacher):
    cls, ocfg = section_config("objective", cfg.objective, OBJECTIVES)
    return cls(student, teacher, ocfg)
