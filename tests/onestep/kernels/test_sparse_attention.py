"""onestep.kernels.sparse_attention against dense attention (math_attention with the pattern as a mask)."""
import pytest
import torch

from onestep.kernels import math_attention
from onestep.kernels.sparse_attention import (
    AdaSpaSearch,
    FlexPrefillSearch,
    block_attention_mass,
    block_sparse_attention,
    flexprefill_blocks,
    num_blocks,
    select_by_mass,
)


def qkv(B=2, H=3, N=37, M=45, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (N, M, M))


def token_mask(blocks, N, M, bq, bk):
    """The block pattern as a token-level bool mask [B, H, N, M]."""
    return blocks.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :N, :M]


@pytest.mark.parametrize("block_size", [(8, 8), (16, 8), (64, 64)])
def test_every_block_kept_is_dense_attention(block_size):
    q, k, v = qkv()
    blocks = torch.ones(1, 1, *num_blocks(q.shape[2], k.shape[2], block_size), dtype=torch.bool)
    out = block_sparse_attention(q, k, v, blocks, block_size)
    assert (out - math_attention(q, k, v)).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_a_random_pattern_is_attention_masked_to_its_blocks(dtype, tol):
    q, k, v = qkv(dtype=dtype)
    bq, bk = 8, 16
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(2, 3, *num_blocks(37, 45, (bq, bk)), generator=g) < 0.4
    blocks[0, 0, 1] = False                      # a query block that keeps nothing returns 0
    out, lse = block_sparse_attention(q, k, v, blocks, (bq, bk), return_lse=True)
    mask = token_mask(blocks, 37, 45, bq, bk)
    assert (out - math_attention(q, k, v, attn_mask=mask)).abs().max() <= tol
    assert torch.all(out[0, 0, 8:16] == 0) and torch.all(torch.isinf(lse[0, 0, 8:16]))
    scores = (q.double() @ k.double().transpose(-1, -2)) * 16 ** -0.5
    want = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    kept = torch.isfinite(want)
    assert (lse[kept].double() - want[kept]).abs().max() <= 1e-5


def test_gradients_and_jvp_match_the_masked_reference():
    q, k, v = qkv(B=1, H=2, N=20, M=24, D=8, dtype=torch.float64)
    blocks = torch.rand(1, 2, *num_blocks(20, 24, 8), generator=torch.Generator().manual_seed(2)) < 0.6
    blocks[..., 0] = True
    mask = token_mask(blocks, 20, 24, 8, 8)
    tangents = qkv(B=1, H=2, N=20, M=24, D=8, dtype=torch.float64, seed=3)
    _, jvp = torch.func.jvp(lambda a, b, c: block_sparse_attention(a, b, c, blocks, 8), (q, k, v), tangents)
    _, want = torch.func.jvp(lambda a, b, c: math_attention(a, b, c, attn_mask=mask), (q, k, v), tangents)
    assert (jvp - want).abs().max() <= 1e-12
    assert torch.autograd.gradcheck(lambda a, b, c: block_sparse_attention(a, b, c, blocks, 8),
                                    tuple(t.clone().requires_grad_() for t in (q, k, v)))


def test_block_mass_is_the_softmax_summed_per_block():
    q, k, _ = qkv(dtype=torch.float64)
    mass, lse = block_attention_mass(q, k, (8, 16))
    p = torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5, -1)               # [B, H, 37, 45]
    for i in range(mass.shape[2]):
        for j in range(mass.shape[3]):
            want = p[:, :, i * 8:(i + 1) * 8, j * 16:(j + 1) * 16].sum(-1).mean(-1)
            assert (mass[:, :, i, j] - want).abs().max() <= 1e-12
    assert (mass.sum(-1) - 1).abs().max() <= 1e-12
    assert (lse - torch.logsumexp(q @ k.transpose(-1, -2) * 16 ** -0.5, -1)).abs().max() <= 1e-12


