"""Score each stage of a finished progressive (lightning) run with its own step count.

    python benchmarks/lightning_stages.py --run runs/benchmarks/digits_lightning

Stage k of `objective.stages` trains an N_k-step student; the checkpoint at the end of the stage (EMA
weights) is scored at N_k steps under the demo's protocol (digits-FID, the teacher's 50 steps beside it).
The trainer writes and keeps a checkpoint at every stage's last step (the objective's `milestones`).
Prints a table and writes benchmarks/results/lightning_stages.json as {"rows": [{"stage", "steps",
"checkpoint_step", "digits_fid", "teacher50_digits_fid"}, ...], "protocol": {...}}.
"""
from __future__ import annotations

import argparse
import json
from itertools import accumulate
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "lightning_stages.json"


def main() -> None:
    from onestep.config import load_config
    from onestep.demo import evaluate_digits
    from onestep.runs import load_run, load_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cfg = load_config(args.run / "config.yaml", ["eval.teacher_steps=[50]"], saved_run=True)
    stages, iters = list(cfg.objective["stages"]), list(cfg.objective["stage_iters"])
    rows, protocol = [], None
    for k, (steps, end) in enumerate(zip(stages, accumulate(iters))):
        info = load_run(args.run, checkpoint=f"step-{end:06d}")
        student, teacher = load_student(info)
        cfg.eval.student_steps = [steps]
        result = evaluate_digits(teacher, student, cfg, "cpu")
        by = {(r["model"], r["steps"]): r for r in result["rows"]}
        rows.append({"stage": k, "steps": steps, "checkpoint_step": end,
                     "digits_fid": by[("student", steps)]["digits_fid"],
                     "teacher50_digits_fid": by[("teacher", 50)]["digits_fid"]})
        protocol = result["protocol"]
        print(rows[-1], flush=True)
    print("\n| stage | student steps | checkpoint | digits-FID | teacher 50-step | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['steps']} | step {r['checkpoint_step']} | {r['digits_fid']:.2f} | "
              f"{r['teacher50_digits_fid']:.2f} | {r['digits_fid'] / r['teacher50_digits_fid']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run), "rows": rows, "protocol": protocol}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
