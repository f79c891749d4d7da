"""Stable Diffusion 1.x/2.x and SDXL teachers: `UNet2DConditionModel` + `AutoencoderKL` + CLIP text
encoders, discrete-time VP (eps or v prediction) seen in flow time.

The denoiser's time map is :class:`onestep.teachers.vp.DiscreteVPModelTime` (the scheduler config of
the repository: betas, prediction type, spacing); prompts are encoded by the stock pipeline's own
`encode_prompt`; classifier-free guidance uses the empty prompt as the null condition (SDXL: zeros,
where the pipeline's `force_zeros_for_empty_prompt` says so, as SDXL base does). SDXL's
micro-conditioning (`add_time_ids` = original size, crop corner, target size) and the pooled
embedding of its second text encoder travel in the :class:`PromptCondition`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from onestep.teachers.capabilities import TeacherCapabilities
from onestep.teachers.latent import LatentTeacher, PromptCondition, _load_pipeline
from onestep.teachers.loading import check_dtype_option
from onestep.teachers.stable_diffusion.full_size import SD_FULL_SIZE, SDXL_FULL_SIZE
from onestep.teachers.stable_diffusion.tiny import save_tiny_sd, save_tiny_sdxl
from onestep.teachers.unet.teacher import unet_feature_layers
from onestep.teachers.vp import DiscreteVPModelTime

from onestep.errors import ConfigError
from onestep.registry import TEACHERS

_SD_COMPONENTS = {"unet": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
                  "scheduler": "scheduler"}
_SDXL_COMPONENTS = {**_SD_COMPONENTS, "text_encoder_2": "model", "tokenizer_2": "tokenizer"}


class _DiscreteVPLatentTeacher(LatentTeacher):
    """A latent UNet teacher with a discrete VP schedule (shared by SD1.x/2.x and SDXL)."""

    capabilities = TeacherCapabilities(conditioning="prompt", space="latent", time="vp", null_condition=True,
                                       adapter=True)

    def __init__(self, pipeline, prediction_type: str | None = None, resolution: int | None = None,
                 clip_skip: int | None = None):
        unet = pipeline.unet
        factor = pipeline.vae_scale_factor
        side = resolution // factor if resolution else unet.config.sample_size
        super().__init__(pipeline, (unet.config.in_channels, side, side))
        self.time = DiscreteVPModelTime(dict(pipeline.scheduler.config), prediction_type)
        self.clip_skip = clip_skip
        self.default_feature_layers = unet_feature_layers(unet)

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        return self.sample_shape[-1] * self.pipeline.vae_scale_factor

    def _added_cond_kwargs(self, cond: PromptCondition, dtype):
        return None

    def _velocity(self, x, t, cond):
        cond = self._condition(cond, x.shape[0])
        dtype = self.model_dtype
        embeds = cond.prompt_embeds.to(dtype)
        added = self._added_cond_kwargs(cond, dtype)

        def predict(x_native, k):
            return self.denoiser(x_native.to(dtype), k.to(self.device), encoder_hidden_states=embeds,
                                 added_cond_kwargs=added, return_dict=False)[0]

        return self.time.velocity(predict, x, t)

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int = 50, solver: str = "euler", guidance: float | None = None,
               grid: str = "uniform") -> torch.Tensor:
        """Flow ODE from noise to latents: grid="uniform" (t from 1 to 0, the base sampler) or
        grid="scheduler" (DDIM's timesteps from pipeline-style initial latents; Euler = DDIM, eta 0)."""
        if grid == "uniform":
            return super().sample(noise, cond, steps, solver, guidance)
        if grid != "scheduler":
            raise ValueError(f"unknown grid {grid!r}; allowed: uniform, scheduler")
        return self.time.sample_on_scheduler_grid(lambda x, t: self.velocity(x, t, cond, guidance),
                                                  noise, steps, solver)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_dtype_option(cfg.dtype)
        if cfg.prediction_type not in (None, "epsilon", "sample", "v_prediction"):
            raise ConfigError(f"teacher.prediction_type: unknown {cfg.prediction_type!r}; allowed: epsilon, sample, "
                             "v_prediction")
        if cfg.resolution is not None and cfg.resolution % 8:
            raise ConfigError(f"teacher.resolution must be a multiple of 8, got {cfg.resolution}")


@dataclass
class StableDiffusionTeacherConfig:
    path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local pipeline folder
    prediction_type: Optional[str] = None   # None: the scheduler config's (v_prediction for SD2.x 768)
    resolution: Optional[int] = None        # image side in pixels; None: the UNet's sample_size x VAE factor
    clip_skip: Optional[int] = None
    dtype: str = "float32"                  # float32 | bfloat16 | float16
    device: Optional[str] = None
    variant: Optional[str] = None           # e.g. "fp16" weight files
    revision: Optional[str] = None


@TEACHERS.register("stable_diffusion")
class StableDiffusionTeacher(_DiscreteVPLatentTeacher):
    """SD1.x / SD2.x (eps or v prediction), CFG with the empty prompt."""
    # loaded only when a run is exported
    exporter = "onestep.teachers.stable_diffusion.exporter:StableDiffusionExporter"

    Config = StableDiffusionTeacherConfig
    tiny = staticmethod(save_tiny_sd)
    full_size = SD_FULL_SIZE

    def encode_prompt(self, prompts: Sequence[str]) -> PromptCondition:
        embeds, _ = self.pipeline.encode_prompt(list(prompts), self.device, 1, False, clip_skip=self.clip_skip)
        return PromptCondition(embeds)

    @classmethod
    def from_pretrained(cls, path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5", *, dtype=None, device=None,
                        prediction_type: str | None = None, resolution: int | None = None,
                        clip_skip: int | None = None, variant: str | None = None, revision: str | None = None,
                        option: str = "teacher.path") -> "StableDiffusionTeacher":
        from diffusers import StableDiffusionPipeline

        pipe = _load_pipeline(StableDiffusionPipeline, path, family="stable_diffusion", components=_SD_COMPONENTS,
                              dtype=dtype, variant=variant, revision=revision, option=option,
                              safety_checker=None, feature_extractor=None, image_encoder=None,
                              requires_safety_checker=False)
        if device is not None:
            pipe.to(device)
        return cls(pipe, prediction_type, resolution, clip_skip)

    @classmethod
    def from_config(cls, cfg: StableDiffusionTeacherConfig) -> "StableDiffusionTeacher":
        cls.check_config(cfg)
        return cls.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, prediction_type=cfg.prediction_type,
                                   resolution=cfg.resolution, clip_skip=cfg.clip_skip, variant=cfg.variant,
                                   revision=cfg.revision)


