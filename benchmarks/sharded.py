"""FSDP2 and DeepSpeed ZeRO-2 against one process, and SIGKILLs during a sharded run, measured in one run.

    python benchmarks/sharded.py [--kills 8] [--out benchmarks/results/sharded.json]

1. `accelerate launch --config_file configs/accelerate/{fsdp,deepspeed_zero2}.yaml --num_processes 2` (gloo, 2 CPU
   processes) trains tests/onestep/sharded_worker.py's runs for 20 steps: SplitMeanFlow on a tiny pixel-UNet teacher
   with its own samples as data (teacher_steps 2), f-distill JS on the digits teacher (FSDP only: DeepSpeed refuses
   several optimizer groups). One process with the doubled batch trains the same runs; the largest absolute
   difference of every tensor in the step-20 checkpoints (weights, EMA, optimizer state) is recorded, with the rows
   of teacher sampling each process did.
2. The kill points of tests/onestep/test_sharded_crash.py (SIGKILL on either rank, inside a checkpoint save at
   each phase, after an optimizer step, at random times), each relaunched until it finishes: resumed bitwise or not.

Writes {"rows": [...], "kills": [...], "protocol": {...}}; the README's tables are rendered from it
(benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "onestep")]
RESULTS = ROOT / "benchmarks" / "results" / "sharded.json"


def main(argv=None) -> None:
    import test_sharded as ts
    import test_sharded_crash as tc
    import torch
    from onestep.teachers.tiny import save_tiny_teacher
    from sharded_worker import BATCH, STEPS, sharded_cfg

    from onestep.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=len(tc.KILLS), help="how many of the kill points to run")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, kills = [], []
    with tempfile.TemporaryDirectory(prefix="onestep-sharded-") as tmp:
        tmp = Path(tmp)
        teacher = save_tiny_teacher("unet", {"name": "unet"}, tmp / "teacher")
        single = {}
        for objective in ("splitmeanflow", "fdistill"):
            t = Trainer(sharded_cfg(tmp / "single", teacher["path"], objective, 2 * BATCH, STEPS,
                                    "ddp")).fit(resume=False)
            single[objective] = (tmp / "single" / f"{objective}-ddp", getattr(t.data, "teacher_passes", None))
        for config, label, objectives in (("fsdp", "fsdp", ("splitmeanflow", "fdistill")),
                                          ("deepspeed_zero2", "deepspeed", ("splitmeanflow",))):
            start = time.perf_counter()
            ts.launch(tmp / label, Path(teacher["path"]), config, label, *objectives)
            seconds = time.perf_counter() - start
            for objective in objectives:
                run, one_rows = single[objective]
                diff = ts.max_diff(ts.checkpoint(tmp / label / f"{objective}-{label}", STEPS),
                                   ts.checkpoint(run, STEPS))
                per_rank = [ts.rank_record(tmp / label, objective, label, r) for r in (0, 1)]
                rows.append({"strategy": label, "objective": objective, "processes": 2, "steps": STEPS,
                             "batch_per_process": BATCH, "max_abs_diff_vs_one_process": diff,
                             "wrapped_by": per_rank[0]["strategy"],
                             "teacher_rows_per_process": [r["teacher_rows"] for r in per_rank],
                             "teacher_rows_one_process": one_rows, "launch_seconds": round(seconds, 1)})
                print(rows[-1], flush=True)
        out_dir = tmp / "crash"
        out_dir.mkdir()
        assert tc.segment(out_dir, "reference") == 0, "the uninterrupted sharded run failed"
        reference = tc.final_state(out_dir, "reference")
        for kill in tc.KILLS[:args.kills]:
            name = kill.replace(":", "-").replace(".", "_")
            landed, finished = tc.killed_then_resumed(out_dir, name, kill)
            kills.append({"kill": kill, "landed": landed, "finished": finished,
                          "bitwise": bool(finished and tc.identical(out_dir, name, reference))})
            print(kills[-1], flush=True)
    protocol = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "backend": "gloo, 2 CPU processes, 1 thread each", "date": time.strftime("%Y-%m-%d"),
                "command": "python benchmarks/sharded.py"}
    Path(args.out).write_text(json.dumps({"rows": rows, "kills": kills, "protocol": protocol}, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
