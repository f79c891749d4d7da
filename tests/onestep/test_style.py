"""ruff with the repository's settings (pyproject.toml: line length 120, pycodestyle, pyflakes, isort)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).with_name("ruff")


def ruff(*args, cwd=ROOT):
    return subprocess.run([str(RUFF), "check", *args], cwd=cwd, capture_output=True, text=True)


def test_the_repository_passes_ruff():
    result = ruff(".")
    assert result.returncode == 0, result.stdout[-3000:]


def test_ruff_reads_the_repository_settings(tmp_path):
    """The same settings refuse a line of 121 characters, an unused import and unsorted imports."""
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nx = '" + "a" * 117 + "'\n")
    result = ruff("--config", str(ROOT / "pyproject.toml"), str(bad))
    assert result.returncode == 1
    assert all(code in result.stdout for code in ("E501", "F401", "I001")), result.stdout
