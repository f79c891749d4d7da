"""Finding and checking training checkpoints (runs/<name>/checkpoints/step-XXXXXX/).

A checkpoint is written to `step-XXXXXX.tmp` and renamed when complete, so a folder named `step-N` was
finished; `checksums.json` (SHA-256 of every other file) then catches what a rename cannot: a file
truncated or altered afterwards (a full disk, a bad copy, bit rot). Resuming takes the newest checkpoint
that verifies and warns about each one it skips.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

CHECKSUMS = "checksums.json"


def finished_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a `.tmp` folder is an interrupted save)."""
    done = [p for p in Path(ckpt_dir).glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    sums = {f.name: sha256_file(f) for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != CHECKSUMS}
    (Path(folder) / CHECKSUMS).write_text(json.dumps(sums, indent=1))


def checkpoint_problem(folder: Path, required: tuple[str, ...] = ()) -> str | None:
    """None if `folder` is a complete, unaltered checkpoint; otherwise what is wrong, in a few words."""
    folder = Path(folder)
    sums_file = folder / CHECKSUMS
    if not sums_file.is_file():
        return f"{CHECKSUMS} is missing"
    try:
        sums = json.loads(sums_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{CHECKSUMS} is unreadable"
    for name in required:
        if name not in sums:
            return f"{name} is missing"
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum (truncated or altered)"
    return None


def latest_valid_checkpoint(ckpt_dir: Path, required: tuple[str, ...] = ()) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped with a warning.

    A checkpoint that verifies against its own checksums but lacks a `required` file is not corrupt: a run
    configured otherwise wrote it (other optimizer groups, another number of processes). Skipping it would
    quietly restart training from step 0, so it raises ValueError instead, naming the missing files.
    """
    for folder in reversed(finished_checkpoints(ckpt_dir)):
        problem = checkpoint_problem(folder)  # its own files, hashed once
        if problem is None:
            held = json.loads((folder / CHECKSUMS).read_text())
            absent = [name for name in required if name not in held]
            if not absent:
                return folder
            raise ValueError(f"{folder} is complete but holds no {', '.join(absent)}: a run with other optimizer "
                             "groups or another number of processes wrote it; resume with the config that wrote it")
        warnings.warn(f"skipping corrupt checkpoint {folder}: {problem}", stacklevel=2)
    return None
