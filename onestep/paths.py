"""Time conventions and prediction-type conversions: the one place where they live.

Inside onestep every model speaks *flow time*::

    x_t = (1 - t) * x0 + t * eps,    t in [0, 1] (t = 1 is pure noise),    v = eps - x0

From a velocity: ``x0 = x_t - t v``, ``eps = x_t + (1 - t) v``, ``score = -eps / t``.

Any Gaussian path ``x = a x0 + b eps`` (a, b >= 0, a + b > 0) is the same path up to a per-time
scale of x: dividing by ``a + b`` gives ``x / (a + b) = (1 - t) x0 + t eps`` with ``t = b / (a + b)``.
VP/DDPM (a = sqrt(abar), b = sqrt(1 - abar)), EDM/VE (a = 1, b = sigma) and TrigFlow
(a = cos s, b = sin s) are all special cases, so each gets a pair of time maps and a pair of
x scalings below, all written through that one identity.

Teachers predict in their own parameterisation (diffusers' names: "epsilon", "sample",
"v_prediction", plus "flow" for rectified-flow velocities); :func:`prediction_to_velocity` and
:func:`velocity_to_prediction` convert at the teacher boundary. The flow velocity eps - x0 does not
depend on the scaling of x, so it is the same vector whether one thinks in native or flow coordinates.

Discrete-time teachers (1000 DDPM steps) are evaluated at continuous t through
:class:`DiscreteVPSchedule`, which interpolates the schedule linearly in log-SNR.

All functions are plain tensor maths, differentiable, dtype-preserving and float64-safe: nothing is
computed in a lower precision than the inputs.
"""

from __future__ import annotations

from typing import Union

import torch

Number = Union[float, int]
TensorLike = Union[torch.Tensor, Number]

__all__ = [
    "PREDICTION_TYPES",
    "expand_like",
    "batch_time",
    "interpolate",
    "velocity_to_x0",
    "velocity_to_eps",
    "velocity_to_score",
    "x0_to_velocity",
    "eps_to_velocity",
    "gaussian_to_flow_t",
    "gaussian_to_flow_x",
    "flow_to_gaussian_x",
    "vp_alpha_bar_to_flow_t",
    "flow_t_to_vp_alpha_bar",
    "vp_coefficients",
    "flow_t_to_vp_coefficients",
    "vp_to_flow_x",
    "flow_to_vp_x",
    "edm_sigma_to_flow_t",
    "flow_t_to_edm_sigma",
    "edm_to_flow_x",
    "flow_to_edm_x",
    "trig_to_flow_t",
    "flow_t_to_trig",
    "trig_to_flow_x",
    "flow_to_trig_x",
    "flow_t_to_logsnr",
    "logsnr_to_flow_t",
    "prediction_to_velocity",
    "velocity_to_prediction",
    "DiscreteVPSchedule",
    "trailing_timesteps",
]

#: Prediction types understood by :func:`prediction_to_velocity`, in diffusers' names, plus "flow"
#: (the rectified-flow velocity eps - x0 that SD3 / FLUX / SANA predict and onestep uses inside).
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


# --------------------------------------------------------------------------------------------------
# helpers


def _as_float(v: TensorLike) -> torch.Tensor:
    """A floating tensor from a number or tensor (floating tensors are returned unchanged)."""
    if not isinstance(v, torch.Tensor):
        # a python number is a double: keep all of it (0-dim tensors do not up-cast others)
        return torch.as_tensor(v, dtype=torch.float64)
    # integer tensors would truncate the maths below, so promote to the default dtype
    return v if v.is_floating_point() else v.to(torch.get_default_dtype())


