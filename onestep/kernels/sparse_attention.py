"""Block-sparse attention for long token sequences, and two ways to choose the blocks.

Queries and keys are cut into blocks (``block_size = (bq, bk)`` tokens). A pattern ``blocks`` is a boolean
tensor [B or 1, H, nq, nk]: query block i of head h attends to key block j where it is True. Attention
restricted to a pattern is

    O_i = sum_{j kept} exp(S_ij - lse_i) V_j,   lse_i = log sum_{j kept} exp(S_ij),   S = scale Q K^T,

computed by :func:`block_sparse_attention` with an online softmax over the kept key blocks: every query
block visits its own kept blocks one after the other (all query blocks and heads at once, padded to the
longest list), keeping a running row max and sum. With every block kept it is dense attention (to float32
rounding); a query block that keeps no block returns 0. The cost is proportional to the kept blocks.

Choosing the blocks:

* **AdaSpa-style** (:class:`AdaSpaSearch`): at chosen denoising steps a dense pass records every row's
  log-sum-exp and then the attention mass of each (query block, key block) pair (:func:`block_attention_mass`:
  the mean over the block's queries of the probability that falls in the key block). Each head keeps, per
  query block, the fewest key blocks whose mass reaches ``threshold`` (:func:`select_by_mass`), so heads with
  concentrated attention keep few blocks and diffuse heads many. The pattern barely changes between
  neighbouring denoising steps, so it is cached and reused until the next search step.
* **FlexPrefill-style** (:func:`flexprefill_blocks`): a cheap estimate of the block masses from mean-pooled
  query and key blocks, checked per head against the true masses of one representative query block (the
  last) by the Jensen-Shannon divergence. Heads whose estimate is good (divergence below ``js_threshold``)
  get the query-aware pattern (each query block keeps its estimated blocks up to ``threshold``); the
  others get a fixed pattern: the key blocks the representative block needs up to ``threshold``, for every
  query block, plus the block diagonal.

Everything here is plain torch, so it runs on any device and supports backward and forward-mode AD.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["AdaSpaSearch", "FlexPrefillSearch", "block_attention_mass", "block_sparse_attention",
           "flexprefill_blocks", "num_blocks", "select_by_mass"]

BlockSize = Union[int, Sequence[int]]


def _block_size(block_size: BlockSize) -> Tuple[int, int]:
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if bq < 1 or bk < 1:
        raise ValueError(f"block sizes must be >= 1, got {block_size}")
    return int(bq), int(bk)


def num_blocks(n_queries: int, n_keys: int, block_size: BlockSize) -> Tuple[int, int]:
    """(nq, nk): how many query and key blocks a pattern has for these sequence lengths."""
    bq, bk = _block_size(block_size)
    return math.ceil(n_queries / bq), math.ceil(n_keys / bk)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocked(x: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, ceil(L / size), size, D], zero-padded at the end."""
    B, H, L, D = x.shape
    n = math.ceil(L / size)
    x = torch.nn.functional.pad(x.to(dtype), (0, 0, 0, n * size - L))
    return x.reshape(B, H, n, size, D)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                           block_size: BlockSize = 64, scale: Optional[float] = None,
                           return_lse: bool = False):
    """softmax(scale Q K^T) V restricted to the kept (query block, key block) pairs of `blocks`.

    q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv]; blocks: bool [B or 1, H or 1, nq, nk] (`num_blocks`).
    Returns O [B, H, N, Dv] in q's dtype (and the row log-sum-exp [B, H, N] in float32/64 with
    `return_lse`; -inf for rows that keep nothing). Accumulates in float32 (float64 for float64 inputs).
    """
    B, H, N, D = q.shape
    M, Dv = k.shape[2], v.shape[-1]
    bq, bk = _block_size(block_size)
    nq, nk = num_blocks(N, M, (bq, bk))
    if blocks.dtype != torch.bool or blocks.ndim != 4 or tuple(blocks.shape[2:]) != (nq, nk):
        raise ValueError(f"blocks must be a bool tensor [B, H, {nq}, {nk}] for N={N}, M={M} and block size "
                         f"({bq}, {bk}), got {blocks.dtype} {tuple(blocks.shape)}")
    scale = D ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    blocks = blocks.to(q.device).expand(B, H, nq, nk)
    qb = _blocked(q, bq, acc) * scale                       # [B, H, nq, bq, D]
    kb, vb = _blocked(k, bk, acc), _blocked(v, bk, acc)     # [B, H, nk, bk, D]
    key_valid = (torch.arange(nk * bk, device=q.device) < M).reshape(nk, bk)
    counts = blocks.sum(-1)                                 # kept key blocks per query block
    # the kept key blocks of every query block first, in key order (a stable sort of "not kept")
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    m = torch.full((B, H, nq, bq, 1), float("-inf"), dtype=acc, device=q.device)
    l = torch.zeros((B, H, nq, bq, 1), dtype=acc, device=q.device)
    o = torch.zeros((B, H, nq, bq, Dv), dtype=acc, device=q.device)
    for slot in range(int(counts.max()) if counts.numel() else 0):
        j = order[..., slot]                                # [B, H, nq]: this slot's key block per query block
        gather = j[..., None, None]
        k_j = torch.gather(kb, 2, gather.expand(B, H, nq, bk, D))
        v_j = torch.gather(vb, 2, gather.expand(B, H, nq, bk, Dv))
        s = qb @ k_j.transpose(-1, -2)                      # [B, H, nq, bq, bk]
        keep = key_valid[j] & (slot < counts)[..., None]    # padding keys and finished query blocks drop out
        s = s.masked_fill(~keep[..., None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe)
        alpha = torch.exp(m - m_safe)                       # rescales what was summed under the old max
        l = l * alpha + p.sum(-1, keepdim=True)
        o = o * alpha + p @ v_j
        m = m_new
    out = torch.where(l > 0, o / l.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(o))
    out = out.reshape(B, H, nq * bq, Dv)[:, :, :N].to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(l > 0, m + torch.log(l.clamp_min(torch.finfo(acc).tiny)), torch.full_like(l, float("-inf")))
    return out, lse.reshape(B, H, nq * bq)[:, :, :N]


@torch.no_grad()
def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: BlockSize = 64,
                         scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mass [B, H, nq, nk], lse [B, H, N]) of dense attention: mass[i, j] is the mean over the queries of block
    i of the probability their softmax puts on key block j (each row sums to 1). Two passes over one query
    block at a time: the row log-sum-exp first, then P = exp(S - lse) summed per key block."""
    B, H, N, D = q.shape
    M = k.shape[2]
    bq, bk = _block_size(block_size)
    nq, nk = num_blocks(N, M, (bq, bk))
    scale = D ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    kf = torch.nn.functional.pad(k.to(acc), (0, 0, 0, nk * bk - M))
    key_valid = torch.arange(nk * bk, device=q.device) < M
    mass = torch.zeros(B, H, nq, nk, dtype=acc, device=q.device)
    lse = torch.empty(B, H, N, dtype=acc, device=q.device)
    for i in range(nq):
        rows = slice(i * bq, min((i + 1) * bq, N))
        s = (q[:, :, rows].to(acc) * scale) @ kf.transpose(-1, -2)
        s = s.masked_fill(~key_valid, float("-inf"))
        row_lse = torch.logsumexp(s, -1, keepdim=True)
        lse[:, :, rows] = row_lse[..., 0]
        p = torch.exp(s - row_lse)
        mass[:, :, i] = p.reshape(B, H, -1, nk, bk).sum(-1).mean(2)
    return mass, lse


def select_by_mass(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """For every row of `mass` [..., nk] (non-negative, summing to 1), the fewest entries whose sum reaches
    `threshold` (the largest first; at least one): a bool tensor of mass's shape. `threshold` 1 keeps every
    entry (rounding would otherwise drop the smallest ones)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if threshold == 1:
        return torch.ones_like(mass, dtype=torch.bool)
    ordered, index = torch.sort(mass, dim=-1, descending=True)
    before = torch.cumsum(ordered, -1) - ordered             # mass of the larger entries already kept
    keep_sorted = before < threshold * mass.sum(-1, keepdim=True)
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, index, keep_sorted)


