"""The model card (README.md) of an export: what the student is, how to load it, how it was checked and scored."""
from __future__ import annotations

import json
from pathlib import Path

from onestep.export.base import Exporter, ExportResult
from onestep.runs import RunInfo

# ------------------------------------------------------------------------------------------------
# model card


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def model_card(info: RunInfo, exporter: Exporter, result: ExportResult, out: Path, format: str, steps: int,
               student_is_avg: bool = True) -> str:
    cfg = info.cfg
    teacher = dict(cfg.teacher)
    teacher_name = teacher.pop("name", None)
    if not cfg.has_teacher:
        teacher_desc = "none (trained from data)"
    elif teacher_name == "digits" and not teacher.get("path"):
        teacher_desc = "`digits` (the flow-matching digits UNet shipped with onestep, 1x16x16)"
    else:
        teacher_desc = f"`{teacher_name}`" + "".join(f", {k}={_fmt(v)}" for k, v in teacher.items() if v is not None)
    objective = dict(cfg.objective)
    obj_name = objective.pop("name")
    obj_desc = f"`{obj_name}`" + "".join(f", {k}={_fmt(v)}" for k, v in objective.items())
    path = str(out.resolve())
    snippet = "\n".join([
        result.loader, "",
        f"pipe = {result.load_call.format(path=path)}",
        *[line.format(path=path) for line in result.setup],
        f"images = pipe({result.call_args}, generator=torch.Generator().manual_seed(0)).images",
        'images[0].save("sample.png")',
    ])
    weights = "EMA" if info.weights == "ema" else "raw trained (not EMA)"
    lines = [
        "---",
        "library_name: diffusers",
        f"pipeline_tag: {exporter.pipeline_tag}",
        "tags:",
        "- onestep",
        "- distillation",
        f"- {obj_name}",
        "---",
        "",
        f"# {cfg.name}: {steps}-step " + (f"student of the {teacher_name} teacher"
                                         if cfg.has_teacher else f"{obj_name} model"),
        "",
        f"Exported by `onestep export --format {format} --steps {steps}"
        f"{'' if info.weights == 'ema' else ' --weights ' + info.weights}` from run `{cfg.name}`, "
        f"checkpoint `{info.checkpoint.name}` ({weights} weights).",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {teacher_desc} |",
        f"| model family | {exporter.family} |",
        f"| objective | {obj_desc} |",
        f"| training | {info.step} step{'s' if info.step != 1 else ''}, batch {cfg.data.batch_size}, seed {cfg.seed} |",
        f"| steps | {steps}: " + ("z_r = z_t - (t - r) u(z_t, r, t)" if student_is_avg else "Euler steps of v(z, t)")
        + " on the uniform grid t = 1 -> 0 |",
        f"| pipeline | {result.pipeline} |",
        f"| scheduler | {result.scheduler} |",
        f"| guidance | {result.guidance} |",
        "",
        "## Usage",
        "",
        "```python",
        snippet,
        "```",
        "",
        ("Images are returned in [0, 1] as `(x / 2 + 0.5).clamp(0, 1)` of the sample x in [-1, 1]"
         if exporter.pipeline_tag != "text-to-image" else
         "The pipeline decodes the student's latents with the teacher's VAE; `output_type=\"latent\"` returns "
         "the latents themselves")
        + "; `output_type=\"pt\"` or `\"np\"` gives tensors or arrays.",
        "",
        "## How this pipeline reproduces the student",
        "",
        *[p for note in result.notes for p in (note, "")],
    ]
    if result.max_abs_diff is not None:
        lines += [f"At export, the pipeline's output on fixed noise matched onestep's own {steps}-step sampler "
                  f"to {result.max_abs_diff:.2g} (max abs difference; held to {result.tolerance:.2g} on every "
                  "export).", ""]
    lines += ["## Evaluation", ""] + _evaluation(info, steps)
    return "\n".join(lines).rstrip() + "\n"


def _evaluation(info: RunInfo, steps: int) -> list[str]:
    files = _eval_files(info, steps)
    demo = _demo_report(info, steps)
    if files and info.report is None:
        return files
    return demo + ([""] + files if files else [])


def _flat(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flat(v, f"{prefix}{k}.")]
    return [(prefix[:-1], value)]


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _fmt(v)


def _eval_files(info: RunInfo, steps: int) -> list[str]:
    """The run's `eval/*.json` scores ({"scores", "protocol"}, written by `onestep eval`), each with its
    protocol and whether it scores this export (same checkpoint, weights and step count)."""
    folder = info.run_dir / "eval"
    lines: list[str] = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if (not isinstance(data, dict) or not isinstance(data.get("scores"), dict)
                or not isinstance(data.get("protocol"), dict)):
            continue
        p, scores = data["protocol"], data["scores"]
        same = (p.get("checkpoint") == info.checkpoint.name and p.get("weights", "ema") == info.weights
                and p.get("model") in (None, "student") and p.get("steps") in (None, steps))
        what = ", ".join(f"{k} {_fmt(p[k])}" for k in ("model", "steps", "checkpoint", "weights") if k in p)
        lines += [f"**{p.get('metric', f.stem)}** from `eval/{f.name}` ({what})"
                  + (" - scores this export." if same else " - **not this export's checkpoint/steps**."), ""]
        rows = scores.get("rows")
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
        other = [(k, v) for k, v in _flat({k: v for k, v in scores.items() if k != "rows"}) if not isinstance(v, list)]
        if other:
            lines += ["", "Scores: " + "; ".join(f"{k} = {_cell(v)}" for k, v in other) + "."]
        protocol = [(k, v) for k, v in _flat(p) if v is not None and not k.startswith("versions.")]
        versions = ", ".join(f"{k[9:]} {v}" for k, v in _flat(p) if k.startswith("versions.") and v)
        lines += ["", "Protocol: " + "; ".join(f"{k}: {_cell(v)}" for k, v in protocol)
                  + (f"; versions: {versions}" if versions else "") + ".", ""]
    return lines


def _demo_report(info: RunInfo, steps: int) -> list[str]:
    report = info.report
    if report is None:
        return ["Not evaluated (the run has no report.json or eval/*.json scores)."]
    if info.weights != "ema" or report.get("train_steps") != info.step:
        return [f"Not evaluated: the run's report.json scores the EMA weights after {report.get('train_steps')} "
                f"steps, not this checkpoint ({info.checkpoint.name}, {info.weights} weights)."]
    rows = report.get("rows", [])
    lines = ["From the run's `report.json` (`onestep demo`); lower digits-FID is better.", "",
             "| model | steps | digits-FID | images/s |", "|---|---|---|---|"]
    for r in rows:
        ips = "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.1f}"
        mark = " (this export)" if r.get("model") == "student" and r.get("steps") == steps else ""
        fid = "-" if r.get("digits_fid") is None else f"{r['digits_fid']:.3f}"
        lines.append(f"| {r.get('model')}{mark} | {r.get('steps')} | {fid} | {ips} |")
    if not any(r.get("model") == "student" and r.get("steps") == steps for r in rows):
        lines += ["", f"The report has no row for the student at {steps} steps."]
    p = report.get("protocol") or {}
    if p:
        lines += ["", "Protocol: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in p.items()) + "."]
    return lines