def expand_like(t: TensorLike, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``t`` (scalar or shape ``[B]``) to broadcast against ``x`` (``[B, ...]``).

    Trailing singleton dimensions are appended so ``t`` of shape ``[B]`` becomes ``[B, 1, ..., 1]``.
    ``t`` is moved to ``x``'s device and, when ``x`` is floating, cast to ``x``'s dtype so that the
    result of mixing them keeps ``x``'s dtype (pass float64 x to get float64 maths).
    """
    if not isinstance(t, torch.Tensor):
        # python numbers go straight to x's dtype (via float32 they would lose float64 precision)
        t = torch.as_tensor(t, dtype=x.dtype if x.is_floating_point() else None, device=x.device)
    t = t.to(x.device)
    if x.is_floating_point():
        t = t.to(x.dtype)
    if t.ndim > x.ndim:
        raise ValueError(f"t has more dimensions ({tuple(t.shape)}) than x ({tuple(x.shape)})")
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


# --------------------------------------------------------------------------------------------------
# 1. flow-time basics


def batch_time(t: TensorLike, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample time as a [B] tensor on x's device and dtype (B = x.shape[0])."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: TensorLike) -> torch.Tensor:
    """The flow path ``x_t = (1 - t) x0 + t eps``."""
    t = expand_like(t, x0)
    # x0 + t (eps - x0) would lose x0's low bits at t = 1; this form is exact at both ends
    return (1 - t) * x0 + t * eps


def velocity_to_x0(x_t: torch.Tensor, t: TensorLike, v: torch.Tensor) -> torch.Tensor:
    """``x0 = x_t - t v``. Regular for all t."""
    return x_t - expand_like(t, x_t) * v


def velocity_to_eps(x_t: torch.Tensor, t: TensorLike, v: torch.Tensor) -> torch.Tensor:
    """``eps = x_t + (1 - t) v``. Regular for all t."""
    return x_t + (1 - expand_like(t, x_t)) * v


def velocity_to_score(x_t: torch.Tensor, t: TensorLike, v: torch.Tensor) -> torch.Tensor:
    """Score of the marginal at t: ``-eps / t = -(x_t + (1 - t) v) / t``. Singular at t = 0."""
    t = expand_like(t, x_t)
    return -(x_t + (1 - t) * v) / t


def x0_to_velocity(x_t: torch.Tensor, t: TensorLike, x0: torch.Tensor) -> torch.Tensor:
    """``v = (x_t - x0) / t``. Singular at t = 0 (x_t carries no information about v there).

    This form, rather than ``eps - x0`` with ``eps = (x_t - (1 - t) x0) / t``, divides once and
    cancels the x0 term exactly.
    """
    return (x_t - x0) / expand_like(t, x_t)


def eps_to_velocity(x_t: torch.Tensor, t: TensorLike, eps: torch.Tensor) -> torch.Tensor:
    """``v = (eps - x_t) / (1 - t)``. Singular at t = 1 (pure noise says nothing about x0)."""
    return (eps - x_t) / (1 - expand_like(t, x_t))


# --------------------------------------------------------------------------------------------------
# 2. Gaussian paths x = a x0 + b eps <-> flow time


def gaussian_to_flow_t(a: TensorLike, b: TensorLike) -> torch.Tensor:
    """Flow time of the path ``x = a x0 + b eps``: ``t = b / (a + b)`` (needs a + b > 0)."""
    a, b = _as_float(a), _as_float(b)
    return b / (a + b)


def gaussian_to_flow_x(x: torch.Tensor, a: TensorLike, b: TensorLike) -> torch.Tensor:
    """Flow coordinates of a native ``x = a x0 + b eps``: ``x / (a + b)``."""
    return x / (expand_like(a, x) + expand_like(b, x))


def flow_to_gaussian_x(x_flow: torch.Tensor, a: TensorLike, b: TensorLike) -> torch.Tensor:
    """Native coordinates ``x = (a + b) x_flow`` of a path with coefficients a, b."""
    return x_flow * (expand_like(a, x_flow) + expand_like(b, x_flow))


# VP / DDPM: a = sqrt(abar), b = sqrt(1 - abar)


def vp_coefficients(alpha_bar: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b) = (sqrt(abar), sqrt(1 - abar))``, computed the way diffusers' schedulers do."""
    alpha_bar = _as_float(alpha_bar)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def flow_t_to_vp_coefficients(t: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """VP coefficients at flow time t: ``(1 - t, t) / sqrt((1 - t)^2 + t^2)`` (a^2 + b^2 = 1)."""
    t = _as_float(t)
    r = torch.hypot(1 - t, t)
    return (1 - t) / r, t / r


def vp_alpha_bar_to_flow_t(alpha_bar: TensorLike) -> torch.Tensor:
    """``t = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))``; abar = 1 -> t = 0, abar = 0 -> t = 1."""
    a, b = vp_coefficients(alpha_bar)
    return b / (a + b)


def flow_t_to_vp_alpha_bar(t: TensorLike) -> torch.Tensor:
    """``abar = (1 - t)^2 / ((1 - t)^2 + t^2)``, the inverse of :func:`vp_alpha_bar_to_flow_t`."""
    t = _as_float(t)
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def vp_to_flow_x(x: torch.Tensor, alpha_bar: TensorLike) -> torch.Tensor:
    """Flow coordinates of a VP sample: ``x / (sqrt(abar) + sqrt(1 - abar))``."""
    a, b = vp_coefficients(alpha_bar)
    return gaussian_to_flow_x(x, a, b)


def flow_to_vp_x(x_flow: torch.Tensor, t: TensorLike) -> torch.Tensor:
    """VP coordinates of a flow sample at time t: ``x_flow / sqrt((1 - t)^2 + t^2)``.

    (a + b = 1 / sqrt((1 - t)^2 + t^2) when a^2 + b^2 = 1.)
    """
    t = expand_like(_as_float(t), x_flow)
    return x_flow / torch.hypot(1 - t, t)


# EDM / VE: a = 1, b = sigma


def edm_sigma_to_flow_t(sigma: TensorLike) -> torch.Tensor:
    """``t = sigma / (1 + sigma)``; sigma = inf maps to t = 1."""
    sigma = _as_float(sigma)
    # written as 1 / (1 + 1/sigma) would fail at sigma = 0; this form only fails at sigma = inf
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def flow_t_to_edm_sigma(t: TensorLike) -> torch.Tensor:
    """``sigma = t / (1 - t)``. Singular (infinite) at t = 1."""
    t = _as_float(t)
    return t / (1 - t)


def edm_to_flow_x(x: torch.Tensor, sigma: TensorLike) -> torch.Tensor:
    """Flow coordinates of an EDM sample ``x = x0 + sigma eps``: ``x / (1 + sigma)``."""
    return x / (1 + expand_like(_as_float(sigma), x))


def flow_to_edm_x(x_flow: torch.Tensor, t: TensorLike) -> torch.Tensor:
    """EDM coordinates of a flow sample: ``x_flow / (1 - t) = (1 + sigma) x_flow``. Singular at t = 1."""
    return x_flow / (1 - expand_like(_as_float(t), x_flow))


# TrigFlow: a = cos s, b = sin s, s in [0, pi/2]


def trig_to_flow_t(s: TensorLike) -> torch.Tensor:
    """``t = sin s / (sin s + cos s)`` for TrigFlow time s in [0, pi/2]."""
    s = _as_float(s)
    return torch.sin(s) / (torch.sin(s) + torch.cos(s))


def flow_t_to_trig(t: TensorLike) -> torch.Tensor:
    """``s = atan2(t, 1 - t)``: exact at both ends (t = 1 -> pi/2) where atan(t / (1 - t)) is not."""
    t = _as_float(t)
    return torch.atan2(t, 1 - t)


def trig_to_flow_x(x: torch.Tensor, s: TensorLike) -> torch.Tensor:
    """Flow coordinates of a TrigFlow sample ``x = cos s x0 + sin s z``: ``x / (sin s + cos s)``."""
    s = expand_like(_as_float(s), x)
    return x / (torch.sin(s) + torch.cos(s))


def flow_to_trig_x(x_flow: torch.Tensor, t: TensorLike) -> torch.Tensor:
    """TrigFlow coordinates of a flow sample: ``x_flow / sqrt((1 - t)^2 + t^2)`` (TrigFlow is a VP path)."""
    return flow_to_vp_x(x_flow, t)


# log-SNR: lambda = log(a^2 / b^2), the same for every parameterisation of one path


def flow_t_to_logsnr(t: TensorLike) -> torch.Tensor:
    """``lambda = 2 log((1 - t) / t)``; +inf at t = 0, -inf at t = 1."""
    t = _as_float(t)
    # log1p keeps precision for small t where 1 - t rounds
    return 2 * (torch.log1p(-t) - torch.log(t))


def logsnr_to_flow_t(lam: TensorLike) -> torch.Tensor:
    """``t = sigmoid(-lambda / 2)``, the inverse of :func:`flow_t_to_logsnr`."""
    return torch.sigmoid(-_as_float(lam) / 2)


# --------------------------------------------------------------------------------------------------
# 3. prediction types


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}"
        )


