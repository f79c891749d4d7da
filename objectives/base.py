"""The Objective contract: one scalar loss per optimizer group; the trainer does the rest.

An objective owns every auxiliary network it needs; the trainer owns optimizers, EMA, checkpoints.
Every random draw (times, masks, noise) comes from `self.generator`, which the trainer seeds and
checkpoints, so a resumed run repeats the uninterrupted one exactly.

Objectives with two players, a generator (the student) and a critic (fake score, discriminator, mixture-score
net), say which updates at a step through one `UpdateSchedule`, set by the config key
`objective.critic_per_generator` (critic updates per generator update) in every one of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from onestep.errors import ConfigError
from onestep.sampling import SamplerSpec
from onestep.student import AvgVelocityField


@dataclass
class OptimDefaults:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8


GENERATOR, CRITIC = "generator", "critic"

#: config keys that `critic_per_generator` replaced: old key -> what its value meant (the same number converts)
RETIRED_SCHEDULE_KEYS: dict[str, tuple[str, str]] = {
    "critic_steps": ("critic_per_generator", "the same number: critic updates per generator update"),
    "score_steps": ("critic_per_generator", "the same number: score-net updates per generator update"),
}


@dataclass(frozen=True)
class UpdateSchedule:
    """Which of two alternating players updates at a step: the one schedule of f-distill, SMT/SMD, sCM + LADD
    and Lightning.

    `critic_per_generator` = N: the critic updates N times per generator update. This is what the config
    key `objective.critic_per_generator` means in every objective and recipe. Steps run in cycles:

    * alternating (`joint=False`; f-distill, sCM + LADD, Lightning): cycles of N + 1 steps, the generator alone
      at one of them and the critic alone at the other N. `generator_first`: the generator takes the first
      step of each cycle (LADD and Lightning: G, D, G, D, ... at N = 1), otherwise the last (f-distill: its
      fake score starts as an exact copy of the teacher, so critic steps come first);
    * joint (`joint=True`; SMT/SMD): cycles of N steps, the critic at every step and the generator also at
      the last one (one forward gives both losses): N critic updates per generator update in N steps, not N + 1.

    `warmup`: steps 0 .. warmup - 1 update the generator at every step (and, joint, the critic too: SMT's
    generator warm-up; alternating, the critic waits). Cycles count from step 0 all the same, so the first
    cycle after a warm-up may be short.

    Steps count from where the alternation starts: the run's step (f-distill, SMT/SMD, LADD) or the iteration
    within an adversarial stage (Lightning restarts the cycle at each stage; its MSE stages train the generator
    only).
    """
    critic_per_generator: int = 1
    joint: bool = False
    generator_first: bool = False
    warmup: int = 0

    def updates_generator(self, step: int) -> bool:
        if step < self.warmup:
            return True
        n = self.critic_per_generator
        if self.joint:
            return step % n == n - 1
        return step % (n + 1) == (0 if self.generator_first else n)

    def updates_critic(self, step: int) -> bool:
        if self.joint:
            return True
        return not self.updates_generator(step)

    def players(self, step: int) -> tuple[str, ...]:
        """(GENERATOR,), (CRITIC,) or (GENERATOR, CRITIC) at `step`."""
        return ((GENERATOR,) if self.updates_generator(step) else ()) + ((CRITIC,) if self.updates_critic(step) else ())


def check_critic_per_generator(cfg) -> None:
    """ConfigError unless `cfg.critic_per_generator` is an integer >= 1."""
    n = cfg.critic_per_generator
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"objective.critic_per_generator must be an integer >= 1 (critic updates per generator "
                          f"update), got {n!r}")


class Objective(nn.Module):
    """Base class. Subclasses set `Config` (a dataclass of their options) and implement `loss`."""

    Config: type = dataclass(type("EmptyConfig", (), {}))
    #: True for objectives that distill a teacher into a few-step student (benchmarks train these)
    distillation: bool = True
    #: the k-step sampler the trained student is meant for (`AvgVelocityField.sampler`), set on the student
    student_sampler: str = "avg_velocity"

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg):
        super().__init__()
        spec = self.sampler_spec(cfg, 0, teacher)
        if spec != SamplerSpec():
            # the attributes the samplers read, on any student module (tests train plain nn.Modules too); prediction
            # types that change from stage to stage are the objective's to switch while it trains
            AvgVelocityField.set_sampler_spec(student, dataclasses.replace(spec, prediction_type=None))
        self.student = student
        self.teacher = teacher
        self.cfg = cfg
        self.generator: torch.Generator | None = None

    @classmethod
    def exports_one_step_only(cls, cfg, vp_teacher: bool) -> str | None:
        """Why a student trained with options `cfg` exports `--steps 1` only, in every format (None: any k).
        `vp_teacher`: the teacher is a discrete VP model (unet, stable_diffusion, sdxl)."""
        if cls.student_sampler != "avg_velocity":
            # the consistency sampler re-noises with fresh noise between steps, which no deterministic pipeline does
            return (f"this student samples with the {cls.student_sampler} sampler, whose steps re-noise with fresh "
                    f"noise; only --steps 1 (the same single step) exports exactly, in every format")
        return None

    @classmethod
    def reads_data(cls, cfg) -> bool:
        """Whether the loss reads the data batch's samples (False: it only takes their shape, so prompts or class
        labels need no images or teacher samples behind them)."""
        return True

    @staticmethod
    def check_config(cfg, teacher=...) -> None:
        """Raise ConfigError for bad options. `teacher` is `...` when only the config is known
        (checked at load time, before any model is built) and the teacher or None afterwards."""

    @classmethod
    def sampler_spec(cls, cfg, steps_done: int = 0, teacher=None) -> SamplerSpec:
        """How a student trained with options `cfg` samples after `steps_done` training steps (`teacher`: for the
        grids and output readings it defines). Set on the student when the objective is built, stored by every
        checkpoint (sampler.json) and applied by `onestep.runs.load_student` to checkpoints written before that
        file existed; the student's own scales stay as built. Default: `student_sampler` on its own grid."""
        consistency = cls.student_sampler == "consistency"
        return SamplerSpec(kind=cls.student_sampler, grid="consistency" if consistency else "uniform")

    @classmethod
    def smoke_options(cls, options: dict) -> dict:
        """Objective options (of the recipe's `objective` section, `options`) that `--smoke` overrides so that a
        few training steps reach every optimizer group, e.g. Lightning's stage lengths. Default: none."""
        return {}

    def milestones(self) -> list[int]:
        """Training steps whose checkpoints the trainer always writes and never prunes, besides its
        `checkpoint_every` / `keep_checkpoints` ones (e.g. the end of each Lightning stage). Default: none."""
        return []

    # --- contract -------------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"student": [p for p in self.student.parameters() if p.requires_grad]}

    def default_optim(self, group: str) -> OptimDefaults:
        return OptimDefaults()

    # --- who updates when (two-player objectives: see UpdateSchedule) ---------------------------
    @classmethod
    def update_schedule(cls, cfg) -> UpdateSchedule | None:
        """The generator/critic schedule of this config; None: the student is the only player (the default)."""
        return None

    @classmethod
    def players(cls, cfg, step: int) -> tuple[str, ...]:
        """Which players (GENERATOR, CRITIC) update at training step `step`."""
        schedule = cls.update_schedule(cfg)
        return (GENERATOR,) if schedule is None else schedule.players(step)

    @classmethod
    def critic_groups(cls, cfg) -> list[str]:
        """The optimizer groups of the critic player under this config (the generator's is "student")."""
        return []

    @classmethod
    def scheduled_groups(cls, cfg, step: int) -> list[str]:
        """The optimizer groups that step at training step `step`, from the config alone."""
        players = cls.players(cfg, step)
        return (["student"] if GENERATOR in players else []) + (cls.critic_groups(cfg) if CRITIC in players else [])

    def active_groups(self, step: int) -> list[str]:
        """What the trainer asks at every step."""
        return self.scheduled_groups(self.cfg, step)

    def loss(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        # the trainer calls the (possibly DDP-wrapped, autocast-wrapped) module, which lands here
        return self.loss(batch, step)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond=None, steps: int = 1, times=None) -> torch.Tensor:
        return self.student.sample(noise, cond, steps=steps, times=times)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint must hold: the student and the auxiliary nets, not the frozen teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    # --- randomness from the objective's generator ------------------------------------------
    # Per-sample draws (first dimension = this process's batch) are drawn for the *global* batch from
    # a generator seeded alike on every process, and each process keeps its own slice: N processes with
    # batch B then see exactly the draws of one process with batch N * B (the trainer shards data alike).
    #: (process index, number of processes), set by the trainer
    shard: tuple[int, int] = (0, 1)

    def _gen(self) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)
        return self.generator

    def _per_sample(self, draw, shape, device) -> torch.Tensor:
        rank, world = self.shard
        n = shape[0]
        full = draw((n * world, *shape[1:]))   # on the CPU generator, then moved: same numbers on every device
        return full[rank * n:(rank + 1) * n].to(device)

    def rand(self, *shape, device=None) -> torch.Tensor:
        return self._per_sample(lambda s: torch.rand(s, generator=self._gen(), dtype=torch.float32), shape, device)

    def randn(self, *shape, device=None) -> torch.Tensor:
        return self._per_sample(lambda s: torch.randn(s, generator=self._gen(), dtype=torch.float32), shape, device)

    def randint(self, high: int, n: int, device=None) -> torch.Tensor:
        return self._per_sample(lambda s: torch.randint(high, s, generator=self._gen()), (n,), device)


