"""What the distribution-matching objectives (f-distill, SMT/SMD, rCM) share.

* The one-step generator is the student used at (r, t) = (0, 1): G(z) = z - u(z, 0, 1).
* Noise levels: "uniform" flow time in [lo, hi], or the EDM Karras grid (rho = 7, sigma in
  [0.002, 80], 1000 levels) with the level index uniform in [lo, hi] of the grid (DMD2's 2 %..98 %),
  mapped to flow time t = sigma / (1 + sigma). Both return the sampled coordinate in [0, 1] (t itself,
  or the grid position), which is what f-distill's noise-level bins cut into equal parts.
* Everything is computed in x0 space, which needs no time convention: the denoiser E[x0 | x_t] of a
  flow-time velocity net is x_t - t v, and it is the same function as the EDM denoiser D(x, sigma)
  at sigma = t / (1 - t). Score differences follow: s_p - s_q = (1 - t) (D_p - D_q) / t^2.
* Generator losses use the pseudo-target form 1/2 mean ||x - sg[x - g]||^2, whose gradient with
  respect to x is g / (number of elements).
* Global statistics (f-distill's mean of h, its per-bin ratio means) are sums over *all* processes'
  samples. `global_sum` all-reduces through torch.distributed, which accelerate initialises for every
  multi-process backend it launches (DDP, FSDP, DeepSpeed on CPU/GPU); the trainer's `shard`
  (process index, number of processes) says whether there is anything to reduce. Every process must
  make the same calls in the same order, so the number of reductions never depends on the data.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from onestep.objectives.base import frozen_eval
from torch import nn

from onestep import paths


def one_step_generate(student: nn.Module, z: torch.Tensor, cond=None) -> torch.Tensor:
    """G(z) = z - u(z, 0, 1): the student's one-step sampler, with gradient."""
    n = z.shape[0]
    r = torch.zeros(n, device=z.device, dtype=z.dtype)
    t = torch.ones(n, device=z.device, dtype=z.dtype)
    return z - student(z, r, t, cond)


