"""`onestep export`: a trained run -> a folder that diffusers loads and samples in the student's k steps.

    export_run("runs/demo", "exports/demo-1step")                      # stock diffusers, 1 step
    export_run("runs/demo", "exports/demo-2step", steps=2)             # stock diffusers, 2 steps
    export_run("runs/demo", "exports/demo", format="onestep")          # OneStepPipeline, any k at call time

Formats, per teacher family (an `Exporter` registered under the teacher's name decides):

* ``diffusers``: the stock pipeline of the family, loaded with ``DiffusionPipeline.from_pretrained(DIR)``
  with no onestep code, whose ``pipe(num_inference_steps=k)`` runs exactly the student's k-step sampler.
  For pixel UNets that is ``DDPMPipeline`` + ``FlowMatchEulerDiscreteScheduler(shift_terminal=1/k)``
  (sigmas exactly [1, 1 - 1/k, ..., 1/k, 0]) and a plain ``UNet2DModel``: on the uniform k-step grid
  t - r = 1/k at every step, so the interval embedding adds one constant vector to the time
  embedding, which is folded into ``time_embedding.linear_2.bias``. The export is therefore
  specific to k (``--steps``).
  Students of the teacher adapters (`TeacherStudent`) get their family's stock pipeline with the
  teacher's VAE / text encoders / tokenizers and the student's backbone, its interval embedding folded
  into the time embedding's last bias (see "students of the teacher adapters" below for the maths):
  ``stable_diffusion`` -> StableDiffusionPipeline, ``sdxl`` -> StableDiffusionXLPipeline, ``unet``
  (unconditional pixel DDPM) -> DDPMPipeline, all with a 1-step trailing DDIM (VP models: exact at
  k = 1 only; other k with ``--format onestep``, except the students below that export k = 1 only);
  ``sd3`` -> StableDiffusion3Pipeline, ``flux`` -> FluxPipeline,
  ``sana`` -> SanaPipeline, with FlowMatchEulerDiscreteScheduler on the uniform grid (any k). ``edm``
  and class-conditional UNets have no stock pipeline: a one-line error says what to use.
* ``onestep``: digits family: ``onestep.pipelines.OneStepPipeline`` with the unfolded student, any k at
  call time, loaded with ``OneStepPipeline.from_pretrained(DIR)``. VP teachers (unet, SD, SDXL): their
  stock pipeline with ``onestep.pipelines.StudentVPScheduler``, the student's own k-step sampler on the
  uniform grid (k >= 2 is exact only this way), loaded with ``DiffusionPipeline.from_pretrained(DIR)``.
  Both need onestep.
* ``lora``: peft-format LoRA (``pytorch_lora_weights.safetensors`` + ``scheduler/``) for
  ``pipe.load_lora_weights(DIR)`` on the teacher's own pipeline (SD, SDXL, SD3, FLUX, SANA): each
  changed weight's difference from the teacher, factored by truncated SVD (a LoRA-trained student's
  peft layers are merged first, so its delta has exactly its training rank); refused above a
  relative residual of LORA_TOL unless allowed.

Two kinds of student export ``--steps 1`` only, in every format (k >= 2: a one-line ExportError): Lightning
students of discrete VP teachers (unet, stable_diffusion, sdxl), which sample diffusers' trailing grid,
where t - r changes from step to step, so no one vector folds their interval embedding (and
StudentVPScheduler takes the uniform grid); and consistency-sampled students (scm, scm_ladd), whose
steps re-noise with fresh noise (their OneStepPipeline also refuses k >= 2 at call time). Lightning
students of flow-time teachers sample the uniform grid and export like any other.

Every export is written to a temporary folder beside ``out`` and renamed into place, holds weights
only as safetensors, and is byte-for-byte reproducible: exporting the same checkpoint into the same
folder again gives the same files. ``out`` must be absent, empty, or an earlier onestep export.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from onestep.checkpoint import sha256_file
from onestep.errors import ConfigError, ExportError

FORMATS = ("diffusers", "onestep", "lora")
WEIGHTS = ("ema", "trained")
MANIFEST = "onestep_export.json"
#: a fold or a scheduler grid that reproduces the student's sampler less closely than this is a bug
SELF_CHECK_TOL = 1e-4


def one_step_only(cfg, exporter) -> str | None:
    """Why this run's student exports --steps 1 only, in every format (None: it exports any k). Asked from
    the config, before any family's format advice and before loading weights."""
    from onestep.build import student_sampler

    sampler = student_sampler(cfg)
    if sampler != "avg_velocity":
        # the consistency sampler re-noises with fresh noise between steps, which no deterministic pipeline does
        return (f"this student samples with the {sampler} sampler, whose steps re-noise with fresh noise; only "
                f"--steps 1 (the same single step) exports exactly, in every format")
    objective = cfg.objective
    if (getattr(exporter, "vp_family", False) and objective.get("name") == "lightning"
            and objective.get("grid", "auto") != "uniform"):  # lightning's grid for VP teachers: trailing
        # t - r differs from step to step on the trailing grid: no single vector to fold into the backbone
        return ("this student samples on the trailing timestep grid it was trained on (lightning with a VP "
                "teacher), whose steps differ in t - r, so its interval embedding cannot be folded into one "
                "backbone for k >= 2 steps; only --steps 1 (the grid [1, 0]) exports exactly, in every format; "
                "sample k steps with onestep (student.sample)")
    return None


def torch_dtype_argument(dtype: torch.dtype) -> str:
    """`, torch_dtype=torch.bfloat16` for the model card's loading line of weights saved in a half dtype: without
    it diffusers loads the denoiser and VAE in float32 while transformers keeps the text encoders' bfloat16, and
    the pipeline's first layer meets mixed dtypes."""
    return "" if dtype == torch.float32 else f", torch_dtype=torch.{str(dtype).removeprefix('torch.')}"


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
        cfg = load_config(run_dir / "config.yaml")
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
    # what the objective had set on the student by this checkpoint (e.g. Lightning's 1-step x0 prediction)
    objective, objective_cfg = section_config("objective", info.cfg.objective, OBJECTIVES)
    objective.configure_rebuilt_student(student, objective_cfg, info.step, teacher)
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


# ------------------------------------------------------------------------------------------------
# exporters: one per teacher family


@dataclass
class ExportResult:
    """What an exporter wrote, for the model card."""
    pipeline: str                     # e.g. "DDPMPipeline (stock diffusers)"
    loader: str                       # the import line(s) of the usage snippet
    load_call: str                    # e.g. 'DiffusionPipeline.from_pretrained({path!r})'
    call_args: str                    # e.g. "batch_size=4, num_inference_steps=1"
    scheduler: str                    # scheduler class and settings, one line
    notes: list[str] = field(default_factory=list)  # markdown paragraphs
    max_abs_diff: float | None = None  # export-time self-check against onestep's sampler
    tolerance: float = SELF_CHECK_TOL  # ... and the bound it was held to
    setup: list[str] = field(default_factory=list)  # snippet lines between loading and the call ({path})
    guidance: str = "none (unconditional)"


class Exporter:
    """How the students of one teacher family are exported. Subclasses implement the formats they can."""

    #: one line describing the family, for the model card
    family = ""
    #: pipeline_tag for the model card metadata
    pipeline_tag = "unconditional-image-generation"

    #: set by export_run for --format lora: the SVD rank and whether residuals above LORA_TOL are allowed
    lora_rank: int = 64
    allow_lora_residual: bool = False

    def check(self, cfg, format: str, steps: int = 1) -> None:
        """Raise ExportError (one line) if this family cannot be exported in `format` with `steps` steps
        (cheap: no models are loaded)."""

    def write(self, student, teacher, info: RunInfo, out: Path, format: str, steps: int) -> ExportResult:
        raise NotImplementedError


EXPORTERS: dict[str, Callable[[], Exporter]] = {}


