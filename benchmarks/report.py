"""Render the results tables of README.md and docs/**/*.md from benchmarks/results/, never typed by hand.

    python benchmarks/report.py            # rewrite every table between its markers in README.md and docs/
    python benchmarks/report.py --check    # exit 1 naming each table that differs from its rendering

A table lives between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; RENDERERS[NAME] renders it from the JSON
files in benchmarks/results/ (and runs.jsonl). The same table may appear in several files.
tests/benchmarks/test_report.py fails when a committed table differs from its rendering.

Every ratio student / teacher is shown at the protocol's noise seed (1234) and as mean ± sd over the paired noise
seeds (and over training seeds where runs.jsonl holds several runs of the recipe as it is now); goals are judged on
the noise-seed mean.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
GIB = 1024 ** 3


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _header(*columns: str) -> list[str]:
    """A markdown table's header row and its separator."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def smoke_table() -> str:
    data = _load("smoke.json")
    lines = _header("recipe", "stages passed", "exported", "wall time")
    for r in data["rows"]:
        stages = f"{r['stages_passed']}/{r['stages']}" + ("" if r["passed"] else " (**failed**: " +
                                                            "; ".join(f.split(':')[0] for f in r["failed"]) + ")")
        lines.append(f"| {r['recipe']} | {stages} | {', '.join(r['exported']) or 'none (no stock pipeline)'} | "
                     f"{r['seconds']:.0f} s |")
    p = data["protocol"]
    passed = sum(r["passed"] for r in data["rows"])
    lines.append(f"\n{passed} of {len(data['rows'])} recipes pass every stage ({p['date']}, {p['cpus']}-core CPU, "
                 f"{p['threads']} threads, `{p['command']}`).")
    return "\n".join(lines)


def sharded_table() -> str:
    data = _load("sharded.json")
    lines = _header("strategy (2 processes)", "objective", "wrapped by", "largest difference vs 1 process, 20 steps",
                    "teacher rows sampled per process (1 process)")
    for r in data["rows"]:
        rows = r["teacher_rows_per_process"]
        work = "– (data from digits)" if rows[0] is None else f"{rows[0]}, {rows[1]} ({r['teacher_rows_one_process']})"
        lines.append(f"| {r['strategy']} | {r['objective']} | {r['wrapped_by']} | "
                     f"{r['max_abs_diff_vs_one_process']:.1e} "
                     f"| {work} |")
    kills = data["kills"]
    landed = [k for k in kills if k["landed"]]
    missed = [k["kill"] for k in kills if not k["landed"]]
    lines.append(f"\nSIGKILL during a 2-process FSDP run ({', '.join(k['kill'] for k in landed)}; PHASE:STEP:RANK): "
                 f"{sum(k['bitwise'] for k in landed)} of {len(landed)} resumed to bitwise-identical weights, EMA and "
                 f"optimizer state" + (f" ({', '.join(missed)}: the run ended before the kill)" if missed else "") +
                 f" ({data['protocol']['date']}, `{data['protocol']['command']}`).")
    return "\n".join(lines)


def full_size_table() -> str:
    data = _load("full_size.json")
    lines = _header("family (recipe)", "measured peak (resident)", "tensors alive at the peak", "`--dry-run` estimate",
                    "estimate error vs resident / vs tensors", "s/step (2-core CPU)")
    for r in data["rows"]:
        if "failed" in r:
            lines.append(f"| {r['family']} ({r['recipe']}) | not measured: {r['failed']} | | | | |")
            continue
        est, rss, tensors = r["estimated_peak_bytes"], r["measured_peak_bytes"], r.get("measured_tensor_peak_bytes")
        extra = "".join(f", `{o}`" for o in r["overrides"]   # beyond batch 1, teacher_steps 1, no accumulation
                        if not o.startswith(("data.batch_size=", "data.teacher_steps=", "train.grad_accum=")))
        lines.append(f"| {r['family']} ({r['recipe']}, {r['resolution']} px{extra}) | {rss / GIB:.2f} GiB | "
                     + (f"{tensors / GIB:.2f} GiB" if tensors else "–") + f" | {est / GIB:.2f} GiB | "
                     f"{(est - rss) / rss:+.0%} / " + (f"{(est - tensors) / tensors:+.0%}" if tensors else "–")
                     + f" | {r['seconds_per_step']:.0f} ({r['steps']} step{'s' if r['steps'] > 1 else ''}) |")
    transient = max((r.get("max_fp32_transient_bytes", 0) for r in data["rows"] if "failed" not in r), default=0)
    runs = "; ".join(dict.fromkeys(f"{r['date']}, `{r['command']}`" for r in data["rows"]))
    lines.append(f"\n{runs}; batch 1, the recipe's LoRA, gradient checkpointing and bf16 "
                 f"(this CPU has no bf16 matrix units: bf16 matmuls, convolutions and attention are computed in fp32 "
                 f"and rounded back, their fp32 copies at most {transient / 1024 ** 2:.0f} MiB at a time). Resident: "
                 f"the process's peak RSS above the bare runtime; tensors: the bytes of parameters, buffers and EMA "
                 f"plus the largest sum of tensors the steps held at once, without the CPU allocator's overhead.")
    return "\n".join(lines)