def prediction_to_velocity(
    pred: torch.Tensor, prediction_type: str, x: torch.Tensor, a: TensorLike, b: TensorLike
) -> torch.Tensor:
    """Flow velocity ``eps_hat - x0_hat`` from a model's native prediction.

    The model saw ``x = a x0 + b eps`` (native coordinates; a, b scalars or per-sample ``[B]``) and
    predicted ``pred`` of kind ``prediction_type``:

    - "epsilon": eps_hat = pred, x0_hat = (x - b eps_hat) / a, so v = ((a + b) pred - x) / a
      (singular at a = 0, i.e. pure noise);
    - "sample": x0_hat = pred, eps_hat = (x - a x0_hat) / b, so v = (x - (a + b) pred) / b
      (singular at b = 0, i.e. clean data);
    - "v_prediction": diffusers' v = a eps - b x0 (for VP, a^2 + b^2 = 1). Solving the 2x2 system
      with x gives x0 = (a x - b v) / (a^2 + b^2), eps = (b x + a v) / (a^2 + b^2), so
      v_flow = ((b - a) x + (a + b) pred) / (a^2 + b^2), regular everywhere;
    - "flow": pred already is eps - x0.

    eps - x0 is unchanged by rescaling x, so the result is the velocity in flow coordinates too.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "flow":
        return pred
    a, b = expand_like(a, x), expand_like(b, x)
    if prediction_type == "epsilon":
        return ((a + b) * pred - x) / a
    if prediction_type == "sample":
        return (x - (a + b) * pred) / b
    # v_prediction
    return ((b - a) * x + (a + b) * pred) / (a * a + b * b)


def velocity_to_prediction(
    v: torch.Tensor, prediction_type: str, x: torch.Tensor, a: TensorLike, b: TensorLike
) -> torch.Tensor:
    """Inverse of :func:`prediction_to_velocity`: the native prediction a model would output.

    With ``x = a x0 + b eps`` and v = eps - x0: x0 = (x - b v) / (a + b), eps = (x + a v) / (a + b),
    and diffusers' v = a eps - b x0 = ((a - b) x + (a^2 + b^2) v) / (a + b). All regular for a + b > 0.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "flow":
        return v
    a, b = expand_like(a, x), expand_like(b, x)
    if prediction_type == "epsilon":
        return (x + a * v) / (a + b)
    if prediction_type == "sample":
        return (x - b * v) / (a + b)
    return ((a - b) * x + (a * a + b * b) * v) / (a + b)


