"""Exporters of teacher-free runs (`student.init=scratch`), keyed by the student's backbone; a run with a teacher
uses its family's exporter (the teacher class's `exporter` hook)."""
from onestep.registry import EXPORTERS

EXPORTERS.register("scratch:digits_unet")("onestep.teachers.digits.exporter:PixelUNetExporter")
EXPORTERS.register("scratch:mlp")("onestep.teachers.gmm.exporter:NoPipelineExporter")
