"""`onestep distill --config X --dry-run`: check a recipe without its weights, data or a GPU.

1. The config is loaded and validated (every key, the teacher/objective/data combination).
2. The data file (`data.path`) is checked if it is there; if not, that is reported (the real run needs it).
3. Teacher, student and objective are built at a *tiny* size: a tiny model of the teacher's family
   (onestep.teachers.tiny: the same diffusers classes, saved in the hub layout and loaded back through
   the adapter's own `from_pretrained`), with the recipe's student options (LoRA, checkpointing) and
   objective; the data source is the recipe's, on a tiny prompts file / image folder written for it.
   Training steps run until every optimizer group has stepped once (f-distill's critic and generator).
4. Full-size parameter counts without downloading: each component of the real model is built on the
   `meta` device (accelerate's `init_empty_weights`) from its published config, embedded below
   (FULL_SIZE_MODELS), or, when `teacher.path` is a local folder, from that folder's own config files.
5. An estimate of GPU memory at full size: frozen weights in the teacher's dtype, trainable parameters
   at 16 bytes each (fp32 weight, gradient and two AdamW moments), the frozen part of the student and its
   trainable copies, the EMA of the student's trainable parameters, and (latent text-to-image families) the
   activations of one training pass of the student, traced at full size on fake tensors (`activation_bytes`).
   benchmarks/full_size.py checks it against peak memory measured at full size on a CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from onestep.errors import ConfigError
from onestep.config import RunConfig, validate

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}

# ------------------------------------------------------------------------------------------------
# Published configs of the full-size models, main fields (the values of each repository's
# config.json as published; fields left out take the class defaults, which match the released models).
# The parameter counts printed are what a meta-device build of these configs gives, nothing measured.

_CLIP_L = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
_CLIP_L_PROJ = ("CLIPTextModelWithProjection", dict(_CLIP_L[1], projection_dim=768))
_OPENCLIP_H = ("CLIPTextModel", dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"))
_OPENCLIP_BIGG_PROJ = ("CLIPTextModelWithProjection", dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=20,
                                                           max_position_embeddings=77, hidden_act="gelu",
                                                           projection_dim=1280))
_T5_XXL = ("T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))
_GEMMA2_2B = ("Gemma2Model", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256))
_SD_VAE = ("AutoencoderKL", dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                                 layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512))
_FLOW_VAE = ("AutoencoderKL", dict(_SD_VAE[1], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                   sample_size=1024))
_DC_AE_F32C32 = ("AutoencoderDC", dict(in_channels=3, latent_channels=32, attention_head_dim=32,
                                       encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                                       decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                                       encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                                       decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                                       encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
                                       decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                                       encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                                       decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                                       upsample_block_type="interpolate", downsample_block_type="Conv",
                                       decoder_norm_types="rms_norm", decoder_act_fns="silu"))

_SD15_UNET = ("UNet2DConditionModel", dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                           block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                           attention_head_dim=8,
                                           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
_SD21_UNET = ("UNet2DConditionModel", dict(_SD15_UNET[1], sample_size=96, cross_attention_dim=1024,
                                           attention_head_dim=(5, 10, 20, 20), use_linear_projection=True))
_SDXL_UNET = ("UNet2DConditionModel", dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                           block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                                           attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                                           use_linear_projection=True, addition_embed_type="text_time",
                                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")))
_SD35M_TRANSFORMER = ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                    num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                    joint_attention_dim=4096, caption_projection_dim=1536,
                                                    pooled_projection_dim=2048, pos_embed_max_size=384,
                                                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"))
_SD3M_TRANSFORMER = ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                                   num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                   joint_attention_dim=4096, caption_projection_dim=1536,
                                                   pooled_projection_dim=2048, pos_embed_max_size=192))
_FLUX_DEV_TRANSFORMER = ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19,
                                                        num_single_layers=38, attention_head_dim=128,
                                                        num_attention_heads=24, joint_attention_dim=4096,
                                                        pooled_projection_dim=768, guidance_embeds=True,
                                                        axes_dims_rope=(16, 56, 56)))
_SANA_1600M_TRANSFORMER = ("SanaTransformer2DModel", dict(in_channels=32, out_channels=32, num_attention_heads=70,
                                                          attention_head_dim=32, num_layers=20,
                                                          num_cross_attention_heads=20, cross_attention_head_dim=112,
                                                          cross_attention_dim=2240, caption_channels=2304,
                                                          mlp_ratio=2.5, sample_size=32, patch_size=1))
_SANA_600M_TRANSFORMER = ("SanaTransformer2DModel", dict(in_channels=32, out_channels=32, num_attention_heads=36,
                                                         attention_head_dim=32, num_layers=28, num_cross_attention_heads=16,
                                                         cross_attention_head_dim=72, cross_attention_dim=1152,
                                                         caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1))
_DDPM_CIFAR10_UNET = ("UNet2DModel", dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                                          block_out_channels=(128, 256, 256, 256), norm_eps=1e-6, freq_shift=1,
                                          flip_sin_to_cos=False, downsample_padding=0, attention_head_dim=None,
                                          down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
# the ADM architecture of the EDM / consistency-models ImageNet-64 models, as diffusers'
# scripts/convert_consistency_to_diffusers.py writes it (1000 classes, scale-shift time conditioning)
_IMAGENET64_ADM_UNET = ("UNet2DModel", dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=3,
                                            block_out_channels=(192, 384, 576, 768), attention_head_dim=64,
                                            num_class_embeds=1000, resnet_time_scale_shift="scale_shift",
                                            downsample_type="resnet", upsample_type="resnet",
                                            down_block_types=("ResnetDownsampleBlock2D",) + ("AttnDownBlock2D",) * 3,
                                            up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)))

#: hub id -> {component: (class name, config)}; "denoiser" is the network students copy
FULL_SIZE_MODELS = {
    "google/ddpm-cifar10-32": {"denoiser": _DDPM_CIFAR10_UNET},
    "imagenet64-adm": {"denoiser": _IMAGENET64_ADM_UNET},
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {"denoiser": _SD15_UNET, "vae": _SD_VAE, "text_encoder": _CLIP_L},
    "stabilityai/stable-diffusion-2-1": {"denoiser": _SD21_UNET, "vae": _SD_VAE, "text_encoder": _OPENCLIP_H},
    "stabilityai/stable-diffusion-xl-base-1.0": {"denoiser": _SDXL_UNET, "vae": _SD_VAE, "text_encoder": _CLIP_L,
                                                 "text_encoder_2": _OPENCLIP_BIGG_PROJ},
    "stabilityai/stable-diffusion-3.5-medium": {"denoiser": _SD35M_TRANSFORMER, "vae": _FLOW_VAE,
                                                "text_encoder": _CLIP_L_PROJ, "text_encoder_2": _OPENCLIP_BIGG_PROJ,
                                                "text_encoder_3": _T5_XXL},
    "stabilityai/stable-diffusion-3-medium-diffusers": {"denoiser": _SD3M_TRANSFORMER, "vae": _FLOW_VAE,
                                                        "text_encoder": _CLIP_L_PROJ,
                                                        "text_encoder_2": _OPENCLIP_BIGG_PROJ, "text_encoder_3": _T5_XXL},
    "black-forest-labs/FLUX.1-dev": {"denoiser": _FLUX_DEV_TRANSFORMER, "vae": _FLOW_VAE, "text_encoder": _CLIP_L,
                                     "text_encoder_2": _T5_XXL},
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": {"denoiser": _SANA_1600M_TRANSFORMER, "vae": _DC_AE_F32C32,
                                                          "text_encoder": _GEMMA2_2B},
    "Efficient-Large-Model/Sana_600M_1024px_diffusers": {"denoiser": _SANA_600M_TRANSFORMER, "vae": _DC_AE_F32C32,
                                                         "text_encoder": _GEMMA2_2B},
}
#: the table entry a family falls back to when its path is neither listed nor a local folder
FAMILY_DEFAULT = {"unet": "google/ddpm-cifar10-32", "edm": "imagenet64-adm",
                  "stable_diffusion": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                  "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd3": "stabilityai/stable-diffusion-3.5-medium",
                  "flux": "black-forest-labs/FLUX.1-dev", "sana": "Efficient-Large-Model/Sana_1600M_1024px_diffusers"}
_DENOISER_SUBFOLDER = {"unet": "unet", "edm": "unet", "stable_diffusion": "unet", "sdxl": "unet",
                       "sd3": "transformer", "flux": "transformer", "sana": "transformer"}


def _class(name: str):
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        if hasattr(lib, name):
            return getattr(lib, name)
    raise ValueError(f"unknown model class {name}")


def meta_model(class_name: str, config: dict):
    """The model of `class_name` built from `config` on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights

    cls = _class(class_name)
    transformers_model = not hasattr(cls, "from_config")
    # torch.device("meta") too: buffers computed at construction (SD3's 384 x 384 sin-cos position table)
    # then cost nothing either
    with init_empty_weights(), torch.device("meta"):
        if transformers_model:
            config_cls = cls.config_class
            model = cls(config_cls(**config) if isinstance(config, dict) else config)
        else:
            model = cls.from_config(config)
    if transformers_model:
        # tied weights (T5's shared input embedding) are tied only outside init_empty_weights
        model.tie_weights()
    return model


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _local_components(cfg: RunConfig) -> tuple[dict, str] | None:
    """{component: (class name, config)} read from a local teacher folder's own config files."""
    from onestep.teachers.loading import _is_local

    tc = cfg.teacher
    name = tc["name"]
    path = tc.get("path") or ""
    if not path or not _is_local(path) or not Path(path).expanduser().is_dir():
        return None
    root = Path(path).expanduser()
    comps = {}
    if name in ("unet", "edm"):
        sub = tc.get("subfolder", "unet")
        folder = root / sub if sub else root
        config = json.loads((folder / "config.json").read_text())
        comps["denoiser"] = (config.get("_class_name", "UNet2DModel"), config)
        return comps, str(root)
    index = json.loads((root / "model_index.json").read_text())
    for sub, entry in index.items():
        if not isinstance(entry, list) or entry[0] is None or not (root / sub / "config.json").is_file():
            continue
        if sub == "text_encoder_3" and not tc.get("load_t5", True):
            continue
        key = "denoiser" if sub == _DENOISER_SUBFOLDER[name] else sub
        config = json.loads((root / sub / "config.json").read_text())
        if entry[0] == "transformers":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(root / sub))
        comps[key] = (entry[1], config)
    return comps, str(root)


