"""The digits teacher's Euler sampler at several step counts: the floor a distilled student starts from.

    python benchmarks/teacher_steps.py [--config digits_lightning] [--steps 8 16 32 50 64] [--seeds 5]

A student distilled from the teacher's N-step jumps (Lightning's `teacher_steps`) can at best match the
teacher's N-step sampler, so a goal stated against the teacher's 50 steps is out of reach when the
N-step sampler alone misses it. Scores the config's teacher under the demo's protocol on the noise seeds
eval.seed, eval.seed + 1, ... at each step count, prints each one's per-seed digits-FID and its paired
ratio to the 50-step score (mean ± sd), and writes benchmarks/results/teacher_steps.json as
{"config", "rows": [{"steps", "digits_fid_seeds", "ratio_mean", "ratio_sd"}, ...], "noise_seeds", "protocol"}.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "teacher_steps.json"


def main() -> None:
    from onestep.build import build_teacher
    from onestep.config import ConfigError, find_config, load_config
    from onestep.demo import evaluate_digits_seeds, scores_by_seed, seed_spread

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="digits_lightning", help="a digits recipe: its teacher and eval protocol")
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 50, 64])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.seeds < 2 or min(args.steps) < 1:
        ap.error(f"--seeds must be >= 2 and every --steps >= 1, got {args.seeds} and {args.steps}")
    try:
        cfg = load_config(find_config(args.config))
    except ConfigError as e:
        ap.error(str(e))
    if cfg.data.name != "digits" or not cfg.has_teacher:
        ap.error(f"{args.config} is not a digits distillation recipe "
                 f"(data {cfg.data.name}, teacher {cfg.teacher['name']})")
    steps = sorted(set(args.steps) | {50})   # the ratios are to the 50-step score
    cfg = replace(cfg, eval=replace(cfg.eval, teacher_steps=steps, student_steps=[]))
    results = evaluate_digits_seeds(build_teacher(cfg), None, cfg, "cpu", args.seeds)
    seeds, by = scores_by_seed(results)
    fifty = [b[("teacher", 50)] for b in by]
    rows = []
    for k in steps:
        spread = seed_spread(seeds, [b[("teacher", k)] for b in by], fifty)
        rows.append({"steps": k, "digits_fid_seeds": spread["digits_fid_seeds"],
                     "ratio_mean": spread["ratio_mean"], "ratio_sd": spread["ratio_sd"]})
    print(f"\nteacher of {args.config} ({cfg.eval.solver}), noise seeds {seeds[0]}-{seeds[-1]}")
    print("| Euler steps | digits-FID per seed | × the 50-step (paired) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {' / '.join(f'{v:.2f}' for v in r['digits_fid_seeds'])} | "
              f"{r['ratio_mean']:.2f} ± {r['ratio_sd']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "noise_seeds": seeds, "rows": rows,
                                    "protocol": results[0]["protocol"]}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
