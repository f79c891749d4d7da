"""The digits family's exporter: pixel-space UNet2DModel students as a stock DDPMPipeline or onestep's OneStepPipeline.

Loaded by `onestep.export` when a run of this family is exported (the family's `exporter` hook), never when
the teacher is imported."""
from __future__ import annotations

from pathlib import Path

from onestep.errors import ExportError
from onestep.export.base import (
    Exporter,
    ExportResult,
    self_check,
)
from onestep.export.folding import fold_interval_embedding, fold_time_embedding
from onestep.export.schedulers import (
    scheduler_sigmas,
    stock_flow_scheduler,
)


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
        diff = self_check(student, pipe, steps)
        pipe.save_pretrained(out, safe_serialization=True)
        sched = scheduler.config
        grid = ", ".join(f"{s:g}" for s in scheduler_sigmas(scheduler, steps))
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
                + ("use `--format onestep` (see below)." if dense
                   else "export again with `--steps`, or use `--format onestep`."))
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
        diff = self_check(student, pipe, steps)
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
                f"label {student.interval_scale:g} (t - r)); `OneStepPipeline` runs z_r = z_t - (t - r) u(z_t, r, t) "
                "on the uniform "
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
