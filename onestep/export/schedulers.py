"""The stock diffusers schedulers whose grids are the student's k-step grid, and their one-line descriptions
for the model card."""
from __future__ import annotations

import torch

from onestep.errors import ExportError


def stock_flow_scheduler(steps: int):
    """`FlowMatchEulerDiscreteScheduler` whose `set_timesteps(steps)` gives sigmas 1, 1 - 1/k, ..., 1/k, 0.

    By default its grid is linspace(1, 1/1000, k) (it ends at sigma_min = 1/num_train_timesteps);
    `shift_terminal` = 1/k stretches 1 - sigma so the last sigma lands on 1/k, which makes the grid
    uniform. For k = 1 the default grid [1] is already right (and the stretch would divide by 0).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    kwargs = {} if steps == 1 else {"shift_terminal": 1.0 / steps}
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, **kwargs)
    sigmas = torch.tensor(scheduler_sigmas(scheduler, steps))
    from onestep.sampling import time_grid

    err = (sigmas - time_grid(steps, dtype=torch.float64).float()).abs().max().item()
    if err > 1e-7:
        raise ExportError(f"this diffusers' FlowMatchEulerDiscreteScheduler does not give the uniform "
                          f"{steps}-step grid (off by {err:.2g})")
    return scheduler


def _student_timesteps(scheduler) -> list[float]:
    scheduler.set_timesteps(scheduler.config.num_inference_steps)
    return scheduler.timesteps.tolist()


def scheduler_sigmas(scheduler, steps: int) -> list[float]:
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.tolist()


def vp_one_step_scheduler(time):
    """DDIM whose 1-step schedule is timestep N-1 straight to alpha_bar = 1: the student's step from t = 1.

    The betas (and so alpha_bar at every timestep, the model's time map) are the teacher's; trailing
    spacing puts the single step at N-1, set_alpha_to_one makes its target alpha_bar 1, and with
    clipping and thresholding off the step returns the model's x0 as predicted.
    """
    from diffusers import DDIMScheduler

    config = {k: v for k, v in time.scheduler_config.items() if not k.startswith("_")}
    config.update(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False,
                  steps_offset=1, prediction_type=time.prediction_type)  # offset: unused when trailing
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(1)
    if ddim.timesteps.tolist() != [time.num_train_timesteps - 1] or float(ddim.final_alpha_cumprod) != 1.0:
        raise ExportError("this diffusers' DDIMScheduler does not step from the last timestep to alpha_bar = 1")
    return ddim


def flow_scheduler(steps: int, pipeline_sets_sigmas: bool = False):
    """FlowMatchEulerDiscreteScheduler giving the uniform k-step grid in the family's pipeline: FLUX
    passes sigmas linspace(1, 1/k, k) itself (shift 1 keeps them), the others call set_timesteps(k)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if pipeline_sets_sigmas:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return stock_flow_scheduler(steps)


ONESTEP_SCHEDULER_NOTE = " with `onestep.pipelines.StudentVPScheduler` (loading needs onestep installed)"


def scheduler_line(scheduler) -> str:
    cfg = scheduler.config
    if type(scheduler).__name__ == "StudentVPScheduler":
        return (f"`onestep.pipelines.StudentVPScheduler`: num_inference_steps={cfg.num_inference_steps}, "
                f"prediction_type={cfg.prediction_type}, the teacher's betas "
                f"({cfg.teacher_scheduler_config.get('beta_schedule')}, "
                f"{cfg.teacher_scheduler_config.get('beta_start')} to {cfg.teacher_scheduler_config.get('beta_end')}, "
                f"{cfg.num_train_timesteps} steps); timesteps "
                + ", ".join(f"{t:.2f}" for t in _student_timesteps(scheduler)))
    keys = {"DDIMScheduler": ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                              "timestep_spacing", "set_alpha_to_one", "clip_sample", "thresholding", "steps_offset",
                              "rescale_betas_zero_snr"),
            "FlowMatchEulerDiscreteScheduler": ("num_train_timesteps", "shift", "shift_terminal",
                                                "use_dynamic_shifting")}[type(scheduler).__name__]
    return f"`{type(scheduler).__name__}`: " + ", ".join(f"{k}={cfg.get(k)}" for k in keys)
