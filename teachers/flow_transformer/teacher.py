"""Rectified-flow transformer teachers: SD3/SD3.5, FLUX and SANA.

These models already live in flow time: diffusers' `FlowMatchEulerDiscreteScheduler` sigmas are flow
times t (x_t = (1 - t) x0 + t eps) and the networks predict the velocity eps - x0, so the adapter's
velocity is the network's output with no conversion. What differs is how t is fed:

* SD3 and SANA take ``timestep = t * num_train_timesteps`` (the scheduler's `timesteps`, i.e.
  `sigma * 1000`; SANA further multiplies by its `timestep_scale`);
* FLUX takes ``timestep = t`` (its pipeline divides the scheduler's timesteps by 1000; the
  transformer multiplies by 1000 inside), works on 2x2-packed latent tokens with position ids, and
  guidance-distilled FLUX (dev) takes the guidance scale as an input embedding instead of CFG.

The *shift* of these schedulers changes only the sampling grid, never the velocity: `sample()` uses the
scheduler's own shifted sigmas (FLUX and dynamic-shift configs: resolution-dependent mu, computed as the
pipelines do), so Euler in flow time reproduces the stock pipelines step for step.

Latents are kept unpacked, [B, C, H, W], for every family; FLUX packs inside `_velocity`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from onestep.teachers.capabilities import TeacherCapabilities
from onestep.teachers.flow_transformer.full_size import FLUX_FULL_SIZE, SANA_FULL_SIZE, SD3_FULL_SIZE
from onestep.teachers.flow_transformer.tiny import save_tiny_flux, save_tiny_sana, save_tiny_sd3
from onestep.teachers.latent import LatentTeacher, PromptCondition, _load_pipeline
from onestep.teachers.loading import check_dtype_option

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import TEACHERS
from onestep.sampling import solve_ode


class _FlowTransformerTeacher(LatentTeacher):
    # FLUX.1-dev embeds its guidance instead (no null pass); its null condition serves CFG on other models
    capabilities = TeacherCapabilities(conditioning="prompt", space="latent", time="flow", null_condition=True,
                                       adapter=True)
    denoiser_name = "transformer"
    #: how many of the first transformer blocks `features` returns by default
    num_feature_blocks = 4

    def __init__(self, pipeline, resolution: int | None = None, max_sequence_length: int | None = None):
        transformer = pipeline.transformer
        factor = pipeline.vae_scale_factor
        side = resolution // factor if resolution else self._default_latent_side(pipeline)
        super().__init__(pipeline, (self._latent_channels(pipeline), side, side))
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.max_sequence_length = max_sequence_length
        blocks = [n for n, _ in transformer.named_children() if n == "transformer_blocks"]
        count = len(transformer.transformer_blocks) if blocks else 0
        self.default_feature_layers = tuple(f"transformer_blocks.{i}"
                                            for i in range(min(self.num_feature_blocks, count)))

    @staticmethod
    def _latent_channels(pipeline) -> int:
        return pipeline.transformer.config.in_channels

    @staticmethod
    def _default_latent_side(pipeline) -> int:
        return pipeline.transformer.config.sample_size

    @property
    def resolution(self) -> int:
        return self.sample_shape[-1] * self.pipeline.vae_scale_factor

    def _feature_from_output(self, name, output):
        # MMDiT blocks (SD3 joint blocks, FLUX double and single blocks) return (text_stream, image_stream):
        # the image tokens are what a discriminator looks at
        return output[-1] if isinstance(output, (tuple, list)) else output

    # -- the scheduler's own grid -------------------------------------------------------------------

    def _flow_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def _set_timesteps_kwargs(self, steps: int, latent_hw: tuple[int, int]) -> dict:
        return {}

    def flow_times(self, steps: int, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The stock pipeline's sigmas (flow times, shifted, ending with 0) for `steps` steps, float64."""
        latent_hw = tuple(latent_hw or self.sample_shape[-2:])
        scheduler = self._flow_scheduler()
        scheduler.set_timesteps(steps, **self._set_timesteps_kwargs(steps, latent_hw))
        return scheduler.sigmas.to(torch.float64)

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int = 28, solver: str = "euler", guidance: float | None = None,
               grid: str = "scheduler") -> torch.Tensor:
        """Flow ODE from noise (t = 1) to latents on the scheduler's shifted grid (grid="scheduler", the
        stock pipeline's sampler when solver="euler") or the uniform grid (grid="uniform")."""
        if grid == "uniform":
            return super().sample(noise, cond, steps, solver, guidance)
        if grid != "scheduler":
            raise ValueError(f"unknown grid {grid!r}; allowed: scheduler, uniform")
        times = self.flow_times(steps, tuple(noise.shape[-2:]))
        return solve_ode(lambda x, t: self.velocity(x, t, cond, guidance), noise, steps=steps, solver=solver,
                         times=times)

    @classmethod
    def check_config(cls, cfg) -> None:
        check_dtype_option(cfg.dtype)
        if cfg.resolution is not None and cfg.resolution % 16:
            raise ConfigError(f"teacher.resolution must be a multiple of 16, got {cfg.resolution}")