def register_exporter(*families: str):
    """Register an Exporter class for teacher names (or, for teacher-free runs, `scratch:<backbone>`)."""
    def deco(cls):
        for name in families:
            if name in EXPORTERS:
                raise ValueError(f"exporter for {name!r} registered twice")
            EXPORTERS[name] = cls
        return cls
    return deco


def family_key(cfg) -> str:
    """The teacher's name (a student lives in its teacher's space), or `scratch:<backbone>` without one."""
    return cfg.teacher["name"] if cfg.has_teacher else f"scratch:{cfg.student.backbone}"


def exporter_for(cfg) -> Exporter:
    key = family_key(cfg)
    if key not in EXPORTERS:
        raise ExportError(f"no exporter for students of teacher {key!r} yet (exporters exist for: "
                          f"{', '.join(sorted(EXPORTERS))}); add one with onestep.export.register_exporter")
    return EXPORTERS[key]()


@register_exporter("gmm", "scratch:mlp")
class NoPipelineExporter(Exporter):
    """Vector-data toys (Gaussian mixtures, MLP students): diffusers has no pipeline for them."""

    def check(self, cfg, format: str, steps: int = 1) -> None:
        raise ExportError(
            "students of the gmm teacher are MLPs on points (vector data) and diffusers has no pipeline for vector "
            "data, so there is nothing to export; load the weights from the checkpoint's ema.safetensors "
            "with onestep.build.build_student and sample with student.sample(noise, steps=k)")


@register_exporter("digits", "scratch:digits_unet")
class PixelUNetExporter(Exporter):
    """Pixel-space `UNet2DModel` students (the digits family): DDPMPipeline or OneStepPipeline."""

    family = "pixel-space diffusers UNet2DModel, flow time t (t = 1 noise), UNet timestep 1000 t, data in [-1, 1]"

    def check(self, cfg, format: str, steps: int = 1) -> None:
        if format == "lora":
            raise ExportError(
                "--format lora needs a teacher whose diffusers pipeline loads LoRA (pipe.load_lora_weights: "
                "the stable_diffusion, sdxl, sd3, flux and sana teachers); the digits family's pipeline "
                "(DDPMPipeline with a UNet2DModel) has none: use --format diffusers")

    def write(self, student, teacher, info, out, format, steps):
        from onestep.student import AvgVelocityUNet

        if not isinstance(student, AvgVelocityUNet):
            raise ExportError(f"expected a UNet2DModel student, got {type(student).__name__}")
        if student.time_scale != 1000.0 and format == "diffusers" and steps != 1:
            raise ExportError(f"the student's time scale is {student.time_scale:g} (e.g. distilled from the dense-time "
                              f"teacher), but stock diffusers' schedulers feed the UNet 1000 t; only --steps 1 folds "
                              f"that away (got --steps {steps}): use --steps 1 or --format onestep")
        if format == "diffusers":
            return self._write_stock(student, out, steps)
        return self._write_onestep(student, out, steps)

    # -- stock DDPMPipeline ----------------------------------------------------------------------
    def _write_stock(self, student, out: Path, steps: int) -> ExportResult:
        from diffusers import DDPMPipeline

        unet = (fold_interval_embedding(student.unet, steps, student.interval_scale)
                if student.has_interval_embedding else student.unet)
        dense = student.time_scale != 1000.0
        if dense:  # one step: the scheduler's timestep 1000 becomes the student's time_scale * 1
            unet = fold_time_embedding(unet, student.time_scale * 1.0)
        scheduler = stock_flow_scheduler(steps)
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        diff = _self_check(student, pipe, steps)
        pipe.save_pretrained(out, safe_serialization=True)
        sched = scheduler.config
        grid = ", ".join(f"{s:g}" for s in _scheduler_sigmas(scheduler, steps))
        notes = [
            f"`DDPMPipeline` draws the noise, calls the UNet at timestep 1000 t and lets the scheduler "
            f"step; with `shift_terminal` = 1/k the scheduler's sigmas are exactly the uniform grid "
            f"[{grid}], and its Euler update z + (sigma_next - sigma) * output is the student's step "
            + ("z_r = z_t - (t - r) u(z_t, r, t)." if student.has_interval_embedding else "(an Euler step of v)."),
        ]
        if student.has_interval_embedding:
            notes.append(
                f"The student is an average-velocity field u(z, r, t) whose t - r enters through a second "
                f"time embedding (`class_embed_type=\"timestep\"`). On the uniform {steps}-step grid "
                f"t - r = 1/{steps} at every step, so that embedding is one constant vector, folded into "
                f"`time_embedding.linear_2.bias`: the exported UNet is a plain `UNet2DModel`. "
                f"**This folder is exact only for `num_inference_steps={steps}`**; for other step counts "
                + ("use `--format onestep` (see below)." if dense else "export again with `--steps`, or use `--format onestep`."))
        elif not dense:
            notes.append(f"The student is a plain velocity model; `num_inference_steps={steps}` runs its "
                         f"{steps}-step Euler sampler on the uniform grid (other step counts use the "
                         f"scheduler's own, non-uniform grid).")
        if dense:
            notes.append(
                f"The student embeds timestep {student.time_scale:g} t (a student of the dense-time teacher), not "
                f"the scheduler's 1000 t. In one step the UNet is called once, at t = 1, so its time embedding "
                f"is that of timestep {student.time_scale:g}, folded into `time_embedding.linear_1` (weight 0, "
                f"bias = its pre-activation at that timestep): the exported UNet embeds every timestep alike. "
                f"**This folder is exact only for `num_inference_steps=1`**; use `--format onestep` for more steps.")
        return ExportResult(
            pipeline="`DDPMPipeline` (stock diffusers)",
            loader="import torch\nfrom diffusers import DiffusionPipeline",
            load_call="DiffusionPipeline.from_pretrained({path!r})",
            call_args=f"batch_size=4, num_inference_steps={steps}",
            scheduler=f"`FlowMatchEulerDiscreteScheduler`: num_train_timesteps={sched.num_train_timesteps}, "
                      f"shift={sched.shift}, shift_terminal={sched.shift_terminal}, use_dynamic_shifting=false, "
                      f"stochastic_sampling=false, invert_sigmas=false (sigmas [{grid}])",
            notes=notes, max_abs_diff=diff)

    # -- OneStepPipeline ---------------------------------------------------------------------------
    def _write_onestep(self, student, out: Path, steps: int) -> ExportResult:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from onestep.pipelines import OneStepPipeline

        # consistency-sampled students re-noise between steps, which this pipeline does not: 1 step only
        only_one = getattr(student, "sampler", "avg_velocity") != "avg_velocity"
        time_scale = None if student.time_scale == 1000.0 else student.time_scale  # None: the scheduler's 1000 t
        pipe = OneStepPipeline(unet=student.unet, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
                               default_num_inference_steps=steps, interval_scale=student.interval_scale,
                               max_num_inference_steps=1 if only_one else None,
                               time_scale=time_scale)
        diff = _self_check(student, pipe, steps)
        pipe.save_pretrained(out, safe_serialization=True)
        return ExportResult(
            pipeline="`onestep.pipelines.OneStepPipeline` (a `DiffusionPipeline` subclass shipped with onestep)",
            loader="import torch\nfrom onestep.pipelines import OneStepPipeline",
            load_call="OneStepPipeline.from_pretrained({path!r})",
            call_args=f"batch_size=4, num_inference_steps={steps}",
            scheduler="`FlowMatchEulerDiscreteScheduler`: num_train_timesteps=1000, shift=1.0; the pipeline "
                      "passes the uniform grid as `sigmas`, so any `num_inference_steps` is exact",
            notes=[
                "The UNet keeps its second time embedding of t - r (`class_embed_type=\"timestep\"`, class "
                f"label {student.interval_scale:g} (t - r)); `OneStepPipeline` runs z_r = z_t - (t - r) u(z_t, r, t) on the uniform "
                + (f"grid for any `num_inference_steps` (default {steps})." if not only_one else
                   f"grid; this student was trained with the {student.sampler} sampler, so the pipeline takes "
                   f"`num_inference_steps=1` only (max_num_inference_steps 1)."),
                *([f"The UNet's timestep is {time_scale:g} t, not the scheduler's 1000 t (a student of the "
                   "dense-time teacher): the pipeline's `time_scale`."] if time_scale is not None else []),
                "Load it with `OneStepPipeline.from_pretrained`: diffusers' `DiffusionPipeline.from_pretrained` "
                "resolves only pipeline classes defined inside diffusers (other code needs "
                "`trust_remote_code=True`). For a folder that stock diffusers loads, export with "
                "`--format diffusers --steps k`.",
            ],
            max_abs_diff=diff)


