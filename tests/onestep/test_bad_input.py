"""Bad input, tried systematically (issue 9, items 4 and 5), and safe loading.

Every case feeds one malformed input and asserts a *clean* error:
  * through the CLI (`onestep.cli.main`, in-process): exit code 2, stderr exactly one line, no
    "Traceback", the line names the offending key / file / value, nothing new in the working folder and
    an existing run directory (the sentinel run, which the bad config points at) byte-identical;
  * from Python (image folders, prompts files, teacher folders): a typed exception (DataError,
    TeacherWeightsError, FileNotFoundError) whose message is one line naming the file.
Table cases are recorded by id in CASES; hypothesis examples in EXAMPLES. The last test prints the
counts and asserts that there are >= 100 distinct table cases and that every one was clean.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import string
import struct
import subprocess
import sys
import typing
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onestep.teachers.digits import DigitsTeacher, TeacherWeightsError, shipped_weights_dir

import onestep.cli as cli
from onestep.cli import main
from onestep.config import DataSection, EvalSection, RunConfig, StudentSection, TrainSection, load_config
from onestep.data import DataError, load_image_folder, load_prompts
from onestep.registry import OBJECTIVES, TEACHERS, load_builtin

REPO = Path(__file__).resolve().parents[2]
CASES: dict[str, bool] = {}      # table case id -> clean error
EXAMPLES: dict[str, bool] = {}   # hypothesis example -> clean error
FEW = settings(max_examples=20, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

load_builtin()


# ------------------------------------------------------------------------------------------------
# helpers


def record(case: str, clean: bool, store: dict = CASES) -> None:
    assert case not in store or store is EXAMPLES, f"duplicate case id {case!r}"
    store[case] = clean


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # main returns codes; an escaping SystemExit is reported like one
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def clean_cli_error(argv, expect: list[str], workspace: Path) -> tuple[bool, str]:
    """Run the CLI on bad input; (clean?, why not). Clean: rc 2, one stderr line naming every `expect`,
    no traceback, nothing printed to stdout, nothing created or changed under `workspace`."""
    before = snapshot(workspace)
    rc, out, err = run_cli(argv)
    problems = []
    if rc != 2:
        problems.append(f"exit code {rc}")
    if err.count("\n") != 1 or not err.endswith("\n"):
        problems.append("stderr is not exactly one line")
    if "Traceback" in err + out:
        problems.append("traceback")
    if out:
        problems.append("stdout not empty")
    problems += [f"{e!r} not named" for e in expect if e not in err]
    after = snapshot(workspace)
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))
        problems.append(f"workspace changed: {[k for k, _ in changed][:4]}")
    return not problems, f"{argv} -> rc={rc}, stderr={err!r}: {'; '.join(problems)}"


def assert_clean_cli(case: str, argv, expect: list[str], workspace: Path, store: dict = CASES) -> None:
    clean, why = clean_cli_error(argv, expect, workspace)
    record(case, clean, store)
    assert clean, why


def assert_clean_exception(case: str, call, exc_type, expect: list[str], store: dict = CASES) -> None:
    """A Python-level case: `call()` raises `exc_type` with a one-line message naming every `expect`."""
    try:
        call()
    except exc_type as e:
        msg = str(e)
        clean = "\n" not in msg and all(x in msg for x in expect)
        record(case, clean, store)
        assert clean, f"{case}: {msg!r} should be one line naming {expect}"
        return
    except Exception as e:
        record(case, False, store)
        raise AssertionError(f"{case}: expected {exc_type.__name__}, got {type(e).__name__}: {e}") from e
    record(case, False, store)
    raise AssertionError(f"{case}: no error raised")


def make_workspace(root: Path) -> tuple[Path, Path]:
    """A working folder holding an existing run (`runs/sentinel`) that bad configs point at."""
    runs = root / "runs"
    sentinel = runs / "sentinel"
    (sentinel / "checkpoints" / "step-000001").mkdir(parents=True)
    (sentinel / "config.yaml").write_text("name: sentinel\n")
    (sentinel / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (sentinel / "checkpoints" / "step-000001" / "ema.safetensors").write_bytes(b"\x00" * 64)
    return root, runs


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """cwd = a fresh working folder (so a default output_dir of `runs` lands there too); training must
    never start for a config case: `start_trainer` fails the test if it is reached."""
    root, runs = make_workspace(tmp_path)
    monkeypatch.chdir(root)
    return root, runs


@pytest.fixture
def no_training(monkeypatch):
    def reached(cfg, resume):
        raise AssertionError(f"a bad config reached training: {cfg.name}")

    monkeypatch.setattr(cli, "start_trainer", reached)


# ------------------------------------------------------------------------------------------------
# configs: generated from the dataclasses


SECTIONS: dict[str, type] = {"student": StudentSection, "data": DataSection, "train": TrainSection,
                             "eval": EvalSection}
TOP_SCALARS = ("name", "output_dir", "seed")


def field_kind(tp) -> str:
    """int / float / bool / str / list[int] / list[float] / list[list[float]] / mapping."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        return field_kind(next(a for a in args if a is not type(None)))
    if origin in (list, typing.List):
        return f"list[{field_kind(args[0])}]"
    if origin in (dict, typing.Dict):
        return "mapping"
    return tp.__name__


def typed_fields() -> list[tuple[str, str, str, dict]]:
    """(case label, dotted key, kind, base YAML) for every typed field of every config dataclass:
    the run's sections, every objective's Config and every teacher's Config."""
    out = []
    hints = typing.get_type_hints(RunConfig)
    for name in TOP_SCALARS + ("teacher", "objective"):
        out.append((name, name, field_kind(hints[name]), {}))
    for section, dc in SECTIONS.items():
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            out.append((f"{section}.{f.name}", f"{section}.{f.name}", field_kind(hints[f.name]), {}))
    for registry, section in ((OBJECTIVES, "objective"), (TEACHERS, "teacher")):
        for entry in registry.names():
            dc = registry.get(entry).Config
            hints = typing.get_type_hints(dc)
            for f in dataclasses.fields(dc):
                out.append((f"{section}[{entry}].{f.name}", f"{section}.{f.name}", field_kind(hints[f.name]),
                            {section: {"name": entry}}))
    return out


TYPED_FIELDS = typed_fields()

#: a deterministic wrong value per kind (a list where a scalar is expected, a word where a number is ...)
WRONG_VALUE = {"int": "many", "float": "fast", "bool": "maybe", "str": [1, 2], "mapping": 7,
               "list[int]": "several", "list[float]": {"a": 1}, "list[str]": {"a": 1},
               "list[list[float]]": [["x", 1.0]]}


def nest(key: str, value, base: dict) -> dict:
    """{"a": {"b": value}} for key "a.b", merged into a copy of base."""
    doc = json.loads(json.dumps(base))
    *parents, leaf = key.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return doc


