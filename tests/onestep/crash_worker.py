"""Kill training with SIGKILL at chosen points, resume, and compare with an uninterrupted run.

    python tests/onestep/crash_worker.py OUT_DIR NUM_RANDOM [PHASE:STEP ...]

Runs in its own process: it imports torch once, then forks one child per training segment (a killed
child is a real SIGKILL'd process; nothing is cleaned up). Kill points:
  * PHASE:STEP with PHASE one of `step` (right after the optimizer step), `rng` (inside a checkpoint
    save, after the RNG file), `weights` (after the weights, before the rename), `rename` (after the
    rename, before old checkpoints are pruned) -- injected by wrapping the trainer's own calls;
  * NUM_RANDOM kills at random wall-clock times during the run (a timer thread sends SIGKILL).
Each killed run is resumed (as often as needed) until it finishes; its final weights, EMA and
optimizer state must equal the uninterrupted run's bitwise. Writes OUT_DIR/crash_results.json.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
# import everything a training segment needs once, before forking: children then start in milliseconds
import diffusers.training_utils  # noqa: E402,F401
import torch.utils.tensorboard  # noqa: E402,F401

import onestep.trainer  # noqa: E402,F401
from onestep.registry import load_builtin  # noqa: E402

load_builtin()

STEPS, EVERY = 24, 3
PHASES = ("step", "rng", "weights", "rename")


def config(out: Path, name: str):
    from onestep.config import load_config

    return load_config(None, [
        f"name={name}", f"output_dir={out}", "teacher.name=gmm", "student.init=scratch", "student.backbone=mlp",
        "data.name=gmm", "data.batch_size=32", f"train.steps={STEPS}", "train.progress=false",
        f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=2", "train.log_every=1",
        "train.num_threads=1", "train.device=cpu", "train.warmup_steps=2", "train.decay_steps=10",
        "objective.name=splitmeanflow", "objective.boundary_target=data"])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(phase: str, at_step: int) -> None:
    """Wrap the trainer module's calls so that the process kills itself at (phase, step)."""
    import onestep.trainer as tr

    state = {"trainer": None}
    original_step = tr.Trainer.train_step

    def train_step(self):
        state["trainer"] = self
        logs = original_step(self)
        if phase == "step" and self.step + 1 == at_step:  # after the update, before the counter/save
            die()
        return logs
    tr.Trainer.train_step = train_step

    def saving_step():
        t = state["trainer"]
        return None if t is None else t.step

    original_save_file, original_replace = tr.save_file, tr.os.replace

    def save_file(tensors, path, *a, **k):
        original_save_file(tensors, path, *a, **k)
        name = Path(path).name
        if saving_step() == at_step and ((phase == "rng" and name.startswith("rng-"))
                                         or (phase == "weights" and name == "ema.safetensors")):
            die()
    tr.save_file = save_file

    class _OS:  # the trainer calls os.replace for the publishing rename; everything else passes through
        def __getattr__(self, item):
            return getattr(os, item)

        @staticmethod
        def replace(a, b):
            original_replace(a, b)
            if phase == "rename" and saving_step() == at_step:
                die()
    tr.os = _OS()


def segment(out: Path, name: str, kill: tuple[str, int] | None = None, delay: float | None = None) -> int:
    """Fork a child that trains (resuming if possible); returns its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if kill is not None:
                install_kill(*kill)
            if delay is not None:
                threading.Timer(delay, die).start()
            from onestep.trainer import Trainer

            Trainer(config(out, name)).fit(resume=True)
        except BaseException as e:  # noqa: BLE001 - report and exit non-zero
            print(f"child error: {e!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def final_state(out: Path, name: str) -> dict:
    from safetensors.torch import load_file

    ck = out / name / "checkpoints" / f"step-{STEPS:06d}"
    tensors = {f"trainable/{k}": v for k, v in load_file(ck / "trainable.safetensors").items()}
    tensors.update({f"ema/{k}": v for k, v in load_file(ck / "ema.safetensors").items()})
    optim = torch.load(ck / "optim-student.pt", weights_only=True)
    for i, st in optim["state"].items():
        for k, v in st.items():
            tensors[f"optim/{i}/{k}"] = torch.as_tensor(v)
    return tensors


def run_to_completion(out: Path, name: str, first_kill=None, delay=None, max_segments: int = 10) -> tuple[int, bool]:
    """Returns (number of SIGKILLs that landed, whether it finished)."""
    killed = 0
    status = segment(out, name, first_kill, delay)
    for _ in range(max_segments):
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            killed += 1
            status = segment(out, name)     # resume without a kill
            continue
        return killed, os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return killed, False


def main(out: Path, num_random: int, points: list[tuple[str, int]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    assert segment(out, "reference") == 0, "the uninterrupted run failed"
    duration = time.perf_counter() - t0
    reference = final_state(out, "reference")
    rng = random.Random(0)
    cases = [{"kill": f"{p}:{s}", "phase": p, "step": s} for p, s in points]
    cases += [{"kill": f"random:{i}", "delay": rng.uniform(0.05, 0.7) * duration} for i in range(num_random)]
    results = []
    for i, case in enumerate(cases):
        name = f"case{i:02d}"
        kill = (case["phase"], case["step"]) if "phase" in case else None
        killed, finished = run_to_completion(out, name, kill, case.get("delay"))
        identical = finished and all(torch.equal(v, reference[k]) for k, v in final_state(out, name).items()) \
            and final_state(out, name).keys() == reference.keys()
        results.append({**{k: v for k, v in case.items() if k != "delay"}, "killed": killed, "finished": finished,
                        "identical": bool(identical)})
        print(results[-1], flush=True)
    (out / "crash_results.json").write_text(json.dumps({"reference_seconds": round(duration, 2), "cases": results},
                                                       indent=1))


if __name__ == "__main__":
    pts = [(a.split(":")[0], int(a.split(":")[1])) for a in sys.argv[3:]]
    main(Path(sys.argv[1]), int(sys.argv[2]), pts)