def splitmeanflow_stability_table() -> str:
    import statistics

    data = _load("splitmeanflow_stability.json")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in data["rows"]:
        groups.setdefault((r["setting"], r["arch"]), []).append(r)

    def spread(rows, key):
        v = [r[key] for r in rows]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    lines = _header("setting", "student", "seeds", "diverged", "energy distance, 1 step", "2 steps")
    for (setting, arch), rows in sorted(groups.items()):
        lines.append(f"| {setting} | {arch} | {len(rows)} | {sum(r['diverged'] for r in rows)} | "
                     f"{spread(rows, 'energy_distance_1step')} | {spread(rows, 'energy_distance_2step')} |")
    p = data["protocol"]
    lines.append(f"\nmean ± sd over seeds; two independent sets of mixture samples lie "
                 f"{p['floor_energy_distance']:.3f} "
                 f"apart; {p['threads']} thread, torch {p['torch']} (`python benchmarks/splitmeanflow_stability.py`).")
    return "\n".join(lines)


# --- digits results: objectives.json, runs.jsonl, teacher_steps.json ---------------------------------------------

#: each recipe's goal for the ratio student / teacher 50-step digits-FID, by student step count (a target, not a
#: result); judged on the mean over noise seeds
GOALS = {("digits_splitmeanflow", 1): 1.5, ("digits_meanflow", 1): 1.5, ("digits_lightning", 1): 1.3,
         ("digits_lightning_4step", 4): 1.1, ("digits_scm", 1): 1.3, ("digits_scm", 4): 1.1,
         ("digits_scm_ladd", 1): 1.3, ("digits_scm_ladd", 4): 1.1, ("digits_fdistill", 1): 1.2,
         ("digits_fdistill_reverse_kl", 1): 1.2, ("digits_smd", 1): 1.2}


def _runs() -> list[dict]:
    path = RESULTS / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


_SUMMARIES: list[dict] | None = None


def _run_groups() -> list[dict]:
    """runs.jsonl grouped over training seeds (benchmarks/runs_table.py), computed once."""
    global _SUMMARIES
    if _SUMMARIES is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        try:
            from runs_table import summarise
        finally:
            sys.path.pop(0)
        _SUMMARIES = summarise(_runs())
    return _SUMMARIES


