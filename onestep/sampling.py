"""Samplers in flow time (t = 1 is noise, t = 0 is data).

Two families:
* ODE solvers for a velocity field v(x, t) (teachers): Euler and Heun on a time grid 1 -> 0;
* the k-step sampler of an average-velocity field u(z, r, t) (students): z_r = z_t - (t - r) u(z_t, r, t).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, ClassVar, Sequence

import torch

from onestep.paths import batch_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AvgVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SOLVERS = ("euler", "heun")


def time_grid(steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform grid 1 = t_0 > t_1 > ... > t_steps = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)


@torch.no_grad()
def solve_ode(velocity: VelocityFn, noise: torch.Tensor, steps: int = 50, solver: str = "euler",
              times: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = times[0] (noise) to times[-1] (data).

    Heun's last step to t = 0 is an Euler step (as in EDM): the second evaluation would sit at t = 0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    grid = (time_grid(steps, noise.device, torch.float64) if times is None
            else torch.as_tensor(times, dtype=torch.float64))
    x = noise
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h = t_next - t_cur
        v = velocity(x, batch_time(t_cur, x))
        x_euler = x + h * v
        if solver == "heun" and t_next > 0:
            v_next = velocity(x_euler, batch_time(t_next, x))
            x = x + h * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


@torch.no_grad()
def sample_avg_velocity(avg_velocity: AvgVelocityFn, noise: torch.Tensor, steps: int = 1,
                        times: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """k-step sampler of an average-velocity field: z_{k+1} = z_k - (t_k - t_{k+1}) u(z_k, t_{k+1}, t_k).

    One step is x0 = eps - u(eps, 0, 1). With the exact u this reproduces the exact flow map for any grid.
    """
    grid = (time_grid(steps, noise.device, torch.float64) if times is None
            else torch.as_tensor(times, dtype=torch.float64))
    z = noise
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        u = avg_velocity(z, batch_time(t_next, z), batch_time(t_cur, z))
        z = z - (t_cur - t_next) * u
    return z


@torch.no_grad()
def sample_consistency(avg_velocity: AvgVelocityFn, noise: torch.Tensor, steps: int = 1,
                       times: Sequence[float] | torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The multi-step consistency sampler (sCM) in flow time.

    At each grid time t_i the student jumps to the data, x0 = z - t_i u(z, 0, t_i) (its consistency
    function), and the next point is re-noised with fresh noise: z = (1 - t_{i+1}) x0 + t_{i+1} eps_i
    (TrigFlow's cos s' x0 + sin s' z_i in flow coordinates). One step is x0 = eps - u(eps, 0, 1), the same
    as the average-velocity sampler. Default grid: `onestep.trigflow.consistency_times(steps)`. The fresh
    noise comes from `generator` (default: seeded with 0, so evaluation is reproducible).
    """
    from onestep.trigflow import consistency_times

    grid = torch.as_tensor(consistency_times(steps) if times is None else times, dtype=torch.float64)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    z = noise
    for i in range(len(grid) - 1):
        t_cur, t_next = float(grid[i]), float(grid[i + 1])
        x0 = z - t_cur * avg_velocity(z, batch_time(0.0, z), batch_time(t_cur, z))
        if t_next <= 0:
            return x0
        eps = torch.randn(noise.shape, generator=gen, dtype=torch.float32).to(noise.device, noise.dtype)
        z = (1 - t_next) * x0 + t_next * eps
    return z


@dataclass(frozen=True)
class SamplerSpec:
    """How a trained student takes its k steps, as data: the objective returns it, the student carries it
    (`AvgVelocityField.sampler_spec` / `set_sampler_spec`), every checkpoint stores it as `sampler.json` and
    every export in its manifest, so a student loaded later samples as it was trained without its objective.

    kind: "avg_velocity" (z_r = z_t - (t - r) u(z_t, r, t), deterministic) or "consistency" (x0 = z_t - t
    u(z_t, 0, t), re-noised to the next time). grid: the default k-step times: "uniform", "consistency"
    (`onestep.trigflow.consistency_times` with the two consistency options) or "trailing" (the trailing
    timestep grid of the discrete VP schedule `alphas_cumprod`). prediction_type: for students of discrete
    VP teachers, how the backbone's output is read ("epsilon", "sample", "v_prediction"). interval_scale,
    time_scale: what the student's embeddings multiply t - r and t by.
    """

    FILE: ClassVar[str] = "sampler.json"
    KINDS: ClassVar[tuple[str, ...]] = ("avg_velocity", "consistency")
    GRIDS: ClassVar[tuple[str, ...]] = ("uniform", "consistency", "trailing")

    kind: str = "avg_velocity"
    grid: str = "uniform"
    consistency_data_std: float = 1.0
    consistency_intermediate: float = 1.3
    alphas_cumprod: tuple[float, ...] | None = None
    prediction_type: str | None = None
    interval_scale: float | None = None
    time_scale: float | None = None

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"sampler kind must be one of {', '.join(self.KINDS)}, got {self.kind!r}")
        if self.grid not in self.GRIDS:
            raise ValueError(f"sampler grid must be one of {', '.join(self.GRIDS)}, got {self.grid!r}")
        if (self.grid == "trailing") != (self.alphas_cumprod is not None):
            raise ValueError("a trailing grid needs alphas_cumprod, and only a trailing grid takes them")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SamplerSpec":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown sampler spec keys: {', '.join(unknown)}")
        values = dict(values)
        if values.get("alphas_cumprod") is not None:
            values["alphas_cumprod"] = tuple(float(a) for a in values["alphas_cumprod"])
        return cls(**values)
