"""Progressive adversarial distillation, as in SDXL-Lightning (Lin, Wang, Yang 2024).

Stages of student step counts (e.g. teacher 32 -> 8 -> 4 -> 2 -> 1): in each, the previous model (the
teacher with its `teacher_steps`-step Euler sampler at the first stage, then the previous stage's student,
frozen) is the target, with jump factor n = N_prev / N. For a student step from grid time t to t'
(the N-step grid), with x_t the noised real data (pure noise at the first time, t = 1):

    target   x_t'  = n steps of the previous model from x_t        (no grad)
    student  x^_t' = x_t - (t - t') u(x_t, t', t)                    (one Euler/DDIM step of the student)

The first `mse_stages` stages regress x^_t' on x_t' (progressive distillation). Later stages are
adversarial: a discriminator built from a copy of the teacher's encoder (its backbone run up to the layers
in `disc_layers`: the mid block for UNets, early blocks for transformers) with small heads, first
*conditional* on the start point, D(x_t', x_t) = head(d(x_t', t') (+) d(x_t, t)), for the first
`conditional_share` of the stage, then *unconditional*, D(x_t') (relaxes exact flow matching). Non-saturating
losses: L_D = softplus(-D(real pair)) + softplus(D(student pair)), L_G = softplus(-D(student pair)); G and D
alternate (objectives.base.UpdateSchedule, generator first, restarted at each stage): cycles of
`critic_per_generator` + 1 iterations, the student at the first and the discriminator at the others; the
default 1 alternates (even iterations of a stage: student; odd: discriminator). MSE stages train the student only.

Grids in flow time: "trailing" for discrete VP teachers (diffusers' `timestep_spacing="trailing"`
timesteps 999, 999 - 1000/N, ... mapped to flow time, the first replaced by t = 1: the adapter then feeds
the model pure noise at its last timestep, SDXL-Lightning's schedule fix; DiscreteVPSchedule.trailing_grid);
"uniform" ([1, 1 - 1/N, ..., 0], the continuous trailing grid) for flow-time teachers. The student carries
its grid (`student.trailing_schedule`, set here and recorded by `Lightning.sampler_spec`), so
`student.sample(noise, steps=k)` (evaluation, export, benchmarks) samples the grid it was trained on. Each
stage's student initialises the next (it is the same network, trained on). Students may be full or LoRA
(`student.lora_rank`) alike.

x0 ("sample") prediction in the 1-step stage. A student of an eps-prediction VP teacher
sees pure noise at t = 1, where its one step is x0 = (x - sqrt(1 - abar) eps^) / sqrt(abar): sqrt(abar_999)
= 0.068 on SD/SDXL's schedule, so every error of eps^ comes out 14.6 times larger. From the first step of
the 1-step stage on, the student's backbone output is therefore read as x0 (`one_step_prediction`: "auto"
= "sample" for eps-prediction students and no change for the others; or "epsilon", "sample",
"v_prediction"), through the VP time map's own conversion (onestep.paths.prediction_to_velocity), and its
one step returns that output itself. The reading is a function of the stage, so of the step: the loss
sets it for the step it trains; a checkpoint after N steps holds weights last trained at step N - 1 and
takes that step's reading, both when the trainer restores the objective (`previous_stage`, before any
loss runs) and when export / evaluation rebuild the student (`sampler_spec`, stored in sampler.json); the exported
diffusers scheduler then says prediction_type="sample". Velocity-parameterised students (flow-time
teachers, digits and MLP students) need no switch: x0 = z - u(z, 0, 1) is well conditioned. Measured on
the VP mixture toy (tests/objectives/test_lightning.py, the teacher's 8 trailing steps -> 1 step, 150 steps): the
student reading x0 ends 0.23 from the stage's target, reading eps 0.43, whose loss jumps to 12.3 after
the first Adam step (reading x0: at most 0.70).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from itertools import accumulate
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
from onestep.objectives.discriminators import FeatureDiscriminator, concat_channels, find_module, module_features
from onestep.objectives.distribution_matching import (
    call_with_frozen_parameters,
    module_device_dtype,
    sample_shape_of,
    trainable_copy_of_backbone,
)
from torch import nn
from torch.nn import functional as F

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import OBJECTIVES
from onestep.sampling import SamplerSpec

GRIDS = ("auto", "uniform", "trailing")
#: how a 1-step stage reads a VP student's backbone output ("auto": "sample" for eps-prediction students)
ONE_STEP_PREDICTIONS = ("auto", "epsilon", "sample", "v_prediction")


@dataclass
class LightningConfig:
    teacher_steps: int = 32             # the teacher's Euler steps the first stage distils (SDXL-Lightning: 128)
    stages: List[int] = field(default_factory=lambda: [8, 4, 2, 1])   # student step counts, stage by stage
    stage_iters: List[int] = field(default_factory=lambda: [250, 250, 250, 250])  # training steps per stage
    mse_stages: int = 1                 # the first this-many stages use MSE, the rest are adversarial
    conditional_share: float = 0.5      # share of an adversarial stage with the conditional discriminator
    critic_per_generator: int = 1       # adversarial stages: discriminator updates per student update (student first)
    adv_weight: float = 1.0             # weight of the adversarial term in adversarial stages
    mse_weight: float = 0.0             # optional MSE term in adversarial stages (0: adversarial only, as the paper)
    guidance: Optional[float] = None    # the teacher's CFG scale (first stage)
    grid: str = "auto"                  # "auto" (trailing for discrete VP teachers), "uniform" or "trailing"
    disc_layers: Optional[List[str]] = None   # encoder layers the heads read (None: the mid block / last hidden)
    disc_hidden: int = 64
    train_disc_backbone: bool = True    # train the encoder copy with the heads (SDXL-Lightning) or only the heads
    lr: float = 1e-4
    disc_lr: Optional[float] = None     # None: lr
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    one_step_prediction: str = "auto"   # the 1-step stage's reading of a VP student's backbone output (see above)
    retired_keys: ClassVar[dict] = RETIRED_SCHEDULE_KEYS


def stage_at(stage_iters, step: int) -> tuple[int, int]:
    """(stage index, iteration within the stage) of a training step; steps past the last stage stay in it."""
    start = 0
    for k, iters in enumerate(stage_iters):
        if step < start + iters or k == len(stage_iters) - 1:
            return k, step - start
        start += iters
    raise AssertionError


def phase_at(cfg: LightningConfig, step: int) -> str:
    """"mse", "conditional" or "unconditional" at this training step."""
    k, j = stage_at(cfg.stage_iters, step)
    if k < cfg.mse_stages:
        return "mse"
    return "conditional" if j < cfg.conditional_share * cfg.stage_iters[k] else "unconditional"


def stage_prediction_type(cfg: LightningConfig, stage: int, base: str | None) -> str | None:
    """What the student's backbone predicts in `stage`: `base` (its teacher's; None for velocity students)
    except in a 1-step stage, where `one_step_prediction` decides ("auto": x0 instead of eps)."""
    if base is None or cfg.stages[stage] != 1 or (cfg.one_step_prediction == "auto" and base != "epsilon"):
        return base
    return "sample" if cfg.one_step_prediction == "auto" else cfg.one_step_prediction


def default_encoder_layers(net: nn.Module) -> list[str]:
    """Where the discriminator reads the encoder copy: a UNet's mid block, a transformer's early blocks,
    an MLP's last hidden activation."""
    from onestep.student import AvgVelocityUNet, MLPAvgVelocity, TeacherStudent

    if isinstance(net, AvgVelocityUNet):
        return ["unet.mid_block"]
    if isinstance(net, MLPAvgVelocity):
        return [f"body.{len(net.body) - 2}"]
    if isinstance(net, TeacherStudent):
        mid = find_module(net.backbone, "mid_block")   # UNets, also inside EDM's preconditioning
        if mid is not None:
            return [f"backbone.{mid}"]
        for blocks in ("transformer_blocks", "single_transformer_blocks"):
            if hasattr(net.backbone, blocks) and len(getattr(net.backbone, blocks)):
                count = len(getattr(net.backbone, blocks))
                return [f"backbone.{blocks}.{min(count - 1, max(1, count // 4))}"]
    raise ValueError(f"no default encoder layer for {type(net).__name__}: set objective.disc_layers")


