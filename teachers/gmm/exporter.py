"""The gmm family's exporter: vector-data students have no diffusers pipeline, so export says what to do instead.

Loaded by `onestep.export` when a run of this family is exported (the family's `exporter` hook), never when
the teacher is imported."""
from __future__ import annotations

from onestep.errors import ExportError
from onestep.export.base import (
    Exporter,
)


class NoPipelineExporter(Exporter):
    """Vector-data toys (Gaussian mixtures, MLP students): diffusers has no pipeline for them."""

    def check(self, cfg, format: str, steps: int = 1) -> None:
        raise ExportError(
            "students of the gmm teacher are MLPs on points (vector data) and diffusers has no pipeline for vector "
            "data, so there is nothing to export; load the weights from the checkpoint's ema.safetensors "
            "with onestep.build.build_student and sample with student.sample(noise, steps=k)")
