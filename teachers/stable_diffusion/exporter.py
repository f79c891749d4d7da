"""Exporters of the Stable Diffusion 1.x/2.x and SDXL students: their stock pipelines, OneStep schedulers, LoRA.

Loaded by `onestep.export` when a run of this family is exported (the family's `exporter` hook), never when
the teacher is imported."""
from __future__ import annotations

from onestep.export.exporters import AdapterExporter


class StableDiffusionExporter(AdapterExporter):
    family = "Stable Diffusion 1.x/2.x: UNet2DConditionModel on VAE latents, discrete VP schedule (eps or v)"
    vp_family = True


class SDXLExporter(AdapterExporter):
    family = "Stable Diffusion XL: UNet2DConditionModel with text_time embedding on VAE latents, discrete VP schedule"
    vp_family = True
