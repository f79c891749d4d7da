"""Discrete-time VP (DDPM) models seen in flow time: the shared core of the UNet and Stable Diffusion
adapters.

A diffusers VP model takes ``x = a x0 + b eps`` (a = sqrt(abar_k), b = sqrt(1 - abar_k)) and an integer
timestep k in [0, N-1], and predicts eps, x0 ("sample") or diffusers' v. :class:`DiscreteVPModelTime`
asks such a model for the flow velocity at any continuous flow time t: the timestep is
``DiscreteVPSchedule.timestep(t)`` (log-SNR interpolation between the integer steps, exact at them)
and every conversion is a function of :mod:`onestep.paths`.

Outside the schedule's range [t_min, t_max] (about [0.03, 0.93] for SD's schedule; flow time 1 is
noisier than any step the model was trained on) the model is asked at its nearest step, fed the
unit-variance VP sample of the true t (as DDIM pipelines feed pure noise at their first step), and
only the prediction that stays meaningful there is kept: x0 above t_max (v = (x_t - x0) / t, regular
up to t = 1), eps below t_min (v = (eps - x_t) / (1 - t), regular down to t = 0). Inside the range the
velocity is the model's own, converted exactly.
"""
from __future__ import annotations

from typing import Callable

import torch

from onestep import paths
from onestep.paths import DiscreteVPSchedule
from onestep.sampling import solve_ode

#: predict(x_native, timestep[B]) -> the model's native prediction (eps, x0 or diffusers' v)
NativePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [B] boolean mask shaped to broadcast against x (expand_like would cast it to x's dtype)."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


class DiscreteVPModelTime:
    """The time map of a discrete VP model, built from its diffusers scheduler config."""

    def __init__(self, scheduler_config: dict, prediction_type: str | None = None):
        from diffusers import DDIMScheduler

        self.scheduler_config = dict(scheduler_config)
        # DDIM's constructor computes alphas_cumprod from the same config keys (betas, schedule,
        # trained_betas, zero-SNR rescaling) as every diffusers VP scheduler, in the same float32 maths
        self._ddim = DDIMScheduler.from_config(self.scheduler_config)
        self.prediction_type = prediction_type or self._ddim.config.prediction_type
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction_type {self.prediction_type!r} for a VP teacher; allowed: "
                             "epsilon, sample, v_prediction")
        self.schedule = DiscreteVPSchedule.from_scheduler(self._ddim)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def velocity(self, predict: NativePredictor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flow velocity at flow coordinates x (``[B, ...]``) and flow time t (``[B]``)."""
        sched = self.schedule
        k = sched.timestep(t)
        a, b = paths.vp_coefficients(sched.alpha_bar(k))
        a, b = a.to(x.dtype), b.to(x.dtype)
        above, below = t > sched.t_max, t < sched.t_min
        outside = _per_sample(above | below, x)
        # inside: the model's own coordinates at its step; outside: the VP sample at the true t
        x_native = torch.where(outside, paths.flow_to_vp_x(x, t), paths.flow_to_gaussian_x(x, a, b))
        pred = predict(x_native, k).to(x.dtype)
        v_model = paths.prediction_to_velocity(pred, self.prediction_type, x_native, a, b)
        if not bool(above.any() or below.any()):
            return v_model
        # what the model believes x0 and eps are, at the time (a, b) it was told
        t_model = paths.gaussian_to_flow_t(a, b)
        x_model = paths.gaussian_to_flow_x(x_native, a, b)
        x0_hat = paths.velocity_to_x0(x_model, t_model, v_model)
        eps_hat = paths.velocity_to_eps(x_model, t_model, v_model)
        # times of the unused branches kept away from 0 and 1, so torch.where sees no inf (nor NaN grads)
        t_above = torch.where(above, t, torch.ones_like(t))
        t_below = torch.where(below, t, torch.zeros_like(t))
        v = torch.where(_per_sample(above, x), paths.x0_to_velocity(x, t_above, x0_hat), v_model)
        return torch.where(_per_sample(below, x), paths.eps_to_velocity(x, t_below, eps_hat), v)

    # -- the scheduler's own grid -------------------------------------------------------------------

    def scheduler_grid(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(timesteps, flow times, final alpha_bar) of DDIM with this config and `steps` steps.

        The flow times are those of the timesteps followed by the time DDIM's last step lands on
        (alpha_bar = 1, i.e. t = 0, with ``set_alpha_to_one``; else alpha_bar of step 0).
        """
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler_config)
        ddim.set_timesteps(steps)
        ks = ddim.timesteps.to(torch.float64)
        final = float(ddim.final_alpha_cumprod)
        t_final = paths.vp_alpha_bar_to_flow_t(torch.tensor(final, dtype=torch.float64))
        times = torch.cat([self.schedule.flow_t(ks), t_final.reshape(1)])
        return ddim.timesteps, times, final

    @torch.no_grad()
    def sample_on_scheduler_grid(self, velocity, latents: torch.Tensor, steps: int, solver: str = "euler"):
        """The flow ODE on DDIM's grid, from the pipeline's initial latents to its final latents.

        `latents` are what a diffusers pipeline starts from (unit-variance noise taken as the sample at
        the first timestep); the result is in the same coordinates as the pipeline's output (the VP
        sample at the last step's target, which is the flow sample itself when that target is t = 0).
        With solver="euler" every step is a DDIM step (eta = 0).
        """
        timesteps, times, final = self.scheduler_grid(steps)
        abar0 = self.schedule.alphas_cumprod[int(timesteps[0])]
        x = paths.vp_to_flow_x(latents, abar0.to(latents.dtype))
        x = solve_ode(velocity, x, steps=steps, solver=solver, times=times)
        a, b = paths.vp_coefficients(torch.tensor(final, dtype=torch.float64))
        return paths.flow_to_gaussian_x(x, a.to(x.dtype), b.to(x.dtype))
