"""The `onestep` command line.

    onestep demo [key=value ...]                         teacher -> SplitMeanFlow student -> report
    onestep teacher-train [--config C] [--out DIR] [key=value ...]
    onestep distill --config C [--dry-run | --smoke] [key=value ...]
    onestep list                                         registered teachers, objectives, metrics
    onestep export --run runs/X --out DIR [--checkpoint step-N] [--format diffusers|onestep|lora] [--steps K]

Bad input (a config, a file, an argument) prints one line naming the problem and exits with code 2;
nothing is written before the input has been checked, and a failed resume leaves the run untouched.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from onestep.errors import ConfigError, InputError, ResumeError, UsageError
from onestep.evaluation.commands import add_eval_parsers


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints a usage block and then the error; onestep's input errors are one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _first_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _config(args, default: str | None):
    from onestep.config import load_config

    return load_config(args.config or default, args.overrides)


def _refused_pickle(checkpoint: Path) -> tuple[Path, str] | None:
    """The first `.pt` file of a checkpoint that torch.load(weights_only=True) refuses, and why."""
    import pickle

    import torch

    for f in sorted(checkpoint.glob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            return f, _unpickling_reason(str(e))
        except Exception:  # unreadable in another way: reported by the caller as it is
            continue
    return None


def _unpickling_reason(text: str) -> str:
    """The part of torch's long weights_only message that says what was refused (e.g. "unsupported
    GLOBAL posix.system"); its wording differs between torch versions."""
    text = text.replace("WeightsUnpickler error:", "\n\n")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    specific = [p for p in paragraphs if "global" in p.lower() or "unsupported" in p.lower()]
    reason = (specific or paragraphs or ["refused by the weights-only unpickler"])[0]
    return _first_line(reason.split(". ")[0].rstrip("."), 160)


def start_trainer(cfg, resume: bool):
    """The run's Trainer, resumed from its latest checkpoint unless `resume` is False.

    Resuming happens before `fit` writes anything into the run directory, so a checkpoint that cannot
    be loaded (a pickle that is more than tensors, a file altered after its checksum was written, a
    checkpoint of a different model) is a ResumeError and leaves the run exactly as it was.
    """
    import pickle

    from onestep.checkpoint import finished_checkpoints
    from onestep.trainer import Trainer

    trainer = Trainer(cfg)
    if resume:
        try:
            trainer.maybe_resume()
        except Exception as e:  # any failure to load a checkpoint is a problem of that input, not a crash
            done = finished_checkpoints(trainer.ckpt_dir)
            where = done[-1] if done else trainer.ckpt_dir
            refused = _refused_pickle(where) if isinstance(e, pickle.UnpicklingError) and done else None
            if refused is not None:
                f, reason = refused
                raise ResumeError(f"refused to load {f}: a pickle holding more than tensors ({reason}); checkpoint "
                                  f"pickles are loaded only with torch.load(weights_only=True). If you did not write "
                                  f"it, delete {where}, or start over with --no-resume") from None
            raise ResumeError(f"cannot resume from {where}: {type(e).__name__}: {_first_line(e, 300)}; delete that "
                              "checkpoint, use another name=..., or start over with --no-resume") from None
    return trainer


def cmd_list(args) -> int:
    from onestep.registry import METRICS, OBJECTIVES, TEACHERS, load_builtin

    load_builtin()
    for title, reg in (("teachers", TEACHERS), ("objectives", OBJECTIVES), ("metrics", METRICS)):
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name}")
    return 0


#: what `save_pretrained` writes into a teacher folder: an --out holding only these may be replaced
TEACHER_FILES = {"config.json", "diffusion_pytorch_model.safetensors", "onestep.json"}


