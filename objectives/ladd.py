"""LADD (Sauer et al. 2024) and the sCM + LADD hybrid of SANA-Sprint (Chen et al. 2025).

`LADDDiscriminator`: trainable heads (objectives/discriminators.py) on the **frozen teacher's** features
at noised inputs. Only the heads train; the teacher stays frozen and its hooks are removed after every call
(Teacher.features). Transformer token features [B, N, C] go to the heads as they are (FeatureDiscriminator
reads them channels first).

`ladd` (the `LADD` class) is the adversarial distillation alone: the student is trained only by the adversarial
term below, on the frozen teacher's features; `scm_ladd` (`SCMLADD`, a subclass) adds the sCM loss to its generator
step and nothing else. Both sample the student like sCM (`student.sampler = "consistency"`): one jump to the data
x_hat = cos s y - sin s F_theta(y, s), re-noised between steps; `ladd` reads sCM's time options (sigma_d, p_mean,
p_std, time_clamp, sampler grid) for its generation times and refuses the sCM-only ones.

`ladd` and `scm_ladd`, G/D alternation (objectives.base.UpdateSchedule, generator first): cycles of
`critic_per_generator` + 1 steps, the student at the first and the heads at the others; the default 1 is
strict alternation (even steps: student, odd steps: heads):
* G: L = scm_weight L_sCM + adv_weight L_adv (1.0 and 0.5; `ladd`: L = adv_weight L_adv, 1.0), with
  L_adv = -mean D(fake). The adversarial
  sample: with probability `pure_noise_prob` s_G = pi/2 and y = eps (pure noise), otherwise a fresh sCM
  time and fresh noise; x_hat = cos s_G y - sin s_G F_theta(y, s_G) (with gradient).
* D noise: s_D = arctan(e^tau / sigma_d), tau ~ N(d_mean, d_std^2), drawn independently for real and fake;
  the teacher sees the flow-time point with the same SNR: t = sin s_D / (sin s_D + cos s_D),
  x_t = (1 - t) x + t eps' (TrigFlow's cos s_D x + sin s_D z' up to the factor sin + cos, which the
  teacher adapter's flow-time input expects).
* D: hinge, L_D = 1/2 [mean relu(1 - D(real)) + mean relu(1 + D(fake))]. For conditional teachers the
  "misaligned pairs" (real data rolled by one within the batch, kept with the original conditions) join
  the fakes. Optional R1 (`r1_weight`, off by default): the squared change of D under a small
  perturbation of the real input (the finite-difference form of the gradient penalty).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Sequence

import torch
from onestep.objectives.base import (
    GENERATOR,
    RETIRED_SCHEDULE_KEYS,
    Objective,
    OptimDefaults,
    UpdateSchedule,
    check_critic_per_generator,
)
from onestep.objectives.discriminators import FeatureDiscriminator
from onestep.objectives.distribution_matching import call_with_frozen_parameters, module_device_dtype
from onestep.objectives.scm import ConsistencySampled, SCMConfig, SCMLoss, check_scm_config
from torch import nn
from torch.nn import functional as F

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES
from onestep.trigflow import HALF_PI, consistency_x0, sample_trig_time


class LADDDiscriminator(nn.Module):
    """Heads on the frozen teacher's features; forward(x_t, t, cond, frozen_heads) -> logits [B, K]."""

    def __init__(self, teacher, layers: Sequence[str] | None = None, hidden: int = 64):
        super().__init__()
        object.__setattr__(self, "teacher", teacher)   # not a submodule: frozen, never checkpointed here
        self.layers = None if layers is None else list(layers)
        device, dtype = module_device_dtype(teacher)
        x = torch.zeros(2, *teacher.sample_shape, device=device, dtype=dtype)
        with torch.no_grad():
            example = teacher.features(x, torch.full((2,), 0.5, device=device, dtype=dtype), None, self.layers)
        self.heads = FeatureDiscriminator(example, hidden=hidden)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None, frozen_heads: bool = False) -> torch.Tensor:
        feats = self.teacher.features(x_t, t, cond, self.layers)
        if frozen_heads:
            return call_with_frozen_parameters(self.heads, feats, t)
        return self.heads(feats, t)


