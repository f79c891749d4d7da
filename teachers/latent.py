"""What the latent text-to-image teachers (SD1.x/2.x, SDXL, SD3, FLUX, SANA) share.

* :class:`PromptCondition`: the prompt embeddings a denoiser is conditioned on, one small dataclass
  for every family (fields a family does not use stay None); concatenated along the batch for
  classifier-free guidance by :meth:`PromptCondition.cat`.
* :class:`LatentTeacher`: VAE `encode`/`decode` with the VAE config's scaling and shift (and SDXL-style
  latents_mean/std), `encode_prompt` through the stock diffusers pipeline's own `encode_prompt` (so the
  embeddings are the pipeline's by construction), `null_condition` (the empty prompt, or zeros where
  the pipeline zeroes it), and loading of a whole pipeline folder through diffusers' own
  `from_pretrained` with one-line errors.

The pipeline object is kept only for prompt encoding and sampling grids; the teacher owns its modules
(denoiser, VAE, text encoders), so `.to()` and `freeze()` reach them all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from onestep.teachers.base import Teacher
from onestep.teachers.capabilities import TeacherCapabilities
from onestep.teachers.loading import (
    TeacherFilesMissingError,
    TeacherWeightsError,
    check_local_pipeline,
    dtype_kwargs,
    hub_offline,
    load_from_pretrained,
)


@dataclass
class PromptCondition:
    """Prompt embeddings for a batch: `prompt_embeds` [B, L, D] and the family's extras."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: Optional[torch.Tensor] = None  # [B, P]: SDXL, SD3, FLUX
    attention_mask: Optional[torch.Tensor] = None        # [B, L]: SANA
    add_time_ids: Optional[torch.Tensor] = None          # [B, 6]: SDXL micro-conditioning

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "PromptCondition":
        return PromptCondition(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                  for f in dataclasses.fields(self)})

    @classmethod
    def cat(cls, conds: Sequence["PromptCondition"]) -> "PromptCondition":
        values = {}
        for f in dataclasses.fields(cls):
            parts = [getattr(c, f.name) for c in conds]
            if all(p is None for p in parts):
                values[f.name] = None
            elif any(p is None for p in parts):
                raise ValueError(f"cannot concatenate prompt conditions with and without {f.name}")
            else:
                values[f.name] = torch.cat(parts)
        return cls(**values)

    def __getitem__(self, index) -> "PromptCondition":
        """Rows of the batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda v: v[index])

    def repeat(self, n: int) -> "PromptCondition":
        """Each row n times in a row (as pipelines' num_images_per_prompt)."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def expand(self, batch: int) -> "PromptCondition":
        """A one-row condition repeated to `batch` rows."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a condition of {len(self)} rows to {batch}")
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def select(self, keep: torch.Tensor, other: "PromptCondition") -> "PromptCondition":
        """Row-wise: self where `keep` [B] is true, `other` elsewhere (e.g. condition dropout)."""
        values = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                values[f.name] = a if b is None else b
                continue
            k = keep.to(a.device).reshape(-1, *([1] * (a.ndim - 1)))
            values[f.name] = torch.where(k, a, b.to(a.dtype))
        return PromptCondition(**values)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PromptCondition":
        """Move; `dtype` applies to the floating fields (masks keep theirs)."""
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))


def _load_pipeline(pipeline_cls, path: str, *, family: str, components: dict[str, str], dtype, variant, revision,
                   option: str = "teacher.path", optional: tuple[str, ...] = (), **overrides):
    """`pipeline_cls.from_pretrained(path, ...)` (safetensors only), missing parts named in one line."""
    check_local_pipeline(path, components, family=family, option=option, optional=optional)
    kwargs = dict(**dtype_kwargs(dtype), use_safetensors=True, variant=variant, revision=revision,
                  **overrides)
    pipe = load_from_pretrained(pipeline_cls.from_pretrained, path, None, family=family, option=option,
                                kind="pipeline", what=pipeline_cls.__name__, **kwargs)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            missing = [n for n, p in module.named_parameters() if p.is_meta]
            if missing:
                raise TeacherWeightsError(f"{family} teacher: the weights of {name} in {path} lack {len(missing)} "
                                          f"parameters of its config (e.g. {missing[0]}); check {option}")
    return pipe


class LatentTeacher(Teacher):
    """Base of the latent text-to-image adapters: VAE, prompts, null condition, pipeline handle."""

    capabilities = TeacherCapabilities(conditioning="prompt", space="latent", null_condition=True, adapter=True)

    #: name of the denoiser component in the pipeline ("unet" or "transformer")
    denoiser_name: str = "unet"

    def __init__(self, pipeline, sample_shape: tuple[int, ...]):
        super().__init__()
        # keep the pipeline out of nn.Module's registry (it is not a module; its modules are ours below)
        object.__setattr__(self, "_pipeline", pipeline)
        self.denoiser = getattr(pipeline, self.denoiser_name)
        self.vae = pipeline.vae
        self.text_encoders = torch.nn.ModuleList(
            [m for name, m in sorted(pipeline.components.items())
             if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)])
        self.sample_shape = tuple(sample_shape)
        self._null_cache: dict = {}
        self.freeze()

    @property
    def pipeline(self):
        """The stock diffusers pipeline built on this teacher's own modules."""
        return self._pipeline

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def backbone(self) -> torch.nn.Module:
        return self.denoiser

    def _shared_with_clones(self) -> tuple:
        # the pipeline serves prompt encoding and sampling grids only (its tokenizers are not copied);
        # clones compute with their own `denoiser`
        return (self._pipeline,)

    # -- VAE -----------------------------------------------------------------------------------------

    def _latent_stats(self, like: torch.Tensor):
        cfg = self.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None, None
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean, device=like.device, dtype=like.dtype).reshape(shape),
                torch.tensor(std, device=like.device, dtype=like.dtype).reshape(shape))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Images in [-1, 1] -> the denoiser's latents (mean of the posterior unless `sample`)."""
        vae_dtype = next(self.vae.parameters()).dtype
        out = self.vae.encode(images.to(self.vae.device, vae_dtype))
        dist = getattr(out, "latent_dist", None)
        if dist is None:  # deterministic autoencoders (SANA's DC-AE)
            z = out.latent
        else:
            z = dist.sample(generator) if sample else dist.mode()
        z = z.to(images.dtype)
        cfg = self.vae.config
        mean, std = self._latent_stats(z)
        if mean is not None:
            return (z - mean) * cfg.scaling_factor / std
        return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (not clamped)."""
        cfg = self.vae.config
        mean, std = self._latent_stats(latents)
        if mean is not None:
            z = latents * std / cfg.scaling_factor + mean
        else:
            z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(self.vae.device, vae_dtype)).sample.to(latents.dtype)

    # -- prompts -------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: Sequence[str]) -> PromptCondition:
        raise NotImplementedError

    def _null_prompt_condition(self) -> PromptCondition:
        """One row: the condition the pipeline uses as unconditional (the empty prompt by default)."""
        return self.encode_prompt([""])

    def null_condition(self, batch: int, device=None) -> PromptCondition:
        key = str(device)
        if key not in self._null_cache:
            self._null_cache[key] = self._null_prompt_condition().to(device)
        return self._null_cache[key].expand(batch)

    @torch.no_grad()
    def velocity(self, x, t, cond=None, guidance: float | None = None):
        # a one-row condition (one prompt for the whole batch) is broadcast before CFG stacks it with the null
        if isinstance(cond, PromptCondition):
            cond = cond.expand(x.shape[0])
        return super().velocity(x, t, cond, guidance)

    def _condition(self, cond, batch: int) -> PromptCondition:
        """cond=None means unconditional; a one-row condition is broadcast to the batch."""
        if cond is None:
            return self.null_condition(batch, self.device)
        if not isinstance(cond, PromptCondition):
            raise TypeError(f"{type(self).__name__} is conditioned on prompts: pass teacher.encode_prompt([...]) "
                            f"(a PromptCondition), got {type(cond).__name__}")
        return cond.expand(batch).to(self.device)

    def _apply(self, fn, *args, **kwargs):
        self._null_cache = {}  # cached null embeddings follow the modules' device/dtype anew
        return super()._apply(fn, *args, **kwargs)


__all__ = ["PromptCondition", "LatentTeacher", "TeacherFilesMissingError", "TeacherWeightsError", "hub_offline"]
