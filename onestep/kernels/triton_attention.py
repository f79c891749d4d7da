"""Triton kernels for :func:`onestep.kernels.fused_attention`: forward, JVP and backward.

Same maths and saved state as the torch blockwise path in ``attention.py`` (row log-sum-exp
``lse``; fully masked rows give O = 0 and lse = +inf), so either implementation's backward/JVP can
consume the other's forward. One program handles one (batch*head, query block) for the forward, the
JVP and dQ, and one (batch*head, key block) for dK/dV (FlashAttention-2's split, no atomics).

Used only when asked for (``fused_attention(..., impl="triton")``, attention backend
``fused_triton``): ``impl="auto"`` stays on the torch path until ``benchmarks/gpu_check.py`` has
compared these kernels with it on a GPU. CUDA tensors of dtype fp16/bf16/fp32; on CPU the kernels
run only under Triton's interpreter, which is for correctness tests, not speed. Triton reads
``TRITON_INTERPRET`` when ``@triton.jit`` wraps a function, and ``triton.language`` wraps its own
helpers (``tl.zeros``, ``tl.sum``...) when it is imported, so the variable must be set before triton
is first imported in the process (the tests use a subprocess).

fp32 inputs use IEEE-precision dots (no TF32), fp16/bf16 inputs use tensor-core dots with fp32
accumulation; probabilities are cast to V's dtype before the P V products, as FlashAttention does.
"""
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the torch path covers everything
    triton = None
    tl = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether triton was imported in interpreter mode (TRITON_INTERPRET=1 at import time)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    # triton.language's own helpers (tl.zeros, tl.sum, ...) are jitted when triton is imported, so
    # the mode is fixed then; setting the variable later does not help.
    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_fwd_kernel, InterpretedFunction)


def unavailable_reason(q: torch.Tensor):
    """None when the Triton kernels can run on q's device and dtype, else why not (one line)."""
    if triton is None:
        return "triton is not installed"
    if q.dtype not in _DTYPES:
        return f"the Triton kernels support fp16, bf16 and fp32, not {q.dtype}"
    if q.is_cuda:
        return None
    if q.device.type != "cpu" or not interpreting():
        return ("the Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
                "imported")
    if q.dtype == torch.bfloat16:
        # triton 3.8's interpreter returns garbage from tl.dot on bf16 operands (a 16x16 bf16 dot
        # kernel alone reproduces it), so bf16 is only supported compiled, on GPUs
        return "Triton's CPU interpreter computes bf16 dots wrongly; use fp16/fp32 there"
    return None


def is_available(q: torch.Tensor) -> bool:
    """True when the Triton kernels can run on q's device and dtype."""
    return unavailable_reason(q) is None


