"""Tiny diffusers/transformers models built from configs in code, for the teacher adapter tests.

The builders live in `onestep.teachers.tiny` (the dry run of `onestep distill` uses them too); nothing
there downloads."""
from onestep.teachers.tiny import (  # noqa: F401
    clip_text_encoder, clip_tokenizer, t5_encoder, tiny_pixel_unet, tiny_sd_unet, tiny_vae,
)
