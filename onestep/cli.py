"""The `onestep` command line.

    onestep demo [key=value ...]                         teacher -> SplitMeanFlow student -> report
    onestep teacher-train [--config C] [--out DIR] [key=value ...]
    onestep distill --config C [key=value ...]
    onestep list                                         registered teachers, objectives, metrics
    onestep export --run runs/X --out DIR [--checkpoint step-N] [--format diffusers|onestep|lora] [--steps K]

Configuration problems print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _config(args, default: str | None):
    from onestep.config import load_config

    return load_config(args.config or default, args.overrides)


def cmd_list(args) -> int:
    from onestep.registry import METRICS, OBJECTIVES, TEACHERS, load_builtin

    load_builtin()
    for title, reg in (("teachers", TEACHERS), ("objectives", OBJECTIVES), ("metrics", METRICS)):
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name}")
    return 0


def cmd_teacher_train(args) -> int:
    from onestep.trainer import Trainer

    cfg = _config(args, "digits_teacher")
    trainer = Trainer(cfg).fit(resume=not args.no_resume)
    out = Path(args.out) if args.out else trainer.run_dir / "teacher"
    if trainer.accelerator.is_main_process:
        ema = trainer.ema_student()
        ema.unet.save_pretrained(out, safe_serialization=True)
        print(f"teacher (EMA weights) saved to {out}")
    return 0


def cmd_distill(args) -> int:
    from onestep.trainer import Trainer

    cfg = _config(args, None)
    trainer = Trainer(cfg).fit(resume=not args.no_resume)
    print(f"run saved to {trainer.run_dir}")
    return 0


def cmd_demo(args) -> int:
    from onestep.demo import run_demo

    cfg = _config(args, "demo")
    report = run_demo(cfg, resume=not args.no_resume)
    print(report["markdown"])
    return 0


def cmd_export(args) -> int:
    from onestep.export import ExportError, export_run

    try:
        if not args.run or not args.out:
            raise ExportError("--run and --out are required, e.g. onestep export --run runs/demo --out exports/demo")
        try:
            steps = int(args.steps)
        except ValueError:
            raise ExportError(f"--steps must be an integer >= 1, got {args.steps!r}") from None
        out = export_run(args.run, args.out, checkpoint=args.checkpoint, format=args.format, steps=steps,
                         weights=args.weights)
    except ExportError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.format} pipeline ({steps} step{'s' if steps > 1 else ''}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onestep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, help_, func, default_hint):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", help=f"YAML path or shipped config name (default: {default_hint})")
        sp.add_argument("--no-resume", action="store_true", help="start over instead of resuming the run")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
        sp.set_defaults(func=func)
        return sp

    with_config("demo", "teacher -> SplitMeanFlow one-step student -> digits-FID report", cmd_demo, "demo")
    tt = with_config("teacher-train", "train the digits flow-matching teacher", cmd_teacher_train, "digits_teacher")
    tt.add_argument("--out", help="where to save the teacher (default: runs/<name>/teacher)")
    with_config("distill", "train a student with any registered objective", cmd_distill, "required")
    sp = sub.add_parser("list", help="registered teachers, objectives and metrics")
    sp.set_defaults(func=cmd_list)
    # no argparse `required`/`choices`/`type` here: export_run checks them and reports in one line
    ex = sub.add_parser("export", help="a run's student as a diffusers pipeline folder (see onestep/export.py)")
    ex.add_argument("--run", help="the run directory, e.g. runs/demo")
    ex.add_argument("--out", help="the folder to write (absent, empty, or an earlier export, which is replaced)")
    ex.add_argument("--checkpoint", help="step-N (default: the latest checkpoint)")
    ex.add_argument("--format", default="diffusers",
                    help="diffusers (stock pipeline, default), onestep (OneStepPipeline, any step count) or lora")
    ex.add_argument("--steps", default="1", help="the student's number of sampling steps (default 1)")
    ex.add_argument("--weights", default="ema", help="ema (default) or trained (the raw, non-EMA weights)")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from onestep.config import ConfigError
    from onestep.registry import UnknownNameError

    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "distill" and not args.config:
        print("onestep distill: --config is required (a YAML path or a shipped config name)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, UnknownNameError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
