"""Turn a validated RunConfig into objects: teacher, student, objective, data."""
from __future__ import annotations

import dataclasses

import torch

from onestep.config import RunConfig, section_config, teacher_families
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES, TEACHERS, load_builtin


def build_teacher(cfg: RunConfig):
    load_builtin()
    if not cfg.has_teacher:
        return None
    cls, tcfg = section_config("teacher", cfg.teacher, TEACHERS)
    return cls.from_config(tcfg).freeze()


def build_student(cfg: RunConfig, teacher):
    student = _build_student(cfg, teacher)
    adapt_trainable_copy(student, cfg.student, is_student=True)
    if cfg.student.attention is not None:
        from onestep.kernels import set_attention_backend

        try:
            set_attention_backend(student, cfg.student.attention)
        except (RuntimeError, ValueError) as e:  # e.g. xformers missing or on CPU: the config's problem
            raise ConfigError(f"student.attention={cfg.student.attention}: {e}") from None
    # how the objective's student samples (e.g. sCM's consistency sampler) before the objective is built, also
    # for students rebuilt without it; the prediction type is the objective's to switch (Lightning's stages)
    objective, objective_cfg = section_config("objective", cfg.objective, OBJECTIVES)
    spec = objective.sampler_spec(objective_cfg, 0, teacher)
    student.set_sampler_spec(dataclasses.replace(spec, prediction_type=None))
    return student


def _build_student(cfg: RunConfig, teacher):
    from onestep.student import AvgVelocityUNet

    student = _new_student(cfg, teacher)
    for key in ("time_smoothing", "time_scale"):
        if getattr(cfg.student, key) and not isinstance(student, AvgVelocityUNet):
            raise ConfigError(f"student.{key} is implemented for UNet2DModel students (the digits UNet), "
                              f"not {type(student).__name__}; leave it unset")
    if cfg.student.time_smoothing > 0:
        student.smooth_time_embedding(cfg.student.time_smoothing)
    if cfg.student.dropout is not None:
        set_dropout(student, cfg.student.dropout)
    return student


def set_dropout(net, rate: float) -> None:
    """Set the rate of every dropout layer of `net` (the backbone's own layers: diffusers' ResNet blocks and
    attention outputs); a student without any is a config error, not a silent no-op."""
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    if not layers:
        raise ConfigError(f"student.dropout: the {type(net).__name__} student has no dropout layers; leave it unset")
    for layer in layers:
        layer.p = rate


def _new_student(cfg: RunConfig, teacher):
    from onestep.student import AvgVelocityUNet, MLPAvgVelocity, student_from_teacher

    s = cfg.student
    if s.init == "teacher":
        if teacher is None:
            raise ValueError("student.init=teacher needs a teacher; set teacher.name or student.init=scratch")
        return student_from_teacher(teacher, s.interval_scale, s.time_scale, s.interval_embedding)
    if s.backbone == "digits_unet":
        from onestep.teachers.digits import TIME_SCALE, new_digits_unet

        unet = new_digits_unet()
        time_scale = TIME_SCALE if s.time_scale is None else s.time_scale
        if s.interval_embedding:
            return AvgVelocityUNet.from_velocity_unet(unet, time_scale, s.interval_scale)
        return AvgVelocityUNet(unet, time_scale)
    dim = teacher.sample_shape[0] if teacher is not None else 2
    return MLPAvgVelocity(dim, interval_scale=s.interval_scale)


def build_data(cfg: RunConfig, teacher):
    from onestep.data import MixtureData, TensorData, load_digits

    if cfg.data.name == "digits":
        return TensorData(load_digits("train").images)
    if cfg.data.name in ("image_folder", "prompts", "class_labels", "teacher_samples"):
        return _build_adapter_data(cfg, teacher)
    from onestep.teachers.gmm import GMMTeacher

    if not isinstance(teacher, GMMTeacher):
        raise ValueError("data.name=gmm draws from the teacher's mixture: set teacher.name=gmm")
    return MixtureData(teacher.mixture)


def build_objective(cfg: RunConfig, student, teacher):
    cls, ocfg = section_config("objective", cfg.objective, OBJECTIVES)
    objective = cls(student, teacher, ocfg)
    # the objective's teacher-copied trainable networks (f-distill's fake score, SMD's mixture net) get the
    # student's LoRA adapters and checkpointing: a full-size fake score would cost what a full student does
    for copy_net in _trainable_teacher_copies(objective):
        adapt_trainable_copy(copy_net, cfg.student, is_student=False)
    return objective


# ------------------------------------------------------------------------------------------------
# memory-saving options of trainable teacher copies: LoRA adapters, gradient checkpointing, fp32 masters


def _trainable_teacher_copies(objective) -> list:
    """TeacherStudent / AvgVelocityUNet networks of the objective other than the student and teacher."""
    from onestep.student import AvgVelocityUNet, TeacherStudent

    found = []
    for name, module in objective.named_modules():
        top = name.split(".")[0]
        if not name or top in ("student", "teacher") or not isinstance(module, (TeacherStudent, AvgVelocityUNet)):
            continue
        if not any(module is f or _is_inside(module, f) for f in found):
            found.append(module)
    return found


