"""`OneStepPipeline`: a diffusers pipeline for onestep's average-velocity pixel students, and
`StudentVPScheduler`: the k-step sampler of students of VP teachers (SD, SDXL, pixel DDPM) as a scheduler
for the teachers' own stock pipelines (both need onestep installed to load).

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
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
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
        max_num_inference_steps (`int`, *optional*): the most steps this student was trained to take with
            this sampler (1 for consistency-trained students, whose own sampler re-noises between steps);
            None: any.
        time_scale (`float`, *optional*): the UNet's timestep is time_scale * t (1 for students of the
            dense-time digits teacher); None: the scheduler's num_train_timesteps (1000).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 default_num_inference_steps: int = 1, interval_scale: float = 1000.0,
                 max_num_inference_steps: int | None = None, time_scale: float | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps,
                                interval_scale=interval_scale, max_num_inference_steps=max_num_inference_steps,
                                time_scale=time_scale)
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
        most = self.config.get("max_num_inference_steps")
        if most is not None and steps > most:
            raise ValueError(f"num_inference_steps={steps}, but this student was exported for at most {most} step(s) "
                             f"(its training sampler is not this pipeline's k-step sampler)")
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
        time_scale = self.config.get("time_scale")  # None (and exports older than it): the scheduler's timesteps
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            class_labels = None
            if self.has_interval_embedding:
                # same float32 arithmetic as onestep's sampler: (t - r) in float32, then x interval_scale
                interval = (sigmas[i] - sigmas[i + 1]).to(device=device, dtype=torch.float32)
                class_labels = (interval * self.config.interval_scale).expand(z.shape[0])
            # the scheduler's timestep is 1000 t; a student with another time scale sees time_scale * t, computed
            # as onestep's sampler does (float32 t, then x time_scale)
            unet_time = (timestep if time_scale is None
                         else sigmas[i].to(device=device, dtype=torch.float32) * time_scale)
            u = self.unet(z, unet_time.expand(z.shape[0]), class_labels=class_labels).sample
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


class StudentVPScheduler(SchedulerMixin, ConfigMixin):
    r"""The k-step sampler of a onestep student of a VP teacher (SD1.x/2.x, SDXL, pixel DDPM UNets) as a
    diffusers scheduler, for the teacher's own stock pipeline (`--format onestep`).

    No diffusers scheduler takes such a student's steps for k >= 2 (see `onestep.export`): above the VP
    schedule (flow time t = 1) the student keeps only the model's x0 and re-noises with the input noise
    itself, and its uniform flow-time grid falls between the model's integer timesteps. This scheduler
    runs onestep's own step: its `timesteps` are the model's (fractional) timesteps of the uniform grid
    1 = t_0 > ... > t_k = 0, the latents between steps are the model's native inputs there (so pipelines
    that do not call `scale_model_input`, like DDPMPipeline, work too), and `step` converts the model
    output to the flow velocity with `onestep.teachers.vp.DiscreteVPModelTime` - the student's own code -
    and moves z_r = z_t - (t - r) v. The last step returns the flow sample at t = 0 (the data).

    The backbone it drives has the student's interval embedding folded in for t - r = 1/k, so the
    scheduler accepts only that k (`num_inference_steps`).

    Loading needs onestep installed: `DiffusionPipeline.from_pretrained(DIR)` imports this class by the
    module path the folder's model_index.json names (`onestep.pipelines`).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, teacher_scheduler_config: dict | None = None, prediction_type: str = "epsilon",
                 num_inference_steps: int = 1, num_train_timesteps: int = 1000):
        from onestep.teachers.vp import DiscreteVPModelTime

        teacher = {k: v for k, v in (teacher_scheduler_config or {}).items() if not k.startswith("_")}
        teacher.setdefault("num_train_timesteps", num_train_timesteps)
        self._time = DiscreteVPModelTime(teacher, prediction_type)
        self.init_noise_sigma = 1.0  # flow noise at t = 1 is the model's input there as it is
        self.timesteps = None
        self._times: list[float] = []
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, **kwargs) -> None:
        from onestep.paths import batch_time
        from onestep.sampling import time_grid

        k = self.config.num_inference_steps
        if num_inference_steps != k:
            raise ValueError(f"this pipeline's UNet holds the student's interval embedding for {k} steps: call it "
                             f"with num_inference_steps={k} (got {num_inference_steps})")
        self._times = time_grid(k, dtype=torch.float64).tolist()
        like = torch.zeros(1)  # the sampler's times are float32 tensors
        self.timesteps = torch.cat([self._time.schedule.timestep(batch_time(t, like))
                                    for t in self._times[:-1]]).to(device)
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # the latents are kept in the model's native coordinates

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor):
        """(outside mask shaped like `like`, a, b) at flow times t, as the adapter computes them (the
        model's input is then bit for bit the one onestep's sampler gives it)."""
        from onestep import paths

        sched = self._time.schedule
        a, b = paths.vp_coefficients(sched.alpha_bar(sched.timestep(t)))
        outside = ((t > sched.t_max) | (t < sched.t_min)).reshape(-1, *([1] * (like.ndim - 1)))
        return outside, a.to(like.dtype), b.to(like.dtype)

    def _flow_to_native(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from onestep import paths

        outside, a, b = self._coefficients(t, x)
        return torch.where(outside, paths.flow_to_vp_x(x, t), paths.flow_to_gaussian_x(x, a, b))

    def _native_to_flow(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from onestep import paths

        outside, a, b = self._coefficients(t, x)
        hyp = torch.hypot(1 - t, t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(outside, x * hyp, paths.gaussian_to_flow_x(x, a, b))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs):
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        from onestep.paths import batch_time

        if self._step_index is None:
            raise ValueError("call set_timesteps before step")
        t, r = self._times[self._step_index], self._times[self._step_index + 1]
        t_batch = batch_time(t, sample)
        x = self._native_to_flow(sample, t_batch)
        v = self._time.velocity(lambda x_native, k: model_output, x, t_batch)
        z = x - (t - r) * v  # the student's step, as onestep.sampling.sample_avg_velocity takes it
        self._step_index += 1
        prev = z if r <= 0 else self._flow_to_native(z, batch_time(r, z))
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
