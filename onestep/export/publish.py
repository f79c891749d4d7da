"""`export_run`: check the request, write the export into a temporary folder beside `out`, check that it holds
only safetensors weights, and rename it into place."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from onestep.checkpoint import sha256_file
from onestep.errors import ExportError
from onestep.export.base import FORMATS, MANIFEST, WEIGHTS, exporter_for, one_step_only
from onestep.export.lora import LORA_RANK
from onestep.export.model_card import model_card
from onestep.runs import load_run, load_student

# ------------------------------------------------------------------------------------------------
# the folder: checks, temporary folder, manifest, atomic rename


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"--out {out} already holds files that are not an onestep export; "
                          "give an empty or new directory")


#: what an export may hold: weights only as safetensors; configs, cards and tokenizer files (BPE merges,
#: sentencepiece protobufs, chat templates), none of them a pickle
ALLOWED_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".model", ".jinja")


def _check_only_safetensors(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix not in ALLOWED_SUFFIXES:
            raise ExportError(f"export would contain {f.name}: only safetensors weights and "
                              f"{', '.join(ALLOWED_SUFFIXES[1:])} files are allowed")


def _make_readable(folder: Path) -> None:
    """safetensors writes its files with mode 0600; an export is meant to be shared: use the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`, replacing an earlier export (never leaving a half-written one)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


class _NoProgressBars:
    """diffusers' and transformers' loading progress bars off while exporting (stderr is for the one-line
    error), restored afterwards."""

    def __enter__(self):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self._was = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
        for m, _ in self._was:
            m.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        for m, enabled in self._was:
            if enabled:
                m.enable_progress_bar()
        return False


def export_run(run: str | Path, out: str | Path, checkpoint: str | None = None, format: str = "diffusers",
               steps: int = 1, weights: str = "ema", lora_rank: int | None = None,
               allow_lora_residual: bool = False) -> Path:
    """Export a run's student (checkpoint `step-N`, default the latest) to `out`; returns `out`.

    `--format lora` factors the student's weight differences from the teacher at `lora_rank` (default: the
    run's student.lora_rank for a LoRA-trained student, else LORA_RANK) and refuses a relative residual
    above LORA_TOL unless `allow_lora_residual`.

    Raises ExportError with a one-line message for bad input; nothing is left behind on failure.
    """
    with _NoProgressBars():
        return _export_run(run, out, checkpoint, format, steps, weights, lora_rank, allow_lora_residual)


def _export_run(run, out, checkpoint, format, steps, weights, lora_rank, allow_lora_residual) -> Path:
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    if weights not in WEIGHTS:
        raise ExportError(f"unknown weights {weights!r}; allowed: {', '.join(WEIGHTS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ExportError(f"steps must be an integer >= 1, got {steps!r}")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ExportError(f"lora rank must be an integer >= 1, got {lora_rank!r}")
    out = Path(out)
    _check_out(out)
    info = load_run(run, checkpoint, weights)
    exporter = exporter_for(info.cfg)
    if steps != 1 and (why := one_step_only(info.cfg, exporter)):
        raise ExportError(why)
    exporter.check(info.cfg, format, steps)
    if lora_rank is None:  # a LoRA-trained student's delta has its training rank (exactly, merged)
        lora_rank = getattr(info.cfg.student, "lora_rank", 0) or LORA_RANK
    exporter.lora_rank, exporter.allow_lora_residual = lora_rank, bool(allow_lora_residual)
    student, teacher = load_student(info)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        result = exporter.write(student, teacher, info, tmp, format, steps)
        (tmp / "README.md").write_text(model_card(info, exporter, result, out, format, steps,
                                                       getattr(student, "has_interval_embedding", True)))
        _check_only_safetensors(tmp)
        _make_readable(tmp)
        manifest = {
            "onestep_export": 1, "format": format, "steps": steps, "run": info.cfg.name,
            "checkpoint": info.checkpoint.name, "weights": weights, "sampler": student.sampler_spec().to_dict(),
            **({"lora_rank": lora_rank} if format == "lora" else {}),
            "files": {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _check_out(out)  # still ours to replace (nothing appeared there meanwhile)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
