"""The edm family's exporter: EDM denoisers have no stock diffusers pipeline; export says what to use.

Loaded by `onestep.export` when a run of this family is exported (the family's `exporter` hook), never when
the teacher is imported."""
from __future__ import annotations

from onestep.errors import ExportError
from onestep.export.base import (
    Exporter,
)


class EDMExporter(Exporter):
    """EDM-preconditioned UNets: diffusers has no pipeline that applies EDM's c_in / c_skip / c_out."""

    def check(self, cfg, format: str, steps: int = 1) -> None:
        raise ExportError(
            "students of the edm teacher have no stock diffusers pipeline (none applies EDM's preconditioning "
            "c_in/c_skip/c_out around a UNet2DModel), so no --format fits; use the checkpoint: "
            "onestep.build.build_student(cfg, teacher) with its ema.safetensors, then student.sample(noise, "
            "labels, steps=k)")
