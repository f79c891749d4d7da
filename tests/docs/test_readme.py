"""README.md: its Python quick start runs as written (a few CPU training steps on the shipped digits teacher), it
starts with `make demo` / `make test`, and it stays within 200 lines."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def section(text: str, heading: str) -> str:
    """The text under `## heading`, up to the next heading of the same level."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def test_python_quick_start_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", section(README.read_text(encoding="utf-8"), "Python quick start"), re.S)
    assert blocks, "the Python quick start has a ```python block"
    script = tmp_path / "quick_start.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "digits_splitmeanflow" / "checkpoints").is_dir()


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    first_block = lines[lines.index("```") + 1:]
    assert first_block[0].startswith("make demo") and first_block[1].startswith("make test")
