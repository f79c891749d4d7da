"""TrigFlow (Lu & Song 2024): x_s = cos s x0 + sin s z, s in [0, pi/2], and the training-free conversion of a
flow-time velocity field into the TrigFlow network F that sCM trains.

TrigFlow data are scaled so that x0 = sigma_d x with z ~ N(0, sigma_d^2 I); dividing by sigma_d,

    y = x_s / sigma_d = cos s x + sin s eps,      dy/ds = F(y, s)   (the PF-ODE, dx_s/ds = sigma_d F).

The flow-time point with the same signal-to-noise ratio is tau = sin s / (sin s + cos s), x_tau = y / (sin s +
cos s), and with v the flow velocity there the exact TrigFlow field is

    F(y, s) = [(1 - 2 tau) x_tau + (tau^2 + (1 - tau)^2) v(x_tau, tau)] / sqrt(tau^2 + (1 - tau)^2).

The consistency function f(x_s, s) = cos s x_s - sin s sigma_d F works out (in y units) to
f / sigma_d = x_tau - tau v: the flow x0-prediction. So a student u(z, r, t) enters TrigFlow through its
jump to the data, v_hat(x_tau, tau) = u(x_tau, 0, tau): at initialisation (interval embedding zero) that is
the teacher's velocity and F_student = F_teacher exactly; once trained, f is the one-step map from any s.

The time input is s itself (the "dense" time of sCM: c_noise(s) = s, no 1000x): every derivative in s
(the JVP of sCM) is taken with respect to it. The backbone behind v still embeds its own flow time
(1000 tau for the digits UNet), which is why sCM may need the finite-difference JVP there (see
objectives/scm.py).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from onestep import paths

#: TrigFlow's data standard deviation (sCM, SANA-Sprint)
SIGMA_D = 0.5
HALF_PI = math.pi / 2


def trig_to_flow(y: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_tau, tau) for TrigFlow input y = cos s x + sin s eps (per-sample s of shape [B])."""
    sin, cos = torch.sin(s), torch.cos(s)
    tau = sin / (sin + cos)
    return y / paths.expand_like(sin + cos, y), tau


def flow_velocity_to_trig(x_tau: torch.Tensor, tau: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F(y, s) from the flow velocity v(x_tau, tau) at the same point (the formula above)."""
    norm2 = tau ** 2 + (1 - tau) ** 2
    a = paths.expand_like((1 - 2 * tau) / norm2.sqrt(), x_tau)
    b = paths.expand_like(norm2.sqrt(), x_tau)
    return a * x_tau + b * v


def trig_field(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y: torch.Tensor,
               s: torch.Tensor) -> torch.Tensor:
    """F(y, s) of any flow-time velocity function `velocity(x_tau, tau)`; differentiable in y and s."""
    x_tau, tau = trig_to_flow(y, s)
    return flow_velocity_to_trig(x_tau, tau, velocity(x_tau, tau).to(x_tau.dtype))


class TrigFlowStudent(nn.Module):
    """F_theta(y, s, cond) of an average-velocity student: the TrigFlow field of v_hat = u(x_tau, 0, tau).

    Not a copy: it calls `student`, so training F trains the student's one-step jumps u(., 0, tau).
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, y: torch.Tensor, s: torch.Tensor, cond=None) -> torch.Tensor:
        return trig_field(lambda x, tau: self.student(x, torch.zeros_like(tau), tau, cond), y, s)


def teacher_trig_field(teacher, y: torch.Tensor, s: torch.Tensor, cond=None, guidance=None) -> torch.Tensor:
    """F_T(y, s): the teacher's (guided) flow velocity converted to TrigFlow."""
    return trig_field(lambda x, tau: teacher.velocity(x, tau, cond, guidance), y, s)


def consistency_x0(y: torch.Tensor, s: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """f / sigma_d = cos s y - sin s F: the data estimate in y units."""
    return paths.expand_like(torch.cos(s), y) * y - paths.expand_like(torch.sin(s), y) * F


def sample_trig_time(noise: torch.Tensor, p_mean: float, p_std: float, sigma_d: float = SIGMA_D) -> torch.Tensor:
    """s = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2), from standard-normal draws `noise`."""
    return torch.atan(torch.exp(p_mean + p_std * noise) / sigma_d)


def consistency_times(steps: int, data_std: float = 1.0, intermediate: float = 1.3) -> list[float]:
    """The flow-time grid of the step-adaptive sampler: TrigFlow times linspace(pi/2, 0,
    steps + 1), except 2 steps at [pi/2, `intermediate`, 0] (diffusers' SCMScheduler default 1.3), mapped to
    the flow time of the same signal-to-noise ratio for data of standard deviation `data_std`:
    t / ((1 - t) data_std) = tan s, i.e. t = data_std sin s / (cos s + data_std sin s). sCM's times are for
    data normalised to the noise's scale (data_std 1: t = sin s / (sin s + cos s), the convention of this
    module); raw digits pixels have std 0.64, and their students sample better with 0.5 (README)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if data_std <= 0 or not 0 < intermediate < HALF_PI:
        raise ValueError(f"data_std must be > 0 and intermediate in (0, pi/2), got {data_std}, {intermediate}")
    trig = [HALF_PI, intermediate, 0.0] if steps == 2 else [HALF_PI * (1 - i / steps) for i in range(steps + 1)]
    return [1.0 if s == HALF_PI else data_std * math.sin(s) / (math.cos(s) + data_std * math.sin(s)) for s in trig]
