"""Students: every student is an average-velocity field u(z, r, t, cond) in flow time.

z_r = z_t - (t - r) u(z_t, r, t); one step is x0 = eps - u(eps, 0, 1); u(z, t, t) is the
instantaneous velocity v(z, t), so a flow-matching model is the same object used only at r = t.

The interval t - r gets a second time embedding whose last layer is zero-initialised: a student built
from a teacher is *exactly* that teacher at step 0 (u(z, t, t) = v_teacher(z, t)).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from onestep import paths
from onestep.sampling import SamplerSpec, sample_avg_velocity


class AvgVelocityField(nn.Module):
    """Base for students: forward(z, r, t, cond) -> u; velocity(); the k-step sampler."""

    #: how `sample` takes k steps: "avg_velocity" (z_r = z_t - (t - r) u, deterministic) or "consistency"
    #: (jump to the data with u(z, 0, t), re-noise; consistency-trained students, e.g. sCM). The objective
    #: that trains a student sets it (Objective.student_sampler).
    sampler: str = "avg_velocity"
    #: the grid `sample` takes when given no `times`: None for the sampler's own (uniform for "avg_velocity"),
    #: or a discrete VP schedule (onestep.paths.DiscreteVPSchedule) whose trailing grid the student was
    #: trained on (Lightning with VP teachers: Lightning sets it, and its sampler_spec on students
    #: rebuilt from its checkpoints), so evaluation, export and benchmarks sample the trained grid.
    trailing_schedule = None
    #: the "consistency" sampler's grid, onestep.trigflow.consistency_times(steps, data_std, intermediate):
    #: the sCM objectives set them from objective.sampler_data_std / sampler_intermediate
    consistency_data_std: float = 1.0
    consistency_intermediate: float = 1.3

    def velocity(self, z, t, cond=None):
        return self(z, t, t, cond)

    def default_times(self, steps: int) -> torch.Tensor | None:
        """The `steps`-step grid `sample` takes by default (None: the sampler's own)."""
        if self.trailing_schedule is not None:
            return self.trailing_schedule.trailing_grid(steps)
        if self.sampler == "consistency":
            from onestep.trigflow import consistency_times

            grid = consistency_times(steps, self.consistency_data_std, self.consistency_intermediate)
            return torch.tensor(grid, dtype=torch.float64)
        return None

    def sampler_spec(self) -> SamplerSpec:
        """How this student samples, as a serialisable `SamplerSpec`."""
        consistency = self.sampler == "consistency"
        schedule = self.trailing_schedule
        return SamplerSpec(
            kind=self.sampler,
            grid="trailing" if schedule is not None else "consistency" if consistency else "uniform",
            consistency_data_std=float(self.consistency_data_std),
            consistency_intermediate=float(self.consistency_intermediate),
            alphas_cumprod=None if schedule is None else tuple(schedule.alphas_cumprod.tolist()),
            prediction_type=getattr(self, "prediction_type", None),
            interval_scale=_optional_float(getattr(self, "interval_scale", None)),
            time_scale=_optional_float(getattr(self, "time_scale", None)))

    def set_sampler_spec(self, spec: SamplerSpec) -> None:
        """Sample as `spec` says from now on (its scales and prediction type only where given)."""
        self.sampler = spec.kind
        self.consistency_data_std = spec.consistency_data_std
        self.consistency_intermediate = spec.consistency_intermediate
        self.trailing_schedule = None if spec.alphas_cumprod is None else paths.DiscreteVPSchedule(
            torch.tensor(spec.alphas_cumprod, dtype=torch.float64))
        if spec.prediction_type is not None and getattr(self, "prediction_type", None) != spec.prediction_type:
            self.set_prediction_type(spec.prediction_type)
        for scale in ("interval_scale", "time_scale"):
            if getattr(spec, scale) is not None and getattr(self, scale, None) is not None:
                setattr(self, scale, getattr(spec, scale))

    def sampler_description(self) -> str:
        """What `sample` does without `times`, in words, for evaluation records."""
        if self.sampler == "consistency":
            update = "consistency: x0 = z_t - t u(z_t, 0, t), re-noised to the next time (fixed noise seed 0)"
            grid = (f"consistency_times grid (data_std {self.consistency_data_std:g}, "
                    f"2-step intermediate {self.consistency_intermediate:g})")
        else:
            update, grid = "z_r = z_t - (t - r) u(z_t, r, t)", "uniform grid"
        if self.trailing_schedule is not None:
            grid = "the teacher's trailing VP grid"
        return f"{update}, {grid}"

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond=None, steps: int = 1,
               times: Sequence[float] | None = None) -> torch.Tensor:
        times = self.default_times(steps) if times is None else times
        if self.sampler == "consistency":
            from onestep.sampling import sample_consistency

            return sample_consistency(lambda z, r, t: self(z, r, t, cond), noise, steps=steps, times=times)
        return sample_avg_velocity(lambda z, r, t: self(z, r, t, cond), noise, steps=steps, times=times)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _cast_to_weight_dtype(module, args):
    return (args[0].to(module.linear_1.weight.dtype),) + tuple(args[1:])