# ------------------------------------------------------------------------------------------------
# SD3 / SD3.5

_SD3_COMPONENTS = {"transformer": "model", "vae": "model", "text_encoder": "model", "text_encoder_2": "model",
                   "text_encoder_3": "model", "tokenizer": "tokenizer", "tokenizer_2": "tokenizer",
                   "tokenizer_3": "tokenizer", "scheduler": "scheduler"}


@dataclass
class SD3TeacherConfig:
    path: str = "stabilityai/stable-diffusion-3.5-medium"  # hub id or local pipeline folder
    # False: no T5 (text_encoder_3); its embeddings are zeros, as the pipeline does
    load_t5: bool = True
    max_sequence_length: int = 256
    resolution: Optional[int] = None      # image side; None: transformer sample_size x VAE factor
    dtype: str = "bfloat16"
    device: Optional[str] = None
    variant: Optional[str] = None
    revision: Optional[str] = None


@TEACHERS.register("sd3")
class SD3Teacher(_FlowTransformerTeacher):
    """SD3/SD3.5: `SD3Transformer2DModel`, CLIP-L + CLIP-G (+ T5), FlowMatchEuler with shift."""
    exporter = "onestep.teachers.flow_transformer.exporter:SD3Exporter"   # loaded only when a run is exported

    Config = SD3TeacherConfig
    tiny = staticmethod(save_tiny_sd3)
    full_size = SD3_FULL_SIZE

    def _velocity(self, x, t, cond):
        cond = self._condition(cond, x.shape[0])
        dtype = self.model_dtype
        out = self.denoiser(hidden_states=x.to(dtype), timestep=t * self.num_train_timesteps,
                            encoder_hidden_states=cond.prompt_embeds.to(dtype),
                            pooled_projections=cond.pooled_prompt_embeds.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def encode_prompt(self, prompts: Sequence[str]) -> PromptCondition:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length or 256)
        return PromptCondition(embeds, pooled_prompt_embeds=pooled)

    def _set_timesteps_kwargs(self, steps, latent_hw):
        cfg = self.scheduler_config
        if not cfg.get("use_dynamic_shifting"):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self.denoiser.config.patch_size
        seq_len = (latent_hw[0] // patch) * (latent_hw[1] // patch)
        return {"mu": calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    @classmethod
    def from_pretrained(cls, path: str = "stabilityai/stable-diffusion-3.5-medium", *, dtype=None, device=None,
                        load_t5: bool = True, max_sequence_length: int = 256, resolution: int | None = None,
                        variant: str | None = None, revision: str | None = None,
                        option: str = "teacher.path") -> "SD3Teacher":
        from diffusers import StableDiffusion3Pipeline

        skip = {} if load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        components = {k: v for k, v in _SD3_COMPONENTS.items() if k not in skip}
        pipe = _load_pipeline(StableDiffusion3Pipeline, path, family="sd3", components=components, dtype=dtype,
                              variant=variant, revision=revision, option=option, image_encoder=None,
                              feature_extractor=None, **skip)
        if device is not None:
            pipe.to(device)
        return cls(pipe, resolution, max_sequence_length)

    @classmethod
    def from_config(cls, cfg: SD3TeacherConfig) -> "SD3Teacher":
        cls.check_config(cfg)
        return cls.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, load_t5=cfg.load_t5,
                                   max_sequence_length=cfg.max_sequence_length, resolution=cfg.resolution,
                                   variant=cfg.variant, revision=cfg.revision)


# ------------------------------------------------------------------------------------------------
# FLUX

_FLUX_COMPONENTS = {"transformer": "model", "vae": "model", "text_encoder": "model", "text_encoder_2": "model",
                    "tokenizer": "tokenizer", "tokenizer_2": "tokenizer", "scheduler": "scheduler"}


@dataclass
class FluxTeacherConfig:
    path: str = "black-forest-labs/FLUX.1-dev"
    guidance: float = 3.5                 # guidance-distilled models: the embedded scale used when none is given
    max_sequence_length: int = 512
    resolution: Optional[int] = None      # image side; None: 1024 (the pipeline's default)
    dtype: str = "bfloat16"
    device: Optional[str] = None
    variant: Optional[str] = None
    revision: Optional[str] = None


@TEACHERS.register("flux")
class FluxTeacher(_FlowTransformerTeacher):
    """FLUX.1: `FluxTransformer2DModel` on 2x2-packed latents, CLIP pooled + T5 embeddings; guidance as
    an input embedding for guidance-distilled models (dev), classifier-free guidance otherwise."""
    exporter = "onestep.teachers.flow_transformer.exporter:FluxExporter"   # loaded only when a run is exported

    Config = FluxTeacherConfig
    tiny = staticmethod(save_tiny_flux)
    full_size = FLUX_FULL_SIZE

    def __init__(self, pipeline, resolution=None, max_sequence_length=None, guidance: float = 3.5):
        super().__init__(pipeline, resolution, max_sequence_length)
        self.guidance_embeds = bool(pipeline.transformer.config.guidance_embeds)
        self.default_guidance = float(guidance)
        names = [n for n, _ in pipeline.transformer.named_children()]
        if "single_transformer_blocks" in names and not self.default_feature_layers:
            self.default_feature_layers = ("single_transformer_blocks.0",)

    @staticmethod
    def _latent_channels(pipeline) -> int:
        return pipeline.transformer.config.in_channels // 4  # packed tokens hold 2x2 latent pixels

    @staticmethod
    def _default_latent_side(pipeline) -> int:
        return 2 * (pipeline.default_sample_size * pipeline.vae_scale_factor // (pipeline.vae_scale_factor * 2))

    @torch.no_grad()
    def velocity(self, x, t, cond=None, guidance: float | None = None):
        """Guidance-distilled FLUX: one pass with the guidance scale embedded (default `guidance` of the
        config); otherwise the base class's classifier-free guidance with the empty prompt."""
        if self.guidance_embeds:
            return self._velocity(x, paths.batch_time(t, x), cond, embedded_guidance=guidance)
        return super().velocity(x, t, cond, guidance)

    def _velocity(self, x, t, cond, embedded_guidance: float | None = None):
        from diffusers import FluxPipeline

        cond = self._condition(cond, x.shape[0])
        dtype, device = self.model_dtype, self.device
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need even height and width (2x2 packing), got {h}x{w}")
        tokens = FluxPipeline._pack_latents(x.to(dtype), b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self.guidance_embeds:
            scale = self.default_guidance if embedded_guidance is None else float(embedded_guidance)
            guidance = torch.full((b,), scale, device=device, dtype=torch.float32)
        out = self.denoiser(hidden_states=tokens, timestep=t.to(dtype), guidance=guidance,
                            pooled_projections=cond.pooled_prompt_embeds.to(dtype),
                            encoder_hidden_states=cond.prompt_embeds.to(dtype), txt_ids=text_ids, img_ids=image_ids,
                            return_dict=False)[0]
        factor = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * factor, w * factor, factor).to(x.dtype)

    def encode_prompt(self, prompts: Sequence[str]) -> PromptCondition:
        embeds, pooled, _ = self.pipeline.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length or 512)
        return PromptCondition(embeds, pooled_prompt_embeds=pooled)

    def _set_timesteps_kwargs(self, steps, latent_hw):
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.scheduler_config
        kwargs = {"sigmas": np.linspace(1.0, 1 / steps, steps)}  # as FluxPipeline, before shifting
        if cfg.get("use_dynamic_shifting"):
            seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)
            kwargs["mu"] = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.15))
        return kwargs

    def flow_times(self, steps: int, latent_hw=None) -> torch.Tensor:
        latent_hw = tuple(latent_hw or self.sample_shape[-2:])
        scheduler = self._flow_scheduler()
        kwargs = self._set_timesteps_kwargs(steps, latent_hw)
        scheduler.set_timesteps(None, **kwargs)  # the number of steps comes from the sigmas, as in the pipeline
        return scheduler.sigmas.to(torch.float64)

    @classmethod
    def from_pretrained(cls, path: str = "black-forest-labs/FLUX.1-dev", *, dtype=None, device=None,
                        guidance: float = 3.5, max_sequence_length: int = 512, resolution: int | None = None,
                        variant: str | None = None, revision: str | None = None,
                        option: str = "teacher.path") -> "FluxTeacher":
        from diffusers import FluxPipeline

        pipe = _load_pipeline(FluxPipeline, path, family="flux", components=_FLUX_COMPONENTS, dtype=dtype,
                              variant=variant, revision=revision, option=option, image_encoder=None,
                              feature_extractor=None)
        if device is not None:
            pipe.to(device)
        return cls(pipe, resolution, max_sequence_length, guidance)

    @classmethod
    def from_config(cls, cfg: FluxTeacherConfig) -> "FluxTeacher":
        cls.check_config(cfg)
        return cls.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device, guidance=cfg.guidance,
                                   max_sequence_length=cfg.max_sequence_length, resolution=cfg.resolution,
                                   variant=cfg.variant, revision=cfg.revision)