class AdaSpaSearch:
    """AdaSpa-style pattern search with caching across denoising steps.

    Call it with the (q, k) of one attention layer at each denoising step: at the steps of `search_steps`
    (counted from 0 by the calls, or set with `step=`) and every `research_every` steps after the last
    search, it runs a dense :func:`block_attention_mass` pass and keeps each head's blocks up to
    `threshold` of the mass (:func:`select_by_mass`); at the other steps it returns the cached pattern.
    `lse` holds the log-sum-exp rows of the last search. One instance per attention layer."""

    def __init__(self, threshold: float = 0.9, block_size: BlockSize = 64, search_steps: Sequence[int] = (0,),
                 research_every: Optional[int] = None):
        select_by_mass(torch.ones(1, 1), threshold)   # validates the threshold
        self.threshold, self.block_size = threshold, _block_size(block_size)
        self.search_steps, self.research_every = set(search_steps), research_every
        self.calls, self.last_search = 0, None
        self.pattern: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None

    def due(self, step: int) -> bool:
        if self.pattern is None or step in self.search_steps:
            return True
        return self.research_every is not None and step - self.last_search >= self.research_every

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None,
                 step: Optional[int] = None) -> torch.Tensor:
        step = self.calls if step is None else step
        self.calls = step + 1
        shape = (q.shape[0], q.shape[1], *num_blocks(q.shape[2], k.shape[2], self.block_size))
        if self.due(step) or tuple(self.pattern.shape) != shape:
            mass, self.lse = block_attention_mass(q, k, self.block_size, scale)
            self.pattern, self.last_search = select_by_mass(mass, self.threshold), step
        return self.pattern


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between distributions along the last dim."""
    mid = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(b.clamp_min(1e-30))), 0.0).sum(-1)

    return 0.5 * kl(p, mid) + 0.5 * kl(q, mid)


@torch.no_grad()
def flexprefill_blocks(q: torch.Tensor, k: torch.Tensor, block_size: BlockSize = 64, threshold: float = 0.9,
                       js_threshold: float = 0.1, scale: Optional[float] = None,
                       return_choice: bool = False):
    """FlexPrefill-style pattern [B, H, nq, nk] (and, with `return_choice`, the bool [B, H] "query-aware"
    choice per head and the divergences). See the module docstring."""
    B, H, N, D = q.shape
    M = k.shape[2]
    bq, bk = _block_size(block_size)
    nq, nk = num_blocks(N, M, (bq, bk))
    scale = D ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)

    def pooled(x, size, n):
        x = x.to(acc)
        sums = _blocked(x, size, acc).sum(3)
        counts = torch.clamp(x.shape[2] - torch.arange(n, device=x.device) * size, max=size).to(acc)
        return sums / counts[:, None]

    estimate = torch.softmax(pooled(q, bq, nq) @ pooled(k, bk, nk).transpose(-1, -2) * scale, -1)  # [B, H, nq, nk]
    last = slice((nq - 1) * bq, N)                          # the representative query block: the last
    exact, _ = block_attention_mass(q[:, :, last], k, (bq, bk), scale)     # [B, H, 1, nk]
    divergence = js_divergence(estimate[:, :, -1], exact[:, :, 0])        # [B, H]
    query_aware = divergence < js_threshold
    aware = select_by_mass(estimate, threshold)
    fixed = select_by_mass(exact, threshold).expand(B, H, nq, nk).clone()
    # the block diagonal: key blocks whose positions overlap the query block's (self-attention's local window)
    starts_q, starts_k = torch.arange(nq, device=q.device) * bq, torch.arange(nk, device=q.device) * bk
    diagonal = (starts_q[:, None] < starts_k[None] + bk) & (starts_q[:, None] + bq > starts_k[None])
    fixed |= diagonal
    blocks = torch.where(query_aware[..., None, None], aware, fixed)
    return (blocks, query_aware, divergence) if return_choice else blocks


class FlexPrefillSearch:
    """:func:`flexprefill_blocks` as a per-layer search object with the interface of :class:`AdaSpaSearch`
    (a fresh pattern at every call: the estimate is cheap)."""

    def __init__(self, threshold: float = 0.9, block_size: BlockSize = 64, js_threshold: float = 0.1):
        select_by_mass(torch.ones(1, 1), threshold)
        self.threshold, self.block_size, self.js_threshold = threshold, _block_size(block_size), js_threshold
        self.query_aware: Optional[torch.Tensor] = None

    def __call__(self, q, k, scale=None, step=None) -> torch.Tensor:
        blocks, self.query_aware, _ = flexprefill_blocks(q, k, self.block_size, self.threshold, self.js_threshold,
                                                         scale, return_choice=True)
        return blocks