def fold_interval_embedding(unet, steps: int, interval_scale: float = 1000.0):
    """A plain `UNet2DModel` equal to `unet` with class label interval_scale (t - r) fixed at t - r = 1/steps.

    diffusers' UNet2DModel computes ``emb = time_embedding(time_proj(t)) + class_embedding(time_proj(label))``
    (both in the model's dtype, no scaling), and `time_embedding` ends with `linear_2` (no post-activation),
    so the constant class embedding is exactly an extra bias of `linear_2`.
    """
    from diffusers import UNet2DModel

    te = unet.time_embedding
    if unet.config.class_embed_type != "timestep" or te.post_act is not None or te.cond_proj is not None:
        raise ExportError("cannot fold the interval embedding: the UNet's time embedding is not "
                          "linear_1 -> act -> linear_2 with a timestep class embedding")
    label = _interval_label(steps, unet.device, interval_scale)
    with torch.no_grad():
        # the same float32 path as the forward pass; the sum b + c is rounded once, from float64
        const = unet.class_embedding(unet.time_proj(label)).to(unet.dtype)[0]
        bias = (te.linear_2.bias.double() + const.double()).to(te.linear_2.bias.dtype)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["class_embed_type"] = None
    plain = UNet2DModel.from_config(config).to(unet.device)
    if plain.dtype != unet.dtype:
        plain = plain.to(unet.dtype)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
    state["time_embedding.linear_2.bias"] = bias
    plain.load_state_dict(state, strict=True)
    return plain.eval().requires_grad_(False)


def fold_time_embedding(unet, timestep: float):
    """A copy of `unet` that embeds every timestep as it embeds `timestep` (for one-step exports only).

    diffusers' UNet2DModel computes ``emb = time_embedding(time_proj(timestep))`` with `time_embedding`
    = linear_1 -> act -> linear_2. With linear_1's weight 0 and its bias set to linear_1's output at
    time_proj(timestep), its output no longer depends on the input: a stock scheduler's timestep 1000
    then gives the dense-time student's embedding of `timestep`. Exact when the UNet is called at one
    time only, i.e. a one-step sampler.
    """
    import copy

    te = unet.time_embedding
    if te.cond_proj is not None:
        raise ExportError("cannot fold the time embedding: the UNet's time embedding has a condition projection")
    with torch.no_grad():
        t = torch.tensor([timestep], dtype=torch.float32, device=unet.device)
        pre = te.linear_1(unet.time_proj(t).to(unet.dtype))[0]  # the forward pass's own path
        folded = copy.deepcopy(unet)
        folded.time_embedding.linear_1.weight.zero_()
        folded.time_embedding.linear_1.bias.copy_(pre)
    return folded.eval().requires_grad_(False)


def _interval_label(steps: int, device, interval_scale: float = 1000.0) -> torch.Tensor:
    """interval_scale (t - r) for the first step, computed as onestep's sampler does (float32 t and r).

    On the uniform grid every step has the same t - r up to float32 rounding (exactly the same for
    step counts that are powers of two).
    """
    from onestep.sampling import time_grid

    grid = time_grid(steps, dtype=torch.float64)
    t = torch.tensor([grid[0].item()], dtype=torch.float32, device=device)
    r = torch.tensor([grid[1].item()], dtype=torch.float32, device=device)
    return (t - r) * interval_scale


