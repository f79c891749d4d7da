"""A finished run on disk: its config, a checked checkpoint, and the student rebuilt with its weights
(what `onestep export`, `onestep eval` and the benchmarks load)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from onestep.errors import ConfigError, ExportError
from onestep.sampling import SamplerSpec

# ------------------------------------------------------------------------------------------------
# the run: config, checkpoint, student weights


@dataclass
class RunInfo:
    run_dir: Path
    cfg: object                       # the run's RunConfig
    checkpoint: Path
    step: int
    weights: str                      # "ema" or "trained"
    report: dict | None = None        # report.json of the run, if any


def resolve_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    """`step-N` (any zero padding) or None for the latest finished checkpoint of the run; it must pass
    its checksums (a truncated or altered checkpoint is refused, naming the file)."""
    from onestep.checkpoint import checkpoint_problem, finished_checkpoints

    done = finished_checkpoints(run_dir / "checkpoints")
    if not done:
        raise ExportError(f"run {run_dir} has no finished checkpoint in {run_dir / 'checkpoints'}")
    if checkpoint is None:
        found = done[-1]
    else:
        name = str(checkpoint)
        number = name[5:] if name.startswith("step-") else name
        if not number.isdigit():
            raise ExportError(f"--checkpoint must look like step-N, got {name!r}")
        matches = [p for p in done if int(p.name[5:]) == int(number)]
        if not matches:
            raise ExportError(f"checkpoint {name!r} not found in {run_dir / 'checkpoints'}; "
                              f"available: {', '.join(p.name for p in done)}")
        found = matches[0]
    problem = checkpoint_problem(found, ("ema.safetensors", "trainable.safetensors"))
    if problem is not None:
        raise ExportError(f"checkpoint {found} is corrupt: {problem}; pick another with --checkpoint "
                          f"(available: {', '.join(p.name for p in done)})")
    return found


def load_run(run: str | Path, checkpoint: str | None = None, weights: str = "ema") -> RunInfo:
    from onestep.config import load_config
    from onestep.registry import UnknownNameError

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} not found")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory: it has no config.yaml")
    try:
        cfg = load_config(run_dir / "config.yaml", saved_run=True)
    except (ConfigError, UnknownNameError) as e:
        raise ExportError(f"{run_dir / 'config.yaml'}: {e}") from None
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    needed = "ema.safetensors" if weights == "ema" else "trainable.safetensors"
    if not (ckpt / needed).is_file():
        raise ExportError(f"checkpoint {ckpt} has no {needed}")
    report = None
    if (run_dir / "report.json").is_file():
        report = json.loads((run_dir / "report.json").read_text())
    return RunInfo(run_dir, cfg, ckpt, int(ckpt.name[5:]), weights, report)


def load_student(info: RunInfo):
    """The run's student with the checkpoint's EMA (or raw trained) weights, in eval mode on CPU."""
    from safetensors.torch import load_file

    from onestep.build import build_student, build_teacher
    from onestep.config import section_config
    from onestep.registry import OBJECTIVES

    try:
        teacher = build_teacher(info.cfg)
        student = build_student(info.cfg, teacher)
    except FileNotFoundError as e:  # the student's architecture comes from the teacher's files
        raise ExportError(f"cannot rebuild the student: {str(e).splitlines()[0]}") from None
    # how the student samples by this checkpoint (e.g. Lightning's trailing grid and 1-step x0 prediction): the
    # checkpoint's sampler.json; checkpoints written before it existed ask the objective (`sampler_spec`)
    spec_file = info.checkpoint / SamplerSpec.FILE
    if spec_file.is_file():
        try:
            student.set_sampler_spec(SamplerSpec.from_dict(json.loads(spec_file.read_text())))
        except (ValueError, TypeError) as e:
            raise ExportError(f"{spec_file}: {str(e).splitlines()[0]}") from None
    else:
        objective, objective_cfg = section_config("objective", info.cfg.objective, OBJECTIVES)
        student.set_sampler_spec(objective.sampler_spec(objective_cfg, info.step, teacher))
    # trainable.safetensors holds the objective's modules, the student's under "student."; ema.safetensors the
    # EMA of the student's trained parameters under their own names (of every parameter in older checkpoints;
    # a LoRA student's frozen base never changes, so it comes from trainable.safetensors)
    params = dict(student.named_parameters())
    state, unexpected = {}, []
    if info.weights == "trained" or (info.checkpoint / "trainable.safetensors").is_file():
        raw = load_file(info.checkpoint / "trainable.safetensors")
        raw = {k[len("student."):]: v for k, v in raw.items() if k.startswith("student.")}
        known = set(params) | {n for n, _ in student.named_buffers()}   # the state dict holds buffers too
        state = {k: v for k, v in raw.items() if k in params}
        unexpected = [k for k in raw if k not in known]
    if info.weights == "ema":
        ema = load_file(info.checkpoint / "ema.safetensors")
        state.update(ema)
        unexpected += [k for k in ema if k not in params]
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(unexpected))
    if missing or unexpected:
        raise ExportError(f"checkpoint {info.checkpoint} does not match the run's student: "
                          f"{len(missing)} missing, {len(unexpected)} unexpected parameters "
                          f"(e.g. {(missing + unexpected)[0]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return student.eval().requires_grad_(False), teacher