def velocity_net_x0(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """E[x0 | x_t] of a velocity network net(x, r, t) used at r = t."""
    return paths.velocity_to_x0(x_t, t, net(x_t, t, t, cond).to(x_t.dtype))


def karras_sigmas(levels: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The EDM grid, ascending: sigma_i = (smin^(1/rho) + i/(L-1) (smax^(1/rho) - smin^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, levels, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def sample_noise_levels(obj, n: int, sampler: str, span: Sequence[float], grid: torch.Tensor | None = None,
                        device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, coordinate) per sample, one uniform draw from `obj`'s generator each.

    "uniform": t ~ U(lo, hi) and the coordinate is t. "karras": the level index is uniform on the
    integers in [lo L, hi L] (clipped to the grid), t = sigma / (1 + sigma), coordinate = index / (L - 1).
    """
    lo, hi = float(span[0]), float(span[1])
    u = obj.rand(n)
    if sampler == "uniform":
        t = lo + (hi - lo) * u
        return t.to(device), t.to(device)
    levels = grid.shape[0]
    first, last = int(lo * levels), min(int(hi * levels), levels - 1)
    index = (first + (u * (last - first + 1)).floor().long()).clamp(first, last)
    sigma = grid[index]
    t = (sigma / (1 + sigma)).to(torch.float32)
    return t.to(device), (index.float() / (levels - 1)).to(device)


def pseudo_target_loss(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """1/2 mean ||x - sg[x - g]||^2: its gradient with respect to x is g / x.numel()."""
    x = x.to(g.dtype)
    return 0.5 * (x - (x - g).detach()).pow(2).mean()


# --- across processes --------------------------------------------------------------------------

def _distributed(obj) -> bool:
    if obj.shard[1] <= 1:
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"{type(obj).__name__} runs as process {obj.shard[0]} of {obj.shard[1]} but "
                           "torch.distributed is not initialised: launch through accelerate")
    return True


def global_sum(obj, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over all processes (one all-reduce for all of them); unchanged in one process.
    No gradient flows through the result (it is only used for detached statistics)."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    if _distributed(obj):
        flat = flat.clone()
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return out


def global_mean(obj, values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the global batch (all processes' samples)."""
    total, count = global_sum(obj, values.sum(), torch.tensor(float(values.numel()), device=values.device))
    return total / count


# --- networks ----------------------------------------------------------------------------------

def trainable_copy_of_backbone(teacher, student: nn.Module) -> nn.Module:
    """A trainable velocity network net(x, r, t, cond), used at r = t, that starts equal to the teacher.

    onestep's own velocity nets (the digits UNet, MLPs) are copied as they are; any other adapter's
    backbone (a raw diffusers model) gets the teacher's student wrapper (`student_from_teacher`), which
    runs the copy through the adapter's own conversion to flow time and whose interval embedding is zero
    at r = t. Analytic teachers have no backbone: then a copy of the student's architecture and weights."""
    from onestep.student import AvgVelocityUNet, MLPAvgVelocity, student_from_teacher

    backbone = teacher.backbone() if teacher is not None else None
    if backbone is None:
        net = copy.deepcopy(student)
    elif isinstance(backbone, (AvgVelocityUNet, MLPAvgVelocity)):
        net = copy.deepcopy(backbone)
    else:
        net = student_from_teacher(teacher)
    net.requires_grad_(True)
    return net.train()


def call_with_frozen_parameters(module: nn.Module, *args, **kwargs):
    """module(*args) with its parameters detached: gradients reach the inputs, never the parameters.

    Used for critics inside a generator step (critics stay frozen while the student trains). The
    parameters are then not in the autograd graph at all, so DDP counts them as unused in that step
    instead of waiting for gradients that the trainer's backward(inputs=...) never computes.
    """
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        # sharded (FSDP): the module gathers its own parameters in every forward, which swapping them would undo;
        # it runs as it is and the trainer drops the gradients its parameters get from another group's loss
        return module(*args, **kwargs)
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args, kwargs)


def sample_shape_of(teacher, student: nn.Module) -> tuple[int, ...]:
    """The shape of one sample: the teacher's, or (no teacher) what the student's backbone takes."""
    from onestep.student import AvgVelocityUNet, MLPAvgVelocity

    if teacher is not None:
        return tuple(teacher.sample_shape)
    if isinstance(student, AvgVelocityUNet):
        size = student.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (student.unet.config.in_channels, *size)
    if isinstance(student, MLPAvgVelocity):
        return (student.inp.in_features,)
    raise ValueError(f"cannot tell the sample shape of a {type(student).__name__} student without a teacher")


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


# --- DMD (reverse KL) pieces: f-distill and rCM ---------------------------------------------------

class DMDLoss:
    """DMD's reverse-KL pieces on an objective that owns `student`, `teacher`, `fake_score` (a velocity net used at
    r = t), draws from its generator, has `sample_times(n, span, device) -> (t, coordinate)` and options
    `cfg.guidance` (the teacher's CFG scale for D_T) and `cfg.dmd_normalizer` (w below; off: w = 1), read at each
    call. Shared by
    f-distill (which reweights the direction per sample by h(r)) and rCM (h = 1). Holds no parameters: the fake
    score stays the objective's own submodule, so checkpoints keep their keys.

        x = G(z),  x_t = (1 - t) x + t eps                     (one draw of z, t, eps each)
        g = (D_phi(x_t) - D_T(x_t)) w h,  w = 1 / (mean_dims |x - D_T| + 1e-6)   (no gradient)
        L_G = 1/2 mean ||x - sg[x - g]||^2                    (gradient g / numel with respect to x)
        L_phi = mean ||v_phi(sg[x]_t, t) - (eps - sg[x])||^2  (the fake score's flow-matching loss)
    """

    def __init__(self, objective: nn.Module):
        self.objective = objective

    def teacher_x0(self, x_t, t, cond=None):
        with frozen_eval(self.objective.teacher):
            return self.objective.teacher.x0(x_t, t, cond, self.objective.cfg.guidance)

    def fake_x0(self, x_t, t, cond=None):
        with frozen_eval(self.objective.fake_score):
            return velocity_net_x0(self.objective.fake_score, x_t, t, cond)

    def generator_sample(self, like: torch.Tensor, cond, span):
        """(x = G(z) with gradient, x_t, t, coordinate): z, t and eps drawn in this order, in `like`'s dtype."""
        obj, n, dev, dt = self.objective, like.shape[0], like.device, like.dtype
        z = obj.randn(*like.shape, device=dev).to(dt)
        x = one_step_generate(obj.student, z, cond)
        t, coord = obj.sample_times(n, span, dev)
        t = t.to(dt)
        eps = obj.randn(*like.shape, device=dev).to(dt)
        return x, paths.interpolate(x, eps, t), t, coord

    def direction(self, x: torch.Tensor, d_teacher: torch.Tensor, d_fake: torch.Tensor,
                  h: torch.Tensor | None = None) -> torch.Tensor:
        """g = (D_phi - D_T) w h, in D_T's dtype, without gradient (h None: 1)."""
        with torch.no_grad():
            acc = d_teacher.dtype
            x_acc = x.detach().to(acc)
            ones = torch.ones(x.shape[0], device=x.device, dtype=acc) if h is None else torch.ones_like(h)
            w = 1 / ((x_acc - d_teacher).abs().flatten(1).mean(1) + 1e-6) if self.objective.cfg.dmd_normalizer else ones
            scale = w if h is None else w * h.to(acc)
            return torch.nan_to_num((d_fake - d_teacher) * paths.expand_like(scale, x_acc))

    def generator_loss(self, like: torch.Tensor, cond, span) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_G, x) of the plain reverse KL (h = 1): the DMD generator loss on one-step samples."""
        acc = torch.promote_types(like.dtype, torch.float32)
        x, x_t, t, _ = self.generator_sample(like, cond, span)
        x_target, t_acc = x_t.detach().to(acc), t.to(acc)
        d_teacher = self.teacher_x0(x_target, t_acc, cond).to(acc)
        d_fake = self.fake_x0(x_target, t_acc, cond).to(acc)
        return pseudo_target_loss(x, self.direction(x, d_teacher, d_fake)), x

    def fake_score_loss(self, like: torch.Tensor, cond, span):
        """(L_phi, x_t, t) on a fresh detached one-step sample: z, t and eps drawn in this order."""
        obj, n, dev, dt = self.objective, like.shape[0], like.device, like.dtype
        acc = torch.promote_types(dt, torch.float32)
        z = obj.randn(*like.shape, device=dev).to(dt)
        with torch.no_grad():
            x_fake = one_step_generate(obj.student, z, cond)
        t, _ = obj.sample_times(n, span, dev)
        t = t.to(dt)
        eps = obj.randn(*like.shape, device=dev).to(dt)
        x_t = paths.interpolate(x_fake, eps, t)
        v = obj.fake_score(x_t, t, t, cond)
        return (v.to(acc) - (eps - x_fake).to(acc)).pow(2).mean(), x_t, t