def _pm(mean: float, sd: float | None, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def _training_seeds(recipe: str, steps: int) -> str:
    """The recipe as shipped now over its recorded training seeds: ratio at seed 1234 / noise-seed mean."""
    for g in _run_groups():
        if g["recipe"] == recipe and g["student_steps"] == steps and not g["settings"] and len(g["ratio_mean"]) > 1:
            return (f"{_pm(g['first_seed_mean'], g['first_seed_sd'])} / {_pm(g['mean_of_means'], g['mean_sd'])} "
                    f"({len(g['ratio_mean'])} runs)")
    return "–"


def _goal(row: dict) -> str:
    goal = GOALS.get((row["recipe"], row["steps"]))
    if goal is None:
        return "–"
    if "ratio_mean" in row:
        return f"≤ {goal}: " + ("met" if row["ratio_mean"] <= goal else "**missed**") + " on the mean"
    ratio = row["digits_fid"] / row["teacher50_digits_fid"]
    return f"≤ {goal}: " + ("met" if ratio <= goal else "**missed**") + " at seed 1234 (one seed only)"


def _objective_rows(objective: str | None = None) -> list[dict]:
    rows = _load("objectives.json")["rows"]
    return [r for r in rows if objective is None or r["objective"] == objective]


def _objective_lines(rows: list[dict], with_method: bool) -> list[str]:
    lines = _header(*(["method"] if with_method else []), "recipe", "teacher", "steps", "digits-FID (seed 1234)",
                    "teacher 50-step", "× teacher, seed 1234", "× teacher, noise seeds (mean ± sd)",
                    "× teacher over training seeds: seed 1234 / noise-seed mean", "goal", "train steps", "train time")
    for r in rows:
        seeds = (f"{_pm(r['ratio_mean'], r['ratio_sd'])} ({len(r['noise_seeds'])} seeds)" if "ratio_mean" in r
                 else "– (not scored on several seeds)")
        lines.append("| " + (f"{r['objective']} | " if with_method else "")
                     + f"`{r['recipe']}` | {r.get('teacher', 'digits')} | {r['steps']} | {r['digits_fid']:.2f} | "
                     f"{r['teacher50_digits_fid']:.2f} | {r['digits_fid'] / r['teacher50_digits_fid']:.2f} | {seeds} | "
                     f"{_training_seeds(r['recipe'], r['steps'])} | {_goal(r)} | {r['train_steps']} | "
                     f"{r['train_seconds'] / 60:.0f} min |")
    return lines


def _objective_footer() -> str:
    p = _load("objectives.json")["protocol"]
    return (f"\ndigits-FID: {p['num_samples']} images from fixed noise against the {p['reference_size']}-image "
            f"{p['reference']} split, {p['feature_net']} features, the student's {p['student_weights']} weights, "
            f"teacher {p['teacher_solver']} 50 steps; ratios are paired (student and teacher on the same noise seed); "
            f"training seeds: the runs of the recipe as shipped now in `runs.jsonl` "
            f"(`python benchmarks/objectives.py`, `benchmarks/noise_seeds.py --record`; torch {p['torch']}, CPU).")


def objectives_table() -> str:
    return "\n".join(_objective_lines(_objective_rows(), with_method=True)) + "\n" + _objective_footer()


def teacher_steps_table() -> str:
    data = _load("teacher_steps.json")
    seeds = data["noise_seeds"]
    lines = _header("teacher Euler steps", f"digits-FID (seed {seeds[0]})",
                    f"digits-FID per noise seed ({', '.join(map(str, seeds))})", "× 50 steps (mean ± sd)")
    for r in data["rows"]:
        lines.append(f"| {r['steps']} | {r['digits_fid_seeds'][0]:.2f} | "
                     f"{' / '.join(f'{x:.2f}' for x in r['digits_fid_seeds'])} | "
                     f"{_pm(r['ratio_mean'], r['ratio_sd'])} |")
    lines.append(f"\nThe shipped digits teacher (`{data['config']}`), ratios paired per noise seed "
                 f"(`python benchmarks/teacher_steps.py`).")
    return "\n".join(lines)


def _expected(objective: str):
    def render() -> str:
        rows = _objective_rows(objective)
        if not rows:
            raise KeyError(f"benchmarks/results/objectives.json has no row for {objective!r}")
        return "\n".join(_objective_lines(rows, with_method=False)) + "\n" + _objective_footer()
    render.__name__ = f"expected_{objective}"
    return render


def runs_table() -> str:
    lines = _header("recipe", "differs from the recipe", "steps", "training seeds", "× teacher, seed 1234",
                    "over training seeds", "× teacher, noise-seed mean", "over training seeds")
    for g in _run_groups():
        lines.append(f"| `{g['recipe']}` | {' '.join(f'`{x}`' for x in g['settings']) or '(the recipe)'} | "
                     f"{g['student_steps']} | {', '.join(map(str, g['training_seeds']))} | "
                     f"{' / '.join(f'{x:.2f}' for x in g['ratio_first_seed'])} | "
                     f"{_pm(g['first_seed_mean'], g['first_seed_sd'])} | "
                     f"{' / '.join(f'{x:.2f}' for x in g['ratio_mean'])} | {_pm(g['mean_of_means'], g['mean_sd'])} |")
    lines.append(f"\n{len(_runs())} records of `benchmarks/results/runs.jsonl` (`benchmarks/noise_seeds.py --record`), "
                 f"grouped by every training setting but the seed and labelled by their differences from the recipe "
                 f"as shipped now (`python benchmarks/runs_table.py`).")
    return "\n".join(lines)


def lightning_stages_table() -> str:
    data = _load("lightning_stages.json")
    lines = _header("stage", "student steps", "checkpoint", "digits-FID (seed 1234)", "× teacher 50-step")
    for r in data["rows"]:
        lines.append(f"| {r['stage']} | {r['steps']} | step {r['checkpoint_step']} | {r['digits_fid']:.2f} | "
                     f"{r['digits_fid'] / r['teacher50_digits_fid']:.2f} |")
    lines.append(f"\nOne run of `digits_lightning` scored at the end of each stage (noise seed "
                 f"{data['protocol']['noise_seed']} only; `python benchmarks/lightning_stages.py`).")
    return "\n".join(lines)


#: the README's methods table: what each objective is (not results); the expected result is rendered from the JSON
METHODS = [
    ("flow_matching", "Flow matching (teachers)", "Lipman et al. 2023", "https://arxiv.org/abs/2210.02747",
     ["digits_teacher", "digits_teacher_dense"]),
    ("splitmeanflow", "SplitMeanFlow", "Guo et al. 2025", "https://arxiv.org/abs/2507.16884",
     ["demo", "digits_splitmeanflow", "sd15_splitmeanflow", "sd3_splitmeanflow", "flux_splitmeanflow",
      "sana_splitmeanflow", "cifar10_splitmeanflow"]),
    ("meanflow", "MeanFlow", "Geng et al. 2025", "https://arxiv.org/abs/2505.13447", ["digits_meanflow"]),
    ("fdistill", "f-distill (reverse KL = DMD)", "Xu, Nie, Vahdat 2025", "https://arxiv.org/abs/2502.15681",
     ["digits_fdistill", "digits_fdistill_reverse_kl", "sd15_fdistill", "sdxl_fdistill"]),
    ("smt", "SMT", "Jayashankar, Ryu, Wornell 2025", "https://arxiv.org/abs/2502.09609", ["digits_smt"]),
    ("smd", "SMD", "Jayashankar, Ryu, Wornell 2025", "https://arxiv.org/abs/2502.09609",
     ["digits_smd", "imagenet64_smd"]),
    ("scm", "sCM", "Lu & Song 2024", "https://arxiv.org/abs/2410.11081", ["digits_scm"]),
    ("scm_ladd", "sCM + LADD (SANA-Sprint)", "Chen et al. 2025", "https://arxiv.org/abs/2503.09641",
     ["digits_scm_ladd"]),
    ("lightning", "SDXL-Lightning", "Lin, Wang, Yang 2024", "https://arxiv.org/abs/2402.13929",
     ["digits_lightning", "digits_lightning_4step"]),
    ("ladd", "LADD", "Sauer et al. 2024", "https://arxiv.org/abs/2403.12015", ["digits_ladd"]),
    ("rcm", "rCM (sCM + DMD)", "Zheng et al. 2025", "https://arxiv.org/abs/2510.08431", ["digits_rcm"]),
]
OBJECTIVE_FILES = {"scm_ladd": "objectives/ladd.py", "smd": "objectives/smt.py"}


def _expected_cell(objective: str) -> str:
    """The digits result of an objective's recipes: the noise-seed mean ± sd, then the protocol seed."""
    if objective == "flow_matching":
        row = next(r for r in _load("teacher_steps.json")["rows"] if r["steps"] == 50)
        return f"the digits teacher: 50-step digits-FID {row['digits_fid_seeds'][0]:.2f} at seed 1234"
    cells = []
    for r in _objective_rows(objective):
        if r["recipe"] != "digits_lightning_4step" and r["steps"] != min(
                x["steps"] for x in _objective_rows(objective) if x["recipe"] == r["recipe"]):
            continue
        at_protocol = r["digits_fid"] / r["teacher50_digits_fid"]
        spread = (f"{_pm(r['ratio_mean'], r['ratio_sd'])}× ({at_protocol:.2f}× at seed 1234)" if "ratio_mean" in r
                  else f"{at_protocol:.2f}× (seed 1234 only)")
        cells.append(f"{r['steps']}-step {spread}"
                     + (f", `{r['recipe']}`" if len({x['recipe'] for x in _objective_rows(objective)}) > 1 else ""))
    return "; ".join(cells) or "not measured yet: no training run in benchmarks/results/objectives.json"


def methods_table() -> str:
    lines = _header("method", "file", "paper", "recipes", "docs", "expected result on digits (× teacher 50-step)")
    for name, title, paper, url, recipes in METHODS:
        file = OBJECTIVE_FILES.get(name, f"objectives/{name}.py")
        lines.append(f"| `{name}`: {title} | [`{file}`]({file}) | [{paper}]({url}) | "
                     f"{', '.join(f'`{x}`' for x in recipes)} | [page](docs/methods/{name}.md) | "
                     f"{_expected_cell(name)} |")
    lines.append("\nRatios: student / teacher 50-step digits-FID, paired per noise seed, mean ± sd over 5 noise seeds "
                 "(seed 1234 is the protocol's); full table with training seeds and goals in "
                 "[docs/index.md](docs/index.md).")
    return "\n".join(lines)


# --- other benchmarks --------------------------------------------------------------------------------------------

def attention_table() -> str:
    data = _load("attention.json")
    lines = _header("sequence length", "max abs error vs float64", "JVP peak memory, fused / math",
                    "JVP time, fused / math")
    for r in data["rows"]:
        lines.append(f"| {r['seq_len']} | {r['max_abs_err']:.1e} | {r['jvp_peak_mem_ratio']:.3g} | "
                     f"{r['jvp_time_ratio']:.2f} |")
    p = data["protocol"]
    shape = p["shape"]
    lines.append(f"\n`torch.func.jvp` through attention, batch {shape['batch']}, {shape['heads']} heads, head dim "
                 f"{shape['head_dim']}, {shape['dtype']}, {p['threads']} thread on the {p['device']}, peak resident "
                 f"memory in a fresh process per case, torch {p['torch']} (`python benchmarks/attention.py`).")
    return "\n".join(lines)


def time_smoothing_table() -> str:
    data = _load("time_smoothing.json")
    lines = _header("σ", "teacher 50-step digits-FID", "velocity change", "exact d/dt vs ±1e-3 difference", "vs ±1e-2")
    for r in data["rows"]:
        lines.append(f"| {r['sigma']:g} | {r['teacher50_digits_fid']:.3f} | "
                     + ("–" if r["velocity_change"] == 0 else f"{r['velocity_change']:.2%}")
                     + f" | {r['jvp_vs_fd_1e-3']:.2%} | {r['jvp_vs_fd_1e-2']:.2%} |")
    p = data["protocol"]
    lines.append(f"\nThe shipped teacher with `student.time_smoothing=σ`; derivatives at t = {p['jvp_at_t']} on "
                 f"{p['jvp_samples']} samples, digits-FID at noise seed {p['noise_seed']} "
                 f"(`python benchmarks/time_smoothing.py`).")
    return "\n".join(lines)


def step_cost_table() -> str:
    data = _load("step_cost.json")
    lines = _header("objective", "variant", "ms per step", "× flow matching")
    for r in data["rows"]:
        lines.append(f"| {r['objective']} | {r['variant'] or '–'} | {r['ms_per_step']:.0f} | "
                     f"{r['ratio_to_flow_matching']:.2f} |")
    p = data["protocol"]
    lines.append(f"\n{p['model']}, batch {p['batch']}, {p['statistic']} of {p['timed_steps']} steps, {p['threads']} "
                 f"thread, {p['device']} (`python benchmarks/step_cost.py`).")
    return "\n".join(lines)


def digit_classes_table() -> str:
    data = _load("digit_classes.json")
    lines = _header("model", "samples", "TV distance to the training mix", "smallest digit share",
                    "mean top-class probability", "shares of 0–9 (%)")
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['n']} | {r['tv_to_train']:.3f} | {r['min_share']:.3f} | "
                     f"{r['mean_top_prob']:.3f} | {' '.join(f'{100 * x:.1f}' for x in r['class_share'])} |")
    p = data["protocol"]
    lines.append(f"\nThe classifier is the {p['classifier']}; {p['seeds']} noise seeds of {p['images_per_seed']} "
                 f"images per model (`python benchmarks/digit_classes.py`).")
    return "\n".join(lines)


