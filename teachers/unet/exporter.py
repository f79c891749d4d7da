"""The unet family's exporter: pixel DDPM students as a stock DDPMPipeline.

Loaded by `onestep.export` when a run of this family is exported (the family's `exporter` hook), never when
the teacher is imported."""
from __future__ import annotations

import torch

from onestep.errors import ExportError
from onestep.export.base import (
    ExportResult,
    check_tolerance,
)
from onestep.export.exporters import AdapterExporter
from onestep.export.folding import folded_backbone
from onestep.export.schedulers import (
    ONESTEP_SCHEDULER_NOTE,
    scheduler_line,
)


class PixelDDPMExporter(AdapterExporter):
    """Students of pixel DDPM UNets (UNet2DModel with a VP scheduler config): DDPMPipeline + 1-step DDIM."""

    family = "pixel-space diffusers UNet2DModel with a discrete VP schedule (eps, v or x0 prediction)"
    vp_family = True
    lora = False
    pipeline_tag = "unconditional-image-generation"

    def write(self, student, teacher, info, out, format, steps):
        from diffusers import DDPMPipeline

        from onestep.student import TeacherStudent

        if not isinstance(student, TeacherStudent):
            raise ExportError("expected a student built from the teacher (TeacherStudent), "
                              f"got {type(student).__name__}")
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
