"""Train every registered distillation objective on the digits teacher under one protocol.

    python benchmarks/objectives.py [--only splitmeanflow] [--steps N]
    python benchmarks/objectives.py --only meanflow --from-run runs/X   # score a finished recipe run
    python benchmarks/objectives.py --only meanflow --from-run runs/X --noise-seeds 5   # + the metric's spread

Each objective `X` is trained with its recipe `configs/digits_X.yaml`, and with every variant recipe
`configs/digits_X_<variant>.yaml` whose objective is X (e.g. `digits_fdistill_reverse_kl`); `--only`
takes objective or recipe names. Its EMA student is scored with the demo's protocol (N held-out-sized
sample sets from fixed noise, digits-FID against the training split) at the recipe's
`eval.student_steps` (1 unless it lists more), next to the teacher's 50-step Euler score. `smt`, trained
from data without a teacher, has a row too (FROM_DATA), scored next to the shipped digits teacher. Prints a
table and writes benchmarks/results/objectives.json as {"rows": [{"objective", "recipe", "steps",
"digits_fid", "teacher50_digits_fid", "train_seconds", "student_sampler", "torch_threads"}, ...],
"protocol": {...}}: what every row shares is in "protocol", what a scoring run decides (the recipe's
sampler, the threads it scored on) is in its row, so rows scored at different times stay described.

With 540 samples the digits-FID of one model moves by about 0.3 between noise seeds, as much as some
of the gaps the goals ask about. `--noise-seeds K` scores student and teacher again on K noise seeds
(eval.seed, eval.seed + 1, ...) and adds each seed's scores and the mean and sd of the paired ratio
student / teacher 50-step; `digits_fid` stays the protocol's first seed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "objectives.json"
#: objectives trained from data (no teacher) that the benchmark also trains, next to the distillation ones
FROM_DATA = ("smt",)
#: keys of the demo's protocol record that belong to one scoring, not to the table: kept per row
PER_ROW = ("student_sampler", "torch_threads")


def main() -> None:
    from onestep.config import find_config, load_config
    from onestep.demo import evaluate_digits_seeds, reference_teacher, scores_by_seed, seed_spread
    from onestep.registry import OBJECTIVES, load_builtin
    from onestep.trainer import Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*",
                    help="objective or recipe names (default: every distillation objective, and smt)")
    ap.add_argument("--steps", type=int, help="override train.steps (quick checks; not for the committed table)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--output-dir", default="runs/benchmarks")
    ap.add_argument("--noise-seeds", type=int, default=1, help="score on this many noise seeds (default 1: "
                    "the protocol's own) and report the paired student / teacher ratio's mean and sd")
    ap.add_argument("--from-run", type=Path, help="score this finished run of the (single, --only) objective's "
                    "recipe instead of training; its config must equal the recipe's")
    args = ap.parse_args()
    if args.noise_seeds < 1:
        ap.error(f"--noise-seeds must be >= 1, got {args.noise_seeds}")
    load_builtin()
    recipes = [(name, recipe) for name in OBJECTIVES.names() if OBJECTIVES.get(name).distillation or name in FROM_DATA
               for recipe in recipes_of(name)]
    recipes = [(n, r) for n, r in recipes if not args.only or n in args.only or r in args.only]
    if args.from_run and len(recipes) != 1:
        ap.error(f"--from-run needs --only naming exactly one recipe, got {[r for _, r in recipes]}")
    rows, protocol = [], None
    for name, recipe in recipes:
        overrides = [f"output_dir={args.output_dir}", "train.progress=false", "eval.teacher_steps=[50]"]
        if args.steps:
            overrides.append(f"train.steps={args.steps}")
        cfg = load_config(find_config(recipe), overrides)
        if args.from_run:
            teacher, student, train_steps, train_seconds = finished_run(args.from_run, cfg)
            device = "cpu"
        else:
            trainer = Trainer(cfg)
            start = time.perf_counter()
            trainer.fit(resume=False)
            train_seconds = time.perf_counter() - start
            teacher, student, train_steps, device = (trainer.teacher, trainer.ema_student(), trainer.step,
                                                     trainer.accelerator.device)
        teacher = reference_teacher(teacher).to(device)   # smt: the shipped digits teacher
        results = evaluate_digits_seeds(teacher, student, cfg, device, args.noise_seeds)
        seeds, by = scores_by_seed(results)
        # one row per student step count of the recipe's eval.student_steps (1 unless it says more)
        for k in cfg.eval.student_steps:
            rows.append({"objective": name, "recipe": recipe, "teacher": teacher_label(cfg), "steps": k,
                         "digits_fid": by[0][("student", k)],
                         "teacher50_digits_fid": by[0][("teacher", 50)],
                         "train_steps": train_steps, "train_seconds": round(train_seconds, 1)}
                        | {key: results[0]["protocol"][key] for key in PER_ROW})
            if len(seeds) > 1:
                rows[-1].update(seed_spread(seeds, [b[("student", k)] for b in by], [b[("teacher", 50)] for b in by]))
            if args.from_run:
                rows[-1]["note"] = (f"scored from {args.from_run.name} "
                                    "(trained with the recipe, 1 thread, shared machine)")
            print(f"{recipe}: {rows[-1]}", flush=True)
        protocol = {k: v for k, v in results[0]["protocol"].items() if k not in PER_ROW}

    print("\n| recipe | teacher | student steps | digits-FID | teacher 50-step | ratio | ratio over seeds "
          "| train steps | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = f"{r['ratio_mean']:.2f} ± {r['ratio_sd']:.2f} ({len(r['noise_seeds'])})" if "ratio_mean" in r else "-"
        print(f"| {r['recipe']} | {r.get('teacher', '-')} | {r['steps']} | {r['digits_fid']:.2f} | "
              f"{r['teacher50_digits_fid']:.2f} | {r['digits_fid'] / r['teacher50_digits_fid']:.2f} | {spread} | "
              f"{r['train_steps']} | {r['train_seconds']:.0f} |")
    # rows of recipes not run this time (--only) are kept from the previous results
    if args.out.is_file():
        ran = {r["recipe"] for r in rows}
        kept = [r for r in json.loads(args.out.read_text())["rows"] if r["recipe"] not in ran]
        rows = sorted(kept + rows, key=lambda r: (r["objective"], r["recipe"], r["steps"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "protocol": protocol}, indent=2) + "\n")
    print(f"wrote {args.out}")


def teacher_label(cfg) -> str:
    """The teacher a row distilled, e.g. "digits" or "digits (shipped=dense)": the ratio is to its own 50-step."""
    if not cfg.has_teacher:
        return "none (trained from data; ratio to the shipped digits teacher)"
    options = {k: v for k, v in dict(cfg.teacher).items() if k != "name" and v is not None}
    return cfg.teacher["name"] + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")


def recipes_of(objective: str) -> list[str]:
    """`digits_<objective>` and its variants `digits_<objective>_*` whose objective is `objective`
    (so `digits_scm_ladd` is scm_ladd's recipe, not a variant of scm)."""
    from importlib import resources

    from onestep.config import find_config, load_config

    shipped = sorted(f.name[:-5] for f in resources.files("onestep.configs").iterdir() if f.name.endswith(".yaml"))
    variants = [n for n in shipped if n.startswith(f"digits_{objective}_")
                and load_config(find_config(n)).objective["name"] == objective]
    return [f"digits_{objective}"] + variants


def finished_run(run_dir: Path, recipe):
    """(teacher, EMA student, steps, train seconds) of a finished run whose training config is the recipe's."""
    from onestep.config import load_config, setting_differences, training_settings
    from onestep.runs import load_run, load_student

    # what shapes training must match (onestep.config.training_settings); where it ran, what it logged or
    # saved along the way need not
    diff = setting_differences(training_settings(load_config(run_dir / "config.yaml", saved_run=True)),
                               training_settings(recipe))
    if diff:
        raise SystemExit(f"{run_dir} was not trained with the recipe: {' '.join(diff)} (the run's values)")
    info = load_run(run_dir)
    student, teacher = load_student(info)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return teacher, student, info.step, train_seconds(records)


def train_seconds(records: list[dict]) -> float:
    """Wall time to the last step from metrics.jsonl records, across resumes. Each resumed segment
    restarts its clock; the steps a killed segment ran past its last checkpoint are re-run by the
    next, so a segment counts only up to the step where the next one picks up. A heuristic on logged
    records: the time between a segment's last log and its checkpoint is not counted."""
    segments, current = [], []
    for rec in records:
        if current and (rec["step"] <= current[-1]["step"] or rec["time_s"] < current[-1]["time_s"]):
            segments.append(current)
            current = []
        current.append(rec)
    segments.append(current)
    total = 0.0
    for seg, nxt in zip(segments, segments[1:] + [None]):
        upto = [r for r in seg if nxt is None or r["step"] < nxt[0]["step"]]
        total += upto[-1]["time_s"] if upto else 0.0
    return total


if __name__ == "__main__":
    main()
