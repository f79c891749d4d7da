"""Generate samples for evaluation, sharded across processes and gathered once.

Every process takes a contiguous slice of the same fixed noise, samples it in batches, and one
`gather` returns all samples, in noise order, to every process: the scored set is the one a single
process would make from the same noise (up to the batch composition's float rounding).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from onestep.evaluation.latency import _sync


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s contiguous share of n items; shares differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@torch.no_grad()
def generate(sample_fn: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor, batch_size: int,
             accelerator=None, warmup: bool = True) -> tuple[torch.Tensor, float]:
    """All samples for `noise` (on every process) and the images/s of the whole (sharded) generation.

    `sample_fn(noise_batch) -> images`; one untimed warm-up batch first (CUDA context, allocator, kernels).
    """
    world = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    lo, hi = shard_bounds(len(noise), rank, world)
    local = noise[lo:hi]
    if warmup and len(local):
        sample_fn(local[: min(8, len(local))])
    if accelerator is not None:
        accelerator.wait_for_everyone()
    _sync()
    start = time.perf_counter()
    parts = [sample_fn(local[i:i + batch_size]) for i in range(0, len(local), batch_size)]
    out = torch.cat(parts) if parts else noise.new_zeros((0, *noise.shape[1:]))
    if world > 1:
        # gather needs equal shapes: pad every shard to the largest, then drop the padding
        largest = shard_bounds(len(noise), 0, world)[1]
        padded = torch.cat([out, out.new_zeros((largest - len(out), *out.shape[1:]))])
        gathered = accelerator.gather(padded.contiguous()).reshape(world, largest, *out.shape[1:])
        out = torch.cat([gathered[r, : shard_bounds(len(noise), r, world)[1] - shard_bounds(len(noise), r, world)[0]]
                         for r in range(world)])
    _sync()
    seconds = time.perf_counter() - start
    return out.clamp(-1, 1), len(noise) / seconds