def logit_normal(n: int, mu: float, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """sigmoid(mu + sigma * z) for given standard-normal draws z (shape [n])."""
    return torch.sigmoid(mu + sigma * noise[:n])


def anchor_tensor(cfg) -> torch.Tensor:
    """`cfg.anchor_intervals` as a [k, 2] tensor of (r, t) rows, after checking them (ConfigError)."""
    if not 0.0 <= cfg.anchor_share <= 1.0:
        raise ConfigError(f"objective.anchor_share must be in [0, 1], got {cfg.anchor_share}")
    pairs = cfg.anchor_intervals
    if not pairs or any(len(p) != 2 or not 0 <= p[0] < p[1] <= 1 for p in pairs):
        raise ConfigError(f"objective.anchor_intervals must be [r, t] pairs with 0 <= r < t <= 1, got {pairs}")
    return torch.tensor(pairs, dtype=torch.float32).reshape(-1, 2)


def sample_intervals(obj: Objective, n: int, *, sampler: str, mu: float, sigma: float, p_equal: float,
                     anchors: torch.Tensor | None = None, anchor_share: float = 0.0,
                     r_mu: float | None = None, r_sigma: float | None = None):
    """(r, t, is_equal) for average-velocity objectives (MeanFlow, SplitMeanFlow), drawn from `obj`'s generator.

    * "logit_normal": two draws from sigmoid(N(mu, sigma)), t = max, r = min (MeanFlow's sampler); with
      `r_mu`/`r_sigma`, t ~ LN(mu, sigma) and r = min(t, LN(r_mu, r_sigma)) (MeanFlow's improved CIFAR one);
    * "uniform": two uniform draws, t = max, r = min.
    With probability `p_equal` a sample gets r = t (a flow-matching sample). A share `anchor_share` of the
    others is moved onto one of `anchors` ([k, 2] rows of (r, t)), e.g. the one-step interval (0, 1).
    """
    if sampler == "logit_normal":
        a = logit_normal(n, mu, sigma, obj.randn(n))
        b = logit_normal(n, mu, sigma, obj.randn(n)) if r_mu is None else \
            logit_normal(n, r_mu, sigma if r_sigma is None else r_sigma, obj.randn(n))
    else:
        a, b = obj.rand(n), obj.rand(n)
    t, r = (torch.maximum(a, b), torch.minimum(a, b)) if r_mu is None else (a, torch.minimum(a, b))
    is_equal = obj.rand(n) < p_equal
    r = torch.where(is_equal, t, r)
    if anchors is not None and anchor_share > 0:
        # anchors replace (r, t) of interval samples only; r = t samples keep their own t
        is_anchor = (obj.rand(n) < anchor_share) & ~is_equal
        anchor = anchors.cpu()[obj.randint(len(anchors), n)]
        r = torch.where(is_anchor, anchor[:, 0], r)
        t = torch.where(is_anchor, anchor[:, 1], t)
    return r, t, is_equal


def at_least_one_row(index: torch.Tensor) -> torch.Tensor:
    """`index` (row numbers of a subset of the batch), or row 0 if it is empty.

    Objectives that compute targets on subsets (boundary vs consistency samples) call their networks even for an
    empty subset, on this stand-in row, and drop the result: processes that shard a network (FSDP) gather its
    parameters in every forward, so all of them must make the same calls whatever their own samples drew, and
    diffusers' attention cannot take an empty batch."""
    return index if len(index) else torch.zeros(1, dtype=index.dtype, device=index.device)


def autocast_off(device: torch.device):
    """Autocast switched off on `device`'s type: JVPs and loss arithmetic run in fp32 whatever the trainer's mixed
    precision."""
    return torch.autocast(device_type=device.type if device.type in ("cuda", "cpu", "xpu") else "cpu", enabled=False)


@contextlib.contextmanager
def frozen_eval(module: nn.Module):
    """Target passes: eval mode (no dropout) and no autocast, restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            # the module may have no parameters (analytic teachers): switch autocast off everywhere
            stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
            yield
    finally:
        module.train(was_training)