def gmm_modes_table() -> str:
    data = _load("gmm_modes.json")
    lines = _header("student", "train steps", "generator updates", "modes covered", "share near a mode",
                    "energy distance")
    for r in data["rows"]:
        lines.append(f"| {r['student']} | {r['train_steps']} | {r['generator_updates']} | {r['modes_covered']} | "
                     f"{r['near_a_mode']:.2f} | {r['energy_distance']:.3f} |")
    p = data["protocol"]
    lines.append(f"\nA ring of {p['modes']} Gaussians (radius {p['radius']:g}, std {p['std']:g}), {p['samples']} "
                 f"samples, a mode covered if {p['covered_if']}; one noise seed (`python benchmarks/gmm_modes.py`).")
    return "\n".join(lines)


def feature_throughput_table() -> str:
    data = _load("feature_throughput.json")
    lines = _header("network", "input", "batch", "images/s", "ms per image")
    for r in data["rows"]:
        lines.append(f"| {r['network']} | {r['input']} | {r['batch_size']} | {r['images_per_s']:,.1f} | "
                     f"{r['ms_per_image']:.2f} |")
    p = data["protocol"]
    lines.append(f"\n{p['threads']} thread, {p['device']}, median of {p['repeats']} "
                 f"(`python benchmarks/feature_throughput.py`).")
    return "\n".join(lines)


