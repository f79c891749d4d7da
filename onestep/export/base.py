"""What every exporter shares: the formats, the `Exporter` interface and its registry, the export-time
self-check against onestep's own sampler, and the reasons a student exports one step only."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onestep.errors import ExportError
from onestep.registry import EXPORTERS
from onestep.runs import RunInfo

FORMATS = ("diffusers", "onestep", "lora")
WEIGHTS = ("ema", "trained")
MANIFEST = "onestep_export.json"
#: a fold or a scheduler grid that reproduces the student's sampler less closely than this is a bug
SELF_CHECK_TOL = 1e-4


def one_step_only(cfg, exporter) -> str | None:
    """Why this run's student exports --steps 1 only, in every format (None: it exports any k). Asked from
    the config, before any family's format advice and before loading weights."""
    from onestep.config import section_config
    from onestep.registry import OBJECTIVES

    objective, objective_cfg = section_config("objective", cfg.objective, OBJECTIVES)
    return objective.exports_one_step_only(objective_cfg, vp_teacher=getattr(exporter, "vp_family", False))


def torch_dtype_argument(dtype: torch.dtype) -> str:
    """`, torch_dtype=torch.bfloat16` for the model card's loading line of weights saved in a half dtype: without
    it diffusers loads the denoiser and VAE in float32 while transformers keeps the text encoders' bfloat16, and
    the pipeline's first layer meets mixed dtypes."""
    return "" if dtype == torch.float32 else f", torch_dtype=torch.{str(dtype).removeprefix('torch.')}"


# ------------------------------------------------------------------------------------------------
# exporters: one per teacher family


@dataclass
class ExportResult:
    """What an exporter wrote, for the model card."""
    pipeline: str                     # e.g. "DDPMPipeline (stock diffusers)"
    loader: str                       # the import line(s) of the usage snippet
    load_call: str                    # e.g. 'DiffusionPipeline.from_pretrained({path!r})'
    call_args: str                    # e.g. "batch_size=4, num_inference_steps=1"
    scheduler: str                    # scheduler class and settings, one line
    notes: list[str] = field(default_factory=list)  # markdown paragraphs
    max_abs_diff: float | None = None  # export-time self-check against onestep's sampler
    tolerance: float = SELF_CHECK_TOL  # ... and the bound it was held to
    setup: list[str] = field(default_factory=list)  # snippet lines between loading and the call ({path})
    guidance: str = "none (unconditional)"


class Exporter:
    """How the students of one teacher family are exported. Subclasses implement the formats they can."""

    #: one line describing the family, for the model card
    family = ""
    #: pipeline_tag for the model card metadata
    pipeline_tag = "unconditional-image-generation"

    #: set by export_run for --format lora: the SVD rank and whether residuals above LORA_TOL are allowed
    lora_rank: int = 64
    allow_lora_residual: bool = False

    def check(self, cfg, format: str, steps: int = 1) -> None:
        """Raise ExportError (one line) if this family cannot be exported in `format` with `steps` steps
        (cheap: no models are loaded)."""

    def write(self, student, teacher, info: RunInfo, out: Path, format: str, steps: int) -> ExportResult:
        raise NotImplementedError


def register_exporter(*families: str):
    """Register an Exporter class for teacher names (or, for teacher-free runs, `scratch:<backbone>`)."""
    def deco(cls):
        for name in families:
            EXPORTERS.register(name)(cls)
        return cls
    return deco


def family_key(cfg) -> str:
    """The teacher's name (a student lives in its teacher's space), or `scratch:<backbone>` without one."""
    return cfg.teacher["name"] if cfg.has_teacher else f"scratch:{cfg.student.backbone}"


def _resolve(hook) -> type:
    """An exporter class, or one named "module:Class"."""
    if not isinstance(hook, str):
        return hook
    module, _, name = hook.partition(":")
    return getattr(importlib.import_module(module), name)