def _full_size_spec(cfg: RunConfig) -> tuple[dict, str]:
    """({component: (class name, config)}, where the configs came from) of the recipe's teacher at full size."""
    name = cfg.teacher["name"]
    local = _local_components(cfg)
    if local is not None:
        spec, source = local
        return spec, f"the config files in {source}"
    path = cfg.teacher.get("path") or ""
    key = path if path in FULL_SIZE_MODELS else FAMILY_DEFAULT[name]
    spec = dict(FULL_SIZE_MODELS[key])
    if name == "sd3" and not cfg.teacher.get("load_t5", True):
        spec.pop("text_encoder_3", None)
    source = f"the published config of {key}, embedded in onestep/dryrun.py" + \
        ("" if key == path else f" (teacher.path {path!r} is not in the table: {key} stands in)")
    return spec, source


def full_size_components(cfg: RunConfig) -> tuple[dict, str]:
    """({component: meta-device module}, where the configs came from) at full size."""
    spec, source = _full_size_spec(cfg)
    return {k: meta_model(cls, conf) for k, (cls, conf) in spec.items()}, source


# ------------------------------------------------------------------------------------------------
# counts at full size


def interval_embedding_params(denoiser) -> int:
    """Parameters of the student's zero-initialised interval embedding for this backbone."""
    from onestep.student import _embedding_width, find_time_embedding

    width = _embedding_width(denoiser.get_submodule(find_time_embedding(denoiser)))
    frequencies = 256  # onestep.student.IntervalEmbedding's default
    return frequencies * width + width + width * width + width


