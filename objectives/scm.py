"""sCM: continuous-time consistency distillation / training in TrigFlow (Lu & Song 2024).

The student u(z, r, t) enters TrigFlow through its jump to the data (onestep/trigflow.py): F_theta(y, s) is
the TrigFlow field of v_hat = u(x_tau, 0, tau), so the consistency function f = cos s y - sin s F_theta is
the student's one-step map from any s. Per sample (y = x_s / sigma_d = cos s x + sin s eps):

    dy/ds = F_T^cfg(y, s)                      sCD: the teacher's PF-ODE (`velocity: teacher`)
          = cos s eps - sin s x                sCT: the conditional path (`velocity: data`)
    F-, J = jvp(F_theta-, (y, s), (cos s sin s dy/ds, cos s sin s))      no grad; J = cos s sin s dF/ds
    g     = -cos^2 s (sigma_d F- - sigma_d dy/ds) - r_w (cos s sin s sigma_d y + sigma_d J)   (= cos s df-/ds)
    g     = g / (||g|| + c)                    tangent normalisation (or clip to [-1, 1], or none)
    loss  = w(s) / e^logvar(s) * mean_dims (F - sg[F] - g)^2 + logvar(s),   w(s) = 1 / (sigma_d tan s)

r_w = min(1, step / tangent_warmup) warms the tangent up; logvar(s) is a learned head (adaptive weighting)
trained with the student. The gradient of (F - sg[F] - g)^2 is -2 g dF/dtheta: the sCM direction. Times:
s = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2), clamped to [time_clamp, pi/2 - time_clamp] (tan s
and 1 / tan s blow up at the ends). JVPs and the loss arithmetic run in fp32.

`jvp`: "single" is torch.func.jvp (exact; networks with attention need the math or fused attention);
"finite_difference" is the central difference [F(y + h a, s + h b) - F(y - h a, s - h b)] / 2h along the
same tangent (a, b): no forward-mode AD, and an average over +-h for backbones whose time embedding
(1000 tau) makes the exact derivative oscillate.

The trained student is sampled with the step-adaptive consistency sampler (`student.sampler =
"consistency"`): jump to the data, re-noise with fresh noise, 1-4 steps from one model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from onestep.objectives.base import Objective, OptimDefaults, autocast_off, frozen_eval
from torch import nn

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES
from onestep.sampling import SamplerSpec
from onestep.student import sinusoidal_embedding
from onestep.trigflow import HALF_PI, consistency_times, sample_trig_time, teacher_trig_field, trig_field

JVP_MODES = ("single", "finite_difference")
TANGENT_NORMS = ("normalize", "clip", "none")


@dataclass
class SCMConfig:
    velocity: str = "teacher"          # dy/ds: "teacher" (sCD, distillation) or "data" (sCT, from scratch)
    guidance: Optional[float] = None   # the teacher's CFG scale (sCD)
    sigma_d: float = 0.5
    p_mean: float = -1.0               # s = arctan(e^tau / sigma_d), tau ~ N(p_mean, p_std^2) (CIFAR-10 values)
    p_std: float = 1.4
    time_clamp: float = 1e-4           # s in [time_clamp, pi/2 - time_clamp]
    tangent_warmup: int = 1000         # r_w = min(1, step / tangent_warmup); 0: no warm-up
    tangent_norm: str = "normalize"    # "normalize" (g / (||g|| + c)), "clip" (to [-1, 1]) or "none"
    tangent_norm_c: float = 0.1
    prior_weight: bool = True          # w(s) = 1 / (sigma_d tan s); False: w = 1
    learn_logvar: bool = True          # the adaptive-weighting head logvar(s)
    jvp: str = "single"                # "single" or "finite_difference", see the module docstring
    fd_step: float = 1e-3              # h of jvp=finite_difference (in units of the tangent)
    sampler_data_std: float = 1.0      # the k-step sampler's grid: consistency_times(k, data_std, intermediate)
    sampler_intermediate: float = 1.3  # TrigFlow time of the 2-step sampler's middle point (diffusers' default)
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0


def check_scm_config(cfg, teacher=...) -> None:
    if cfg.velocity not in ("teacher", "data"):
        raise ConfigError(f"objective.velocity must be 'teacher' or 'data', got {cfg.velocity!r}")
    if cfg.velocity == "teacher" and teacher is None:
        raise ConfigError("objective.velocity=teacher (sCD) needs a teacher (teacher.name); sCT is velocity=data")
    if cfg.jvp not in JVP_MODES:
        raise ConfigError(f"objective.jvp must be one of {', '.join(JVP_MODES)}, got {cfg.jvp!r}")
    if cfg.tangent_norm not in TANGENT_NORMS:
        raise ConfigError(f"objective.tangent_norm must be one of {', '.join(TANGENT_NORMS)}, got {cfg.tangent_norm!r}")
    if not 0 < cfg.time_clamp < 0.5:
        raise ConfigError(f"objective.time_clamp must be in (0, 0.5), got {cfg.time_clamp}")
    if cfg.sigma_d <= 0 or cfg.p_std <= 0 or cfg.tangent_norm_c <= 0:
        raise ConfigError(f"objective.sigma_d, p_std and tangent_norm_c must be > 0, got "
                          f"{cfg.sigma_d}, {cfg.p_std}, {cfg.tangent_norm_c}")
    if cfg.tangent_warmup < 0:
        raise ConfigError(f"objective.tangent_warmup must be >= 0, got {cfg.tangent_warmup}")
    if not 0 < cfg.fd_step < 0.1:
        raise ConfigError(f"objective.fd_step must be in (0, 0.1), got {cfg.fd_step}")
    if len(cfg.betas) != 2:
        raise ConfigError(f"objective.betas must be two numbers, got {cfg.betas}")
    try:  # the grid function holds the rule; a config error names the options
        consistency_times(2, cfg.sampler_data_std, cfg.sampler_intermediate)
    except ValueError:
        raise ConfigError(f"objective.sampler_data_std must be > 0 and sampler_intermediate in (0, pi/2), got "
                          f"{cfg.sampler_data_std}, {cfg.sampler_intermediate}") from None


class ConsistencySampled:
    """For objectives whose students sample with the consistency sampler (scm, scm_ladd, ladd, rcm): on the grid of
    the config's `sampler_data_std` and `sampler_intermediate`."""

    student_sampler = "consistency"

    @classmethod
    def sampler_spec(cls, cfg, steps_done: int = 0, teacher=None) -> SamplerSpec:
        return SamplerSpec(kind="consistency", grid="consistency", consistency_data_std=cfg.sampler_data_std,
                           consistency_intermediate=cfg.sampler_intermediate)


