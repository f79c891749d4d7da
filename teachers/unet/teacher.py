"""Pixel-space DDPM teachers: a diffusers `UNet2DModel` with its scheduler config.

Covers unconditional models such as google/ddpm-cifar10-32 (eps prediction) and class-conditional
ImageNet-64-style UNets (`num_class_embeds`; optionally one class index reserved as "no class", which
is then the null condition of classifier-free guidance). eps, x0 ("sample") and v predictions are all
turned into the flow velocity by :class:`onestep.teachers.vp.DiscreteVPModelTime`.

A repository or folder in diffusers' DDPMPipeline layout (`unet/`, `scheduler/`) is loaded with
:meth:`UNetTeacher.from_pretrained`; `subfolder=None` reads a flat folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from onestep.teachers.base import NULL_LABEL, Teacher
from onestep.teachers.capabilities import TeacherCapabilities
from onestep.teachers.loading import (
    TeacherWeightsError,
    check_dtype_option,
    dtype_kwargs,
    load_from_pretrained,
)
from onestep.teachers.unet.full_size import UNET_FULL_SIZE
from onestep.teachers.unet.tiny import save_tiny
from onestep.teachers.vp import DiscreteVPModelTime

from onestep.errors import ConfigError
from onestep.registry import TEACHERS


def _check_no_meta(model, family: str, where: str, option: str = "teacher.path") -> None:
    """diffusers leaves parameters that the weights file lacks on the meta device and only warns."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise TeacherWeightsError(f"{family} teacher: the weights in {where} lack {len(missing)} parameters of "
                                  f"its config (e.g. {missing[0]}); check {option}")


def unet_feature_layers(unet) -> tuple[str, ...]:
    """Every down block and the mid block: the encoder half of a UNet, coarse to fine features."""
    down = tuple(f"down_blocks.{i}" for i in range(len(unet.down_blocks)))
    return down + (("mid_block",) if getattr(unet, "mid_block", None) is not None else ())


@dataclass
class UNetTeacherConfig:
    path: str = "google/ddpm-cifar10-32"    # hub id or local folder in DDPMPipeline layout
    subfolder: Optional[str] = "unet"        # None: config.json and weights directly in `path`
    scheduler_subfolder: Optional[str] = "scheduler"
    prediction_type: Optional[str] = None   # None: the scheduler config's (epsilon | sample | v_prediction)
    null_class: Optional[int] = None        # class index trained as "no class" (needed for guidance)
    dtype: str = "float32"                  # float32 | bfloat16 | float16 | float64
    device: Optional[str] = None
    variant: Optional[str] = None           # e.g. "fp16" weight files
    revision: Optional[str] = None