def test_select_by_mass_keeps_the_fewest_blocks_reaching_the_threshold():
    g = torch.Generator().manual_seed(4)
    mass = torch.softmax(torch.randn(5, 7, 11, generator=g, dtype=torch.float64) * 2, -1)
    for threshold in (0.3, 0.8, 0.95, 1.0):
        keep = select_by_mass(mass, threshold)
        kept = (mass * keep).sum(-1)
        assert torch.all(kept >= threshold - 1e-12)
        smallest_kept = torch.where(keep, mass, torch.inf).amin(-1)
        assert torch.all(kept - smallest_kept < threshold)       # one block fewer would not reach it
    assert select_by_mass(mass, 1e-9).sum(-1).eq(1).all()
    with pytest.raises(ValueError, match="threshold"):
        select_by_mass(mass, 0.0)


def test_output_error_is_bounded_by_the_dropped_mass():
    """|O_sparse - O_dense| <= 2 (1 - kept probability of the row) max |V| for every row."""
    q, k, v = qkv(dtype=torch.float64, seed=5)
    mass, _ = block_attention_mass(q, k, 8)
    blocks = select_by_mass(mass, 0.7)
    out = block_sparse_attention(q, k, v, blocks, 8)
    p = torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5, -1)
    kept = (p * token_mask(blocks, 37, 45, 8, 8)).sum(-1)
    err = (out - math_attention(q, k, v)).abs().amax(-1)
    assert torch.all(err <= 2 * (1 - kept) * v.abs().amax((-1, -2))[..., None] + 1e-12)
    assert blocks.float().mean() < 1


def test_adaspa_reuses_its_pattern_until_the_next_search():
    search = AdaSpaSearch(threshold=0.5, block_size=8, search_steps=(0, 3))
    q0, k0, _ = qkv(seed=6)
    q1, k1, _ = qkv(seed=7)
    first = search(q0, k0)                                    # step 0: searched on (q0, k0)
    assert torch.equal(first, select_by_mass(block_attention_mass(q0, k0, 8)[0], 0.5))
    assert search(q1, k1) is first and search(q1, k1) is first    # steps 1, 2: cached
    third = search(q1, k1)                                     # step 3: searched again, on (q1, k1)
    assert torch.equal(third, select_by_mass(block_attention_mass(q1, k1, 8)[0], 0.5))
    assert not torch.equal(first, third)
    every = AdaSpaSearch(threshold=0.5, block_size=8, research_every=2)
    assert [every.due(s) for s in range(1)] == [True]
    every(q0, k0)
    assert [every.due(s) for s in (1, 2)] == [False, True]


def test_flexprefill_picks_the_query_aware_pattern_where_the_pooled_estimate_is_right():
    """Head 0: queries and keys constant within each block, so mean pooling loses nothing and the estimate
    is exact (divergence 0, query-aware). Head 1: keys alternate sign inside each block, so pooled keys are
    0 and the estimate is uniform while true attention is peaked: the fixed pattern."""
    g = torch.Generator().manual_seed(8)
    B, N, D, b = 1, 32, 8, 8
    base_q = torch.randn(B, 1, N // b, D, generator=g) * 3
    base_k = torch.randn(B, 1, N // b, D, generator=g) * 3
    q0, k0 = base_q.repeat_interleave(b, 2), base_k.repeat_interleave(b, 2)
    sign = torch.tensor([1.0, -1.0]).repeat(N // 2)[None, None, :, None]
    q1 = torch.randn(B, 1, N, D, generator=g) * 3
    k1 = torch.randn(B, 1, N // 2, D, generator=g).repeat_interleave(2, 2) * 3 * sign
    q, k = torch.cat([q0, q1], 1), torch.cat([k0, k1], 1)
    blocks, aware, divergence = flexprefill_blocks(q, k, b, threshold=0.9, js_threshold=0.05, return_choice=True)
    assert aware.tolist() == [[True, False]] and divergence[0, 0] <= 1e-6 < 0.05 < divergence[0, 1]
    exact_mass, _ = block_attention_mass(q, k, b)
    assert torch.equal(blocks[0, 0], select_by_mass(exact_mass[0, 0], 0.9))   # exact estimate: exact selection
    assert torch.all(blocks[0, 1].diagonal())                                  # fixed pattern: the diagonal
    assert torch.equal(FlexPrefillSearch(0.9, b, 0.05)(q, k), blocks)