@dataclass
class LADDOptions:
    """The adversarial options of `ladd` and `scm_ladd`."""
    critic_per_generator: int = 1       # discriminator updates per student update (the student first in each cycle)
    adv_weight: float = 0.5
    pure_noise_prob: float = 0.5        # share of adversarial samples generated from pure noise at s = pi/2
    d_mean: float = -0.6                # discriminator noise: s_D = arctan(e^tau / sigma_d), tau ~ N(d_mean, d_std^2)
    d_std: float = 1.0
    feature_layers: Optional[List[str]] = None   # teacher layers the heads read (None: the teacher's defaults)
    head_hidden: int = 64
    misaligned_pairs: bool = True       # conditional teachers: rolled real data with the original conditions are fakes
    r1_weight: float = 0.0
    r1_noise: float = 0.05
    disc_lr: Optional[float] = None     # None: lr
    disc_betas: List[float] = field(default_factory=lambda: [0.0, 0.99])
    retired_keys: ClassVar[dict] = RETIRED_SCHEDULE_KEYS


@dataclass
class SCMLADDConfig(LADDOptions, SCMConfig):
    scm_weight: float = 1.0


#: SCMConfig options that only the sCM loss reads: `ladd` refuses values other than their defaults
SCM_ONLY_OPTIONS = ("velocity", "guidance", "tangent_warmup", "tangent_norm", "tangent_norm_c", "prior_weight",
                    "learn_logvar", "jvp", "fd_step")


@dataclass
class LADDConfig(LADDOptions, SCMConfig):
    """`ladd`: the adversarial options and sCM's time and sampler options (sigma_d, p_mean, p_std, time_clamp,
    sampler_data_std, sampler_intermediate, lr, betas, weight_decay); no sCM loss, so no log-variance head."""
    adv_weight: float = 1.0             # the only term: its scale matters only through the optimiser
    learn_logvar: bool = False