@TEACHERS.register("unet")
class UNetTeacher(Teacher):
    """A pixel DDPM `UNet2DModel` (unconditional or class-conditional) in flow time."""
    exporter = "onestep.teachers.unet.exporter:PixelDDPMExporter"   # loaded only when a run is exported

    Config = UNetTeacherConfig
    # class-conditional when the loaded UNet has a class embedding; null condition: teacher.null_class
    capabilities = TeacherCapabilities(conditioning="class", space="pixel", time="vp", null_condition=True,
                                       adapter=True)
    tiny = staticmethod(save_tiny)
    full_size = UNET_FULL_SIZE

    def __init__(self, unet, scheduler_config: dict, prediction_type: str | None = None,
                 null_class: int | None = None):
        super().__init__()
        self.unet = unet
        self.time = DiscreteVPModelTime(scheduler_config, prediction_type)
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (unet.config.in_channels, *size)
        labels = getattr(unet, "class_embedding", None)
        self.class_conditional = isinstance(labels, torch.nn.Embedding)
        if null_class is not None and not self.class_conditional:
            raise ValueError("null_class is set but the UNet has no class embedding (num_class_embeds)")
        if self.class_conditional:
            n = labels.num_embeddings
            if null_class is not None and not 0 <= null_class < n:
                raise ValueError(f"null_class {null_class} outside the UNet's {n} class embeddings")
            # the null class is by convention the last index; the real classes are the others
            self.num_classes = n - 1 if null_class is not None else n
        self.null_class = null_class
        self.default_feature_layers = unet_feature_layers(unet)
        self.freeze()

    # -- conditioning --------------------------------------------------------------------------------

    def null_condition(self, batch: int, device=None) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("this UNet teacher has no null class, so no classifier-free guidance; set "
                             "teacher.null_class to the class index it was trained with as 'no class'")
        return super().null_condition(batch, device)

    def _class_labels(self, cond):
        if not self.class_conditional:
            if cond is not None:
                raise ValueError("this UNet teacher is unconditional: pass cond=None")
            return None
        if cond is None:
            if self.null_class is None:
                raise ValueError("this UNet teacher is class-conditional: pass class labels as cond")
            return None  # filled with the null class below
        cond = torch.as_tensor(cond, device=self.unet.device).long()
        if bool((cond == NULL_LABEL).any()):
            if self.null_class is None:
                raise ValueError("label -1 (no class) given, but the teacher has no null class (teacher.null_class)")
            cond = torch.where(cond == NULL_LABEL, torch.full_like(cond, self.null_class), cond)
        return cond

    # -- velocity ------------------------------------------------------------------------------------

    def _predict(self, x_native, k, labels):
        if self.unet.config.time_embedding_type == "learned":
            k = k.round()  # an embedding table has only the integer steps
        if labels is None and self.class_conditional:
            labels = torch.full((x_native.shape[0],), self.null_class, device=x_native.device, dtype=torch.long)
        out = self.unet(x_native.to(self.unet.dtype), k.to(x_native.device), class_labels=labels).sample
        c = self.sample_shape[0]
        # models with learned variances (improved DDPM) output [prediction, variance] channels
        return out[:, :c] if out.shape[1] == 2 * c else out

    def _velocity(self, x, t, cond):
        labels = self._class_labels(cond)
        return self.time.velocity(lambda xn, k: self._predict(xn, k, labels), x, t)

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int = 50, solver: str = "euler", guidance: float | None = None,
               grid: str = "uniform") -> torch.Tensor:
        """Flow ODE from noise to data. grid="uniform": t from 1 to 0 (the base sampler); grid="scheduler":
        DDIM's own timesteps, starting from pipeline-style latents (see DiscreteVPModelTime)."""
        if grid == "uniform":
            return super().sample(noise, cond, steps, solver, guidance)
        if grid != "scheduler":
            raise ValueError(f"unknown grid {grid!r}; allowed: uniform, scheduler")
        return self.time.sample_on_scheduler_grid(lambda x, t: self.velocity(x, t, cond, guidance),
                                                  noise, steps, solver)

    def backbone(self):
        return self.unet

    # -- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str = "google/ddpm-cifar10-32", *, subfolder: str | None = "unet",
                        scheduler_subfolder: str | None = "scheduler", dtype=None, device=None,
                        prediction_type: str | None = None, null_class: int | None = None,
                        variant: str | None = None, revision: str | None = None,
                        option: str = "teacher.path") -> "UNetTeacher":
        from diffusers import DDIMScheduler, UNet2DModel

        common = dict(family="unet", option=option, revision=revision)
        unet = load_from_pretrained(UNet2DModel.from_pretrained, path, subfolder, what="UNet2DModel",
                                    **dtype_kwargs(dtype), use_safetensors=True, variant=variant, **common)
        _check_no_meta(unet, "unet", f"{path}/{subfolder or ''}", option)
        config = load_from_pretrained(DDIMScheduler.load_config, path, scheduler_subfolder, kind="scheduler",
                                      what="scheduler config", **common)
        if device is not None:
            unet = unet.to(device)
        return cls(unet, dict(config), prediction_type=prediction_type, null_class=null_class)

    @classmethod
    def check_config(cls, cfg: UNetTeacherConfig) -> None:
        check_dtype_option(cfg.dtype)
        if cfg.prediction_type not in (None, "epsilon", "sample", "v_prediction"):
            raise ConfigError(f"teacher.prediction_type: unknown {cfg.prediction_type!r}; allowed: epsilon, sample, "
                             "v_prediction")

    @classmethod
    def from_config(cls, cfg: UNetTeacherConfig) -> "UNetTeacher":
        cls.check_config(cfg)
        return cls.from_pretrained(cfg.path, subfolder=cfg.subfolder, scheduler_subfolder=cfg.scheduler_subfolder,
                                   dtype=cfg.dtype, device=cfg.device, prediction_type=cfg.prediction_type,
                                   null_class=cfg.null_class, variant=cfg.variant, revision=cfg.revision)


__all__ = ["UNetTeacher", "UNetTeacherConfig", "unet_feature_layers"]
