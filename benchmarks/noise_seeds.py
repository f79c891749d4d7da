"""Score a finished digits run on several noise seeds: how much of a digits-FID gap is the protocol's noise.

    python benchmarks/noise_seeds.py runs/demo [--seeds 5] [--steps 1 2] [--checkpoint step-000500 step-001000]
    python benchmarks/noise_seeds.py runs/demo --seeds 3 --first-seed 2000   # tuning seeds

Loads the run's last checkpoint (or each `--checkpoint`; EMA student), scores the teacher at 50 Euler
steps once and each checkpoint's student at each of `--steps` under the demo's protocol on the noise
seeds eval.seed, eval.seed + 1, ... (or from `--first-seed`) and prints, per checkpoint and step count,
the per seed scores and the paired ratio student / teacher's mean and sd (onestep.demo.seed_spread).
Any run works, recipe or not
(benchmarks/objectives.py --noise-seeds does the same for its recipe rows); a run trained from data without
a teacher (`digits_smt`) is compared with the shipped digits teacher. Choices between runs or
settings are better made on seeds other than the reported 1234-1238 (the README's sampler-grid and
tangent warm-up comparisons used 2000-2002), so that the reported scores are not also the tuned ones.

`--record FILE` appends each result, with the run's training seed, its train time at the checkpoint, every
setting it was trained with and (with `--recipe NAME`) those where it differs from that shipped recipe, to a
JSON-lines file; the README's training-seed and one-setting-changed runs are kept in
`benchmarks/results/runs.jsonl` this way, since the runs themselves are not.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def main() -> None:
    from onestep.config import ConfigError, load_config, setting_differences, training_settings
    from onestep.demo import evaluate_digits_seeds, reference_teacher, scores_by_seed, seed_spread
    from onestep.export import ExportError
    from onestep.runs import load_run, load_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, nargs="+", default=[1])
    ap.add_argument("--checkpoint", nargs="+", default=[None],
                    help="checkpoint folder names, e.g. step-000500 step-001000 (default: the last)")
    ap.add_argument("--first-seed", type=int, help="first noise seed (default: the run's eval.seed, 1234)")
    ap.add_argument("--record", type=Path, help="append each result as one JSON line to this file")
    ap.add_argument("--recipe", help="shipped config the run was trained from; --record then lists the differences")
    args = ap.parse_args()
    if args.seeds < 2:
        ap.error(f"--seeds must be >= 2 (a spread needs two), got {args.seeds}")
    try:  # every checkpoint is checked before anything is scored
        loaded = [(info, *load_student(info)) for info in (load_run(args.run, checkpoint=c) for c in args.checkpoint)]
    except ExportError as e:  # no run, no such checkpoint, unreadable weights: one line, not a traceback
        ap.error(str(e))
    if args.recipe:
        try:
            recipe = training_settings(load_config(args.recipe))
        except ConfigError as e:
            ap.error(f"--recipe: {e}")
    teacher50 = None
    for i, (info, student, teacher) in enumerate(loaded):
        teacher = reference_teacher(teacher)   # a run from data (smt): the shipped digits teacher
        first = info.cfg.eval.seed if args.first_seed is None else args.first_seed
        # the teacher (the same for every checkpoint of the run) is scored with the first checkpoint only
        cfg = replace(info.cfg, eval=replace(info.cfg.eval, seed=first, teacher_steps=[50] if i == 0 else [],
                                             student_steps=args.steps))
        seeds, by = scores_by_seed(evaluate_digits_seeds(teacher, student, cfg, "cpu", args.seeds))
        if teacher50 is None:
            teacher50 = [b[("teacher", 50)] for b in by]
        for k in args.steps:
            spread = seed_spread(seeds, [b[("student", k)] for b in by], teacher50)
            record = {"run": str(args.run), "checkpoint": info.checkpoint.name, "student_steps": k, **spread}
            print(json.dumps(record), flush=True)
            if args.record:
                settings = training_settings(info.cfg)
                record |= {"recipe": args.recipe, "training_seed": info.cfg.seed,
                           "differs_from_recipe": setting_differences(settings, recipe) if args.recipe else None,
                           "train_time_s": train_time(args.run, info.step), "settings": settings}
                with args.record.open("a") as f:
                    f.write(json.dumps(record) + "\n")


def train_time(run: Path, step: int) -> float | None:
    """Seconds of training logged up to `step` (metrics.jsonl's time_s; None without a log)."""
    log = run / "metrics.jsonl"
    if not log.is_file():
        return None
    records = map(json.loads, log.read_text().splitlines())
    times = [r["time_s"] for r in records if "time_s" in r and r.get("step", 0) <= step]
    return times[-1] if times else None


if __name__ == "__main__":
    main()
