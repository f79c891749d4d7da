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

from onestep.errors import InputError


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


# ------------------------------------------------------------------ sharded files, resumable

class GenerationError(InputError):
    """The output folder holds samples made with other settings; one line."""


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The generator of one shard's noise and labels: a function of (seed, shard) only, so a resumed
    or differently-sharded run draws exactly the same samples."""
    import hashlib

    digest = hashlib.sha256(f"onestep-shard:{seed}:{shard}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def generate_shards(sample_fn: Callable, out_dir, num_samples: int, noise_shape: tuple, *, shard_size: int = 1000,
                    batch_size: int = 100, seed: int = 0, num_classes: int | None = None,
                    cond_fn: Callable | None = None, settings: dict | None = None, accelerator=None,
                    device="cpu", progress: bool = True, made: list | None = None):
    """Write `num_samples` images as `shard-NNNNN.npz` (uint8 [n, H, W, 3] `images`, `labels`) into
    `out_dir`, skipping shards already there: an interrupted run resumes where it stopped.

    `sample_fn(noise, cond) -> images` (float [-1, 1] [B, C, H, W]). Shard i's noise (and, with
    `num_classes`, uniform labels) come from `shard_generator(seed, i)`; `cond_fn(indices) -> cond`
    gives other conditions (e.g. encoded prompts) by sample index. Processes of an accelerator take
    shards i = rank, rank + world, .... `settings` (model, steps, guidance, ...) are stored in
    `manifest.json`; resuming with other settings is refused. `made`, a list, receives the indices
    of the shards this process generated (not those it found already there)."""
    import json
    from pathlib import Path

    import numpy as np

    from .fid import to_uint8_images

    out_dir = Path(out_dir)
    manifest = {"num_samples": int(num_samples), "shard_size": int(shard_size), "seed": int(seed),
                "noise_shape": list(noise_shape), "num_classes": num_classes, "settings": settings or {}}
    manifest_path = out_dir / "manifest.json"
    rank = 0 if accelerator is None else accelerator.process_index
    world = 1 if accelerator is None else accelerator.num_processes
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old != json.loads(json.dumps(manifest)):
            diff = sorted(k for k in manifest if old.get(k) != json.loads(json.dumps(manifest))[k])
            raise GenerationError(f"{out_dir} holds samples made with other settings ({', '.join(diff)} differ); "
                                  f"delete it or choose another --out")
    elif rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # written whole or not at all: another process may be reading it at this moment
        tmp = out_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(manifest_path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    num_shards = -(-num_samples // shard_size)
    mine = [i for i in range(rank, num_shards, world) if not (out_dir / f"shard-{i:05d}.npz").is_file()]
    if progress and rank == 0:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc=f"generating ({num_samples} samples)", unit="shard")
    for i in mine:
        lo, hi = i * shard_size, min((i + 1) * shard_size, num_samples)
        gen = shard_generator(seed, i)
        noise = torch.randn((hi - lo, *noise_shape), generator=gen)
        labels = torch.randint(0, num_classes, (hi - lo,), generator=gen) if num_classes else None
        parts = []
        for s in range(0, hi - lo, batch_size):
            if cond_fn is not None:
                cond = cond_fn(np.arange(lo + s, min(lo + s + batch_size, hi)))
            else:
                cond = None if labels is None else labels[s:s + batch_size].to(device)
            with torch.no_grad():
                parts.append(to_uint8_images(sample_fn(noise[s:s + batch_size].to(device), cond)))
        tmp = out_dir / f"shard-{i:05d}.tmp.npz"
        np.savez(tmp, images=np.concatenate(parts), labels=(labels.numpy() if labels is not None else np.zeros(0)),
                 first_index=lo)
        tmp.replace(out_dir / f"shard-{i:05d}.npz")
        if made is not None:
            made.append(i)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return out_dir
