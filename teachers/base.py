"""The Teacher interface (design §3): a frozen model that answers in flow time.

Subclasses implement `_velocity(x, t, cond)` (cond None = unconditional) in flow time; everything a
trainer or objective needs is derived here, in one place: classifier-free guidance, the x0 / eps /
score views and the teacher's own multi-step sampler.
"""
from __future__ import annotations

import torch
from torch import nn

from onestep import paths
from onestep.sampling import solve_ode

NULL_LABEL = -1  # class label meaning "no condition" for class-conditional teachers


class Teacher(nn.Module):
    #: number of classes for class-conditional teachers, None for unconditional ones
    num_classes: int | None = None
    #: shape of one sample in the teacher's (latent) space, e.g. (1, 16, 16) or (2,)
    sample_shape: tuple[int, ...] = ()

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher is always in eval mode

    def freeze(self) -> "Teacher":
        self.requires_grad_(False)
        return self.eval()

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, cond=None, guidance: float | None = None):
        """Flow velocity v(x_t, t | cond); with `guidance` w: v(null) + w (v(cond) - v(null))."""
        t = paths.batch_time(t, x)
        if cond is None or guidance is None or guidance == 1.0:
            return self._velocity(x, t, cond)
        null = self.null_condition(x.shape[0], x.device)
        v = self._velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        v_cond, v_null = v.chunk(2)
        return v_null + guidance * (v_cond - v_null)

    def x0(self, x, t, cond=None, guidance=None):
        t = paths.batch_time(t, x)
        return paths.velocity_to_x0(x, t, self.velocity(x, t, cond, guidance))

    def eps(self, x, t, cond=None, guidance=None):
        t = paths.batch_time(t, x)
        return paths.velocity_to_eps(x, t, self.velocity(x, t, cond, guidance))

    def score(self, x, t, cond=None, guidance=None):
        t = paths.batch_time(t, x)
        return paths.velocity_to_score(x, t, self.velocity(x, t, cond, guidance))

    def null_condition(self, batch: int, device=None) -> torch.Tensor:
        if self.num_classes is None:
            raise ValueError(f"{type(self).__name__} is unconditional: it has no null condition")
        return torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)

    # pixel-space teachers: the latent space is the data space
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond=None, steps: int = 50, solver: str = "euler",
               guidance: float | None = None) -> torch.Tensor:
        """The teacher's own multi-step sampler: integrate the flow ODE from t = 1 to 0."""
        return solve_ode(lambda x, t: self.velocity(x, t, cond, guidance), noise, steps=steps, solver=solver)

    def backbone(self) -> nn.Module | None:
        """The network students and fake-score nets are initialised from (None for analytic teachers)."""
        return None