# ------------------------------------------------------------------------------------------------
# SANA

_SANA_COMPONENTS = {"transformer": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
                    "scheduler": "scheduler"}


@dataclass
class SanaTeacherConfig:
    path: str = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    max_sequence_length: int = 300
    complex_human_instruction: bool = True   # prepend the pipeline's default instruction to prompts, as it does
    resolution: Optional[int] = None
    dtype: str = "bfloat16"
    device: Optional[str] = None
    variant: Optional[str] = None
    revision: Optional[str] = None


@TEACHERS.register("sana")
class SanaTeacher(_FlowTransformerTeacher):
    """SANA: `SanaTransformer2DModel` (linear attention), Gemma-2 text encoder with attention masks,
    DC-AE VAE (scaling only). Euler in flow time on FlowMatchEuler sigmas with the config's shift
    (SANA repositories ship a DPM-Solver config whose `flow_shift` is used)."""
    exporter = "onestep.teachers.flow_transformer.exporter:SanaExporter"   # loaded only when a run is exported

    Config = SanaTeacherConfig
    tiny = staticmethod(save_tiny_sana)
    full_size = SANA_FULL_SIZE

    def __init__(self, pipeline, resolution=None, max_sequence_length=300, complex_human_instruction: bool = True):
        super().__init__(pipeline, resolution, max_sequence_length)
        default = inspect.signature(type(pipeline).__call__).parameters["complex_human_instruction"].default
        self.complex_human_instruction = list(default) if complex_human_instruction else None

    def _velocity(self, x, t, cond):
        cond = self._condition(cond, x.shape[0])
        dtype = self.model_dtype
        scale = getattr(self.denoiser.config, "timestep_scale", 1.0) or 1.0
        out = self.denoiser(x.to(dtype), encoder_hidden_states=cond.prompt_embeds.to(dtype),
                            encoder_attention_mask=cond.attention_mask, timestep=t * self.num_train_timesteps * scale,
                            return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma channels
            out = out.chunk(2, dim=1)[0]
        return out.to(x.dtype)

    def encode_prompt(self, prompts: Sequence[str]) -> PromptCondition:
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=self.complex_human_instruction)
        return PromptCondition(embeds, attention_mask=mask)

    def _null_prompt_condition(self) -> PromptCondition:
        # the pipeline encodes its negative prompt "" without the instruction and without token selection
        _, _, embeds, mask = self.pipeline.encode_prompt(
            [""], do_classifier_free_guidance=True, negative_prompt="", device=self.device,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=self.complex_human_instruction)
        return PromptCondition(embeds, attention_mask=mask)

    def _flow_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = self.scheduler_config
        if cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            return FlowMatchEulerDiscreteScheduler.from_config(cfg)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                               shift=float(cfg.get("flow_shift") or 1.0))

    @classmethod
    def from_pretrained(cls, path: str = "Efficient-Large-Model/Sana_1600M_1024px_diffusers", *, dtype=None,
                        device=None, max_sequence_length: int = 300, complex_human_instruction: bool = True,
                        resolution: int | None = None, variant: str | None = None, revision: str | None = None,
                        option: str = "teacher.path") -> "SanaTeacher":
        from diffusers import SanaPipeline

        pipe = _load_pipeline(SanaPipeline, path, family="sana", components=_SANA_COMPONENTS, dtype=dtype,
                              variant=variant, revision=revision, option=option)
        if device is not None:
            pipe.to(device)
        return cls(pipe, resolution, max_sequence_length, complex_human_instruction)

    @classmethod
    def from_config(cls, cfg: SanaTeacherConfig) -> "SanaTeacher":
        cls.check_config(cfg)
        return cls.from_pretrained(cfg.path, dtype=cfg.dtype, device=cfg.device,
                                   max_sequence_length=cfg.max_sequence_length,
                                   complex_human_instruction=cfg.complex_human_instruction,
                                   resolution=cfg.resolution, variant=cfg.variant, revision=cfg.revision)


__all__ = ["SD3Teacher", "SD3TeacherConfig", "FluxTeacher", "FluxTeacherConfig", "SanaTeacher", "SanaTeacherConfig"]
