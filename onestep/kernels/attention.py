"""Memory-efficient attention with a backward *and* a forward-mode (JVP) rule.

    O = softmax(S) V,   S = scale * Q K^T + mask

PyTorch's fused SDPA kernels, xformers and diffusers' attention processors have no forward-mode AD,
which MeanFlow and sCM need (``torch.func.jvp`` through the whole network). The plain math path
supports it but materialises several N x M matrices. :func:`fused_attention` computes the output,
the gradients and the JVP tile by tile, keeping only O(N*D) tensors plus a few tiles:

* forward: online softmax over key blocks (running row max m and row sum l, rescaling the
  accumulator by exp(m_old - m_new) whenever the max grows); saves the row log-sum-exp
  ``lse = m + log l`` so later passes rebuild any tile of P = exp(S - lse) exactly, without a
  second normalisation pass.
* backward (FlashAttention-2): delta_i = sum_d dO_id O_id; per tile dP = dO V^T,
  dS = P * (dP - delta), dV += P^T dO, dQ += scale dS K, dK += scale dS^T Q.
* JVP: with tangents (dQ, dK, dV), dS = scale (dQ K^T + Q dK^T) and
  dO_i = sum_j P_ij dV_j + sum_j P_ij dS_ij V_j - mu_i O_i,   mu_i = sum_j P_ij dS_ij,
  accumulated per tile with P from the saved lse (so no rescaling is needed here); mu is also the
  tangent of lse.

The row log-sum-exp is a second (differentiable) output of the autograd.Function, so gradients
through it are exact too (dS gains P * g_lse); :func:`fused_attention` returns only O.

Fully masked rows give O = 0 (and lse = +inf internally, so P = 0 in every later pass), like
PyTorch's math SDPA.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["fused_attention", "math_attention", "DEFAULT_BLOCK_SIZE"]

# Tile shape (queries, keys). On CPU (B=1, H=8, D=64, N=4096, one thread) the JVP took 3.1 / 2.6 /
# 2.7 / 4.3 s with 256x512 / 512x512 / 512x1024 / 1024x1024 tiles (peak 65 / 84 / 121 / 151 MiB):
# large enough for BLAS-sized matmuls and little per-tile Python overhead, small enough to stay in
# cache-friendly territory. The matmuls are ~75 % of the time, so the kernel is compute-bound there.
DEFAULT_BLOCK_SIZE: Tuple[int, int] = (512, 512)
# Upper bound on the elements of one score tile; the batch is processed in chunks to respect it, so
# a large batch does not turn a "tile" into a full attention matrix.
_TILE_ELEMENTS = 1 << 23

BlockSize = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------------------
# Reference (exact math) path
# ------------------------------------------------------------------------------------------------
def math_attention(q, k, v, attn_mask=None, scale=None):
    """softmax(scale * Q K^T + mask) V with plain differentiable ops (supports every AD mode).

    Materialises the N x M score matrix. Boolean masks keep positions where True; float masks are
    added to the scores. Fully masked rows return 0 (as PyTorch's math SDPA does), not NaN.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask
    # Softmax is shift-invariant: subtract a detached (finite) row max for stability, then guard
    # rows whose every score is -inf (sum 0) so they give 0 instead of 0/0.
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.matmul(p, v)


# ------------------------------------------------------------------------------------------------
# Blockwise torch implementation
# ------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(block_size: BlockSize) -> Tuple[int, int]:
    if isinstance(block_size, int):
        bq = bk = block_size
    else:
        bq, bk = (int(b) for b in block_size)
    if bq < 1 or bk < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return bq, bk


class _Plan:
    """Tensor views and loop bounds shared by the forward, backward and JVP passes.

    Inputs are flattened to [B*H, N, D] (a view when contiguous); the mask keeps its own
    broadcastable 4-D shape and is sliced per tile, so a broadcast mask is never expanded.
    """

    def __init__(self, q, k, mask, block_size):
        self.B, self.H, self.N, self.D = q.shape
        self.M = k.shape[2]
        bq, bk = _blocks(block_size)
        self.bk = min(bk, self.M)
        self.bq = min(bq, self.N)
        # Keep one tile (batch chunk x heads x bq x bk) under the element budget: first shrink the
        # query block, then process the batch in chunks.
        while self.H * self.bq * self.bk > _TILE_ELEMENTS and self.bq > 16:
            self.bq = max(16, self.bq // 2)
        self.bb = max(1, min(self.B, _TILE_ELEMENTS // max(1, self.H * self.bq * self.bk)))
        self.mask = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))

    def tiles_b(self):
        for b0 in range(0, self.B, self.bb):
            yield b0, min(b0 + self.bb, self.B)

    def rows(self, b0, b1):
        return slice(b0 * self.H, b1 * self.H)

    def mask_tile(self, b0, b1, i0, i1, j0, j1):
        m = self.mask
        if m is None:
            return None
        return m[slice(b0, b1) if m.shape[0] > 1 else slice(None), :,
                 slice(i0, i1) if m.shape[2] > 1 else slice(None),
                 slice(j0, j1) if m.shape[3] > 1 else slice(None)]

    def apply_mask(self, s, b0, b1, i0, i1, j0, j1):
        """Adds the mask to a score tile s [(b1-b0)*H, bq, bk] in place."""
        mt = self.mask_tile(b0, b1, i0, i1, j0, j1)
        if mt is None:
            return s
        s4 = s.view(b1 - b0, self.H, i1 - i0, j1 - j0)
        if mt.dtype == torch.bool:
            s4.masked_fill_(~mt, float("-inf"))
        else:
            s4.add_(mt)
        return s


def _flat(x, dtype):
    return x.reshape(-1, x.shape[-2], x.shape[-1]).to(dtype)


def _torch_forward(q, k, v, mask, scale, block_size):
    """Blockwise forward with online softmax. Returns (out [B,H,N,Dv] in q.dtype, lse [B,H,N])."""
    plan = _Plan(q, k, mask, block_size)
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = _flat(q, acc), _flat(k, acc), _flat(v, acc)
    G, N, Dv, M = qf.shape[0], plan.N, vf.shape[-1], plan.M
    out = torch.empty(G, N, Dv, dtype=acc, device=q.device)
    lse = torch.empty(G, N, 1, dtype=acc, device=q.device)
    kT = kf.transpose(1, 2)
    for b0, b1 in plan.tiles_b():
        g = plan.rows(b0, b1)
        for i0 in range(0, N, plan.bq):
            i1 = min(i0 + plan.bq, N)
            qs = qf[g, i0:i1] * scale
            m = l = o = m_run = None
            for j0 in range(0, M, plan.bk):
                j1 = min(j0 + plan.bk, M)
                s = torch.bmm(qs, kT[g, :, j0:j1])
                plan.apply_mask(s, b0, b1, i0, i1, j0, j1)
                m_new = s.amax(-1, keepdim=True)
                if m is not None:
                    m_new = torch.maximum(m, m_new)
                # A row that is fully masked so far has max -inf; shift it by 0 so exp gives 0.
                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = s.sub_(m_safe).exp_()
                if o is None:
                    l = p.sum(-1, keepdim=True)
                    o = torch.bmm(p, vf[g, j0:j1])
                else:
                    alpha = torch.exp(m_run - m_safe)  # rescale what was accumulated under the old max
                    l = l.mul_(alpha).add_(p.sum(-1, keepdim=True))
                    o = o.mul_(alpha).baddbmm_(p, vf[g, j0:j1])
                m, m_run = m_new, m_safe
            empty = l == 0
            out[g, i0:i1] = o / torch.where(empty, torch.ones_like(l), l)
            lse[g, i0:i1] = torch.where(empty, torch.full_like(l, float("inf")), m_run + torch.log(l))
    B, H = q.shape[:2]
    return out.view(B, H, N, Dv).to(q.dtype), lse.view(B, H, N)


def _torch_backward(q, k, v, out, lse, dout, dlse, mask, scale, block_size):
    """FlashAttention-2 style blockwise backward. Returns (dq, dk, dv) in the input dtypes."""
    plan = _Plan(q, k, mask, block_size)
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = _flat(q, acc), _flat(k, acc), _flat(v, acc)
    G, N, M = qf.shape[0], plan.N, plan.M
    lsef = lse.reshape(G, N, 1).to(acc)
    if dout is None:
        dof = torch.zeros(G, N, vf.shape[-1], dtype=acc, device=q.device)
    else:
        dof = _flat(dout, acc)
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij; a gradient g_lse on lse_i adds P_ij g_lse_i to
    # dS_ij, i.e. it enters as delta_i - g_lse_i.
    delta = (dof * _flat(out, acc)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.reshape(G, N, 1).to(acc)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    kT, vT = kf.transpose(1, 2), vf.transpose(1, 2)
    for b0, b1 in plan.tiles_b():
        g = plan.rows(b0, b1)
        for i0 in range(0, N, plan.bq):
            i1 = min(i0 + plan.bq, N)
            qs = qf[g, i0:i1] * scale
            do_i = dof[g, i0:i1]
            lse_i, delta_i = lsef[g, i0:i1], delta[g, i0:i1]
            dq_i = dq[g, i0:i1]
            for j0 in range(0, M, plan.bk):
                j1 = min(j0 + plan.bk, M)
                s = torch.bmm(qs, kT[g, :, j0:j1])
                plan.apply_mask(s, b0, b1, i0, i1, j0, j1)
                p = s.sub_(lse_i).exp_()
                dv[g, j0:j1].baddbmm_(p.transpose(1, 2), do_i)
                ds = torch.bmm(do_i, vT[g, :, j0:j1]).sub_(delta_i).mul_(p)   # dS / scale-free
                dq_i.baddbmm_(ds, kf[g, j0:j1])
                dk[g, j0:j1].baddbmm_(ds.transpose(1, 2), qs)                  # qs carries the scale
    dq.mul_(scale)
    return (dq.view(q.shape).to(q.dtype), dk.view(k.shape).to(k.dtype), dv.view(v.shape).to(v.dtype))


def _torch_jvp(q, k, v, out, lse, dq, dk, dv, mask, scale, block_size):
    """Blockwise JVP. Returns (dout [B,H,N,Dv], dlse [B,H,N]) for tangents dq, dk, dv (None = 0)."""
    plan = _Plan(q, k, mask, block_size)
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = _flat(q, acc), _flat(k, acc), _flat(v, acc)
    G, N, M, Dv = qf.shape[0], plan.N, plan.M, vf.shape[-1]
    lsef = lse.reshape(G, N, 1).to(acc)
    # dS = scale (dQ K^T + Q dK^T) as ONE matmul over a doubled head dim: [dQ | Q] [K | dK]^T.
    if dq is not None and dk is not None:
        lhs = torch.cat([_flat(dq, acc), qf], -1) * scale
        rhsT = torch.cat([kf, _flat(dk, acc)], -1).transpose(1, 2)
    elif dq is not None:
        lhs, rhsT = _flat(dq, acc) * scale, kf.transpose(1, 2)
    elif dk is not None:
        lhs, rhsT = qf * scale, _flat(dk, acc).transpose(1, 2)
    else:
        lhs = rhsT = None
    dvf = None if dv is None else _flat(dv, acc)
    dout = torch.zeros(G, N, Dv, dtype=acc, device=q.device)
    mu = torch.zeros(G, N, 1, dtype=acc, device=q.device)
    kT = kf.transpose(1, 2)
    for b0, b1 in plan.tiles_b():
        g = plan.rows(b0, b1)
        for i0 in range(0, N, plan.bq):
            i1 = min(i0 + plan.bq, N)
            qs = qf[g, i0:i1] * scale
            lse_i = lsef[g, i0:i1]
            do_i, mu_i = dout[g, i0:i1], mu[g, i0:i1]
            for j0 in range(0, M, plan.bk):
                j1 = min(j0 + plan.bk, M)
                s = torch.bmm(qs, kT[g, :, j0:j1])
                plan.apply_mask(s, b0, b1, i0, i1, j0, j1)
                p = s.sub_(lse_i).exp_()
                if dvf is not None:
                    do_i.baddbmm_(p, dvf[g, j0:j1])
                if lhs is not None:
                    pds = torch.bmm(lhs[g, i0:i1], rhsT[g, :, j0:j1]).mul_(p)
                    mu_i.add_(pds.sum(-1, keepdim=True))
                    do_i.baddbmm_(pds, vf[g, j0:j1])
    if lhs is not None:
        dout.sub_(mu * _flat(out, acc))
    B, H = q.shape[:2]
    return dout.view(B, H, N, Dv).to(out.dtype), mu.view(B, H, N)


# ------------------------------------------------------------------------------------------------
# Dispatch between the torch and Triton implementations
# ------------------------------------------------------------------------------------------------
_IMPLS = ("auto", "torch", "triton")


def _triton_unavailable(q) -> Optional[str]:
    from . import triton_attention

    return triton_attention.unavailable_reason(q)


def _resolve_impl(impl: str, q) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}; got {impl!r}")
    if impl == "auto":
        # The Triton kernels are checked only under the CPU interpreter so far: they run when asked for
        # (impl="triton", backend "fused_triton") until benchmarks/gpu_check.py passes on a GPU.
        return "torch"
    if impl == "triton":
        reason = _triton_unavailable(q)
        if reason is not None:
            raise RuntimeError(f"fused_attention(impl='triton'): {reason}")
    return impl


def _forward(impl, *args):
    if impl == "triton":
        from .triton_attention import triton_forward

        return triton_forward(*args[:-1])
    return _torch_forward(*args)


def _jvp(impl, *args):
    if impl == "triton":
        from .triton_attention import triton_jvp

        return triton_jvp(*args[:-1])
    return _torch_jvp(*args)


def _backward(impl, *args):
    if impl == "triton":
        from .triton_attention import triton_backward

        return triton_backward(*args[:-1])
    return _torch_backward(*args)


_JVP_NOT_DIFFERENTIABLE = (
    "fused_attention: the JVP (tangent) output is not differentiable. Detach it (MeanFlow/sCM targets "
    "are stop-gradient anyway), or use the 'math' attention backend if you need gradients of the JVP.")
_TRITON_NO_DOUBLE_BACKWARD = (
    "fused_attention: double backward through the Triton kernels is not supported; use impl='torch' "
    "(its backward is differentiable) or the 'math' backend.")


class _NotDifferentiable(torch.autograd.Function):
    """Identity on t whose backward raises `message`: marks a result as not differentiable.

    The JVP is computed without recording an autograd graph (recording it would keep every tile
    alive, which is what this kernel avoids), and the Triton backward runs outside autograd. Without
    the guard, backprop through such a result would silently treat it as a constant. The output
    requires grad only when one of `deps` does, so the common case costs nothing.
    """

    @staticmethod
    def forward(message, t, *deps):
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


class FusedAttentionFunction(torch.autograd.Function):
    """autograd.Function (forward, backward, jvp) returning (O, lse); see the module docstring."""

    @staticmethod
    def forward(q, k, v, mask, scale, block_size, impl):
        return _forward(impl, q, k, v, mask, scale, block_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, block_size, impl = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.save_for_forward(q, k, v, out, lse, mask)
        ctx.scale, ctx.block_size, ctx.impl = scale, block_size, impl
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 7
        dq, dk, dv = _backward(ctx.impl, q, k, v, out, lse, dout, dlse, mask, ctx.scale, ctx.block_size)
        if ctx.impl == "triton":  # the torch path records its ops, so its backward is differentiable
            deps = [t for t in (q, k, v, out, lse, dout, dlse) if t is not None]
            dq, dk, dv = (_NotDifferentiable.apply(_TRITON_NO_DOUBLE_BACKWARD, g, *deps) for g in (dq, dk, dv))
        return dq, dk, dv, None, None, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if dmask is not None:
            raise RuntimeError("fused_attention: forward-mode AD through attn_mask is not supported")
        with torch.no_grad():
            if dq is None and dk is None and dv is None:
                dout, dlse = torch.zeros_like(out), torch.zeros_like(lse)
            else:
                dout, dlse = _jvp(ctx.impl, q, k, v, out, lse, dq, dk, dv, mask, ctx.scale, ctx.block_size)
        deps = [t for t in (q, k, v, dq, dk, dv) if t is not None]
        return (_NotDifferentiable.apply(_JVP_NOT_DIFFERENTIABLE, dout, *deps),
                _NotDifferentiable.apply(_JVP_NOT_DIFFERENTIABLE, dlse, *deps))


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    impl: str = "auto",
) -> torch.Tensor:
    """softmax(scale * Q K^T + mask) V without materialising the N x M matrix; supports backward,
    ``torch.func.jvp``/``torch.func.grad`` and ``torch.autograd.forward_ad``.

    Args:
        q: [B, H, N, D]; k: [B, H, M, D]; v: [B, H, M, Dv] (SDPA's layout).
        attn_mask: broadcastable to [B, H, N, M]; bool = keep where True, float = added to scores.
            Not differentiable.
        scale: defaults to D ** -0.5.
        block_size: tile (queries, keys), or one int for both.
        impl: "auto" (the blockwise torch implementation, on every device), "torch" (the same) or
            "triton" (the Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, slow,
            for tests).

    fp16/bf16 inputs are accumulated in fp32 (float64 in float64); the output has q's dtype. The JVP
    output is not differentiable (backprop through it raises); the primal output is, also when it
    comes out of ``torch.func.jvp``. The torch path's backward is itself differentiable (double
    backward works); the Triton backward raises on double backward.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    M = k.shape[2]
    if k.shape[:2] != (B, H) or v.shape[:3] != (B, H, M) or k.shape[3] != D:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if attn_mask is not None:
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, (B, H, N, M)) == (B, H, N, M)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {(B, H, N, M)}")
        if attn_mask.requires_grad:
            raise ValueError("fused_attention: gradients with respect to attn_mask are not supported")
        if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise ValueError(f"attn_mask must be bool (keep) or floating (additive); got {attn_mask.dtype}")
    scale = D ** -0.5 if scale is None else float(scale)
    impl = _resolve_impl(impl, q)
    out, _ = FusedAttentionFunction.apply(q, k, v, attn_mask, scale, _blocks(block_size), impl)
    return out
