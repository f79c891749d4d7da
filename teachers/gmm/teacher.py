"""The analytic Gaussian-mixture teacher: exact velocity, exact flow map, any dimension.

Data p(x) = sum_k pi_k N(mu_k, s_k^2 I). On the path x = a x0 + b eps every posterior quantity is
closed form, so this teacher is the independent reference that objectives are tested against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from onestep.teachers.base import NULL_LABEL, Teacher
from onestep.teachers.capabilities import TeacherCapabilities

from onestep.errors import ConfigError
from onestep.paths import batch_time
from onestep.registry import TEACHERS


class GaussianMixture:
    """Isotropic Gaussian mixture; `labels[k]` is the class of component k (for conditional use)."""

    def __init__(self, means, stds, weights=None, labels=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if (self.stds <= 0).any():
            raise ValueError("Gaussian-mixture standard deviations must be > 0")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else int(self.labels.max()) + 1

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32):
        """n samples and the class label of each (component index if the mixture has no labels)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * noise
        labels = comp if self.labels is None else self.labels[comp]
        return x.to(dtype), labels

    def posterior(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cond: torch.Tensor | None = None):
        """(E[x0 | x], E[eps | x]) for x = a x0 + b eps; `cond` restricts to one class's components."""
        dt = x.dtype
        mu, s2 = self.means.to(x.device, dt), (self.stds ** 2).to(x.device, dt)
        a, b = a.to(dt)[:, None], b.to(dt)[:, None]                      # [B, 1]
        S = a ** 2 * s2[None] + b ** 2                                    # [B, K] per-component variance
        diff = x[:, None, :] - a[:, :, None] * mu[None]                    # [B, K, D]
        logits = (torch.log(self.weights.to(x.device, dt))[None]
                  - 0.5 * self.dim * torch.log(2 * math.pi * S)
                  - 0.5 * (diff ** 2).sum(-1) / S)
        if cond is not None:
            labels = self.labels if self.labels is not None else torch.arange(len(self.weights))
            keep = (labels.to(x.device)[None, :] == cond[:, None]) | (cond[:, None] == NULL_LABEL)
            logits = logits.masked_fill(~keep, float("-inf"))
        w = torch.softmax(logits, dim=-1)[..., None]                      # responsibilities [B, K, 1]
        x0_k = mu[None] + (a * s2[None] / S)[..., None] * diff              # E[x0 | x, k]
        eps_k = (b / S)[..., None] * diff                                  # E[eps | x, k] = -b * score_k
        return (w * x0_k).sum(1), (w * eps_k).sum(1)


@dataclass
class GMMTeacherConfig:
    means: Optional[List[List[float]]] = None  # None: the built-in 2-D, 2-class, 4-component mixture
    stds: Optional[List[float]] = None
    weights: Optional[List[float]] = None
    labels: Optional[List[int]] = None        # class of each component (class-conditional teacher)