def write_yaml(folder: Path, doc, name: str = "case.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


COMMANDS = ("distill", "demo", "teacher-train")


def config_argv(i: int, config, overrides=(), runs: Path | None = None) -> list[str]:
    """A config case through one of the three training commands (round robin), aimed at the sentinel run."""
    target = [f"output_dir={runs}", "name=sentinel"] if runs is not None else []
    return [COMMANDS[i % len(COMMANDS)], "--config", str(config), *overrides, *target]


# unknown keys: one per section (and per objective / teacher entry)
UNKNOWN_KEYS = [("top level", [], "colour=red", "unknown key colour")] + [
    (section, [], f"{section}.colour=red", f"unknown key {section}.colour") for section in SECTIONS
] + [
    (f"objective[{o}]", [f"objective.name={o}"], "objective.colour=red", "unknown key objective.colour")
    for o in OBJECTIVES.names()
] + [
    (f"teacher[{t}]", [f"teacher.name={t}"] + (["data.name=gmm", "student.init=scratch", "student.backbone=mlp"]
                                               if t == "gmm" else []),
     "teacher.colour=red", "unknown key teacher.colour")
    for t in TEACHERS.names()
]


@pytest.mark.parametrize("i,case", list(enumerate(UNKNOWN_KEYS)), ids=[c[0] for c in UNKNOWN_KEYS])
def test_unknown_key_in_every_section(i, case, workspace, no_training):
    label, base, bad, expect = case
    root, runs = workspace
    # a file with no objective options: the demo's SplitMeanFlow options are unknown keys to other objectives
    config = write_yaml(root, {"objective": {"name": "splitmeanflow"}})
    assert_clean_cli(f"unknown key: {label}", config_argv(i, config, [*base, bad], runs), [expect, "allowed:"], root)


@pytest.mark.parametrize("i,field", list(enumerate(TYPED_FIELDS)), ids=[f[0] for f in TYPED_FIELDS])
def test_wrong_type_for_every_typed_field(i, field, workspace, no_training):
    label, key, kind, base = field
    root, runs = workspace
    doc = nest(key, WRONG_VALUE[kind], base)
    assert_clean_cli(f"wrong type: {label} ({kind})", config_argv(i, write_yaml(root, doc), runs=runs), [key], root)


# out-of-range values and bad options: (case, overrides, what the line must name)
OUT_OF_RANGE = [
    ("negative steps", ["train.steps=-3"], "train.steps must be >= 1"),
    ("zero steps", ["train.steps=0"], "train.steps must be >= 1"),
    ("zero batch size", ["data.batch_size=0"], "data.batch_size must be >= 1"),
    ("negative batch size", ["data.batch_size=-64"], "data.batch_size must be >= 1"),
    ("zero grad_accum", ["train.grad_accum=0"], "train.grad_accum must be >= 1"),
    ("zero checkpoint_every", ["train.checkpoint_every=0"], "train.checkpoint_every must be >= 1"),
    ("zero keep_checkpoints", ["train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1"),
    ("zero log_every", ["train.log_every=0"], "train.log_every must be >= 1"),
    ("negative warmup", ["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
    ("negative decay", ["train.decay_steps=-5"], "train.decay_steps must be >= 0"),
    ("negative sample_every", ["train.sample_every=-1"], "train.sample_every must be >= 0"),
    ("negative max_nonfinite", ["train.max_nonfinite=-1"], "train.max_nonfinite must be >= 0"),
    ("negative num_threads", ["train.num_threads=-2"], "train.num_threads must be >= 0"),
    ("negative eval samples", ["eval.num_samples=-1"], "eval.num_samples must be >= 0"),
    ("zero eval batch", ["eval.batch_size=0"], "eval.batch_size must be >= 1"),
    ("ema_decay 1", ["train.ema_decay=1.0"], "train.ema_decay must be in [0, 1)"),
    ("ema_decay 1.5", ["train.ema_decay=1.5"], "train.ema_decay must be in [0, 1)"),
    ("ema_decay negative", ["train.ema_decay=-0.1"], "train.ema_decay must be in [0, 1)"),
    ("ema_decay nan", ["train.ema_decay=nan"], "train.ema_decay must be in [0, 1)"),
    ("clip 0", ["train.clip_grad_norm=0"], "train.clip_grad_norm must be > 0"),
    ("clip negative", ["train.clip_grad_norm=-1"], "train.clip_grad_norm must be > 0"),
    ("negative lr", ["train.lr=-0.001"], "train.lr must be a finite number > 0"),
    ("zero lr", ["train.lr=0"], "train.lr must be a finite number > 0"),
    ("infinite lr", ["train.lr=inf"], "train.lr must be a finite number > 0"),
    ("negative weight decay", ["train.weight_decay=-1"], "train.weight_decay must be a finite number >= 0"),
    ("negative seed", ["seed=-1"], "seed must be in [0, 2**32)"),
    ("huge seed", ["seed=99999999999999999999"], "seed must be in [0, 2**32)"),
    ("negative eval seed", ["eval.seed=-7"], "eval.seed must be in [0, 2**32)"),
    ("no sample steps", ["train.sample_steps=[]"], "train.sample_steps must list at least one"),
    ("sample steps 0", ["train.sample_steps=[0]"], "train.sample_steps must list step counts >= 1"),
    ("teacher steps negative", ["eval.teacher_steps=[-1,2]"], "eval.teacher_steps must list step counts >= 1"),
    ("interval_scale 0", ["student.interval_scale=0"], "student.interval_scale must be a finite number > 0"),
    ("interval_scale nan", ["student.interval_scale=nan"], "student.interval_scale must be a finite number > 0"),
    # choices
    ("student.init", ["student.init=random"], "student.init='random' is not allowed; allowed: teacher, scratch"),
    ("student.backbone", ["student.init=scratch", "student.backbone=vit"], "student.backbone='vit' is not allowed"),
    ("data.name", ["data.name=imagenet"], "data.name='imagenet' is not allowed; allowed: digits, gmm"),
    ("mixed precision", ["train.mixed_precision=fp8"], "train.mixed_precision='fp8' is not allowed"),
    ("device", ["train.device=tpu"], "train.device='tpu' is not allowed; allowed: auto, cpu"),
    ("solver", ["eval.solver=rk4"], "eval.solver='rk4' is not allowed; allowed: euler, heun"),
    # SplitMeanFlow
    ("flow_ratio 0.49", ["objective.flow_ratio=0.49"], "objective.flow_ratio must be in [0.5, 1]"),
    ("flow_ratio 0.2", ["objective.flow_ratio=0.2"], "objective.flow_ratio must be in [0.5, 1]"),
    ("flow_ratio 0", ["objective.flow_ratio=0"], "objective.flow_ratio must be in [0.5, 1]"),
    ("flow_ratio negative", ["objective.flow_ratio=-1"], "objective.flow_ratio must be in [0.5, 1]"),
    ("flow_ratio 1.5", ["objective.flow_ratio=1.5"], "objective.flow_ratio must be in [0.5, 1]"),
    ("flow_ratio nan", ["objective.flow_ratio=nan"], "objective.flow_ratio must be in [0.5, 1]"),
    ("splitmeanflow boundary_target", ["objective.boundary_target=noise"], "objective.boundary_target"),
    ("splitmeanflow time_sampler", ["objective.time_sampler=beta"], "objective.time_sampler"),
    ("splitmeanflow anchor_share", ["objective.anchor_share=1.5"], "objective.anchor_share must be in [0, 1]"),
    ("splitmeanflow anchors reversed", ["objective.anchor_intervals=[[1.0,0.0]]"], "objective.anchor_intervals"),
    ("splitmeanflow anchor of 1 number", ["objective.anchor_intervals=[[0.5]]"], "objective.anchor_intervals"),
    ("splitmeanflow negative lr", ["objective.lr=-1"], "objective.lr must be a finite number > 0"),
    # MeanFlow
    ("meanflow velocity", ["objective.name=meanflow", "objective.velocity=noise"], "objective.velocity"),
    ("meanflow jvp", ["objective.name=meanflow", "objective.jvp=triple"], "objective.jvp must be one of"),
    ("meanflow time_sampler", ["objective.name=meanflow", "objective.time_sampler=beta"], "objective.time_sampler"),
    ("meanflow interval_ratio", ["objective.name=meanflow", "objective.interval_ratio=1.5"],
     "objective.interval_ratio"),
    ("meanflow class_dropout", ["objective.name=meanflow", "objective.class_dropout=-0.1"], "objective.class_dropout"),
    ("meanflow adaptive_p", ["objective.name=meanflow", "objective.adaptive_p=-1"], "objective.adaptive_p"),
    ("meanflow adaptive_c", ["objective.name=meanflow", "objective.adaptive_c=0"], "adaptive_c > 0"),
    ("meanflow cfg_interval", ["objective.name=meanflow", "objective.cfg_interval=[0.8,0.2]"],
     "objective.cfg_interval"),
    ("meanflow cfg_omega with teacher", ["objective.name=meanflow", "objective.cfg_omega=2.0"], "objective.cfg_omega"),
    ("meanflow anchor_share", ["objective.name=meanflow", "objective.anchor_share=2"], "objective.anchor_share"),
    ("meanflow negative lr", ["objective.name=meanflow", "objective.lr=-0.1"],
     "objective.lr must be a finite number > 0"),
    ("meanflow one beta", ["objective.name=meanflow", "objective.betas=[0.9]"], "objective.betas"),
    ("meanflow beta 1", ["objective.name=meanflow", "objective.betas=[0.9,1.0]"], "objective.betas"),
    ("meanflow anchors", ["objective.name=meanflow", "objective.anchor_share=0.5", "objective.anchor_intervals=[]"],
     "objective.anchor_intervals"),
    # flow matching
    ("flow_matching target", ["objective.name=flow_matching", "objective.target=noise"], "objective.target"),
    ("flow_matching time_sampler", ["objective.name=flow_matching", "objective.time_sampler=beta"],
     "objective.time_sampler"),
    # the GMM teacher
    ("gmm means without stds", ["teacher.name=gmm", "teacher.means=[[0,0],[1,1]]"], "teacher.stds is required"),
    ("gmm ragged means", ["teacher.name=gmm", "teacher.means=[[0,0],[1]]", "teacher.stds=[1]"], "teacher.means"),
    ("gmm zero std", ["teacher.name=gmm", "teacher.means=[[0,0]]", "teacher.stds=[0]"], "teacher.stds"),
    ("gmm weights count", ["teacher.name=gmm", "teacher.means=[[0,0]]", "teacher.stds=[1]", "teacher.weights=[1,2]"],
     "teacher.weights"),
    ("gmm stds without means", ["teacher.name=gmm", "teacher.stds=[1]"], "teacher.stds needs teacher.means"),
    # combinations
    ("gmm data without gmm teacher", ["data.name=gmm"], "data.name=gmm draws from the teacher's mixture"),
    ("teacher init without teacher", ["teacher.name=none", "objective.boundary_target=data"],
     "student.init=teacher needs a teacher"),
    ("boundary target without teacher", ["teacher.name=none", "student.init=scratch"],
     "objective.boundary_target=teacher needs a teacher"),
    ("mlp on digits", ["student.init=scratch", "student.backbone=mlp"], "student.backbone=mlp works on vector data"),
]


@pytest.mark.parametrize("i,case", list(enumerate(OUT_OF_RANGE)), ids=[c[0] for c in OUT_OF_RANGE])
def test_out_of_range_values_and_bad_options(i, case, workspace, no_training):
    label, overrides, expect = case
    root, runs = workspace
    # each objective's own recipe (the demo's SplitMeanFlow options are unknown keys to the others)
    config = {"objective.name=meanflow": "digits_meanflow", "objective.name=flow_matching": "digits_teacher"}.get(
        overrides[0], "demo")
    assert_clean_cli(f"out of range: {label}", config_argv(i, config, overrides, runs), [expect], root)


UNKNOWN_NAMES = [
    ("unknown objective", ["objective.name=consistency"],
     ["objective.name: unknown objective 'consistency'",
      "allowed: fdistill, flow_matching, ladd, lightning, meanflow"]),
    ("unknown teacher", ["teacher.name=sdxxl"], ["teacher.name: unknown teacher 'sdxxl'", "allowed: digits, edm"]),
    ("empty objective name", ["objective.name="], ["objective.name"]),
    ("objective name is a list", ["objective.name=[a,b]"], ["objective.name must be a name", "allowed:"]),
    ("teacher name is a list", ["teacher.name=[digits]"], ["teacher.name must be a name", "allowed:"]),
    ("teacher name is a number", ["teacher.name=3"], ["teacher.name must be a name, got int 3"]),
]


@pytest.mark.parametrize("i,case", list(enumerate(UNKNOWN_NAMES)), ids=[c[0] for c in UNKNOWN_NAMES])
def test_unknown_objective_or_teacher(i, case, workspace, no_training):
    label, overrides, expect = case
    root, runs = workspace
    assert_clean_cli(f"unknown name: {label}", config_argv(i, "demo", overrides, runs), expect, root)


MALFORMED_FILES = [
    ("YAML syntax error", "train: {steps: 3\n", ["case.yaml", "YAML error at line 2"]),
    ("tab indentation", "train:\n\tsteps: 3\n", ["case.yaml", "YAML error", "tab"]),
    ("duplicate key", "name: a\nname: b\n", ["case.yaml", "duplicate key name"]),
    ("python tag (code execution attempt)", "name: !!python/object/apply:os.system ['echo pwned']\n",
     ["case.yaml", "could not determine a constructor"]),
    ("top level is a list", "- train\n- steps\n", ["case.yaml", "top level must be a mapping", "list"]),
    ("top level is a number", "42\n", ["case.yaml", "top level must be a mapping"]),
    ("top level is a string", "hello\n", ["case.yaml", "top level must be a mapping"]),
    ("list where a mapping is expected", "train: [1, 2]\n", ["train must be a mapping", "list"]),
    ("number where a mapping is expected", "student: 3\n", ["student must be a mapping"]),
    ("teacher: digits (a name, not a mapping)", "teacher: digits\n", ["teacher must be a mapping", "{name: digits}"]),
    ("objective: null", "objective: null\n", ["objective must be a mapping", "null"]),
    ("interpolation to a missing key", "train:\n  steps: ${nope}\n", ["train.steps", "nope"]),
    ("interpolation of the wrong type", "seed: ${name}\n", ["seed"]),
    ("unknown key in a file", "train:\n  stepz: 3\n", ["unknown key train.stepz", "allowed:"]),
]


@pytest.mark.parametrize("i,case", list(enumerate(MALFORMED_FILES)), ids=[c[0] for c in MALFORMED_FILES])
def test_malformed_yaml(i, case, workspace, no_training):
    label, text, expect = case
    root, runs = workspace
    assert_clean_cli(f"malformed YAML: {label}", config_argv(i, write_yaml(root, text), runs=runs), expect, root)


def test_unreadable_config_files(workspace, no_training):
    root, runs = workspace
    latin = root / "latin.yaml"
    latin.write_bytes("name: café\n".encode("latin-1"))
    utf16 = root / "utf16.yaml"
    utf16.write_bytes("name: x\n".encode("utf-16"))
    binary = root / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    folder = root / "a_folder.yaml"
    folder.mkdir()
    cases = {
        "not UTF-8 (latin-1)": (latin, ["latin.yaml is not UTF-8", "byte 0xe9 at offset 9"]),
        "UTF-16": (utf16, ["utf16.yaml is not UTF-8", "offset 0"]),
        "binary junk": (binary, ["binary.yaml is not UTF-8"]),
        "does not exist": (root / "nope.yaml", ["config", "nope.yaml", "not found", "demo"]),
        "a folder": (folder, ["a_folder.yaml", "not found"]),
    }
    for i, (label, (path, expect)) in enumerate(cases.items()):
        assert_clean_cli(f"config file: {label}", config_argv(i, path, runs=runs), expect, root)


OVERRIDES = [
    ("no =", ["train.steps"], ["override 'train.steps' is not key=value"]),
    ("bare word", ["fast"], ["override 'fast' is not key=value"]),
    ("empty key", ["=3"], ["override '=3'", "is not a key like train.steps"]),
    ("double dot", ["train..steps=3"], ["train..steps"]),
    ("trailing dot", ["train.=3"], ["'train.'"]),
    ("key with a space", ["train.st eps=3"], ["train.st eps"]),
    ("empty value for an int", ["train.steps="], ["train.steps"]),
    ("unclosed list", ["train.sample_steps=[1,2"], ["train.sample_steps"]),
]


@pytest.mark.parametrize("i,case", list(enumerate(OVERRIDES)), ids=[c[0] for c in OVERRIDES])
def test_bad_overrides(i, case, workspace, no_training):
    label, overrides, expect = case
    root, runs = workspace
    assert_clean_cli(f"override: {label}", config_argv(i, "demo", overrides, runs), expect, root)


# ------------------------------------------------------------------------------------------------
# configs: hypothesis


IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
#: words omegaconf or YAML would read as a bool, null, or number
SPECIAL_WORDS = {"y", "yes", "n", "no", "on", "off", "true", "false", "null", "none", "nan", "inf", "infinity"}
WORD = st.text(string.ascii_letters, min_size=1, max_size=8).filter(lambda w: w.lower() not in SPECIAL_WORDS)


def allowed_keys(section: str, entry: str | None) -> set[str]:
    if section == "":
        return {f.name for f in dataclasses.fields(RunConfig)}
    if section in SECTIONS:
        return {f.name for f in dataclasses.fields(SECTIONS[section])}
    registry = OBJECTIVES if section == "objective" else TEACHERS
    return {f.name for f in dataclasses.fields(registry.get(entry).Config)} | {"name"}


@pytest.fixture(scope="module")
def hyp_workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("hypothesis"))


@FEW
@given(section=st.sampled_from(["", "student", "data", "train", "eval", "objective", "teacher"]), key=IDENT,
       value=st.one_of(st.integers(), WORD))
def test_random_unknown_keys(section, key, value, hyp_workspace, no_training):
    root, runs = hyp_workspace
    entry = {"objective": "splitmeanflow", "teacher": "digits"}.get(section)
    if key in allowed_keys(section, entry):
        return
    dotted = f"{section}.{key}" if section else key
    assert_clean_cli(f"unknown key {dotted}={value!r}", ["distill", "--config", "demo", f"{dotted}={value}",
                                                          f"output_dir={runs}", "name=sentinel"],
                     [f"unknown key {dotted};", "allowed:"], root, EXAMPLES)


def wrong_values(kind: str):
    """Values of another type than `kind` (never one omegaconf would convert to it)."""
    lists = st.lists(st.one_of(WORD, st.integers()), min_size=1, max_size=3)
    mappings = st.dictionaries(IDENT, st.integers(), min_size=1, max_size=2)
    non_integral = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    return {
        "int": st.one_of(WORD, non_integral, lists, mappings, st.booleans()),
        "float": st.one_of(WORD, lists, mappings, st.booleans()),
        "bool": st.one_of(WORD, lists, mappings),
        "str": st.one_of(lists, mappings),
        "mapping": st.one_of(WORD, st.integers(), lists),
        "list[int]": st.one_of(WORD, mappings, st.lists(WORD, min_size=1, max_size=3)),
        "list[float]": st.one_of(WORD, mappings, st.lists(WORD, min_size=1, max_size=3)),
        "list[str]": st.one_of(WORD, mappings),
        "list[list[float]]": st.one_of(WORD, mappings, st.lists(st.lists(WORD, min_size=1, max_size=2), min_size=1,
                                                                max_size=2)),
    }[kind]


@FEW
@given(data=st.data(), field=st.sampled_from(TYPED_FIELDS))
def test_random_wrong_typed_values(data, field, hyp_workspace, no_training):
    root, runs = hyp_workspace
    label, key, kind, base = field
    value = data.draw(wrong_values(kind), label="value")
    path = write_yaml(root, nest(key, value, base), "hyp.yaml")
    try:
        assert_clean_cli(f"{label}={value!r}", ["distill", "--config", path, f"output_dir={runs}", "name=sentinel"],
                         [key.split(".")[0]], root, EXAMPLES)
    finally:
        path.unlink()


AT_LEAST = {"data.batch_size": 1, "train.steps": 1, "train.grad_accum": 1, "train.checkpoint_every": 1,
            "train.keep_checkpoints": 1, "train.log_every": 1, "train.warmup_steps": 0, "train.decay_steps": 0,
            "train.sample_every": 0, "train.max_nonfinite": 0, "train.num_threads": 0, "eval.num_samples": 0,
            "eval.batch_size": 1}


@FEW
@given(key=st.sampled_from(sorted(AT_LEAST)), data=st.data())
def test_random_out_of_range_counts(key, data, hyp_workspace, no_training):
    root, runs = hyp_workspace
    value = data.draw(st.integers(max_value=AT_LEAST[key] - 1, min_value=-10**12), label="value")
    assert_clean_cli(f"{key}={value}", ["distill", "--config", "demo", f"{key}={value}", f"output_dir={runs}",
                                        "name=sentinel"], [f"{key} must be >= {AT_LEAST[key]}, got {value}"],
                     root, EXAMPLES)


@FEW
@given(key=st.sampled_from(["train.ema_decay", "objective.flow_ratio"]), value=st.floats())
def test_random_out_of_range_fractions(key, value, hyp_workspace, no_training):
    inside = 0 <= value < 1 if key == "train.ema_decay" else 0.5 <= value <= 1
    if inside:
        return
    root, runs = hyp_workspace
    assert_clean_cli(f"{key}={value!r}", ["distill", "--config", "demo", f"{key}={value!r}", f"output_dir={runs}",
                                          "name=sentinel"], [f"{key} must be in"], root, EXAMPLES)


# ------------------------------------------------------------------------------------------------
# teacher weights


def teacher_copy(root: Path, name: str) -> Path:
    folder = root / name
    shutil.copytree(shipped_weights_dir(), folder)
    return folder


WEIGHTS = "diffusion_pytorch_model.safetensors"


def break_teacher(folder: Path, how: str) -> None:
    cfg, weights = folder / "config.json", folder / WEIGHTS
    if how == "missing config.json":
        cfg.unlink()
    elif how == "missing weights":
        weights.unlink()
    elif how == "config.json not JSON":
        cfg.write_text("{sample_size: 16,")
    elif how == "config.json latin-1":
        cfg.write_bytes(b'{"_class_name": "UNet2DModel", "note": "caf\xe9"}')
    elif how == "config.json a list":
        cfg.write_text("[16, 1, 1]")
    elif how == "config.json empty":
        cfg.write_text("")
    elif how == "config.json another architecture":
        c = json.loads(cfg.read_text())
        c["block_out_channels"] = [16, 32, 32]
        cfg.write_text(json.dumps(c))
    elif how == "weights truncated header":
        weights.write_bytes(weights.read_bytes()[:5])
    elif how == "weights truncated data":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif how == "weights garbage":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "weights empty":
        weights.write_bytes(b"")
    elif how == "weights of another model":
        from safetensors.torch import save_file

        save_file({"not.a.unet": torch.zeros(3)}, weights)
    elif how == "weights missing a tensor":
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        del state["conv_out.bias"]
        save_file(state, weights)
    elif how == "weights are a folder":
        weights.unlink()
        weights.mkdir()
    elif how == "onestep.json not JSON":
        (folder / "onestep.json").write_text('{"time_scale": ')
    elif how == "onestep.json time scale 0":
        (folder / "onestep.json").write_text('{"time_scale": 0}')
    else:
        raise ValueError(how)


TEACHER_BREAKS = {
    "missing config.json": (FileNotFoundError, ["config.json", "teacher.path"]),
    "missing weights": (FileNotFoundError, [WEIGHTS, "teacher.path"]),
    "config.json not JSON": (TeacherWeightsError, ["config.json is not valid JSON", "line 1"]),
    "config.json latin-1": (TeacherWeightsError, ["config.json is not UTF-8", "0xe9"]),
    "config.json a list": (TeacherWeightsError, ["config.json must hold a JSON object"]),
    "config.json empty": (TeacherWeightsError, ["config.json is not valid JSON"]),
    "config.json another architecture": (TeacherWeightsError, ["cannot be loaded", "expected shape", "teacher.path"]),
    "weights truncated header": (TeacherWeightsError, [WEIGHTS, "not a readable safetensors file"]),
    "weights truncated data": (TeacherWeightsError, [WEIGHTS, "not a readable safetensors file"]),
    "weights garbage": (TeacherWeightsError, [WEIGHTS, "not a readable safetensors file"]),
    "weights empty": (TeacherWeightsError, [WEIGHTS, "not a readable safetensors file"]),
    "weights of another model": (TeacherWeightsError, [WEIGHTS, "does not hold the weights config.json describes"]),
    "weights are a folder": (FileNotFoundError, [WEIGHTS]),
    "weights missing a tensor": (TeacherWeightsError, [WEIGHTS, "1 missing", "conv_out.bias"]),
    "onestep.json not JSON": (TeacherWeightsError, ["onestep.json", "time_scale", "teacher.path"]),
    "onestep.json time scale 0": (TeacherWeightsError, ["onestep.json", "finite number > 0", "teacher.path"]),
}


@pytest.mark.parametrize("how", list(TEACHER_BREAKS))
def test_corrupt_teacher_folder_python(how, tmp_path):
    folder = teacher_copy(tmp_path, "teacher")
    break_teacher(folder, how)
    exc, expect = TEACHER_BREAKS[how]
    assert_clean_exception(f"teacher folder (Python): {how}", lambda: DigitsTeacher.from_pretrained(folder), exc,
                           [str(folder), *expect])


@pytest.mark.parametrize("i,how", list(enumerate(TEACHER_BREAKS)))
def test_corrupt_teacher_folder_cli(i, how, workspace):
    """Through `onestep distill`/`demo` (the real trainer start): one line, exit 2, the sentinel run untouched."""
    root, runs = workspace
    folder = teacher_copy(root, "teacher")
    break_teacher(folder, how)
    argv = [("distill", "demo")[i % 2], "--config", "demo", f"teacher.path={folder}", "train.steps=1",
            "data.batch_size=2", f"output_dir={runs}", "name=sentinel"]
    assert_clean_cli(f"teacher folder (CLI): {how}", argv, [str(folder), TEACHER_BREAKS[how][1][0]], root)


def test_missing_teacher_folder(workspace):
    root, runs = workspace
    argv = ["distill", "--config", "demo", f"teacher.path={root / 'no_teacher'}", f"output_dir={runs}", "name=sentinel"]
    assert_clean_cli("teacher folder (CLI): missing folder", argv, ["no_teacher", "config.json", "teacher.path"], root)


@pytest.fixture(scope="module")
def fuzz_teacher(tmp_path_factory):
    return teacher_copy(tmp_path_factory.mktemp("fuzz_teacher"), "teacher")


@FEW
@given(blob=st.binary(max_size=2048), target=st.sampled_from([WEIGHTS, "config.json"]))
def test_random_bytes_as_teacher_files(blob, target, fuzz_teacher):
    original = (fuzz_teacher / target).read_bytes()
    (fuzz_teacher / target).write_bytes(blob)
    try:
        assert_clean_exception(f"{target}={blob[:40]!r}", lambda: DigitsTeacher.from_pretrained(fuzz_teacher),
                               TeacherWeightsError, [str(fuzz_teacher)], EXAMPLES)
    finally:
        (fuzz_teacher / target).write_bytes(original)


# ------------------------------------------------------------------------------------------------
# checkpoints, and safe loading (issue 9, item 5)


class CreatesMarker:
    """Unpickled with full pickle, this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path, how: str) -> None:
    if how == "torch.save":  # a zip-format .pt, as torch.save writes: the realistic attack
        torch.save({"state": CreatesMarker(marker)}, path)
    else:  # a raw protocol-2 pickle
        path.write_bytes(pickle.dumps(CreatesMarker(marker), protocol=2))


def test_the_malicious_pickle_works_when_unpickled(tmp_path):
    """The payload is real: full unpickling creates the marker (so its absence below means refusal)."""
    marker = tmp_path / "marker"
    write_malicious(tmp_path / "evil.pt", marker, "pickle")
    pickle.loads((tmp_path / "evil.pt").read_bytes())
    assert marker.exists()


GMM_RUN = ["teacher.name=gmm", "student.init=scratch", "student.backbone=mlp", "data.name=gmm", "data.batch_size=8",
           "train.steps=2", "train.checkpoint_every=1", "train.progress=false", "train.log_every=1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-step GMM run (checkpoints step-000001 and step-000002)."""
    from onestep.trainer import Trainer

    root = tmp_path_factory.mktemp("trained")
    Trainer(load_config(None, [f"output_dir={root}", "name=run", *GMM_RUN])).fit()
    return root / "run"


def copy_run(trained_run: Path, root: Path) -> tuple[Path, Path]:
    runs = root / "runs"
    shutil.copytree(trained_run, runs / "run")
    return runs, runs / "run" / "checkpoints" / "step-000002"


def resume_argv(runs: Path) -> list[str]:
    return ["distill", "--config", runs / "run" / "config.yaml", f"output_dir={runs}", "name=run"]


@pytest.mark.parametrize("file,how", [("optim-student.pt", "torch.save"), ("optim-student.pt", "pickle")])
def test_malicious_pickle_in_a_checkpoint_is_refused(file, how, trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, ckpt = copy_run(trained_run, tmp_path)
    marker = tmp_path / "marker"
    write_malicious(ckpt / file, marker, how)
    from onestep.checkpoint import checkpoint_problem, write_checksums

    write_checksums(ckpt)  # so the checksum check passes and the pickle really reaches torch.load
    assert checkpoint_problem(ckpt) is None
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt / file, weights_only=True)
    assert_clean_cli(f"checkpoint: malicious {file} ({how})", resume_argv(runs),
                     [f"refused to load {ckpt / file}", "weights_only=True", "--no-resume"], tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["trainable.safetensors garbage", "state.json not JSON",
                                 "ema.safetensors of another model"])
def test_unloadable_checkpoint_with_valid_checksums(how, trained_run, tmp_path, monkeypatch):
    """Altered and re-checksummed (so only loading can tell): resume refuses in one line, run untouched."""
    monkeypatch.chdir(tmp_path)
    runs, ckpt = copy_run(trained_run, tmp_path)
    from onestep.checkpoint import write_checksums

    if how == "trainable.safetensors garbage":
        (ckpt / "trainable.safetensors").write_bytes(b"\xff" * 100)
    elif how == "state.json not JSON":
        (ckpt / "state.json").write_text("{step: 2")
    else:
        from safetensors.torch import save_file

        save_file({"other.weight": torch.zeros(2)}, ckpt / "ema.safetensors")
    write_checksums(ckpt)
    assert_clean_cli(f"checkpoint: {how}", resume_argv(runs), ["cannot resume from", str(ckpt), "--no-resume"],
                     tmp_path)


def test_existing_run_of_another_model_is_not_resumed(trained_run, tmp_path, monkeypatch):
    """`name=` points at a run whose checkpoints hold a different model (3-D data, not 2-D): refused, untouched."""
    monkeypatch.chdir(tmp_path)
    runs, ckpt = copy_run(trained_run, tmp_path)
    argv = ["distill", "--config", runs / "run" / "config.yaml", f"output_dir={runs}", "name=run",
            "teacher.means=[[0,0,0],[1,1,1]]", "teacher.stds=[0.5]"]
    assert_clean_cli("checkpoint: of another model", argv, ["cannot resume from", str(ckpt), "size mismatch"], tmp_path)


def test_checkpoint_of_a_differently_configured_run_is_not_skipped(trained_run, tmp_path, monkeypatch):
    """A complete checkpoint without a file this run needs (as a 4-step-only Lightning checkpoint resumed as a
    4 -> 1 run lacks optim-disc.pt) is refused in one line naming the file: not skipped as corrupt (which
    would restart from step 0), nothing renamed."""
    monkeypatch.chdir(tmp_path)
    runs, ckpt = copy_run(trained_run, tmp_path)
    from onestep.checkpoint import checkpoint_problem, write_checksums

    for step in ckpt.parent.iterdir():  # both checkpoints, so that skipping the newest would find no other
        (step / "optim-student.pt").unlink()
        write_checksums(step)
        assert checkpoint_problem(step) is None
    assert_clean_cli("checkpoint: complete, written by a run configured otherwise", resume_argv(runs),
                     ["cannot resume from", str(ckpt), "holds no optim-student.pt", "--no-resume"], tmp_path)


def test_export_of_a_run_whose_teacher_folder_is_corrupt(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, _ = copy_run(trained_run, tmp_path)
    teacher = teacher_copy(tmp_path, "teacher")
    break_teacher(teacher, "config.json not JSON")
    # the run's config now names a digits teacher (its checkpoint is never reached: the teacher comes first)
    cfg = load_config("demo", [f"teacher.path={teacher}", "name=run", f"output_dir={runs}"])
    from onestep.config import to_yaml

    (runs / "run" / "config.yaml").write_text(to_yaml(cfg))
    assert_clean_cli("export: the run's teacher folder is corrupt", ["export", "--run", runs / "run", "--out",
                                                                    tmp_path / "out"],
                     [str(teacher / "config.json"), "not valid JSON"], tmp_path)


def test_corrupt_checkpoint_refused_by_export(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, ckpt = copy_run(trained_run, tmp_path)
    ema = ckpt / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-10])  # truncated after its checksum was written
    assert_clean_cli("checkpoint: truncated, exported", ["export", "--run", runs / "run", "--out", tmp_path / "out"],
                     ["ema.safetensors does not match its checksum"], tmp_path)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.pt"])
def test_pickled_teacher_weights_are_never_loaded(name, tmp_path):
    marker = tmp_path / "marker"
    only_pickle = teacher_copy(tmp_path, "only_pickle")
    (only_pickle / WEIGHTS).unlink()
    write_malicious(only_pickle / name, marker, "torch.save")
    assert_clean_exception(f"teacher folder: only a malicious {name}",
                           lambda: DigitsTeacher.from_pretrained(only_pickle),
                           FileNotFoundError, [WEIGHTS, name, "never loads"])
    beside = teacher_copy(tmp_path, "beside")
    write_malicious(beside / name, marker, "torch.save")
    DigitsTeacher.from_pretrained(beside)  # the safetensors file is what is loaded
    assert not marker.exists()


PACKAGE_DIRS = ("onestep", "teachers", "objectives", "evaluation")


def package_calls():
    for folder in PACKAGE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path, node


def call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return getattr(f, "id", getattr(f, "attr", ""))


def test_only_safe_loaders_in_the_package():
    """Every torch.load passes weights_only=True; no pickle/unsafe-yaml loading; trust_remote_code and
    use_safetensors=False are never passed as constants (only a user's own value may reach them)."""
    problems, torch_loads = [], 0
    for path, node in package_calls():
        name, where = call_name(node), f"{path.relative_to(REPO)}:{node.lineno}"
        kw = {k.arg: k.value for k in node.keywords}
        if name == "torch.load":
            torch_loads += 1
            value = kw.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "dill.load"):
            problems.append(f"{where}: {name}")
        value = kw.get("allow_pickle")
        if name == "np.load" and isinstance(value, ast.Constant) and value.value:
            problems.append(f"{where}: np.load(allow_pickle=True)")
        value = kw.get("trust_remote_code")
        if isinstance(value, ast.Constant) and value.value is not False:
            problems.append(f"{where}: trust_remote_code={value.value!r}")
        value = kw.get("use_safetensors")
        if isinstance(value, ast.Constant) and value.value is False:
            problems.append(f"{where}: use_safetensors=False")
    for folder in PACKAGE_DIRS:  # no function defaults to trusting remote code either
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    args = node.args.args[-len(node.args.defaults):] if node.args.defaults else []
                    pairs = list(zip(args, node.args.defaults)) + list(zip(node.args.kwonlyargs, node.args.kw_defaults))
                    for arg, default in pairs:
                        if arg.arg == "trust_remote_code" and isinstance(default, ast.Constant) and default.value:
                            problems.append(f"{path.relative_to(REPO)}:{node.lineno}: "
                                            "trust_remote_code defaults to True")
    assert torch_loads >= 1  # the checker sees the trainer's loads
    assert not problems, problems


# ------------------------------------------------------------------------------------------------
# image folders


def png_bytes(width: int, height: int, grey: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), grey).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = root / name
    folder.mkdir()
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    return folder


def corrupt_png_data() -> bytes:
    """A PNG whose IDAT chunk holds bytes that are not zlib data (with a correct CRC)."""
    good = png_bytes(8, 8)
    idat = good.index(b"IDAT") - 4
    length = struct.unpack(">I", good[idat:idat + 4])[0]
    junk = b"\x00" * length
    chunk = struct.pack(">I", length) + b"IDAT" + junk + struct.pack(">I", zlib.crc32(b"IDAT" + junk) & 0xFFFFFFFF)
    return good[:idat] + chunk + good[idat + 12 + length:]


IMAGE_CASES = {
    "a text file among images": ({"a.png": png_bytes(8, 8), "notes.txt": b"not an image"}, {},
                                 ["notes.txt", "not an image"]),
    "a text file named .png": ({"a.png": png_bytes(8, 8), "b.png": b"hello"}, {}, ["b.png", "not an image"]),
    "an empty .png": ({"a.png": b"", "b.png": png_bytes(8, 8)}, {}, ["a.png", "not an image"]),
    "a truncated PNG": ({"a.png": png_bytes(8, 8), "b.png": png_bytes(32, 32, 7)[:60]}, {},
                        ["b.png", "unreadable image"]),
    "a PNG with corrupt pixel data": ({"a.png": corrupt_png_data()}, {}, ["a.png", "unreadable image"]),
    "random bytes as .jpg": ({"x.jpg": np.random.default_rng(1).bytes(300)}, {}, ["x.jpg", "not an image"]),
    "mixed sizes": ({"a.png": png_bytes(8, 8), "b.png": png_bytes(8, 8), "c.png": png_bytes(16, 12)}, {},
                    ["images differ in size", "a.png is 8x8", "c.png is 16x12", "size="]),
    "an empty folder": ({}, {}, ["holds no images"]),
    "only hidden files": ({".DS_Store": b"\x00\x01"}, {}, ["holds no images"]),
    "bad mode": ({"a.png": png_bytes(8, 8)}, {"mode": "CMYK"}, ["image mode must be one of L, RGB", "'CMYK'"]),
    "size 0": ({"a.png": png_bytes(8, 8)}, {"size": 0}, ["image size must be", "0"]),
    "negative size": ({"a.png": png_bytes(8, 8)}, {"size": (-1, 4)}, ["image size must be", "(-1, 4)"]),
    "size as text": ({"a.png": png_bytes(8, 8)}, {"size": "16"}, ["image size must be", "'16'"]),
    "size of three numbers": ({"a.png": png_bytes(8, 8)}, {"size": (4, 4, 4)}, ["image size must be"]),
}


@pytest.mark.parametrize("label", list(IMAGE_CASES))
def test_bad_image_folders(label, tmp_path):
    files, kwargs, expect = IMAGE_CASES[label]
    folder = image_folder(tmp_path, "images", files)
    assert_clean_exception(f"image folder: {label}", lambda: load_image_folder(folder, **kwargs), DataError, expect)


def test_image_folder_paths(tmp_path):
    (tmp_path / "only_dirs" / "cats").mkdir(parents=True)
    (tmp_path / "a_file.png").write_bytes(png_bytes(4, 4))
    assert_clean_exception("image folder: missing", lambda: load_image_folder(tmp_path / "nope"), DataError,
                           ["nope", "not found"])
    assert_clean_exception("image folder: a file", lambda: load_image_folder(tmp_path / "a_file.png"), DataError,
                           ["a_file.png is not a folder"])
    assert_clean_exception("image folder: only subfolders", lambda: load_image_folder(tmp_path / "only_dirs"),
                           DataError, ["holds no images", "subfolders: cats"])


def test_image_folder_loads_sorted_and_resizes(tmp_path):
    from PIL import Image

    folder = image_folder(tmp_path, "ok", {"b.png": png_bytes(8, 8, 200), "a.png": png_bytes(8, 8, 10),
                                           ".hidden": b"x"})
    (folder / "sub").mkdir()
    x = load_image_folder(folder)
    assert x.dtype == torch.uint8 and x.shape == (2, 1, 8, 8)
    assert x[0].max() == 10 and x[1].min() == 200  # sorted by name: a.png first
    Image.new("RGB", (12, 6), (255, 0, 0)).save(folder / "c.png")
    y = load_image_folder(folder, size=(4, 5), mode="RGB")
    assert y.shape == (3, 3, 4, 5) and y[2, 0].min() == 255 and y[2, 1].max() == 0
    assert load_image_folder(folder, size=4).shape == (3, 1, 4, 4)


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_images")
    (folder / "a.png").write_bytes(png_bytes(8, 8))
    return folder


@FEW
@given(blob=st.binary(max_size=512), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".gif", ""]))
def test_random_bytes_as_images(blob, suffix, fuzz_folder):
    target = fuzz_folder / f"b{suffix}"
    target.write_bytes(blob)
    try:
        try:
            images = load_image_folder(fuzz_folder)
        except DataError as e:
            clean = "\n" not in str(e) and target.name in str(e)
        else:  # random bytes that happen to decode: a well-formed result is fine
            clean = images.dtype == torch.uint8 and images.ndim == 4
        record(f"image {target.name}={blob[:40]!r}", clean, EXAMPLES)
        assert clean
    finally:
        target.unlink()


