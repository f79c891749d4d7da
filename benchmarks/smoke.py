"""`onestep distill --config X --smoke` for every shipped recipe, each in its own process, as a user runs it.

    python benchmarks/smoke.py [--recipes demo sd15_fdistill ...] [--out benchmarks/results/smoke.json]

Records per recipe: stages passed / stages, the failed ones, the formats exported, wall time of the whole command
and of each stage, and the peak resident memory, from the smoke.json each command writes. The README's table is
rendered from the output (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "smoke.json"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=sorted(f.stem for f in (ROOT / "configs").glob("*.yaml")))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = {r["recipe"]: r for r in json.loads(out.read_text())["rows"]} if out.is_file() else {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="onestep-smoke-") as tmp:
        for recipe in args.recipes:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "onestep.cli", "distill", "--config", recipe, "--smoke",
                                   f"output_dir={tmp}", f"train.num_threads={args.threads}"],
                                  env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            record_file = Path(tmp) / f"{recipe}-smoke" / "smoke.json"
            record = json.loads(record_file.read_text()) if record_file.is_file() else {"stages": []}
            stages = record["stages"]
            ok = [s for s in stages if s["status"] in ("ok", "n/a")]
            rows[recipe] = {
                "recipe": recipe, "exit_code": proc.returncode, "passed": proc.returncode == 0 and bool(stages),
                "stages_passed": len(ok), "stages": len(stages),
                "failed": [f"{s['name']}: {s['detail']}" for s in stages if s["status"] not in ("ok", "n/a")],
                "exported": [s["name"].split(":")[1] for s in stages if s["name"].startswith("export:")
                             and s["status"] == "ok"],
                "seconds": round(seconds, 1),
                "stage_seconds": {s["name"]: s["seconds"] for s in stages},
                "peak_rss_bytes": max((s["peak_rss_bytes"] or 0 for s in stages), default=None),
            }
            print(f"{recipe}: exit {proc.returncode}, {len(ok)}/{len(stages)} stages, {seconds:.0f} s", flush=True)
    protocol = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/smoke.py"}
    out.write_text(json.dumps({"rows": [rows[k] for k in sorted(rows)], "protocol": protocol}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
