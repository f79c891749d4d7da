"""`onestep export`: a trained run -> a folder that diffusers loads and samples in the student's k steps.

    export_run("runs/demo", "exports/demo-1step")                      # stock diffusers, 1 step
    export_run("runs/demo", "exports/demo-2step", steps=2)             # stock diffusers, 2 steps
    export_run("runs/demo", "exports/demo", format="onestep")          # OneStepPipeline, any k

Formats, per teacher family (an `Exporter` registered under the teacher's name decides):

* ``diffusers``: the stock pipeline of the family, loaded with ``DiffusionPipeline.from_pretrained(DIR)``
  with no onestep code, whose ``pipe(num_inference_steps=k)`` runs exactly the student's k-step sampler.
  For pixel UNets that is ``DDPMPipeline`` + ``FlowMatchEulerDiscreteScheduler(shift_terminal=1/k)``
  (sigmas exactly [1, 1 - 1/k, ..., 1/k, 0]) and a plain ``UNet2DModel``: on the uniform k-step grid
  t - r = 1/k at every step, so the interval embedding adds one constant vector to the time
  embedding, which is folded into ``time_embedding.linear_2.bias``. The export is therefore
  specific to k (``--steps``).
* ``onestep``: ``onestep.pipelines.OneStepPipeline`` with the unfolded student: any k at call time;
  loads with ``OneStepPipeline.from_pretrained(DIR)`` (needs onestep installed).
* ``lora``: peft LoRA for ``pipe.load_lora_weights(DIR)``; only families with LoRA-capable pipelines
  (the SD family), none of which exists yet: a clear error until then.

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

FORMATS = ("diffusers", "onestep", "lora")
WEIGHTS = ("ema", "trained")
MANIFEST = "onestep_export.json"
#: a fold or a scheduler grid that reproduces the student's sampler less closely than this is a bug
SELF_CHECK_TOL = 1e-4


class ExportError(ValueError):
    """Bad input to `export_run`; the message is one line meant for the user (the CLI exits with 2)."""


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
    from onestep.config import ConfigError, load_config
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

    try:
        teacher = build_teacher(info.cfg)
        student = build_student(info.cfg, teacher)
    except FileNotFoundError as e:  # the student's architecture comes from the teacher's files
        raise ExportError(f"cannot rebuild the student: {str(e).splitlines()[0]}") from None
    if info.weights == "ema":
        # ema.safetensors holds the student's parameters under their own names
        state = load_file(info.checkpoint / "ema.safetensors")
    else:
        # trainable.safetensors holds the objective's modules: the student's under "student."
        raw = load_file(info.checkpoint / "trainable.safetensors")
        state = {k[len("student."):]: v for k, v in raw.items() if k.startswith("student.")}
    params = dict(student.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
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


class Exporter:
    """How the students of one teacher family are exported. Subclasses implement the formats they can."""

    #: one line describing the family, for the model card
    family = ""
    #: pipeline_tag for the model card metadata
    pipeline_tag = "unconditional-image-generation"

    def check(self, cfg, format: str) -> None:
        """Raise ExportError (one line) if this family cannot be exported in `format` (cheap: no models)."""

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
    teacher = cfg.teacher.get("name")
    return teacher if teacher not in (None, "none") else f"scratch:{cfg.student.backbone}"


def exporter_for(cfg) -> Exporter:
    key = family_key(cfg)
    if key not in EXPORTERS:
        raise ExportError(f"no exporter for students of teacher {key!r} yet (exporters exist for: "
                          f"{', '.join(sorted(EXPORTERS))}); add one with onestep.export.register_exporter")
    return EXPORTERS[key]()


@register_exporter("gmm", "scratch:mlp")
class NoPipelineExporter(Exporter):
    """Vector-data toys (Gaussian mixtures, MLP students): diffusers has no pipeline for them."""

    def check(self, cfg, format: str) -> None:
        raise ExportError(
            "students of the gmm teacher are MLPs on points (vector data) and diffusers has no pipeline for vector "
            "data, so there is nothing to export; load the weights from the checkpoint's ema.safetensors "
            "with onestep.build.build_student and sample with student.sample(noise, steps=k)")


@register_exporter("digits", "scratch:digits_unet")
class PixelUNetExporter(Exporter):
    """Pixel-space `UNet2DModel` students (the digits family): DDPMPipeline or OneStepPipeline."""

    family = "pixel-space diffusers UNet2DModel, flow time t (t = 1 noise), UNet timestep 1000 t, data in [-1, 1]"

    def check(self, cfg, format: str) -> None:
        if format == "lora":
            raise ExportError(
                "--format lora needs a teacher whose diffusers pipeline loads LoRA (pipe.load_lora_weights: "
                "the SD/SDXL/SD3/FLUX/SANA families, whose teacher adapters do not exist yet); the digits "
                "family's pipeline (DDPMPipeline with a UNet2DModel) has none: use --format diffusers")

    def write(self, student, teacher, info, out, format, steps):
        from onestep.student import AvgVelocityUNet

        if not isinstance(student, AvgVelocityUNet):
            raise ExportError(f"expected a UNet2DModel student, got {type(student).__name__}")
        if student.time_scale != 1000.0:
            raise ExportError(f"the student's time scale is {student.time_scale}; diffusers' flow schedulers use 1000")
        if format == "diffusers":
            return self._write_stock(student, out, steps)
        return self._write_onestep(student, out, steps)

    # -- stock DDPMPipeline ----------------------------------------------------------------------
    def _write_stock(self, student, out: Path, steps: int) -> ExportResult:
        from diffusers import DDPMPipeline

        unet = (fold_interval_embedding(student.unet, steps, student.interval_scale)
                if student.has_interval_embedding else student.unet)
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
                f"export again with `--steps`, or use `--format onestep`.")
        else:
            notes.append(f"The student is a plain velocity model; `num_inference_steps={steps}` runs its "
                         f"{steps}-step Euler sampler on the uniform grid (other step counts use the "
                         f"scheduler's own, non-uniform grid).")
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

        pipe = OneStepPipeline(unet=student.unet, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
                               default_num_inference_steps=steps, interval_scale=student.interval_scale)
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
                f"grid for any `num_inference_steps` (default {steps}).",
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
# model card


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def model_card(info: RunInfo, exporter: Exporter, result: ExportResult, out: Path, format: str, steps: int,
               student_is_avg: bool = True) -> str:
    cfg = info.cfg
    teacher = dict(cfg.teacher)
    teacher_name = teacher.pop("name", None)
    if teacher_name in (None, "none"):
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
                                         if teacher_name not in (None, "none") else f"{obj_name} model"),
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
        "| guidance | none (unconditional) |",
        "",
        "## Usage",
        "",
        "```python",
        snippet,
        "```",
        "",
        "Images are returned in [0, 1] as `(x / 2 + 0.5).clamp(0, 1)` of the sample x in [-1, 1]; "
        "`output_type=\"pt\"` or `\"np\"` gives tensors or arrays.",
        "",
        "## How this pipeline reproduces the student",
        "",
        *[p for note in result.notes for p in (note, "")],
    ]
    if result.max_abs_diff is not None:
        lines += [f"At export, the pipeline's output on 2 fixed noises matched onestep's own {steps}-step sampler "
                  f"to {SELF_CHECK_TOL:g} (checked on every export).", ""]
    lines += ["## Evaluation", ""] + _evaluation(info, steps)
    return "\n".join(lines).rstrip() + "\n"


def _evaluation(info: RunInfo, steps: int) -> list[str]:
    report = info.report
    if report is None:
        return ["Not evaluated (the run has no report.json)."]
    if info.weights != "ema" or report.get("train_steps") != info.step:
        return [f"Not evaluated: the run's report.json scores the EMA weights after {report.get('train_steps')} "
                f"steps, not this checkpoint ({info.checkpoint.name}, {info.weights} weights)."]
    rows = report.get("rows", [])
    lines = ["From the run's `report.json` (`onestep demo`); lower digits-FID is better.", "",
             "| model | steps | digits-FID | images/s |", "|---|---|---|---|"]
    for r in rows:
        ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.1f}"
        mark = " (this export)" if r.get("model") == "student" and r.get("steps") == steps else ""
        lines.append(f"| {r.get('model')}{mark} | {r.get('steps')} | {r.get('digits_fid'):.3f} | {ips} |")
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


def _check_only_safetensors(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix not in (".safetensors", ".json", ".md"):
            raise ExportError(f"export would contain {f.name}: only safetensors weights, json and md are allowed")


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


def export_run(run: str | Path, out: str | Path, checkpoint: str | None = None, format: str = "diffusers",
               steps: int = 1, weights: str = "ema") -> Path:
    """Export a run's student (checkpoint `step-N`, default the latest) to `out`; returns `out`.

    Raises ExportError with a one-line message for bad input; nothing is left behind on failure.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    if weights not in WEIGHTS:
        raise ExportError(f"unknown weights {weights!r}; allowed: {', '.join(WEIGHTS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ExportError(f"steps must be an integer >= 1, got {steps!r}")
    out = Path(out)
    _check_out(out)
    info = load_run(run, checkpoint, weights)
    exporter = exporter_for(info.cfg)
    exporter.check(info.cfg, format)
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
            "files": {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _check_out(out)  # still ours to replace (nothing appeared there meanwhile)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
