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


def _allowed(dc: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(dc))


def _check_keys(section: str, given: dict, dc: type, extra: tuple[str, ...] = ()) -> None:
    names = {f.name for f in dataclasses.fields(dc)} | set(extra)
    for key in given:
        if key not in names:
            raise ConfigError(f"unknown key {section}.{key}; allowed: {', '.join(sorted(names))}")


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
        cfg = OmegaConf.structured(RunConfig)
        if path is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(find_config(str(path))))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
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
    positive = {"data.batch_size": run.data.batch_size, "train.steps": run.train.steps,
                "train.grad_accum": run.train.grad_accum, "train.checkpoint_every": run.train.checkpoint_every,
                "train.keep_checkpoints": run.train.keep_checkpoints}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 0.0 <= run.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {run.train.ema_decay}")


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))