@OBJECTIVES.register("lightning")
class Lightning(Objective):
    Config = LightningConfig
    needs_interval = True

    def __init__(self, student, teacher, cfg: LightningConfig):
        super().__init__(student, teacher, cfg)
        self.check_config(cfg, teacher)
        self.vp = teacher is not None and teacher.capabilities.time == "vp"   # a discrete schedule at teacher.time
        self.grid_kind = ("trailing" if self.vp else "uniform") if cfg.grid == "auto" else cfg.grid
        if self.grid_kind == "trailing" and not self.vp:
            raise ConfigError("objective.grid=trailing needs a discrete VP teacher (unet, stable_diffusion, sdxl); "
                              "use grid=uniform (or auto) for flow-time teachers")
        # the student samples on the grid it trains on (None: the uniform grid, its sampler's default)
        student.trailing_schedule = teacher.time.schedule if self.grid_kind == "trailing" else None
        # what the student's backbone predicts before any switch: its teacher's type (None: a velocity)
        self.base_prediction = getattr(student, "prediction_type", None)
        if cfg.one_step_prediction != "auto" and self.base_prediction is None:
            raise ConfigError(f"objective.one_step_prediction={cfg.one_step_prediction} needs a student built from a "
                              f"discrete VP teacher (unet, stable_diffusion, sdxl); {type(student).__name__} predicts "
                              "a velocity, which needs no switch: use auto")
        # the previous stage's student, frozen; a submodule from the start so checkpoints always hold it. A
        # copy of the student before any switch: only the last stage can have 1 step, so every previous
        # model (a stage with >= 2 steps) reads its backbone as the teacher does
        self.previous = copy.deepcopy(student).requires_grad_(False).eval()
        # the last stage whose first step has run (0 before stage 1): so the stage of the weights
        self.register_buffer("previous_stage", torch.tensor(0, dtype=torch.long))
        self.use_stage_prediction(0)
        self.register_load_state_dict_post_hook(Lightning._after_load)
        self.adversarial = len(cfg.stages) > cfg.mse_stages
        if self.adversarial:
            self.disc_backbone = trainable_copy_of_backbone(teacher, student).requires_grad_(cfg.train_disc_backbone)
            try:
                self.disc_layers = list(cfg.disc_layers or default_encoder_layers(self.disc_backbone))
                example = self._encoder_features(*self._example_input())
            except ValueError as e:
                raise ConfigError(f"objective.disc_layers: {e}") from None
            pair = [concat_channels(f, f) for f in example]
            self.disc_conditional = FeatureDiscriminator(pair, hidden=cfg.disc_hidden)
            self.disc_unconditional = FeatureDiscriminator(example, hidden=cfg.disc_hidden)

    @classmethod
    def exports_one_step_only(cls, cfg: LightningConfig, vp_teacher: bool) -> str | None:
        if vp_teacher and cfg.grid != "uniform":  # "auto" and "trailing" mean the trailing grid for VP teachers
            # t - r differs from step to step on the trailing grid: no single vector to fold into the backbone
            return ("this student samples on the trailing timestep grid it was trained on (lightning with a VP "
                    "teacher), whose steps differ in t - r, so its interval embedding cannot be folded into one "
                    "backbone for k >= 2 steps; only --steps 1 (the grid [1, 0]) exports exactly, in every format; "
                    "sample k steps with onestep (student.sample)")
        return super().exports_one_step_only(cfg, vp_teacher)

    @staticmethod
    def check_config(cfg: LightningConfig, teacher=...) -> None:
        if teacher is None:
            raise ConfigError("objective lightning distils a teacher: set teacher.name")
        if cfg.grid not in GRIDS:
            raise ConfigError(f"objective.grid must be one of {', '.join(GRIDS)}, got {cfg.grid!r}")
        if not cfg.stages or len(cfg.stage_iters) != len(cfg.stages):
            raise ConfigError(f"objective.stages and objective.stage_iters must be non-empty lists of one length, "
                              f"got {list(cfg.stages)} and {list(cfg.stage_iters)}")
        if any(n < 1 for n in cfg.stages) or any(i < 1 for i in cfg.stage_iters) or cfg.teacher_steps < 1:
            raise ConfigError("objective.teacher_steps, stages and stage_iters must be >= 1")
        previous = cfg.teacher_steps
        for n in cfg.stages:
            if n >= previous or previous % n:
                raise ConfigError(f"objective.stages must shrink by integer factors from teacher_steps "
                                  f"({cfg.teacher_steps}): {n} steps cannot distil {previous}")
            previous = n
        if not 0 <= cfg.mse_stages <= len(cfg.stages) or not 0.0 <= cfg.conditional_share <= 1.0:
            raise ConfigError(f"objective.mse_stages must be in [0, {len(cfg.stages)}] and conditional_share in "
                              f"[0, 1], got {cfg.mse_stages}, {cfg.conditional_share}")
        if cfg.one_step_prediction not in ONE_STEP_PREDICTIONS:
            raise ConfigError(f"objective.one_step_prediction must be one of {', '.join(ONE_STEP_PREDICTIONS)}, "
                              f"got {cfg.one_step_prediction!r}")
        check_critic_per_generator(cfg)
        if cfg.disc_hidden < 1 or cfg.mse_weight < 0 or cfg.adv_weight < 0 or len(cfg.betas) != 2:
            raise ConfigError("objective.disc_hidden must be >= 1, adv_weight and mse_weight >= 0 and "
                              "betas two numbers")

    # --- schedule ----------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(self.cfg.stage_iters)

    @classmethod
    def smoke_options(cls, options: dict) -> dict:
        """Four iterations a stage: the adversarial stages' generator and discriminator steps, conditional then
        unconditional, all come round."""
        stages = options.get("stages", LightningConfig().stages)
        return {"stage_iters": [4] * len(stages)}

    def milestones(self) -> list[int]:
        """The last step of every stage: its checkpoint is that stage's model (benchmarks/lightning_stages.py)."""
        return list(accumulate(self.cfg.stage_iters))

    def stage_of(self, step: int) -> tuple[int, int]:
        """(stage index, iteration within the stage); steps past the last stage stay in it."""
        return stage_at(self.cfg.stage_iters, step)

    # --- what the student's backbone predicts ------------------------------------------------------
    def use_stage_prediction(self, stage: int) -> None:
        """Read the student's backbone output as `stage` wants (x0 from the 1-step stage of an eps student on)."""
        kind = stage_prediction_type(self.cfg, stage, self.base_prediction)
        if kind is not None:
            self.student.set_prediction_type(kind)

    def _after_load(self, incompatible_keys) -> None:
        # a restored checkpoint's student reads its backbone as at its last trained step, before any loss runs
        self.use_stage_prediction(int(self.previous_stage))

    @classmethod
    def sampler_spec(cls, cfg: LightningConfig, steps_done: int = 0, teacher=None) -> SamplerSpec:
        """The grid the student trains on (a discrete VP teacher's trailing grid unless grid=uniform) and how it
        reads its backbone: a checkpoint after `steps_done` steps holds weights last trained in the stage of step
        steps_done - 1."""
        time = getattr(teacher, "time", None)
        schedule = getattr(time, "schedule", None)
        trailing = schedule is not None and cfg.grid != "uniform"
        base = getattr(time, "prediction_type", None)   # the teacher's reading, which the student starts with
        kind = stage_prediction_type(cfg, stage_at(cfg.stage_iters, max(steps_done - 1, 0))[0], base)
        return SamplerSpec(grid="trailing" if trailing else "uniform",
                           alphas_cumprod=tuple(schedule.alphas_cumprod.tolist()) if trailing else None,
                           prediction_type=kind)

    def phase(self, step: int) -> str:
        """"mse", "conditional" or "unconditional" at this training step."""
        return phase_at(self.cfg, step)

    @classmethod
    def update_schedule(cls, cfg):
        return UpdateSchedule(cfg.critic_per_generator, generator_first=True)

    @classmethod
    def players(cls, cfg, step):
        """MSE stages: the student only; adversarial stages: the schedule, counted from the stage's first iteration."""
        if phase_at(cfg, step) == "mse":
            return (GENERATOR,)
        return cls.update_schedule(cfg).players(stage_at(cfg.stage_iters, step)[1])

    @classmethod
    def critic_groups(cls, cfg):
        return ["disc"]

    def param_groups(self):
        groups = {"student": [p for p in self.student.parameters() if p.requires_grad]}
        if self.adversarial:
            groups["disc"] = [p for m in (self.disc_backbone, self.disc_conditional, self.disc_unconditional)
                              for p in m.parameters() if p.requires_grad]
        return groups

    def default_optim(self, group):
        cfg = self.cfg
        lr = cfg.lr if group == "student" else (cfg.disc_lr or cfg.lr)
        return OptimDefaults(lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    # --- grids and steps ---------------------------------------------------------------------------
    def grid(self, steps: int, device=None) -> torch.Tensor:
        """The `steps`-step grid in flow time, 1 = t_0 > ... > t_steps = 0 (float64)."""
        if self.grid_kind == "uniform":
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
        return self.teacher.time.schedule.trailing_grid(steps).to(device)

    @torch.no_grad()
    def previous_jump(self, stage: int, x: torch.Tensor, index: torch.Tensor, cond=None) -> torch.Tensor:
        """n steps of the previous model from grid point `index` of the stage's grid to the next one."""
        cfg = self.cfg
        n_student = cfg.stages[stage]
        n_prev = cfg.teacher_steps if stage == 0 else cfg.stages[stage - 1]
        jump = n_prev // n_student
        fine = self.grid(n_prev, x.device)
        model = self.teacher if stage == 0 else self.previous
        with frozen_eval(model):
            for m in range(jump):
                t_cur = paths.batch_time(fine[index * jump + m].to(x.dtype), x)
                t_next = paths.batch_time(fine[index * jump + m + 1].to(x.dtype), x)
                h = paths.expand_like(t_cur - t_next, x)
                if stage == 0:
                    x = x - h * self.teacher.velocity(x, t_cur, cond, cfg.guidance).to(x.dtype)
                else:
                    x = x - h * self.previous(x, t_next, t_cur, cond).to(x.dtype)
        return x

    def sync_previous(self, stage: int) -> None:
        """At the start of stage k >= 1, the previous model becomes a frozen copy of the student."""
        if stage >= 1 and int(self.previous_stage) != stage:
            self.previous.load_state_dict(self.student.state_dict())
            self.previous_stage.fill_(stage)

    # --- the discriminator -------------------------------------------------------------------------
    def _example_input(self):
        shape = sample_shape_of(self.teacher, self.student)
        device, dtype = module_device_dtype(self.disc_backbone)
        return torch.zeros(2, *shape, device=device, dtype=dtype), torch.full((2,), 0.5, device=device, dtype=dtype)

    def _encoder_features(self, x, t, cond=None, frozen: bool = False) -> list[torch.Tensor]:
        net = self.disc_backbone
        run = (lambda: call_with_frozen_parameters(net, x, t, t, cond)) if frozen else (lambda: net(x, t, t, cond))
        return module_features(net, self.disc_layers, run)

    def disc_logits(self, x_next, t_next, x_cur, t_cur, conditional: bool, cond=None, frozen: bool = False):
        """One logit per sample: D(x_t', x_t) (conditional) or D(x_t'); heads and encoder frozen if `frozen`."""
        feats = self._encoder_features(x_next, t_next, cond, frozen)
        head = self.disc_conditional if conditional else self.disc_unconditional
        if conditional:
            with torch.no_grad():   # the start point is a constant for both players
                start = self._encoder_features(x_cur, t_cur, cond)
            feats = [concat_channels(f, s) for f, s in zip(feats, start)]
        logits = call_with_frozen_parameters(head, feats, t_next) if frozen else head(feats, t_next)
        return logits.mean(1)

    # --- the loss ----------------------------------------------------------------------------------
    def loss(self, batch, step):
        cfg = self.cfg
        stage, _ = self.stage_of(step)
        self.sync_previous(stage)
        self.use_stage_prediction(stage)
        phase = self.phase(step)
        x, cond = batch["x"], batch.get("cond")
        n, dev, dt = x.shape[0], x.device, x.dtype
        acc = torch.promote_types(dt, torch.float32)
        steps = cfg.stages[stage]
        grid = self.grid(steps, dev)
        index = self.randint(steps, n, device=dev)
        t_cur, t_next = grid[index].to(dt), grid[index + 1].to(dt)
        eps = self.randn(*x.shape, device=dev).to(dt)
        x_cur = paths.interpolate(x, eps, t_cur)          # t = 1: exactly eps (pure noise)
        # the previous model's n-step jumps, grouped by start index (every sample of a group shares its grid)
        target = torch.empty_like(x_cur)
        for i in index.unique().tolist():
            rows = (index == i).nonzero().squeeze(1)
            sub_cond = None if cond is None else _index_condition(cond, rows)
            target[rows] = self.previous_jump(stage, x_cur[rows], torch.tensor(i), sub_cond)
        logs = {"log/stage": torch.tensor(float(stage)), "log/stage_steps": torch.tensor(float(steps))}
        if GENERATOR not in self.players(cfg, step):
            return self.discriminator_loss(x_cur, t_cur, t_next, target, cond, phase == "conditional", logs)
        pred = x_cur - paths.expand_like(t_cur - t_next, x_cur) * self.student(x_cur, t_next, t_cur, cond)
        mse = (pred.to(acc) - target.to(acc)).pow(2).mean()
        logs["log/mse"] = mse.detach()
        if phase == "mse":
            return {"student": mse, "log/loss": mse.detach(), **logs}
        logit_fake = self.disc_logits(pred, t_next, x_cur, t_cur, phase == "conditional", cond, frozen=True)
        loss_adv = F.softplus(-logit_fake).mean()
        loss = cfg.adv_weight * loss_adv + cfg.mse_weight * mse
        logs["log/loss_adv"] = loss_adv.detach()
        return {"student": loss, "log/loss": loss.detach(), **logs}

    def discriminator_loss(self, x_cur, t_cur, t_next, target, cond, conditional: bool, logs: dict):
        with torch.no_grad():
            pred = x_cur - paths.expand_like(t_cur - t_next, x_cur) * self.student(x_cur, t_next, t_cur, cond)
        logit_real = self.disc_logits(target, t_next, x_cur, t_cur, conditional, cond)
        logit_fake = self.disc_logits(pred.to(target.dtype), t_next, x_cur, t_cur, conditional, cond)
        loss = F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()
        logs.update({"log/d_real": torch.sigmoid(logit_real.detach()).mean(),
                     "log/d_fake": torch.sigmoid(logit_fake.detach()).mean()})
        return {"disc": loss, "log/loss_disc": loss.detach(), "log/loss": loss.detach(), **logs}


def _index_condition(cond, rows: torch.Tensor):
    """Rows of a condition: class labels (a tensor) or a conditioning object with its own `_map`."""
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    return cond._map(lambda v: v[rows.to(v.device)])
