"""SIGKILL at chosen and random points (during steps and inside checkpoint writes), resume, and reach
bitwise the weights, EMA and optimizer state of an uninterrupted run. The work runs in
tests/onestep/crash_worker.py (its own process, one forked child per training segment)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_worker(out: Path, num_random: int, points: list[str]) -> list[dict]:
    cmd = [sys.executable, str(HERE / "crash_worker.py"), str(out), str(num_random), *points]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "crash_results.json").read_text())["cases"]


def check(cases: list[dict]) -> None:
    for c in cases:
        assert c["finished"] and c["identical"], c
    injected = [c for c in cases if not c["kill"].startswith("random")]
    assert all(c["killed"] == 1 for c in injected)   # every injected kill really landed


def test_kills_during_steps_and_checkpoint_writes_resume_bitwise(tmp_path):
    check(run_worker(tmp_path, 1, ["step:5", "rng:6", "weights:9", "rename:12"]))


@pytest.mark.slow
def test_many_kill_points_resume_bitwise(tmp_path):
    # kills inside a save must hit a step that saves (every 3 steps and the last, 24)
    points = [f"step:{s}" for s in (3, 10, 17, 24)]
    points += [f"{phase}:{s}" for phase in ("rng", "weights", "rename") for s in (3, 9, 15, 24)]
    cases = run_worker(tmp_path, 8, points)
    check(cases)
    assert len(cases) >= 20