# --------------------------------------------------------------------------------------------------
# 4. discrete VP schedules (DDPM's 1000 steps) at continuous time


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' `timestep_spacing="trailing"`: round(T - i T / N) - 1 for i = 0..N-1, e.g. N = 4 ->
    [999, 749, 499, 249] (SDXL-Lightning's schedule)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    return [round(num_train_timesteps - i * num_train_timesteps / steps) - 1 for i in range(steps)]


class DiscreteVPSchedule:
    """A discrete VP schedule (``alphas_cumprod``, N entries) seen at continuous time.

    Timestep k in [0, N-1] (fractional allowed) <-> flow time t. Between neighbouring integer steps
    the log-SNR is interpolated linearly (the natural variable: the DDPM noise levels are roughly
    evenly spaced in it, and it keeps the map smooth and strictly monotone); at integer steps the
    maps are exact: ``flow_t(k) == vp_alpha_bar_to_flow_t(alphas_cumprod[k])`` bit for bit.

    A segment with an infinite log-SNR end (alpha_bar exactly 1 or 0, e.g. zero-terminal-SNR
    schedules) cannot be interpolated in log-SNR; it is interpolated linearly in flow time instead.

    Outside the schedule: timesteps are clamped to [0, N-1]; flow times below the first step's flow
    time map to timestep 0 and above the last step's flow time (t_max, about 0.93 for SD's schedule)
    map to N-1. A discrete teacher has never seen anything noisier than step N-1, so callers that
    need t up to 1 must decide themselves what the teacher is worth there.

    Computation is float64 internally; results come back in the input's dtype (floating tensors) or
    the default dtype (ints, python numbers), on the input's device.
    """

    def __init__(self, alphas_cumprod: TensorLike):
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).clone()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got {tuple(ac.shape)}")
        if not bool(((ac >= 0) & (ac <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing (noise grows with the timestep)")
        self.alphas_cumprod = ac
        # the flow time of every integer step, and log-SNR computed *from it* with the same function
        # timestep() uses, so that timestep(flow_t(k)) lands exactly on k
        self._t = vp_alpha_bar_to_flow_t(ac)
        if not bool((self._t[1:] > self._t[:-1]).all()):
            raise ValueError("alphas_cumprod too close together to be told apart in flow time")
        self._lam = flow_t_to_logsnr(self._t)

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_scheduler(cls, scheduler) -> "DiscreteVPSchedule":
        """From any diffusers scheduler (or object) with an ``alphas_cumprod`` attribute."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: not a discrete VP scheduler")
        return cls(ac)

    @classmethod
    def from_betas(
        cls,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        **scheduler_kwargs,
    ) -> "DiscreteVPSchedule":
        """Build diffusers' ``DDPMScheduler`` with these arguments and use its ``alphas_cumprod``.

        Reusing diffusers keeps the beta schedules (and their float32 rounding) identical to what the
        teacher was trained and is sampled with. Extra keyword arguments go to the scheduler
        (e.g. ``rescale_betas_zero_snr=True``).
        """
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            **scheduler_kwargs,
        )
        return cls.from_scheduler(scheduler)

    # -- properties -------------------------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def t_min(self) -> float:
        """Flow time of timestep 0 (the least noisy step)."""
        return float(self._t[0])

    @property
    def t_max(self) -> float:
        """Flow time of timestep N-1 (the noisiest step)."""
        return float(self._t[-1])

    # -- maps -------------------------------------------------------------------------------------

    @staticmethod
    def _prepare(x: TensorLike) -> tuple[torch.Tensor, torch.dtype, torch.device]:
        x = torch.as_tensor(x)
        out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        # float64 maths; MPS has no float64, so such inputs are computed on the CPU
        work = "cpu" if x.device.type == "mps" else x.device
        return x.to(work, torch.float64), out_dtype, x.device

    def _segment(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left integer step (in [0, N-2]) and weight in [0, 1] of clamped timesteps k."""
        n = self.num_train_timesteps
        k = k.clamp(0, n - 1)
        lo = k.floor().long().clamp(0, n - 2)
        return lo, k - lo

    def flow_t(self, timestep: TensorLike) -> torch.Tensor:
        """Flow time of a (possibly fractional) timestep, log-SNR-linear between integer steps."""
        k, out_dtype, device = self._prepare(timestep)
        t_tab, lam_tab = self._t.to(k.device), self._lam.to(k.device)
        lo, w = self._segment(k)
        t0, t1 = t_tab[lo], t_tab[lo + 1]
        l0, l1 = lam_tab[lo], lam_tab[lo + 1]
        finite = torch.isfinite(l0) & torch.isfinite(l1)
        zero = torch.zeros_like(l0)
        # infinities zeroed so the unused branch of torch.where carries no NaN
        lam = (1 - w) * torch.where(finite, l0, zero) + w * torch.where(finite, l1, zero)
        t = torch.where(finite, logsnr_to_flow_t(lam), (1 - w) * t0 + w * t1)
        # exact at integer steps (and at the end of the last segment)
        t = torch.where(w == 0, t0, torch.where(w == 1, t1, t))
        return t.to(device, out_dtype)

    def timestep(self, t: TensorLike) -> torch.Tensor:
        """Continuous timestep of a flow time: the inverse of :meth:`flow_t`, clamped to [0, N-1]."""
        t, out_dtype, device = self._prepare(t)
        t_tab, lam_tab = self._t.to(t.device), self._lam.to(t.device)
        n = self.num_train_timesteps
        # the flow-time table is increasing, so searching it finds the segment; right=True puts a
        # t equal to a table entry at the start of that entry's segment, giving weight 0 there
        idx = torch.searchsorted(t_tab, t.reshape(-1).contiguous(), right=True).reshape(t.shape)
        lo = (idx - 1).clamp(0, n - 2)
        t0, t1 = t_tab[lo], t_tab[lo + 1]
        l0, l1 = lam_tab[lo], lam_tab[lo + 1]
        finite = torch.isfinite(l0) & torch.isfinite(l1)
        one = torch.ones_like(l0)
        lam = flow_t_to_logsnr(t.clamp(0, 1))
        w_lam = (torch.where(finite, l0, one) - torch.where(finite, lam, one)) / torch.where(
            finite, l0 - l1, one
        )
        w_lin = (t - t0) / (t1 - t0)
        # clamp: rounding in log() may put a t just past a table entry a hair outside [0, 1]
        w = torch.where(finite, w_lam, w_lin).clamp(0, 1)
        # flow times outside [t_min, t_max] (including t = 0 and 1, whose log-SNR is infinite) clamp
        w = torch.where(t <= t0, torch.zeros_like(w), torch.where(t >= t1, torch.ones_like(w), w))
        return (lo.to(torch.float64) + w).to(device, out_dtype)

    def alpha_bar(self, timestep: TensorLike) -> torch.Tensor:
        """alpha_bar at a (possibly fractional) timestep; exactly ``alphas_cumprod[k]`` at integers."""
        k, out_dtype, device = self._prepare(timestep)
        lo, w = self._segment(k)
        ac = self.alphas_cumprod.to(k.device)
        ab = flow_t_to_vp_alpha_bar(self.flow_t(k))
        ab = torch.where(w == 0, ac[lo], torch.where(w == 1, ac[lo + 1], ab))
        return ab.to(device, out_dtype)

    def trailing_grid(self, steps: int) -> torch.Tensor:
        """The `steps`-step flow-time grid at the trailing timesteps, float64: 1 = t_0 > t(k_1) > ... > 0.

        The first point is pure noise, flow time 1 rather than t(N-1) = t_max (SDXL-Lightning samples from
        pure noise at its first timestep), and the last is the data, t = 0. One step is [1, 0], the
        uniform grid."""
        times = self.flow_t(torch.tensor(trailing_timesteps(steps, self.num_train_timesteps), dtype=torch.float64))
        times[0] = 1.0
        return torch.cat([times, torch.zeros(1, dtype=torch.float64)])

    def __repr__(self) -> str:
        return (
            f"DiscreteVPSchedule(num_train_timesteps={self.num_train_timesteps}, "
            f"t_min={self.t_min:.6g}, t_max={self.t_max:.6g})"
        )
