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
    return measure_latency(generate_fn, batch_size, warmup=warmup, repeats=repeats)["images_per_s"]


# ------------------------------------------------------------------ `onestep bench latency`

def _peak_memory_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mb(device) -> tuple[float | None, str]:
    """Peak memory of the last measurement: CUDA's max allocated; on CPU the process's peak RSS
    (ru_maxrss, monotone over the process: an upper bound for each row, not a per-row figure)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"
    except ImportError:  # Windows
        return None, "unavailable"


def measure_latency(generate_fn: Callable[[], object], batch_size: int, warmup: int = 2, repeats: int = 5,
                    device="cpu") -> dict:
    """Time `generate_fn()` (one batch of `batch_size` images): `warmup` untimed calls, then `repeats`
    timed ones bracketed by device synchronisation; the median gives ms/image and images/s."""
    if batch_size <= 0 or repeats <= 0 or warmup < 0:
        raise ValueError(f"need batch_size > 0, repeats > 0, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    for _ in range(warmup):
        generate_fn()
    _sync()
    _peak_memory_reset(device)
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        generate_fn()
        _sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak, peak_kind = _peak_memory_mb(device)
    return {"batch_size": batch_size, "warmup": warmup, "repeats": repeats,
            "median_ms_per_batch": 1000 * median, "ms_per_image": 1000 * median / batch_size,
            "images_per_s": batch_size / median, "times_ms": [1000 * t for t in times],
            "peak_memory_mb": peak, "peak_memory_kind": peak_kind}


def latency_table(rows: list[dict]) -> str:
    """A markdown table of `measure_latency` rows carrying `model` and `steps`."""
    lines = ["| model | steps | batch | ms/image | images/s | median ms/batch | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['model']} | {r['steps']} | {r['batch_size']} | {r['ms_per_image']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['median_ms_per_batch']:.1f} | {peak} |")
    return "\n".join(lines)