# ------------------------------------------------------------------------------------------------
# prompts files


PROMPT_CASES = {
    "latin-1 bytes": ("prompts.txt", "a cat\nun café noir\n".encode("latin-1"),
                      ["prompts.txt is not UTF-8", "byte 0xe9 at offset 12", "line 2"]),
    "UTF-16 with BOM": ("prompts.txt", "a cat\n".encode("utf-16"), ["not UTF-8", "byte 0xff at offset 0"]),
    "cut inside a UTF-8 character": ("prompts.txt", "a cat\ncaf".encode() + b"\xc3",
                                     ["not UTF-8", "offset 9", "line 2"]),
    "NUL bytes (UTF-16 without BOM)": ("prompts.txt", "a cat\n".encode("utf-16-le"), ["NUL byte at offset 1"]),
    "empty file": ("prompts.txt", b"", ["holds no prompts"]),
    "only comments and blank lines": ("prompts.txt", b"# header\n\n   \n  # more\n", ["holds no prompts"]),
    "jsonl: a line that is not JSON": ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{prompt: c}\n',
                                       ["p.jsonl, line 3", "not valid JSON"]),
    "jsonl: a line that is a list": ("p.jsonl", b'{"prompt": "a"}\n["b"]\n', ["p.jsonl, line 2", '"prompt"']),
    "jsonl: no prompt key": ("p.jsonl", b'{"text": "a"}\n', ["p.jsonl, line 1", '"prompt"']),
    "jsonl: prompt is a number": ("p.jsonl", b'\n{"prompt": 3}\n', ["p.jsonl, line 2", '"prompt"']),
    "jsonl: latin-1": ("p.jsonl", '{"prompt": "café"}\n'.encode("latin-1"), ["p.jsonl is not UTF-8", "line 1"]),
    "jsonl: only blank lines": ("p.jsonl", b"\n\n", ["holds no prompts"]),
}


