"""Summarise the recorded runs (`noise_seeds.py --record`) by recipe and setting, over training seeds.

    python benchmarks/runs_table.py [benchmarks/results/runs.jsonl] [--goal digits_fdistill=1.2 ...]

Runs that share a recipe, a student step count, a checkpoint and every setting but the training seed form one group;
per group it prints each run's ratio student / teacher 50-step at the first noise seed (the protocol's
1234) and its mean over the noise seeds, then the mean and sd of both over the group's training seeds.
With `--goal RECIPE=X` it also counts the group's runs that meet the goal (ratio <= X) at the first
noise seed and on the noise-seed mean. A goal met by one run of a group whose other seeds miss it is
the run's luck, not the recipe's: this table is where that shows. Runs are grouped by the settings they
were trained with (recorded in full), and each group is labelled by where those differ from the recipe as it
is now: after a recipe changes, runs of the old one show the old value (e.g. reverse KL's
`objective.gan_weight=0.01`, its recipe's GAN weight until it went to 1e-1).
"""
from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path
from statistics import mean, stdev

RUNS = Path(__file__).resolve().parent / "results" / "runs.jsonl"


def group_key(record: dict) -> tuple:
    """(recipe, student steps, checkpoint, settings): every setting the run was trained with but its seed."""
    if "settings" not in record:
        raise SystemExit(f"{record['run']}: the record has no `settings` (re-record it with noise_seeds.py --record)")
    settings = json.dumps({k: v for k, v in record["settings"].items() if k != "seed"}, sort_keys=True)
    return record.get("recipe"), record["student_steps"], record["checkpoint"], settings


def label(recipe: str | None, settings: dict) -> list[str]:
    """Where a group's settings differ from its recipe as shipped now (`key=value`)."""
    from onestep.config import setting_differences

    return ["(no recipe recorded)"] if recipe is None else setting_differences(settings, _shipped(recipe))


@lru_cache(maxsize=None)   # one load per recipe, not per group
def _shipped(recipe: str) -> dict:
    """The recipe's training settings as shipped now, seed excepted."""
    from onestep.config import ConfigError, load_config, training_settings

    try:
        return {k: v for k, v in training_settings(load_config(recipe)).items() if k != "seed"}
    except ConfigError as e:
        raise SystemExit(f"recipe {recipe}: {e}") from None


def summarise(records: list[dict]) -> list[dict]:
    """One summary per group, in first-recorded order; a run recorded twice counts once (the last)."""
    latest = {(r["run"], r["checkpoint"], r["student_steps"]): r for r in records}
    groups: dict[tuple, list[dict]] = {}
    for r in latest.values():
        groups.setdefault(group_key(r), []).append(r)
    out = []
    for (recipe, steps, checkpoint, settings), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.get("training_seed") or 0)
        first = [r["digits_fid_seeds"][0] / r["teacher50_digits_fid_seeds"][0] for r in runs]
        means = [r["ratio_mean"] for r in runs]
        (first_mean, first_sd), (mean_of_means, mean_sd) = _spread(first), _spread(means)
        out.append({"recipe": recipe, "student_steps": steps, "checkpoint": checkpoint,
                    "settings": label(recipe, json.loads(settings)),
                    "training_seeds": [r.get("training_seed") for r in runs],
                    "ratio_first_seed": first, "ratio_mean": means,
                    "first_seed_mean": first_mean, "first_seed_sd": first_sd,
                    "mean_of_means": mean_of_means, "mean_sd": mean_sd})
    return out


def _spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sd over training seeds (no sd from one run)."""
    return mean(values), stdev(values) if len(values) > 1 else None


def meets(summary: dict, goal: float) -> tuple[int, int]:
    """How many runs of the group meet the goal at the first noise seed, and on the noise-seed mean."""
    return sum(x <= goal for x in summary["ratio_first_seed"]), sum(x <= goal for x in summary["ratio_mean"])


def parse_goals(items: list[str]) -> dict[str, float]:
    goals = {}
    for item in items:
        recipe, _, value = item.partition("=")
        try:   # no "=" leaves value "", which float() refuses too
            goals[recipe] = float(value)
        except ValueError:
            raise SystemExit(f"--goal wants RECIPE=RATIO (e.g. digits_fdistill=1.2), got {item!r}") from None
    return goals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path, nargs="?", default=RUNS)
    ap.add_argument("--goal", nargs="*", default=[], help="RECIPE=RATIO: count the runs that meet it")
    args = ap.parse_args()
    goals = parse_goals(args.goal)
    if not args.file.is_file():
        ap.error(f"no such file: {args.file} (written by benchmarks/noise_seeds.py --record)")
    records = [json.loads(line) for line in args.file.read_text().splitlines() if line.strip()]

    def sd(x):
        return "" if x is None else f" ± {x:.2f}"
    print("| recipe | settings | steps | training seeds | ratio at first noise seed | over training seeds "
          "| noise-seed mean | over training seeds | meet goal (first seed / mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summarise(records):
        goal = goals.get(s["recipe"])
        met = "" if goal is None else "{} / {} of {} (<= {})".format(*meets(s, goal), len(s["ratio_mean"]), goal)
        print(f"| {s['recipe']} | {' '.join(s['settings']) or '(recipe)'} | {s['student_steps']} "
              f"| {', '.join(map(str, s['training_seeds']))} | {' / '.join(f'{x:.2f}' for x in s['ratio_first_seed'])} "
              f"| {s['first_seed_mean']:.2f}{sd(s['first_seed_sd'])} "
              f"| {' / '.join(f'{x:.2f}' for x in s['ratio_mean'])} "
              f"| {s['mean_of_means']:.2f}{sd(s['mean_sd'])} | {met} |")


if __name__ == "__main__":
    main()
