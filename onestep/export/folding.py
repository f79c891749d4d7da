"""Folding a student's interval embedding (t - r fixed by the step grid) or a fixed time embedding into the
bias of the backbone's time embedding, so that a stock diffusers model computes the student exactly."""
from __future__ import annotations

import torch

from onestep.errors import ExportError


def fold_interval_embedding(unet, steps: int, interval_scale: float = 1000.0):
    """A plain `UNet2DModel` equal to `unet` with class label interval_scale (t - r) fixed at t - r = 1/steps.

    diffusers' UNet2DModel computes ``emb = time_embedding(time_proj(t)) + class_embedding(time_proj(label))``
    (both in the model's dtype, no scaling), and `time_embedding` ends with `linear_2` (no post-activation),
    so the constant class embedding is exactly an extra bias of `linear_2`.
    """
    from diffusers import UNet2DModel

    te = unet.time_embedding
    if unet.config.class_embed_type != "timestep" or te.post_act is not None or te.cond_proj is not None:
        raise ExportError("cannot fold the interval embedding: the UNet's time embedding is not "
                          "linear_1 -> act -> linear_2 with a timestep class embedding")
    label = _interval_label(steps, unet.device, interval_scale)
    with torch.no_grad():
        # the same float32 path as the forward pass; the sum b + c is rounded once, from float64
        const = unet.class_embedding(unet.time_proj(label)).to(unet.dtype)[0]
        bias = (te.linear_2.bias.double() + const.double()).to(te.linear_2.bias.dtype)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["class_embed_type"] = None
    plain = UNet2DModel.from_config(config).to(unet.device)
    if plain.dtype != unet.dtype:
        plain = plain.to(unet.dtype)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
    state["time_embedding.linear_2.bias"] = bias
    plain.load_state_dict(state, strict=True)
    return plain.eval().requires_grad_(False)


def fold_time_embedding(unet, timestep: float):
    """A copy of `unet` that embeds every timestep as it embeds `timestep` (for one-step exports only).

    diffusers' UNet2DModel computes ``emb = time_embedding(time_proj(timestep))`` with `time_embedding`
    = linear_1 -> act -> linear_2. With linear_1's weight 0 and its bias set to linear_1's output at
    time_proj(timestep), its output no longer depends on the input: a stock scheduler's timestep 1000
    then gives the dense-time student's embedding of `timestep`. Exact when the UNet is called at one
    time only, i.e. a one-step sampler.
    """
    import copy

    te = unet.time_embedding
    if te.cond_proj is not None:
        raise ExportError("cannot fold the time embedding: the UNet's time embedding has a condition projection")
    with torch.no_grad():
        t = torch.tensor([timestep], dtype=torch.float32, device=unet.device)
        pre = te.linear_1(unet.time_proj(t).to(unet.dtype))[0]  # the forward pass's own path
        folded = copy.deepcopy(unet)
        folded.time_embedding.linear_1.weight.zero_()
        folded.time_embedding.linear_1.bias.copy_(pre)
    return folded.eval().requires_grad_(False)


def _interval_label(steps: int, device, interval_scale: float = 1000.0) -> torch.Tensor:
    """interval_scale (t - r) for the first step, computed as onestep's sampler does (float32 t and r).

    On the uniform grid every step has the same t - r up to float32 rounding (exactly the same for
    step counts that are powers of two).
    """
    from onestep.sampling import time_grid

    grid = time_grid(steps, dtype=torch.float64)
    t = torch.tensor([grid[0].item()], dtype=torch.float32, device=device)
    r = torch.tensor([grid[1].item()], dtype=torch.float32, device=device)
    return (t - r) * interval_scale


def constant_interval_embedding(student, steps: int) -> torch.Tensor:
    """The [D] vector the student's interval embedding adds at every step of the uniform k-step grid,
    computed from the same float t and r as its sampler; ExportError if it is not one vector."""
    from onestep.paths import batch_time
    from onestep.sampling import time_grid

    weight = next(student.interval_embedding.parameters())
    like = torch.zeros(1, device=weight.device, dtype=weight.dtype)  # the sampler's t, r: the noise's dtype
    grid = time_grid(steps, dtype=torch.float64).tolist()
    with torch.no_grad():
        rows = [student.interval_embedding(student.interval_scale * (batch_time(t, like) - batch_time(r, like)))[0]
                for t, r in zip(grid[:-1], grid[1:])]
    first = rows[0]
    spread = max((row - first).abs().max().item() for row in rows)
    if spread > 1e-3 * first.abs().max().item() + 1e-6:
        raise ExportError(f"the student's interval embedding is not constant on the uniform {steps}-step grid "
                          f"(spread {spread:.2g}), so it cannot be folded; sample with onestep (student.sample)")
    return first


def _fold_site(module):
    """(tensor, kind) where a constant added to `module`'s output can be folded: an Embedding's rows
    or the bias of the last Linear of a diffusers TimestepEmbedding (directly or as `timestep_embedder`
    of a combined embedding whose output is that embedding plus other terms)."""
    from torch import nn

    if isinstance(module, nn.Embedding):
        return module.weight, "rows"
    for name in ("linear_2", "timestep_embedder.linear_2"):
        try:
            linear = module.get_submodule(name)
        except AttributeError:
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if getattr(owner, "post_act", None) is not None or linear.bias is None:
            break
        return linear.bias, "bias"
    raise ExportError(f"cannot fold the interval embedding into {type(module).__name__}: its output is not a "
                      "TimestepEmbedding's last Linear (plus other terms)")


def merge_peft_layers(net):
    """`net` (modified in place) with every peft LoRA layer merged into its base layer and replaced by it:
    a plain network of the original architecture, which stock diffusers saves and loads."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, so no LoRA layers
        return net
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    if "peft_config" in net.__dict__:  # diffusers' add_adapter bookkeeping
        del net.peft_config
    if getattr(net, "_hf_peft_config_loaded", False):
        net._hf_peft_config_loaded = False
    return net


def folded_backbone(student, steps: int, dtype: torch.dtype | None = None):
    """A frozen copy of the student's backbone with any peft LoRA layers merged and its k-step interval
    embedding folded in (exact up to one rounding of the sum, done in float64), in `dtype` (the
    teacher's: a bf16 teacher's student trains fp32 master weights, its export is bf16 like the teacher)."""
    import copy

    extra = constant_interval_embedding(student, steps)
    net = merge_peft_layers(copy.deepcopy(student.backbone)).eval().requires_grad_(False)
    if dtype is not None and any(p.dtype != dtype for p in net.parameters()):
        net = net.to(dtype)
    tensor, kind = _fold_site(net.get_submodule(student.time_embedding_name))
    with torch.no_grad():
        tensor.copy_((tensor.double() + extra.double().to(tensor.device)).to(tensor.dtype))  # rows: broadcast
    return net