@pytest.mark.parametrize("label", list(PROMPT_CASES))
def test_bad_prompts_files(label, tmp_path):
    name, data, expect = PROMPT_CASES[label]
    (tmp_path / name).write_bytes(data)
    assert_clean_exception(f"prompts: {label}", lambda: load_prompts(tmp_path / name), DataError, expect)


def test_prompts_paths_and_good_files(tmp_path):
    assert_clean_exception("prompts: missing file", lambda: load_prompts(tmp_path / "nope.txt"), DataError,
                           ["nope.txt not found"])
    assert_clean_exception("prompts: a folder", lambda: load_prompts(tmp_path), DataError, ["is not a file"])
    (tmp_path / "p.txt").write_bytes("\ufeff# prompts\r\na red fox\r\n\r\n  café at night  \n#skip\n".encode())
    assert load_prompts(tmp_path / "p.txt") == ["a red fox", "café at night"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a #1 cat"}\n\n{"prompt": "", "seed": 3}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["a #1 cat", ""]


@FEW
@given(blob=st.binary(max_size=256), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_random_bytes_as_prompts(blob, suffix, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / f"fuzz_prompts{suffix}"
    path.write_bytes(blob)
    try:
        prompts = load_prompts(path)
    except DataError as e:
        clean = "\n" not in str(e) and str(path) in str(e)
    else:
        clean = bool(prompts) and all(isinstance(p, str) and "\n" not in p for p in prompts)
    record(f"prompts{suffix}={blob[:40]!r}", clean, EXAMPLES)
    assert clean


# ------------------------------------------------------------------------------------------------
# command-line arguments


def cli_arg_cases(root: Path, trained: Path) -> dict[str, tuple[list, list[str]]]:
    out = root / "out"
    a_file = root / "a_file"
    a_file.write_text("x")
    run = str(trained)
    return {
        "no command": ([], ["onestep: error:", "required: command"]),
        "unknown command": (["train"], ["invalid choice: 'train'", "distill"]),
        "unknown top-level flag": (["--fast", "list"], ["unrecognized arguments: --fast"]),
        "unknown distill flag": (["distill", "--config", "demo", "--gpus", "8"], ["unrecognized arguments: --gpus"]),
        "distill without --config": (["distill", "train.steps=5"], ["onestep distill needs --config"]),
        "--config without a value": (["demo", "--config"], ["--config: expected one argument"]),
        "flag given a value": (["demo", "--no-resume=yes"], ["--no-resume", "ignored explicit argument"]),
        "list with an argument": (["list", "all"], ["unrecognized arguments: all"]),
        "export --steps 0": (["export", "--run", run, "--out", out, "--steps", "0"],
                             ["steps must be an integer >= 1", "0"]),
        "export --steps -3": (["export", "--run", run, "--out", out, "--steps", "-3"],
                              ["steps must be an integer >= 1", "-3"]),
        "export --steps two": (["export", "--run", run, "--out", out, "--steps", "two"],
                               ["--steps must be an integer", "'two'"]),
        "export --steps 1.5": (["export", "--run", run, "--out", out, "--steps", "1.5"],
                               ["--steps must be an integer", "'1.5'"]),
        "export --steps empty": (["export", "--run", run, "--out", out, "--steps", ""], ["--steps must be an integer"]),
        "export --steps without a value": (["export", "--run", run, "--out", out, "--steps"],
                                           ["--steps: expected one argument"]),
        "export --format": (["export", "--run", run, "--out", out, "--format", "ckpt"],
                            ["unknown format 'ckpt'", "allowed:"]),
        "export --weights": (["export", "--run", run, "--out", out, "--weights", "best"],
                             ["unknown weights 'best'", "allowed: ema, trained"]),
        "export --checkpoint": (["export", "--run", run, "--out", out, "--checkpoint", "latest"],
                                ["--checkpoint must look like step-N", "'latest'"]),
        "export --checkpoint missing": (["export", "--run", run, "--out", out, "--checkpoint", "step-9"],
                                        ["'step-9' not found", "step-000002"]),
        "export --run missing": (["export", "--run", root / "nope", "--out", out], ["nope not found"]),
        "export --run is a file": (["export", "--run", a_file, "--out", out], ["a_file", "not found"]),
        "export --out is a file": (["export", "--run", run, "--out", a_file], ["a_file", "not a directory"]),
        "export without --out": (["export", "--run", run], ["--run and --out are required"]),
        "export --out is the sentinel run": (["export", "--run", run, "--out", root / "runs" / "sentinel"],
                                             ["not an onestep export"]),
        "teacher-train --out is a file": (["teacher-train", "--out", a_file], ["--out", "a_file is a file"]),
        "teacher-train --out is a run directory": (["teacher-train", "--out", root / "runs" / "sentinel"],
                                                   ["--out", "sentinel holds files that are not a saved teacher"]),
    }


def test_out_of_range_cli_arguments(trained_run, workspace, no_training):
    root, _ = workspace
    cases = cli_arg_cases(root, trained_run)
    for label, (argv, expect) in cases.items():
        assert_clean_cli(f"CLI: {label}", argv, expect, root)


def test_help_still_works():
    rc, out, err = run_cli(["--help"])
    assert rc == 0 and "distill" in out and not err
    rc, out, err = run_cli(["export", "--help"])
    assert rc == 0 and "--steps" in out


@FEW
@given(steps=st.one_of(st.integers(max_value=0).map(str), st.text(max_size=6)))
def test_random_export_steps(steps, hyp_workspace):
    try:
        if int(steps) >= 1:
            return
    except ValueError:
        pass
    root, runs = hyp_workspace
    assert_clean_cli(f"export --steps {steps!r}", ["export", "--run", runs / "sentinel", "--out", root / "out",
                                                   "--steps", steps], ["steps"], root, EXAMPLES)


def test_console_script_one_line_for_a_refused_pickle(trained_run, tmp_path):
    """End to end in a fresh interpreter: stderr is exactly one line (no warnings, no traceback)."""
    runs, ckpt = copy_run(trained_run, tmp_path)
    marker = tmp_path / "marker"
    write_malicious(ckpt / "optim-student.pt", marker, "torch.save")
    from onestep.checkpoint import write_checksums

    write_checksums(ckpt)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "onestep.cli", *map(str, resume_argv(runs))], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: refused to load"), proc.stderr
    assert not marker.exists() and snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------


def test_zz_summary(capsys):
    """Runs last (file order): how many distinct bad inputs were tried and how many gave a clean error."""
    clean = sum(CASES.values())
    line = (f"bad-input cases: {len(CASES)} distinct table cases, {clean} clean; hypothesis: {len(EXAMPLES)} "
            f"examples, {sum(EXAMPLES.values())} clean")
    with capsys.disabled():
        print("\n" + line)
    assert len(CASES) >= 100, line
    assert clean == len(CASES) and all(EXAMPLES.values()), [k for k, v in {**CASES, **EXAMPLES}.items() if not v]
