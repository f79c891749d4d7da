"""Attention kernels with forward-mode AD (JVP) support."""
from .attention import DEFAULT_BLOCK_SIZE, FusedAttentionFunction, fused_attention, math_attention

__all__ = ["DEFAULT_BLOCK_SIZE", "FusedAttentionFunction", "fused_attention", "math_attention"]
