"""Tiny models for tests: diffusers/transformers models built from configs in code (the teacher adapter
tests), and a 2-D field with dropout (the JVP objectives' mask replay).

The builders live in `onestep.teachers.tiny` and the families' `tiny.py` (the dry run of `onestep distill`
uses them too); nothing there downloads."""
import torch
from onestep.teachers.stable_diffusion.tiny import tiny_sd_unet  # noqa: F401
from onestep.teachers.tiny import clip_text_encoder, clip_tokenizer, t5_encoder, tiny_vae  # noqa: F401
from onestep.teachers.unet.tiny import tiny_pixel_unet  # noqa: F401


class DropoutField(torch.nn.Module):
    """u(z, r, t) on 2-D points with dropout (train mode): a JVP's primal must replay the trained pass's masks."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 64)
        self.drop = torch.nn.Dropout(0.5)
        self.out = torch.nn.Linear(64, 2)

    def forward(self, z, r, t, cond=None):
        return self.out(self.drop(torch.tanh(self.inp(torch.cat([z, r[:, None], t[:, None]], 1)))))
