"""`onestep demo`: digits teacher -> SplitMeanFlow one-step student -> digits-FID report.

Every row of the report is scored under one protocol: N samples (N = the number of held-out real
digits unless eval.num_samples says otherwise) from the same fixed noise, digits-FID against the
training split, and images/s measured while generating those N samples. The `real` row scores N
held-out real digits the same way: the floor that says how good the teacher is.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from onestep.config import RunConfig
from onestep.data import load_digits


@torch.no_grad()
def _generate(sample_fn, noise: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    """Samples for all of `noise` and the images/s achieved (after one untimed warm-up batch)."""
    sample_fn(noise[: min(8, len(noise))])
    if noise.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = torch.cat([sample_fn(noise[i:i + batch_size]) for i in range(0, len(noise), batch_size)])
    if noise.is_cuda:
        torch.cuda.synchronize()
    return out.clamp(-1, 1), len(noise) / (time.perf_counter() - start)


def reference_teacher(teacher):
    """The teacher a digits student is scored next to: its own, or the shipped digits teacher for a run
    trained from data without one (`digits_smt`)."""
    if teacher is not None:
        return teacher
    from onestep.teachers.digits import DigitsTeacher

    return DigitsTeacher.from_pretrained()


def evaluate_digits(teacher, student, cfg: RunConfig, device) -> dict:
    from onestep.evaluation.features import digits_fid

    ev = cfg.eval
    heldout = load_digits("heldout").images
    n = ev.num_samples or len(heldout)
    noise = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(ev.seed)).to(device)
    rows, samples, protocol = [], {}, None

    def add(model: str, steps: int, images: torch.Tensor, ips: float | None):
        nonlocal protocol
        scored = digits_fid(images.cpu())
        protocol = scored["protocol"]
        rows.append({"model": model, "steps": steps, "digits_fid": round(scored["digits_fid"], 3),
                     "images_per_s": None if ips is None else round(ips, 1)})

    real = heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(ev.seed))[:n]]
    add("real", 0, real, None)
    for k in ev.teacher_steps:
        images, ips = _generate(lambda z, k=k: teacher.sample(z, steps=k, solver=ev.solver), noise, ev.batch_size)
        samples[("teacher", k)] = images
        add("teacher", k, images, ips)
    for k in ev.student_steps:
        images, ips = _generate(lambda z, k=k: student.sample(z, steps=k), noise, ev.batch_size)
        samples[("student", k)] = images
        add("student", k, images, ips)
    # student None: teacher rows only (benchmarks/teacher_steps.py)
    sampler, weights = (None, None) if student is None else (student.sampler_description(), "EMA")
    protocol.update({
        "noise_seed": ev.seed, "teacher_solver": ev.solver, "student_sampler": sampler,
        "student_weights": weights, "generation_batch_size": ev.batch_size, "device": str(device),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "real_row": "held-out split vs the training-split reference, same N",
    })
    return {"rows": rows, "protocol": protocol, "samples": samples}


def evaluate_digits_seeds(teacher, student, cfg: RunConfig, device, num_seeds: int) -> list[dict]:
    """`evaluate_digits` on the noise seeds eval.seed, eval.seed + 1, ... (the first is the protocol's own):
    with 540 images one model's digits-FID moves by about 0.3 between seeds."""
    return [evaluate_digits(teacher, student, replace(cfg, eval=replace(cfg.eval, seed=cfg.eval.seed + i)), device)
            for i in range(num_seeds)]


def scores_by_seed(results: list[dict]) -> tuple[list[int], list[dict]]:
    """(noise seeds, per seed {(model, steps): digits_fid}) of `evaluate_digits_seeds` results."""
    return ([res["protocol"]["noise_seed"] for res in results],
            [{(r["model"], r["steps"]): r["digits_fid"] for r in res["rows"]} for res in results])


def seed_spread(seeds: list[int], student: list[float], teacher: list[float]) -> dict:
    """Per-seed scores and the paired ratio's mean and sample sd (student and teacher share each seed's noise)."""
    import statistics

    ratios = [s / t for s, t in zip(student, teacher)]
    return {"noise_seeds": seeds, "digits_fid_seeds": student, "teacher50_digits_fid_seeds": teacher,
            "ratio_mean": round(statistics.mean(ratios), 3), "ratio_sd": round(statistics.stdev(ratios), 3)}


def paired_seeds(teacher, student, cfg: RunConfig, device, first: dict) -> dict:
    """The student/teacher-50 digits-FID ratio over `cfg.eval.noise_seeds` paired noise seeds, per student step
    count: `first` is `evaluate_digits` at the protocol seed; the other seeds score only the teacher's 50-step
    sampler and the student's. {"k-step": seed_spread(...)}; empty with fewer than 2 seeds or no 50-step row."""
    ev = cfg.eval
    fid = {(r["model"], r["steps"]): r["digits_fid"] for r in first["rows"]}
    if ev.noise_seeds < 2 or ("teacher", 50) not in fid:
        return {}
    lean = replace(cfg, eval=replace(ev, teacher_steps=[50], noise_seeds=1))
    results = [first] + evaluate_digits_seeds(teacher, student,
                                              replace(lean, eval=replace(lean.eval, seed=ev.seed + 1)),
                                              device, ev.noise_seeds - 1)
    seeds, per_seed = scores_by_seed(results)
    return {f"{k}-step": seed_spread(seeds, [s[("student", k)] for s in per_seed],
                                     [s[("teacher", 50)] for s in per_seed])
            for k in ev.student_steps}


def targets(rows, spread: dict | None = None) -> list[tuple[str, float, str, float, bool]]:
    """The demo's goals as (what, measured ratio, "<=" or ">=", goal, met). A student / teacher-50 ratio is the
    mean over the paired noise seeds where `spread` (`paired_seeds`) has it, the protocol seed's otherwise."""
    fid = {(r["model"], r["steps"]): r["digits_fid"] for r in rows}
    ips = {(r["model"], r["steps"]): r["images_per_s"] for r in rows}
    spread = spread or {}

    def ratio(table, num, den):
        return table[num] / table[den] if num in table and den in table else None

    def versus_teacher50(k):
        if f"{k}-step" in spread:
            return (f"student {k}-step FID / teacher 50-step FID (mean over noise seeds)",
                    spread[f"{k}-step"]["ratio_mean"])
        return f"student {k}-step FID / teacher 50-step FID", ratio(fid, ("student", k), ("teacher", 50))

    goals = [
        ("teacher 50-step FID / real FID", ratio(fid, ("teacher", 50), ("real", 0)), "<=", 2.5),
        (*versus_teacher50(1), "<=", 1.75),
        ("student 1-step FID / teacher 1-step FID", ratio(fid, ("student", 1), ("teacher", 1)), "<=", 0.1),
        (*versus_teacher50(2), "<=", 1.3),
        ("student 1-step images/s / teacher 50-step images/s", ratio(ips, ("student", 1), ("teacher", 50)), ">=", 30.0),
    ]
    return [(what, value, op, goal, value <= goal if op == "<=" else value >= goal)
            for what, value, op, goal in goals if value is not None]


def markdown(report: dict) -> str:
    lines = [f"# onestep demo: {report['run']}", "",
             f"Training: {report['train_steps']} SplitMeanFlow steps ({report['train_precision']}) in "
             f"{report['train_seconds']:.0f} s; "
             f"evaluation {report['eval_seconds']:.0f} s (+ {report.get('extra_seeds_seconds', 0):.0f} s for the "
             "other noise seeds).", ""]
    spread = report.get("seed_spread") or {}
    if spread:
        seeds = next(iter(spread.values()))["noise_seeds"]
        lines += [f"Student / teacher 50-step digits-FID over {len(seeds)} paired noise seeds "
                  f"({', '.join(map(str, seeds))}; the table below is the first):", "",
                  "| student steps | ratio mean ± sd | per seed |", "|---|---|---|"]
        for key, s in spread.items():
            per_seed = ", ".join(f"{a / b:.3f}" for a, b in zip(s["digits_fid_seeds"], s["teacher50_digits_fid_seeds"]))
            lines.append(f"| {key.split('-')[0]} | {s['ratio_mean']:.3f} ± {s['ratio_sd']:.3f} | {per_seed} |")
        lines.append("")
    lines += ["| model | steps | digits-FID | images/s |", "|---|---|---|---|"]
    for r in report["rows"]:
        ips = "–" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"| {r['model']} | {r['steps']} | {r['digits_fid']:.2f} | {ips} |")
    lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
    for what, value, op, goal, met in targets(report["rows"], spread):
        lines.append(f"| {what} | {value:.3f} | {op} {goal} | {'yes' if met else 'NO'} |")
    p = report["protocol"]
    lines += ["", f"Protocol: {p['num_samples']} samples per row, digits-FID ({p['feature_net']}, sha256 "
              f"{p['feature_net_sha256'][:12]}…) against {p['reference']} ({p['reference_size']} images); noise seed "
              f"{p['noise_seed']}; teacher {p['teacher_solver']}; student EMA weights; {p['device']}, "
              f"{p['torch_threads']} threads.", "", "Samples (same noise): teacher 50 steps | teacher 1 step | "
              "student 1 step: `grid.png`."]
    return "\n".join(lines)