def check_adversarial_config(name: str, cfg, teacher=...) -> None:
    check_critic_per_generator(cfg)
    if teacher is None:
        raise ConfigError(f"objective {name} needs a teacher: its discriminator reads the teacher's features")
    for key in ("adv_weight", "r1_weight", "r1_noise"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"objective.{key} must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.pure_noise_prob <= 1.0:
        raise ConfigError(f"objective.pure_noise_prob must be in [0, 1], got {cfg.pure_noise_prob}")
    if cfg.d_std <= 0 or cfg.head_hidden < 1:
        raise ConfigError(f"objective.d_std must be > 0 and head_hidden >= 1, got {cfg.d_std}, {cfg.head_hidden}")
    if len(cfg.disc_betas) != 2:
        raise ConfigError(f"objective.disc_betas must be two numbers, got {cfg.disc_betas}")


@OBJECTIVES.register("ladd")
class LADD(ConsistencySampled, Objective):
    """Adversarial distillation on the frozen teacher's features alone (no sCM term); see the module docstring.
    `self.scm` holds sCM's pieces that the adversarial sample uses (the student's TrigFlow field, sCM's times);
    with `learn_logvar` off (`ladd`) it has no parameters."""

    Config = LADDConfig
    needs_interval = True

    def __init__(self, student, teacher, cfg, discriminator: nn.Module | None = None):
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.scm = SCMLoss(self, cfg)
        if discriminator is None:
            try:
                discriminator = LADDDiscriminator(teacher, cfg.feature_layers, cfg.head_hidden)
            except ValueError as e:  # e.g. a layer name the teacher's backbone does not have
                raise ConfigError(f"objective.feature_layers: {e}") from None
        self.discriminator = discriminator

    @staticmethod
    def check_config(cfg, teacher=...) -> None:
        defaults = LADDConfig()
        for key in SCM_ONLY_OPTIONS:
            if getattr(cfg, key) != getattr(defaults, key):
                raise ConfigError(f"objective.{key} is an sCM-loss option and objective ladd has no sCM term (got "
                                  f"{getattr(cfg, key)!r}); use objective scm_ladd for sCM + LADD")
        check_scm_config(cfg, teacher if teacher is not None else ...)   # the time and sampler options
        check_adversarial_config("ladd", cfg, teacher)

    # --- contract ------------------------------------------------------------------------------------
    def param_groups(self):
        return {"student": self.scm.student_parameters(),
                "disc": [p for p in self.discriminator.parameters() if p.requires_grad]}

    def default_optim(self, group):
        cfg = self.cfg
        if group == "disc":
            return OptimDefaults(lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.disc_betas), weight_decay=cfg.weight_decay)
        return OptimDefaults(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    @classmethod
    def update_schedule(cls, cfg):
        return UpdateSchedule(cfg.critic_per_generator, generator_first=True)

    @classmethod
    def critic_groups(cls, cfg):
        return ["disc"]

    def loss(self, batch, step):
        if GENERATOR in self.players(self.cfg, step):
            return self.generator_loss(batch, step)
        return self.discriminator_loss(batch)

    # --- pieces ----------------------------------------------------------------------------------------
    def noise_for_discriminator(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t): x noised at a discriminator time, in flow coordinates."""
        s = sample_trig_time(self.randn(x.shape[0]), self.cfg.d_mean, self.cfg.d_std, self.cfg.sigma_d)
        t = paths.trig_to_flow_t(s).to(x.device, x.dtype)
        eps = self.randn(*x.shape, device=x.device).to(x.dtype)
        return paths.interpolate(x, eps, t), t

    def student_sample(self, x_real: torch.Tensor, cond=None) -> torch.Tensor:
        """x_hat = cos s_G y - sin s_G F_theta(y, s_G): from pure noise (s_G = pi/2) or a noised real sample."""
        cfg, n, dev, dt = self.cfg, x_real.shape[0], x_real.device, x_real.dtype
        s = self.scm.sample_times(n, dev).to(dt)
        pure = (self.rand(n) < cfg.pure_noise_prob).to(dev)
        s = torch.where(pure, torch.full_like(s, HALF_PI), s)
        eps = self.randn(*x_real.shape, device=dev).to(dt)
        cos = paths.expand_like(torch.where(pure, torch.zeros_like(s), torch.cos(s)), x_real)
        y = cos * x_real + paths.expand_like(torch.sin(s), x_real) * eps
        return consistency_x0(y, s, self.scm.student_trig(y, s, cond))

    def adversarial_loss(self, x_real: torch.Tensor, cond=None) -> torch.Tensor:
        """L_adv = -mean D(x_hat): the heads frozen, the gradient reaching x_hat through the frozen teacher."""
        x_hat = self.student_sample(x_real, cond)
        x_t, t = self.noise_for_discriminator(x_hat)
        return -self.discriminator(x_t, t, cond, frozen_heads=True).mean()

    def generator_loss(self, batch, step):
        loss_adv = self.adversarial_loss(batch["x"], batch.get("cond"))
        loss = self.cfg.adv_weight * loss_adv
        return {"student": loss, "log/loss": loss.detach(), "log/loss_adv": loss_adv.detach()}

    def discriminator_loss(self, batch):
        cfg = self.cfg
        x_real, cond = batch["x"], batch.get("cond")
        with torch.no_grad():
            x_fake = self.student_sample(x_real, cond)
        fakes, fake_conds = [x_fake], [cond]
        if cond is not None and cfg.misaligned_pairs and x_real.shape[0] > 1:
            fakes.append(torch.roll(x_real, 1, dims=0))   # real images with the wrong conditions
            fake_conds.append(cond)
        x_real_t, t_real = self.noise_for_discriminator(x_real)
        logit_real = self.discriminator(x_real_t, t_real, cond)
        loss_real = F.relu(1 - logit_real).mean()
        fake_terms = []
        for x_f, c_f in zip(fakes, fake_conds):
            x_f_t, t_f = self.noise_for_discriminator(x_f)
            fake_terms.append(F.relu(1 + self.discriminator(x_f_t, t_f, c_f)).mean())
        loss = 0.5 * (loss_real + torch.stack(fake_terms).mean())
        out = {"log/d_real": logit_real.detach().mean()}
        if cfg.r1_weight > 0:
            delta = self.randn(*x_real.shape, device=x_real.device).to(x_real.dtype)
            logit_near = self.discriminator(x_real_t + cfg.r1_noise * delta, t_real, cond)
            loss_r1 = (logit_near - logit_real).pow(2).mean() / cfg.r1_noise ** 2
            loss = loss + cfg.r1_weight * loss_r1
            out["log/loss_r1"] = loss_r1.detach()
        return {"disc": loss, "log/loss_disc": loss.detach(), "log/loss": loss.detach(), **out}


@OBJECTIVES.register("scm_ladd")
class SCMLADD(LADD):
    """sCM + LADD (SANA-Sprint): `ladd` with the sCM loss added to the generator step."""

    Config = SCMLADDConfig

    @staticmethod
    def check_config(cfg, teacher=...) -> None:
        check_scm_config(cfg, teacher)
        check_adversarial_config("scm_ladd", cfg, teacher)
        if cfg.scm_weight < 0:
            raise ConfigError(f"objective.scm_weight must be >= 0, got {cfg.scm_weight}")

    def generator_loss(self, batch, step):
        cfg = self.cfg
        x_real, cond = batch["x"], batch.get("cond")
        loss_scm, logs = self.scm(batch, step)
        loss = cfg.scm_weight * loss_scm
        if cfg.adv_weight > 0:
            loss_adv = self.adversarial_loss(x_real, cond)
            loss = loss + cfg.adv_weight * loss_adv
            logs["log/loss_adv"] = loss_adv.detach()
        return {"student": loss, "log/loss": loss.detach(), **logs}
