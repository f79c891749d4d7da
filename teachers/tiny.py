"""Tiny models of the teacher families: what their tiny builders share, and `save_tiny_teacher`.

`onestep distill --dry-run` (onestep/dryrun.py), `--smoke` and the tests build a recipe's teacher, student
and objective at a tiny size without downloading anything: `save_tiny_teacher(name, cfg, folder)` asks the
registered family for its tiny builder (`Teacher.tiny`, in `teachers/<family>/tiny.py`), which writes a tiny
model of the family (the same diffusers classes and the same folder layout as the hub model: `unet/` +
`scheduler/` for pixel UNets, a whole pipeline folder for the latent families) and returns the teacher
options that load it back through the adapter's own `from_pretrained`, so the dry run runs the real loading
path. Here: the tiny sizes, text encoders, tokenizer, VAE and VP scheduler the families' builders share.

The CLIP tokenizer is built from a byte-level vocabulary written into the folder (every byte as a
token, with and without the end-of-word mark, plus a few merges); it also stands in for the T5 and
Gemma tokenizers, as in the adapter tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

#: classes of a tiny class-conditional teacher (plus one null class where the recipe has one)
TINY_CLASSES = 10
#: image side of the tiny latent teachers: the tiny VAE halves it, so latents are 8 x 8
TINY_RESOLUTION = 16
#: prompt length of the tiny T5 / Gemma encoders
TINY_SEQUENCE = 16


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map (the vocabulary's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(folder: str | Path, model_max_length: int = 77):
    """A CLIPTokenizer over single bytes plus the merges of a few common pairs (vocab of ~520)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


def clip_text_encoder(vocab_size: int, hidden: int = 16, projection: int | None = None, seed: int = 0):
    """A 2-layer CLIP text encoder; with `projection` the WithProjection variant (SDXL's second, SD3's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or hidden, bos_token_id=vocab_size - 2,
                            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_encoder(vocab_size: int, d_model: int = 16, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **extra):
    """An AutoencoderKL with two blocks: 8x8 latents from 16x16 images (factor 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=16, **extra).eval()


def tiny_vp_scheduler(prediction_type: str, latent: bool):
    """DDIM with SD's scaled-linear betas (latent families) or DDPM's linear ones (pixel UNets)."""
    from diffusers import DDIMScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear") if latent else \
        dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    return DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


def save_tiny_teacher(name: str, teacher_cfg: dict, folder: str | Path, class_conditional: bool = False) -> dict:
    """Write a tiny model of teacher family `name` into `folder` and return `teacher_cfg` with the options
    that load it back (path, subfolders, tiny resolution and prompt length, float32 on the CPU).

    The family's own builder (the registered class's `tiny`, in its folder) writes the model.
    `class_conditional`: give a pixel UNet / EDM teacher a class embedding (TINY_CLASSES classes, plus a
    null class when the recipe names one)."""
    from onestep.registry import TEACHERS

    families = tiny_families()
    if name not in families:
        raise ValueError(f"no tiny model of teacher {name!r}; tiny models exist for {', '.join(families)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = TEACHERS.get(name).tiny(dict(teacher_cfg), folder, class_conditional)
    # a tiny model is built in float32 on the CPU whatever the recipe asks of the full-size one
    return {**teacher_cfg, **options, "dtype": "float32", "device": None, "variant": None, "revision": None}


def tiny_families() -> list[str]:
    """The registered teacher families that declare a tiny builder."""
    from onestep.registry import TEACHERS

    return [name for name, cls in TEACHERS.items() if getattr(cls, "tiny", None) is not None]


__all__ = ["TINY_CLASSES", "TINY_RESOLUTION", "TINY_SEQUENCE", "save_tiny_teacher", "tiny_families", "clip_tokenizer",
           "clip_text_encoder", "t5_encoder", "tiny_vae", "tiny_vp_scheduler"]