class AvgVelocityUNet(AvgVelocityField):
    """A diffusers `UNet2DModel` as u(z, r, t): t is the UNet's timestep (x `time_scale`), and t - r enters
    through the UNet's own `class_embed_type="timestep"` embedding, which diffusers adds to the time
    embedding. A UNet without that embedding is a plain velocity model (only r = t is allowed).
    """

    def __init__(self, unet, time_scale: float = 1000.0, interval_scale: float | None = None):
        super().__init__()
        self.unet = unet
        self.time_scale = time_scale
        self.interval_scale = time_scale if interval_scale is None else interval_scale
        self.has_interval_embedding = unet.config.class_embed_type == "timestep"
        if self.has_interval_embedding:
            # diffusers casts the time embedding's sinusoids to the model dtype but not the class
            # embedding's: without this cast a float64/bf16 (non-autocast) student fails in its Linear
            unet.class_embedding.register_forward_pre_hook(_cast_to_weight_dtype)

    def forward(self, z, r, t, cond=None):
        if cond is not None:
            raise ValueError("AvgVelocityUNet is unconditional; got a condition")
        class_labels = None
        if self.has_interval_embedding:
            class_labels = (t - r) * self.interval_scale
        elif r is not t and not torch.equal(r, t):
            raise ValueError("this UNet has no interval embedding: it is a velocity model, so r must equal t")
        return self.unet(z, t * self.time_scale, class_labels=class_labels).sample

    @torch.no_grad()
    def smooth_time_embedding(self, sigma: float) -> "AvgVelocityUNet":
        """Replace the time embeddings by their average over a Gaussian jitter of t (std `sigma`, flow time).

        The UNet's sinusoids of s = scale * t average to E[sin(w (s + d))] = exp(-w^2 d_s^2 / 2) sin(w s)
        (cos alike) for d ~ N(0, d_s^2), d_s = scale * sigma: each frequency's column of the first Linear
        after the projection is scaled by that factor, in the weights, so the student stays a stock
        diffusers UNet. Why: embedded as 1000 t, the channels up to 1000 rad per unit of flow time carry a
        fine-scale jitter that is harmless to the output but dominates d/dt, which MeanFlow's and sCM's
        JVPs differentiate (benchmarks/time_smoothing.py measures both effects on the digits teacher).
        The interval embedding (t - r at `interval_scale`) is averaged alike.
        """
        proj = self.unet.time_proj
        half = proj.num_channels // 2
        # diffusers' get_timestep_embedding: frequencies scale * exp(-ln(10000) i / (half - shift))
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - proj.downscale_freq_shift)
        freqs = proj.scale * exponent.exp()
        layers = [(self.unet.time_embedding.linear_1, self.time_scale)]
        if self.has_interval_embedding:
            layers.append((self.unet.class_embedding.linear_1, self.interval_scale))
        for linear, scale in layers:
            damping = torch.exp(-0.5 * (freqs * scale * sigma) ** 2)
            damping = torch.cat([damping, damping, torch.ones(proj.num_channels % 2, dtype=torch.float64)])
            linear.weight.mul_(damping.to(linear.weight)[None, :])  # sin and cos halves share the frequencies
        return self

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int = 1, times=None):
        if self.has_interval_embedding:
            return super().sample(noise, cond, steps=steps, times=times)
        # a plain velocity model: u(z, r, t) ~ v(z, t) is the Euler step
        from onestep.sampling import solve_ode

        return solve_ode(lambda z, t: self(z, t, t, cond), noise, steps=steps,
                         times=self.default_times(steps) if times is None else times)

    @classmethod
    def from_velocity_unet(cls, unet, time_scale: float = 1000.0,
                           interval_scale: float | None = None) -> "AvgVelocityUNet":
        """Copy a velocity UNet and add a zero-initialised embedding of t - r."""
        # `_use_default_values` would reset class_embed_type to its default: drop it
        config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
        config["class_embed_type"] = "timestep"
        student = type(unet).from_config(config).to(unet.device)
        if student.dtype != unet.dtype:  # only then: diffusers warns on every model.to(dtype)
            student = student.to(dtype=unet.dtype)
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any(not k.startswith("class_embedding.") for k in missing):
            raise ValueError(f"backbone mismatch: missing {missing}, unexpected {unexpected}")
        nn.init.zeros_(student.class_embedding.linear_2.weight)
        nn.init.zeros_(student.class_embedding.linear_2.bias)
        return cls(student, time_scale, interval_scale)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPAvgVelocity(AvgVelocityField):
    """u(z, r, t, label) for vector data (the Gaussian-mixture toys): an MLP on [z, emb(t), emb(t - r)].

    With `num_classes`, a label embedding is added; the label NULL_LABEL (-1) is the null condition of CFG.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, emb_dim: int = 32, time_scale: float = 1000.0,
                 num_classes: int | None = None, interval_scale: float | None = None):
        super().__init__()
        self.emb_dim, self.time_scale, self.num_classes = emb_dim, time_scale, num_classes
        self.interval_scale = time_scale if interval_scale is None else interval_scale
        # row `num_classes` is the null label
        self.label_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.t_embed = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.interval_embed = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.interval_embed[-1].weight)
        nn.init.zeros_(self.interval_embed[-1].bias)
        self.inp = nn.Linear(dim, hidden)
        layers = []
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, z, r, t, cond=None):
        e_t = sinusoidal_embedding(t * self.time_scale, self.emb_dim)
        e_d = sinusoidal_embedding((t - r) * self.interval_scale, self.emb_dim)
        h = self.inp(z) + self.t_embed(e_t) + self.interval_embed(e_d)
        if self.label_embed is not None:
            if cond is None:
                raise ValueError("this student is class-conditional: pass labels (-1 for the null condition)")
            h = h + self.label_embed(torch.where(cond < 0, self.num_classes, cond))
        elif cond is not None:
            raise ValueError("this student is unconditional; got a condition")
        return self.body(h)


#: where diffusers backbones embed their timestep: the module whose [B, D] output the interval embedding
#: is added to. The match with the shortest prefix wins (a wrapper may add one, e.g. EDM's "unet.").
TIME_EMBEDDING_NAMES = (
    "time_embedding",                # UNet2DModel, UNet2DConditionModel (TimestepEmbedding, or nn.Embedding
                                     # for learned timesteps); the class / SDXL text-time embeddings add to it
    "time_text_embed",               # SD3, FLUX: timestep (+ guidance) embedding + pooled text projection
    "time_embed.emb",                # SANA: AdaLayerNormSingle's embedder, before the 6-way modulation
    "time_embed.timestep_embedder",  # SANA with guidance_embeds: the timestep part of the time + guidance sum
)


def find_time_embedding(network: nn.Module) -> str:
    """The dotted name of `network`'s time-embedding module (see TIME_EMBEDDING_NAMES)."""
    hits = []
    for name, _ in network.named_modules():
        for rank, known in enumerate(TIME_EMBEDDING_NAMES):
            if name == known or name.endswith("." + known):
                hits.append((name.count(".") - known.count("."), rank, name))
    if not hits:
        raise ValueError(f"no time embedding found in {type(network).__name__} (looked for modules named "
                         f"{', '.join(TIME_EMBEDDING_NAMES)}); name it with time_embedding=...")
    return min(hits)[2]