def lora_params(denoiser, rank: int, targets) -> int:
    """Parameters LoRA of `rank` adds on `denoiser`'s layers named by `targets` (counted, as peft builds
    them, on a meta copy)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, inject_adapter_in_model

    with init_empty_weights():
        adapted = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)),
                                          _meta_copy(denoiser))
    return sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)


def _meta_copy(module):
    import copy

    return copy.deepcopy(module)


@dataclass
class Estimate:
    teacher_params: dict = field(default_factory=dict)   # component -> count (full size)
    student_total: int = 0
    student_trainable: int = 0
    aux_total: int = 0        # teacher-copied trainable networks (fake score, mixture net)
    aux_trainable: int = 0
    teacher_dtype: str = "float32"
    source: str = ""
    memory_gib: dict = field(default_factory=dict)


def full_size_estimate(cfg: RunConfig, aux_copies: int) -> Estimate:
    """Full-size parameter counts (meta builds) and the memory estimate, for `aux_copies` teacher-copied
    trainable networks in the objective."""
    comps, source = full_size_components(cfg)
    denoiser = comps["denoiser"]
    est = Estimate(teacher_params={k: count(m) for k, m in comps.items()}, source=source)
    est.teacher_dtype = cfg.teacher.get("dtype") or _teacher_config_default(cfg, "dtype") or "float32"
    s = cfg.student
    interval = interval_embedding_params(denoiser) if s.interval_embedding or s.init == "teacher" else 0
    est.student_total = count(denoiser) + interval
    lora = lora_params(denoiser, s.lora_rank, s.lora_targets) if s.lora_rank > 0 else 0
    est.student_total += lora
    est.student_trainable = lora + interval if s.lora_rank > 0 else est.student_total
    est.aux_total, est.aux_trainable = aux_copies * est.student_total, aux_copies * est.student_trainable
    b = DTYPE_BYTES[est.teacher_dtype]
    frozen_student = est.student_total - est.student_trainable
    frozen_aux = est.aux_total - est.aux_trainable
    est.memory_gib = {
        f"teacher weights ({est.teacher_dtype})": sum(est.teacher_params.values()) * b / GIB,
        "student + copies: trainable (fp32 weight, grad, 2 AdamW moments: 16 B)":
            (est.student_trainable + est.aux_trainable) * 16 / GIB,
        f"student + copies: frozen base ({est.teacher_dtype})": (frozen_student + frozen_aux) * b / GIB,
        "student EMA (its trainable parameters, fp32)": est.student_trainable * 4 / GIB,
    }
    return est


def _teacher_config_default(cfg: RunConfig, key: str):
    from onestep.registry import TEACHERS, load_builtin

    load_builtin()
    dc = TEACHERS.get(cfg.teacher["name"]).Config
    return getattr(dc(**({"path": "x"} if cfg.teacher["name"] == "edm" else {})), key, None)


# ------------------------------------------------------------------------------------------------
# activations at full size, without the memory: the student's training pass on fake tensors


class LiveBytes(TorchDispatchMode):
    """A dispatch mode that adds up the bytes of every storage the ops under it create (views share theirs) and keeps
    the largest sum alive at once: activations saved for backward, temporaries, gradients. A storage counts while a
    tensor the ops returned still uses it (weak references to those tensors), and nothing is followed after the mode
    exits."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0
        self._users: dict[int, list] = {}    # storage id -> [bytes, number of live tensors]
        self._refs: list = []

    def _release(self, key: int) -> None:
        entry = self._users.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self._users[key]

    def __exit__(self, *exc):
        self._refs, self._users = [], {}    # the callbacks go with their references
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = torch._C._storage_id(t)
                if key not in self._users:
                    nbytes = _extent_bytes(t)
                    self._users[key] = [nbytes, 0]
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._users[key][1] += 1
                self._refs.append(weakref.ref(t, lambda _ref, k=key: self._release(k)))
        return out


