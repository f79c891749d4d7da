"""`onestep export`: a trained run -> a folder that diffusers loads and samples in the student's k steps.

    export_run("runs/demo", "exports/demo-1step")                      # stock diffusers, 1 step
    export_run("runs/demo", "exports/demo-2step", steps=2)             # stock diffusers, 2 steps
    export_run("runs/demo", "exports/demo", format="onestep")          # OneStepPipeline, any k at call time

Formats, per teacher family (the family's `Exporter`, in teachers/<family>/exporter.py and named by the teacher class,
decides):

* ``diffusers``: the stock pipeline of the family, loaded with ``DiffusionPipeline.from_pretrained(DIR)``
  with no onestep code, whose ``pipe(num_inference_steps=k)`` runs exactly the student's k-step sampler.
  For pixel UNets that is ``DDPMPipeline`` + ``FlowMatchEulerDiscreteScheduler(shift_terminal=1/k)``
  (sigmas exactly [1, 1 - 1/k, ..., 1/k, 0]) and a plain ``UNet2DModel``: on the uniform k-step grid
  t - r = 1/k at every step, so the interval embedding adds one constant vector to the time
  embedding, which is folded into ``time_embedding.linear_2.bias``. The export is therefore
  specific to k (``--steps``).
  Students of the teacher adapters (`TeacherStudent`) get their family's stock pipeline with the
  teacher's VAE / text encoders / tokenizers and the student's backbone, its interval embedding folded
  into the time embedding's last bias (see "students of the teacher adapters" below for the maths):
  ``stable_diffusion`` -> StableDiffusionPipeline, ``sdxl`` -> StableDiffusionXLPipeline, ``unet``
  (unconditional pixel DDPM) -> DDPMPipeline, all with a 1-step trailing DDIM (VP models: exact at
  k = 1 only; other k with ``--format onestep``, except the students below that export k = 1 only);
  ``sd3`` -> StableDiffusion3Pipeline, ``flux`` -> FluxPipeline,
  ``sana`` -> SanaPipeline, with FlowMatchEulerDiscreteScheduler on the uniform grid (any k). ``edm``
  and class-conditional UNets have no stock pipeline: a one-line error says what to use.
* ``onestep``: digits family: ``onestep.pipelines.OneStepPipeline`` with the unfolded student, any k at
  call time, loaded with ``OneStepPipeline.from_pretrained(DIR)``. VP teachers (unet, SD, SDXL): their
  stock pipeline with ``onestep.pipelines.StudentVPScheduler``, the student's own k-step sampler on the
  uniform grid (k >= 2 is exact only this way), loaded with ``DiffusionPipeline.from_pretrained(DIR)``.
  Both need onestep.
* ``lora``: peft-format LoRA (``pytorch_lora_weights.safetensors`` + ``scheduler/``) for
  ``pipe.load_lora_weights(DIR)`` on the teacher's own pipeline (SD, SDXL, SD3, FLUX, SANA): each
  changed weight's difference from the teacher, factored by truncated SVD (a LoRA-trained student's
  peft layers are merged first, so its delta has exactly its training rank); refused above a
  relative residual of LORA_TOL unless allowed.

Two kinds of student export ``--steps 1`` only, in every format (k >= 2: a one-line ExportError): Lightning
students of discrete VP teachers (unet, stable_diffusion, sdxl), which sample diffusers' trailing grid,
where t - r changes from step to step, so no one vector folds their interval embedding (and
StudentVPScheduler takes the uniform grid); and consistency-sampled students (scm, scm_ladd), whose
steps re-noise with fresh noise (their OneStepPipeline also refuses k >= 2 at call time). Lightning
students of flow-time teachers sample the uniform grid and export like any other.

Every export is written to a temporary folder beside ``out`` and renamed into place, holds weights
only as safetensors, and is byte-for-byte reproducible: exporting the same checkpoint into the same
folder again gives the same files. ``out`` must be absent, empty, or an earlier onestep export.
"""
from onestep.errors import ExportError
from onestep.export.base import FORMATS, MANIFEST, WEIGHTS, Exporter, ExportResult, exporter_for, register_exporter
from onestep.export.folding import fold_interval_embedding, fold_time_embedding
from onestep.export.lora import lora_from_delta
from onestep.export.publish import export_run
from onestep.export.schedulers import stock_flow_scheduler

__all__ = ["FORMATS", "MANIFEST", "WEIGHTS", "ExportError", "ExportResult", "Exporter",
           "export_run", "exporter_for", "fold_interval_embedding", "fold_time_embedding", "lora_from_delta",
           "register_exporter", "stock_flow_scheduler"]
