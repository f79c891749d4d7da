"""Exporters of the SD3, FLUX and SANA students: their stock pipelines on the uniform flow grid, LoRA.

Loaded by `onestep.export` when a run of this family is exported (the family's `exporter` hook), never when
the teacher is imported."""
from __future__ import annotations

from onestep.export.exporters import AdapterExporter
from onestep.export.schedulers import (
    flow_scheduler,
)


class SD3Exporter(AdapterExporter):
    family = "Stable Diffusion 3/3.5: SD3Transformer2DModel (MMDiT) on VAE latents, rectified flow"

    def call_kwargs(self, teacher, steps):
        return {**super().call_kwargs(teacher, steps), "max_sequence_length": teacher.max_sequence_length or 256}


class FluxExporter(AdapterExporter):
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


class SanaExporter(AdapterExporter):
    family = "SANA: SanaTransformer2DModel (linear attention) on DC-AE latents, rectified flow"

    def call_kwargs(self, teacher, steps):
        kwargs = {**super().call_kwargs(teacher, steps), "max_sequence_length": teacher.max_sequence_length,
                  "use_resolution_binning": False}  # the student samples the teacher's resolution as is
        if teacher.complex_human_instruction is None:  # else the pipeline's default, which the teacher uses
            kwargs["complex_human_instruction"] = None
        return kwargs