@dataclass
class SDXLTeacherConfig:
    path: str = "stabilityai/stable-diffusion-xl-base-1.0"
    prediction_type: Optional[str] = None
    resolution: Optional[int] = None        # None: 1024 for SDXL base (UNet sample_size 128 x 8)
    clip_skip: Optional[int] = None
    dtype: str = "float32"
    device: Optional[str] = None
    variant: Optional[str] = None
    revision: Optional[str] = None


@TEACHERS.register("sdxl")
class SDXLTeacher(_DiscreteVPLatentTeacher):
    """SDXL: two CLIP text encoders, pooled embedding and add_time_ids; VAE in float32 when it asks."""
    exporter = "onestep.teachers.stable_diffusion.exporter:SDXLExporter"   # loaded only when a run is exported

    Config = SDXLTeacherConfig
    tiny = staticmethod(save_tiny_sdxl)
    full_size = SDXL_FULL_SIZE

    def add_time_ids(self, batch: int, original_size=None, crop_top_left=(0, 0), target_size=None) -> torch.Tensor:
        """The pipeline's micro-conditioning row (original size, crop corner, target size), per sample."""
        size = (self.resolution, self.resolution)
        pipe = self.pipeline
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else None
        ids = pipe._get_add_time_ids(tuple(original_size or size), tuple(crop_top_left), tuple(target_size or size),
                                     dtype=self.model_dtype, text_encoder_projection_dim=projection)
        return ids.to(self.device).repeat(batch, 1)

    def encode_prompt(self, prompts: Sequence[str], original_size=None, crop_top_left=(0, 0),
                      target_size=None) -> PromptCondition:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False, clip_skip=self.clip_skip)
        ids = self.add_time_ids(len(prompts), original_size, crop_top_left, target_size)
        return PromptCondition(embeds, pooled_prompt_embeds=pooled, add_time_ids=ids)

    def _null_prompt_condition(self) -> PromptCondition:
        empty = self.encode_prompt([""])
        if self.pipeline.config.force_zeros_for_empty_prompt:
            # the pipeline's unconditional branch: zeros, not the embedding of ""
            return PromptCondition(torch.zeros_like(empty.prompt_embeds), torch.zeros_like(empty.pooled_prompt_embeds),
                                   add_time_ids=empty.add_time_ids)
        return empty

    def _added_cond_kwargs(self, cond: PromptCondition, dtype):
        if cond.pooled_prompt_embeds is None or cond.add_time_ids is None:
            raise ValueError("an SDXL condition needs pooled_prompt_embeds and add_time_ids: use teacher.encode_prompt")
        return {"text_embeds": cond.pooled_prompt_embeds.to(dtype), "time_ids": cond.add_time_ids.to(dtype)}

    @classmethod
    def from_pretrained(cls, path: str = "stabilityai/stable-diffusion-xl-base-1.0", *, dtype=None, device=None,
                        prediction_type: str | None = None, resolution: int | None = None,
                        clip_skip: int | None = None, variant: str | None = None, revision: str | None = None,
                        option: str = "teacher.path") -> "SDXLTeacher":
        from diffusers import StableDiffusionXLPipeline

        pipe = _load_pipeline(StableDiffusionXLPipeline, path, family="sdxl", components=_SDXL_COMPONENTS,
                              dtype=dtype, variant=variant, revision=revision, option=option,
                              image_encoder=None, feature_extractor=None)
        if getattr(pipe.vae.config, "force_upcast", False) and pipe.vae.dtype == torch.float16:
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16 (its config says so)
        if device is not None:
            pipe.to(device)
        return cls(pipe, prediction_type, resolution, clip_skip)

    @classmethod
    def from_config(cls, cfg: SDXLTeacherConfig) -> "SDXLTeacher":
        cls.check_config(cfg)
        return cls.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, prediction_type=cfg.prediction_type,
                                   resolution=cfg.resolution, clip_skip=cfg.clip_skip, variant=cfg.variant,
                                   revision=cfg.revision)


__all__ = ["StableDiffusionTeacher", "StableDiffusionTeacherConfig", "SDXLTeacher", "SDXLTeacherConfig"]
