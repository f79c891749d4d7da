"""`OneStepPipeline`: a diffusers pipeline for onestep's average-velocity pixel students.

A student u(z, r, t) has two time inputs, so no stock diffusers pipeline can drive it at every step
count (one step count at a time can: see `onestep.export`, which folds the interval embedding into a
plain `UNet2DModel` for `DDPMPipeline`). This pipeline runs onestep's own k-step sampler,

    z_r = z_t - (t - r) u(z_t, r, t)     on the uniform grid 1 = t_0 > ... > t_k = 0,

with the backbone as a stock `UNet2DModel` (timestep = 1000 t, and t - r through its
`class_embed_type="timestep"` embedding as class label interval_scale (t - r), 1000 by default) and a stock
`FlowMatchEulerDiscreteScheduler`: given the grid as `sigmas`, its Euler update
`z + (sigma_next - sigma) * model_output` *is* the average-velocity step when the model output is u.
A UNet without the interval embedding is a plain velocity model, for which the same loop is Euler.

Load an export with `OneStepPipeline.from_pretrained(DIR)`: diffusers' `DiffusionPipeline.from_pretrained`
only resolves pipeline classes that live inside diffusers (anything else needs `trust_remote_code`).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt")


def _cast_to_weight_dtype(module, args):
    # diffusers casts the time embedding's sinusoids to the model dtype but not the class embedding's
    # (float32): without this a float16/bfloat16 UNet fails in the interval embedding's first Linear
    return (args[0].to(module.linear_1.weight.dtype),) + tuple(args[1:])


def uniform_sigmas(steps: int) -> list[float]:
    """The k-step grid 1 -> 0 without its final 0, as diffusers schedulers take `sigmas`.

    Computed like `onestep.sampling.time_grid` (float64 linspace), so the float32 values the scheduler
    stores are the times onestep's sampler feeds its model.
    """
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    return np.linspace(1.0, 0.0, steps + 1)[:-1].tolist()


class OneStepPipeline(DiffusionPipeline):
    r"""Unconditional image generation with a onestep average-velocity student in k steps.

    Args:
        unet ([`UNet2DModel`]): u(z, r, t) with `class_embed_type="timestep"` embedding t - r
            (or a plain velocity UNet, sampled with Euler steps).
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): shift 1; it receives the uniform grid as `sigmas`.
        default_num_inference_steps (`int`): the step count the student was exported for.
        interval_scale (`float`): the interval embedding's class label is interval_scale * (t - r).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 default_num_inference_steps: int = 1, interval_scale: float = 1000.0):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps,
                                interval_scale=interval_scale)
        if self.has_interval_embedding:
            unet.class_embedding.register_forward_pre_hook(_cast_to_weight_dtype)

    @property
    def has_interval_embedding(self) -> bool:
        return self.unet.config.class_embed_type == "timestep"

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        r"""Generate images in `num_inference_steps` steps (default: the exported step count).

        Args:
            batch_size: number of images (ignored when `latents` is given).
            num_inference_steps: k; any k >= 1 runs the k-step sampler on the uniform grid.
            generator: torch generator(s) for the initial noise.
            latents: initial noise (B, C, H, W) at t = 1, instead of drawing it.
            output_type: "pil", "np" (B, H, W, C floats in [0, 1]) or "pt" (B, C, H, W in [0, 1]).
            return_dict: return an [`ImagePipelineOutput`] (else a tuple).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        steps = self.config.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        device = self._execution_device
        dtype = self.unet.dtype
        if latents is None:
            size = self.unet.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = (batch_size, self.unet.config.in_channels, *size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        z = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(steps, device=device, sigmas=uniform_sigmas(steps))
        sigmas = self.scheduler.sigmas  # k + 1 values, the last one 0
        time_scale = self.scheduler.config.num_train_timesteps  # timestep = time_scale * t
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            class_labels = None
            if self.has_interval_embedding:
                # same float32 arithmetic as onestep's sampler: (t - r) in float32, then x interval_scale
                interval = (sigmas[i] - sigmas[i + 1]).to(device=device, dtype=torch.float32)
                class_labels = (interval * self.config.interval_scale).expand(z.shape[0])
            u = self.unet(z, timestep.expand(z.shape[0]), class_labels=class_labels).sample
            z = self.scheduler.step(u, timestep, z).prev_sample

        images = (z / 2 + 0.5).clamp(0, 1)  # the students' pixel data live in [-1, 1]
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
