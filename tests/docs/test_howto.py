"""docs/howto/add-objective.md runs as written: its python blocks register a toy objective and train it one step."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "howto" / "add-objective.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_add_objective_howto_runs(tmp_path):
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) == 2, "the how-to has its objective and its training run"
    script = tmp_path / "howto.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "toy" / "checkpoints").is_dir()
