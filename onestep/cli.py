"""The `onestep` command line.

    onestep demo [key=value ...]                         teacher -> SplitMeanFlow student -> report
    onestep teacher-train [--config C] [--out DIR] [key=value ...]
    onestep distill --config C [key=value ...]
    onestep list                                         registered teachers, objectives, metrics

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
