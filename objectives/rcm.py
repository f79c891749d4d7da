"""rCM: score-regularised continuous-time consistency (Zheng et al. 2025, NVlabs' rCM): sCM plus a DMD term.

sCM (objectives/scm.py) minimises a forward, mode-covering divergence through the consistency condition; DMD
(reverse KL, objectives/fdistill.py with h = 1) is mode-seeking and supervises the one-step jump from pure noise
directly. rCM adds the second to the first as a regulariser ("long skip"). Composed, not copied: the sCM loss is
`SCMLoss` and the DMD pieces are `distribution_matching.DMDLoss`, the same objects `scm` and `fdistill` run.

    generator (student and its log-variance head):
        L_G = scm_weight L_sCM(batch, step) + dmd_weight L_DMD
        L_DMD: x = G(z) = z - u(z, 0, 1) (the consistency sampler's 1-step sample, with gradient),
               t ~ time_range, x_t = (1 - t) x + t eps,
               g = (D_phi(x_t) - D_T(x_t)) w,  w = 1 / (mean_dims |x - D_T| + 1e-6)  (`dmd_normalizer`; no gradient)
               L_DMD = 1/2 mean ||x - sg[x - g]||^2       (gradient g / numel with respect to x)
    critic (`fake_score`, a trainable copy of the teacher's backbone):
        flow-matching velocity loss on sg[G(z')] at t ~ critic_time_range (f-distill's fake-score step)

D_T is the teacher's x0-prediction with its CFG scale `guidance` (the same scale sCD's dy/ds uses); D_phi the fake
score's. A term whose weight is 0 is not computed and draws nothing, so `dmd_weight: 0` is the `scm` objective's
generator step exactly and `scm_weight: 0` f-distill's reverse-KL (DMD) generator step exactly, for the same
generator state (tests/objectives/test_rcm.py).

Schedule (objectives.base.UpdateSchedule, alternating, **critic first**): cycles of `critic_per_generator` + 1 steps,
the fake score alone at the first N and the student alone at the last. Critic first as f-distill: the fake score
starts as an exact copy of the teacher, so D_phi = D_T and the DMD direction is zero until the fake score has seen
student samples; a generator step first would spend its DMD half on nothing. The sCM term does not need the critic,
so the ratio trades DMD's accuracy (a fake score that tracks the student) against student updates per step.

The student is sampled like sCM's (`student.sampler = "consistency"`, the grid from `sampler_data_std` and
`sampler_intermediate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from onestep.objectives.base import (
    GENERATOR,
    RETIRED_SCHEDULE_KEYS,
    Objective,
    OptimDefaults,
    UpdateSchedule,
    check_critic_per_generator,
)
from onestep.objectives.distribution_matching import (
    DMDLoss,
    karras_sigmas,
    sample_noise_levels,
    trainable_copy_of_backbone,
)
from onestep.objectives.fdistill import check_time_options
from onestep.objectives.scm import ConsistencySampled, SCMConfig, SCMLoss, check_scm_config

from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES


@dataclass
class RCMConfig(SCMConfig):
    critic_per_generator: int = 1        # fake-score updates per student update (the fake score first in each cycle)
    scm_weight: float = 1.0
    dmd_weight: float = 0.1              # the DMD regulariser's weight (our default, not tuned on digits)
    time_sampler: str = "uniform"        # DMD noise levels: "uniform" flow time or "karras" (as f-distill)
    time_range: List[float] = field(default_factory=lambda: [0.02, 0.98])       # generator's DMD term
    critic_time_range: List[float] = field(default_factory=lambda: [0.0, 1.0])  # fake score
    sigma_min: float = 0.002             # karras grid
    sigma_max: float = 80.0
    rho: float = 7.0
    levels: int = 1000
    dmd_normalizer: bool = True          # w = 1 / (mean_dims |x - D_T| + 1e-6)
    fake_score_lr: Optional[float] = None  # None: lr
    fake_score_betas: Optional[List[float]] = None  # None: betas
    retired_keys: ClassVar[dict] = RETIRED_SCHEDULE_KEYS


@OBJECTIVES.register("rcm")
class RCM(ConsistencySampled, Objective):
    Config = RCMConfig
    needs_interval = True          # u(., 0, t): the sCM jumps and the one-step generator u(z, 0, 1)

    def __init__(self, student, teacher, cfg: RCMConfig, fake_score=None):
        """`fake_score`: a velocity network net(x, r, t, cond) used at r = t (default: a trainable copy of the
        teacher's backbone, as f-distill's)."""
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.scm = SCMLoss(self, cfg)
        self.fake_score = fake_score if fake_score is not None else trainable_copy_of_backbone(teacher, student)
        self.dmd = DMDLoss(self)
        self.register_buffer("sigma_grid", karras_sigmas(cfg.levels, cfg.sigma_min, cfg.sigma_max, cfg.rho),
                             persistent=False)

    @staticmethod
    def check_config(cfg: RCMConfig, teacher=...) -> None:
        if teacher is None:
            raise ConfigError("objective rcm distils a teacher (its DMD term reads the teacher's score): "
                              "set teacher.name")
        check_scm_config(cfg, teacher)
        check_critic_per_generator(cfg)
        check_time_options(cfg, ("time_range", "critic_time_range"))
        for name in ("scm_weight", "dmd_weight"):
            v = getattr(cfg, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"objective.{name} must be a finite number >= 0, got {v}")
        if cfg.scm_weight == 0 and cfg.dmd_weight == 0:
            raise ConfigError("objective.scm_weight and dmd_weight are both 0: the student would not train")
        v = cfg.fake_score_lr
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"objective.fake_score_lr must be a finite number > 0 (or null: lr), got {v}")
        if cfg.fake_score_betas is not None and len(cfg.fake_score_betas) != 2:
            raise ConfigError(f"objective.fake_score_betas must be two numbers (or null: betas), got "
                              f"{cfg.fake_score_betas}")

    # --- contract ----------------------------------------------------------------------------------
    def param_groups(self):
        return {"student": self.scm.student_parameters(),
                "fake_score": [p for p in self.fake_score.parameters() if p.requires_grad]}

    def default_optim(self, group):
        cfg = self.cfg
        if group == "fake_score":
            return OptimDefaults(lr=cfg.fake_score_lr or cfg.lr, betas=tuple(cfg.fake_score_betas or cfg.betas),
                                 weight_decay=cfg.weight_decay)
        return OptimDefaults(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    @classmethod
    def update_schedule(cls, cfg):
        return UpdateSchedule(cfg.critic_per_generator)   # alternating, the fake score first (module docstring)

    @classmethod
    def critic_groups(cls, cfg):
        return ["fake_score"]

    def loss(self, batch, step):
        if GENERATOR in self.players(self.cfg, step):
            return self.generator_loss(batch, step)
        return self.critic_loss(batch)

    # --- pieces --------------------------------------------------------------------------------------
    def sample_times(self, n: int, span, device=None):
        """DMD's noise levels (t, coordinate), as f-distill's: what `DMDLoss` draws from."""
        return sample_noise_levels(self, n, self.cfg.time_sampler, span, self.sigma_grid, device)

    def generator_loss(self, batch, step):
        cfg = self.cfg
        x_real, cond = batch["x"], batch.get("cond")
        terms, logs = [], {}
        if cfg.scm_weight > 0:
            loss_scm, logs = self.scm(batch, step)
            terms.append(cfg.scm_weight * loss_scm)
        if cfg.dmd_weight > 0:
            loss_dmd, _ = self.dmd.generator_loss(x_real, cond, cfg.time_range)
            terms.append(cfg.dmd_weight * loss_dmd)
            logs["log/loss_dmd"] = loss_dmd.detach()
        loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return {"student": loss, "log/loss": loss.detach(), **logs}

    def critic_loss(self, batch):
        loss, _, _ = self.dmd.fake_score_loss(batch["x"], batch.get("cond"), self.cfg.critic_time_range)
        return {"fake_score": loss, "log/loss_fake_score": loss.detach(), "log/loss": loss.detach()}
