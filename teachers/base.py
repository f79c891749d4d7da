"""The Teacher interface: a frozen model that answers in flow time.

Subclasses implement `_velocity(x, t, cond)` (cond None = unconditional) in flow time; everything a
trainer or objective needs is derived here, in one place: classifier-free guidance, the x0 / eps /
score views and the teacher's own multi-step sampler.
"""
from __future__ import annotations

import copy
from typing import Callable, ClassVar, Sequence

import torch
from onestep.teachers.capabilities import FullSizeSpec, TeacherCapabilities
from torch import nn

from onestep import paths
from onestep.sampling import solve_ode

NULL_LABEL = -1  # class label meaning "no condition" for class-conditional teachers


class Teacher(nn.Module):
    #: what generic code may ask of the family (conditioning, latent or pixel, time kind, ...): see
    #: onestep.teachers.capabilities; the defaults describe an unconditional pixel flow teacher
    capabilities: ClassVar[TeacherCapabilities] = TeacherCapabilities()
    #: the family's tiny builder (teacher_cfg, folder, class_conditional) -> teacher options, wrapped in
    #: staticmethod; None: no tiny build (--dry-run and --smoke run the teacher as it is)
    tiny: ClassVar[Callable[..., dict] | None] = None
    #: the family's full-size models for --dry-run's estimate; None: no estimate
    full_size: ClassVar[FullSizeSpec | None] = None
    #: the family's exporter (onestep.export.Exporter), as "module:Class" so that importing the teacher does not
    #: import the export code; None: no exporter (or one registered with onestep.export.register_exporter)
    exporter: ClassVar[str | None] = None

    #: number of classes for class-conditional teachers, None for unconditional ones
    num_classes: int | None = None
    #: shape of one sample in the teacher's (latent) space, e.g. (1, 16, 16) or (2,)
    sample_shape: tuple[int, ...] = ()

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def check_config(cfg) -> None:
        """Check the family's options (its `Config`) before any weights are loaded; raise ConfigError."""

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
        v = self._velocity(torch.cat([x, x]), torch.cat([t, t]), self.cat_conditions([cond, null]))
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

    @staticmethod
    def cat_conditions(conds: Sequence):
        """Stack conditions along the batch: tensors (class labels) with torch.cat, conditioning objects
        (prompt embeddings) through their own `cat` classmethod."""
        if isinstance(conds[0], torch.Tensor):
            return torch.cat(list(conds))
        return type(conds[0]).cat(list(conds))

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

    def _shared_with_clones(self) -> tuple:
        """Objects that are not modules and that `with_backbone` clones share rather than copy."""
        return ()

    def with_backbone(self, backbone: nn.Module) -> "Teacher":
        """This adapter around another network of its backbone's architecture (e.g. a student's trainable
        copy): the same conversion to flow time, conditioning and samplers, computed by `backbone`.

        Every other module (VAE, text encoders) and the objects of `_shared_with_clones` are shared with
        this teacher, not copied; the modules that hold the backbone (e.g. EDM's preconditioning) are
        copied so that they hold the new one. The clone does not change `backbone`'s requires_grad.
        """
        own = self.backbone()
        if own is None:
            raise ValueError(f"{type(self).__name__} has no backbone to swap")
        # the old backbone's modules, parameters and buffers map to the new one's by name, so that any
        # reference the adapter keeps into its backbone points into the new one
        memo = {id(own): backbone}
        for old_items, new_items in ((own.named_modules(), backbone.named_modules()),
                                     (own.named_parameters(), backbone.named_parameters()),
                                     (own.named_buffers(), backbone.named_buffers())):
            new_by_name = dict(new_items)
            for name, item in old_items:
                if name not in new_by_name:
                    raise ValueError(f"the new backbone ({type(backbone).__name__}) lacks {name!r} of "
                                     f"{type(own).__name__}: not the same architecture")
                memo[id(item)] = new_by_name[name]
        holders = {""}  # the adapter itself and the modules on the way to its backbone are copied
        for name, module in self.named_modules(remove_duplicate=False):
            if module is own:
                parts = name.split(".")
                holders.update(".".join(parts[:i]) for i in range(1, len(parts)))
        for name, module in self.named_modules():
            if name not in holders and id(module) not in memo:
                memo[id(module)] = module
        for obj in self._shared_with_clones():
            memo[id(obj)] = obj
        return copy.deepcopy(self, memo)

    def _feature_from_output(self, name: str, output) -> torch.Tensor:
        """The activation `features` keeps from a hooked module's output: the first element of a tuple
        (UNet down blocks return (hidden_states, skips)). Transformer adapters whose blocks return
        (text_stream, image_stream) override this."""
        return output[0] if isinstance(output, (tuple, list)) else output

    #: the backbone's submodules whose outputs `features` returns by default (discriminator inputs)
    default_feature_layers: tuple[str, ...] = ()

    def features(self, x_t: torch.Tensor, t, cond=None, layers: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Outputs of the backbone's submodules named in `layers` while it computes v(x_t, t | cond).

        For discriminators on the frozen teacher (LADD, f-distill, SDXL-Lightning): not under no_grad, so
        a generator's gradient flows through the teacher into x_t. Forward hooks, always removed.
        """
        net = self.backbone()
        if net is None:
            raise NotImplementedError(f"{type(self).__name__} has no backbone to take features from")
        layers = list(self.default_feature_layers if layers is None else layers)
        modules = dict(net.named_modules())
        unknown = [name for name in layers if name not in modules]
        if unknown or not layers:
            top = sorted({n.split(".")[0] for n in modules if n})
            raise ValueError(f"feature layers {unknown or layers} not in {type(net).__name__}; "
                             f"pick submodule names such as {', '.join(top)} (dotted paths allowed)")
        found: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, args, output):
                found[name] = self._feature_from_output(name, output)
            return hook

        handles = [modules[name].register_forward_hook(keep(name)) for name in layers]
        try:
            self._velocity(x_t, paths.batch_time(t, x_t), cond)
        finally:
            for h in handles:
                h.remove()
        return [found[name] for name in layers]