def stock_flow_scheduler(steps: int):
    """`FlowMatchEulerDiscreteScheduler` whose `set_timesteps(steps)` gives sigmas 1, 1 - 1/k, ..., 1/k, 0.

    By default its grid is linspace(1, 1/1000, k) (it ends at sigma_min = 1/num_train_timesteps);
    `shift_terminal` = 1/k stretches 1 - sigma so the last sigma lands on 1/k, which makes the grid
    uniform. For k = 1 the default grid [1] is already right (and the stretch would divide by 0).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    kwargs = {} if steps == 1 else {"shift_terminal": 1.0 / steps}
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, **kwargs)
    sigmas = torch.tensor(_scheduler_sigmas(scheduler, steps))
    from onestep.sampling import time_grid

    err = (sigmas - time_grid(steps, dtype=torch.float64).float()).abs().max().item()
    if err > 1e-7:
        raise ExportError(f"this diffusers' FlowMatchEulerDiscreteScheduler does not give the uniform "
                          f"{steps}-step grid (off by {err:.2g})")
    return scheduler


def _student_timesteps(scheduler) -> list[float]:
    scheduler.set_timesteps(scheduler.config.num_inference_steps)
    return scheduler.timesteps.tolist()


def _scheduler_sigmas(scheduler, steps: int) -> list[float]:
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.tolist()


@torch.no_grad()
def _self_check(student, pipe, steps: int) -> float:
    """Max |pipeline output - onestep's sampler| for the same noise (2 images); ExportError above SELF_CHECK_TOL.

    The pipeline draws its own noise from a seeded CPU generator (DDPMPipeline takes no latents);
    `torch.randn` with an equally seeded generator gives the same noise to onestep's sampler.
    """
    unet = student.unet
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn(2, unet.config.in_channels, *size, generator=torch.Generator().manual_seed(0), dtype=unet.dtype)
    want = (student.sample(noise.to(unet.device), steps=steps) / 2 + 0.5).clamp(0, 1)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images
    diff = (got.float().cpu() - want.float().cpu()).abs().max().item()
    if not diff <= SELF_CHECK_TOL:
        raise ExportError(f"the exported pipeline differs from onestep's {steps}-step sampler by {diff:.3g} "
                          f"(> {SELF_CHECK_TOL}); this diffusers version breaks the export's assumptions")
    return diff


# ------------------------------------------------------------------------------------------------
# students of the teacher adapters (onestep.student.TeacherStudent): the family's stock pipeline
#
# A TeacherStudent is u(z, r, t, cond) = the adapter's velocity computed by a trained copy of the
# teacher's backbone, with interval_embedding(interval_scale (t - r)) added to the backbone's time
# embedding. On the uniform k-step grid t - r = 1/k at every step, so that addition is one vector,
# folded into the time embedding's last bias: the exported backbone is a plain network of the
# teacher's architecture. What remains is a scheduler under which the stock pipeline takes exactly
# the student's steps:
#
# * flow transformers (SD3, FLUX, SANA) live in flow time: FlowMatchEulerDiscreteScheduler with shift
#   1, no dynamic shifting and sigmas [1, 1 - 1/k, ..., 1/k, 0]; its Euler update z + (s' - s) u is
#   the student's step z_r = z_t - (t - r) u. Any k is exact.
# * VP UNets (SD1.x/2.x, SDXL, pixel DDPM) predict eps / v at integer timesteps. Flow time 1 is
#   noisier than their last timestep, so the adapter asks the model at timestep N-1 and keeps only
#   its x0 (teachers/vp.py): one student step from t = 1 to 0 returns that x0. DDIM with trailing
#   spacing (timestep N-1) and set_alpha_to_one (its last step lands on alpha_bar = 1) returns
#   exactly the same x0. For k >= 2 the student's next point is (1 - r) x0 + r z_1, i.e. it takes the
#   noise z_1 itself as eps, while every diffusers scheduler re-noises with the model's own eps (DDIM,
#   Euler, DPM-Solver) or fresh noise (LCM); and its later grid points sit between integer timesteps.
#   So VP students are exported for k = 1 only, and any other k is refused.

#: the prompt of the export-time self-check of text-to-image families
SELF_CHECK_PROMPT = "a photograph of an astronaut riding a horse"
#: the prompt of the model card's usage snippet
CARD_PROMPT = "a photo of a cat"
#: default rank and largest relative residual ||delta - B A|| / ||delta|| of an SVD LoRA export
LORA_RANK = 64
LORA_TOL = 1e-3


def _check_tolerance(dtype: torch.dtype, scale: float) -> float:
    """Float32/64 exports must match to SELF_CHECK_TOL; in half precision the same maths rounds
    differently (a folded bias is rounded once, the student's sum twice): 8 ulps of the output's scale."""
    if dtype in (torch.float32, torch.float64):
        return SELF_CHECK_TOL
    return max(SELF_CHECK_TOL, 8 * torch.finfo(dtype).eps * max(1.0, scale))


def constant_interval_embedding(student, steps: int) -> torch.Tensor:
    """The [D] vector the student's interval embedding adds at every step of the uniform k-step grid,
    computed from the same float t and r as its sampler; ExportError if it is not one vector."""
    from onestep.paths import batch_time
    from onestep.sampling import time_grid

    weight = next(student.interval_embedding.parameters())
    like = torch.zeros(1, device=weight.device, dtype=weight.dtype)  # the sampler's t, r: the noise's dtype
    grid = time_grid(steps, dtype=torch.float64).tolist()
    with torch.no_grad():
        rows = [student.interval_embedding(student.interval_scale * (batch_time(t, like) - batch_time(r, like)))[0]
                for t, r in zip(grid[:-1], grid[1:])]
    first = rows[0]
    spread = max((row - first).abs().max().item() for row in rows)
    if spread > 1e-3 * first.abs().max().item() + 1e-6:
        raise ExportError(f"the student's interval embedding is not constant on the uniform {steps}-step grid "
                          f"(spread {spread:.2g}), so it cannot be folded; sample with onestep (student.sample)")
    return first


def _fold_site(module):
    """(tensor, kind) where a constant added to `module`'s output can be folded: an Embedding's rows
    or the bias of the last Linear of a diffusers TimestepEmbedding (directly or as `timestep_embedder`
    of a combined embedding whose output is that embedding plus other terms)."""
    from torch import nn

    if isinstance(module, nn.Embedding):
        return module.weight, "rows"
    for name in ("linear_2", "timestep_embedder.linear_2"):
        try:
            linear = module.get_submodule(name)
        except AttributeError:
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if getattr(owner, "post_act", None) is not None or linear.bias is None:
            break
        return linear.bias, "bias"
    raise ExportError(f"cannot fold the interval embedding into {type(module).__name__}: its output is not a "
                      "TimestepEmbedding's last Linear (plus other terms)")


def merge_peft_layers(net):
    """`net` (modified in place) with every peft LoRA layer merged into its base layer and replaced by it:
    a plain network of the original architecture, which stock diffusers saves and loads."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, so no LoRA layers
        return net
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    if "peft_config" in net.__dict__:  # diffusers' add_adapter bookkeeping
        del net.peft_config
    if getattr(net, "_hf_peft_config_loaded", False):
        net._hf_peft_config_loaded = False
    return net


def folded_backbone(student, steps: int, dtype: torch.dtype | None = None):
    """A frozen copy of the student's backbone with any peft LoRA layers merged and its k-step interval
    embedding folded in (exact up to one rounding of the sum, done in float64), in `dtype` (the
    teacher's: a bf16 teacher's student trains fp32 master weights, its export is bf16 like the teacher)."""
    import copy

    extra = constant_interval_embedding(student, steps)
    net = merge_peft_layers(copy.deepcopy(student.backbone)).eval().requires_grad_(False)
    if dtype is not None and any(p.dtype != dtype for p in net.parameters()):
        net = net.to(dtype)
    tensor, kind = _fold_site(net.get_submodule(student.time_embedding_name))
    with torch.no_grad():
        tensor.copy_((tensor.double() + extra.double().to(tensor.device)).to(tensor.dtype))  # rows: broadcast
    return net


def vp_one_step_scheduler(time):
    """DDIM whose 1-step schedule is timestep N-1 straight to alpha_bar = 1: the student's step from t = 1.

    The betas (and so alpha_bar at every timestep, the model's time map) are the teacher's; trailing
    spacing puts the single step at N-1, set_alpha_to_one makes its target alpha_bar 1, and with
    clipping and thresholding off the step returns the model's x0 as predicted.
    """
    from diffusers import DDIMScheduler

    config = {k: v for k, v in time.scheduler_config.items() if not k.startswith("_")}
    config.update(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False,
                  steps_offset=1, prediction_type=time.prediction_type)  # offset: unused when trailing
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(1)
    if ddim.timesteps.tolist() != [time.num_train_timesteps - 1] or float(ddim.final_alpha_cumprod) != 1.0:
        raise ExportError("this diffusers' DDIMScheduler does not step from the last timestep to alpha_bar = 1")
    return ddim


def flow_scheduler(steps: int, pipeline_sets_sigmas: bool = False):
    """FlowMatchEulerDiscreteScheduler giving the uniform k-step grid in the family's pipeline: FLUX
    passes sigmas linspace(1, 1/k, k) itself (shift 1 keeps them), the others call set_timesteps(k)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if pipeline_sets_sigmas:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return stock_flow_scheduler(steps)


ONESTEP_SCHEDULER_NOTE = " with `onestep.pipelines.StudentVPScheduler` (loading needs onestep installed)"


def _scheduler_line(scheduler) -> str:
    cfg = scheduler.config
    if type(scheduler).__name__ == "StudentVPScheduler":
        return (f"`onestep.pipelines.StudentVPScheduler`: num_inference_steps={cfg.num_inference_steps}, "
                f"prediction_type={cfg.prediction_type}, the teacher's betas ({cfg.teacher_scheduler_config.get('beta_schedule')}, "
                f"{cfg.teacher_scheduler_config.get('beta_start')} to {cfg.teacher_scheduler_config.get('beta_end')}, "
                f"{cfg.num_train_timesteps} steps); timesteps "
                + ", ".join(f"{t:.2f}" for t in _student_timesteps(scheduler)))
    keys = {"DDIMScheduler": ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                              "timestep_spacing", "set_alpha_to_one", "clip_sample", "thresholding", "steps_offset",
                              "rescale_betas_zero_snr"),
            "FlowMatchEulerDiscreteScheduler": ("num_train_timesteps", "shift", "shift_terminal",
                                                "use_dynamic_shifting")}[type(scheduler).__name__]
    return f"`{type(scheduler).__name__}`: " + ", ".join(f"{k}={cfg.get(k)}" for k in keys)


class _AdapterExporter(Exporter):
    """Students (TeacherStudent) of a teacher adapter with a stock diffusers pipeline."""

    #: VP families: exact only for k = 1 (see the section comment)
    vp_family = False
    #: does the family's pipeline load LoRA (`load_lora_weights`)?
    lora = True
    pipeline_tag = "text-to-image"

    def check(self, cfg, format: str, steps: int = 1) -> None:
        name = cfg.teacher.get("name")
        if format == "onestep" and not self.vp_family:
            raise ExportError(f"students of the {name} teacher (rectified flow) export exactly at any --steps with "
                              f"--format diffusers (stock diffusers only); --format onestep is for VP teachers "
                              f"(unet, stable_diffusion, sdxl) and the digits family")
        if format == "lora" and not self.lora:
            raise ExportError(f"the {name} family's diffusers pipeline has no load_lora_weights, so there is no "
                              "--format lora for it: use --format diffusers" + (" or onestep" if self.vp_family else ""))
        if self.vp_family and steps != 1 and format == "diffusers":
            raise ExportError(
                f"students of the {name} teacher (a VP model, which cannot reach flow time 1) match a stock "
                f"diffusers scheduler only at --steps 1: from t = 1 the student re-noises with the input noise "
                f"itself, which no diffusers scheduler does (and its later steps fall between the model's "
                f"timesteps); export --steps 1, or --format onestep --steps {steps} (the stock pipeline with "
                f"onestep's StudentVPScheduler; loading needs onestep installed)")

    # -- per family ------------------------------------------------------------------------------
    def scheduler(self, adapter, steps: int, format: str = "diffusers"):
        """The scheduler that takes the student's steps. `adapter`: the student's (`student.adapter`), whose
        VP time map carries the student's own prediction type, which may differ from the teacher's (a
        Lightning 1-step student predicts x0 where its teacher predicts eps)."""
        if self.vp_family and format == "onestep":
            from onestep.pipelines import StudentVPScheduler

            time = adapter.time
            return StudentVPScheduler(teacher_scheduler_config=dict(time.scheduler_config),
                                      prediction_type=time.prediction_type, num_inference_steps=steps,
                                      num_train_timesteps=time.num_train_timesteps)
        if self.vp_family:
            return vp_one_step_scheduler(adapter.time)
        return flow_scheduler(steps)

    def call_kwargs(self, teacher, steps: int) -> dict:
        """The pipeline call (besides prompt, latents, output_type, generator) that runs the student."""
        side = teacher.resolution
        return {"num_inference_steps": steps, "guidance_scale": 1.0, "height": side, "width": side}

    def pack(self, pipe, latents):
        return latents

    def unpack(self, pipe, latents, teacher):
        return latents

    def stock_pipeline(self, teacher, backbone, scheduler):
        """The teacher's pipeline class around its own components, with `backbone` and `scheduler`."""
        import inspect

        old = teacher.pipeline
        params = inspect.signature(type(old).__init__).parameters
        kwargs = {k: v for k, v in old.components.items() if k in params}
        for key in params:  # non-module settings (requires_safety_checker, force_zeros_for_empty_prompt, ...)
            if key not in kwargs and key != "self" and key in old.config:
                kwargs[key] = old.config[key]
        kwargs[teacher.denoiser_name] = backbone
        kwargs["scheduler"] = scheduler
        pipe = type(old)(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- writing ---------------------------------------------------------------------------------
    def write(self, student, teacher, info, out, format, steps):
        from onestep.student import TeacherStudent

        if not isinstance(student, TeacherStudent):
            raise ExportError(f"expected a student built from the teacher (TeacherStudent), got {type(student).__name__}")
        dtype = next(teacher.backbone().parameters()).dtype
        backbone = folded_backbone(student, steps, dtype)
        # a VP student's LoRA for k >= 2 needs onestep's scheduler, as --format onestep does
        scheduler = self.scheduler(student.adapter, steps, "onestep" if format == "lora" and steps != 1 else format)
        if format == "lora":
            return self._write_lora(student, teacher, backbone, scheduler, info, out, steps)
        pipe = self.stock_pipeline(teacher, backbone, scheduler)
        diff, tol = self.self_check(student, teacher, pipe, steps)
        pipe.save_pretrained(out, safe_serialization=True)
        name = type(pipe).__name__
        return ExportResult(
            pipeline=f"`{name}` (stock diffusers)" + (ONESTEP_SCHEDULER_NOTE if format == "onestep" else ""),
            loader="import torch\nfrom diffusers import DiffusionPipeline",
            load_call="DiffusionPipeline.from_pretrained({path!r}" + torch_dtype_argument(dtype) + ")",
            call_args=self._call_args(teacher, steps),
            scheduler=_scheduler_line(scheduler),
            notes=self._notes(student, teacher, steps, name, format),
            max_abs_diff=diff, tolerance=tol, guidance=self._guidance(teacher, steps))

    def _call_args(self, teacher, steps):
        return ", ".join([f"prompt={CARD_PROMPT!r}"] + [f"{k}={v!r}" for k, v in self.call_kwargs(teacher, steps).items()])

    def _guidance(self, teacher, steps) -> str:
        return ("off: `guidance_scale=1.0`; the student's sampler makes one pass per step without classifier-free "
                "guidance (guidance used in distillation, if any, is in its weights)")

    def _notes(self, student, teacher, steps, pipeline_name, format="diffusers") -> list[str]:
        site = student.time_embedding_name
        denoiser = getattr(teacher, "denoiser_name", "unet")
        notes = [f"The student is the teacher's {denoiser} trained as an average-velocity field "
                 f"u(z, r, t) whose t - r enters through an extra embedding added to `{site}`. On the uniform "
                 f"{steps}-step grid t - r = {'1' if steps == 1 else f'1/{steps}'} at every step, so that embedding "
                 f"is one constant vector, "
                 f"folded into the bias of `{site}`'s last linear layer: the exported {denoiser} is a "
                 f"plain network of the teacher's architecture."]
        if self.vp_family and format == "onestep":
            notes.append(
                "The teacher is a VP model (eps/v prediction at integer timesteps), which cannot reach flow time "
                "t = 1: there the student keeps the model's x0 and re-noises with the input noise itself, and its "
                "uniform flow-time grid falls between the model's timesteps, so no diffusers scheduler takes its "
                f"steps for k >= 2. `onestep.pipelines.StudentVPScheduler` does: its timesteps are the model's "
                f"(fractional) timesteps of the uniform {steps}-step grid and its step is onestep's own. "
                f"**Call it with `num_inference_steps={steps}`** (the folded t - r; other values are refused). "
                "Loading needs onestep installed (`pip install onestep`): model_index.json names the scheduler "
                "by its module, `onestep.pipelines`.")
        elif self.vp_family:
            notes.append(
                "The teacher is a VP model (eps/v prediction at integer timesteps), which cannot reach flow time "
                f"t = 1; there onestep asks it at timestep {teacher.time.num_train_timesteps - 1} and keeps its x0 "
                "prediction, so the student's single step returns that x0. `DDIMScheduler` with "
                "`timestep_spacing=\"trailing\"` (one step at the last timestep) and `set_alpha_to_one=True` (the step "
                "lands on alpha_bar = 1) returns exactly that x0. **This folder is exact only for "
                "`num_inference_steps=1`**: for k >= 2 no diffusers scheduler takes the student's steps (export "
                "with `--format onestep --steps k`, which uses onestep's scheduler).")
        else:
            notes.append(
                "The teacher is a rectified-flow model: the scheduler's sigmas are flow times, and with shift 1 and "
                f"no dynamic shifting they are exactly the uniform grid, whose Euler update "
                "z + (sigma_next - sigma) u is the student's step z_r = z_t - (t - r) u(z_t, r, t). "
                f"**This folder is exact only for `num_inference_steps={steps}`** (the folded t - r is 1/{steps}); "
                "export again with `--steps` for another step count.")
        if self.vp_family and student.prediction_type != teacher.time.prediction_type:
            notes.append(
                f"The student's {denoiser} predicts {student.prediction_type} where the teacher's predicts "
                f"{teacher.time.prediction_type}: its objective switched it (SDXL-Lightning's 1-step stage predicts "
                "x0, \"sample\", as eps is ill-conditioned at pure noise), so the scheduler says "
                f"`prediction_type=\"{student.prediction_type}\"`.")
        return notes

    @torch.no_grad()
    def self_check(self, student, teacher, pipe, steps):
        """Max |pipeline latents - onestep's sampler| for one prompt and seeded noise; ExportError above tol."""
        dtype, device = teacher.model_dtype, teacher.device
        noise = torch.randn(1, *teacher.sample_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        cond = student.adapter.encode_prompt([SELF_CHECK_PROMPT])
        want = student.sample(noise, cond, steps=steps)
        got = pipe(prompt=[SELF_CHECK_PROMPT], latents=self.pack(pipe, noise.clone()), output_type="latent",
                   **self.call_kwargs(teacher, steps)).images
        got = self.unpack(pipe, got, teacher)
        diff = (got.float() - want.float()).abs().max().item()
        tol = _check_tolerance(dtype, want.float().abs().max().item())
        if not diff <= tol:
            raise ExportError(f"the exported {type(pipe).__name__} differs from onestep's {steps}-step sampler by "
                              f"{diff:.3g} (> {tol:.3g}); this diffusers version breaks the export's assumptions")
        return diff, tol

    # -- LoRA ------------------------------------------------------------------------------------
    def _write_lora(self, student, teacher, backbone, scheduler, info, out, steps):
        import copy

        rank, allow = self.lora_rank, self.allow_lora_residual
        layers, report = lora_from_delta(teacher.backbone(), backbone, rank)
        worst_name, worst = report["worst"]
        if worst > LORA_TOL and not allow:
            raise ExportError(f"a rank-{rank} LoRA leaves a relative residual of {worst:.3g} in {worst_name} "
                              f"(> {LORA_TOL:g}); raise --lora-rank, pass --allow-lora-residual to export it anyway, "
                              f"or use --format diffusers")
        pipe_cls = type(teacher.pipeline)
        pipe_cls.save_lora_weights(out, **{f"{teacher.denoiser_name}_lora_layers": layers}, safe_serialization=True)
        sched_module = type(scheduler).__module__.split(".")[0]  # diffusers, or onestep (StudentVPScheduler)
        scheduler.save_pretrained(out / "scheduler")
        # the round trip users will make: the teacher's pipeline, this folder's LoRA and scheduler
        pipe = self.stock_pipeline(teacher, copy.deepcopy(teacher.backbone()), scheduler)
        pipe.load_lora_weights(out)
        diff = tol = None
        if worst <= LORA_TOL:
            diff, tol = self.self_check(student, teacher, pipe, steps)
        del pipe
        teacher_path = info.cfg.teacher.get("path")
        sched_cls = type(scheduler).__name__
        notes = self._notes(student, teacher, steps, pipe_cls.__name__,
                            "diffusers" if sched_module == "diffusers" else "onestep")
        notes.insert(0, (
            f"A LoRA of the student's {teacher.denoiser_name} on the teacher's: every changed weight's difference "
            f"from the teacher (with the interval embedding folded in first) factored by truncated SVD at rank "
            f"{rank} into `lora_B @ lora_A` (scale 1, peft format); changed biases travel as `lora_B.bias`. "
            f"{report['modules']} modules carry a LoRA; the largest relative residual "
            f"||delta - B A|| / ||delta|| is {worst:.3g} (in `{worst_name}`)."
            + (f" **Above the tolerance {LORA_TOL:g}: this LoRA only approximates the student** (exported with "
               f"--allow-lora-residual)." if worst > LORA_TOL else "")
            + (" `pipe.fuse_lora()` is not possible for it: peft cannot merge LoRA biases into layers that have "
               "none (changed here); use it unfused, or `--format diffusers` for merged weights."
               if report["unfusable"] else "")))
        return ExportResult(
            pipeline=f"`{pipe_cls.__name__}` of the teacher + this LoRA (`load_lora_weights`) and scheduler"
                     + (ONESTEP_SCHEDULER_NOTE if sched_module != "diffusers" else ""),
            loader=(f"import torch\nfrom diffusers import {pipe_cls.__name__}, {sched_cls}" if sched_module == "diffusers"
                    else f"import torch\nfrom diffusers import {pipe_cls.__name__}\n"
                         f"from {type(scheduler).__module__} import {sched_cls}"),
            load_call=f"{pipe_cls.__name__}.from_pretrained({teacher_path!r}"
                      f"{torch_dtype_argument(next(teacher.backbone().parameters()).dtype)})",
            setup=["pipe.load_lora_weights({path!r})",
                   f"pipe.scheduler = {sched_cls}.from_pretrained({{path!r}}, subfolder=\"scheduler\")"],
            call_args=self._call_args(teacher, steps), scheduler=_scheduler_line(scheduler), notes=notes,
            max_abs_diff=diff, tolerance=tol, guidance=self._guidance(teacher, steps))


def _effective_weights(net) -> dict[str, torch.Tensor]:
    """name -> parameter of `net` (with any peft LoRA layers merged: the names of the plain network)."""
    return {name: p.detach() for name, p in net.named_parameters()}


def lora_from_delta(teacher_net, student_net, rank: int):
    """peft-format LoRA layers {module.lora_A.weight, module.lora_B.weight, module.lora_B.bias} with
    lora_B @ lora_A = the student's weight - the teacher's (truncated SVD at `rank`, scale 1), and a
    report {"worst": (name, relative residual), "modules": count}. A changed parameter that no LoRA
    can carry (norms, embeddings, raw parameters) counts as residual 1 and is left out."""
    from torch import nn

    before, after = _effective_weights(teacher_net), _effective_weights(student_net)
    if set(before) != set(after):
        raise ExportError("the student's backbone does not have the teacher's parameters; cannot diff for a LoRA")
    modules = dict(teacher_net.named_modules())
    changed = sorted({n.rsplit(".", 1)[0] for n in after if not torch.equal(after[n], before[n])})
    layers: dict[str, torch.Tensor] = {}
    worst = ("none", 0.0)
    any_bias = any(not torch.equal(after[f"{m}.bias"], before[f"{m}.bias"])
                   for m in changed if f"{m}.bias" in after)
    count, biasless = 0, 0
    for name in changed:
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or (set(
                n for n in after if n.rsplit(".", 1)[0] == name) - {f"{name}.weight", f"{name}.bias"}):
            for n in (n for n in after if n.rsplit(".", 1)[0] == name and not torch.equal(after[n], before[n])):
                if worst[1] < 1.0:
                    worst = (n, 1.0)
            continue
        w = after[f"{name}.weight"]
        delta = (w.double() - before[f"{name}.weight"].double()).reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        b = u[:, :r] * s[:r].sqrt()
        a = s[:r].sqrt()[:, None] * vh[:r]
        if r < rank:  # the same rank everywhere (zero padding): one LoRA config, no rank pattern
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
        norm = delta.norm().item()
        residual = (delta - b @ a).norm().item() / norm if norm > 0 else 0.0
        if residual > worst[1]:
            worst = (f"{name}.weight", residual)
        if isinstance(module, nn.Conv2d):
            a = a.reshape(rank, *w.shape[1:])
            b = b.reshape(w.shape[0], rank, 1, 1)
        layers[f"{name}.lora_A.weight"] = a.to(w.dtype).contiguous()
        layers[f"{name}.lora_B.weight"] = b.to(w.dtype).contiguous()
        if any_bias:
            bias = after.get(f"{name}.bias")
            biasless += bias is None
            layers[f"{name}.lora_B.bias"] = (torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if bias is None else
                                             (bias.double() - before[f"{name}.bias"].double()).to(w.dtype))
        count += 1
    if not layers:
        raise ExportError("the student's backbone equals the teacher's: there is no LoRA to export")
    return layers, {"worst": worst, "modules": count, "unfusable": biasless > 0}


@register_exporter("stable_diffusion")
class StableDiffusionExporter(_AdapterExporter):
    family = "Stable Diffusion 1.x/2.x: UNet2DConditionModel on VAE latents, discrete VP schedule (eps or v)"
    vp_family = True


@register_exporter("sdxl")
class SDXLExporter(_AdapterExporter):
    family = "Stable Diffusion XL: UNet2DConditionModel with text_time embedding on VAE latents, discrete VP schedule"
    vp_family = True


@register_exporter("sd3")
class SD3Exporter(_AdapterExporter):
    family = "Stable Diffusion 3/3.5: SD3Transformer2DModel (MMDiT) on VAE latents, rectified flow"

    def call_kwargs(self, teacher, steps):
        return {**super().call_kwargs(teacher, steps), "max_sequence_length": teacher.max_sequence_length or 256}


@register_exporter("flux")
class FluxExporter(_AdapterExporter):
    family = "FLUX.1: FluxTransformer2DModel on 2x2-packed VAE latents, rectified flow"

    def scheduler(self, adapter, steps, format="diffusers"):
        return flow_scheduler(steps, pipeline_sets_sigmas=True)

    def call_kwargs(self, teacher, steps):
        # guidance-distilled FLUX embeds the guidance scale; the student was trained at the teacher's
        kwargs = super().call_kwargs(teacher, steps)
        kwargs["guidance_scale"] = teacher.default_guidance if teacher.guidance_embeds else 1.0
        kwargs["max_sequence_length"] = teacher.max_sequence_length or 512
        return kwargs

    def _guidance(self, teacher, steps):
        if teacher.guidance_embeds:
            return (f"embedded: `guidance_scale={teacher.default_guidance:g}` is an input of this guidance-distilled "
                    "transformer (the value the student was trained with), not classifier-free guidance")
        return super()._guidance(teacher, steps)

    def pack(self, pipe, latents):
        b, c, h, w = latents.shape
        return type(pipe)._pack_latents(latents, b, c, h, w)

    def unpack(self, pipe, latents, teacher):
        side, factor = teacher.resolution, pipe.vae_scale_factor
        return type(pipe)._unpack_latents(latents, side, side, factor)


@register_exporter("sana")
class SanaExporter(_AdapterExporter):
    family = "SANA: SanaTransformer2DModel (linear attention) on DC-AE latents, rectified flow"

    def call_kwargs(self, teacher, steps):
        kwargs = {**super().call_kwargs(teacher, steps), "max_sequence_length": teacher.max_sequence_length,
                  "use_resolution_binning": False}  # the student samples the teacher's resolution as is
        if teacher.complex_human_instruction is None:  # else the pipeline's default, which the teacher uses
            kwargs["complex_human_instruction"] = None
        return kwargs


@register_exporter("unet")
class PixelDDPMExporter(_AdapterExporter):
    """Students of pixel DDPM UNets (UNet2DModel with a VP scheduler config): DDPMPipeline + 1-step DDIM."""

    family = "pixel-space diffusers UNet2DModel with a discrete VP schedule (eps, v or x0 prediction)"
    vp_family = True
    lora = False
    pipeline_tag = "unconditional-image-generation"

    def write(self, student, teacher, info, out, format, steps):
        from diffusers import DDPMPipeline

        from onestep.student import TeacherStudent

        if not isinstance(student, TeacherStudent):
            raise ExportError(f"expected a student built from the teacher (TeacherStudent), got {type(student).__name__}")
        if teacher.class_conditional:
            raise ExportError("students of class-conditional UNets have no stock diffusers pipeline (DDPMPipeline "
                              "takes no class labels); sample with onestep (build_student + student.sample(noise, "
                              "labels, steps=1))")
        unet = teacher.unet
        if unet.config.out_channels != unet.config.in_channels:
            raise ExportError(f"the UNet outputs {unet.config.out_channels} channels for {unet.config.in_channels} "
                              "(learned variances), which DDIM's step cannot take; sample with onestep")
        backbone = folded_backbone(student, steps, unet.dtype)
        scheduler = self.scheduler(student.adapter, steps, format)
        pipe = DDPMPipeline(unet=backbone, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        diff, tol = self.self_check(student, teacher, pipe, steps)
        pipe.save_pretrained(out, safe_serialization=True)
        return ExportResult(
            pipeline="`DDPMPipeline` (stock diffusers)" + (ONESTEP_SCHEDULER_NOTE if format == "onestep" else ""),
            loader="import torch\nfrom diffusers import DiffusionPipeline",
            load_call="DiffusionPipeline.from_pretrained({path!r})",
            call_args=f"batch_size=4, num_inference_steps={steps}",
            scheduler=_scheduler_line(scheduler), notes=self._notes(student, teacher, steps, "DDPMPipeline", format),
            max_abs_diff=diff, tolerance=tol)

    @torch.no_grad()
    def self_check(self, student, teacher, pipe, steps):
        dtype, device = teacher.unet.dtype, teacher.unet.device
        noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        want = (student.sample(noise.to(device), steps=steps) / 2 + 0.5).clamp(0, 1)
        got = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
        diff = (got.float().cpu() - want.float().cpu()).abs().max().item()
        tol = _check_tolerance(dtype, 1.0)
        if not diff <= tol:
            raise ExportError(f"the exported DDPMPipeline differs from onestep's {steps}-step sampler by {diff:.3g} "
                              f"(> {tol:.3g}); this diffusers version breaks the export's assumptions")
        return diff, tol


@register_exporter("edm")
class EDMExporter(Exporter):
    """EDM-preconditioned UNets: diffusers has no pipeline that applies EDM's c_in / c_skip / c_out."""

    def check(self, cfg, format: str, steps: int = 1) -> None:
        raise ExportError(
            "students of the edm teacher have no stock diffusers pipeline (none applies EDM's preconditioning "
            "c_in/c_skip/c_out around a UNet2DModel), so no --format fits; use the checkpoint: "
            "onestep.build.build_student(cfg, teacher) with its ema.safetensors, then student.sample(noise, "
            "labels, steps=k)")


# ------------------------------------------------------------------------------------------------
# model card


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def model_card(info: RunInfo, exporter: Exporter, result: ExportResult, out: Path, format: str, steps: int,
               student_is_avg: bool = True) -> str:
    cfg = info.cfg
    teacher = dict(cfg.teacher)
    teacher_name = teacher.pop("name", None)
    if not cfg.has_teacher:
        teacher_desc = "none (trained from data)"
    elif teacher_name == "digits" and not teacher.get("path"):
        teacher_desc = "`digits` (the flow-matching digits UNet shipped with onestep, 1x16x16)"
    else:
        teacher_desc = f"`{teacher_name}`" + "".join(f", {k}={_fmt(v)}" for k, v in teacher.items() if v is not None)
    objective = dict(cfg.objective)
    obj_name = objective.pop("name")
    obj_desc = f"`{obj_name}`" + "".join(f", {k}={_fmt(v)}" for k, v in objective.items())
    path = str(out.resolve())
    snippet = "\n".join([
        result.loader, "",
        f"pipe = {result.load_call.format(path=path)}",
        *[line.format(path=path) for line in result.setup],
        f"images = pipe({result.call_args}, generator=torch.Generator().manual_seed(0)).images",
        'images[0].save("sample.png")',
    ])
    weights = "EMA" if info.weights == "ema" else "raw trained (not EMA)"
    lines = [
        "---",
        "library_name: diffusers",
        f"pipeline_tag: {exporter.pipeline_tag}",
        "tags:",
        "- onestep",
        "- distillation",
        f"- {obj_name}",
        "---",
        "",
        f"# {cfg.name}: {steps}-step " + (f"student of the {teacher_name} teacher"
                                         if cfg.has_teacher else f"{obj_name} model"),
        "",
        f"Exported by `onestep export --format {format} --steps {steps}"
        f"{'' if info.weights == 'ema' else ' --weights ' + info.weights}` from run `{cfg.name}`, "
        f"checkpoint `{info.checkpoint.name}` ({weights} weights).",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {teacher_desc} |",
        f"| model family | {exporter.family} |",
        f"| objective | {obj_desc} |",
        f"| training | {info.step} step{'s' if info.step != 1 else ''}, batch {cfg.data.batch_size}, seed {cfg.seed} |",
        f"| steps | {steps}: " + ("z_r = z_t - (t - r) u(z_t, r, t)" if student_is_avg else "Euler steps of v(z, t)")
        + " on the uniform grid t = 1 -> 0 |",
        f"| pipeline | {result.pipeline} |",
        f"| scheduler | {result.scheduler} |",
        f"| guidance | {result.guidance} |",
        "",
        "## Usage",
        "",
        "```python",
        snippet,
        "```",
        "",
        ("Images are returned in [0, 1] as `(x / 2 + 0.5).clamp(0, 1)` of the sample x in [-1, 1]"
         if exporter.pipeline_tag != "text-to-image" else
         "The pipeline decodes the student's latents with the teacher's VAE; `output_type=\"latent\"` returns "
         "the latents themselves")
        + "; `output_type=\"pt\"` or `\"np\"` gives tensors or arrays.",
        "",
        "## How this pipeline reproduces the student",
        "",
        *[p for note in result.notes for p in (note, "")],
    ]
    if result.max_abs_diff is not None:
        lines += [f"At export, the pipeline's output on fixed noise matched onestep's own {steps}-step sampler "
                  f"to {result.max_abs_diff:.2g} (max abs difference; held to {result.tolerance:.2g} on every "
                  "export).", ""]
    lines += ["## Evaluation", ""] + _evaluation(info, steps)
    return "\n".join(lines).rstrip() + "\n"


def _evaluation(info: RunInfo, steps: int) -> list[str]:
    files = _eval_files(info, steps)
    demo = _demo_report(info, steps)
    if files and info.report is None:
        return files
    return demo + ([""] + files if files else [])


def _flat(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flat(v, f"{prefix}{k}.")]
    return [(prefix[:-1], value)]


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _fmt(v)


def _eval_files(info: RunInfo, steps: int) -> list[str]:
    """The run's `eval/*.json` scores ({"scores", "protocol"}, written by `onestep eval`), each with its
    protocol and whether it scores this export (same checkpoint, weights and step count)."""
    folder = info.run_dir / "eval"
    lines: list[str] = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("scores"), dict) or not isinstance(data.get("protocol"), dict):
            continue
        p, scores = data["protocol"], data["scores"]
        same = (p.get("checkpoint") == info.checkpoint.name and p.get("weights", "ema") == info.weights
                and p.get("model") in (None, "student") and p.get("steps") in (None, steps))
        what = ", ".join(f"{k} {_fmt(p[k])}" for k in ("model", "steps", "checkpoint", "weights") if k in p)
        lines += [f"**{p.get('metric', f.stem)}** from `eval/{f.name}` ({what})"
                  + (" - scores this export." if same else " - **not this export's checkpoint/steps**."), ""]
        rows = scores.get("rows")
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
        other = [(k, v) for k, v in _flat({k: v for k, v in scores.items() if k != "rows"}) if not isinstance(v, list)]
        if other:
            lines += ["", "Scores: " + "; ".join(f"{k} = {_cell(v)}" for k, v in other) + "."]
        protocol = [(k, v) for k, v in _flat(p) if v is not None and not k.startswith("versions.")]
        versions = ", ".join(f"{k[9:]} {v}" for k, v in _flat(p) if k.startswith("versions.") and v)
        lines += ["", "Protocol: " + "; ".join(f"{k}: {_cell(v)}" for k, v in protocol)
                  + (f"; versions: {versions}" if versions else "") + ".", ""]
    return lines


def _demo_report(info: RunInfo, steps: int) -> list[str]:
    report = info.report
    if report is None:
        return ["Not evaluated (the run has no report.json or eval/*.json scores)."]
    if info.weights != "ema" or report.get("train_steps") != info.step:
        return [f"Not evaluated: the run's report.json scores the EMA weights after {report.get('train_steps')} "
                f"steps, not this checkpoint ({info.checkpoint.name}, {info.weights} weights)."]
    rows = report.get("rows", [])
    lines = ["From the run's `report.json` (`onestep demo`); lower digits-FID is better.", "",
             "| model | steps | digits-FID | images/s |", "|---|---|---|---|"]
    for r in rows:
        ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.1f}"
        mark = " (this export)" if r.get("model") == "student" and r.get("steps") == steps else ""
        fid = "-" if r.get("digits_fid") is None else f"{r['digits_fid']:.3f}"
        lines.append(f"| {r.get('model')}{mark} | {r.get('steps')} | {fid} | {ips} |")
    if not any(r.get("model") == "student" and r.get("steps") == steps for r in rows):
        lines += ["", f"The report has no row for the student at {steps} steps."]
    p = report.get("protocol") or {}
    if p:
        lines += ["", "Protocol: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in p.items()) + "."]
    return lines


# ------------------------------------------------------------------------------------------------
# the folder: checks, temporary folder, manifest, atomic rename


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"--out {out} already holds files that are not an onestep export; "
                          "give an empty or new directory")


#: what an export may hold: weights only as safetensors; configs, cards and tokenizer files (BPE merges,
#: sentencepiece protobufs, chat templates), none of them a pickle
ALLOWED_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".model", ".jinja")


def _check_only_safetensors(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix not in ALLOWED_SUFFIXES:
            raise ExportError(f"export would contain {f.name}: only safetensors weights and "
                              f"{', '.join(ALLOWED_SUFFIXES[1:])} files are allowed")


def _make_readable(folder: Path) -> None:
    """safetensors writes its files with mode 0600; an export is meant to be shared: use the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`, replacing an earlier export (never leaving a half-written one)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


class _NoProgressBars:
    """diffusers' and transformers' loading progress bars off while exporting (stderr is for the one-line
    error), restored afterwards."""

    def __enter__(self):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self._was = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
        for m, _ in self._was:
            m.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for m, enabled in self._was:
            if enabled:
                m.enable_progress_bar()
        return False


def export_run(run: str | Path, out: str | Path, checkpoint: str | None = None, format: str = "diffusers",
               steps: int = 1, weights: str = "ema", lora_rank: int | None = None,
               allow_lora_residual: bool = False) -> Path:
    """Export a run's student (checkpoint `step-N`, default the latest) to `out`; returns `out`.

    `--format lora` factors the student's weight differences from the teacher at `lora_rank` (default: the
    run's student.lora_rank for a LoRA-trained student, else LORA_RANK) and refuses a relative residual
    above LORA_TOL unless `allow_lora_residual`.

    Raises ExportError with a one-line message for bad input; nothing is left behind on failure.
    """
    with _NoProgressBars():
        return _export_run(run, out, checkpoint, format, steps, weights, lora_rank, allow_lora_residual)


def _export_run(run, out, checkpoint, format, steps, weights, lora_rank, allow_lora_residual) -> Path:
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    if weights not in WEIGHTS:
        raise ExportError(f"unknown weights {weights!r}; allowed: {', '.join(WEIGHTS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ExportError(f"steps must be an integer >= 1, got {steps!r}")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ExportError(f"lora rank must be an integer >= 1, got {lora_rank!r}")
    out = Path(out)
    _check_out(out)
    info = load_run(run, checkpoint, weights)
    exporter = exporter_for(info.cfg)
    if steps != 1 and (why := one_step_only(info.cfg, exporter)):
        raise ExportError(why)
    exporter.check(info.cfg, format, steps)
    if lora_rank is None:  # a LoRA-trained student's delta has its training rank (exactly, merged)
        lora_rank = getattr(info.cfg.student, "lora_rank", 0) or LORA_RANK
    exporter.lora_rank, exporter.allow_lora_residual = lora_rank, bool(allow_lora_residual)
    student, teacher = load_student(info)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        result = exporter.write(student, teacher, info, tmp, format, steps)
        (tmp / "README.md").write_text(model_card(info, exporter, result, out, format, steps,
                                                       getattr(student, "has_interval_embedding", True)))
        _check_only_safetensors(tmp)
        _make_readable(tmp)
        manifest = {
            "onestep_export": 1, "format": format, "steps": steps, "run": info.cfg.name,
            "checkpoint": info.checkpoint.name, "weights": weights,
            **({"lora_rank": lora_rank} if format == "lora" else {}),
            "files": {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _check_out(out)  # still ours to replace (nothing appeared there meanwhile)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
