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
    from .fid import image_chunks

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return clip_score_of_chunks(image_chunks(images, max(len(images), 1)), prompts, model, batch_size, device,
                                local_files_only)


def clip_score_of_chunks(chunks, prompts: list[str], model: str | Path | tuple = DEFAULT_CLIP, batch_size: int = 32,
                         device="cpu", local_files_only: bool | None = None, processes=None) -> dict:
    """CLIPScore of image chunks (`fid.image_chunks`: chunk [start, stop) goes with prompts[start:stop])
    in batches that never span chunks. With `processes` (onestep.evaluation.distributed) each process
    scores its own chunks; the per-batch score sums are gathered and added in batch order, in float32,
    exactly as CLIPScore adds them in one process, so the score does not depend on the number of
    processes. Returns {"clip_score", "num_images"} on every process."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    pair = model if isinstance(model, tuple) else load_clip(model, local_files_only)
    # each process reads its own batch sums; they are gathered below, not by torchmetrics
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(pair[0]), pair[1]), sync_on_compute=False).to(device)
    mine = processes.mine(len(chunks)) if processes is not None else range(len(chunks))
    sums = {}
    for c in mine:
        u8 = torch.from_numpy(chunks[c].load()).permute(0, 3, 1, 2)
        texts = list(prompts[chunks[c].start:chunks[c].stop])
        rows = []
        for s in range(0, len(u8), batch_size):
            metric.reset()  # its state then holds this batch's sum alone
            metric.update(u8[s:s + batch_size].to(device), texts[s:s + batch_size])
            rows.append([metric.score.item(), metric.n_samples.item()])  # a float32 sum: exact as a float64
        sums[c] = rows
    parts = processes.gather_chunks(sums, len(chunks)) if processes is not None else [sums[c] for c in mine]
    total, count = torch.zeros((), dtype=torch.float32), 0
    for rows in parts:
        for batch_sum, n in rows:
            total += torch.tensor(batch_sum, dtype=torch.float32)
            count += int(n)
    # CLIPScore.compute: the mean, floored at 0
    return {"clip_score": float(torch.clamp(total / torch.tensor(count), min=0)), "num_images": count}
