"""What a teacher family declares about itself, so that generic code asks the class instead of a name table.

Every `Teacher` subclass carries four class attributes (onestep.teachers.base.Teacher holds the defaults):

* ``capabilities``: a :class:`TeacherCapabilities`, read by ``onestep.config`` and ``onestep.build`` (which
  data sources fit the teacher), ``onestep.data`` / ``onestep.trainer`` / ``onestep.smoke`` (latents to decode
  through a VAE), ``onestep.evaluation.commands`` (prompts to encode) and ``onestep.objectives.lightning`` (a
  discrete VP schedule to take trailing timesteps from);
* ``tiny``: the family's tiny builder, ``tiny(teacher_cfg, folder, class_conditional) -> teacher options``,
  which writes a tiny model of the family into ``folder`` in the real layout and returns the options that
  load it back through the adapter's own ``from_pretrained`` (tests, ``--dry-run``, ``--smoke``; see
  ``onestep.teachers.tiny.save_tiny_teacher``); None: the family has no tiny build and runs as it is;
* ``full_size``: a :class:`FullSizeSpec`, the published configs of the family's full-size models that
  ``--dry-run`` builds on the meta device to count parameters and estimate memory; None: no estimate;
* ``exporter``: the family's exporter (diffusers pipeline export) as ``"module:Class"``, in its folder
  (``teachers/<family>/exporter.py``); ``onestep.export.exporter_for`` imports it when a run is exported.

Ask the registered class (``TEACHERS.get(name).capabilities``) before a teacher is built, or the instance
(``teacher.capabilities``) after. A family lives in its own folder (``teachers/<family>/``: ``teacher.py``,
``tiny.py``, ``full_size.py``) and registers with ``@TEACHERS.register(name)``; adding one touches that
folder and the one import line in ``teachers/__init__.py`` that registers it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

CONDITIONINGS = ("none", "class", "prompt")
SPACES = ("pixel", "latent")
TIME_KINDS = ("flow", "vp", "edm")

#: {component: (class name in diffusers or transformers, config)}; "denoiser" is the network students copy
Components = Mapping[str, tuple]


@dataclass(frozen=True)
class TeacherCapabilities:
    """What generic code may ask of a teacher family without knowing its name."""

    #: what the teacher is conditioned on: "none", "class" (class labels; whether a loaded model has a class
    #: embedding is its instance's `num_classes`) or "prompt" (`encode_prompt` gives PromptConditions)
    conditioning: str = "none"
    #: "pixel" (samples are images or vectors) or "latent" (samples are VAE latents: `encode`/`decode`
    #: go through the teacher's `vae`, and the pipeline's `vae_scale_factor` gives the image size)
    space: str = "pixel"
    #: the model's own time: "flow" (rectified flow), "vp" (a discrete DDPM schedule at `teacher.time.schedule`,
    #: whose trailing timesteps objectives may use) or "edm" (continuous sigma, Karras preconditioning)
    time: str = "flow"
    #: whether the family can have a null condition for classifier-free guidance (the empty prompt, a null
    #: class); a loaded model may still lack one (a class-conditional UNet without `null_class`)
    null_condition: bool = False
    #: a pretrained diffusers model seen through an adapter (loaded from `teacher.path`): the data sources
    #: image_folder, prompts, class_labels and teacher_samples serve it
    adapter: bool = False

    def __post_init__(self):
        for name, value, allowed in (("conditioning", self.conditioning, CONDITIONINGS),
                                     ("space", self.space, SPACES), ("time", self.time, TIME_KINDS)):
            if value not in allowed:
                raise ValueError(f"TeacherCapabilities.{name}={value!r}; allowed: {', '.join(allowed)}")

    @property
    def vae(self) -> bool:
        """Whether samples are latents of a VAE (decoded to images by `teacher.decode`)."""
        return self.space == "latent"


@dataclass(frozen=True)
class FullSizeSpec:
    """The full-size models of a family, as `--dry-run` builds them on the meta device (onestep.dryrun)."""

    #: hub id -> {component: (class name, config)}: each repository's config.json as published (fields left
    #: out take the class defaults, which match the released models)
    models: Mapping[str, Components]
    #: the entry a `teacher.path` that is neither listed nor a local folder falls back to
    default: str
    #: the denoiser's subfolder in a local pipeline folder ("unet" or "transformer")
    denoiser_subfolder: str = "unet"
    #: True: a local `teacher.path` is a whole pipeline (model_index.json); False: a model folder at
    #: `teacher.subfolder` (pixel UNets)
    pipeline: bool = True
    #: teacher options -> components the run leaves out (SD3 without T5: text_encoder_3)
    left_out: Callable[[dict], tuple[str, ...]] = field(default=lambda teacher_cfg: ())


__all__ = ["TeacherCapabilities", "FullSizeSpec", "CONDITIONINGS", "SPACES", "TIME_KINDS"]
