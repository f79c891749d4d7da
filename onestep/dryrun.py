"""`onestep distill --config X --dry-run`: check a recipe without its weights, data or a GPU.

1. The config is loaded and validated (every key, the teacher/objective/data combination).
2. The data file (`data.path`) is checked if it is there; if not, that is reported (the real run needs it).
3. Teacher, student and objective are built at a *tiny* size: a tiny model of the teacher's family
   (onestep.teachers.tiny: the same diffusers classes, saved in the hub layout and loaded back through
   the adapter's own `from_pretrained`), with the recipe's student options (LoRA, checkpointing) and
   objective; the data source is the recipe's, on a tiny prompts file / image folder written for it.
   Training steps run until every optimizer group has stepped once (f-distill's critic and generator).
4. Full-size parameter counts without downloading: each component of the real model is built on the
   `meta` device (accelerate's `init_empty_weights`) from its published config, declared by the family
   (`Teacher.full_size`, teachers/<family>/full_size.py), or, when `teacher.path` is a local folder, from
   that folder's own config files.
5. An estimate of GPU memory at full size: frozen weights in the teacher's dtype, trainable parameters
   at 16 bytes each (fp32 weight, gradient and two AdamW moments), the frozen part of the student and its
   trainable copies, the EMA of the student's trainable parameters, and (latent text-to-image families) the
   activations of one training pass of the student, traced at full size on fake tensors (`activation_bytes`).
   benchmarks/full_size.py checks it against peak memory measured at full size on a CPU.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from onestep.config import RunConfig, validate
from onestep.errors import ConfigError

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}

# ------------------------------------------------------------------------------------------------
# the full-size models: each teacher family declares its published configs (`Teacher.full_size`, in
# teachers/<family>/full_size.py); the parameter counts printed are what a meta-device build of them gives


def _family(name: str):
    from onestep.registry import TEACHERS

    return TEACHERS.get(name)


def dry_run_families() -> list[str]:
    """The registered teacher families `--dry-run` builds: those with a tiny builder and a full-size spec."""
    from onestep.registry import TEACHERS

    return [name for name, cls in TEACHERS.items() if cls.tiny is not None and cls.full_size is not None]


def full_size_models() -> dict:
    """hub id -> {component: (class name, config)} of every registered family's full-size models; "denoiser"
    is the network students copy."""
    from onestep.registry import TEACHERS

    models = {}
    for _, cls in TEACHERS.items():
        if cls.full_size is not None:
            models.update(cls.full_size.models)
    return models


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
    spec = _family(tc["name"]).full_size
    path = tc.get("path") or ""
    if not path or not _is_local(path) or not Path(path).expanduser().is_dir():
        return None
    root = Path(path).expanduser()
    comps = {}
    if not spec.pipeline:   # a model folder (pixel UNets), not a whole pipeline
        sub = tc.get("subfolder", "unet")
        folder = root / sub if sub else root
        config = json.loads((folder / "config.json").read_text())
        comps["denoiser"] = (config.get("_class_name", "UNet2DModel"), config)
        return comps, str(root)
    index = json.loads((root / "model_index.json").read_text())
    for sub, entry in index.items():
        if not isinstance(entry, list) or entry[0] is None or not (root / sub / "config.json").is_file():
            continue
        if sub in spec.left_out(tc):
            continue
        key = "denoiser" if sub == spec.denoiser_subfolder else sub
        config = json.loads((root / sub / "config.json").read_text())
        if entry[0] == "transformers":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(root / sub))
        comps[key] = (entry[1], config)
    return comps, str(root)


def _full_size_spec(cfg: RunConfig) -> tuple[dict, str]:
    """({component: (class name, config)}, where the configs came from) of the recipe's teacher at full size."""
    family = _family(cfg.teacher["name"])
    local = _local_components(cfg)
    if local is not None:
        spec, source = local
        return spec, f"the config files in {source}"
    path = cfg.teacher.get("path") or ""
    models = full_size_models()   # a listed path is built as listed, whichever family lists it
    key = path if path in models else family.full_size.default
    spec = dict(models[key])
    for left_out in family.full_size.left_out(cfg.teacher):
        spec.pop(left_out, None)
    source = f"the published config of {key}, declared by teacher {cfg.teacher['name']} ({family.__module__})" + \
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
    """The default of option `key` in the teacher family's Config (read from its fields: a Config may have
    options without a default, e.g. EDM's path)."""
    import dataclasses

    for f in dataclasses.fields(_family(cfg.teacher["name"]).Config):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
    return None


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
    families = dry_run_families()
    if cfg.teacher.get("name") not in families:
        raise ConfigError(f"--dry-run builds the adapter teachers ({', '.join(families)}); teacher "
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
        print_fn(f"  teacher-copied nets of the objective ({tiny['aux_copies']}): "
                 f"{_fmt(est.aux_trainable)} trainable / {_fmt(est.aux_total)}")
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


__all__ = ["dry_run", "dry_run_estimate", "activation_bytes", "training_pass_bytes", "LiveBytes", "tiny_run",
           "full_size_estimate", "full_size_components", "meta_model", "full_size_models", "dry_run_families",
           "interval_embedding_params", "lora_params"]
