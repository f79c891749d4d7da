"""Cost of one training step per objective on the digits UNet, measured in one run.

    python benchmarks/step_cost.py [--batch 64] [--steps 12] [--threads 2]

Each objective trains the teacher-initialised digits student (batch 64, AdamW) for a few warm-up
steps, then `--steps` timed steps (loss + backward + optimizer step); the median is reported with its
ratio to flow matching. Writes benchmarks/results/step_cost.json as
{"rows": [{"objective", "variant", "ms_per_step", "ratio_to_flow_matching"}, ...], "protocol": {...}}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "step_cost.json"

CASES = [  # (objective, variant label, objective options)
    ("flow_matching", "teacher target", {"target": "teacher"}),
    ("meanflow", "jvp=single", {"jvp": "single"}),
    ("meanflow", "jvp=split", {"jvp": "split"}),
    ("meanflow", "jvp=finite_difference", {"jvp": "finite_difference"}),
    ("splitmeanflow", "", {}),
]


def time_steps(objective, params, batch, warmup: int, steps: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = objective.loss(batch, i)["student"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from onestep.teachers.digits import DigitsTeacher

    from onestep.data import load_digits
    from onestep.registry import OBJECTIVES, load_builtin
    from onestep.student import AvgVelocityUNet, student_from_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_builtin()

    teacher = DigitsTeacher.from_pretrained()
    x = load_digits("train").images[: args.batch]
    batch = {"x": x, "cond": None}
    rows = []
    for name, variant, options in CASES:
        cls = OBJECTIVES.get(name)
        student = student_from_teacher(teacher)
        if name == "flow_matching":  # a velocity model: the teacher's own architecture
            student = AvgVelocityUNet(teacher.backbone().unet.__class__.from_config(teacher.backbone().unet.config))
            student.unet.load_state_dict(teacher.backbone().unet.state_dict())
        obj = cls(student, teacher, cls.Config(**options))
        obj.generator = torch.Generator().manual_seed(0)
        seconds = time_steps(obj, [p for p in student.parameters() if p.requires_grad], batch, args.warmup, args.steps)
        rows.append({"objective": name, "variant": variant, "ms_per_step": round(1000 * seconds, 1)})
        print(rows[-1], flush=True)
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["ratio_to_flow_matching"] = round(r["ms_per_step"] / base, 2)

    print("\n| objective | variant | ms/step | × flow matching |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['variant']} | {r['ms_per_step']:.0f} | {r['ratio_to_flow_matching']:.2f} |")
    protocol = {"model": "digits UNet2DModel (1.05M params, no attention), 1x16x16", "batch": args.batch,
                "timed_steps": args.steps, "warmup_steps": args.warmup, "statistic": "median",
                "threads": args.threads, "device": "cpu", "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "protocol": protocol}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
