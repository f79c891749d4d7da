"""EDM (Karras et al. 2022) preconditioned denoisers as flow-time teachers.

As in NVlabs/edm, the preconditioning is a module of its own (:class:`EDMPrecond`) around a raw
network F, any ``nn.Module`` called as ``F(c_in * x, c_noise, class_labels)``::

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise),   c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2),   c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4

(sd = sigma_data). :class:`EDMTeacher` speaks flow time through :mod:`onestep.paths`: sigma = t / (1 - t),
x_edm = x_flow / (1 - t), and D is the x0 prediction, so v = (x_flow - D) / t. Above sigma_max (flow
time sigma_max / (1 + sigma_max), 0.9877 for EDM's 80) the denoiser was never trained: it is evaluated
at sigma_max on the sample rescaled to that noise level, and v = (x_t - D) / t keeps the velocity regular
up to t = 1.

`EDMTeacher.from_pretrained` loads a diffusers `UNet2DModel` as F (safetensors); any other network
is wrapped directly with ``EDMTeacher(EDMPrecond(net, ...))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from onestep.teachers.base import NULL_LABEL, Teacher
from onestep.teachers.capabilities import TeacherCapabilities
from onestep.teachers.edm.full_size import EDM_FULL_SIZE
from onestep.teachers.edm.tiny import save_tiny
from onestep.teachers.loading import check_dtype_option, dtype_kwargs, load_from_pretrained
from onestep.teachers.unet.teacher import _check_no_meta, unet_feature_layers
from torch import nn

from onestep import paths
from onestep.errors import ConfigError
from onestep.registry import TEACHERS

LABEL_FORMATS = ("index", "one_hot")


class EDMPrecond(nn.Module):
    """D(x, sigma, class) = c_skip x + c_out F(c_in x, c_noise, class_labels), in EDM coordinates.

    `c_noise_scale` multiplies EDM's c_noise = ln(sigma) / 4 (1000 suits networks built for diffusers'
    0..1000 timesteps). Class labels reach F as given by `label_format`: "index" (long tensor, e.g.
    UNet2DModel's class embedding) or "one_hot" (NVlabs' float [B, num_classes]; the null label -1 is the
    all-zero row their label dropout trains for "no class").
    """

    def __init__(self, network: nn.Module, sigma_data: float = 0.5, c_noise_scale: float = 1.0,
                 num_classes: int | None = None, label_format: str = "index", null_class: int | None = None):
        super().__init__()
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"unknown label_format {label_format!r}; allowed: {', '.join(LABEL_FORMATS)}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.network = network
        self.sigma_data = float(sigma_data)
        self.c_noise_scale = float(c_noise_scale)
        self.num_classes = num_classes
        self.label_format = label_format
        self.null_class = null_class

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for a [B] sigma."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = self.c_noise_scale * sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def class_labels(self, labels: torch.Tensor | None, batch: int, device):
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("this EDM denoiser is unconditional: pass cond=None")
            return None
        if labels is None:
            labels = torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long()
        null = labels == NULL_LABEL
        if self.label_format == "one_hot":
            # the null label's row stays zero: EDM's label dropout trains "no class" as zeros
            one_hot = torch.nn.functional.one_hot(labels.clamp(min=0), self.num_classes).float()
            return one_hot * (~null)[:, None].float()
        if bool(null.any()):
            if self.null_class is None:
                raise ValueError("label -1 (no class) given, but the denoiser has no null class (teacher.null_class)")
            labels = torch.where(null, torch.full_like(labels, self.null_class), labels)
        return labels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        sigma = paths.batch_time(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        dtype = next(self.network.parameters()).dtype
        labels = self.class_labels(class_labels, x.shape[0], x.device)
        if labels is not None and labels.is_floating_point():
            labels = labels.to(dtype)
        out = self.network((paths.expand_like(c_in, x) * x).to(dtype), c_noise.to(dtype), labels)
        out = getattr(out, "sample", out)  # diffusers models return an output object
        out = out[0] if isinstance(out, (tuple, list)) else out
        return paths.expand_like(c_skip, x) * x + paths.expand_like(c_out, x) * out.to(x.dtype)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's sampling noise levels (sigma_max ... sigma_min, then 0), float64."""
    i = torch.arange(steps, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv ** rho, torch.zeros(1, dtype=torch.float64)])


