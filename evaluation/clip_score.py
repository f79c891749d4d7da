"""CLIP score (Hessel et al. 2021) of text-to-image samples through torchmetrics' CLIPScore:
100 * max(cos(image embedding, text embedding), 0), averaged over images.

The CLIP model is a hub id (`openai/clip-vit-large-patch14`, torchmetrics' default) or a local
`save_pretrained` folder; offline, a missing model is one line naming it and `--clip-model PATH`.
"""
from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipModelError(FileNotFoundError):
    """The CLIP model cannot be loaded; one line."""


def load_clip(model: str | Path = DEFAULT_CLIP, local_files_only: bool | None = None):
    """(CLIPModel, CLIPProcessor) from a hub id or a local folder (never remote code)."""
    from transformers import CLIPModel, CLIPProcessor

    from .inception import offline

    local = offline() if local_files_only is None else local_files_only
    if Path(str(model)).exists():
        local = True
    try:
        return (CLIPModel.from_pretrained(str(model), local_files_only=local).eval(),
                CLIPProcessor.from_pretrained(str(model), local_files_only=local))
    except (OSError, ValueError) as e:
        raise ClipModelError(f"cannot load CLIP model {model!r} ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:160]}); pass --clip-model PATH to a local "
                             f"save_pretrained folder") from None


class _TensorFeatures(torch.nn.Module):
    """CLIPModel whose get_image/text_features return tensors. torchmetrics 1.9 divides their result
    by its norm, but transformers 5 returns a BaseModelOutputWithPooling (the projected embedding in
    `pooler_output`); this adapter restores the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_score(images, prompts: list[str], model: str | Path | tuple = DEFAULT_CLIP, batch_size: int = 32,
               device="cpu", local_files_only: bool | None = None) -> dict:
    """torchmetrics CLIPScore of images (uint8 [N, H, W, 3], or float [N, C, H, W] in [-1, 1]) with
    their prompts. `model`: hub id, local folder, or a (CLIPModel, CLIPProcessor) pair."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from .fid import to_uint8_images

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    pair = model if isinstance(model, tuple) else load_clip(model, local_files_only)
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(pair[0]), pair[1])).to(device)
    u8 = torch.from_numpy(to_uint8_images(images)).permute(0, 3, 1, 2)
    for s in range(0, len(u8), batch_size):
        metric.update(u8[s:s + batch_size].to(device), list(prompts[s:s + batch_size]))
    return {"clip_score": float(metric.compute()), "num_images": len(u8)}
