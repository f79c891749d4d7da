"""f-distill (Xu, Nie, Vahdat 2025): one-step distillation by f-divergence distribution matching.

A one-step generator x = G(z) (the student at (r, t) = (0, 1)) is trained so that its noised
marginal q_t matches the teacher's p_t in D_f(p_t || q_t) = E_q[f(p_t / q_t)]. Its gradient is

    grad D_f = -E[ h(r_t(x_t)) (grad log p_t(x_t) - grad log q_t(x_t))^T dG/dtheta ],   h(r) = r^2 f''(r),

so every divergence is DMD's (reverse KL, h = 1) direction reweighted per sample by h of the density
ratio r_t = p_t / q_t. In x0 space (no time convention needed, see distribution_matching.py):

    x = G(z); t ~ p(t); x_t = (1 - t) x + t eps
    D_T  = teacher x0(x_t)                      (frozen, with the teacher's CFG)
    D_phi = fake-score x0(x_t)                  (frozen in this phase)
    l    = discriminator logits at x_t, [B, K]  (heads on the frozen teacher's features)
    r    = clip(exp(clamp(mean_K l, -10, 10)), 0.1, 20);  r = r / bin_mean(r)   (per noise-level bin)
    h    = h(r); h = h / mean_global_batch(h)   (all processes' samples: all-reduced)
    w    = 1 / (mean_dims |x - D_T| + 1e-6)     (DMD's per-sample normaliser)
    g    = (D_phi - D_T) w h                     (prop. to -h (s_p - s_q); no gradient)
    L_G  = 1/2 mean ||x - sg[x - g]||^2 + gan_weight * mean softplus(-l)

The GAN term is the non-saturating generator loss; its gradient reaches x through the frozen heads and
the frozen teacher's features. Critic phase (the other `critic_per_generator` steps of every cycle):

    fake score:    flow-matching velocity loss on sg[G(z)] (the teacher's own training loss: the x0
                   denoising loss ||D_phi - x||^2 weighted by 1/t^2; the same minimiser)
    discriminator: mean softplus(l(fake x_t)) + mean softplus(-l(real x_t')), real data noised with
                   independent (t', eps'); at the optimum l = log p_t / q_t. Optional approximate R1:
                   r1_weight * mean (l(x_t' + r1_noise delta) - l(x_t'))^2.

Schedule (objectives.base.UpdateSchedule, alternating): `critic_per_generator` = N critic updates (fake score
and discriminator together), then one generator update alone, so a cycle of N + 1 steps (the reference: 4;
SD1.5: 9, the generator every 10th step as DMD2's). The fake score starts as an exact copy of the teacher's
backbone, so critic steps come first in every cycle. With reverse KL and no GAN term there is no discriminator.

Bin statistics (an EMA per bin, `ratio_bin_ema`; 0 = this batch only) are buffers, so checkpoints
carry them; they and the mean of h are reduced over all processes (distribution_matching.global_sum).
With a small global batch, few samples share a bin and r / bin_mean(r) flattens the ratio (a sample
alone in its bin gets r = 1): use fewer bins or a bin EMA there.

Cost: the generator step runs the teacher twice at x_t (D_T without graph, features with a graph for
the GAN term); a teacher `features` that also returned its velocity would save one pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, List, Optional

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
from onestep.objectives.distribution_matching import (
    DMDLoss,
    call_with_frozen_parameters,
    global_mean,
    global_sum,
    karras_sigmas,
    module_device_dtype,
    pseudo_target_loss,
    sample_noise_levels,
    trainable_copy_of_backbone,
)
from torch.nn import functional as F

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES


@dataclass(frozen=True)
class Divergence:
    """f (up to affine terms, which change no gradient) and its weight h(r) = r^2 f''(r)."""
    f: Callable[[torch.Tensor], torch.Tensor]
    h: Callable[[torch.Tensor], torch.Tensor]
    behaviour: str = ""


#: the paper's divergences and their f; tests check h = r^2 f'' for each (sympy and finite differences)
DIVERGENCES: dict[str, Divergence] = {
    "reverse_kl": Divergence(lambda r: -torch.log(r), lambda r: torch.ones_like(r), "mode-seeking (= DMD / VSD)"),
    "softened_reverse_kl": Divergence(lambda r: (r + 1) * torch.log((r + 1) / (2 * r)), lambda r: 1 / (1 + r)),
    "js": Divergence(lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2), lambda r: r / (1 + r),
                     "bounded weights; best on ImageNet-64 / COCO"),
    "squared_hellinger": Divergence(lambda r: (torch.sqrt(r) - 1) ** 2, lambda r: torch.sqrt(r) / 2),
    "forward_kl": Divergence(lambda r: r * torch.log(r), lambda r: r, "mode-covering, high variance"),
    "jeffreys": Divergence(lambda r: (r - 1) * torch.log(r), lambda r: 1 + r),
    "neyman_chi2": Divergence(lambda r: (1 - r) ** 2 / r, lambda r: 2 / r),
}

TIME_SAMPLERS = ("uniform", "karras")


@dataclass
class FDistillConfig:
    divergence: str = "js"               # one of DIVERGENCES
    guidance: Optional[float] = None     # the teacher's CFG scale for D_T
    critic_per_generator: int = 4        # critic updates (fake score + discriminator) per generator update, which
                                         # steps alone: a cycle of N + 1 steps (UpdateSchedule)
    time_sampler: str = "uniform"        # "uniform" flow time or "karras" (EDM sigma grid), see distribution_matching
    # generator phase (grid share for karras)
    time_range: List[float] = field(default_factory=lambda: [0.02, 0.98])
    critic_time_range: List[float] = field(default_factory=lambda: [0.0, 1.0])  # fake score and discriminator
    sigma_min: float = 0.002             # karras grid
    sigma_max: float = 80.0
    rho: float = 7.0
    levels: int = 1000
    gan_weight: float = 1e-3             # non-saturating GAN term in the generator loss
    logit_clamp: float = 10.0            # |mean_K logits| clamp before exp
    ratio_clip: List[float] = field(default_factory=lambda: [0.1, 20.0])
    ratio_bins: int = 10                 # noise-level bins for r / bin_mean(r); 0: no bin normalisation
    ratio_bin_ema: float = 0.0           # EMA rate of the bin means (0: this batch's means)
    normalize_h: bool = True             # h / mean_global_batch(h)
    dmd_normalizer: bool = True          # w = 1 / (mean_dims |x - D_T| + 1e-6)
    r1_weight: float = 0.0               # approximate R1 (reference: 100-1000 when on)
    r1_noise: float = 0.1
    feature_layers: Optional[List[str]] = None  # teacher feature layers (None: the teacher's defaults)
    head_hidden: int = 64                # discriminator head width
    lr: float = 1e-4                     # generator
    fake_score_lr: Optional[float] = None  # None: lr
    disc_lr: Optional[float] = None        # None: lr
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    retired_keys: ClassVar[dict] = RETIRED_SCHEDULE_KEYS


def uses_discriminator(cfg: FDistillConfig) -> bool:
    """Whether this config trains a discriminator: every divergence but reverse KL reads its ratio, and GAN / R1
    terms need it."""
    return cfg.divergence != "reverse_kl" or cfg.gan_weight > 0 or cfg.r1_weight > 0


def _check_span(name: str, span) -> None:
    if len(span) != 2 or not 0.0 <= span[0] <= span[1] <= 1.0:
        raise ConfigError(f"objective.{name} must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(span)}")


def check_time_options(cfg, spans: tuple[str, ...]) -> None:
    """The noise-level options shared with SMT."""
    if cfg.time_sampler not in TIME_SAMPLERS:
        raise ConfigError(f"objective.time_sampler must be one of {', '.join(TIME_SAMPLERS)}, got {cfg.time_sampler!r}")
    for name in spans:
        _check_span(name, getattr(cfg, name))
    if not 0 < cfg.sigma_min < cfg.sigma_max or cfg.rho <= 0 or cfg.levels < 2:
        raise ConfigError("objective karras grid needs 0 < sigma_min < sigma_max, rho > 0, levels >= 2, got "
                          f"{cfg.sigma_min}, {cfg.sigma_max}, {cfg.rho}, {cfg.levels}")


@OBJECTIVES.register("fdistill")
class FDistill(Objective):
    Config = FDistillConfig
    needs_interval = True  # the generator is u(z, 0, 1)

    def __init__(self, student, teacher, cfg: FDistillConfig, fake_score=None, discriminator=None):
        """`fake_score`: a velocity network net(x, r, t, cond) used at r = t (default: a trainable copy of
        the teacher's backbone). `discriminator`: heads called as disc(features, t) -> [B, K] (default:
        FeatureDiscriminator on the teacher's `features`)."""
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.divergence = DIVERGENCES[cfg.divergence]
        self.fake_score = fake_score if fake_score is not None else trainable_copy_of_backbone(teacher, student)
        self.dmd = DMDLoss(self)   # D_T, D_phi, the direction g and the fake-score loss (shared with rCM)
        self.uses_discriminator = uses_discriminator(cfg)
        if self.uses_discriminator and discriminator is None:
            try:
                example = self._example_features()
            except ValueError as e:  # e.g. a layer name the teacher's backbone does not have
                raise ConfigError(f"objective.feature_layers: {e}") from None
            discriminator = FeatureDiscriminator(example, hidden=cfg.head_hidden)
        self.discriminator = discriminator if self.uses_discriminator else None
        grid = karras_sigmas(cfg.levels, cfg.sigma_min, cfg.sigma_max, cfg.rho)
        self.register_buffer("sigma_grid", grid, persistent=False)
        bins = max(cfg.ratio_bins, 1)
        # per-bin mean of r (EMA) and whether the bin has been seen; checkpointed with the run
        self.register_buffer("bin_mean", torch.ones(bins, dtype=torch.float64))
        self.register_buffer("bin_seen", torch.zeros(bins, dtype=torch.float64))

    @classmethod
    def reads_data(cls, cfg: FDistillConfig) -> bool:
        # without a discriminator (reverse KL, no GAN or R1 term) the loss draws its noise like x and never reads x
        return not (cfg.divergence == "reverse_kl" and cfg.gan_weight == 0 and cfg.r1_weight == 0)

    @staticmethod
    def check_config(cfg: FDistillConfig, teacher=...) -> None:
        if teacher is None:
            raise ConfigError("objective fdistill distils a teacher: set teacher.name")
        if cfg.divergence not in DIVERGENCES:
            raise ConfigError(f"objective.divergence must be one of {', '.join(DIVERGENCES)}, got {cfg.divergence!r}")
        check_critic_per_generator(cfg)
        check_time_options(cfg, ("time_range", "critic_time_range"))
        lo, hi = cfg.ratio_clip if len(cfg.ratio_clip) == 2 else (None, None)
        if lo is None or not 0 < lo <= 1 <= hi:
            raise ConfigError(f"objective.ratio_clip must be [lo, hi] with 0 < lo <= 1 <= hi, "
                              f"got {list(cfg.ratio_clip)}")
        if cfg.logit_clamp <= 0 or cfg.ratio_bins < 0 or not 0 <= cfg.ratio_bin_ema < 1:
            raise ConfigError("objective.logit_clamp must be > 0, ratio_bins >= 0 and ratio_bin_ema in [0, 1), got "
                              f"{cfg.logit_clamp}, {cfg.ratio_bins}, {cfg.ratio_bin_ema}")
        for name in ("gan_weight", "r1_weight", "r1_noise"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"objective.{name} must be >= 0, got {getattr(cfg, name)}")
        if cfg.head_hidden < 1:
            raise ConfigError(f"objective.head_hidden must be >= 1, got {cfg.head_hidden}")
        for name in ("fake_score_lr", "disc_lr"):
            v = getattr(cfg, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"objective.{name} must be a finite number > 0 (or null: lr), got {v}")

    # --- contract ----------------------------------------------------------------------------------
    def param_groups(self):
        groups = {"student": [p for p in self.student.parameters() if p.requires_grad],
                  "fake_score": [p for p in self.fake_score.parameters() if p.requires_grad]}
        if self.discriminator is not None:
            groups["disc"] = [p for p in self.discriminator.parameters() if p.requires_grad]
        return groups

    def default_optim(self, group):
        cfg = self.cfg
        lr = {"student": cfg.lr, "fake_score": cfg.fake_score_lr or cfg.lr, "disc": cfg.disc_lr or cfg.lr}[group]
        return OptimDefaults(lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    @classmethod
    def update_schedule(cls, cfg):
        return UpdateSchedule(cfg.critic_per_generator)   # alternating, critic steps first

    @classmethod
    def critic_groups(cls, cfg):
        return ["fake_score", "disc"] if uses_discriminator(cfg) else ["fake_score"]

    def is_generator_step(self, step: int) -> bool:
        return GENERATOR in self.players(self.cfg, step)

    def loss(self, batch, step):
        if self.is_generator_step(step):
            return self.generator_loss(batch)
        return self.critic_loss(batch)

    # --- pieces --------------------------------------------------------------------------------------
    def sample_times(self, n: int, span, device=None):
        return sample_noise_levels(self, n, self.cfg.time_sampler, span, self.sigma_grid, device)

    def _example_features(self):
        device, dtype = module_device_dtype(self.teacher)
        x = torch.zeros(2, *self.teacher.sample_shape, device=device, dtype=dtype)
        with torch.no_grad():
            return self.teacher.features(x, torch.full((2,), 0.5, device=device, dtype=dtype), None,
                                         self.cfg.feature_layers)

    def discriminator_logits(self, x_t, t, cond=None, frozen: bool = False) -> torch.Tensor:
        """[B, K] logits of the heads on the teacher's features at x_t. `frozen`: the heads' parameters
        get no gradient (generator phase); the gradient still reaches x_t through the frozen teacher."""
        feats = self.teacher.features(x_t, t, cond, self.cfg.feature_layers)
        if frozen:
            return call_with_frozen_parameters(self.discriminator, feats, t)
        return self.discriminator(feats, t)

    def fake_x0(self, x_t, t, cond=None):
        return self.dmd.fake_x0(x_t, t, cond)

    def teacher_x0(self, x_t, t, cond=None):
        return self.dmd.teacher_x0(x_t, t, cond)

    @torch.no_grad()
    def bin_normalise(self, r: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        """r / bin_mean(r), bins = equal parts of the noise-level coordinate; global counts and sums."""
        bins = self.cfg.ratio_bins
        index = (coord * bins).floor().long().clamp(0, bins - 1)
        sums = torch.zeros(bins, dtype=torch.float64, device=r.device).index_add_(0, index, r.double())
        counts = torch.zeros(bins, dtype=torch.float64, device=r.device).index_add_(
            0, index, torch.ones_like(r, dtype=torch.float64))
        sums, counts = global_sum(self, sums, counts)
        present = counts > 0
        current = sums / counts.clamp(min=1)
        rate = self.cfg.ratio_bin_ema
        seen = self.bin_seen > 0
        blended = torch.where(seen, rate * self.bin_mean + (1 - rate) * current, current)
        self.bin_mean.copy_(torch.where(present, blended, self.bin_mean))
        self.bin_seen.copy_(torch.where(present, torch.ones_like(self.bin_seen), self.bin_seen))
        return r / self.bin_mean[index].to(r.dtype)

    @torch.no_grad()
    def ratio_weights(self, logits: torch.Tensor, coord: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, r) per sample from the discriminator logits [B, K], in fp32 (float64 stays float64)."""
        cfg = self.cfg
        acc = torch.promote_types(logits.dtype, torch.float32)
        log_r = logits.to(acc).mean(1).clamp(-cfg.logit_clamp, cfg.logit_clamp)
        r = log_r.exp().clamp(cfg.ratio_clip[0], cfg.ratio_clip[1])
        if cfg.ratio_bins > 0:
            r = self.bin_normalise(r, coord.to(r.device))
        h = self.divergence.h(r)
        if cfg.normalize_h:
            h = h / global_mean(self, h)
        return h, r

    # --- the two phases ------------------------------------------------------------------------------
    def generator_loss(self, batch):
        cfg = self.cfg
        x_real, cond = batch["x"], batch.get("cond")
        n, dev, dt = x_real.shape[0], x_real.device, x_real.dtype
        acc = torch.promote_types(dt, torch.float32)
        x, x_t, t, coord = self.dmd.generator_sample(x_real, cond, cfg.time_range)
        # targets in fp32 (autocast is off in frozen_eval; under mixed precision x_t may be bf16/fp16)
        x_target = x_t.detach().to(acc)
        d_teacher = self.teacher_x0(x_target, t.to(acc), cond).to(acc)
        d_fake = self.fake_x0(x_target, t.to(acc), cond).to(acc)
        logs = {}
        logits = None
        if self.discriminator is not None:
            if cfg.gan_weight > 0:
                logits = self.discriminator_logits(x_t, t, cond, frozen=True)
            else:
                with torch.no_grad():
                    logits = self.discriminator_logits(x_t.detach(), t, cond)
            h, r = self.ratio_weights(logits.detach(), coord)
            logs["log/log_ratio_mean"] = logits.detach().mean(1).mean()   # before clamping and bins
            logs["log/ratio_mean"] = r.mean()
            logs["log/h_max"] = h.max()
        else:
            h = torch.ones(n, device=dev, dtype=acc)
        loss_dm = pseudo_target_loss(x, self.dmd.direction(x, d_teacher, d_fake, h))
        loss = loss_dm
        if logits is not None and cfg.gan_weight > 0:
            loss_gan = F.softplus(-logits).mean()
            loss = loss + cfg.gan_weight * loss_gan
            logs["log/loss_gan"] = loss_gan.detach()
        return {"student": loss, "log/loss": loss.detach(), "log/loss_dm": loss_dm.detach(), **logs}

    def critic_loss(self, batch):
        cfg = self.cfg
        x_real, cond = batch["x"], batch.get("cond")
        n, dev, dt = x_real.shape[0], x_real.device, x_real.dtype
        loss_fake, x_t, t = self.dmd.fake_score_loss(x_real, cond, cfg.critic_time_range)
        out = {"fake_score": loss_fake, "log/loss_fake_score": loss_fake.detach()}
        total = loss_fake.detach()
        if self.discriminator is not None:
            t_real, _ = self.sample_times(n, cfg.critic_time_range, dev)
            t_real = t_real.to(dt)
            eps_real = self.randn(*x_real.shape, device=dev).to(dt)
            x_real_t = paths.interpolate(x_real, eps_real, t_real)
            with torch.no_grad():  # features are constants for the heads: no graph through the teacher
                feats_fake = self.teacher.features(x_t, t, cond, cfg.feature_layers)
                feats_real = self.teacher.features(x_real_t, t_real, cond, cfg.feature_layers)
            logit_fake = self.discriminator(feats_fake, t)
            logit_real = self.discriminator(feats_real, t_real)
            loss_disc = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
            out["log/d_real"] = torch.sigmoid(logit_real.detach()).mean()
            out["log/d_fake"] = torch.sigmoid(logit_fake.detach()).mean()
            if cfg.r1_weight > 0:
                delta = self.randn(*x_real.shape, device=dev).to(dt)
                with torch.no_grad():
                    feats_near = self.teacher.features(x_real_t + cfg.r1_noise * delta, t_real, cond,
                                                       cfg.feature_layers)
                loss_r1 = (self.discriminator(feats_near, t_real) - logit_real).pow(2).mean()
                loss_disc = loss_disc + cfg.r1_weight * loss_r1
                out["log/loss_r1"] = loss_r1.detach()
            out["disc"] = loss_disc
            out["log/loss_disc"] = loss_disc.detach()
            total = total + loss_disc.detach()
        out["log/loss"] = total
        return out
