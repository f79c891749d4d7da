"""`onestep distill --config X --smoke`: rehearse a recipe end to end at tiny size, before spending GPUs on it.

Every stage a real run goes through, in order, on this machine and with nothing downloaded (hub access is
refused while it runs: HF_HUB_OFFLINE=1):

1. ``tiny_teacher``: the recipe's teacher family built tiny (onestep.teachers.tiny: tiny in width and depth,
   the family's real latent channels, patch size and conditioning) and saved in the hub layout; the recipe's
   own teacher options (its dtype, bf16 in the real recipes) are kept. Digits recipes use the shipped teacher.
2. ``train``: the real `Trainer.fit()` with the recipe's settings (mixed precision, LoRA, gradient
   checkpointing, gradient accumulation, EMA, the objective's critic/generator schedule, shrunk where the
   objective says so: `Objective.smoke_options`) for as many steps as it takes every optimizer group to step.
3. ``checkpoint``: the last checkpoint verifies against its checksums.
4. ``resume``: a new trainer resumes from it and takes one more step, as a restarted job does.
5. ``sample_grid``: the PNG grid of EMA samples, decoded through the VAE with the data's conditioning.
6. ``export:<format>`` and ``load:<format>`` for every format the family's exporter takes (others are listed
   as not applicable, with the exporter's reason): `onestep export`, then the export loaded as a user loads
   it (stock diffusers; the teacher's pipeline + `load_lora_weights` for LoRA) and sampled in one step.
7. ``eval_fid`` (and ``eval_clip`` where the data has prompts): `onestep eval` on the export's images, with
   the shipped digits feature net (any image, made grey at 16 px: the whole FID path, offline and fast) and a random
   tiny CLIP.

`smoke.json` in the run folder records each stage (status, seconds, peak memory); the command exits 0 only if
no stage failed. A stage after a failed one it needs is skipped.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from onestep.config import RunConfig, validate
from onestep.errors import ConfigError

#: images each export generates and eval scores
SMOKE_IMAGES = 8
SMOKE_FOLDER_MARK = "smoke.json"


@dataclass
class Stage:
    name: str
    status: str = "skipped"      # ok | failed | skipped | n/a
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    detail: str = ""


class PeakMemory:
    """The process's peak resident memory while the block runs (a thread reads /proc/self/statm every 20 ms;
    where there is none, the lifetime peak from getrusage) and CUDA's peak allocation."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.02)

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return False


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:500]}"


class Smoke:
    """The stages of one rehearsal; each is run inside `stage(name)`."""

    def __init__(self, folder: Path, print_fn=print):
        self.folder, self.print = folder, print_fn
        self.stages: list[Stage] = []

    @contextlib.contextmanager
    def stage(self, name: str, needs: tuple[str, ...] = ()):
        """Run the block as stage `name`; skipped if a stage it needs did not pass. Yields the Stage (the block
        may set `detail`, or `status = "n/a"`)."""
        st = Stage(name)
        self.stages.append(st)
        failed = [s.name for s in self.stages if s.name in needs and s.status not in ("ok", "n/a")]
        if failed:
            st.detail = f"needs {', '.join(failed)}"
            self.print(f"  {name}: skipped ({st.detail})")
            yield None
            return
        t0 = time.perf_counter()
        try:
            with PeakMemory() as mem:
                yield st
            if st.status == "skipped":
                st.status = "ok"
        except _Skip:
            pass
        except Exception as e:  # noqa: BLE001 - a stage's failure is recorded, the rehearsal goes on
            st.status, st.detail = "failed", _one_line(e)
            (self.folder / f"{name.replace(':', '-')}.traceback.txt").write_text(traceback.format_exc())
            mem = None
        st.seconds = round(time.perf_counter() - t0, 3)
        if mem is not None:
            st.peak_rss_bytes, st.peak_cuda_bytes = mem.peak, mem.cuda_peak
        self.print(f"  {name}: {st.status} ({st.seconds:.1f} s)" + (f": {st.detail}" if st.detail else ""))

    def ok(self, name: str) -> bool:
        return any(s.name == name and s.status == "ok" for s in self.stages)

    @property
    def passed(self) -> bool:
        return all(s.status in ("ok", "n/a") for s in self.stages)


