"""Route diffusers attention layers through onestep's attention, and switch backends.

``set_attention_backend(model, backend)`` walks every diffusers attention module of a model
(``diffusers.models.attention_processor.Attention`` and the ``AttentionModuleMixin`` classes such as
FLUX's ``FluxAttention``) and gives it a processor for one of :data:`ATTENTION_BACKENDS`:

* ``sdpa``: diffusers' own processors (``AttnProcessor2_0``, ``JointAttnProcessor2_0``,
  ``FluxAttnProcessor``, ``SanaAttnProcessor2_0``: PyTorch SDPA; fastest forward and backward, but
  no forward-mode AD).
* ``xformers``: diffusers' xformers processors (FLUX: its processor on diffusers' xformers dispatch
  backend; none exists for SANA's cross-attention, which is refused). CUDA only; optional extra
  ``onestep[xformers]``; no forward-mode AD.
* ``math``: exact softmax(QK^T)V with plain ops; supports every AD mode, materialises N x M.
* ``fused``: :func:`onestep.kernels.fused_attention` (its blockwise torch implementation on every
  device); supports backward and forward-mode AD (``torch.func.jvp``) with O(N) memory.
* ``fused_triton``: the same with ``impl="triton"``: the Triton kernels (CUDA; on CPU only under
  ``TRITON_INTERPRET=1``, for tests). Opt-in until ``benchmarks/gpu_check.py`` has passed on a GPU.
* ``sparse``: :func:`onestep.kernels.sparse_attention.block_sparse_attention` on a pattern chosen per
  module and call by ``search="adaspa"`` (searched at chosen denoising steps, reused in between) or
  ``search="flexprefill"`` (estimated at every call), keeping each head's blocks up to ``threshold`` of
  the attention mass; products with a mask (padded prompts) run dense through ``fused``. For long-sequence
  teachers' multi-step sampling; ``threshold=1`` keeps every block (dense attention). ``with
  attention_backend(model, "sparse", ...)`` scopes it to one sampling call (fresh searches, processors restored).

``UNet2DModel`` has no ``set_attn_processor`` in diffusers 0.42, hence the module walk. Processor
layouts handled, each reproducing the stock processor's computation with only the softmax attention
product swapped:

* plain (``AttnProcessor2_0``; UNets, ``BasicTransformerBlock``, DiT): spatial norm, group norm, 4-D
  feature maps, cross-attention with ``norm_cross``, masks, residual, output rescale;
* joint (``JointAttnProcessor2_0``; SD3/SD3.5): sample and context tokens attend together;
* flux (``FluxAttnProcessor``; FLUX's double blocks, joint with rotary embeddings, and its single
  blocks, self-attention with rotary embeddings and no output projection), with optional masks;
* sana_cross (``SanaAttnProcessor2_0``; SANA's cross-attention): q/k norms over all heads, padding mask;
* sana_linear (``SanaLinearAttnProcessor2_0``; SANA's self-attention): linear attention (ReLU feature
  maps, two matmuls, no softmax) written in plain differentiable ops, so ``torch.func.jvp`` already
  runs through it. Every backend keeps diffusers' processor there (there is no softmax product to route).

Modules with any other processor (added-KV, IP-adapter, LoRA processors, PAG variants, ...) or other
attention classes are reported, not silently skipped.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .attention import DEFAULT_BLOCK_SIZE, fused_attention, math_attention
from .sparse_attention import AdaSpaSearch, FlexPrefillSearch, block_sparse_attention

__all__ = ["ATTENTION_BACKENDS", "attention_backend", "OnestepAttnProcessor", "OnestepFluxAttnProcessor",
           "OnestepJointAttnProcessor", "OnestepSanaAttnProcessor", "set_attention_backend"]

ATTENTION_BACKENDS = ("sdpa", "xformers", "math", "fused", "fused_triton", "sparse")
_ONESTEP_BACKENDS = ("fused", "math", "fused_triton", "sparse")
#: backend "sparse": search name -> the per-module search class (onestep.kernels.sparse_attention)
SPARSE_SEARCHES = {"adaspa": AdaSpaSearch, "flexprefill": FlexPrefillSearch}

# Processor classes whose computation each layout below reproduces (by class name, so that diffusers
# versions without one of them still import this module).
_LAYOUTS = {
    "plain": {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "OnestepAttnProcessor"},
    "joint": {"JointAttnProcessor2_0", "XFormersJointAttnProcessor", "OnestepJointAttnProcessor"},
    "flux": {"FluxAttnProcessor", "OnestepFluxAttnProcessor"},
    "sana_cross": {"SanaAttnProcessor2_0", "OnestepSanaAttnProcessor"},
    "sana_linear": {"SanaLinearAttnProcessor2_0"},
}


class _Base:
    def __init__(self, backend: str = "fused", block_size=DEFAULT_BLOCK_SIZE, impl: str = "auto", search=None):
        if backend not in _ONESTEP_BACKENDS:
            raise ValueError(f"{type(self).__name__} backend must be one of {', '.join(_ONESTEP_BACKENDS)}; "
                             f"got {backend!r}")
        if backend == "fused_triton":
            if impl not in ("auto", "triton"):
                raise ValueError(f"backend 'fused_triton' runs impl='triton'; got impl={impl!r}")
            impl = "triton"
        if (backend == "sparse") != (search is not None):
            raise ValueError("backend 'sparse' needs a search object (AdaSpaSearch, FlexPrefillSearch), and only it")
        self.backend, self.block_size, self.impl, self.search = backend, block_size, impl, search

    def attend(self, q, k, v, mask, scale):
        """q, k, v: [B, H, N, D] -> [B, H, N, Dv]."""
        if self.backend == "math":
            return math_attention(q, k, v, mask, scale=scale)
        if self.backend == "sparse" and mask is None:
            blocks = self.search(q, k, scale)
            return block_sparse_attention(q, k, v, blocks, self.search.block_size, scale)
        # masked products (padded prompts) stay dense
        block_size = DEFAULT_BLOCK_SIZE if self.backend == "sparse" else self.block_size
        return fused_attention(q, k, v, mask, scale=scale, block_size=block_size, impl=self.impl)

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


class OnestepFluxAttnProcessor(_Base):
    """Processor for FLUX's ``FluxAttention``: the double blocks' joint attention (context tokens
    first, then image tokens) and the single blocks' self-attention over both (no output projection).

    Same computation as diffusers' ``FluxAttnProcessor``: per-head q/k RMS norms, rotary embeddings on
    q and k of every token (diffusers' ``apply_rotary_emb``, plain elementwise ops, so forward-mode AD
    runs through them), SDPA's default scale. ``attention_mask`` is taken as diffusers' native
    backend takes it: a [B, M] key mask, or anything broadcastable to [B, heads, N, M]; bool keeps
    where True, float is added to the scores.
    """

    # the exact signature of FluxAttnProcessor.__call__: FluxAttention.forward drops (with a warning)
    # keyword arguments that the processor's signature does not name
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        fused = getattr(attn, "fused_projections", False)
        if fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # tokens stay [B, L, heads, d] (as in diffusers) until the attention product
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if fused and hasattr(attn, "to_added_qkv"):
                cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                cq = attn.add_q_proj(encoder_hidden_states)
                ck = attn.add_k_proj(encoder_hidden_states)
                cv = attn.add_v_proj(encoder_hidden_states)
            cq = attn.norm_added_q(cq.unflatten(-1, (-1, attn.head_dim)))
            ck = attn.norm_added_k(ck.unflatten(-1, (-1, attn.head_dim)))
            cv = cv.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([cq, query], dim=1)
            key = torch.cat([ck, key], dim=1)
            value = torch.cat([cv, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        mask = attention_mask
        if mask is not None and mask.ndim == 2 and mask.shape[0] == query.shape[0] and mask.shape[1] == key.shape[1]:
            mask = mask[:, None, None, :]  # a per-key mask, as diffusers' native backend reads a 2-D one
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask, None)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            n_context = encoder_hidden_states.shape[1]
            context, out = out.split_with_sizes([n_context, out.shape[1] - n_context], dim=1)
            out = attn.to_out[0](out.contiguous())
            out = attn.to_out[1](out)
            return out, attn.to_add_out(context.contiguous())
        return out


class OnestepSanaAttnProcessor(_Base):
    """Processor for SANA's cross-attention (``SanaAttnProcessor2_0``): image tokens attend to the
    caption tokens under the caption's padding mask.

    Same computation as diffusers' processor: q/k norms applied before the head split (SANA's
    ``rms_norm_across_heads`` normalises all heads together), the [B, 1, M] bias mask repeated per
    head by ``attn.prepare_attention_mask``, SDPA's default scale, output divided by
    ``attn.rescale_output_factor``.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, kv_len = context.shape[0], context.shape[1]
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key, value = (_heads(t, batch, attn.heads) for t in (query, key, value))
        out = self.attend(query, key, value, mask, None)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out / attn.rescale_output_factor


