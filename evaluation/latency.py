"""Sampling throughput."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync() -> None:
    # CUDA kernels run asynchronously: without a sync we would time the kernel launches only.
    # is_initialized(): no CUDA work has happened yet, so there is nothing to wait for (and we
    # avoid creating a CUDA context just to time a CPU function).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def images_per_second(generate_fn: Callable[[], object], batch_size: int, warmup: int = 1, repeats: int = 3) -> float:
    """Throughput of `generate_fn()`, which must produce `batch_size` images per call.

    `warmup` untimed calls first (CUDA context, cuDNN autotuning, allocator caches, compilation),
    then the median over `repeats` timed calls, each bracketed by CUDA synchronisation.
    """
    if batch_size <= 0 or repeats <= 0 or warmup < 0:
        raise ValueError(f"need batch_size > 0, repeats > 0, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    for _ in range(warmup):
        generate_fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        generate_fn()
        _sync()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)