def _check_teacher_out(out: Path) -> None:
    """Refuse, before training, an --out that saving the teacher would fail on or clobber."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; give a new or empty folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in TEACHER_FILES)
    if others:
        raise UsageError(f"--out {out} holds files that are not a saved teacher (e.g. {others[0]}); give a new or "
                         "empty folder, or one that holds only a teacher to replace")


def cmd_teacher_train(args) -> int:
    cfg = _config(args, "digits_teacher")
    if args.out:
        _check_teacher_out(Path(args.out))
    trainer = start_trainer(cfg, resume=not args.no_resume).fit(resume=False)  # resumed above (or not)
    out = Path(args.out) if args.out else trainer.run_dir / "teacher"
    if trainer.accelerator.is_main_process:
        from onestep.teachers.digits import save_digits_unet

        save_digits_unet(trainer.ema_student(), out)
        print(f"teacher (EMA weights) saved to {out}")
    trainer.close()  # destroys the process group: a multi-process run left with it up can abort at exit
    return 0


def cmd_distill(args) -> int:
    if not args.config:
        raise UsageError("onestep distill needs --config (a YAML path or a shipped config name, see onestep list)")
    cfg = _config(args, None)
    if args.dry_run and args.smoke:
        raise UsageError("--dry-run and --smoke are two rehearsals: give one")
    if args.dry_run:  # validate, build at tiny size, one training step, full-size counts; nothing downloaded
        from onestep.dryrun import dry_run

        dry_run(cfg)
        return 0
    if args.smoke:  # the whole path at tiny size: train, checkpoint, resume, grid, export, load, eval
        from onestep.smoke import smoke

        return 0 if smoke(cfg)["passed"] else 1
    trainer = start_trainer(cfg, resume=not args.no_resume).fit(resume=False)
    print(f"run saved to {trainer.run_dir}")
    trainer.close()
    return 0


def cmd_demo(args) -> int:
    from onestep.demo import run_demo

    cfg = _config(args, "demo")
    trainer = start_trainer(cfg, resume=not args.no_resume)
    report = run_demo(cfg, trainer=trainer)
    print(report["markdown"])
    trainer.close()
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
        try:
            lora_rank = None if args.lora_rank is None else int(args.lora_rank)
        except ValueError:
            raise ExportError(f"--lora-rank must be an integer >= 1, got {args.lora_rank!r}") from None
        out = export_run(args.run, args.out, checkpoint=args.checkpoint, format=args.format, steps=steps,
                         weights=args.weights, lora_rank=lora_rank, allow_lora_residual=args.allow_lora_residual)
    except ExportError as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.format} pipeline ({steps} step{'s' if steps > 1 else ''}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="onestep", description=__doc__.splitlines()[0])
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
    di = with_config("distill", "train a student with any registered objective", cmd_distill, "required")
    di.add_argument("--dry-run", action="store_true", help="validate the recipe, build it at a tiny size, run one "
                    "training step and print parameter counts and a full-size GPU memory estimate (no download)")
    di.add_argument("--smoke", action="store_true", help="rehearse the recipe end to end at tiny size (its teacher "
                    "family built tiny, the recipe's precision/LoRA/schedule): train every optimizer group, "
                    "checkpoint, resume, decoded sample grid, export in every format, load, eval; writes "
                    "<output_dir>/<name>-smoke/smoke.json and exits 0 only if every stage passed")
    sp = sub.add_parser("list", help="registered teachers, objectives and metrics")
    sp.set_defaults(func=cmd_list)
    # no argparse `required`/`choices`/`type` here: export_run checks them and reports in one line
    ex = sub.add_parser("export", help="a run's student as a diffusers pipeline folder (see onestep/export/)")
    ex.add_argument("--run", help="the run directory, e.g. runs/demo")
    ex.add_argument("--out", help="the folder to write (absent, empty, or an earlier export, which is replaced)")
    ex.add_argument("--checkpoint", help="step-N (default: the latest checkpoint)")
    ex.add_argument("--format", default="diffusers",
                    help="diffusers (stock pipeline, default), onestep (OneStepPipeline, any step count) or lora")
    ex.add_argument("--steps", default="1", help="the student's number of sampling steps (default 1)")
    ex.add_argument("--weights", default="ema", help="ema (default) or trained (the raw, non-EMA weights)")
    ex.add_argument("--lora-rank", help="--format lora: SVD rank of the weight differences (default: the run's "
                    "student.lora_rank, or 64 for a fully trained student)")
    ex.add_argument("--allow-lora-residual", action="store_true",
                    help="--format lora: export even if the rank-r LoRA leaves a relative residual above 1e-3")
    ex.set_defaults(func=cmd_export)
    add_eval_parsers(sub)  # onestep eval fid|clip|geneval, onestep bench latency
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {_first_line(message, 1000)}\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2): returned, so callers get the code
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    format_warning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.func(args)
    except (InputError, FileNotFoundError) as e:  # bad input, never a bug: one line, exit code 2
        prefix = "config error" if isinstance(e, ConfigError) else "error"
        print(f"{prefix}: {_first_line(e, 2000)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = format_warning


if __name__ == "__main__":
    sys.exit(main())
