"""Mode coverage of one-step distribution-matching students on a 2-D Gaussian mixture with 8 modes.

    python benchmarks/gmm_modes.py [--steps 4000] [--only js forward_kl]

The teacher is the exact (analytic) flow of 8 equal components N(mu_k, 0.2^2 I) on a circle of radius 4
(neighbouring means 3.06 apart: 15 standard deviations). Each student is an MLP generator
G(z) = z - u(z, 0, 1) trained from scratch by `fdistill` with one divergence (reverse KL = DMD,
forward KL, Jensen-Shannon) or by `smd`, through the ordinary trainer (critic and score steps
included in the step count). The EMA student maps 4000 fixed noise vectors to samples, which are
scored with `evaluation.toy`: modes covered (a mode counts when at least 1 % of the samples lie
within 3 std of its mean), the share of samples near some mode, per-mode counts, and the energy
distance to 4000 teacher samples. Writes benchmarks/results/gmm_modes.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gmm_modes.json"
RADIUS, STD, MODES, SAMPLES = 4.0, 0.2, 8, 4000
RUNS = {  # name -> objective overrides
    "reverse_kl": ["objective.name=fdistill", "objective.divergence=reverse_kl"],
    "forward_kl": ["objective.name=fdistill", "objective.divergence=forward_kl"],
    "js": ["objective.name=fdistill", "objective.divergence=js"],
    "smd": ["objective.name=smd", "objective.score_lr=1e-3"],
}


def means() -> list[list[float]]:
    return [[RADIUS * math.cos(2 * math.pi * k / MODES), RADIUS * math.sin(2 * math.pi * k / MODES)]
            for k in range(MODES)]


def train_and_score(name: str, steps: int, output_dir: str, threads: int = 1) -> dict:
    import torch
    from onestep.evaluation.toy import energy_distance, mode_coverage

    from onestep.config import load_config
    from onestep.trainer import Trainer

    overrides = [
        f"name=gmm8-{name}", f"output_dir={output_dir}", "teacher.name=gmm", f"teacher.means={json.dumps(means())}",
        f"teacher.stds=[{STD}]", "student.init=scratch", "student.backbone=mlp", "data.name=gmm",
        "data.batch_size=256", f"train.steps={steps}", "train.progress=false", f"train.checkpoint_every={steps}",
        "train.log_every=100", f"train.num_threads={threads}", "train.ema_decay=0.99", "objective.lr=1e-3",
        "objective.weight_decay=0.0", *RUNS[name]]
    trainer = Trainer(load_config(None, overrides))
    start = time.perf_counter()
    trainer.fit(resume=False)
    seconds = time.perf_counter() - start
    noise = torch.randn(SAMPLES, 2, generator=torch.Generator().manual_seed(0))
    samples = trainer.ema_student().sample(noise, steps=1)
    reference, _ = trainer.teacher.mixture.sample(SAMPLES, torch.Generator().manual_seed(1))
    coverage = mode_coverage(samples, means(), STD, radius=3.0, min_count=SAMPLES // 100)
    return {"student": name, "train_steps": steps, "generator_updates": steps // 5,
            "modes_covered": round(coverage["modes_covered"] * MODES),
            "near_a_mode": round(coverage["high_quality"], 4),
            "mode_counts": coverage["mode_counts"], "energy_distance": round(energy_distance(samples, reference), 4),
            "train_seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--output-dir", default="runs/benchmarks")
    args = ap.parse_args()
    rows = [train_and_score(name, args.steps, args.output_dir) for name in (args.only or list(RUNS))]
    print("| student | modes covered (of 8) | samples near a mode | energy distance | train steps | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['student']} | {r['modes_covered']} | {r['near_a_mode']:.3f} | {r['energy_distance']:.3f} | "
              f"{r['train_steps']} | {r['train_seconds']:.0f} |")
    protocol = {"modes": MODES, "radius": RADIUS, "std": STD, "samples": SAMPLES, "noise_seed": 0,
                "covered_if": "at least 1 % of samples within 3 std of the mean", "batch": 256, "lr": 1e-3,
                "ema_decay": 0.99, "threads": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "protocol": protocol}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
