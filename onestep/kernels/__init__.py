"""Attention with forward-mode AD (JVP) support, and the diffusers attention-backend switch.

    fused_attention(q, k, v, attn_mask=None, scale=None, block_size=..., impl="auto")
    math_attention(q, k, v, attn_mask=None, scale=None)
    set_attention_backend(model, backend)   # backend in ATTENTION_BACKENDS
    with attention_backend(model, backend, **options): ...   # the same for one block, e.g. one sampling call
    block_sparse_attention(q, k, v, blocks, block_size)   # and the AdaSpa / FlexPrefill block searches

impl="auto" is the blockwise torch implementation on every device; the Triton kernels run only when
asked for (impl="triton", backend "fused_triton") until benchmarks/gpu_check.py passes on a GPU.

The diffusers part is imported lazily, so ``onestep.kernels`` does not import diffusers.
"""
from .attention import DEFAULT_BLOCK_SIZE, FusedAttentionFunction, fused_attention, math_attention
from .sparse_attention import AdaSpaSearch, FlexPrefillSearch, block_sparse_attention

_LAZY = ("ATTENTION_BACKENDS", "attention_backend", "OnestepAttnProcessor", "OnestepFluxAttnProcessor",
         "OnestepJointAttnProcessor", "OnestepSanaAttnProcessor", "set_attention_backend")

__all__ = ["DEFAULT_BLOCK_SIZE", "AdaSpaSearch", "FlexPrefillSearch", "FusedAttentionFunction",
           "block_sparse_attention", "fused_attention", "math_attention", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from . import diffusers_attention

        return getattr(diffusers_attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