def _is_inside(module, outer) -> bool:
    return any(m is module for m in outer.modules())


def _backbone_and_interval_prefixes(net) -> tuple:
    """(the network LoRA adapts, names of parameters that always train: the interval embedding)."""
    from onestep.student import AvgVelocityUNet, TeacherStudent

    if isinstance(net, TeacherStudent):
        return net.backbone, "backbone.", ("interval_embedding.",)
    if isinstance(net, AvgVelocityUNet):
        # the digits student embeds t - r through the UNet's own class embedding
        return net.unet, "unet.", ("unet.class_embedding.",) if net.has_interval_embedding else ()
    return None, "", ()


def add_lora(net, rank: int, alpha: float | None, targets) -> int:
    """peft LoRA adapters (rank, alpha) on `net`'s backbone layers whose names end with `targets`; every
    other backbone parameter is frozen, the interval embedding stays trainable. Standard peft layers
    (`LoraConfig` + `inject_adapter_in_model`), so `peft.get_peft_model_state_dict(backbone)` exports
    them. A backbone that already holds adapters (a copy of a LoRA student) is only re-frozen. Returns the
    number of trainable parameters."""
    backbone, prefix, always = _backbone_and_interval_prefixes(net)
    if backbone is None:
        raise ConfigError(f"student.lora_rank: LoRA needs a diffusers backbone; {type(net).__name__} has none")
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        raise ConfigError("student.lora_rank > 0 needs peft: pip install 'onestep[lora]' "
                          "(or pip install peft)") from None
    if not any(isinstance(m, BaseTunerLayer) for m in backbone.modules()):
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                            lora_dropout=0.0, init_lora_weights=True)  # lora_B = 0: equals the teacher at init
        try:
            inject_adapter_in_model(config, backbone)
        except ValueError as e:  # no module matches the targets
            raise ConfigError(f"student.lora_targets={list(targets)}: {' '.join(str(e).split())[:300]}") from None
    trainable = 0
    for name, p in net.named_parameters():
        keep = "lora_" in name or name.startswith(always)
        p.requires_grad_(keep)
        trainable += p.numel() if keep else 0
    return trainable


def enable_gradient_checkpointing(net) -> int:
    """diffusers' `enable_gradient_checkpointing()` on the outermost diffusers models inside `net` that
    support it; returns how many. None is a ConfigError."""
    from diffusers import ModelMixin

    enabled = []
    for module in net.modules():
        if isinstance(module, ModelMixin) and getattr(module, "_supports_gradient_checkpointing", False) \
                and not any(_is_inside(module, outer) for outer in enabled):
            module.enable_gradient_checkpointing()
            enabled.append(module)
    if not enabled:
        raise ConfigError(f"student.gradient_checkpointing: {type(net).__name__} holds no diffusers model that "
                          "supports it")
    return len(enabled)


def upcast_trainable(net) -> None:
    """Trainable float16/bfloat16 parameters to float32: AdamW updates fp32 master weights (a bf16 teacher's
    copy would otherwise train in bf16); mixed precision (train.mixed_precision) keeps the compute in bf16."""
    for p in net.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def adapt_trainable_copy(net, s, is_student: bool) -> None:
    """Apply student.lora_* and student.gradient_checkpointing to a trainable copy of the teacher."""
    if s.lora_rank > 0:
        add_lora(net, s.lora_rank, s.lora_alpha, s.lora_targets)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    upcast_trainable(net)


# ------------------------------------------------------------------------------------------------
# data of the adapter teachers


def _build_adapter_data(cfg: RunConfig, teacher):
    from onestep.data import ClassLabelData, ImageFolderData, PromptData, load_prompts

    d = cfg.data
    name = cfg.teacher.get("name")
    if teacher is None or len(teacher.sample_shape) != 3:
        raise ConfigError(f"data.name={d.name} needs an image teacher ({', '.join(teacher_families(adapter=True))})")
    if d.name == "prompts":
        return PromptData(load_prompts(d.path), teacher, d.teacher_steps, d.teacher_guidance)
    if d.name == "class_labels":
        if teacher.num_classes is None:
            raise ConfigError(f"data.name=class_labels: teacher {name} ({cfg.teacher.get('path')}) is unconditional "
                              "(no class embedding); use data.name=teacher_samples or image_folder")
        return ClassLabelData(teacher, d.teacher_steps, d.teacher_guidance)
    if d.name == "teacher_samples":
        if teacher.num_classes is not None:
            raise ConfigError(f"data.name=teacher_samples draws unconditional samples, but teacher {name} is "
                              "class-conditional: use data.name=class_labels")
        return ClassLabelData(teacher, d.teacher_steps, d.teacher_guidance, labels=False)
    if teacher.num_classes is not None:
        raise ConfigError(f"data.name=image_folder has no labels, but teacher {name} is class-conditional: use "
                          "data.name=class_labels with data.teacher_steps >= 1")
    return ImageFolderData(d.path, teacher, d.num_workers)
