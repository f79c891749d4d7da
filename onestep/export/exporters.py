"""What the exporters of the adapter families share (`AdapterExporter`); each family's own exporter lives in its
folder (teachers/<family>/exporter.py) and is named by the teacher class's `exporter` hook."""
from __future__ import annotations

import torch

from onestep.errors import ExportError
from onestep.export.base import (
    CARD_PROMPT,
    SELF_CHECK_PROMPT,
    Exporter,
    ExportResult,
    check_tolerance,
    torch_dtype_argument,
)
from onestep.export.folding import folded_backbone
from onestep.export.lora import LORA_TOL, lora_from_delta
from onestep.export.schedulers import (
    ONESTEP_SCHEDULER_NOTE,
    flow_scheduler,
    scheduler_line,
    vp_one_step_scheduler,
)


class AdapterExporter(Exporter):
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
                              "--format lora for it: use --format diffusers"
                              + (" or onestep" if self.vp_family else ""))
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
            raise ExportError("expected a student built from the teacher (TeacherStudent), "
                              f"got {type(student).__name__}")
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
            scheduler=scheduler_line(scheduler),
            notes=self._notes(student, teacher, steps, name, format),
            max_abs_diff=diff, tolerance=tol, guidance=self._guidance(teacher, steps))

    def _call_args(self, teacher, steps):
        return ", ".join([f"prompt={CARD_PROMPT!r}"]
                         + [f"{k}={v!r}" for k, v in self.call_kwargs(teacher, steps).items()])

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
        tol = check_tolerance(dtype, want.float().abs().max().item())
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
            loader=(f"import torch\nfrom diffusers import {pipe_cls.__name__}, {sched_cls}"
                    if sched_module == "diffusers"
                    else f"import torch\nfrom diffusers import {pipe_cls.__name__}\n"
                         f"from {type(scheduler).__module__} import {sched_cls}"),
            load_call=f"{pipe_cls.__name__}.from_pretrained({teacher_path!r}"
                      f"{torch_dtype_argument(next(teacher.backbone().parameters()).dtype)})",
            setup=["pipe.load_lora_weights({path!r})",
                   f"pipe.scheduler = {sched_cls}.from_pretrained({{path!r}}, subfolder=\"scheduler\")"],
            call_args=self._call_args(teacher, steps), scheduler=scheduler_line(scheduler), notes=notes,
            max_abs_diff=diff, tolerance=tol, guidance=self._guidance(teacher, steps))
