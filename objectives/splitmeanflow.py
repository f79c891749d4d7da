"""SplitMeanFlow (Guo et al. 2025): interval-splitting consistency of the average velocity, no JVP.

For r <= s <= t the exact average velocity satisfies
    (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t),  z_s = z_t - (t - s) u(z_t, s, t),
i.e. with s = (1 - lam) t + lam r:  u(z_t, r, t) = (1 - lam) u(z_s, r, s) + lam u(z_t, s, t).

Each sample is, per sample, a *boundary* sample (probability p = flow_ratio, r = t):
    L_b = || u(z_t, t, t) - v_tgt ||^2,  v_tgt = v_teacher^cfg(z_t, t) (distillation) or eps - x (scratch)
or a *consistency* sample:
    L_c = || u(z_t, r, t) - sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] ||^2
Targets are built under no_grad in fp32; the gradient flows only through the prediction.

(r, t): two logit-normal draws, t = max, r = min (MeanFlow's sampler), or uniform r < t. A share
`anchor_share` of the consistency samples is put on the sampler's own intervals (by default half of
them, on the 1-step interval (0, 1) and the 2-step jumps (0, 1/2), (1/2, 1)): drawing (r, t) only from
a logit-normal barely trains the one-step map. On an 8-mode 2-D mixture these defaults beat a quarter
on (0, 1) alone at 2 steps, and at 1 step for a plain MLP (benchmarks/splitmeanflow_stability.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from onestep.objectives.base import (
    Objective,
    OptimDefaults,
    anchor_tensor,
    at_least_one_row,
    frozen_eval,
    sample_intervals,
)

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """Targets and losses in at least fp32 (float64 stays float64 in tests)."""
    return torch.promote_types(x.dtype, torch.float32)


@dataclass
class SplitMeanFlowConfig:
    flow_ratio: float = 0.5          # p: probability of a boundary sample; must be >= 0.5
    boundary_target: str = "teacher"  # "teacher" (distillation) or "data" (eps - x, from scratch)
    guidance: Optional[float] = None  # teacher CFG scale for the boundary target
    time_sampler: str = "logit_normal"  # "logit_normal" or "uniform"
    mu: float = -0.4
    sigma: float = 1.0
    anchor_share: float = 0.5        # share of consistency samples placed on `anchor_intervals`
    # [r, t] pairs: the 1-step interval and the two jumps of the 2-step sampler
    anchor_intervals: List[List[float]] = field(default_factory=lambda: [[0.0, 1.0], [0.0, 0.5], [0.5, 1.0]])
    lr: float = 1e-4


@OBJECTIVES.register("splitmeanflow")
class SplitMeanFlow(Objective):
    Config = SplitMeanFlowConfig
    needs_interval = True  # trains u(z, r, t) for r < t

    def __init__(self, student, teacher, cfg: SplitMeanFlowConfig):
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.register_buffer("anchors", anchor_tensor(cfg), persistent=False)

    @staticmethod
    def check_config(cfg: SplitMeanFlowConfig, teacher=...) -> None:
        if not 0.5 <= cfg.flow_ratio <= 1.0:
            raise ConfigError(
                f"objective.flow_ratio must be in [0.5, 1] (smaller flow ratios collapse), got {cfg.flow_ratio}")
        if cfg.boundary_target not in ("teacher", "data"):
            raise ConfigError(f"objective.boundary_target must be 'teacher' or 'data', got {cfg.boundary_target!r}")
        if cfg.boundary_target == "teacher" and teacher is None:
            raise ConfigError("objective.boundary_target=teacher needs a teacher (teacher.name)")
        if cfg.time_sampler not in ("logit_normal", "uniform"):
            raise ConfigError(f"objective.time_sampler must be 'logit_normal' or 'uniform', got {cfg.time_sampler!r}")
        anchor_tensor(cfg)

    def default_optim(self, group):
        return OptimDefaults(lr=self.cfg.lr)

    def sample_times(self, n: int, device=None):
        """(r, t, is_boundary) per sample; r = t on boundary samples."""
        cfg = self.cfg
        r, t, is_boundary = sample_intervals(
            self, n, sampler=cfg.time_sampler, mu=cfg.mu, sigma=cfg.sigma, p_equal=cfg.flow_ratio,
            anchors=self.anchors, anchor_share=cfg.anchor_share)
        return r.to(device), t.to(device), is_boundary.to(device)

    def consistency_target(self, z_t, r, t, lam, cond=None):
        """sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] with two no-grad passes, in fp32."""
        u_fn, acc = self.student, _accumulation_dtype(z_t)
        with frozen_eval(u_fn):
            s = (1 - lam) * t + lam * r
            u2 = u_fn(z_t, s, t, cond).to(acc)
            z_s = z_t.to(acc) - paths.expand_like(t - s, z_t) * u2   # fp32: z_s in bf16 drifts
            u1 = u_fn(z_s.to(z_t.dtype), r, s, cond).to(acc)
            lam_x = paths.expand_like(lam, z_t)
            return (1 - lam_x) * u1 + lam_x * u2

    def boundary_target(self, x, eps, z_t, t, cond=None):
        if self.cfg.boundary_target == "data":
            return (eps - x).to(_accumulation_dtype(x))
        with frozen_eval(self.teacher):
            return self.teacher.velocity(z_t, t, cond, self.cfg.guidance).to(_accumulation_dtype(x))

    def loss(self, batch, step):
        x, cond = batch["x"], batch.get("cond")
        n = x.shape[0]
        r, t, is_boundary = self.sample_times(n, x.device)
        r, t = r.to(x.dtype), t.to(x.dtype)
        eps = self.randn(*x.shape, device=x.device).to(x.dtype)
        lam = self.rand(n, device=x.device).to(x.dtype)
        z_t = paths.interpolate(x, eps, t)

        # targets: teacher velocity on boundary samples, split consistency on the others
        target = torch.empty(z_t.shape, device=x.device, dtype=_accumulation_dtype(x))
        b, c = is_boundary.nonzero().squeeze(1), (~is_boundary).nonzero().squeeze(1)
        sub = (lambda v, i: None if v is None else v[i])
        # both run even when this process has no sample of a kind (on one stand-in row, dropped): sharded (FSDP)
        # processes must call the same networks in lockstep
        bb, cc = at_least_one_row(b), at_least_one_row(c)
        target[b] = self.boundary_target(x[bb], eps[bb], z_t[bb], t[bb], sub(cond, bb))[:len(b)]
        target[c] = self.consistency_target(z_t[cc], r[cc], t[cc], lam[cc], sub(cond, cc))[:len(c)]

        pred = self.student(z_t, r, t, cond).to(target.dtype)
        err = (pred - target).pow(2).flatten(1).mean(1)      # per-sample mean squared error
        loss = err.mean()
        logs = {"log/loss": loss.detach()}
        if len(b):
            logs["log/loss_boundary"] = err[b].mean().detach()
        if len(c):
            logs["log/loss_consistency"] = err[c].mean().detach()
        return {"student": loss, **logs}
