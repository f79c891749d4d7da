"""Score a finished digits run on several noise seeds: how much of a digits-FID gap is the protocol's noise.

    python benchmarks/noise_seeds.py runs/demo [--seeds 5] [--steps 1 2] [--checkpoint step-000500]
    python benchmarks/noise_seeds.py runs/demo --seeds 3 --first-seed 2000   # tuning seeds

Loads the run's last checkpoint (or `--checkpoint`; EMA student), scores the teacher at 50 Euler steps
and the student at each of `--steps` under the demo's protocol on the noise seeds eval.seed,
eval.seed + 1, ... (or from `--first-seed`) and prints per seed scores and the paired ratio student /
teacher's mean and sd (onestep.demo.seed_spread). Any run works, recipe or not
(benchmarks/objectives.py --noise-seeds does the same for its recipe rows). Choices between runs or
settings are better made on seeds other than the reported 1234-1238 (the README's sampler-grid and
tangent warm-up comparisons used 2000-2002), so that the reported scores are not also the tuned ones.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def main() -> None:
    from onestep.demo import evaluate_digits_seeds, scores_by_seed, seed_spread
    from onestep.export import ExportError, load_run, load_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, nargs="+", default=[1])
    ap.add_argument("--checkpoint", help="checkpoint folder name, e.g. step-000500 (default: the last)")
    ap.add_argument("--first-seed", type=int, help="first noise seed (default: the run's eval.seed, 1234)")
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error(f"--seeds must be >= 2 (a spread needs two), got {args.seeds}")
    try:
        info = load_run(args.run, checkpoint=args.checkpoint)
        student, teacher = load_student(info)
    except ExportError as e:  # no run, no such checkpoint, unreadable weights: one line, not a traceback
        ap.error(str(e))
    first = info.cfg.eval.seed if args.first_seed is None else args.first_seed
    cfg = replace(info.cfg, eval=replace(info.cfg.eval, seed=first, teacher_steps=[50], student_steps=args.steps))
    results = evaluate_digits_seeds(teacher, student, cfg, "cpu", args.seeds)
    seeds, by = scores_by_seed(results)
    teacher50 = [b[("teacher", 50)] for b in by]
    for k in args.steps:
        spread = seed_spread(seeds, [b[("student", k)] for b in by], teacher50)
        print(json.dumps({"run": str(args.run), "checkpoint": info.checkpoint.name, "student_steps": k, **spread}))


if __name__ == "__main__":
    main()