@dataclass
class EDMTeacherConfig:
    path: str = ""                        # hub id or local folder with a UNet2DModel (config.json + safetensors)
    subfolder: Optional[str] = "unet"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    c_noise_scale: float = 1.0            # c_noise = c_noise_scale * ln(sigma) / 4
    label_format: str = "index"           # index | one_hot
    null_class: Optional[int] = None      # index label_format: class index meaning "no class"
    dtype: str = "float32"
    device: Optional[str] = None
    variant: Optional[str] = None
    revision: Optional[str] = None


@TEACHERS.register("edm")
class EDMTeacher(Teacher):
    """Flow velocity of an EDM-preconditioned denoiser D(x, sigma, class)."""
    exporter = "onestep.teachers.edm.exporter:EDMExporter"   # loaded only when a run is exported

    Config = EDMTeacherConfig
    capabilities = TeacherCapabilities(conditioning="class", space="pixel", time="edm", null_condition=True,
                                       adapter=True)
    tiny = staticmethod(save_tiny)
    full_size = EDM_FULL_SIZE

    def __init__(self, precond: EDMPrecond, sample_shape: tuple[int, ...], sigma_min: float = 0.002,
                 sigma_max: float = 80.0, feature_layers: tuple[str, ...] = ()):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.precond = precond
        self.sample_shape = tuple(sample_shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.num_classes = precond.num_classes
        self.default_feature_layers = tuple(feature_layers)
        self.freeze()

    @property
    def t_max(self) -> float:
        """Flow time of sigma_max: above it the denoiser is evaluated at sigma_max."""
        return float(paths.edm_sigma_to_flow_t(self.sigma_max))

    def null_condition(self, batch: int, device=None) -> torch.Tensor:
        if self.num_classes is None or (self.precond.label_format == "index" and self.precond.null_class is None):
            raise ValueError("this EDM teacher has no null condition (unconditional, or index labels without "
                             "teacher.null_class), so no classifier-free guidance")
        return super().null_condition(batch, device)

    @property
    def t_min(self) -> float:
        """Flow time of sigma_min: below it the denoiser is evaluated at sigma_min (at sigma = 0 its c_noise,
        ln(sigma) / 4, is -inf; D(x, sigma_min) differs from x by about sigma_min times the network's output)."""
        return float(paths.edm_sigma_to_flow_t(self.sigma_min))

    def denoise(self, x_flow: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """D at flow coordinates and time (t clamped to [t_min, t_max], the flow times of sigma_min and
        sigma_max), i.e. the x0 prediction. Clean samples (t = 0) are read this way too, e.g. by a
        discriminator on the backbone's features."""
        t_eval = t.clamp(min=self.t_min, max=self.t_max)
        sigma = paths.flow_t_to_edm_sigma(t_eval).to(x_flow.dtype)
        return self.precond(paths.flow_to_edm_x(x_flow, t_eval), sigma, cond)

    def _velocity(self, x, t, cond):
        # at t > t_max this is x scaled as if at t_max: the same sample direction, the trained noise level
        return paths.x0_to_velocity(x, t, self.denoise(x, t, cond))

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int = 32, solver: str = "heun", guidance: float | None = None,
               grid: str = "karras", rho: float = 7.0) -> torch.Tensor:
        """EDM's sampler in flow time: Heun on the Karras noise levels (grid="karras"; `noise` is the unit
        noise, scaled to sigma_max as EDM does), or the base uniform flow-time grid (grid="uniform")."""
        if grid == "uniform":
            return super().sample(noise, cond, steps, solver, guidance)
        if grid != "karras":
            raise ValueError(f"unknown grid {grid!r}; allowed: karras, uniform")
        from onestep.sampling import solve_ode

        times = paths.edm_sigma_to_flow_t(karras_sigmas(steps, self.sigma_min, self.sigma_max, rho))
        # EDM starts at x = sigma_max * n; in flow coordinates that is x / (1 + sigma_max) = t_0 * n
        x = noise * float(times[0])
        return solve_ode(lambda z, t: self.velocity(z, t, cond, guidance), x, steps=steps, solver=solver, times=times)

    def backbone(self) -> nn.Module:
        return self.precond.network

    @classmethod
    def from_pretrained(cls, path: str, *, subfolder: str | None = "unet", sigma_data: float = 0.5,
                        sigma_min: float = 0.002, sigma_max: float = 80.0, c_noise_scale: float = 1.0,
                        label_format: str = "index", null_class: int | None = None, dtype=None, device=None,
                        variant: str | None = None, revision: str | None = None,
                        option: str = "teacher.path") -> "EDMTeacher":
        """A diffusers `UNet2DModel` as the raw network F (class labels by its `num_class_embeds`)."""
        from diffusers import UNet2DModel

        unet = load_from_pretrained(UNet2DModel.from_pretrained, path, subfolder, family="edm", option=option,
                                    what="UNet2DModel", **dtype_kwargs(dtype), use_safetensors=True,
                                    variant=variant, revision=revision)
        _check_no_meta(unet, "edm", f"{path}/{subfolder or ''}", option)
        if device is not None:
            unet = unet.to(device)
        return cls.from_unet(unet, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max,
                             c_noise_scale=c_noise_scale, label_format=label_format, null_class=null_class)

    @classmethod
    def from_unet(cls, unet, **kw) -> "EDMTeacher":
        labels = getattr(unet, "class_embedding", None)
        n = labels.num_embeddings if isinstance(labels, nn.Embedding) else None
        null_class = kw.pop("null_class", None)
        if n is not None and null_class is not None:
            n -= 1  # the null class is the last embedding
        precond = EDMPrecond(_UNetAsRawNetwork(unet), kw.pop("sigma_data", 0.5), kw.pop("c_noise_scale", 1.0),
                             num_classes=n, label_format=kw.pop("label_format", "index"), null_class=null_class)
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        layers = tuple(f"unet.{name}" for name in unet_feature_layers(unet))
        return cls(precond, (unet.config.in_channels, *size), feature_layers=layers, **kw)

    @classmethod
    def check_config(cls, cfg: EDMTeacherConfig) -> None:
        check_dtype_option(cfg.dtype)
        if not cfg.path:
            raise ConfigError("teacher.path: name the EDM denoiser (hub id or local folder with a UNet2DModel)")
        if cfg.label_format not in LABEL_FORMATS:
            raise ConfigError(f"teacher.label_format: unknown {cfg.label_format!r}; "
                              f"allowed: {', '.join(LABEL_FORMATS)}")
        if not 0 < cfg.sigma_min < cfg.sigma_max or cfg.sigma_data <= 0 or not math.isfinite(cfg.sigma_max):
            raise ConfigError("teacher: need 0 < sigma_min < sigma_max < inf and sigma_data > 0")

    @classmethod
    def from_config(cls, cfg: EDMTeacherConfig) -> "EDMTeacher":
        cls.check_config(cfg)
        return cls.from_pretrained(cfg.path, subfolder=cfg.subfolder, sigma_data=cfg.sigma_data,
                                   sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, c_noise_scale=cfg.c_noise_scale,
                                   label_format=cfg.label_format, null_class=cfg.null_class, dtype=cfg.dtype,
                                   device=cfg.device, variant=cfg.variant, revision=cfg.revision)


class _UNetAsRawNetwork(nn.Module):
    """A diffusers UNet2DModel called as F(x, c_noise, class_labels) -> tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, c_noise, class_labels=None):
        return self.unet(x, c_noise, class_labels=class_labels).sample


__all__ = ["EDMPrecond", "EDMTeacher", "EDMTeacherConfig", "karras_sigmas"]