_ONESTEP_PROCESSORS = {"plain": OnestepAttnProcessor, "joint": OnestepJointAttnProcessor,
                       "flux": OnestepFluxAttnProcessor, "sana_cross": OnestepSanaAttnProcessor}


def _layout(module) -> Optional[str]:
    name = type(getattr(module, "processor", None)).__name__
    for layout, names in _LAYOUTS.items():
        if name in names:
            return layout
    return None


def _stock_processor(backend: str, layout: str):
    """diffusers' own processor of `layout` for ``sdpa``/``xformers``; None where diffusers has none."""
    from diffusers.models import attention_processor as ap

    if layout == "plain":
        return ap.AttnProcessor2_0() if backend == "sdpa" else ap.XFormersAttnProcessor()
    if layout == "joint":
        return ap.JointAttnProcessor2_0() if backend == "sdpa" else ap.XFormersJointAttnProcessor()
    if layout == "flux":
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        proc = FluxAttnProcessor()
        if backend == "xformers":  # FLUX picks its kernel through diffusers' attention dispatcher
            proc._attention_backend = "xformers"
        return proc
    if layout == "sana_cross" and backend == "sdpa":
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

        return SanaAttnProcessor2_0()
    return None


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


def _check_triton() -> None:
    from .triton_attention import triton

    if triton is None:
        raise RuntimeError("attention backend 'fused_triton': triton is not installed; 'fused' runs the same "
                           "kernel's torch implementation")