def exporter_for(cfg) -> Exporter:
    """The exporter of the run's family: one registered under its key (`register_exporter`: teacher-free runs'
    `scratch:<backbone>`, or a user's own), else the teacher class's `exporter` hook (its folder's exporter.py)."""
    from onestep.registry import TEACHERS

    key = family_key(cfg)
    hook = EXPORTERS.get(key) if key in EXPORTERS else TEACHERS.get(key).exporter if cfg.has_teacher else None
    if hook is None:
        have = EXPORTERS.names() + [n for n in TEACHERS.names() if TEACHERS.get(n).exporter is not None]
        raise ExportError(f"no exporter for students of teacher {key!r} yet (exporters exist for: "
                          f"{', '.join(sorted(have))}); give the teacher class an `exporter` or register one "
                          "with onestep.export.register_exporter")
    return _resolve(hook)()


@torch.no_grad()
def self_check(student, pipe, steps: int) -> float:
    """Max |pipeline output - onestep's sampler| for the same noise (2 images); ExportError above SELF_CHECK_TOL.

    The pipeline draws its own noise from a seeded CPU generator (DDPMPipeline takes no latents);
    `torch.randn` with an equally seeded generator gives the same noise to onestep's sampler.
    """
    unet = student.unet
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn(2, unet.config.in_channels, *size, generator=torch.Generator().manual_seed(0), dtype=unet.dtype)
    want = (student.sample(noise.to(unet.device), steps=steps) / 2 + 0.5).clamp(0, 1)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    diff = (got.float().cpu() - want.float().cpu()).abs().max().item()
    if not diff <= SELF_CHECK_TOL:
        raise ExportError(f"the exported pipeline differs from onestep's {steps}-step sampler by {diff:.3g} "
                          f"(> {SELF_CHECK_TOL}); this diffusers version breaks the export's assumptions")
    return diff


# ------------------------------------------------------------------------------------------------
# students of the teacher adapters (onestep.student.TeacherStudent): the family's stock pipeline
#
# A TeacherStudent is u(z, r, t, cond) = the adapter's velocity computed by a trained copy of the
# teacher's backbone, with interval_embedding(interval_scale (t - r)) added to the backbone's time
# embedding. On the uniform k-step grid t - r = 1/k at every step, so that addition is one vector,
# folded into the time embedding's last bias: the exported backbone is a plain network of the
# teacher's architecture. What remains is a scheduler under which the stock pipeline takes exactly
# the student's steps:
#
# * flow transformers (SD3, FLUX, SANA) live in flow time: FlowMatchEulerDiscreteScheduler with shift
#   1, no dynamic shifting and sigmas [1, 1 - 1/k, ..., 1/k, 0]; its Euler update z + (s' - s) u is
#   the student's step z_r = z_t - (t - r) u. Any k is exact.
# * VP UNets (SD1.x/2.x, SDXL, pixel DDPM) predict eps / v at integer timesteps. Flow time 1 is
#   noisier than their last timestep, so the adapter asks the model at timestep N-1 and keeps only
#   its x0 (teachers/vp.py): one student step from t = 1 to 0 returns that x0. DDIM with trailing
#   spacing (timestep N-1) and set_alpha_to_one (its last step lands on alpha_bar = 1) returns
#   exactly the same x0. For k >= 2 the student's next point is (1 - r) x0 + r z_1, i.e. it takes the
#   noise z_1 itself as eps, while every diffusers scheduler re-noises with the model's own eps (DDIM,
#   Euler, DPM-Solver) or fresh noise (LCM); and its later grid points sit between integer timesteps.
#   So VP students are exported for k = 1 only, and any other k is refused.

#: the prompt of the export-time self-check of text-to-image families
SELF_CHECK_PROMPT = "a photograph of an astronaut riding a horse"
#: the prompt of the model card's usage snippet
CARD_PROMPT = "a photo of a cat"


def check_tolerance(dtype: torch.dtype, scale: float) -> float:
    """Float32/64 exports must match to SELF_CHECK_TOL; in half precision the same maths rounds
    differently (a folded bias is rounded once, the student's sum twice): 8 ulps of the output's scale."""
    if dtype in (torch.float32, torch.float64):
        return SELF_CHECK_TOL
    return max(SELF_CHECK_TOL, 8 * torch.finfo(dtype).eps * max(1.0, scale))