def _extent_bytes(t: torch.Tensor) -> int:
    """The bytes of storage a tensor reaches (its offset plus its strided extent), read from its metadata: making a
    Python object of the storage itself, under a dispatch mode, crashes the process later."""
    if t.numel() == 0:
        return 0
    extent = 1 + t.storage_offset() + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return extent * t.element_size()


def meta_free_model(class_name: str, config):
    """The model of `class_name` built from `config` in the current tensor mode (fake parameters under fake mode)."""
    cls = _class(class_name)
    if hasattr(cls, "from_config"):
        return cls.from_config(config)
    model = cls(cls.config_class(**config) if isinstance(config, dict) else config)
    model.tie_weights()
    return model


def _denoiser_inputs(denoiser, cfg: RunConfig, spec: dict, batch: int, dtype: torch.dtype) -> dict:
    """Keyword arguments of one forward of the full-size denoiser at the recipe's resolution, as its adapter passes
    them (shapes and dtypes from the published configs: latents, timestep, prompt embeddings of the text encoders'
    width and the recipe's sequence length)."""
    name = type(denoiser).__name__
    c = denoiser.config
    side_px = cfg.teacher.get("resolution") or None
    factor = 32 if spec.get("vae", ("", {}))[0] == "AutoencoderDC" else 8
    side = side_px // factor if side_px else c.sample_size
    seq = cfg.teacher.get("max_sequence_length") or 77
    t = torch.full((batch,), 500.0)
    if name == "UNet2DModel":
        labels = torch.zeros(batch, dtype=torch.long) if c.num_class_embeds else None
        return dict(sample=torch.randn(batch, c.in_channels, side, side, dtype=dtype), timestep=t, class_labels=labels)
    if name == "UNet2DConditionModel":
        kw = dict(sample=torch.randn(batch, c.in_channels, side, side, dtype=dtype), timestep=t,
                  encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim, dtype=dtype))
        if c.addition_embed_type == "text_time":   # SDXL: pooled text embedding and 6 micro-conditioning ids
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, dtype=dtype),
                                       "time_ids": torch.zeros(batch, 6, dtype=dtype)}
        return kw
    if name == "SD3Transformer2DModel":
        return dict(hidden_states=torch.randn(batch, c.in_channels, side, side, dtype=dtype), timestep=t,
                    encoder_hidden_states=torch.randn(batch, 77 + seq, c.joint_attention_dim, dtype=dtype),
                    pooled_projections=torch.randn(batch, c.pooled_projection_dim, dtype=dtype))
    if name == "FluxTransformer2DModel":
        tokens = (side // 2) ** 2
        return dict(hidden_states=torch.randn(batch, tokens, c.in_channels, dtype=dtype), timestep=t / 1000,
                    encoder_hidden_states=torch.randn(batch, seq, c.joint_attention_dim, dtype=dtype),
                    pooled_projections=torch.randn(batch, c.pooled_projection_dim, dtype=dtype),
                    img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(seq, 3),
                    guidance=torch.full((batch,), 3.5) if c.guidance_embeds else None)
    if name == "SanaTransformer2DModel":
        return dict(hidden_states=torch.randn(batch, c.in_channels, side, side, dtype=dtype), timestep=t,
                    encoder_hidden_states=torch.randn(batch, seq, c.caption_channels, dtype=dtype),
                    encoder_attention_mask=torch.ones(batch, seq))
    raise ValueError(f"no example inputs for {name}")


def training_pass_bytes(denoiser, cfg: RunConfig, spec: dict, dtype: torch.dtype) -> int:
    """Peak bytes the student's training pass holds beyond its weights: `denoiser` (the teacher's architecture, fake
    or real) given the student's LoRA adapters (trainable, fp32) and gradient checkpointing as the recipe says, run
    forward and backward at the recipe's resolution and data.batch_size under its autocast."""
    s = cfg.student
    if s.lora_rank > 0:
        from unittest import mock

        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        # the adapters stay fp32 (as the trainer keeps them) and where they are made: peft's moves to the base
        # layer's dtype and device would swap fake parameters, which torch refuses
        with mock.patch.object(BaseTunerLayer, "_move_adapter_to_device_of_base_layer", lambda *a, **k: None), \
                mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
            inject_adapter_in_model(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha or s.lora_rank,
                                               target_modules=list(s.lora_targets)), denoiser)
        for n, p in denoiser.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        denoiser.requires_grad_(True)
    if s.gradient_checkpointing and getattr(denoiser, "_supports_gradient_checkpointing", False):
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    inputs = _denoiser_inputs(denoiser, cfg, spec, cfg.data.batch_size, dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    with LiveBytes() as mode:
        with autocast:
            out = denoiser(**inputs, return_dict=False)[0]
        out.float().pow(2).mean().backward()
    return int(mode.peak)


def activation_bytes(cfg: RunConfig) -> int:
    """Peak memory of one training pass of the recipe's student at full size, beyond its weights, in bytes: the
    published architecture of the teacher's denoiser built with fake parameters in the teacher's dtype (torch's
    FakeTensorMode: shapes and dtypes, no storage) and run by `training_pass_bytes`. Only fake tensors take part
    (fake and real tensors mixed in one trace corrupted memory under torch 2.14)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec, _ = _full_size_spec(cfg)
    dtype = getattr(torch, cfg.teacher.get("dtype") or _teacher_config_default(cfg, "dtype") or "float32")
    previous = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)
        try:
            denoiser = meta_free_model(*spec["denoiser"])
        finally:
            torch.set_default_dtype(previous)
        return training_pass_bytes(denoiser, cfg, spec, dtype)


# ------------------------------------------------------------------------------------------------
# the tiny build


def _tiny_data(cfg: RunConfig, folder: Path, teacher_cfg_tiny: dict) -> dict:
    """The recipe's data section with a tiny prompts file / image folder and at most 2 teacher steps."""
    d = cfg.data
    out = {"batch_size": 2, "teacher_steps": min(d.teacher_steps, 2)}
    if d.name == "prompts":
        prompts = folder / "prompts.txt"
        prompts.write_text("a cat\nthe dog\na cat and the dog\n", encoding="utf-8")
        out["path"] = str(prompts)
    elif d.name == "image_folder":
        from PIL import Image

        images = folder / "images"
        images.mkdir()
        gen = torch.Generator().manual_seed(0)
        side = 16  # the tiny teachers' images: 8 x 8 pixels (pixel UNets) or 16 x 16 (latent teachers)
        for i in range(4):
            pixels = torch.randint(0, 256, (side, side, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(images / f"{i}.png")
        out["path"] = str(images)
    return out


def _check_data_file(cfg: RunConfig) -> str:
    from onestep.data import load_prompts

    d = cfg.data
    if not d.path:
        return f"data.name={d.name}: built in (no file)"
    p = Path(d.path).expanduser()
    if not p.exists():
        return f"data.path {d.path} not found: the real run needs it (the dry run uses a tiny stand-in)"
    if d.name == "prompts":
        return f"data.path {d.path}: {len(load_prompts(p))} prompts"
    if not p.is_dir():
        return f"data.path {d.path} is not a folder"
    n = sum(1 for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return f"data.path {d.path}: {n} files (images are read and checked by the real run)"


@contextlib.contextmanager
def _quiet():
    """No progress bars or loader chatter from diffusers/transformers during the tiny build."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()


def tiny_run(cfg: RunConfig, folder: Path, max_steps: int = 12) -> dict:
    """Build the recipe at tiny size in `folder` and train until every optimizer group stepped once."""
    import copy

    from onestep.teachers.tiny import save_tiny_teacher
    from onestep.trainer import Trainer

    tiny = copy.deepcopy(cfg)
    class_conditional = cfg.data.name == "class_labels"
    tiny.teacher = save_tiny_teacher(cfg.teacher["name"], dict(cfg.teacher), folder / "teacher", class_conditional)
    for key, value in _tiny_data(cfg, folder, tiny.teacher).items():
        setattr(tiny.data, key, value)
    tr = tiny.train
    tr.steps, tr.device, tr.progress, tr.sample_every = max_steps, "cpu", False, 0
    tr.mixed_precision = "no"  # the tiny build is float32 on the CPU
    tr.checkpoint_every = 10 ** 9
    tiny.output_dir, tiny.name = str(folder), "run"
    validate(tiny)
    t0 = time.perf_counter()
    trainer = Trainer(tiny, run_dir=folder / "run")
    built_s = time.perf_counter() - t0
    groups = set(trainer.groups)
    stepped: set[str] = set()
    losses = []
    t0 = time.perf_counter()
    while not groups <= stepped and trainer.step < max_steps:
        active = trainer.objective.active_groups(trainer.step)
        logs = trainer.train_step()
        if trainer.nonfinite_in_a_row:
            raise RuntimeError(f"dry run: non-finite loss at tiny size in group {logs.get('nonfinite_group')}")
        stepped.update(active)
        trainer.step += 1
        losses.append(logs.get("loss"))
    step_s = time.perf_counter() - t0
    objective = trainer.objective
    student = objective.student
    aux = {name: module for name, module in objective.named_children() if name not in ("student", "teacher")
           and any(True for _ in module.parameters())}
    from onestep.build import _trainable_teacher_copies

    result = {
        "teacher_params": count(trainer.teacher),
        "student_total": count(student),
        "student_trainable": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "aux": {name: (count(m), sum(p.numel() for p in m.parameters() if p.requires_grad)) for name, m in aux.items()},
        "aux_copies": len(_trainable_teacher_copies(objective)),
        "groups": sorted(groups), "steps": trainer.step, "losses": losses,
        "build_s": built_s, "step_s": step_s, "sample_shape": tuple(trainer.teacher.sample_shape),
    }
    trainer.close()
    return result


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def dry_run_estimate(cfg: RunConfig) -> dict:
    """The full-size memory estimate `--dry-run` prints, in bytes: {"total_bytes", "parts": {part: bytes}}
    (a tiny build counts the objective's teacher-copied networks)."""
    with _quiet(), tempfile.TemporaryDirectory(prefix="onestep-estimate-") as tmp:
        copies = tiny_run(cfg, Path(tmp))["aux_copies"]
    est = full_size_estimate(cfg, copies)
    parts = {k: int(v * GIB) for k, v in est.memory_gib.items()}
    parts["activations of one training pass"] = activation_bytes(cfg)
    return {"total_bytes": sum(parts.values()), "parts": parts}


def dry_run(cfg: RunConfig, print_fn=print, activations: bool = True) -> dict:
    """Validate `cfg` (already loaded by load_config), build it at tiny size, estimate the full size (with the
    activations of one training pass unless `activations` is False: that trace takes tens of seconds)."""
    if cfg.teacher.get("name") not in FAMILY_DEFAULT:
        raise ConfigError(f"--dry-run builds the adapter teachers ({', '.join(FAMILY_DEFAULT)}); teacher "
                          f"{cfg.teacher.get('name')} runs as it is: use onestep distill without --dry-run")
    from onestep.teachers.loading import hub_offline

    tc, s = cfg.teacher, cfg.student
    print_fn(f"recipe {cfg.name}: teacher {tc['name']} ({tc.get('path') or 'default path'}), objective "
             f"{cfg.objective['name']}, data {cfg.data.name}: config valid")
    print_fn(f"  {_check_data_file(cfg)}")
    with _quiet(), tempfile.TemporaryDirectory(prefix="onestep-dryrun-") as tmp:
        tiny = tiny_run(cfg, Path(tmp))
    print_fn(f"tiny build (same architecture family, float32, CPU, nothing downloaded; HF_HUB_OFFLINE="
             f"{'1' if hub_offline() else 'unset'}): built in {tiny['build_s']:.1f} s, {tiny['steps']} training "
             f"step(s) in {tiny['step_s']:.1f} s (groups {', '.join(tiny['groups'])}), losses "
             + ", ".join("nan" if v is None else f"{v:.4g}" for v in tiny["losses"]))
    print_fn(f"  teacher {_fmt(tiny['teacher_params'])} params, student {_fmt(tiny['student_trainable'])} trainable / "
             f"{_fmt(tiny['student_total'])}" + "".join(f", {n} {_fmt(tr)} trainable / {_fmt(tot)}"
                                                   for n, (tot, tr) in tiny["aux"].items()))
    est = full_size_estimate(cfg, tiny["aux_copies"])
    print_fn(f"full size (meta-device build of {est.source}):")
    print_fn("  teacher " + ", ".join(f"{k} {_fmt(v)}" for k, v in est.teacher_params.items())
             + f" = {_fmt(sum(est.teacher_params.values()))} params")
    lora = f" (LoRA rank {s.lora_rank} on {', '.join(s.lora_targets)} + interval embedding)" if s.lora_rank else \
        " (full fine-tune)"
    print_fn(f"  student {_fmt(est.student_trainable)} trainable / {_fmt(est.student_total)}{lora}")
    if est.aux_total:
        print_fn(f"  teacher-copied nets of the objective ({tiny['aux_copies']}): {_fmt(est.aux_trainable)} trainable / "
                 f"{_fmt(est.aux_total)}")
    heads = {n: v for n, v in tiny["aux"].items() if n not in ("fake_score", "score_net")}
    if heads:
        print_fn("  discriminator heads: " + ", ".join(f"{n} {_fmt(v[0])} at tiny size" for n, v in heads.items())
                 + " (their full-size width follows the teacher's features; not in the estimate)")
    if activations:
        t0 = time.perf_counter()
        act = activation_bytes(cfg)
        est.memory_gib[f"activations of one training pass (batch {cfg.data.batch_size}, traced on fake tensors "
                       f"in {time.perf_counter() - t0:.0f} s)"] = act / GIB
    total = sum(est.memory_gib.values())
    with_act = any(k.startswith("activations") for k in est.memory_gib)
    print_fn(f"estimated GPU memory at full size: {total:.1f} GiB (" + (
        "weights, optimizer state, EMA and the activations of one training pass" if with_act else
        "weights, optimizer state and EMA; activations not estimated in this call") + ")")
    for k, v in est.memory_gib.items():
        print_fn(f"  {k}: {v:.2f} GiB")
    extras = []
    if s.gradient_checkpointing:
        extras.append("gradient checkpointing on (activations recomputed in backward)")
    if cfg.train.mixed_precision != "no":
        extras.append(f"mixed precision {cfg.train.mixed_precision} (compute; master weights stay fp32)")
    if extras:
        print_fn("  " + "; ".join(extras))
    gpu = torch.cuda.is_available()
    print_fn("GPU: " + (f"{torch.cuda.get_device_name(0)} present, but nothing was run on it" if gpu else
                        "none here: nothing was measured on a GPU; the numbers above are counts and arithmetic"))
    return {"tiny": tiny, "estimate": est, "memory_total_gib": total}


__all__ = ["dry_run", "dry_run_estimate", "activation_bytes", "training_pass_bytes", "LiveBytes", "tiny_run", "full_size_estimate", "full_size_components", "meta_model", "FULL_SIZE_MODELS",
           "interval_embedding_params", "lora_params"]
