"""One exporter per teacher family: which pipeline the student becomes, in which formats and step counts."""
from __future__ import annotations

from pathlib import Path

import torch

from onestep.errors import ExportError
from onestep.export.base import (
    CARD_PROMPT,
    SELF_CHECK_PROMPT,
    Exporter,
    ExportResult,
    check_tolerance,
    register_exporter,
    self_check,
    torch_dtype_argument,
)
from onestep.export.folding import fold_interval_embedding, fold_time_embedding, folded_backbone
from onestep.export.lora import LORA_TOL, lora_from_delta
from onestep.export.schedulers import (
    ONESTEP_SCHEDULER_NOTE,
    flow_scheduler,
    scheduler_line,
    scheduler_sigmas,
    stock_flow_scheduler,
    vp_one_step_scheduler,
)


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
            scheduler=scheduler_line(scheduler),
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
            loader=(f"import torch\nfrom diffusers import {pipe_cls.__name__}, {sched_cls}" if sched_module == "diffusers"
                    else f"import torch\nfrom diffusers import {pipe_cls.__name__}\n"
                         f"from {type(scheduler).__module__} import {sched_cls}"),
            load_call=f"{pipe_cls.__name__}.from_pretrained({teacher_path!r}"
                      f"{torch_dtype_argument(next(teacher.backbone().parameters()).dtype)})",
            setup=["pipe.load_lora_weights({path!r})",
                   f"pipe.scheduler = {sched_cls}.from_pretrained({{path!r}}, subfolder=\"scheduler\")"],
            call_args=self._call_args(teacher, steps), scheduler=scheduler_line(scheduler), notes=notes,
            max_abs_diff=diff, tolerance=tol, guidance=self._guidance(teacher, steps))


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
            scheduler=scheduler_line(scheduler), notes=self._notes(student, teacher, steps, "DDPMPipeline", format),
            max_abs_diff=diff, tolerance=tol)

    @torch.no_grad()
    def self_check(self, student, teacher, pipe, steps):
        dtype, device = teacher.unet.dtype, teacher.unet.device
        noise = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        want = (student.sample(noise.to(device), steps=steps) / 2 + 0.5).clamp(0, 1)
        got = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
        diff = (got.float().cpu() - want.float().cpu()).abs().max().item()
        tol = check_tolerance(dtype, 1.0)
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