OBJECTIVE_NAMES = ("splitmeanflow", "meanflow", "fdistill", "smt", "smd", "scm", "scm_ladd", "lightning")
def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def recipe_sizes_table() -> str:
    """Full-size parameter counts per real recipe (benchmarks/recipe_sizes.py, as --dry-run prints them)."""
    data = _load("recipe_sizes.json")
    lines = _header("recipe", "teacher params (denoiser)", "student trainable / total",
                    "teacher-copied nets of the objective: trainable / total")
    for r in data["rows"]:
        teacher = r["teacher_params"]
        copies = f"{_count(r['copies_trainable'])} / {_count(r['copies_total'])}" if r["copies"] else "–"
        lines.append(f"| {r['recipe']} | {_count(sum(teacher.values()))} ({_count(teacher['denoiser'])}) | "
                     f"{_count(r['student_trainable'])} / {_count(r['student_total'])} | {copies} |")
    lines.append(f"\n`{data['command']}`, {data['date']}.")
    return "\n".join(lines)


RENDERERS = {"smoke": smoke_table, "sharded": sharded_table, "full_size": full_size_table,
             "splitmeanflow_stability": splitmeanflow_stability_table, "objectives": objectives_table,
             "teacher_steps": teacher_steps_table, "runs": runs_table, "lightning_stages": lightning_stages_table,
             "attention": attention_table, "time_smoothing": time_smoothing_table, "step_cost": step_cost_table,
             "digit_classes": digit_classes_table, "gmm_modes": gmm_modes_table,
             "feature_throughput": feature_throughput_table, "methods": methods_table,
             "recipe_sizes": recipe_sizes_table,
             **{f"expected_{name}": _expected(name) for name in OBJECTIVE_NAMES}}
_BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(?:(.*?)\n)?(<!-- /table:\2 -->)", re.S)   # body may be empty


def files() -> list[Path]:
    """Every file whose tables are rendered: README.md and the docs' markdown pages."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every marked table re-rendered, and the names of the tables that changed."""
    changed = []
    cache: dict[str, str] = {}

    def sub(m):
        name = m.group(2)
        if name not in RENDERERS:
            raise KeyError(f"table {name!r} has no renderer in benchmarks/report.py")
        if name not in cache:
            cache[name] = RENDERERS[name]()
        body = cache[name]
        if body != (m.group(3) or ""):
            changed.append(name)
        return m.group(1) + body + "\n" + m.group(4)
    return _BLOCK.sub(sub, text), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    differ = 0
    for path in files():
        text = path.read_text(encoding="utf-8")
        new, changed = render(text)
        rel = path.relative_to(ROOT)
        if args.check:
            for name in changed:
                print(f"{rel}: table {name!r} differs from its rendering: run python benchmarks/report.py")
            differ += len(changed)
        elif changed:
            path.write_text(new, encoding="utf-8")
            print(f"{rel}: rendered {len(_BLOCK.findall(text))} tables, changed: {', '.join(changed)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