class LogVarianceHead(nn.Module):
    """logvar(s): Fourier features of the TrigFlow time -> one number per sample, zero at initialisation."""

    def __init__(self, frequencies: int = 64, scale: float = 1000.0 / HALF_PI):
        super().__init__()
        self.frequencies, self.scale = frequencies, scale
        self.linear = nn.Linear(frequencies, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        e = sinusoidal_embedding(s.to(torch.float32) * self.scale, self.frequencies)
        return self.linear(e.to(self.linear.weight.dtype)).squeeze(1).to(torch.promote_types(s.dtype, torch.float32))


class SCMLoss(nn.Module):
    """The sCM loss of one batch; shared by `scm` and `scm_ladd`. Holds the log-variance head."""

    def __init__(self, objective: Objective, cfg):
        super().__init__()
        object.__setattr__(self, "objective", objective)  # not a submodule: the objective holds this
        self.cfg = cfg
        self.logvar = LogVarianceHead() if cfg.learn_logvar else None

    def student_parameters(self) -> list[nn.Parameter]:
        """What the student's optimizer group trains: its trainable parameters and the log-variance head's."""
        params = [p for p in self.objective.student.parameters() if p.requires_grad]
        return params + (list(self.logvar.parameters()) if self.logvar is not None else [])

    # --- pieces ------------------------------------------------------------------------------------
    def student_trig(self, y, s, cond=None):
        """F_theta(y, s): the TrigFlow field of the student's jump to the data."""
        student = self.objective.student
        return trig_field(lambda x, tau: student(x, torch.zeros_like(tau), tau, cond), y, s)

    def sample_times(self, n: int, device=None) -> torch.Tensor:
        c = self.cfg.time_clamp
        s = sample_trig_time(self.objective.randn(n), self.cfg.p_mean, self.cfg.p_std, self.cfg.sigma_d)
        return s.clamp(c, HALF_PI - c).to(device)

    def ode_direction(self, x, eps, y, s, cond):
        """dy/ds: the teacher's PF-ODE (sCD) or the conditional path's derivative (sCT)."""
        if self.cfg.velocity == "data":
            return paths.expand_like(torch.cos(s), x) * eps - paths.expand_like(torch.sin(s), x) * x
        teacher = self.objective.teacher
        with frozen_eval(teacher):
            return teacher_trig_field(teacher, y, s, cond, self.cfg.guidance).to(y.dtype)

    def time_derivative(self, y, s, dyds, cond):
        """(F-, J) with J = cos s sin s dF/ds along the ODE: no gradient, fp32, the student in its mode."""
        fn = lambda y_, s_: self.student_trig(y_, s_, cond)  # noqa: E731
        cs = torch.cos(s) * torch.sin(s)
        tangents = (paths.expand_like(cs, y) * dyds, cs)
        with torch.no_grad(), autocast_off(y.device):
            if self.cfg.jvp == "single":
                return torch.func.jvp(fn, (y, s), tangents)
            h = self.cfg.fd_step
            plus = fn(y + h * tangents[0], s + h * tangents[1])
            minus = fn(y - h * tangents[0], s - h * tangents[1])
            return fn(y, s), (plus - minus) / (2 * h)

    def tangent(self, y, s, dyds, F_minus, J, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(g after normalisation, ||g|| before it), as in the module docstring."""
        cfg, sd = self.cfg, self.cfg.sigma_d
        warm = 1.0 if cfg.tangent_warmup == 0 else min(1.0, step / cfg.tangent_warmup)
        cos, sin = paths.expand_like(torch.cos(s), y), paths.expand_like(torch.sin(s), y)
        g = -cos ** 2 * (sd * F_minus - sd * dyds) - warm * (cos * sin * sd * y + sd * J)
        norm = g.flatten(1).norm(dim=1)
        if cfg.tangent_norm == "normalize":
            g = g / paths.expand_like(norm + cfg.tangent_norm_c, g)
        elif cfg.tangent_norm == "clip":
            g = g.clamp(-1, 1)
        return g, norm

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        if not self.cfg.prior_weight:
            return torch.ones_like(s)
        return 1 / (self.cfg.sigma_d * torch.tan(s))

    # --- the loss ----------------------------------------------------------------------------------
    def forward(self, batch, step: int) -> tuple[torch.Tensor, dict]:
        obj = self.objective
        x, cond = batch["x"], batch.get("cond")
        n, acc = x.shape[0], torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(acc)
        s = self.sample_times(n, x.device).to(acc)
        eps = obj.randn(*x.shape, device=x.device).to(acc)
        y = paths.expand_like(torch.cos(s), x32) * x32 + paths.expand_like(torch.sin(s), x32) * eps
        with torch.no_grad():
            dyds = self.ode_direction(x32, eps, y, s, cond).to(acc)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the target pass replays these draws (dropout masks)
            F = self.student_trig(y.to(x.dtype), s.to(x.dtype), cond).to(acc)
        F_minus, J = self.time_derivative(y, s, dyds, cond)
        with torch.no_grad():
            g, g_norm = self.tangent(y, s, dyds, F_minus.to(acc), J.to(acc), step)
        per_sample = (F - F_minus.to(acc).detach() - g).pow(2).flatten(1).mean(1)
        logvar = self.logvar(s) if self.logvar is not None else torch.zeros_like(s)
        loss = (self.weight(s) / logvar.exp() * per_sample + logvar).mean()
        logs = {"log/loss_scm": loss.detach(), "log/g_norm": g_norm.mean(), "log/logvar": logvar.detach().mean(),
                "log/scm_mse": (self.weight(s) * per_sample).detach().mean()}
        return loss, logs


@OBJECTIVES.register("scm")
class SCM(ConsistencySampled, Objective):
    """sCM alone: the student (and its log-variance head) every step."""

    Config = SCMConfig
    needs_interval = True          # the student's u(., 0, t): its interval embedding carries t - 0

    def __init__(self, student, teacher, cfg: SCMConfig):
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.scm = SCMLoss(self, cfg)

    @staticmethod
    def check_config(cfg, teacher=...) -> None:
        check_scm_config(cfg, teacher)

    def param_groups(self):
        return {"student": self.scm.student_parameters()}

    def default_optim(self, group):
        return OptimDefaults(lr=self.cfg.lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay)

    def loss(self, batch, step):
        loss, logs = self.scm(batch, step)
        return {"student": loss, "log/loss": loss.detach(), **logs}

