"""The protocol record that every score file carries, and the score file itself.

A score means nothing without how it was made: which backend and resize mode, which feature network
(and the sha256 of its weights), which reference statistics, how many samples on each side, which
seeds, sampling steps, guidance and resolution, and which library versions. `make_protocol` takes
all of these as required keywords so none can be forgotten; `write_score` writes {"scores",
"protocol"} as JSON.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

#: the keys issue 7 asks every score file to record
PROTOCOL_KEYS = ("metric", "backend", "mode", "feature_extractor", "feature_extractor_sha256", "reference",
                 "num_generated", "num_reference", "seeds", "steps", "guidance", "resolution", "versions")
_VERSIONED = ("onestep", "torch", "diffusers", "transformers", "torchmetrics", "clean-fid", "numpy", "accelerate")


def library_versions() -> dict:
    """Installed versions of onestep and the libraries a score depends on (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # with the build tag (e.g. +cu130), which the wheel metadata lacks
    out["cuda"] = torch.version.cuda
    return out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 of a network's weights: its `weights_sha256` attribute when the loader recorded the
    file's hash, else the hash of the safetensors serialisation of its state dict."""
    known = getattr(module, "weights_sha256", None)
    if known:
        return known
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return hashlib.sha256(save(state)).hexdigest()


def make_protocol(*, metric: str, backend: str | None, mode: str | None, feature_extractor: str | None,
                  feature_extractor_sha256: str | None, reference: str | None, num_generated: int | None,
                  num_reference: int | None, seeds, steps, guidance, resolution, **extra) -> dict:
    """The protocol block of a score file; None marks a field that does not apply (e.g. no reference
    for a CLIP score), which is different from a field left out."""
    record = {"metric": metric, "backend": backend, "mode": mode, "feature_extractor": feature_extractor,
              "feature_extractor_sha256": feature_extractor_sha256, "reference": reference,
              "num_generated": num_generated, "num_reference": num_reference, "seeds": seeds, "steps": steps,
              "guidance": guidance, "resolution": resolution}
    record.update(extra)
    record["versions"] = library_versions()
    record["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


def _plain(x):
    """JSON-serialisable copy (numpy / torch scalars and arrays, tuples, paths)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.generic, torch.Tensor)) and np.ndim(x) == 0:
        return x.item()
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return np.asarray(x).tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def write_score(path: str | Path, scores: dict, protocol: dict) -> Path:
    """Write {"scores": ..., "protocol": ...} as JSON (atomically: temp file + rename)."""
    missing = [k for k in PROTOCOL_KEYS if k not in protocol]
    if missing:
        raise ValueError(f"protocol record lacks {missing}; build it with make_protocol")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"scores": _plain(scores), "protocol": _plain(protocol)}, indent=2) + "\n")
    tmp.replace(path)
    return path


def save_grid(images, path: str | Path, nrow: int | None = None, max_images: int = 64) -> Path:
    """The first `max_images` scored images as one PNG grid. `images`: uint8 [N, H, W, C] or a float
    tensor [N, C, H, W] in [-1, 1]."""
    from PIL import Image

    if isinstance(images, torch.Tensor) and images.is_floating_point():
        images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images = images.permute(0, 2, 3, 1).numpy()
    arr = np.asarray(images)[:max_images]
    if arr.ndim == 3:
        arr = arr[..., None]
    n, h, w, c = arr.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((rows * h, nrow * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path
