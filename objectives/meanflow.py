"""MeanFlow (Geng et al. 2025): regress the average velocity through the MeanFlow identity.

The average velocity u(z_t, r, t) = 1/(t - r) * int_r^t v(z_s, s) ds satisfies
    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + 0 . d_r u + 1 . d_t u,
so d/dt u is one Jacobian-vector product with tangent (v, 0, 1) on the inputs (z, r, t). The loss is
    u_tgt = sg[ v_g - clip(t - r, 0, 1) * dudt ]
    delta = sum over all dims (u - u_tgt)^2          (per sample)
    loss  = mean( delta / sg[(delta + c)^p] )         (adaptive weight)
v_g is the teacher's velocity (distillation, with the teacher's CFG) or eps - x (training from data).
With conditions and `cfg_omega`, MeanFlow's own CFG mixes the student's conditional and null velocities
into v_g; v_g is both the regression term and the JVP tangent. Conditions are class labels
(null: label -1) or prompt conditions of text teachers (null: the teacher's, the empty prompt).

Three ways to get dudt, `jvp`:
    "single": (u, dudt) = torch.func.jvp(...) in one call; the gradient reaches the parameters through u;
    "split":  u from a normal forward (may run under autocast), then dudt from a JVP under no_grad with
              the same RNG state (dropout masks match); about one more forward, less activation memory.
    "finite_difference": du/dt ~ [u(z + h v, r, t + h) - u(z - h v, r, t - h)] / 2h (two no-grad passes,
              no forward-mode AD). Not the exact derivative: it averages over +-h, which is what a
              network with time embeddings of 1000 t (whose exact du/dt oscillates below one
              timestep) may need; measured on digits in the README.
The JVP runs in fp32 (autocast off). Networks with attention need an attention that supports forward
AD: `onestep.kernels.set_attention_backend(model, "fused")` (or "math").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from onestep.objectives.base import Objective, OptimDefaults, anchor_tensor, autocast_off, frozen_eval, sample_intervals
from onestep.teachers.base import NULL_LABEL, Teacher

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES

JVP_MODES = ("single", "split", "finite_difference")


@dataclass
class MeanFlowConfig:
    velocity: str = "teacher"        # v_g: "teacher" (distillation) or "data" (eps - x, from scratch)
    guidance: Optional[float] = None  # the teacher's CFG scale (velocity=teacher)
    interval_ratio: float = 0.25     # share of samples with r != t (the rest are flow matching)
    time_sampler: str = "logit_normal"  # "logit_normal" or "uniform"
    mu: float = -0.4                 # logit-normal of t (and of r unless r_mu is set)
    sigma: float = 1.0
    r_mu: Optional[float] = None     # optional separate logit-normal for r: r = min(t, LN(r_mu, r_sigma))
    r_sigma: Optional[float] = None
    anchor_share: float = 0.0        # share of r != t samples put on `anchor_intervals`
    anchor_intervals: List[List[float]] = field(default_factory=lambda: [[0.0, 1.0]])
    adaptive_p: float = 1.0          # adaptive weight 1 / sg[(delta + c)^p]; p = 0 is the plain squared error
    adaptive_c: float = 1e-3
    jvp: str = "single"              # "single", "split" or "finite_difference", see the module docstring
    fd_step: float = 1e-2            # h of jvp=finite_difference
    cfg_omega: Optional[float] = None  # MeanFlow's own CFG (conditional students, velocity=data): omega
    cfg_kappa: float = 0.0           # ... and kappa; effective guidance omega / (1 - kappa)
    cfg_interval: List[float] = field(default_factory=lambda: [0.0, 1.0])  # t range where CFG mixing applies
    class_dropout: float = 0.1       # share of conditions replaced by the null condition when cfg_omega is set
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@OBJECTIVES.register("meanflow")
class MeanFlow(Objective):
    Config = MeanFlowConfig
    needs_interval = True
    #: tangents of (r, t) in the JVP: (0, 1) is the MeanFlow identity; tests swap in wrong ones on purpose
    time_tangents: tuple[float, float] = (0.0, 1.0)

    def __init__(self, student, teacher, cfg: MeanFlowConfig):
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.register_buffer("anchors", anchor_tensor(cfg), persistent=False)

    @staticmethod
    def check_config(cfg: MeanFlowConfig, teacher=...) -> None:
        if cfg.velocity not in ("teacher", "data"):
            raise ConfigError(f"objective.velocity must be 'teacher' or 'data', got {cfg.velocity!r}")
        if cfg.velocity == "teacher" and teacher is None:
            raise ConfigError("objective.velocity=teacher needs a teacher (teacher.name)")
        if cfg.jvp not in JVP_MODES:
            raise ConfigError(f"objective.jvp must be one of {', '.join(JVP_MODES)}, got {cfg.jvp!r}")
        if not 0 < cfg.fd_step < 0.5:
            raise ConfigError(f"objective.fd_step must be in (0, 0.5), got {cfg.fd_step}")
        if cfg.time_sampler not in ("logit_normal", "uniform"):
            raise ConfigError(f"objective.time_sampler must be 'logit_normal' or 'uniform', got {cfg.time_sampler!r}")
        for name in ("interval_ratio", "class_dropout"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ConfigError(f"objective.{name} must be in [0, 1], got {getattr(cfg, name)}")
        if cfg.adaptive_p < 0 or cfg.adaptive_c <= 0:
            raise ConfigError(f"objective.adaptive_p must be >= 0 and adaptive_c > 0, "
                              f"got {cfg.adaptive_p}, {cfg.adaptive_c}")
        anchor_tensor(cfg)
        lo_hi = cfg.cfg_interval
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"objective.cfg_interval must be [t_lo, t_hi] in [0, 1], got {lo_hi}")
        if cfg.cfg_omega is not None and cfg.velocity != "data":
            raise ConfigError("objective.cfg_omega (MeanFlow's own CFG) is for velocity=data; "
                              "to distill a guided teacher set objective.guidance")
        if len(cfg.betas) != 2:
            raise ConfigError(f"objective.betas must be two numbers, got {cfg.betas}")

    def default_optim(self, group):
        return OptimDefaults(lr=self.cfg.lr, betas=tuple(self.cfg.betas))

    def sample_times(self, n: int, device=None):
        """(r, t, is_equal) per sample; r = t with probability 1 - interval_ratio."""
        cfg = self.cfg
        r, t, is_equal = sample_intervals(
            self, n, sampler=cfg.time_sampler, mu=cfg.mu, sigma=cfg.sigma, p_equal=1.0 - cfg.interval_ratio,
            anchors=self.anchors, anchor_share=cfg.anchor_share, r_mu=cfg.r_mu, r_sigma=cfg.r_sigma)
        return r.to(device), t.to(device), is_equal.to(device)

    # --- v_g ---------------------------------------------------------------------------------
    def null_condition_like(self, cond):
        """The null condition for the batch of conditions `cond`: label -1 for class labels; for prompt
        conditions the teacher's (the student's adapter's without one), which encoded the prompts."""
        if isinstance(cond, torch.Tensor):
            return torch.full_like(cond, NULL_LABEL)
        source = self.teacher if self.teacher is not None else self.student.adapter
        embeds = cond.prompt_embeds
        return source.null_condition(len(cond), embeds.device).to(dtype=embeds.dtype)

    def drop_labels(self, cond):
        """MeanFlow's CFG training: replace a share `class_dropout` of the conditions (class labels or
        prompt conditions) by the null condition. Returns (conditions, dropped [B] bool)."""
        if cond is None or self.cfg.cfg_omega is None:
            return cond, None
        null = self.null_condition_like(cond)
        dropped = self.rand(len(cond)) < self.cfg.class_dropout
        if isinstance(cond, torch.Tensor):
            dropped = dropped.to(cond.device)
            return torch.where(dropped, null, cond), dropped
        dropped = dropped.to(cond.prompt_embeds.device)
        return cond.select(~dropped, null), dropped

    def guided_velocity(self, v, z_t, t, cond, dropped):
        """v_g = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) inside the CFG
        interval, for samples whose condition was kept; v elsewhere. The student's terms have no gradient."""
        cfg = self.cfg
        if cond is None or cfg.cfg_omega is None:
            return v
        lo, hi = cfg.cfg_interval
        mix = ~dropped & (t >= lo) & (t <= hi)  # not skipped when empty: sharded processes call networks in lockstep
        with frozen_eval(self.student):
            null = self.null_condition_like(cond)
            both = self.student(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([t, t]),
                                Teacher.cat_conditions([cond, null]))
            u_cond, u_null = both.to(v.dtype).chunk(2)
        omega, kappa = cfg.cfg_omega, cfg.cfg_kappa
        guided = omega * v + kappa * u_cond + (1 - omega - kappa) * u_null
        return torch.where(mix.view(-1, *[1] * (v.dim() - 1)), guided, v)

    def velocity_target(self, x, eps, z_t, t, cond):
        if self.cfg.velocity == "data":
            return eps - x
        with frozen_eval(self.teacher):
            return self.teacher.velocity(z_t, t, cond, self.cfg.guidance).to(z_t.dtype)

    # --- the JVP -------------------------------------------------------------------------------
    def average_velocity_and_time_derivative(self, z_t, r, t, v, cond):
        """(u, du/dt) with du/dt = JVP of u(z, r, t) along (v, 0, 1); gradients flow through u only."""
        fn = lambda z, r_, t_: self.student(z, r_, t_, cond)  # noqa: E731
        dr, dt = self.time_tangents
        tangents = (v, torch.full_like(r, dr), torch.full_like(t, dt))
        no_autocast = autocast_off(z_t.device)
        if self.cfg.jvp == "finite_difference":
            u = fn(z_t, r, t)
            h = self.cfg.fd_step
            with frozen_eval(self.student):
                step = lambda sign: fn(z_t + sign * h * v, r + sign * h * dr, t + sign * h * dt)  # noqa: E731
                dudt = (step(1.0).to(v.dtype) - step(-1.0).to(v.dtype)) / (2 * h)
            return u, dudt
        if self.cfg.jvp == "single":
            with no_autocast:
                u, dudt = torch.func.jvp(fn, (z_t, r, t), tangents)
            return u, dudt.detach()
        devices = [z_t.device] if z_t.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the JVP below replays these RNG draws (dropout)
            u = fn(z_t, r, t)
        with torch.no_grad(), no_autocast:
            _, dudt = torch.func.jvp(fn, (z_t, r, t), tangents)
        return u, dudt

    def loss(self, batch, step):
        x, cond = batch["x"], batch.get("cond")
        n, acc = x.shape[0], torch.promote_types(x.dtype, torch.float32)
        r, t, is_equal = self.sample_times(n, x.device)
        r, t = r.to(x.dtype), t.to(x.dtype)
        eps = self.randn(*x.shape, device=x.device).to(x.dtype)
        z_t = paths.interpolate(x, eps, t)
        cond, dropped = self.drop_labels(cond)

        with torch.no_grad():
            v = self.velocity_target(x, eps, z_t, t, cond)
            v_g = self.guided_velocity(v, z_t, t, cond, dropped).to(z_t.dtype)
        u, dudt = self.average_velocity_and_time_derivative(z_t, r, t, v_g, cond)
        with torch.no_grad():
            u_tgt = v_g.to(acc) - paths.expand_like((t - r).clamp(0, 1), u).to(acc) * dudt.to(acc)
        delta = (u.to(acc) - u_tgt).pow(2).flatten(1).sum(1)           # per-sample sum over dimensions
        weight = (delta.detach() + self.cfg.adaptive_c).pow(self.cfg.adaptive_p)
        loss = (delta / weight).mean()
        logs = {"log/loss": loss.detach(), "log/mse": delta.detach().mean() / x[0].numel()}
        if (~is_equal).any():
            logs["log/mse_interval"] = delta.detach()[~is_equal].mean() / x[0].numel()
        return {"student": loss, **logs}

