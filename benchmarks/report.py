"""Render the README's results tables from benchmarks/results/*.json, never typed by hand.

    python benchmarks/report.py            # rewrite every table between its markers in README.md
    python benchmarks/report.py --check    # exit 1 naming each table that differs from its rendering

A table lives between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; RENDERERS[NAME] renders it from its JSON.
tests/benchmarks/test_report.py fails when a committed table differs from its rendering.
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
        lines.append(f"| {r['strategy']} | {r['objective']} | {r['wrapped_by']} | {r['max_abs_diff_vs_one_process']:.1e} "
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
    lines.append(f"\nmean ± sd over seeds; two independent sets of mixture samples lie {p['floor_energy_distance']:.3f} "
                 f"apart; {p['threads']} thread, torch {p['torch']} (`python benchmarks/splitmeanflow_stability.py`).")
    return "\n".join(lines)


RENDERERS = {"smoke": smoke_table, "sharded": sharded_table, "full_size": full_size_table,
             "splitmeanflow_stability": splitmeanflow_stability_table}
_BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(\n<!-- /table:\2 -->)", re.S)


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every marked table re-rendered, and the names of the tables that changed."""
    changed = []

    def sub(m):
        name = m.group(2)
        if name not in RENDERERS:
            raise KeyError(f"README table {name!r} has no renderer in benchmarks/report.py")
        body = RENDERERS[name]()
        if body != m.group(3):
            changed.append(name)
        return m.group(1) + body + m.group(4)
    return _BLOCK.sub(sub, text), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new, changed = render(text)
    if args.check:
        for name in changed:
            print(f"README table {name!r} differs from its rendering: run python benchmarks/report.py")
        return 1 if changed else 0
    README.write_text(new, encoding="utf-8")
    print(f"rendered {len(_BLOCK.findall(text))} tables, {len(changed)} changed: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
