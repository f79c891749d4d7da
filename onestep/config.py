"""Run configuration: omegaconf structured configs (dataclasses), YAML files and key=value overrides.

Sections `teacher` and `objective` are open dicts at the top level; each is then validated against
the `Config` dataclass of the teacher or objective its `name` selects, so every key is checked.
An unknown key, a wrong type or an unknown name is a `ConfigError` whose one-line message names the
key and the allowed values (the CLI prints it and exits with code 2).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad configuration; the message is one line meant for the user."""


@dataclass
class StudentSection:
    init: str = "teacher"        # "teacher": copy the teacher's backbone; "scratch": a new backbone
    backbone: str = "digits_unet"  # for init=scratch: "digits_unet" or "mlp"
    interval_embedding: bool = True  # embed t - r (False: a plain velocity model, e.g. a teacher)
    # the interval embedding sees interval_scale * (t - r); None: the backbone's time scale (1000 for the
    # digits UNet). MeanFlow prefers 1: the JVP differentiates along t, and 1000 (t - r) makes du/dt huge
    interval_scale: Optional[float] = None


@dataclass
class DataSection:
    name: str = "digits"         # "digits" (sklearn digits, train split) or "gmm" (teacher's mixture)
    batch_size: int = 64


@dataclass
class TrainSection:
    steps: int = 1000
    lr: Optional[float] = None   # overrides the objective's default learning rate (all groups)
    weight_decay: Optional[float] = None
    warmup_steps: int = 0
    decay_steps: int = 0         # linear LR decay to 0 over the last decay_steps steps (0: constant)
    clip_grad_norm: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate)
    ema_decay: float = 0.999     # with diffusers' warm-up: min(decay, (1 + n) / (10 + n))
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0        # 0: only at the end
    sample_steps: List[int] = field(default_factory=lambda: [1, 2])
    max_nonfinite: int = 5       # this many non-finite losses in a row stop the run
    device: str = "auto"         # "auto" (what accelerate sees) or "cpu"
    num_threads: int = 0         # CPU threads for torch; 0 = leave torch's default
    progress: bool = True


@dataclass
class EvalSection:
    num_samples: int = 0         # 0: as many as the held-out real images (same N for every row)
    teacher_steps: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 50])
    student_steps: List[int] = field(default_factory=lambda: [1, 2])
    solver: str = "euler"
    batch_size: int = 256
    seed: int = 1234


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    teacher: Dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    student: StudentSection = field(default_factory=StudentSection)
    objective: Dict[str, Any] = field(default_factory=lambda: {"name": "splitmeanflow"})
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _check_keys(section: str, given: dict, dc: type) -> None:
    names = {f.name for f in dataclasses.fields(dc)}
    for key in given:
        if key not in names:
            where = key if section == "config" else f"{section}.{key}"
            raise ConfigError(f"unknown key {where}; allowed: {', '.join(sorted(names))}")


def _check_run_keys(values) -> None:
    """Unknown keys in the top level or a fixed section, with the allowed names (teacher and
    objective keys are checked later, against the Config of the entry their `name` selects)."""
    if not isinstance(values, dict):
        raise ConfigError("a config must be a mapping of keys to values")
    _check_keys("config", values, RunConfig)
    for f in dataclasses.fields(RunConfig):
        section, factory = values.get(f.name), f.default_factory
        if isinstance(section, dict) and dataclasses.is_dataclass(factory):
            _check_keys(f.name, section, factory)


def find_config(name_or_path: str) -> Path:
    """A YAML path, or the name of a config shipped with onestep (e.g. `demo`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = resources.files("onestep.configs") / f"{p.stem}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(f.name[:-5] for f in resources.files("onestep.configs").iterdir() if f.name.endswith(".yaml"))
    raise ConfigError(f"config {name_or_path!r} not found; give a YAML path or one of: {', '.join(names)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Merge defaults <- YAML file <- `key=value` overrides, then validate every section."""
    try:
        layers = []
        if path is not None:
            layers.append(OmegaConf.load(find_config(str(path))))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not key=value")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.structured(RunConfig)
        for layer in layers:
            _check_run_keys(OmegaConf.to_container(layer))
            cfg = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    run = OmegaConf.to_object(cfg)
    validate(run)
    return run


