"""mkdocs hook: let mkdocstrings find `onestep.teachers`, `onestep.objectives` and `onestep.evaluation`.

They live at the top of the repository (`teachers/`, `objectives/`, `evaluation/`) and install as sub-packages of
`onestep` (pyproject's package-dir). Griffe reads source statically and would look for them in `onestep/`, so this
hook lays out the installed package as a tree of symlinks in a temporary folder and puts it first on the handler's
search path; nothing in the repository changes.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"teachers": "teachers", "objectives": "objectives", "evaluation": "evaluation", "configs": "configs"}


@event_priority(100)   # before mkdocstrings reads its handler options
def on_config(config, **kwargs):
    tree = Path(tempfile.mkdtemp(prefix="onestep-api-"))
    atexit.register(shutil.rmtree, tree, ignore_errors=True)
    package = tree / "onestep"
    package.mkdir()
    for entry in (ROOT / "onestep").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in SUBPACKAGES.items():
        (package / name).symlink_to(ROOT / folder)
    python = config["plugins"]["mkdocstrings"].config["handlers"].setdefault("python", {})
    python["paths"] = [str(tree)]
    return config