def _embedding_width(module: nn.Module) -> int:
    """The width D of the [B, D] time embedding a module returns."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    for name in ("linear_2", "timestep_embedder.linear_2"):  # diffusers' TimestepEmbedding and its combinations
        try:
            return module.get_submodule(name).out_features
        except AttributeError:
            pass
    raise ValueError(f"cannot tell the output width of the time embedding {type(module).__name__}")


class IntervalEmbedding(nn.Module):
    """MLP(sinusoid(s)) for the scaled interval s = interval_scale (t - r): [B] -> [B, width].

    The last layer starts at zero, so until it is trained it adds nothing to the time embedding.
    """

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.linear_1 = nn.Linear(frequencies, width)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(width, width)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, scaled_interval: torch.Tensor) -> torch.Tensor:
        # sinusoids of values up to ~1000 need at least float32, whatever the weights' dtype
        s = scaled_interval.to(torch.promote_types(scaled_interval.dtype, torch.float32))
        e = sinusoidal_embedding(s, self.frequencies).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(e)))


def _add_to_output(extra: torch.Tensor):
    def hook(module, args, output):
        if not isinstance(output, torch.Tensor) or output.shape != extra.shape:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise RuntimeError(f"{type(module).__name__} returned {got}; the interval embedding is "
                               f"{tuple(extra.shape)}: not a [batch, width] time embedding")
        return output + extra.to(output.dtype)
    return hook


class TeacherStudent(AvgVelocityField):
    """u(z, r, t, cond) from any teacher adapter with a backbone: a trainable copy of the backbone, run
    through the adapter's own `_velocity` (so the conversion to flow time lives only in the adapter), with
    `interval_embedding(interval_scale (t - r))` added to the backbone's time embedding.

    The addition is a forward hook registered at the start of every `forward` and removed at its end: the
    backbone called any other way (features, a fake-score copy) is the plain network, and no hook is
    left for deepcopy or state_dict to see. The adapter clone (`adapter`) is not a submodule: its frozen
    VAE and text encoders stay the teacher's, out of `parameters()`, `state_dict()` and deep copies.
    """

    def __init__(self, teacher, interval_scale: float | None = None, time_embedding: str | None = None):
        super().__init__()
        own = teacher.backbone()
        if own is None:
            raise ValueError(f"{type(teacher).__name__} has no backbone to initialise a student from")
        self.backbone = copy.deepcopy(own).requires_grad_(True)
        self.time_embedding_name = time_embedding or find_time_embedding(self.backbone)
        width = _embedding_width(self.backbone.get_submodule(self.time_embedding_name))
        weight = next(self.backbone.parameters())
        self.interval_embedding = IntervalEmbedding(width).to(device=weight.device, dtype=weight.dtype)
        # a plain attribute, read at every call (a mixture-score net sets its own scale after construction)
        self.interval_scale = 1000.0 if interval_scale is None else float(interval_scale)
        self.sample_shape = tuple(teacher.sample_shape)
        self.num_classes = teacher.num_classes
        object.__setattr__(self, "_adapter", teacher.with_backbone(self.backbone))  # not a submodule

    @property
    def adapter(self):
        """The teacher adapter computing with this student's backbone (VAE, prompts, null condition)."""
        return self._adapter

    @property
    def prediction_type(self) -> str | None:
        """What the backbone's output is read as ("epsilon", "sample", "v_prediction") for students of
        discrete VP teachers; None for the others, whose adapters take the output as a velocity or
        precondition it themselves."""
        return getattr(getattr(self._adapter, "time", None), "prediction_type", None)

    def set_prediction_type(self, prediction_type: str) -> None:
        """Read the backbone's output as `prediction_type` from now on (copies made later inherit it).

        E.g. SDXL-Lightning's 1-step student predicts x0 where its eps teacher is ill-conditioned. The
        adapter clone gets a new time map; the teacher's (and those of earlier copies) stay as they are.
        """
        if self.prediction_type is None:
            raise ValueError(f"the student of a {type(self._adapter).__name__} has no prediction type to set: "
                             "only students of discrete VP teachers (unet, stable_diffusion, sdxl) have one")
        time = self._adapter.time
        if prediction_type != time.prediction_type:
            self._adapter.time = type(time)(time.scheduler_config, prediction_type)

    def forward(self, z, r, t, cond=None):
        t = paths.batch_time(t, z)
        r = paths.batch_time(r, z)
        extra = self.interval_embedding(self.interval_scale * (t - r))
        site = self.backbone.get_submodule(self.time_embedding_name)
        handle = site.register_forward_hook(_add_to_output(extra))
        try:
            return self._adapter._velocity(z, t, cond)
        finally:
            handle.remove()

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_adapter":
                new.__dict__[key] = copy.deepcopy(value, memo)
        # a new adapter clone around the copied backbone; its frozen modules stay shared
        object.__setattr__(new, "_adapter", self._adapter.with_backbone(new.backbone))
        return new


