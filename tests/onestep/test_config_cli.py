"""Configs and the command line: bad input is one line and exit code 2; `onestep list`."""
import subprocess
import sys

import pytest
import torch

from onestep.cli import main
from onestep.config import ConfigError, load_config


@pytest.mark.parametrize("overrides,expect", [
    (["objective.flow_rate=0.5"],
     "unknown key objective.flow_rate; allowed: anchor_intervals, anchor_share, boundary_target, flow_ratio"),
    (["objective.name=nope"], "objective.name: unknown objective 'nope'; allowed: "),
    (["teacher.name=nope"], "teacher.name: unknown teacher 'nope'; allowed: digits, "),
    (["train.stepz=3"], "unknown key train.stepz; allowed: checkpoint_every, clip_grad_norm"),
    (["stepz=3"], "unknown key stepz; allowed: data, eval, name, objective"),
    (["student.size=3"],
     "unknown key student.size; allowed: attention, backbone, dropout, gradient_checkpointing, init"),
    (["train.clip_grad_norm=-1"], "train.clip_grad_norm must be > 0"),
    (["eval.student_steps=[0,1]"], "eval.student_steps must list step counts >= 1"),
    (["data.name=gmm"], "data.name=gmm draws from the teacher's mixture"),
    (["teacher.name=none", "objective.boundary_target=data"], "student.init=teacher needs a teacher"),
    (["train.steps=abc"], "train.steps"),
    (["objective.flow_ratio=abc"], "objective.flow_ratio"),
    (["train.mixed_precision=fp8"], "train.mixed_precision='fp8' is not allowed; allowed: no, bf16, fp16"),
    (["objective.flow_ratio=0.2"], "objective.flow_ratio must be in [0.5, 1]"),  # before any model is built
    (["student.time_smoothing=-0.01"], "student.time_smoothing must be a finite number >= 0"),
    (["student.dropout=1.0"], "student.dropout must be in [0, 1)"),
])
def test_config_errors_name_the_key(overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config("demo", overrides)
    msg = str(e.value)
    assert expect in msg and "\n" not in msg


@pytest.mark.parametrize("config,overrides,expect", [
    ("digits_smt", [], False),                      # `teacher: {name: none}` in the YAML
    ("digits_smt", ["teacher.name=null"], False),
    ("demo", [], True),
])
def test_has_teacher_is_what_build_teacher_reads(config, overrides, expect):
    from onestep.build import build_teacher

    cfg = load_config(config, overrides)
    assert cfg.has_teacher is expect
    if not expect:   # no weights are loaded for a teacherless run
        assert build_teacher(cfg) is None


def test_shipped_configs_load():
    for name in ("demo", "digits_teacher", "digits_splitmeanflow"):
        cfg = load_config(name)
        assert cfg.name
    cfg = load_config("demo", ["train.steps=7", "objective.anchor_share=0.5"])
    assert cfg.train.steps == 7 and cfg.objective["anchor_share"] == 0.5


def test_mixed_precision_no_is_not_read_as_false(tmp_path):
    # YAML 1.1 reads a bare `no` as false: both the command line and a config file must still mean "no"
    assert load_config("demo", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train: {mixed_precision: no}\n")
    assert load_config(path).train.mixed_precision == "no"


def test_cli_config_error_exits_2_with_one_line(capsys, tmp_path):
    rc = main(["distill", "--config", "demo", "objective.nope=1", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "objective.nope" in err
    rc = main(["distill", "--config", "demo", "objective.flow_ratio=0.2", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "flow_ratio must be in [0.5, 1]" in err and "Traceback" not in err
    rc = main(["distill", "--config", "no_such_config"])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_console_script_no_traceback():
    out = subprocess.run([sys.executable, "-m", "onestep.cli", "demo", "data.batch_size=zero"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("config error: data.batch_size") and "Traceback" not in out.stderr


def test_list_prints_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "teachers:" and "  digits" in out and "  gmm" in out
    assert "objectives:" in out and "  splitmeanflow" in out and "  flow_matching" in out
    assert "metrics:" in out and "  digits_fid" in out


def test_student_dropout_sets_the_backbone_layers_and_refuses_a_student_without_any():
    from onestep.build import build_student, build_teacher

    cfg = load_config("demo", ["student.dropout=0.2"])
    student = build_student(cfg, build_teacher(cfg))
    rates = [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(rates) >= 6 and set(rates) == {0.2}  # every ResNet block of the digits UNet
    plain = build_student(load_config("demo"), build_teacher(cfg))
    assert {m.p for m in plain.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}  # the teacher's own
    cfg = load_config("demo", ["teacher.name=gmm", "data.name=gmm", "student.init=scratch", "student.backbone=mlp",
                               "student.dropout=0.1"])
    with pytest.raises(ConfigError, match="student.dropout: the MLPAvgVelocity student has no dropout layers"):
        build_student(cfg, build_teacher(cfg))


def test_time_smoothing_needs_a_unet_student():
    from onestep.build import build_student, build_teacher

    cfg = load_config("demo", ["teacher.name=gmm", "data.name=gmm", "student.init=scratch", "student.backbone=mlp",
                               "student.time_smoothing=0.01"])
    with pytest.raises(ConfigError, match="student.time_smoothing is implemented for UNet2DModel students"):
        build_student(cfg, build_teacher(cfg))