def save_grid(samples: dict, path: Path, n: int = 64) -> None:
    from torchvision.utils import make_grid, save_image

    upscale = lambda x: torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")  # noqa: E731
    panels = [make_grid(upscale((samples[key][:n] + 1) / 2), nrow=8, padding=2, pad_value=1.0)
              for key in (("teacher", 50), ("teacher", 1), ("student", 1)) if key in samples]
    if panels:
        gap = torch.ones(3, panels[0].shape[1], 16)
        save_image(torch.cat([x for p in panels for x in (p, gap)][:-1], dim=2), path)


def run_demo(cfg: RunConfig, resume: bool = True, trainer=None) -> dict:
    """Train (or finish training) the demo run and write its report. `trainer`: one already built and,
    where wanted, resumed (the CLI resumes before anything is written, see `onestep.cli.start_trainer`)."""
    from onestep.trainer import Trainer

    start = time.perf_counter()
    if trainer is None:
        trainer = Trainer(cfg).fit(resume=resume)
    else:
        trainer.fit(resume=False)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    student, device = trainer.ema_student(), trainer.accelerator.device
    result = evaluate_digits(trainer.teacher, student, cfg, device)
    eval_seconds = time.perf_counter() - start
    start = time.perf_counter()
    spread = paired_seeds(trainer.teacher, student, cfg, device, result)
    seeds_seconds = time.perf_counter() - start
    precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[cfg.train.mixed_precision]
    report = {"run": cfg.name, "train_steps": trainer.step, "train_precision": precision,
              "train_seconds": round(train_seconds, 1),
              "eval_seconds": round(eval_seconds, 1), "extra_seeds_seconds": round(seeds_seconds, 1),
              "seed_spread": spread, "rows": result["rows"], "protocol": result["protocol"]}
    report["targets"] = [{"what": w, "value": round(v, 4), "target": f"{op} {g}", "met": bool(m)}
                         for w, v, op, g, m in targets(report["rows"], spread)]
    run_dir = trainer.run_dir
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    report["markdown"] = markdown(report)
    (run_dir / "report.md").write_text(report["markdown"] + "\n")
    save_grid(result["samples"], run_dir / "grid.png")
    return report