class _Skip(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# the tiny build of the recipe


def _smoke_config(cfg: RunConfig, folder: Path) -> RunConfig:
    """The recipe with a tiny teacher (same family, the recipe's dtype), tiny data files and the objective's
    smoke options; everything about how it trains (precision, LoRA, accumulation, EMA) is the recipe's."""
    from onestep.dryrun import _tiny_data
    from onestep.registry import OBJECTIVES, load_builtin
    from onestep.teachers.tiny import save_tiny_teacher, tiny_families

    load_builtin()
    tiny = copy.deepcopy(cfg)
    name = cfg.teacher.get("name")
    if name in tiny_families():
        class_conditional = cfg.data.name == "class_labels"
        options = save_tiny_teacher(name, dict(cfg.teacher), folder / "teacher", class_conditional)
        # the recipe's precision: a bf16 recipe rehearses with a bf16 teacher
        options["dtype"] = cfg.teacher.get("dtype", options["dtype"])
        tiny.teacher = options
        for key, value in _tiny_data(cfg, folder, tiny.teacher).items():
            setattr(tiny.data, key, value)
    obj_cls = OBJECTIVES.get(cfg.objective["name"])
    tiny.objective = {**cfg.objective, **obj_cls.smoke_options(cfg.objective)}
    tr = tiny.train
    tr.progress, tr.sample_every, tr.checkpoint_every, tr.keep_checkpoints = False, 0, 10 ** 9, 2
    # the recipe's peak learning rate from the first step: a few steps of a long warm-up barely move a LoRA, whose
    # change then rounds away in a bf16 export
    tr.warmup_steps, tr.decay_steps = 0, 0
    tr.distributed = "ddp"  # a rehearsal is one process
    tiny.output_dir, tiny.name = str(folder), "run"
    validate(tiny)
    return tiny


def steps_for_every_group(objective, limit: int = 64) -> int:
    """The fewest training steps after which every optimizer group has stepped at least once."""
    groups, seen = set(objective.param_groups()), set()
    for step in range(limit):
        seen.update(objective.active_groups(step))
        if groups <= seen:
            return step + 1
    raise ConfigError(f"--smoke: groups {sorted(groups - seen)} of objective {type(objective).__name__} do not step "
                      f"within {limit} steps; shrink its schedule in its smoke_options")


# ------------------------------------------------------------------------------------------------
# exports as users load them


def _prompts(tiny: RunConfig) -> list[str] | None:
    from onestep.data import load_prompts

    if tiny.data.name != "prompts":
        return None
    prompts = load_prompts(tiny.data.path)
    return [prompts[i % len(prompts)] for i in range(SMOKE_IMAGES)]


def _save_pngs(images: np.ndarray, folder: Path) -> Path:
    """float [N, H, W, C] in [0, 1] -> PNG files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    for i, img in enumerate(pixels):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:04d}.png")
    return folder


def load_and_sample(export: Path, fmt: str, tiny: RunConfig, teacher, prompts, out: Path) -> str:
    """Load an export the way its model card says and sample SMOKE_IMAGES images in one step into `out`."""
    import diffusers

    from onestep.export import exporter_for

    generator = torch.Generator().manual_seed(0)
    dtype = {"torch_dtype": getattr(torch, tiny.teacher["dtype"])} if tiny.teacher.get("dtype") else {}
    if fmt == "lora":
        pipe = diffusers.DiffusionPipeline.from_pretrained(tiny.teacher["path"], **dtype)
        pipe.load_lora_weights(str(export))
        config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
        scheduler_cls = getattr(diffusers, config["_class_name"], None)
        if scheduler_cls is None:
            from onestep import pipelines

            scheduler_cls = getattr(pipelines, config["_class_name"])
        pipe.scheduler = scheduler_cls.from_pretrained(str(export), subfolder="scheduler")
    elif json.loads((export / "model_index.json").read_text())["_class_name"] == "OneStepPipeline":
        from onestep.pipelines import OneStepPipeline  # the digits family's onestep format (needs onestep)

        pipe = OneStepPipeline.from_pretrained(str(export))
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(export), **dtype)  # as the model card loads it
    pipe.set_progress_bar_config(disable=True)
    exporter = exporter_for(tiny)
    if prompts is not None:
        kwargs = {**exporter.call_kwargs(teacher, 1), "prompt": prompts}
    else:
        kwargs = {"batch_size": SMOKE_IMAGES, "num_inference_steps": 1}
    images = pipe(generator=generator, output_type="np", **kwargs).images
    images = np.asarray(images)
    if images.shape[0] != SMOKE_IMAGES or not np.isfinite(images).all():
        raise RuntimeError(f"{type(pipe).__name__} returned {images.shape} images "
                           f"(finite: {np.isfinite(images).all()})")
    _save_pngs(images, out)
    return f"{type(pipe).__name__}: {SMOKE_IMAGES} images {images.shape[1]}x{images.shape[2]}"


# ------------------------------------------------------------------------------------------------
# evaluation models that need no download


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer CLIP (text and 32 px vision towers) with a byte-level tokenizer, saved as
    `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained` load it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from onestep.teachers.tiny import clip_tokenizer

    tok = clip_tokenizer(folder / "vocab")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    processor.save_pretrained(folder)
    return folder


def _reference_images(tiny: RunConfig, trainer, folder: Path) -> Path:
    """Images for the FID reference: held-out digits for the digits family, else the tiny teacher's own samples
    (decoded), which the rehearsal's student is compared with."""
    from onestep.data import load_digits

    if trainer.teacher is None or tiny.teacher.get("name") == "digits":
        images = (load_digits("heldout").images[:64].permute(0, 2, 3, 1).numpy() + 1) / 2
        return _save_pngs(images, folder)
    teacher = trainer.teacher
    noise = torch.randn(SMOKE_IMAGES, *teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    cond = trainer.data.sample_conditions(SMOKE_IMAGES)
    dtype = trainer.teacher_dtype()
    with torch.no_grad(), trainer.accelerator.autocast():
        x = teacher.sample(noise.to(trainer.accelerator.device, dtype), cond, steps=2)
        images = teacher.decode(x.to(dtype)).float().clamp(-1, 1)
    return _save_pngs(((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy(), folder)


# ------------------------------------------------------------------------------------------------


def smoke(cfg: RunConfig, print_fn=print) -> dict:
    """Rehearse `cfg` (loaded and validated) in `output_dir/<name>-smoke`; returns the smoke.json record."""
    from onestep.checkpoint import checkpoint_problem, finished_checkpoints
    from onestep.trainer import Trainer

    folder = Path(cfg.output_dir) / f"{cfg.name}-smoke"
    if folder.exists():
        if not (folder / SMOKE_FOLDER_MARK).is_file():
            raise ConfigError(f"--smoke writes into {folder}, which exists and holds no {SMOKE_FOLDER_MARK}: move it "
                              "or set output_dir=... / name=...")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / SMOKE_FOLDER_MARK).write_text("{}")   # claims the folder, replaced at the end
    run = Smoke(folder, print_fn)
    t_start = time.perf_counter()
    print_fn(f"smoke {cfg.name}: teacher {cfg.teacher.get('name')}, objective {cfg.objective['name']}, data "
             f"{cfg.data.name}, mixed precision {cfg.train.mixed_precision}, LoRA rank {cfg.student.lora_rank}")
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    state: dict = {}
    try:
        with run.stage("tiny_teacher") as st:
            tiny = state["tiny"] = _smoke_config(cfg, folder)
            st.detail = str(tiny.teacher.get("path") or f"teacher {tiny.teacher.get('name')}")
        with run.stage("train", needs=("tiny_teacher",)) as st:
            if st is not None:
                trainer = Trainer(tiny)
                n = steps_for_every_group(trainer.objective)
                trainer.cfg.train.steps = n
                trainer.fit(resume=False, samples=False)
                state["steps"], state["trainer"] = n, trainer
                st.detail = f"{n} steps, groups {', '.join(trainer.groups)}"
        with run.stage("checkpoint", needs=("train",)) as st:
            if st is not None:
                done = finished_checkpoints(Path(folder) / "run" / "checkpoints")
                if not done or int(done[-1].name[5:]) != state["steps"]:
                    raise RuntimeError(f"no checkpoint of step {state['steps']} in {folder / 'run' / 'checkpoints'}")
                problem = checkpoint_problem(done[-1])
                if problem:
                    raise RuntimeError(f"{done[-1]}: {problem}")
                st.detail = done[-1].name
        with run.stage("resume", needs=("checkpoint",)) as st:
            if st is not None:
                state["trainer"].close()
                again = copy.deepcopy(tiny)
                again.train.steps = state["steps"] + 1
                resumed = Trainer(again)
                if not resumed.maybe_resume() or resumed.step != state["steps"]:
                    raise RuntimeError(f"did not resume from step {state['steps']}")
                resumed.fit(resume=False, samples=False)
                state["trainer"] = resumed
                st.detail = f"step {state['steps']} -> {resumed.step}"
        with run.stage("sample_grid", needs=("resume",)) as st:
            if st is not None:
                st.detail = _check_grid(state["trainer"])
        _exports(run, state, folder)
        _evaluate(run, state, folder)
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
        if "trainer" in state:
            state["trainer"].close()
    record = {"recipe": cfg.name, "passed": run.passed, "seconds": round(time.perf_counter() - t_start, 3),
              "device": str(state["trainer"].accelerator.device) if "trainer" in state else None,
              "stages": [asdict(s) for s in run.stages]}
    (folder / SMOKE_FOLDER_MARK).write_text(json.dumps(record, indent=1) + "\n")
    failed = [s.name for s in run.stages if s.status in ("failed", "skipped")]
    print_fn(f"smoke {cfg.name}: {'passed' if run.passed else 'FAILED (' + ', '.join(failed) + ')'} in "
             f"{record['seconds']:.0f} s; {folder / SMOKE_FOLDER_MARK}")
    return record


def _check_grid(trainer) -> str:
    """The grid exists and holds decoded images (RGB at the teacher's pixel size, or grey digits), not latents."""
    from PIL import Image

    from onestep.data import teacher_image_size

    path = trainer.save_samples(n=16)
    if path is None:
        raise RuntimeError("no sample grid was written")
    with Image.open(path) as img:
        mode, (width, height) = img.mode, img.size
    teacher = trainer.teacher
    side = teacher_image_size(teacher)[-1] if teacher is not None else 16
    channels = 3 if teacher is None or teacher.capabilities.vae or teacher.sample_shape[0] == 3 else \
        teacher.sample_shape[0]
    if (width - 2) % (side + 2):
        raise RuntimeError(f"the grid's width {width} is not a row of {side}-pixel images: not decoded?")
    if mode != "RGB":
        raise RuntimeError(f"the grid is {mode}, not RGB")
    return f"{path.name}: {width}x{height}, images {side}px, {channels} channel(s)"


def _exports(run: Smoke, state: dict, folder: Path) -> None:
    from onestep.export import FORMATS, ExportError, export_run, exporter_for

    state["images"] = {}
    if "tiny" not in state:
        return
    tiny = state["tiny"]
    try:
        exporter = exporter_for(tiny)
    except ExportError as e:
        exporter, reason = None, str(e)
    for fmt in FORMATS:
        with run.stage(f"export:{fmt}", needs=("resume",)) as st:
            if st is None:
                continue
            try:
                if exporter is None:
                    raise ExportError(reason)
                exporter.check(tiny, fmt, 1)
            except ExportError as e:
                st.status, st.detail = "n/a", str(e)[:300]
                continue
            out = export_run(folder / "run", folder / f"export-{fmt}", format=fmt, steps=1)
            st.detail = str(out)
        if not run.ok(f"export:{fmt}"):
            continue
        with run.stage(f"load:{fmt}", needs=(f"export:{fmt}",)) as st:
            images = folder / f"images-{fmt}"
            st.detail = load_and_sample(folder / f"export-{fmt}", fmt, tiny, state["trainer"].teacher, _prompts(tiny),
                                        images)
            state["images"][fmt] = images


def _run_command(argv: list[str]) -> int:
    """`onestep eval ...` through the command's own argument parser and function, in this process."""
    import argparse

    from onestep.evaluation.commands import add_eval_parsers

    parser = argparse.ArgumentParser(prog="onestep")
    add_eval_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _evaluate(run: Smoke, state: dict, folder: Path) -> None:
    """`onestep eval fid` (and `eval clip`) as a user runs them, on the first export's images (or, for families
    without a stock pipeline, on samples the command generates from the run)."""
    if "trainer" not in state:
        return
    tiny, trainer = state["tiny"], state["trainer"]
    with run.stage("eval_fid", needs=("resume",)) as st:
        if st is None:
            return
        reference = _reference_images(tiny, trainer, folder / "reference")
        # the shipped digits feature net (grey, 16 px, 128-d) scores any image offline and fast; Inception needs
        # weights this machine may not have, and its 2048-d Frechet distance costs tens of seconds on a CPU
        features = ["--features", "digits"]
        images = next(iter(state["images"].values()), None)
        source = ["--images", str(images)] if images is not None else \
            ["--run", str(folder / "run"), "--num-samples", str(SMOKE_IMAGES)]
        args = ["eval", "fid", *source, "--reference", str(reference), *features, "--batch-size", "8",
                "--out", str(folder / "eval-fid")]
        code = _run_command(args)
        if code != 0:
            raise RuntimeError(f"onestep {' '.join(args)} exited with {code}")
        score = json.loads((folder / "eval-fid" / "fid.json").read_text())
        fid = score.get("scores", score).get("fid")
        st.detail = f"FID {fid:.2f} ({'export images' if images is not None else 'generated from the run'}; " \
                    "digits features)"
    prompts = _prompts(tiny)
    if prompts is None or not state["images"]:
        return
    with run.stage("eval_clip", needs=("eval_fid",)) as st:
        prompts_file = folder / "eval-prompts.txt"
        prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        clip = save_tiny_clip(folder / "tiny-clip")
        images = next(iter(state["images"].values()))
        args = ["eval", "clip", "--images", str(images), "--prompts", str(prompts_file), "--clip-model", str(clip),
                "--batch-size", "8", "--out", str(folder / "eval-clip")]
        code = _run_command(args)
        if code != 0:
            raise RuntimeError(f"onestep {' '.join(args)} exited with {code}")
        score = json.loads((folder / "eval-clip" / "clip.json").read_text())
        st.detail = f"CLIP score {score.get('scores', score)['clip_score']:.2f} (random tiny CLIP)"


__all__ = ["smoke", "Stage", "PeakMemory", "steps_for_every_group", "save_tiny_clip"]
