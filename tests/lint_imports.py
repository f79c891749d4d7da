"""Run import-linter's contracts (pyproject.toml, [tool.importlinter]) on onestep as it installs.

In the repository `teachers/`, `objectives/` and `evaluation/` sit beside `onestep/`, and the install maps
them to `onestep.teachers`, `onestep.objectives` and `onestep.evaluation`; import-linter reads a package's
folder, so this copies the four folders into that layout in a temporary directory and lints the copy.

    python tests/lint_imports.py        # exit status 0 when every contract holds
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("teachers", "objectives", "evaluation")


def stage(into: Path) -> Path:
    package = into / "onestep"
    ignore = shutil.ignore_patterns("__pycache__", "assets")
    shutil.copytree(ROOT / "onestep", package, ignore=ignore)
    for name in SUBPACKAGES:
        shutil.copytree(ROOT / name, package / name, ignore=ignore)
    return into


def lint_imports(extra_import: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lint-imports` on the staged copy; `extra_import=(module file, module)` first appends `import module` to
    that file of the copy (how the tests check that a contract can break)."""
    with tempfile.TemporaryDirectory() as tmp:
        stage(Path(tmp))
        if extra_import is not None:
            path, module = extra_import
            with open(Path(tmp) / "onestep" / path, "a") as f:
                f.write(f"\nimport {module}  # noqa\n")
        env = {**os.environ, "PYTHONPATH": tmp}  # the copy, ahead of the editable install's finder
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp,
                              env=env, capture_output=True, text=True)


if __name__ == "__main__":
    result = lint_imports()
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