@TEACHERS.register("gmm")
class GMMTeacher(Teacher):
    """Exact flow-matching teacher of a Gaussian mixture: v(x, t) = E[eps | x_t] - E[x0 | x_t]."""
    exporter = "onestep.teachers.gmm.exporter:NoPipelineExporter"   # loaded only when a run is exported

    Config = GMMTeacherConfig
    # class-conditional when the mixture has labels (teacher.labels); label -1 draws from the whole mixture
    capabilities = TeacherCapabilities(conditioning="class", space="pixel", time="flow", null_condition=True)

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture
        self.num_classes = mixture.num_classes
        self.sample_shape = (mixture.dim,)

    @staticmethod
    def check_config(cfg: GMMTeacherConfig) -> None:
        """Raise ConfigError for a mixture that cannot be built (called when the config is loaded)."""
        if cfg.means is None:
            extra = [k for k in ("stds", "weights", "labels") if getattr(cfg, k) is not None]
            if extra:
                raise ConfigError(f"teacher.{extra[0]} needs teacher.means "
                                  "(without means the built-in mixture is used)")
            return
        means = cfg.means
        if not means or not means[0] or any(len(m) != len(means[0]) for m in means):
            raise ConfigError(f"teacher.means must be a non-empty list of equally long, non-empty vectors, got {means}")
        if not all(math.isfinite(v) for m in means for v in m):
            raise ConfigError(f"teacher.means must be finite, got {means}")
        k = len(means)
        if cfg.stds is None:
            raise ConfigError("teacher.stds is required with teacher.means (one std per component, or one for all)")
        per = f"one number per component ({k})" if k > 1 else "one number"
        if len(cfg.stds) not in (1, k) or not all(s > 0 and math.isfinite(s) for s in cfg.stds):
            raise ConfigError(f"teacher.stds must be one number or {per}, all finite and > 0, got {cfg.stds}")
        if cfg.weights is not None and (len(cfg.weights) != k
                                        or not all(w >= 0 and math.isfinite(w) for w in cfg.weights)
                                        or not sum(cfg.weights) > 0):
            raise ConfigError(f"teacher.weights must be {per}, finite, >= 0, with a positive sum, got {cfg.weights}")
        if cfg.labels is not None and (len(cfg.labels) != k or any(c < 0 for c in cfg.labels)):
            raise ConfigError(f"teacher.labels must be one class index >= 0 per component ({k}), got {cfg.labels}")

    @classmethod
    def from_config(cls, cfg: GMMTeacherConfig) -> "GMMTeacher":
        if cfg.means is None:
            return cls(four_component_mixture())
        if cfg.stds is None:
            raise ValueError("teacher.stds is required with teacher.means")
        return cls(GaussianMixture(cfg.means, cfg.stds, cfg.weights, cfg.labels))

    def _velocity(self, x, t, cond):
        # Both posteriors are computed per component without dividing by a or b, so this is
        # stable on all of [0, 1] (at t = 0: v = -x, since eps is independent of x0).
        x0, eps = self.mixture.posterior(x, 1 - t, t, cond)
        return eps - x0

    # exact flow map and average velocity (references for tests and toy metrics)
    def features(self, x_t, t, cond=None, layers=None) -> list[torch.Tensor]:
        """No network to tap: the noisy point and the exact velocity there (differentiable in x_t)."""
        return [x_t, self._velocity(x_t, batch_time(t, x_t), cond)]

    def flow_map(self, z: torch.Tensor, t, r, cond=None, rtol: float = 1e-10, atol: float = 1e-12) -> torch.Tensor:
        """Phi_{t -> r}(z), per sample, by scipy `solve_ivp` (DOP853) in float64.

        All samples are integrated as one system in a normalised time s in [0, 1] with
        tau_i(s) = t_i + s (r_i - t_i), so samples with different intervals share one solve.
        """
        from scipy.integrate import solve_ivp

        z64 = z.detach().to(torch.float64).cpu()
        B = z64.shape[0]
        t, r = batch_time(t, z64), batch_time(r, z64)
        span = r - t
        c = None if cond is None else cond.cpu()

        def rhs(s, y):
            zz = torch.from_numpy(y).view(B, -1)
            tau = t + s * span
            return (span[:, None] * self._velocity(zz, tau, c)).reshape(-1).numpy()

        sol = solve_ivp(rhs, (0.0, 1.0), z64.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"flow-map integration failed: {sol.message}")
        out = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).view_as(z64)
        return out.to(z.device, z.dtype)

    def average_velocity(self, z, r, t, cond=None, **kw) -> torch.Tensor:
        """Exact u(z, r, t) = (z - Phi_{t -> r}(z)) / (t - r); u(z, t, t) = v(z, t)."""
        t_b, r_b = batch_time(t, z), batch_time(r, z)
        u = self.velocity(z, t_b, cond).clone()
        moving = (t_b - r_b) > 0
        if moving.any():
            idx = moving.nonzero().squeeze(1)
            zr = self.flow_map(z[idx], t_b[idx], r_b[idx], None if cond is None else cond[idx], **kw)
            u[idx] = (z[idx] - zr) / (t_b[idx] - r_b[idx])[:, None]
        return u


def four_component_mixture() -> GaussianMixture:
    """A small 2-D, 2-class, 4-component mixture used in tests and examples."""
    means = [[-2.0, -1.0], [-1.0, 2.0], [2.0, 1.0], [1.0, -2.0]]
    return GaussianMixture(means, stds=[0.3, 0.4, 0.3, 0.5], weights=[1, 2, 1, 2], labels=[0, 0, 1, 1])
