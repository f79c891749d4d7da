"""SplitMeanFlow's stability on an 8-mode 2-D Gaussian mixture, per time-sampling setting and seed.

    python benchmarks/splitmeanflow_stability.py --seeds 0 1 2 3 4 [--only uniform3 default] [--arch mlp plain]

The setting of issue 35: 8 equal components N(mu_k, 0.3^2 I) on a circle of radius 4, a student with
three hidden SiLU layers of width 256, Adam (lr 1e-3, no weight decay), batch 512, 3000 steps, no EMA,
trained from scratch (boundary target eps - x) or distilled from the exact mixture teacher. Two students:
`mlp` is the library's MLPAvgVelocity(2, hidden=256, depth=3) (sinusoidal embeddings of t and t - r),
`plain` an MLP on [z, r, t] (3 x 256, SiLU), as a user would write one. The trainer is not used: its MLP
student has width 128 and it always clips gradients (train.clip_grad_norm > 0).

Each run maps 5000 fixed noise vectors (seed 12345) to 1- and 2-step samples and scores them with the
energy distance of onestep.evaluation.toy (the square root of the E-statistic) against 5000 mixture
samples (seed 54321); two independent 5000-sample sets of the mixture itself are `floor` apart. A run
counts as diverged when its loss went non-finite or its 1-step samples lie more than 50 from the origin
(the data lie within about 5). Rows are merged into benchmarks/results/splitmeanflow_stability.json
keyed by (setting, arch, seed), so seeds can be run in separate processes.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "splitmeanflow_stability.json"
RADIUS, STD, MODES, SAMPLES = 4.0, 0.3, 8, 5000
NOISE_SEED, REFERENCE_SEED = 12345, 54321
THREE = [[0.0, 1.0], [0.0, 0.5], [0.5, 1.0]]
#: name -> (objective options, gradient-clipping norm or None)
SETTINGS = {
    "uniform3": (dict(time_sampler="uniform", anchor_share=0.5, anchor_intervals=THREE), None),
    "uniform3_clip1": (dict(time_sampler="uniform", anchor_share=0.5, anchor_intervals=THREE), 1.0),
    "uniform3_teacher": (dict(time_sampler="uniform", anchor_share=0.5, anchor_intervals=THREE,
                              boundary_target="teacher"), None),
    "uniform3_teacher_clip1": (dict(time_sampler="uniform", anchor_share=0.5, anchor_intervals=THREE,
                                    boundary_target="teacher"), 1.0),
    "uniform_noanchor": (dict(time_sampler="uniform", anchor_share=0.0), None),
    "uniform_01_25": (dict(time_sampler="uniform", anchor_share=0.25, anchor_intervals=[[0.0, 1.0]]), None),
    "logitnormal3": (dict(time_sampler="logit_normal", anchor_share=0.5, anchor_intervals=THREE), None),
    "logitnormal_01_25": (dict(time_sampler="logit_normal", anchor_share=0.25, anchor_intervals=[[0.0, 1.0]]), None),
}


def mixture():
    from onestep.teachers.gmm import GaussianMixture

    means = [[RADIUS * math.cos(2 * math.pi * k / MODES), RADIUS * math.sin(2 * math.pi * k / MODES)]
             for k in range(MODES)]
    return GaussianMixture(means, [STD])


def plain_mlp(hidden: int = 256):
    import torch
    from torch import nn

    from onestep.student import AvgVelocityField

    class PlainMLP(AvgVelocityField):
        """u(z, r, t) = MLP([z, r, t]): three hidden SiLU layers, no time embedding."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

        def forward(self, z, r, t, cond=None):
            col = (lambda v: v.to(z.dtype).reshape(-1, 1).expand(z.shape[0], 1))
            return self.net(torch.cat([z, col(r), col(t)], 1))

    return PlainMLP()