def student_from_teacher(teacher, interval_scale: float | None = None, time_scale: float | None = None,
                         interval_embedding: bool = True) -> AvgVelocityField:
    """The default student of a teacher: a copy of its backbone with the interval embedding added.

    The digits teacher keeps its AvgVelocityUNet (class_embed_type="timestep", which exported students
    rely on) and MLP teachers their MLP; every other adapter with a backbone gets a TeacherStudent.
    For AvgVelocityUNet backbones only: `time_scale` replaces the teacher's (None: keep it), and
    `interval_embedding=False` gives a trainable velocity copy, for fine-tuning the teacher itself
    (e.g. to a dense time embedding).
    """
    backbone = teacher.backbone()
    if backbone is None:
        raise ValueError(f"{type(teacher).__name__} has no backbone to initialise a student from")
    if isinstance(backbone, AvgVelocityUNet):
        time_scale = backbone.time_scale if time_scale is None else time_scale
        if not interval_embedding:
            return AvgVelocityUNet(copy.deepcopy(backbone.unet).requires_grad_(True), time_scale)
        return AvgVelocityUNet.from_velocity_unet(backbone.unet, time_scale, interval_scale)
    if isinstance(backbone, MLPAvgVelocity):
        student = copy.deepcopy(backbone).requires_grad_(True)  # teachers freeze their backbone
        # u(z, r, t) must not depend on r at init: fold the interval head's constant output at r = t (the
        # teacher's velocity) into the time embedding's bias, then zero the head
        with torch.no_grad():
            bias = student.t_embed[-1].bias
            zero = torch.zeros(1, device=bias.device, dtype=bias.dtype)
            bias.add_(student.interval_embed(sinusoidal_embedding(zero, student.emb_dim))[0])
        nn.init.zeros_(student.interval_embed[-1].weight)
        nn.init.zeros_(student.interval_embed[-1].bias)
        if interval_scale is not None:
            student.interval_scale = interval_scale
        return student
    if hasattr(teacher, "with_backbone"):  # the teacher adapters (unet, edm, SD, SDXL, SD3, FLUX, SANA)
        return TeacherStudent(teacher, interval_scale)
    raise ValueError(f"don't know how to build a student from a {type(backbone).__name__} backbone")
