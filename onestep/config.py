"""Run configuration: omegaconf structured configs (dataclasses), YAML files and key=value overrides.

Sections `teacher` and `objective` are open dicts at the top level; each is then validated against
the `Config` dataclass of the teacher or objective its `name` selects, so every key is checked.
An unknown key, a wrong type or an unknown name is a `ConfigError` whose one-line message names the
key and the allowed values (the CLI prints it and exits with code 2). So is a YAML file that cannot be
used (not UTF-8, a syntax error, a top level or a section that is not a mapping), named with the line
and column, and a malformed `key=value` override. YAML is read with yaml's SafeLoader: tags such as
`!!python/object` are refused, never constructed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, Node, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from onestep.errors import ConfigError


@dataclass
class StudentSection:
    init: str = "teacher"        # "teacher": copy the teacher's backbone; "scratch": a new backbone
    backbone: str = "digits_unet"  # for init=scratch: "digits_unet" or "mlp"
    interval_embedding: bool = True  # embed t - r (False: a plain velocity model, e.g. a teacher)
    # the interval embedding sees interval_scale * (t - r); None: the backbone's time scale (1000 for the
    # digits UNet). MeanFlow prefers 1: the JVP differentiates along t, and 1000 (t - r) makes du/dt huge
    interval_scale: Optional[float] = None
    # std (flow time) of a Gaussian jitter of t that the student's time embeddings are averaged over, at
    # init (AvgVelocityUNet.smooth_time_embedding; digits UNet students). 0: none. MeanFlow/sCM: ~0.005
    time_smoothing: float = 0.0
    # the rate of the student backbone's dropout layers while it trains (null: the backbone's own, 0 for the
    # digits UNet); sampling and evaluation run in eval mode, without it. Consistency training trains with
    # dropout (iCT/ECT: 0.2-0.3); sCM's and MeanFlow's JVPs replay the primal pass's masks
    dropout: Optional[float] = None
    # the UNet's timestep is time_scale * t (digits UNet students; null: the teacher's, 1000 for the shipped
    # digits teacher). 1 is SANA-Sprint's "dense" time embedding (spec 7.1): a teacher fine-tuned with it
    # (configs/digits_teacher_dense.yaml) has a smooth d/dt for the JVPs of MeanFlow and sCM
    time_scale: Optional[float] = None
    # the student's attention: sdpa | xformers | math | fused | fused_triton (null: the backbone's own). JVPs
    # (MeanFlow, sCM) need math, fused or fused_triton; fused is onestep's blockwise kernel with forward-mode AD
    # (onestep.kernels), fused_triton the same kernel in Triton (CUDA; opt-in until checked on a GPU)
    attention: Optional[str] = None
    # diffusers' enable_gradient_checkpointing() on the student's backbone: activations recomputed in
    # backward (less memory, ~30 % more compute); same loss and gradients
    gradient_checkpointing: bool = False
    # 0: full fine-tune. > 0: peft LoRA adapters of this rank on the backbone's attention/linear layers
    # (`lora_targets`, module-name suffixes); only they and the interval embedding train. The objective's
    # teacher-copied networks (f-distill's fake score, SMD's mixture net) get the same adapters
    lora_rank: int = 0
    lora_alpha: Optional[float] = None  # LoRA scale alpha / rank; None: alpha = rank
    lora_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class DataSection:
    # "digits" (sklearn digits, train split), "gmm" (teacher's mixture); for the adapter teachers:
    # "image_folder" (images in data.path, resized to the teacher's resolution, VAE-encoded for latent
    # teachers), "prompts" (a .txt/.jsonl prompts file in data.path, encoded by the teacher),
    # "class_labels" (uniform random labels of a class-conditional teacher), "teacher_samples" (none).
    # image_folder has no captions: with a text-to-image teacher its batches are unconditional (cond None:
    # the teacher's empty-prompt condition)
    name: str = "digits"
    batch_size: int = 64
    path: Optional[str] = None
    # prompts / class_labels / teacher_samples batches carry x = the teacher's samples from fresh noise with
    # this many steps (data-free distillation); 0: no samples, x is a zero placeholder of the latent
    # shape, which only objectives that read x for its shape accept (f-distill without discriminator)
    teacher_steps: int = 0
    teacher_guidance: Optional[float] = None  # CFG scale of those teacher samples (None: no guidance)
    num_workers: int = 4          # image_folder: threads decoding a batch's files (read lazily, per process)


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
    # how several processes share the work (onestep/parallel.py): "auto" (what `accelerate launch` was configured
    # for), "ddp", "fsdp" (torch FSDP2: parameters, gradients and optimizer state sharded) or "deepspeed" (ZeRO-2)
    distributed: str = "auto"
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
    # the demo's report also scores teacher (50 steps) and student on the noise seeds seed + 1, ... and leads
    # with the paired ratio's mean ± sd over all of them: one seed of 540 images moves digits-FID by ~0.3
    noise_seeds: int = 5


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

    @property
    def has_teacher(self) -> bool:
        """False for a run trained from data: `teacher: {name: none}` (or no name)."""
        return self.teacher.get("name") not in (None, "none")


#: omegaconf's type errors, reworded as what the key needs ({v}: the value given, as _kind shows it)
_TYPE_ERRORS = [
    (re.compile(r"Value '.*' of type '\w+' could not be converted to Integer"), "must be an integer, got {v}"),
    (re.compile(r"Value '.*' of type '\w+' could not be converted to Float"), "must be a number, got {v}"),
    (re.compile(r"Value '.*' is not a valid bool"), "must be true or false, got {v}"),
    (re.compile(r"Cannot convert '\w+' to string"), "must be a string, got {v}"),
    (re.compile(r"Invalid value assigned: AnyNode is not a ListConfig"), "must be a list, got {v}"),
    (re.compile(r"Incompatible value 'None' for field of type '(\w+)'"), "must be {t}, got null"),
]
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    if key and hasattr(err, "value"):
        for pattern, wording in _TYPE_ERRORS:
            m = pattern.search(msg)
            if m:
                value = err.value
                if OmegaConf.is_config(value):
                    value = OmegaConf.to_container(value)
                elif isinstance(value, Node):  # a scalar still wrapped in omegaconf's node
                    value = value._value()
                wanted = _TYPE_WORDS.get(m.groups()[0], "set") if m.groups() else ""
                return f"{key} {wording.format(v=_kind(value), t=wanted)}"
    return f"{key}: {msg}" if key and key not in msg else msg


def _check_keys(section: str, given: dict, dc: type, entry: str | None = None) -> None:
    names = {f.name for f in dataclasses.fields(dc)}
    # a Config may list keys it replaced (class attribute `retired_keys`: old key -> (new key, conversion))
    retired = getattr(dc, "retired_keys", {})
    for key in given:
        if key not in names:
            where = key if section == "config" else f"{section}.{key}"
            if key in retired:
                new, conversion = retired[key]
                raise ConfigError(f"{where} is no longer a key: use {section}.{new}={json.dumps(given[key])} "
                                  f"({conversion})")
            # the entry matters: options of one objective are unknown keys to another
            of = f" (the options of {section} {entry})" if entry is not None else ""
            raise ConfigError(f"unknown key {where}; allowed: {', '.join(sorted(names))}{of}")


#: the sections whose value must be a mapping (the dataclass sections, and teacher/objective)
MAPPING_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("name", "output_dir", "seed"))


def _check_run_keys(values, source: str = "a config") -> None:
    """Unknown keys in the top level or a fixed section, with the allowed names (teacher and
    objective keys are checked later, against the Config of the entry their `name` selects)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values "
                          f"(e.g. `train: {{steps: 100}}`), got {_kind(values)}")
    _check_keys("config", values, RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name not in values or f.name not in MAPPING_SECTIONS:
            continue
        section = values[f.name]
        if not isinstance(section, dict):
            # e.g. `teacher: digits` instead of `teacher: {name: digits}`
            hint = f"{f.name}: {{name: {section}}}" if f.name in ("teacher", "objective") and isinstance(section, str) \
                else f"{f.name}: {{key: value, ...}}"
            raise ConfigError(f"{f.name} must be a mapping of keys to values (e.g. `{hint}`), got {_kind(section)}")
        if dataclasses.is_dataclass(f.default_factory):
            _check_keys(f.name, section, f.default_factory)


def _kind(value) -> str:
    """How a wrong value reads in a message: its type and a short repr."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _load_yaml(path: Path):
    """A YAML file as an omegaconf node; every way the file can be unreadable is a one-line ConfigError
    naming the file (and the line and column, or the byte offset, of the problem)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config {path} cannot be read: {e.strerror or e}") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                          "(save it as UTF-8)") from None
    try:
        # safe_load first: omegaconf reads a file holding one word as {word: None}; its own loader
        # (yaml's SafeLoader, so tags such as !!python/object are refused, never run) then adds its
        # checks, e.g. duplicate keys
        top = yaml.safe_load(raw)
        if top is not None and not isinstance(top, (dict, list)):
            raise ConfigError(f"config {path}: the top level must be a mapping of keys to values, "
                              f"got a single value ({_kind(top)})")
        return OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join((e.problem or e.context or "invalid YAML").split())
        raise ConfigError(f"config {path}: YAML error{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: YAML error: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise ConfigError(f"config {path} cannot be read: {' '.join(str(e).split())}") from None


_DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _parse_overrides(overrides: list[str]):
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        key = item.split("=", 1)[0]
        if not _DOTTED_KEY.fullmatch(key):
            raise ConfigError(f"override {item!r}: {key!r} is not a key like train.steps "
                              "(letters, digits and _, sections separated by single dots)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except yaml.YAMLError:
        for item in overrides:  # which one
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or " ".join(str(e).split())
                raise ConfigError(f"override {item!r}: cannot parse the value ({problem})") from None
        raise


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


def _migrate_retired_keys(values: dict, source: str) -> None:
    """A run's saved config.yaml written before an objective renamed a key: the old key becomes the new one (the
    `retired_keys` conversion is the same number), with a warning; user configs are refused instead."""
    import warnings

    from onestep.registry import OBJECTIVES

    objective = values.get("objective")
    if not isinstance(objective, dict) or objective.get("name") not in OBJECTIVES:
        return
    retired = getattr(OBJECTIVES.get(objective["name"]).Config, "retired_keys", {})
    for old, (new, conversion) in retired.items():
        if old in objective and new not in objective:
            objective[new] = objective.pop(old)
            warnings.warn(f"{source}: objective.{old} read as objective.{new}={json.dumps(objective[new])} "
                          f"({conversion})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                saved_run: bool = False) -> RunConfig:
    """Merge defaults <- YAML file <- `key=value` overrides, then validate every section. `saved_run`: the file
    is a run's own config.yaml, whose retired keys are converted (see `_migrate_retired_keys`)."""
    layers = []
    if path is not None:
        file = find_config(str(path))
        layers.append((f"config {file}", _load_yaml(file)))
    if overrides:
        layers.append(("the overrides", _parse_overrides(overrides)))
    try:
        cfg = OmegaConf.structured(RunConfig)
        for source, layer in layers:
            if isinstance(layer, ListConfig):
                raise ConfigError(f"{source}: the top level must be a mapping of keys to values, got a list")
            values = OmegaConf.to_container(layer)
            if saved_run and isinstance(values, dict) and source.startswith("config "):
                _migrate_retired_keys(values, source)
            _check_run_keys(values, source)
            train = values.get("train")
            if isinstance(train, dict) and train.get("mixed_precision") is False:
                train["mixed_precision"] = "no"  # YAML 1.1 reads a bare `no` as false
            cfg = _merge(cfg, values)
        # interpolations (${...}) are resolved here, so their errors are config errors too
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    validate(run)
    return run


def _merge(cfg, values: dict, prefix: str = ""):
    """OmegaConf.merge(cfg, values) where every failure is a ConfigError naming the key. omegaconf
    raises a plain TypeError (no key) for a mapping given where a list is expected, and vice versa."""
    try:
        return OmegaConf.merge(cfg, values)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{prefix}{_one_line(e)}") from None
    except (TypeError, ValueError):
        key, node, value = _mismatched_key(cfg, values)
        expected = ("a list" if isinstance(node, ListConfig)
                    else "a mapping" if isinstance(node, DictConfig) else "a value")
        raise ConfigError(f"{prefix}{key} must be {expected}, got {_kind(value)}") from None


def _mismatched_key(cfg, values: dict, path: tuple = ()):
    """(dotted key, node, given value) of the first key whose value cannot be merged into cfg."""
    for key, value in values.items():
        try:
            OmegaConf.merge(cfg, {key: value})
        except OmegaConfBaseException:
            continue
        except (TypeError, ValueError):
            node = cfg._get_node(key) if isinstance(cfg, DictConfig) and key in cfg else None
            if isinstance(value, dict) and isinstance(node, DictConfig):
                return _mismatched_key(node, value, path + (key,))
            return ".".join(map(str, path + (key,))), node, value
    return ".".join(map(str, path)) or "config", cfg, values


def section_config(section: str, values: dict, registry) -> tuple[type, Any]:
    """Look up `values['name']` in `registry` and build that entry's Config from the other keys."""
    from onestep.registry import UnknownNameError

    values = dict(values)
    name = values.pop("name", None)
    if name is None:
        raise ConfigError(f"{section}.name is required; allowed: {', '.join(registry.names())}")
    if not isinstance(name, str):
        raise ConfigError(f"{section}.name must be a name, got {_kind(name)}; allowed: {', '.join(registry.names())}")
    try:
        cls = registry.get(name)
    except UnknownNameError as e:
        raise ConfigError(f"{section}.name: {e}") from None
    dc = cls.Config
    _check_keys(section, values, dc, entry=name)
    merged = _merge(OmegaConf.structured(dc), values, prefix=f"{section}.")
    try:
        return cls, OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{section}.{_one_line(e)}") from None


def validate(run: RunConfig) -> None:
    from onestep.registry import OBJECTIVES, TEACHERS, load_builtin

    load_builtin()
    if run.has_teacher:
        teacher_cls, teacher_cfg = section_config("teacher", run.teacher, TEACHERS)
        # a teacher checks its options before any weights are loaded (as objectives do)
        teacher_cls.check_config(teacher_cfg)
    obj_cls, obj_cfg = section_config("objective", run.objective, OBJECTIVES)
    obj_cls.check_config(obj_cfg, ... if run.has_teacher else None)
    _check_optimizer_options(obj_cfg)
    choices = {
        "student.init": (run.student.init, ("teacher", "scratch")),
        "student.backbone": (run.student.backbone, ("digits_unet", "mlp")),
        "student.attention": (run.student.attention or "sdpa", ("sdpa", "xformers", "math", "fused", "fused_triton")),
        "data.name": (run.data.name, DATA_NAMES),
        "train.mixed_precision": (run.train.mixed_precision, ("no", "bf16", "fp16")),
        "train.device": (run.train.device, ("auto", "cpu")),
        "train.distributed": (run.train.distributed, ("auto", "ddp", "fsdp", "deepspeed")),
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
        "eval.batch_size": (ev.batch_size, 1), "data.num_workers": (run.data.num_workers, 0),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    for key, steps in {"train.sample_steps": tr.sample_steps, "eval.teacher_steps": ev.teacher_steps,
                       "eval.student_steps": ev.student_steps}.items():
        if any(k < 1 for k in steps):
            raise ConfigError(f"{key} must list step counts >= 1, got {list(steps)}")
    if not tr.sample_steps:
        raise ConfigError("train.sample_steps must list at least one step count, e.g. [1, 2]")
    if not tr.clip_grad_norm > 0:
        raise ConfigError(f"train.clip_grad_norm must be > 0, got {tr.clip_grad_norm}")
    if not 0.0 <= tr.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {tr.ema_decay}")
    # these reach AdamW, torch.manual_seed and the interval embedding, which fail far from the config
    if tr.lr is not None and not (tr.lr > 0 and math.isfinite(tr.lr)):
        raise ConfigError(f"train.lr must be a finite number > 0 (or null: the objective's default), got {tr.lr}")
    if tr.weight_decay is not None and not (tr.weight_decay >= 0 and math.isfinite(tr.weight_decay)):
        raise ConfigError(f"train.weight_decay must be a finite number >= 0 (or null), got {tr.weight_decay}")
    for key, seed in (("seed", run.seed), ("eval.seed", ev.seed)):
        if not 0 <= seed < 2**32:
            raise ConfigError(f"{key} must be in [0, 2**32), got {seed}")
    scale = run.student.interval_scale
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"student.interval_scale must be a finite number > 0 (or null: the backbone's time "
                          f"scale), got {scale}")
    tscale = run.student.time_scale
    if tscale is not None and not (tscale > 0 and math.isfinite(tscale)):
        raise ConfigError(f"student.time_scale must be a finite number > 0 (or null: the teacher's), got {tscale}")
    if not (run.student.time_smoothing >= 0 and math.isfinite(run.student.time_smoothing)):
        raise ConfigError(f"student.time_smoothing must be a finite number >= 0, got {run.student.time_smoothing}")
    drop = run.student.dropout
    if drop is not None and not 0 <= drop < 1:
        raise ConfigError(f"student.dropout must be in [0, 1) (or null: the backbone's own), got {drop}")
    # combinations
    teacher_name = run.teacher.get("name")
    if run.student.init == "teacher" and not run.has_teacher:
        raise ConfigError("student.init=teacher needs a teacher: set teacher.name or student.init=scratch")
    if run.data.name == "gmm" and teacher_name != "gmm":
        raise ConfigError("data.name=gmm draws from the teacher's mixture: it needs teacher.name=gmm")
    if run.student.init == "scratch" and run.student.backbone == "digits_unet" and run.data.name != "digits":
        raise ConfigError("student.backbone=digits_unet works on data.name=digits; use student.backbone=mlp")
    if run.student.init == "scratch" and run.student.backbone == "mlp" and run.data.name == "digits":
        raise ConfigError("student.backbone=mlp works on vector data (data.name=gmm); use student.backbone=digits_unet")
    if (getattr(obj_cls, "needs_interval", False) and run.student.init == "scratch"
            and not run.student.interval_embedding):
        raise ConfigError(f"objective {run.objective['name']} trains u(z, r, t): set student.interval_embedding=true")
    _check_adapter_options(run, obj_cls, obj_cfg)


#: data sources (data.name)
DATA_NAMES = ("digits", "gmm", "image_folder", "prompts", "class_labels", "teacher_samples")


def _teacher_capabilities(run: RunConfig):
    """The declared capabilities of the run's teacher family (None without a teacher)."""
    from onestep.registry import TEACHERS

    return TEACHERS.get(run.teacher["name"]).capabilities if run.has_teacher else None


def teacher_families(**wanted) -> list[str]:
    """The registered teacher families whose capabilities have the `wanted` values, e.g. conditioning="prompt"."""
    from onestep.registry import TEACHERS

    return [name for name, cls in TEACHERS.items()
            if all(getattr(cls.capabilities, k) == v for k, v in wanted.items())]


def _check_adapter_options(run: RunConfig, obj_cls, obj_cfg) -> None:
    """LoRA / checkpointing options and the data sources of the adapter teachers, with the teacher."""
    s, d = run.student, run.data
    teacher = run.teacher.get("name")
    caps = _teacher_capabilities(run)
    if s.lora_rank < 0:
        raise ConfigError(f"student.lora_rank must be >= 0 (0: full fine-tune), got {s.lora_rank}")
    if s.lora_alpha is not None and not (s.lora_alpha > 0 and math.isfinite(s.lora_alpha)):
        raise ConfigError(f"student.lora_alpha must be a finite number > 0 (or null: the rank), got {s.lora_alpha}")
    if s.lora_rank > 0 and not s.lora_targets:
        raise ConfigError("student.lora_targets must name at least one layer (e.g. [to_q, to_k, to_v, to_out.0])")
    if s.lora_rank > 0 and s.init != "teacher":
        raise ConfigError("student.lora_rank > 0 adapts a copy of the teacher: it needs student.init=teacher")
    if d.teacher_steps < 0:
        raise ConfigError(f"data.teacher_steps must be >= 0, got {d.teacher_steps}")
    if d.name in ("image_folder", "prompts") and not d.path:
        what = "an image folder" if d.name == "image_folder" else "a prompts file (.txt, one per line, or .jsonl)"
        raise ConfigError(f"data.name={d.name} needs data.path: {what}")
    if d.name in ("image_folder", "prompts", "class_labels", "teacher_samples") and (caps is None or not caps.adapter):
        raise ConfigError(f"data.name={d.name} serves the adapter teachers "
                          f"({', '.join(teacher_families(adapter=True))}); "
                          f"teacher.name={teacher} uses data.name=digits or gmm")
    if d.name == "prompts" and caps.conditioning != "prompt":
        raise ConfigError(f"data.name=prompts needs a text-to-image teacher "
                          f"({', '.join(teacher_families(adapter=True, conditioning='prompt'))}); "
                          f"teacher {teacher} is not conditioned on prompts")
    if d.name == "class_labels" and caps.conditioning != "class":
        raise ConfigError(f"data.name=class_labels needs a class-conditional teacher "
                          f"({' or '.join(teacher_families(adapter=True, conditioning='class'))}); "
                          f"teacher {teacher} is not"
                          + (": use data.name=prompts" if caps.conditioning == "prompt" else ""))
    if d.name == "teacher_samples" and d.teacher_steps < 1:
        raise ConfigError("data.name=teacher_samples draws x from the teacher: set data.teacher_steps >= 1")
    if d.name in ("prompts", "class_labels") and d.teacher_steps == 0 and obj_cls.reads_data(obj_cfg):
        raise ConfigError(f"data.name={d.name} with data.teacher_steps=0 has no samples x, and objective "
                          f"{run.objective.get('name')} builds its noisy points from x: set data.teacher_steps >= 1 "
                          "(teacher samples as data), or use objective fdistill with divergence=reverse_kl and "
                          "gan_weight=0")


def _check_optimizer_options(obj_cfg) -> None:
    """The AdamW options an objective's Config may carry (lr, betas, eps, weight_decay)."""
    lr = getattr(obj_cfg, "lr", None)
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"objective.lr must be a finite number > 0, got {lr}")
    betas = getattr(obj_cfg, "betas", None)
    if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"objective.betas must be two numbers in [0, 1), got {list(betas)}")
    eps = getattr(obj_cfg, "eps", None)
    if eps is not None and not eps > 0:
        raise ConfigError(f"objective.eps must be > 0, got {eps}")
    wd = getattr(obj_cfg, "weight_decay", None)
    if wd is not None and not (wd >= 0 and math.isfinite(wd)):
        raise ConfigError(f"objective.weight_decay must be a finite number >= 0, got {wd}")


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


# where two runs may differ without training differently: names, folders, threads, what is logged, saved or
# sampled along the way, and how the run is scored afterwards (a key or everything under a section)
NOT_TRAINING = ("name", "output_dir", "train.num_threads", "train.progress", "train.distributed", "data.num_workers",
                "train.checkpoint_every",
                "train.keep_checkpoints", "train.log_every", "train.sample_every", "train.sample_steps", "eval")


def _shapes_training(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_TRAINING)


def training_settings(run: RunConfig) -> dict:
    """Every setting of a run that shapes its training, flat (`{"objective.lr": 0.0003, "seed": 0, ...}`).
    The teacher and objective sections are resolved with their entry's defaults, so a recipe that spells
    out a default trains the same as one that leaves it out; values are as JSON keeps them (lists)."""
    from onestep.registry import OBJECTIVES, TEACHERS, load_builtin

    load_builtin()
    tree = OmegaConf.to_container(OmegaConf.structured(run))
    for section, registry in (("teacher", TEACHERS), ("objective", OBJECTIVES)):
        if section == "teacher" and not run.has_teacher:
            continue   # trained from data: no teacher entry to resolve defaults from; kept as written
        _, cfg = section_config(section, tree[section], registry)
        tree[section] = {"name": tree[section]["name"], **dataclasses.asdict(cfg)}

    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}
    return {k: json.loads(json.dumps(v)) for k, v in flat(tree).items() if _shapes_training(k)}


def setting_differences(ours: dict, theirs: dict) -> list[str]:
    """`key=value` (as `onestep distill` overrides) for every setting of ours that is not theirs."""
    return [f"{k}={json.dumps(ours.get(k))}" for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