def train_and_score(setting: str, seed: int, arch: str = "mlp", steps: int = 3000, batch: int = 512,
                    lr: float = 1e-3, samples: int = SAMPLES) -> dict:
    import torch
    from onestep.evaluation.toy import energy_distance
    from onestep.objectives.splitmeanflow import SplitMeanFlow, SplitMeanFlowConfig
    from onestep.teachers.gmm import GMMTeacher

    from onestep.student import MLPAvgVelocity

    options, clip = SETTINGS[setting]
    # everything pinned here, so that a change of SplitMeanFlowConfig's defaults does not move old rows
    options = {"boundary_target": "data", "flow_ratio": 0.5, "mu": -0.4, "sigma": 1.0, "anchor_intervals": [[0.0, 1.0]],
               **options}
    mix = mixture()
    teacher = GMMTeacher(mix) if options["boundary_target"] == "teacher" else None
    torch.manual_seed(seed)
    student = MLPAvgVelocity(2, hidden=256, depth=3) if arch == "mlp" else plain_mlp()
    cfg = SplitMeanFlowConfig(**options)
    obj = SplitMeanFlow(student, teacher, cfg)
    obj.generator = torch.Generator().manual_seed(seed)
    data = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    start, losses, nonfinite_at = time.perf_counter(), [], None
    for step in range(steps):
        x, _ = mix.sample(batch, data)
        loss = obj.loss({"x": x, "cond": None}, step)["student"]
        if not torch.isfinite(loss):
            nonfinite_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    noise = torch.randn(samples, 2, generator=torch.Generator().manual_seed(NOISE_SEED))
    reference, _ = mix.sample(samples, torch.Generator().manual_seed(REFERENCE_SEED))
    row = {"setting": setting, "arch": arch, "seed": seed}
    far = False
    with torch.no_grad():
        for k in (1, 2):
            out = student.sample(noise, steps=k)
            finite = bool(torch.isfinite(out).all())
            row[f"energy_distance_{k}step"] = energy_distance(out, reference) if finite else float("inf")
            if k == 1:
                far = not finite or bool(out.norm(dim=1).max() > 50)
    row.update({
        "diverged": nonfinite_at is not None or far, "nonfinite_loss_at": nonfinite_at, "steps": steps,
        "max_loss": max(losses) if losses else None,
        "final_loss_mean100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "train_seconds": round(seconds, 1),
        "settings": {**{k: v for k, v in vars(cfg).items()}, "clip_grad_norm": clip, "lr": lr, "batch": batch,
                     "optimizer": "Adam", "student": "MLPAvgVelocity(2, hidden=256, depth=3)" if arch == "mlp"
                     else "MLP([z, r, t]) 3x256 SiLU"},
    })
    return row


def floor(samples: int = SAMPLES) -> float:
    import torch
    from onestep.evaluation.toy import energy_distance

    mix = mixture()
    a, _ = mix.sample(samples, torch.Generator().manual_seed(REFERENCE_SEED))
    b, _ = mix.sample(samples, torch.Generator().manual_seed(REFERENCE_SEED + 1))
    return energy_distance(a, b)


def merge(out: Path, rows: list[dict], protocol: dict) -> dict:
    """Add `rows` to `out` (replacing rows of the same setting, arch and seed) under a file lock."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # the lock file lives in the temporary directory, not next to the committed results
    lock_path = Path(tempfile.gettempdir()) / (
        f"splitmeanflow_stability-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]}.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(out.read_text()) if out.exists() else {"rows": []}
        key = (lambda r: (r["setting"], r["arch"], r["seed"]))
        new = {key(r): r for r in rows}
        kept = [r for r in old["rows"] if key(r) not in new]
        merged = sorted(kept + rows, key=lambda r: (list(SETTINGS).index(r["setting"]), r["arch"], r["seed"]))
        doc = {"rows": merged, "protocol": protocol}
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def summary(rows: list[dict]) -> list[str]:
    import statistics

    lines = ["| setting | student | seeds | diverged | 1-step energy distance (mean ± sd) | 2-step |",
             "|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["setting"], r["arch"]), []).append(r)
    for (setting, arch), rs in groups.items():
        ok = [r for r in rs if not r["diverged"]]
        cell = (lambda k: "-" if not ok else f"{statistics.mean(r[k] for r in ok):.4f} ± "
                f"{statistics.stdev(r[k] for r in ok) if len(ok) > 1 else 0.0:.4f}")
        lines.append(f"| {setting} | {arch} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{sum(r['diverged'] for r in rs)}/{len(rs)} | {cell('energy_distance_1step')} | "
                     f"{cell('energy_distance_2step')} |")
    return lines


def main() -> None:
    import torch
    from onestep.objectives.splitmeanflow import SplitMeanFlowConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--only", nargs="*", choices=list(SETTINGS))
    ap.add_argument("--arch", nargs="+", choices=["mlp", "plain"], default=["mlp"])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    protocol = {"modes": MODES, "radius": RADIUS, "std": STD, "samples": SAMPLES, "noise_seed": NOISE_SEED,
                "reference_seed": REFERENCE_SEED, "floor_energy_distance": round(floor(), 4),
                "metric": "onestep.evaluation.toy.energy_distance (sqrt of the E-statistic)",
                "diverged_if": "non-finite loss, or a 1-step sample farther than 50 from the origin",
                "threads": args.threads, "torch": torch.__version__,
                "library_default": {k: v for k, v in vars(SplitMeanFlowConfig()).items()
                                    if k in ("time_sampler", "mu", "sigma", "anchor_share", "anchor_intervals",
                                             "flow_ratio")}}
    for setting in args.only or list(SETTINGS):
        for arch in args.arch:
            for seed in args.seeds:
                row = train_and_score(setting, seed, arch, steps=args.steps)
                print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
                doc = merge(args.out, [row], protocol)
    print("\n".join(summary(doc["rows"])))


if __name__ == "__main__":
    main()
