"""Run by tests/onestep/test_sharded.py under
`accelerate launch --config_file configs/accelerate/{fsdp,deepspeed_zero2}.yaml
--num_processes 2` (gloo on CPU): trains students with the strategy the launch config selects (train.distributed
=auto: FSDP2 or DeepSpeed ZeRO-2) and records per rank what the test compares with one process: the run folder
(checkpoints with whole state dicts), the rows of teacher sampling this rank did, and the strategy used.

    accelerate launch --config_file C --num_processes 2 tests/onestep/sharded_worker.py OUT TEACHER LABEL OBJECTIVE...
"""
import json
import os
import sys
from pathlib import Path

from onestep.config import ConfigError, load_config
from onestep.trainer import Trainer

BATCH, STEPS, EVERY = 4, 20, 10
#: per objective: f-distill's critic takes 2 steps per generator step, all three groups train within 20 steps
OPTIONS = {"fdistill": ["objective.critic_per_generator=2", "train.clip_grad_norm=1.0"],
           "fdistill_rkl": ["objective.name=fdistill", "objective.divergence=reverse_kl", "objective.gan_weight=0",
                            "objective.critic_per_generator=2", "objective.lr=1e-3"],
           "smd": ["objective.critic_per_generator=2", "objective.lr=1e-3", "objective.score_lr=1e-3"],
           # the sampling these comparisons were set up with (a quarter of the interval samples on (0, 1)): with
           # the default's half on three intervals, this random tiny teacher drives gradient norms to ~2000 and
           # Adam turns rounding-level differences of the batch split into 2.5e-4 after 10 steps (measured)
           "splitmeanflow": ["objective.lr=1e-3", "objective.anchor_share=0.25",
                             "objective.anchor_intervals=[[0.0,1.0]]"]}


def sharded_cfg(out: Path, teacher: Path, objective: str, batch: int, steps: int, strategy: str, extra=(),
                name: str | None = None):
    """SplitMeanFlow: a tiny pixel UNet teacher (tests save it with onestep.teachers.tiny), its samples as data,
    clipping tight enough to act at every step (so a per-shard norm would show). f-distill: the shipped digits
    teacher on digits (a trained teacher: with the random tiny one the critics' gradients are so noisy that
    AdamW turns rounding-level differences of the batch split into 5e-5 within 10 steps, under DDP as much as
    under FSDP)."""
    teacher_options = [
        "teacher.name=unet", f"teacher.path={teacher}", "teacher.subfolder=unet",
        "teacher.scheduler_subfolder=scheduler",
        "data.name=teacher_samples", "data.teacher_steps=2"] if objective == "splitmeanflow" else \
        ["teacher.name=digits", "data.name=digits"]
    return load_config(None, [
        f"name={name or f'{objective}-{strategy}'}", f"output_dir={out}", *teacher_options, "student.init=teacher",
        f"data.batch_size={batch}", f"train.steps={steps}",
        f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=5", "train.log_every=1", "train.clip_grad_norm=0.05",
        "train.progress=false", "train.device=cpu", "train.num_threads=1", f"train.distributed={strategy}",
        "train.sample_steps=[1]", f"objective.name={objective}", *OPTIONS.get(objective, ()), *extra])


def main(out: Path, teacher: Path, strategy: str, objectives: list[str]) -> None:
    last = None
    for objective in objectives:
        try:
            t = Trainer(sharded_cfg(out, teacher, objective, BATCH, STEPS, "auto", name=f"{objective}-{strategy}"))
        except ConfigError as e:   # recorded for the test: the refusal must be one line naming the strategy
            record = {"refused": str(e)}
        else:
            t.fit(resume=False)
            record = {"strategy": type(t.parallel).__name__, "teacher_rows": getattr(t.data, "teacher_passes", None),
                      "world": t.accelerator.num_processes}
            last = t
        rank = int(os.environ.get("RANK", 0))
        (out / f"{objective}-{strategy}-rank{rank}.json").write_text(json.dumps(record))
    if last is not None:
        last.close()  # the process group is ended once, after every run (a second group in one process fails)


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce (C++, ~40 s on 2 cores in a fresh
    environment) when its backend starts; gloo does the same reductions, and on GPUs NCCL does, so the test
    skips the build rather than pay it on every clean CI run."""
    import importlib

    try:  # by module path: the package `deepspeed.comm` also holds the name `torch` (the torch package)
        backend = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    backend.build_shm_op = lambda: None


if __name__ == "__main__":
    skip_deepspeed_shm_build()
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown; every result is on disk