def set_attention_backend(model: nn.Module, backend: str, *, block_size=DEFAULT_BLOCK_SIZE,
                          impl: str = "auto", search: str = "adaspa", threshold: float = 0.9,
                          sparse_block_size=64, **search_options) -> int:
    """Give every diffusers attention module of ``model`` a processor for ``backend``.

    backend: one of :data:`ATTENTION_BACKENDS`. ``block_size`` and ``impl`` are passed to
    :func:`fused_attention` (``fused`` only; ``fused_triton`` is ``fused`` with ``impl="triton"``).
    Returns the number of attention modules handled, SANA's linear-attention modules included (they
    keep diffusers' processor: see the module docstring). Raises ValueError (nothing changed) if some
    attention module uses a processor this cannot reproduce, and RuntimeError for ``xformers`` when it
    is not installed or the model is not on CUDA, and for ``fused_triton`` when triton is not
    installed (its device, CUDA, is checked when attention runs, since a model is often built on CPU
    and moved later). ``sparse``: every module gets its own ``SPARSE_SEARCHES[search](threshold,
    sparse_block_size, **search_options)`` (e.g. ``search_steps``/``research_every`` for AdaSpa,
    ``js_threshold`` for FlexPrefill).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
    if backend == "sparse":
        if search not in SPARSE_SEARCHES:
            raise ValueError(f"unknown sparse attention search {search!r}; allowed: {', '.join(SPARSE_SEARCHES)}")
        SPARSE_SEARCHES[search](threshold, sparse_block_size, **search_options)   # bad options fail before any change
    elif search_options:
        raise ValueError(f"search options ({', '.join(search_options)}) apply to backend 'sparse' only")
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers
        AttentionModuleMixin = ()

    targets, unsupported = [], []
    for name, module in model.named_modules():
        if not (isinstance(module, Attention) or (AttentionModuleMixin and isinstance(module, AttentionModuleMixin))):
            continue
        layout = _layout(module)
        label = f"{name or '<root>'} ({type(module.processor).__name__})"
        if layout is None:
            unsupported.append(label)
        elif backend == "xformers" and layout == "sana_cross":
            unsupported.append(f"{label}: diffusers has no xformers processor for it")
        else:
            targets.append((module, layout))
    if unsupported:
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise ValueError(f"set_attention_backend({backend!r}): cannot route these attention modules: "
                         f"{', '.join(unsupported[:5])}{more}")
    if backend == "xformers" and targets:
        _check_xformers(model)
    if backend == "fused_triton" and targets:
        _check_triton()
    for module, layout in targets:
        if layout == "sana_linear":
            continue  # already diffusers' SanaLinearAttnProcessor2_0, which forward-mode AD runs through
        if backend == "sparse":
            finder = SPARSE_SEARCHES[search](threshold, sparse_block_size, **search_options)
            module.set_processor(_ONESTEP_PROCESSORS[layout](backend, block_size=block_size, impl=impl, search=finder))
        elif backend in _ONESTEP_BACKENDS:
            module.set_processor(_ONESTEP_PROCESSORS[layout](backend, block_size=block_size, impl=impl))
        else:
            module.set_processor(_stock_processor(backend, layout))
    return len(targets)


@contextlib.contextmanager
def attention_backend(model: nn.Module, backend: str, **options):
    """`set_attention_backend(model, backend, **options)` for the duration of a `with` block, then every attention
    module gets its previous processor back. For a multi-step sampling call with ``backend="sparse"``: each call
    gets fresh search objects, so an AdaSpa pattern is searched on this call's inputs and reused over its own
    denoising steps only, e.g. ``with attention_backend(teacher.backbone(), "sparse", search="adaspa",
    threshold=0.9): teacher.sample(noise, cond, steps=50)``."""
    saved = [(m, m.processor) for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    set_attention_backend(model, backend, **options)
    try:
        yield model
    finally:
        for module, processor in saved:
            module.set_processor(processor)
