"""Route diffusers ``Attention`` layers through onestep's attention, and switch backends.

``set_attention_backend(model, backend)`` walks every ``diffusers.models.attention_processor.Attention``
module of a model and gives it a processor for one of :data:`ATTENTION_BACKENDS`:

* ``sdpa``: diffusers' own ``AttnProcessor2_0`` / ``JointAttnProcessor2_0`` (PyTorch SDPA; fastest
  forward and backward, but no forward-mode AD).
* ``xformers``: diffusers' xformers processors (CUDA only; optional extra ``onestep[xformers]``; no
  forward-mode AD).
* ``math``: exact softmax(QK^T)V with plain ops; supports every AD mode, materialises N x M.
* ``fused``: :func:`onestep.kernels.fused_attention`; supports backward and forward-mode AD
  (``torch.func.jvp``) with O(N) memory.

``UNet2DModel`` has no ``set_attn_processor`` in diffusers 0.42, hence the module walk. Two processor
layouts are handled: the plain one (UNet / ``BasicTransformerBlock``: spatial norm, group norm, 4-D
feature maps, cross-attention with ``norm_cross``, masks, residual, output rescale) and SD3's joint
one (sample and context tokens attend together). Modules with any other processor (added-KV,
IP-adapter, LoRA processors, ...) or other attention classes are reported, not silently skipped.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import DEFAULT_BLOCK_SIZE, fused_attention, math_attention

__all__ = ["ATTENTION_BACKENDS", "OnestepAttnProcessor", "OnestepJointAttnProcessor", "set_attention_backend"]

ATTENTION_BACKENDS = ("sdpa", "xformers", "math", "fused")

# Processor classes whose computation the two layouts below reproduce.
_PLAIN = {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "OnestepAttnProcessor"}
_JOINT = {"JointAttnProcessor2_0", "XFormersJointAttnProcessor", "OnestepJointAttnProcessor"}


class _Base:
    def __init__(self, backend: str = "fused", block_size=DEFAULT_BLOCK_SIZE, impl: str = "auto"):
        if backend not in ("fused", "math"):
            raise ValueError(f"{type(self).__name__} backend must be 'fused' or 'math'; got {backend!r}")
        self.backend, self.block_size, self.impl = backend, block_size, impl

    def attend(self, q, k, v, mask, scale):
        """q, k, v: [B, H, N, D] -> [B, H, N, Dv]."""
        if self.backend == "fused":
            return fused_attention(q, k, v, mask, scale=scale, block_size=self.block_size, impl=self.impl)
        return math_attention(q, k, v, mask, scale=scale)

    def __repr__(self):
        return f"{type(self).__name__}(backend={self.backend!r})"


def _heads(x, batch, heads):
    """[B, L, heads*d] -> [B, heads, L, d]."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class OnestepAttnProcessor(_Base):
    """Processor for diffusers' plain ``Attention`` (UNet blocks, ``BasicTransformerBlock``).

    Same computation as diffusers' ``AttnProcessor``/``AttnProcessor2_0`` with the attention product
    done by :func:`fused_attention` (``backend='fused'``) or :func:`math_attention` (``'math'``);
    scores use ``attn.scale``.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # feature map [B, C, H, W] -> tokens [B, HW, C]
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        kv_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]

        mask = None
        if attention_mask is not None:
            # diffusers pads/repeats the mask to [B*heads, 1 or N, M]; regroup as [B, heads, ., M]
            mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])

        if attn.group_norm is not None:
            # GroupNorm normalises channels of [B, C, L]. The transposed view is made contiguous:
            # group_norm's forward-AD rule fails on it ("view size is not compatible ...").
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2).contiguous()).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _heads(attn.to_k(context), batch, attn.heads)
        value = _heads(attn.to_v(context), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = self.attend(query, key, value, mask, attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        out = attn.to_out[0](out)  # projection
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class OnestepJointAttnProcessor(_Base):
    """Processor for SD3-style joint attention: sample and context tokens attend together.

    Same computation as diffusers' ``JointAttnProcessor2_0``; returns (sample, context) outputs when
    ``encoder_hidden_states`` is given, otherwise the sample output only.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("OnestepJointAttnProcessor: joint attention takes no attention_mask (as in diffusers)")
        batch, n_sample = hidden_states.shape[0], hidden_states.shape[1]
        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        key = _heads(attn.to_k(hidden_states), batch, attn.heads)
        value = _heads(attn.to_v(hidden_states), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq = _heads(attn.add_q_proj(encoder_hidden_states), batch, attn.heads)
            ck = _heads(attn.add_k_proj(encoder_hidden_states), batch, attn.heads)
            cv = _heads(attn.add_v_proj(encoder_hidden_states), batch, attn.heads)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query = torch.cat([query, cq], dim=2)
            key = torch.cat([key, ck], dim=2)
            value = torch.cat([value, cv], dim=2)

        # diffusers' joint processor uses SDPA's default scale (head_dim ** -0.5), not attn.scale
        out = self.attend(query, key, value, None, None)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            out, context = out[:, :n_sample], out[:, n_sample:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if encoder_hidden_states is not None:
            return out, context
        return out


def _layout(module) -> Optional[str]:
    name = type(getattr(module, "processor", None)).__name__
    if name in _PLAIN:
        return "plain"
    if name in _JOINT:
        return "joint"
    return None


def _processor(backend: str, layout: str, block_size, impl):
    if backend in ("fused", "math"):
        cls = OnestepAttnProcessor if layout == "plain" else OnestepJointAttnProcessor
        return cls(backend, block_size=block_size, impl=impl)
    from diffusers.models import attention_processor as ap

    if backend == "sdpa":
        return ap.AttnProcessor2_0() if layout == "plain" else ap.JointAttnProcessor2_0()
    return ap.XFormersAttnProcessor() if layout == "plain" else ap.XFormersJointAttnProcessor()


def _check_xformers(model: nn.Module) -> None:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        raise RuntimeError("attention backend 'xformers': xformers is not installed "
                           "(pip install onestep[xformers]); 'fused' and 'math' need no extra") from None
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cuda"}:
        raise RuntimeError(f"attention backend 'xformers' has no kernels for device(s) {sorted(devices)} "
                           "(CUDA only); use 'fused', 'math' or 'sdpa'")


def set_attention_backend(model: nn.Module, backend: str, *, block_size=DEFAULT_BLOCK_SIZE,
                          impl: str = "auto") -> int:
    """Give every diffusers ``Attention`` module of ``model`` a processor for ``backend``.

    backend: one of :data:`ATTENTION_BACKENDS`. ``block_size`` and ``impl`` are passed to
    :func:`fused_attention` (``fused`` only). Returns the number of modules set. Raises ValueError
    (nothing changed) if some attention module uses a processor this cannot reproduce, and
    RuntimeError for ``xformers`` when it is not installed or the model is not on CUDA.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers
        AttentionModuleMixin = ()

    targets, unsupported = [], []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            layout = _layout(module)
            if layout is None:
                unsupported.append(f"{name or '<root>'} ({type(module.processor).__name__})")
            else:
                targets.append((module, layout))
        elif AttentionModuleMixin and isinstance(module, AttentionModuleMixin):
            unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    if unsupported:
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise ValueError(f"set_attention_backend({backend!r}): cannot route these attention modules: "
                         f"{', '.join(unsupported[:5])}{more}")
    if backend == "xformers" and targets:
        _check_xformers(model)
    for module, layout in targets:
        module.set_processor(_processor(backend, layout, block_size, impl))
    return len(targets)
