"""Data that ships inside installed packages: scikit-learn's handwritten digits and Gaussian mixtures.

Digits: 1797 grey 8x8 images (values 0..16). We upsample them to 16x16 (bilinear), scale to [-1, 1]
and split them once, stratified by class with a fixed seed, into a training split (teachers and
students learn from it; it is also the FID reference) and a held-out split (the `real` row of every
report: how far real, unseen digits are from the reference under the same protocol).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_SIZE = 16
DIGITS_HELDOUT_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0


@dataclass
class ImageSplit:
    images: torch.Tensor  # [N, 1, 16, 16] float32 in [-1, 1]
    labels: torch.Tensor  # [N] int64


def _digits_to_tensor(raw: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(raw.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits(split: str = "train", size: int = DIGITS_SIZE) -> ImageSplit:
    """`split` is "train", "heldout" or "all"."""
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"digits split must be 'train', 'heldout' or 'all', got {split!r}")
    d = _sk_load_digits()
    idx = np.arange(len(d.target))
    if split != "all":
        train_idx, heldout_idx = train_test_split(
            idx, test_size=DIGITS_HELDOUT_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=d.target
        )
        idx = np.sort(train_idx if split == "train" else heldout_idx)
    return ImageSplit(_digits_to_tensor(d.images[idx], size), torch.from_numpy(d.target[idx]).long())


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (for PNG grids and image folders)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class TensorData:
    """An in-memory dataset; batches are drawn with replacement from the trainer's generator."""

    def __init__(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        self.x, self.cond = x, cond

    def batch(self, size: int, generator: torch.Generator, device=None) -> dict:
        idx = torch.randint(len(self.x), (size,), generator=generator)
        return {"x": self.x[idx].to(device), "cond": None if self.cond is None else self.cond[idx].to(device)}


class MixtureData:
    """Fresh samples from a Gaussian mixture each batch (unconditional)."""

    def __init__(self, mixture):
        self.mixture = mixture

    def batch(self, size: int, generator: torch.Generator, device=None) -> dict:
        x, _ = self.mixture.sample(size, generator)
        return {"x": x.to(device), "cond": None}