if triton is not None:

    @triton.jit
    def _scores(q, kt, mask_ptrs, rows, cols, scale, N, M, HAS_MASK: tl.constexpr):
        """s = scale q kt (+ mask), columns past M set to -inf. q: [BM, BD], kt: [BD, BN]."""
        s = tl.dot(q, kt, input_precision="ieee") * scale
        if HAS_MASK:
            s += tl.load(mask_ptrs, mask=(rows[:, None] < N) & (cols[None, :] < M), other=0.0).to(tl.float32)
        return tl.where(cols[None, :] < M, s, float("-inf"))
    @triton.jit
    def _fwd_kernel(Q, K, V, Mask, Out, Lse, scale, H, N, M, D, DV,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, smb, smh, smn, smm,
                    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        row_ok = rows < N
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start in range(0, M, BLOCK_N):
            cols = start + offs_n
            kt = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None],
                         mask=d_ok[:, None] & (cols[None, :] < M), other=0.0)
            mask_ptrs = Mask + b * smb + h * smh + rows[:, None] * smn + cols[None, :] * smm
            s = _scores(q, kt, mask_ptrs, rows, cols, scale, N, M, HAS_MASK)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows fully masked so far keep max -inf: shift them by 0 so exp gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_dv[None, :],
                        mask=(cols[:, None] < M) & dv_ok[None, :], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_i))
        # outputs are contiguous [B*H, N, DV] and [B*H, N]
        tl.store(Out + bh * N * DV + rows[:, None] * DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(Lse + bh * N + rows, lse, mask=row_ok)

    @triton.jit
    def _jvp_kernel(Q, K, V, O, Lse, dQ, dK, dV, Mask, dOut, dLse, scale, H, N, M, D, DV,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, smb, smh, smn, smm,
                    HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
                    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        # tangents share their primal's strides (the wrapper makes all of them contiguous)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        row_ok = rows < N
        q_off = b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :]
        q_msk = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=q_msk, other=0.0)
        if HAS_DQ:
            dq = tl.load(dQ + q_off, mask=q_msk, other=0.0)
        lse = tl.load(Lse + bh * N + rows, mask=row_ok, other=float("inf"))
        acc_v = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)   # sum_j P_ij dV_j
        acc_s = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)   # sum_j P_ij dS_ij V_j
        mu = tl.zeros([BLOCK_M], tl.float32)                # sum_j P_ij dS_ij
        for start in range(0, M, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < M
            kt_off = b * skb + h * skh + cols[None, :] * skn + offs_d[:, None]
            mask_ptrs = Mask + b * smb + h * smh + rows[:, None] * smn + cols[None, :] * smm
            kt = tl.load(K + kt_off, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            s = _scores(q, kt, mask_ptrs, rows, cols, scale, N, M, HAS_MASK)
            p = tl.exp(s - lse[:, None])          # exact probabilities from the saved lse
            v_off = b * svb + h * svh + cols[:, None] * svn + offs_dv[None, :]
            v_msk = col_ok[:, None] & dv_ok[None, :]
            if HAS_DV:
                dv = tl.load(dV + v_off, mask=v_msk, other=0.0)
                acc_v += tl.dot(p.to(dv.dtype), dv, input_precision="ieee")
            if HAS_DQ or HAS_DK:
                ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                if HAS_DQ:
                    ds += tl.dot(dq, kt, input_precision="ieee")
                if HAS_DK:
                    dkt = tl.load(dK + kt_off, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
                    ds += tl.dot(q, dkt, input_precision="ieee")
                pds = p * (ds * scale)
                mu += tl.sum(pds, 1)
                v = tl.load(V + v_off, mask=v_msk, other=0.0)
                acc_s += tl.dot(pds.to(v.dtype), v, input_precision="ieee")
        o = tl.load(O + bh * N * DV + rows[:, None] * DV + offs_dv[None, :],
                    mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        dout = acc_v + acc_s - mu[:, None] * o
        tl.store(dOut + bh * N * DV + rows[:, None] * DV + offs_dv[None, :], dout,
                 mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(dLse + bh * N + rows, mu, mask=row_ok)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, Lse, Delta, dO, dQ, Mask, scale, H, N, M, D, DV,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, smb, smh, smn, smm,
                       HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """dQ_i = scale sum_j P_ij (dP_ij - delta_i) K_j,  dP = dO V^T."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
        b = bh // H
        h = bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        row_ok = rows < N
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(dO + bh * N * DV + rows[:, None] * DV + offs_dv[None, :],
                     mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        lse = tl.load(Lse + bh * N + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + bh * N + rows, mask=row_ok, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, M, BLOCK_N):
            cols = start + offs_n
            col_ok = cols < M
            kt_off = b * skb + h * skh + cols[None, :] * skn + offs_d[:, None]
            mask_ptrs = Mask + b * smb + h * smh + rows[:, None] * smn + cols[None, :] * smm
            kt = tl.load(K + kt_off, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            s = _scores(q, kt, mask_ptrs, rows, cols, scale, N, M, HAS_MASK)
            p = tl.exp(s - lse[:, None])
            vt = tl.load(V + b * svb + h * svh + cols[None, :] * svn + offs_dv[:, None],
                         mask=dv_ok[:, None] & col_ok[None, :], other=0.0)
            dp = tl.dot(do.to(vt.dtype), vt, input_precision="ieee")
            ds = p * (dp - delta[:, None])
            acc += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
        tl.store(dQ + bh * N * D + rows[:, None] * D + offs_d[None, :], acc * scale,
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, Lse, Delta, dO, dK, dV, Mask, scale, H, N, M, D, DV,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, smb, smh, smn, smm,
                         HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """dV_j = sum_i P_ij dO_i,  dK_j = scale sum_i P_ij (dP_ij - delta_i) Q_i, for one key block."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*H*N*D
        b = bh // H
        h = bh % H
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_m = tl.arange(0, BLOCK_M)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV
        col_ok = cols < M
        kt = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        vt = tl.load(V + b * svb + h * svh + cols[None, :] * svn + offs_dv[:, None],
                     mask=dv_ok[:, None] & col_ok[None, :], other=0.0)
        acc_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        acc_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        for start in range(0, N, BLOCK_M):
            rows = start + offs_m
            row_ok = rows < N
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            mask_ptrs = Mask + b * smb + h * smh + rows[:, None] * smn + cols[None, :] * smm
            s = _scores(q, kt, mask_ptrs, rows, cols, scale, N, M, HAS_MASK)
            lse = tl.load(Lse + bh * N + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + bh * N + rows, mask=row_ok, other=0.0)
            p = tl.exp(s - lse[:, None])          # rows past N have lse = +inf -> p = 0
            do = tl.load(dO + bh * N * DV + rows[:, None] * DV + offs_dv[None, :],
                         mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            acc_v += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")
            dp = tl.dot(do.to(vt.dtype), vt, input_precision="ieee")
            ds = p * (dp - delta[:, None])
            acc_k += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee")
        tl.store(dK + bh * M * D + cols[:, None] * D + offs_d[None, :], acc_k * scale,
                 mask=col_ok[:, None] & d_ok[None, :])
        tl.store(dV + bh * M * DV + cols[:, None] * DV + offs_dv[None, :], acc_v,
                 mask=col_ok[:, None] & dv_ok[None, :])


def _plain(t):
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor

    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def _outside_functorch(fn):
    """Run fn on plain tensors with functorch disabled.

    torch.func.jvp/grad hand an autograd.Function's jvp/backward functorch-wrapped tensors (and
    would wrap new allocations too), which Triton cannot read. Nothing here records autograd, so
    unwrapping is safe; functorch lifts the plain results back to its levels.
    """

    @functools.wraps(fn)
    def wrapper(*args):
        with torch._C._DisableFuncTorch():
            return fn(*(_plain(a) if isinstance(a, torch.Tensor) else a for a in args))

    return wrapper


def _kernels():
    return {"fwd": _fwd_kernel, "jvp": _jvp_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}


def _block_sizes(q, v):
    D, DV = q.shape[-1], v.shape[-1]
    bd = max(16, triton.next_power_of_2(D))
    bdv = max(16, triton.next_power_of_2(DV))
    # 64 x 64 tiles fit registers/shared memory for head dims up to 128 at fp32 accumulation
    bm = bn = 64 if max(bd, bdv) <= 128 else 32
    return bm, bn, bd, bdv


def _prep(q, k, v, mask):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, _ = q.shape
    M = k.shape[2]
    if mask is None:
        mask4, mstr = q, (0, 0, 0, 0)   # any valid pointer; never read
    else:
        if mask.dtype == torch.bool:
            # keep-mask -> additive 0 / -inf (same broadcast shape, so no N x M unless it was one)
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
        mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, H, N, M)
        mstr = mask4.stride()
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2)) + tuple(mstr)
    return q, k, v, mask4, strides


@_outside_functorch
def triton_forward(q, k, v, mask, scale):
    """Returns (out [B,H,N,Dv] in q.dtype, lse [B,H,N] fp32)."""
    q, k, v, mask4, strides = _prep(q, k, v, mask)
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    out = torch.empty(B, H, N, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    bm, bn, bd, bdv = _block_sizes(q, v)
    grid = (triton.cdiv(N, bm), B * H)
    _kernels()["fwd"][grid](q, k, v, mask4, out, lse, scale, H, N, M, D, DV, *strides,
                            HAS_MASK=mask is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
    return out, lse


@_outside_functorch
def triton_jvp(q, k, v, out, lse, dq, dk, dv, mask, scale):
    """Returns (dout [B,H,N,Dv] in out.dtype, dlse [B,H,N] fp32); None tangents count as zero."""
    q, k, v, mask4, strides = _prep(q, k, v, mask)
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    out = out.contiguous()
    lse = lse.float().contiguous()
    dq_, dk_, dv_ = (t.to(q.dtype).contiguous() if t is not None else q for t in (dq, dk, dv))
    dout = torch.empty(B, H, N, DV, dtype=torch.float32, device=q.device)
    dlse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    bm, bn, bd, bdv = _block_sizes(q, v)
    grid = (triton.cdiv(N, bm), B * H)
    _kernels()["jvp"][grid](q, k, v, out, lse, dq_, dk_, dv_, mask4, dout, dlse, scale, H, N, M, D, DV,
                            *strides, HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None,
                            HAS_MASK=mask is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
    return dout.to(out.dtype), dlse.to(lse.dtype)


@_outside_functorch
def triton_backward(q, k, v, out, lse, dout, dlse, mask, scale):
    """Returns (dq, dk, dv) in the input dtypes; dout/dlse may be None (zero)."""
    q_dtype, k_dtype, v_dtype = q.dtype, k.dtype, v.dtype
    q, k, v, mask4, strides = _prep(q, k, v, mask)
    B, H, N, D = q.shape
    M, DV = k.shape[2], v.shape[-1]
    if dout is None:
        dout = torch.zeros(B, H, N, DV, dtype=q.dtype, device=q.device)
    dout = dout.contiguous()
    # delta_i = sum_d dO_id O_id (fp32); a gradient on lse enters as delta - g_lse
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    dq = torch.empty(B, H, N, D, dtype=torch.float32, device=q.device)
    dk = torch.empty(B, H, M, D, dtype=torch.float32, device=q.device)
    dv = torch.empty(B, H, M, DV, dtype=torch.float32, device=q.device)
    bm, bn, bd, bdv = _block_sizes(q, v)
    kern = _kernels()
    meta = dict(HAS_MASK=mask is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv)
    kern["dq"][(triton.cdiv(N, bm), B * H)](q, k, v, lse, delta, dout, dq, mask4, scale, H, N, M, D, DV,
                                             *strides, **meta)
    kern["dkdv"][(triton.cdiv(M, bn), B * H)](q, k, v, lse, delta, dout, dk, dv, mask4, scale, H, N, M, D, DV,
                                               *strides, **meta)
    return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype)