def section_config(section: str, values: dict, registry) -> tuple[type, Any]:
    """Look up `values['name']` in `registry` and build that entry's Config from the other keys."""
    from onestep.registry import UnknownNameError

    values = dict(values)
    name = values.pop("name", None)
    if name is None:
        raise ConfigError(f"{section}.name is required; allowed: {', '.join(registry.names())}")
    try:
        cls = registry.get(name)
    except UnknownNameError as e:
        raise ConfigError(f"{section}.name: {e}") from None
    dc = cls.Config
    _check_keys(section, values, dc)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(dc), values)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{section}.{_one_line(e)}") from None
    return cls, OmegaConf.to_object(merged)


def validate(run: RunConfig) -> None:
    from onestep.registry import OBJECTIVES, TEACHERS, load_builtin

    load_builtin()
    if run.teacher.get("name") not in (None, "none"):
        section_config("teacher", run.teacher, TEACHERS)
    obj_cls, obj_cfg = section_config("objective", run.objective, OBJECTIVES)
    has_teacher = run.teacher.get("name") not in (None, "none")
    obj_cls.check_config(obj_cfg, ... if has_teacher else None)
    choices = {
        "student.init": (run.student.init, ("teacher", "scratch")),
        "student.backbone": (run.student.backbone, ("digits_unet", "mlp")),
        "data.name": (run.data.name, ("digits", "gmm")),
        "train.mixed_precision": (run.train.mixed_precision, ("no", "bf16", "fp16")),
        "train.device": (run.train.device, ("auto", "cpu")),
        "eval.solver": (run.eval.solver, ("euler", "heun")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    tr, ev = run.train, run.eval
    at_least = {
        "data.batch_size": (run.data.batch_size, 1), "train.steps": (tr.steps, 1),
        "train.grad_accum": (tr.grad_accum, 1), "train.checkpoint_every": (tr.checkpoint_every, 1),
        "train.keep_checkpoints": (tr.keep_checkpoints, 1), "train.log_every": (tr.log_every, 1),
        "train.warmup_steps": (tr.warmup_steps, 0), "train.decay_steps": (tr.decay_steps, 0),
        "train.sample_every": (tr.sample_every, 0), "train.max_nonfinite": (tr.max_nonfinite, 0),
        "train.num_threads": (tr.num_threads, 0), "eval.num_samples": (ev.num_samples, 0),
        "eval.batch_size": (ev.batch_size, 1),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    for key, steps in {"train.sample_steps": tr.sample_steps, "eval.teacher_steps": ev.teacher_steps,
                       "eval.student_steps": ev.student_steps}.items():
        if any(k < 1 for k in steps):
            raise ConfigError(f"{key} must list step counts >= 1, got {list(steps)}")
    if not tr.clip_grad_norm > 0:
        raise ConfigError(f"train.clip_grad_norm must be > 0, got {tr.clip_grad_norm}")
    if not 0.0 <= tr.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {tr.ema_decay}")
    # combinations
    teacher_name = run.teacher.get("name")
    if run.student.init == "teacher" and not has_teacher:
        raise ConfigError("student.init=teacher needs a teacher: set teacher.name or student.init=scratch")
    if run.data.name == "gmm" and teacher_name != "gmm":
        raise ConfigError("data.name=gmm draws from the teacher's mixture: it needs teacher.name=gmm")
    if run.student.init == "scratch" and run.student.backbone == "digits_unet" and run.data.name != "digits":
        raise ConfigError("student.backbone=digits_unet works on data.name=digits; use student.backbone=mlp")
    if run.student.init == "scratch" and run.student.backbone == "mlp" and run.data.name == "digits":
        raise ConfigError("student.backbone=mlp works on vector data (data.name=gmm); use student.backbone=digits_unet")
    if getattr(obj_cls, "needs_interval", False) and run.student.init == "scratch" and not run.student.interval_embedding:
        raise ConfigError(f"objective {run.objective['name']} trains u(z, r, t): set student.interval_embedding=true")


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))
