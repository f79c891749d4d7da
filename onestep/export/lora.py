"""A student as a peft-format LoRA on its teacher: each changed weight's difference from the teacher, factored
by truncated SVD."""
from __future__ import annotations

import torch

from onestep.errors import ExportError

#: default rank and largest relative residual ||delta - B A|| / ||delta|| of an SVD LoRA export
LORA_RANK = 64
LORA_TOL = 1e-3


def _effective_weights(net) -> dict[str, torch.Tensor]:
    """name -> parameter of `net` (with any peft LoRA layers merged: the names of the plain network)."""
    return {name: p.detach() for name, p in net.named_parameters()}


def lora_from_delta(teacher_net, student_net, rank: int):
    """peft-format LoRA layers {module.lora_A.weight, module.lora_B.weight, module.lora_B.bias} with
    lora_B @ lora_A = the student's weight - the teacher's (truncated SVD at `rank`, scale 1), and a
    report {"worst": (name, relative residual), "modules": count}. A changed parameter that no LoRA
    can carry (norms, embeddings, raw parameters) counts as residual 1 and is left out."""
    from torch import nn

    before, after = _effective_weights(teacher_net), _effective_weights(student_net)
    if set(before) != set(after):
        raise ExportError("the student's backbone does not have the teacher's parameters; cannot diff for a LoRA")
    modules = dict(teacher_net.named_modules())
    changed = sorted({n.rsplit(".", 1)[0] for n in after if not torch.equal(after[n], before[n])})
    layers: dict[str, torch.Tensor] = {}
    worst = ("none", 0.0)
    any_bias = any(not torch.equal(after[f"{m}.bias"], before[f"{m}.bias"])
                   for m in changed if f"{m}.bias" in after)
    count, biasless = 0, 0
    for name in changed:
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or (set(
                n for n in after if n.rsplit(".", 1)[0] == name) - {f"{name}.weight", f"{name}.bias"}):
            for n in (n for n in after if n.rsplit(".", 1)[0] == name and not torch.equal(after[n], before[n])):
                if worst[1] < 1.0:
                    worst = (n, 1.0)
            continue
        w = after[f"{name}.weight"]
        delta = (w.double() - before[f"{name}.weight"].double()).reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        b = u[:, :r] * s[:r].sqrt()
        a = s[:r].sqrt()[:, None] * vh[:r]
        if r < rank:  # the same rank everywhere (zero padding): one LoRA config, no rank pattern
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
        norm = delta.norm().item()
        residual = (delta - b @ a).norm().item() / norm if norm > 0 else 0.0
        if residual > worst[1]:
            worst = (f"{name}.weight", residual)
        if isinstance(module, nn.Conv2d):
            a = a.reshape(rank, *w.shape[1:])
            b = b.reshape(w.shape[0], rank, 1, 1)
        layers[f"{name}.lora_A.weight"] = a.to(w.dtype).contiguous()
        layers[f"{name}.lora_B.weight"] = b.to(w.dtype).contiguous()
        if any_bias:
            bias = after.get(f"{name}.bias")
            biasless += bias is None
            layers[f"{name}.lora_B.bias"] = (torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if bias is None
                                             else (bias.double() - before[f"{name}.bias"].double()).to(w.dtype))
        count += 1
    if not layers:
        raise ExportError("the student's backbone equals the teacher's: there is no LoRA to export")
    return layers, {"worst": worst, "modules": count, "unfusable": biasless > 0}
