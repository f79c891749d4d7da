"""Flow matching: regress the velocity at r = t.

    z_t = (1 - t) x + t eps,   target = eps - x (from data) or v_teacher(z_t, t) (from a teacher)
    loss = mean || u_theta(z_t, t, t) - target ||^2

This trains teachers (`onestep teacher-train`); it is not a few-step distillation method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from onestep.objectives.base import Objective, OptimDefaults, frozen_eval, logit_normal

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES


@dataclass
class FlowMatchingConfig:
    target: str = "data"            # "data": eps - x; "teacher": the teacher's velocity
    time_sampler: str = "uniform"   # "uniform" or "logit_normal"
    mu: float = 0.0                 # logit-normal location
    sigma: float = 1.0              # logit-normal scale
    guidance: Optional[float] = None  # teacher CFG scale when target = "teacher"
    lr: float = 1e-3


@OBJECTIVES.register("flow_matching")
class FlowMatching(Objective):
    Config = FlowMatchingConfig
    distillation = False

    def __init__(self, student, teacher, cfg: FlowMatchingConfig):
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)

    @staticmethod
    def check_config(cfg: FlowMatchingConfig, teacher=...) -> None:
        if cfg.target not in ("data", "teacher"):
            raise ConfigError(f"objective.target must be 'data' or 'teacher', got {cfg.target!r}")
        if cfg.time_sampler not in ("uniform", "logit_normal"):
            raise ConfigError(f"objective.time_sampler must be 'uniform' or 'logit_normal', got {cfg.time_sampler!r}")
        if cfg.target == "teacher" and teacher is None:
            raise ConfigError("objective.target=teacher needs a teacher (teacher.name)")

    def default_optim(self, group):
        return OptimDefaults(lr=self.cfg.lr)

    def sample_t(self, n, device):
        if self.cfg.time_sampler == "uniform":
            return self.rand(n, device=device)
        return logit_normal(n, self.cfg.mu, self.cfg.sigma, self.randn(n, device=device))

    def loss(self, batch, step):
        x, cond = batch["x"], batch.get("cond")
        t = self.sample_t(x.shape[0], x.device).to(x.dtype)
        eps = self.randn(*x.shape, device=x.device).to(x.dtype)
        z_t = paths.interpolate(x, eps, t)
        if self.cfg.target == "data":
            target = eps - x
        else:
            with frozen_eval(self.teacher):
                target = self.teacher.velocity(z_t.float(), t, cond, self.cfg.guidance)
        pred = self.student(z_t, t, t, cond)
        loss = (pred.float() - target.float()).pow(2).mean()
        return {"student": loss, "log/loss": loss.detach()}
