"""Score-of-Mixture Training and Distillation (Jayashankar, Ryu, Wornell 2025).

A one-step generator g(z) (the student at (r, t) = (0, 1)) with marginal q is trained on the alpha-skew
Jensen-Shannon divergence between q and the data p, through the scores of the mixtures
m_alpha = alpha p + (1 - alpha) q (alpha = weight on *real*): alpha -> 0 is forward KL, 1/2 JSD,
1 reverse KL (DMD). One network, the *mixture-score* net f(x_t; alpha, t), learns every mixture's
denoiser E_{m_alpha}[x | x_t] at once (SMT: amortised score):

    mixture denoising (score step, every step):
        L_score = w(t) [ alpha ||f(x_real,t; alpha) - x_real||^2 + (1 - alpha) ||f(sg[x_fake],t; alpha) - x_fake||^2 ]
        same t and alpha for the real and the fake term of a pair, independent noise; the minimiser is
        the mixture's denoiser. Computed as a velocity loss (f = x_t - t v, so ||f - x||^2 = t^2 ||v - (eps - x)||^2):
        score_weighting "velocity" is w(t) t^2 = 1 (how flow teachers are trained), "edm" is EDM's
        lambda(sigma) = 1/sigma^2 + 1/sigma_d^2 at sigma = t / (1 - t), i.e. (1 - t)^2 + t^2 / sigma_d^2.
    generator gradient (every `critic_per_generator`-th step, eqs. 9-10), per sample and without gradient:
        P_a = x - f(x_t; a)  for a in {0, alpha, 1};  x = g(z), x_t = (1 - t) x + t eps
        "adaptive": wf = mean|P_1| RMS(P_alpha - P_0) / RMS(P_1 - P_0);  G = (P_alpha - P_0) / wf
        "dmd":      G = (P_alpha - P_0) / (alpha mean|P_1|)   (Prop. 3.1's (1/alpha)(s_0 - s_alpha), DMD normaliser)
        "none":     G = (P_alpha - P_0) / alpha
        L_G = 1/2 mean ||x - sg[x - G]||^2 (+ the GAN term)
    Gradient descent moves x along s_alpha - s_0 (towards the more real mixture). With exact scores
    (1/alpha)(s_0 - s_alpha) = -(r / (alpha r + 1 - alpha)) (s_p - s_q), h_alpha(r) = r / (alpha r + 1 - alpha)
    times DMD's direction; alpha = 1 is DMD. Note that the adaptive weight then cancels h_alpha exactly:
    with exact scores "adaptive" *is* DMD's gradient for every alpha (tests/objectives/test_smt.py shows it).
    GAN regulariser: a conv head on the score net's bottleneck evaluated at alpha = 1/2, at a fresh
        noise level; critic (score step): critic_gan_weight [(1 - alpha) softplus(l(fake)) + alpha softplus(-l(real))]
        with alpha from the generator's sampler; generator: gan_weight softplus(-l(x_t fake)).

alpha sampling: the generator draws uniformly from {1/L, ..., 1}; the score net from {0, 1/L, ..., 1},
each draw replaced with probability `point_mass_prob` by a uniform draw from {0, 1/2, 1} (alpha = 0 is the
fake score every generator update uses; alpha = 1 the real one).

SMD (`smd`, distillation): generator and mixture net start from the teacher, and the real branch's target
x_real is replaced by the teacher's denoiser at the same noisy point. Two mixture nets (`mixture`):
    "amortized" (the public code's SMD): the one alpha-conditioned net above, started from the teacher.
        Its alpha = 1 output is only as close to the teacher as training keeps it; on digits it drifted
        from the teacher by more than the real-fake difference the generator needs (README).
    "explicit" (the paper's SMD): v_alpha = D v_p + (1 - D) v_fake with D = sigmoid(l(x_t, t) + logit alpha),
        v_p the frozen teacher, v_fake a trainable copy of it and l a head on the teacher's features
        (l -> log p_t / q_t at the optimum). alpha = 1 is the teacher exactly and alpha = 0 the fake
        score, so P_alpha - P_0 = D (P_1 - P_0): "dmd" weighting gives the paper's (D / alpha) x DMD's
        direction, "adaptive" DMD's own. The GAN terms use l itself; its critic term is the plain
        logistic loss softplus(l(fake)) + softplus(-l(real)), whose optimum is the same log p_t / q_t.

Schedule (objectives.base.UpdateSchedule, joint): `critic_per_generator` = N score-net updates per generator
update, as in every objective, but the score net trains every step and the student also trains at the last
step of each cycle of N steps (not N + 1: the generator's step is a score step too). Both losses of such a
step come from one forward, so that step's score update uses the generator samples from before the generator
update (the reference steps the generator first: a one-step lag on one step in N).

SMT's optional generator warm-up (`generator_warmup` steps: the reference first trains its
generator as a plain diffusion denoiser): the student trains every step on flow matching along r = 0,
u(x_t, 0, t) -> eps - x with t uniform, so that the one-step generator z - u(z, 0, 1) starts as the data's
denoiser at pure noise (the data mean) on features learned from every noise level; the mixture net trains
on its usual loss alongside, tracking that generator.

The mixture net is a student-type network u(x, r, t) whose *interval* embedding carries alpha: it is
called at r = t - alpha with interval_scale = alpha_scale, so the zero-initialised second embedding that
a teacher copy gets sees alpha * alpha_scale (sinusoidal: sensitive to alpha, as the spec's Fourier
features of scale 16 are) and at step 0 every mixture equals the teacher (SMD).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch
from onestep.objectives.base import (
    GENERATOR,
    RETIRED_SCHEDULE_KEYS,
    Objective,
    OptimDefaults,
    UpdateSchedule,
    check_critic_per_generator,
    frozen_eval,
)
from onestep.objectives.discriminators import FeatureDiscriminator, find_module, module_features
from onestep.objectives.distribution_matching import (
    call_with_frozen_parameters,
    karras_sigmas,
    module_device_dtype,
    one_step_generate,
    pseudo_target_loss,
    sample_noise_levels,
    sample_shape_of,
    trainable_copy_of_backbone,
)
from onestep.objectives.fdistill import check_time_options
from onestep.teachers.base import Teacher
from torch import nn
from torch.nn import functional as F

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES

GENERATOR_WEIGHTS = ("adaptive", "dmd", "none")
SCORE_WEIGHTINGS = ("velocity", "edm")


def stack_conditions(*conds):
    """Conditions stacked along the batch, None staying None: class labels and prompt embeddings
    (PromptCondition, which torch.cat does not take) alike."""
    return None if conds[0] is None else Teacher.cat_conditions(conds)


class MixtureScore(nn.Module):
    """v(x_t, t; alpha): the velocity of the mixture alpha p + (1 - alpha) q, from a student-type network
    whose interval embedding carries alpha (see the module docstring)."""

    def __init__(self, net: nn.Module, alpha_scale: float = 1000.0):
        super().__init__()
        if not hasattr(net, "interval_scale"):
            raise ValueError(f"a mixture-score net needs a second embedding (interval_scale); got {type(net).__name__}")
        self.net = net
        net.interval_scale = alpha_scale

    def forward(self, x_t, t, alpha, cond=None):
        t = paths.batch_time(t, x_t)
        alpha = paths.batch_time(alpha, x_t)
        return self.net(x_t, t - alpha, t, cond)

    def x0(self, x_t, t, alpha, cond=None):
        t = paths.batch_time(t, x_t)
        return paths.velocity_to_x0(x_t, t, self(x_t, t, alpha, cond).to(x_t.dtype))

    def default_bottleneck(self) -> list[str]:
        """The layer the GAN head reads: a UNet's mid block, an MLP's last hidden activation."""
        from onestep.student import AvgVelocityUNet, MLPAvgVelocity, TeacherStudent

        if isinstance(self.net, AvgVelocityUNet):
            return ["net.unet.mid_block"]
        if isinstance(self.net, MLPAvgVelocity):
            return [f"net.body.{len(self.net.body) - 2}"]
        mid = find_module(self.net.backbone, "mid_block") if isinstance(self.net, TeacherStudent) else None
        if mid is not None:
            return [f"net.backbone.{mid}"]   # diffusers UNets (SD, SDXL; EDM's inside its preconditioning)
        blocks = getattr(getattr(self.net, "backbone", None), "transformer_blocks", None)
        if isinstance(self.net, TeacherStudent) and blocks is not None and len(blocks):
            return [f"net.backbone.transformer_blocks.{len(blocks) // 2}"]   # DiTs (SD3, FLUX, SANA): the middle block
        raise ValueError(f"no default bottleneck for {type(self.net).__name__}: set objective.gan_layers")


class ExplicitMixtureScore(nn.Module):
    """SMD's explicit mixture (the paper's): v_alpha(x_t, t) = D v_p + (1 - D) v_fake, D = sigmoid(l + logit alpha).

    `fake`: a trainable velocity net called at r = t; `head`: discriminator heads on the teacher's
    features, whose mean logit is l. The teacher is frozen and not a submodule (the objective owns it)."""

    def __init__(self, teacher, fake: nn.Module, head: nn.Module, feature_layers=None, guidance=None):
        super().__init__()
        self.fake, self.head = fake, head
        self.feature_layers, self.guidance = feature_layers, guidance
        self._teacher = (teacher,)

    @property
    def teacher(self):
        return self._teacher[0]

    def logits(self, x_t, t, cond=None, frozen: bool = False) -> torch.Tensor:
        """l(x_t, t) [B]; `frozen`: the head gets no gradient, x_t still does (through the teacher)."""
        t = paths.batch_time(t, x_t)
        feats = self.teacher.features(x_t, t, cond, self.feature_layers)
        out = call_with_frozen_parameters(self.head, feats, t) if frozen else self.head(feats, t)
        return out.mean(1)

    def components(self, x_t, t, cond=None):
        """(v_p, v_fake, l) at x_t in fp32; gradients reach the fake net and the head only."""
        t = paths.batch_time(t, x_t)
        with frozen_eval(self.teacher):
            v_p = self.teacher.velocity(x_t, t, cond, self.guidance)
            feats = self.teacher.features(x_t, t, cond, self.feature_layers)
        v_fake = self.fake(x_t, t, t, cond)
        acc = torch.promote_types(v_fake.dtype, torch.float32)
        return v_p.to(acc), v_fake.to(acc), self.head(feats, t).mean(1).to(acc)

    @staticmethod
    def mix(v_p, v_fake, logit, alpha) -> torch.Tensor:
        alpha = alpha.to(logit.dtype)
        d = torch.sigmoid(logit + torch.logit(alpha.clamp(1e-12, 1 - 1e-12)))
        d = torch.where(alpha >= 1, torch.ones_like(d), torch.where(alpha <= 0, torch.zeros_like(d), d))
        return paths.expand_like(d, v_p) * v_p + paths.expand_like(1 - d, v_fake) * v_fake

    def forward(self, x_t, t, alpha, cond=None):
        return self.mix(*self.components(x_t, t, cond), paths.batch_time(alpha, x_t))

    def x0(self, x_t, t, alpha, cond=None):
        t = paths.batch_time(t, x_t)
        return paths.velocity_to_x0(x_t, t, self(x_t, t, alpha, cond).to(x_t.dtype))

    def x0_many(self, x_t, t, alphas: list[torch.Tensor], cond=None) -> list[torch.Tensor]:
        """Denoisers of several mixtures from one teacher and one fake-net pass."""
        t = paths.batch_time(t, x_t)
        parts = self.components(x_t, t, cond)
        return [paths.velocity_to_x0(x_t, t, self.mix(*parts, paths.batch_time(a, x_t)).to(x_t.dtype)) for a in alphas]


MIXTURES = ("amortized", "explicit")


@dataclass
class SMTConfig:
    critic_per_generator: int = 5        # score-net updates per generator update; the score net trains every
                                         # step, so the generator every N-th (UpdateSchedule, joint)
    generator_warmup: int = 0            # first steps: the generator trains by plain denoising (see the docstring)
    point_mass_prob: float = 0.5         # p_pm: share of score-net alphas drawn from {0, 1/2, 1}
    alpha_levels: int = 1000             # alphas live on the grid {k / alpha_levels}
    alpha_scale: float = 1000.0          # the alpha embedding sees alpha * alpha_scale
    time_sampler: str = "uniform"        # "uniform" flow time or "karras" (EDM sigma grid)
    time_range: List[float] = field(default_factory=lambda: [0.02, 0.98])        # generator
    score_time_range: List[float] = field(default_factory=lambda: [0.0, 1.0])    # score net and GAN head
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    levels: int = 1000
    score_weighting: str = "velocity"    # "velocity" or "edm" (lambda(sigma) = 1/sigma^2 + 1/sigma_d^2)
    sigma_data: float = 0.5
    generator_weight: str = "adaptive"   # "adaptive" (eqs. 9-10), "dmd" or "none"
    gan_weight: float = 3e-3             # generator GAN term (0: no GAN head)
    critic_gan_weight: float = 1e-2      # GAN critic term in the score loss
    gan_layers: Optional[List[str]] = None  # mixture-net layers the GAN head reads (None: its bottleneck)
    head_hidden: int = 64
    guidance: Optional[float] = None     # SMD: the teacher's CFG scale for the real branch
    lr: float = 1e-4                     # generator
    score_lr: float = 5e-4               # mixture net (+ GAN head)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    retired_keys: ClassVar[dict] = RETIRED_SCHEDULE_KEYS


@OBJECTIVES.register("smt")
class SMT(Objective):
    """Score-of-Mixture Training from data (no teacher)."""

    Config = SMTConfig
    distillation = False
    needs_interval = True  # the generator is u(z, 0, 1)

    def __init__(self, student, teacher, cfg: SMTConfig, score_net: Optional[nn.Module] = None):
        """`score_net`: a module called as net(x_t, t, alpha, cond) -> velocity (default: a MixtureScore
        around a copy of the teacher's backbone with a fresh alpha embedding, or of the student without one)."""
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.score_net = score_net if score_net is not None else self.default_score_net(student, teacher)
        self.score_net.requires_grad_(True)
        self.explicit = isinstance(self.score_net, ExplicitMixtureScore)
        self.gan_head = None
        # the explicit mixture's logit head is its own GAN discriminator
        if (cfg.gan_weight > 0 or cfg.critic_gan_weight > 0) and not self.explicit:
            try:
                self.gan_layers = list(cfg.gan_layers) if cfg.gan_layers else self.score_net.default_bottleneck()
                example = self._example_bottleneck(student)
            except ValueError as e:  # a layer name the mixture net does not have
                raise ConfigError(f"objective.gan_layers: {e}") from None
            self.gan_head = FeatureDiscriminator(example, hidden=cfg.head_hidden)
        self.register_buffer("sigma_grid", karras_sigmas(cfg.levels, cfg.sigma_min, cfg.sigma_max, cfg.rho),
                             persistent=False)

    def default_score_net(self, student, teacher) -> MixtureScore:
        from onestep.student import student_from_teacher

        if self.uses_teacher_init(teacher):
            return MixtureScore(student_from_teacher(teacher, self.cfg.alpha_scale), self.cfg.alpha_scale)
        return MixtureScore(copy.deepcopy(student), self.cfg.alpha_scale)

    def uses_teacher_init(self, teacher) -> bool:
        return False  # SMT learns from data; SMD starts from the teacher

    @staticmethod
    def check_config(cfg: SMTConfig, teacher=...) -> None:
        if cfg.generator_warmup < 0:
            raise ConfigError(f"objective.generator_warmup must be >= 0 (steps), got {cfg.generator_warmup}")
        check_critic_per_generator(cfg)
        if not 0.0 <= cfg.point_mass_prob <= 1.0:
            raise ConfigError(f"objective.point_mass_prob must be in [0, 1], got {cfg.point_mass_prob}")
        if cfg.alpha_levels < 2 or not cfg.alpha_scale > 0:
            raise ConfigError(f"objective.alpha_levels must be >= 2 and alpha_scale > 0, "
                              f"got {cfg.alpha_levels}, {cfg.alpha_scale}")
        check_time_options(cfg, ("time_range", "score_time_range"))
        if cfg.score_weighting not in SCORE_WEIGHTINGS:
            raise ConfigError(f"objective.score_weighting must be one of {', '.join(SCORE_WEIGHTINGS)}, "
                              f"got {cfg.score_weighting!r}")
        if cfg.generator_weight not in GENERATOR_WEIGHTS:
            raise ConfigError(f"objective.generator_weight must be one of {', '.join(GENERATOR_WEIGHTS)}, "
                              f"got {cfg.generator_weight!r}")
        if cfg.sigma_data <= 0 or cfg.gan_weight < 0 or cfg.critic_gan_weight < 0 or cfg.head_hidden < 1:
            raise ConfigError("objective.sigma_data must be > 0, gan_weight and critic_gan_weight >= 0, "
                              "head_hidden >= 1")
        if not (cfg.score_lr > 0 and math.isfinite(cfg.score_lr)):
            raise ConfigError(f"objective.score_lr must be a finite number > 0, got {cfg.score_lr}")

    # --- contract ----------------------------------------------------------------------------------
    def param_groups(self):
        score = [p for p in self.score_net.parameters() if p.requires_grad]
        if self.gan_head is not None:
            score += [p for p in self.gan_head.parameters() if p.requires_grad]
        return {"student": [p for p in self.student.parameters() if p.requires_grad], "score": score}

    def default_optim(self, group):
        lr = self.cfg.lr if group == "student" else self.cfg.score_lr
        return OptimDefaults(lr=lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay)

    def is_warmup_step(self, step: int) -> bool:
        return step < self.cfg.generator_warmup

    @classmethod
    def update_schedule(cls, cfg):
        return UpdateSchedule(cfg.critic_per_generator, joint=True, warmup=cfg.generator_warmup)

    @classmethod
    def critic_groups(cls, cfg):
        return ["score"]

    def is_generator_step(self, step: int) -> bool:
        return GENERATOR in self.players(self.cfg, step)

    def loss(self, batch, step):
        x_real, cond = batch["x"], batch.get("cond")
        z = self.randn(*x_real.shape, device=x_real.device).to(x_real.dtype)
        out = {}
        if self.is_warmup_step(step):
            out.update(self.warmup_loss(x_real, cond))
            with torch.no_grad():
                x_fake = one_step_generate(self.student, z, cond)
        elif self.is_generator_step(step):
            x = one_step_generate(self.student, z, cond)
            out.update(self.generator_loss(x, cond))
            x_fake = x.detach()
        else:
            with torch.no_grad():
                x_fake = one_step_generate(self.student, z, cond)
        out.update(self.score_loss(x_real, x_fake, cond))
        out["log/loss"] = sum(out[g].detach() for g in self.active_groups(step))
        return out

    # --- randomness ----------------------------------------------------------------------------------
    def sample_times(self, n: int, span, device=None):
        return sample_noise_levels(self, n, self.cfg.time_sampler, span, self.sigma_grid, device)

    def generator_alpha(self, n: int, device=None) -> torch.Tensor:
        """Uniform on {1/L, ..., 1}."""
        levels = self.cfg.alpha_levels
        return ((self.randint(levels, n) + 1).float() / levels).to(device)

    def score_alpha(self, n: int, device=None) -> torch.Tensor:
        """Uniform on {0, 1/L, ..., 1}, replaced with probability p_pm by a uniform draw from {0, 1/2, 1}."""
        levels = self.cfg.alpha_levels
        grid = self.randint(levels + 1, n).float() / levels
        point_mass = self.randint(3, n).float() / 2
        use_point_mass = self.rand(n) < self.cfg.point_mass_prob
        return torch.where(use_point_mass, point_mass, grid).to(device)

    @property
    def has_gan_logits(self) -> bool:
        """A GAN head on the amortized net's bottleneck, or the explicit mixture's own logit."""
        return self.gan_head is not None or self.explicit

    # --- the mixture net ----------------------------------------------------------------------------------
    def mixture_x0(self, x_t, t, alphas: list[torch.Tensor], cond=None) -> list[torch.Tensor]:
        """Denoisers of several mixtures at the same x_t, in one batched no-grad call."""
        if self.explicit:  # one teacher and one fake-net pass serve every alpha
            with frozen_eval(self.score_net):
                return self.score_net.x0_many(x_t, t, alphas, cond)
        k = len(alphas)
        rep = lambda v: torch.cat([v] * k)  # noqa: E731
        with frozen_eval(self.score_net):
            x0 = self.score_net.x0(rep(x_t), rep(t), torch.cat(alphas), stack_conditions(*[cond] * k))
        return list(x0.chunk(k))

    def bottleneck_logits(self, x_t, t, cond=None, frozen: bool = False) -> torch.Tensor:
        """GAN logits [B, K]: the head on the mixture net's bottleneck at alpha = 1/2 (the explicit mixture:
        its logit l, [B, 1]). `frozen`: neither the net's nor the head's parameters get a gradient
        (generator phase); x_t still does."""
        if self.explicit:
            return self.score_net.logits(x_t, t, cond, frozen=frozen)[:, None]
        half = torch.full_like(paths.batch_time(t, x_t), 0.5)
        if frozen:
            run = lambda: call_with_frozen_parameters(self.score_net, x_t, t, half, cond)  # noqa: E731
            feats = module_features(self.score_net, self.gan_layers, run)
            return call_with_frozen_parameters(self.gan_head, feats, t)
        feats = module_features(self.score_net, self.gan_layers, lambda: self.score_net(x_t, t, half, cond))
        return self.gan_head(feats, t)

    def _example_bottleneck(self, student):
        device, dtype = module_device_dtype(self.score_net)
        x = torch.zeros(2, *sample_shape_of(self.teacher, student), device=device, dtype=dtype)
        t = torch.full((2,), 0.5, device=device, dtype=dtype)
        with torch.no_grad():
            return module_features(self.score_net, self.gan_layers, lambda: self.score_net(x, t, t))

    # --- the two losses ------------------------------------------------------------------------------
    def real_velocity_target(self, x_real, eps, x_t, t, cond):
        """SMT: the conditional velocity eps - x_real (denoising target x_real)."""
        return eps - x_real

    def warmup_loss(self, x_real, cond):
        """Plain denoising along r = 0: mean ||u(x_t, 0, t) - (eps - x)||^2, t uniform on [0, 1)."""
        n, dev, dt = x_real.shape[0], x_real.device, x_real.dtype
        t = self.rand(n, device=dev).to(dt)
        eps = self.randn(*x_real.shape, device=dev).to(dt)
        x_t = paths.interpolate(x_real, eps, t)
        u = self.student(x_t, torch.zeros_like(t), t, cond)
        loss = (u.float() - (eps - x_real).float()).pow(2).mean()
        return {"student": loss, "log/loss_warmup": loss.detach()}

    def generator_loss(self, x, cond):
        cfg = self.cfg
        n, dev, dt = x.shape[0], x.device, x.dtype
        acc = torch.promote_types(dt, torch.float32)
        t, _ = self.sample_times(n, cfg.time_range, dev)
        t = t.to(dt)
        eps = self.randn(*x.shape, device=dev).to(dt)
        alpha = self.generator_alpha(n, dev).to(dt)
        # the mixture denoisers in fp32 (autocast is off in frozen_eval; x may be bf16/fp16 under it)
        x_t = paths.interpolate(x.detach().to(acc), eps.to(acc), t.to(acc))
        alpha = alpha.to(acc)
        f0, fa, f1 = self.mixture_x0(x_t, t.to(acc), [torch.zeros_like(alpha), alpha, torch.ones_like(alpha)], cond)
        with torch.no_grad():
            x_acc = x.detach().to(acc)
            p0, pa, p1 = x_acc - f0.to(acc), x_acc - fa.to(acc), x_acc - f1.to(acc)
            diff = pa - p0                       # = f_0 - f_alpha, prop. to s_0 - s_alpha
            per = lambda v: v.flatten(1)          # noqa: E731
            dmd_norm = per(p1).abs().mean(1) + 1e-6
            if cfg.generator_weight == "adaptive":
                # RMS(P_a - P_0) / RMS(P_1 - P_0) with a tiny floor in both: exactly 1 at alpha = 1 (DMD), and
                # no 0 / 0 when q = p (then P_a = P_0 for every a and G = 0)
                ms = lambda v: per(v).pow(2).mean(1) + 1e-20  # noqa: E731
                wf = dmd_norm * (ms(diff) / ms(p1 - p0)).sqrt()
            elif cfg.generator_weight == "dmd":
                wf = alpha.to(acc) * dmd_norm
            else:
                wf = alpha.to(acc)
            g = torch.nan_to_num(diff / paths.expand_like(wf, diff))
        loss_dm = pseudo_target_loss(x, g)
        loss = loss_dm
        logs = {"log/loss_dm": loss_dm.detach()}
        if self.has_gan_logits and cfg.gan_weight > 0:
            t_gan, _ = self.sample_times(n, cfg.score_time_range, dev)
            t_gan = t_gan.to(dt)
            eps_gan = self.randn(*x.shape, device=dev).to(dt)
            logits = self.bottleneck_logits(paths.interpolate(x, eps_gan, t_gan), t_gan, cond, frozen=True)
            loss_gan = F.softplus(-logits).mean()
            loss = loss + cfg.gan_weight * loss_gan
            logs["log/loss_gan"] = loss_gan.detach()
        return {"student": loss, **logs}

    def score_loss(self, x_real, x_fake, cond):
        cfg = self.cfg
        n, dev, dt = x_real.shape[0], x_real.device, x_real.dtype
        acc = torch.promote_types(dt, torch.float32)
        t, _ = self.sample_times(n, cfg.score_time_range, dev)
        t = t.to(dt)
        alpha = self.score_alpha(n, dev).to(dt)
        eps_real = self.randn(*x_real.shape, device=dev).to(dt)
        eps_fake = self.randn(*x_real.shape, device=dev).to(dt)
        xt_real = paths.interpolate(x_real, eps_real, t)
        xt_fake = paths.interpolate(x_fake, eps_fake, t)
        with torch.no_grad():
            target_real = self.real_velocity_target(x_real.to(acc), eps_real.to(acc), xt_real.to(acc), t.to(acc),
                                                    cond).to(acc)
        v = self.score_net(torch.cat([xt_real, xt_fake]), torch.cat([t, t]), torch.cat([alpha, alpha]),
                           stack_conditions(cond, cond)).to(acc)
        v_real, v_fake = v.chunk(2)
        err_real = (v_real - target_real).pow(2).flatten(1).mean(1)
        err_fake = (v_fake - (eps_fake - x_fake).to(acc)).pow(2).flatten(1).mean(1)
        tf = t.to(acc)
        weight = (torch.ones_like(tf) if cfg.score_weighting == "velocity"
                  else (1 - tf) ** 2 + tf ** 2 / cfg.sigma_data ** 2)
        a = alpha.to(acc)
        loss_score = (weight * (a * err_real + (1 - a) * err_fake)).mean()
        loss = loss_score
        logs = {"log/loss_score": loss_score.detach(), "log/score_real_mse": err_real.detach().mean(),
                "log/score_fake_mse": err_fake.detach().mean()}
        if self.has_gan_logits and cfg.critic_gan_weight > 0:
            loss_critic = self.gan_critic_loss(x_real, x_fake, cond)
            loss = loss + cfg.critic_gan_weight * loss_critic
            logs["log/loss_gan_critic"] = loss_critic.detach()
        return {"score": loss, **logs}

    def gan_critic_loss(self, x_real, x_fake, cond):
        n, dev, dt = x_real.shape[0], x_real.device, x_real.dtype
        alpha = self.generator_alpha(n, dev).to(torch.promote_types(dt, torch.float32))
        t_fake, _ = self.sample_times(n, self.cfg.score_time_range, dev)
        t_real, _ = self.sample_times(n, self.cfg.score_time_range, dev)
        t_fake, t_real = t_fake.to(dt), t_real.to(dt)
        xt_fake = paths.interpolate(x_fake, self.randn(*x_real.shape, device=dev).to(dt), t_fake)
        xt_real = paths.interpolate(x_real, self.randn(*x_real.shape, device=dev).to(dt), t_real)
        logits = self.bottleneck_logits(torch.cat([xt_fake, xt_real]), torch.cat([t_fake, t_real]),
                                        stack_conditions(cond, cond))
        l_fake, l_real = logits.chunk(2)
        if self.explicit:  # l must estimate log p_t / q_t itself: unweighted logistic loss
            return F.softplus(l_fake).mean() + F.softplus(-l_real).mean()
        return ((1 - alpha)[:, None] * F.softplus(l_fake)).mean() + (alpha[:, None] * F.softplus(-l_real)).mean()


@dataclass
class SMDConfig(SMTConfig):
    point_mass_prob: float = 0.25
    lr: float = 5e-5
    score_lr: float = 5e-5
    mixture: str = "amortized"           # "amortized" (one alpha-conditioned net) or "explicit" (the paper's)
    feature_layers: Optional[List[str]] = None  # explicit: teacher layers the logit head reads (None: defaults)


@OBJECTIVES.register("smd")
class SMD(SMT):
    """Score-of-Mixture Distillation: SMT from the teacher, whose denoiser is the real branch's target."""

    Config = SMDConfig
    distillation = True

    def uses_teacher_init(self, teacher) -> bool:
        return teacher is not None and teacher.backbone() is not None

    def default_score_net(self, student, teacher):
        if self.cfg.mixture == "amortized":
            return super().default_score_net(student, teacher)
        fake = trainable_copy_of_backbone(teacher, student)
        device, dtype = module_device_dtype(fake)
        x = torch.zeros(2, *sample_shape_of(teacher, student), device=device, dtype=dtype)
        try:
            with torch.no_grad():
                example = teacher.features(x, torch.full((2,), 0.5, device=device, dtype=dtype), None,
                                           self.cfg.feature_layers)
        except ValueError as e:  # a layer name the teacher's backbone does not have
            raise ConfigError(f"objective.feature_layers: {e}") from None
        head = FeatureDiscriminator(example, hidden=self.cfg.head_hidden)
        return ExplicitMixtureScore(teacher, fake, head, self.cfg.feature_layers, self.cfg.guidance)

    @staticmethod
    def check_config(cfg: SMDConfig, teacher=...) -> None:
        if teacher is None:
            raise ConfigError("objective smd distils a teacher: set teacher.name (or use smt to train from data)")
        if cfg.mixture not in MIXTURES:
            raise ConfigError(f"objective.mixture must be one of {', '.join(MIXTURES)}, got {cfg.mixture!r}")
        if cfg.mixture == "explicit" and cfg.gan_layers:
            raise ConfigError("objective.gan_layers is for the amortized mixture net; the explicit mixture's logit "
                              "head reads the teacher's objective.feature_layers")
        SMT.check_config(cfg, teacher)

    def real_velocity_target(self, x_real, eps, x_t, t, cond):
        # regressing x0 onto D_T(x_t) is regressing the velocity onto the teacher's velocity at x_t
        with frozen_eval(self.teacher):
            return self.teacher.velocity(x_t, t, cond, self.cfg.guidance).to(x_t.dtype)
