"""`onestep export`: stock diffusers reproduces the student's k-step sampler; OneStepPipeline; idempotent,
safetensors-only folders; bad input is one line and exit code 2 with nothing left behind."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from onestep.teachers.digits.exporter import PixelUNetExporter
from safetensors.torch import load_file, save_file

from onestep.checkpoint import write_checksums
from onestep.cli import main
from onestep.config import load_config
from onestep.export import ExportError, export_run, fold_interval_embedding
from onestep.runs import load_run, load_student
from onestep.trainer import Trainer

TOL = 1e-4
SEED = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step SplitMeanFlow run on a tiny random digits teacher, with a random interval embedding.

    Two training steps barely move the zero-initialised interval embedding, so the EMA checkpoint gets
    random weights there: a pipeline that ignored t - r (or folded it wrongly) would fail the tests.
    """
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(root / "teacher")
    cfg = load_config("demo", [f"output_dir={root}", "name=tiny", f"teacher.path={root / 'teacher'}",
                               "train.steps=2", "train.checkpoint_every=1", "data.batch_size=4",
                               "train.progress=false", "train.sample_every=0", "train.sample_steps=[1]"])
    Trainer(cfg).fit()
    run = root / "tiny"
    ema_file = run / "checkpoints" / "step-000002" / "ema.safetensors"
    ema = load_file(ema_file)
    g = torch.Generator().manual_seed(1)
    for k in ("unet.class_embedding.linear_2.weight", "unet.class_embedding.linear_2.bias"):
        ema[k] = torch.randn(ema[k].shape, generator=g) * 0.3
    save_file(ema, ema_file)
    write_checksums(ema_file.parent)  # the test altered the checkpoint on purpose: re-seal it
    # what `onestep demo` writes, scoring this checkpoint (numbers made up for the card test)
    report = {"run": "tiny", "train_steps": 2, "rows": [
        {"model": "teacher", "steps": 50, "digits_fid": 9.5, "images_per_s": 10.0},
        {"model": "student", "steps": 1, "digits_fid": 12.25, "images_per_s": 400.0}],
        "protocol": {"num_samples": 24, "reference": "sklearn-digits/train", "noise_seed": 1234}}
    (run / "report.json").write_text(json.dumps(report))
    return run


@pytest.fixture(scope="module")
def student(run_dir):
    return load_student(load_run(run_dir))[0]


def expected_images(student, steps, batch=4, seed=SEED):
    """onestep's own k-step sampler on the noise a pipeline draws from a CPU generator seeded `seed`."""
    noise = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return (student.sample(noise, steps=steps) / 2 + 0.5).clamp(0, 1), noise


def snippet(readme: Path) -> str:
    return re.search(r"```python\n(.*?)```", readme.read_text(), re.S).group(1)


# a process in which importing onestep fails: what loads here needs stock diffusers only
NO_ONESTEP = """
import sys
class _NoOnestep:
    def find_spec(self, name, path=None, target=None):
        if name == "onestep" or name.startswith("onestep."):
            raise ImportError("onestep is blocked in this process")
sys.meta_path.insert(0, _NoOnestep())
"""


def test_stock_pipeline_loads_without_onestep_and_matches_the_sampler(run_dir, student, tmp_path):
    dirs = {k: export_run(run_dir, tmp_path / f"k{k}", steps=k) for k in (1, 2, 4)}
    for k, d in dirs.items():
        index = json.loads((d / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
        assert json.loads((d / "unet" / "config.json").read_text())["class_embed_type"] is None
    script = NO_ONESTEP + f"""
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
out = {{}}
for k, d in {({k: str(d) for k, d in dirs.items()})!r}.items():
    pipe = DiffusionPipeline.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    out[f"k{{k}}"] = pipe(batch_size=4, num_inference_steps=k, generator=torch.Generator().manual_seed({SEED}),
                          output_type="pt").images.contiguous()
save_file(out, "images.safetensors")
exec(compile({snippet(dirs[1] / "README.md")!r}, "model card", "exec"))  # the card's snippet, as written
assert not any(m == "onestep" or m.startswith("onestep.") for m in sys.modules)
print("clean")
"""
    # -I: no current directory or PYTHON* variables on the path; onestep stays importable from the venv
    # (editable install), which is why the meta-path blocker above is what proves it is not used
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("clean"), proc.stderr[-2000:]
    assert (tmp_path / "sample.png").is_file()
    got = load_file(tmp_path / "images.safetensors")
    unfolded = load_student(load_run(run_dir))[0]
    with torch.no_grad():  # the same student without its interval embedding: must be far off
        unfolded.unet.class_embedding.linear_2.weight.zero_()
        unfolded.unet.class_embedding.linear_2.bias.zero_()
    for k in (1, 2, 4):
        want, noise = expected_images(student, k)
        assert got[f"k{k}"].shape == want.shape
        assert (got[f"k{k}"] - want).abs().max().item() < TOL, k
        wrong = (unfolded.sample(noise, steps=k) / 2 + 0.5).clamp(0, 1)
        assert (got[f"k{k}"] - wrong).abs().max().item() > 1e-2, k  # the test can fail


def test_onestep_pipeline_runs_the_sampler_at_any_step_count(run_dir, student, tmp_path, monkeypatch):
    from onestep.pipelines import OneStepPipeline

    out = export_run(run_dir, tmp_path / "os", format="onestep", steps=2)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "OneStepPipeline"
    pipe = OneStepPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.default_num_inference_steps == 2 and pipe.config.max_num_inference_steps is None
    for k in (1, 2, 4):
        want, noise = expected_images(student, k)
        got = pipe(latents=noise, num_inference_steps=k, output_type="pt").images
        assert (got - want).abs().max().item() < TOL, k
        drawn = pipe(batch_size=4, num_inference_steps=k, generator=torch.Generator().manual_seed(SEED),
                     output_type="np").images
        assert drawn.shape == (4, 16, 16, 1) and abs(drawn - want.permute(0, 2, 3, 1).numpy()).max() < TOL
    want, noise = expected_images(student, 2)
    assert (pipe(latents=noise, output_type="pt").images - want).abs().max().item() < TOL  # default: 2 steps
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet(out / "README.md"), "model card", "exec"), {})
    assert (tmp_path / "sample.png").is_file()


def test_consistency_student_exports_one_step_only(run_dir, tmp_path):
    """An sCM student samples by jumping to the data and re-noising with fresh noise between steps, which
    OneStepPipeline's k-step update does not do: the export is 1 step, and the pipeline refuses more."""
    from onestep.pipelines import OneStepPipeline

    cfg = load_config("digits_scm", [f"output_dir={tmp_path}", "name=scm", f"teacher.path={run_dir.parent / 'teacher'}",
                                     "train.steps=1", "train.checkpoint_every=1", "data.batch_size=4",
                                     "train.progress=false", "train.sample_every=0", "train.sample_steps=[1]"])
    Trainer(cfg).fit()
    with pytest.raises(ExportError, match="re-noise"):
        export_run(tmp_path / "scm", tmp_path / "k2", format="onestep", steps=2)
    out = export_run(tmp_path / "scm", tmp_path / "k1", format="onestep", steps=1)
    # the checkpoint and the export store the sampler the objective set: consistency, with the recipe's grid
    from onestep.sampling import SamplerSpec

    spec = SamplerSpec.from_dict(
        json.loads((tmp_path / "scm" / "checkpoints" / "step-000001" / "sampler.json").read_text()))
    assert (spec.kind, spec.grid) == ("consistency", "consistency")
    assert (spec.consistency_data_std, spec.consistency_intermediate) == \
        (cfg.objective["sampler_data_std"], cfg.objective["sampler_intermediate"])
    assert json.loads((out / "onestep_export.json").read_text())["sampler"] == spec.to_dict()
    assert load_student(load_run(tmp_path / "scm"))[0].sampler_spec() == spec
    pipe = OneStepPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.max_num_inference_steps == 1
    assert pipe(batch_size=2, output_type="pt").images.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="at most 1 step"):
        pipe(batch_size=2, num_inference_steps=2)
    assert "`num_inference_steps=1` only" in (out / "README.md").read_text()
    # stock diffusers at one step, for the recipe's student of the shipped dense-time teacher (timestep = t,
    # folded at t = 1): the consistency sampler's single step is the pipeline's Euler step
    from diffusers import DiffusionPipeline
    cfg = load_config("digits_scm", [f"output_dir={tmp_path}", "name=dense", "train.steps=1", "data.batch_size=4",
                                     "train.progress=false", "train.sample_every=0", "train.sample_steps=[1]"])
    Trainer(cfg).fit()
    student = load_student(load_run(tmp_path / "dense"))[0]
    assert student.time_scale == 1.0 and student.sampler != "avg_velocity"
    stock = DiffusionPipeline.from_pretrained(export_run(tmp_path / "dense", tmp_path / "stock", steps=1))
    stock.set_progress_bar_config(disable=True)
    want, _ = expected_images(student, 1)
    got = stock(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(SEED),
                output_type="pt").images
    assert (got - want).abs().max().item() < TOL


def test_reexport_is_byte_identical_and_holds_only_safetensors(run_dir, tmp_path):
    out = tmp_path / "again"

    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    export_run(run_dir, out, steps=2)
    first = files()
    export_run(run_dir, out, steps=2)
    assert files() == first
    assert {Path(f).suffix for f in first} <= {".safetensors", ".json", ".md"}
    assert any(f.endswith(".safetensors") for f in first)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temporary folders left


def test_model_card_reports_teacher_objective_scheduler_and_scores(run_dir, tmp_path):
    card = (export_run(run_dir, tmp_path / "c", steps=1) / "README.md").read_text()
    for text in ("teacher | `digits`", "`splitmeanflow`", "DDPMPipeline", "FlowMatchEulerDiscreteScheduler",
                 "| student (this export) | 1 | 12.250 |", "reference: sklearn-digits/train", "step-000002"):
        assert text in card, text
    older = (export_run(run_dir, tmp_path / "old", checkpoint="step-1", steps=2) / "README.md").read_text()
    assert "Not evaluated" in older and "step-000001" in older and "shift_terminal=0.5" in older


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gmm")
    cfg = load_config(None, [f"output_dir={root}", "name=g", "teacher.name=gmm", "student.init=scratch",
                             "student.backbone=mlp", "data.name=gmm", "data.batch_size=8", "train.steps=1",
                             "train.progress=false"])
    Trainer(cfg).fit()
    return root / "g"


def bad_cases(run_dir, gmm_run, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("x")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt)
    ema = corrupt / "checkpoints" / "step-000002" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-100])  # truncated after its checksum was written
    run, out = str(run_dir), str(tmp_path / "out")
    return {
        "corrupt checkpoint": (["--run", str(corrupt), "--out", out], "ema.safetensors does not match its checksum"),
        "missing run": (["--run", str(tmp_path / "nope"), "--out", out], "not found"),
        "not a run": (["--run", str(no_config), "--out", out], "no config.yaml"),
        "missing checkpoint": (["--run", run, "--out", out, "--checkpoint", "step-99"], "step-000001, step-000002"),
        "unknown format": (["--run", run, "--out", out, "--format", "ckpt"], "allowed: diffusers, onestep, lora"),
        "zero steps": (["--run", run, "--out", out, "--steps", "0"], "steps must be an integer >= 1"),
        "steps not a number": (["--run", run, "--out", out, "--steps", "two"], "--steps must be an integer"),
        "out holds other files": (["--run", run, "--out", str(occupied)], "not an onestep export"),
        "out is a file": (["--run", run, "--out", str(tmp_path / "a_file")], "not a directory"),
        "no --out": (["--run", run], "--run and --out are required"),
        "lora without a LoRA pipeline": (["--run", run, "--out", out, "--format", "lora"], "use --format diffusers"),
        "no pipeline family": (["--run", str(gmm_run), "--out", out], "diffusers has no pipeline for vector data"),
    }


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(run_dir, gmm_run, tmp_path, capsys):
    cases = bad_cases(run_dir, gmm_run, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, (argv, expect) in cases.items():
        rc = main(["export", *argv])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert err.count("\n") == 1 and err.startswith("export error: ") and expect in err, (name, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name  # nothing partial, no temp folders
    assert [p.name for p in (tmp_path / "occupied").iterdir()] == ["notes.txt"]


def test_failure_while_writing_leaves_the_previous_export(run_dir, tmp_path, monkeypatch):
    out = export_run(run_dir, tmp_path / "e", steps=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(self, student, teacher, info, folder, format, steps):
        (folder / "half.safetensors").write_bytes(b"partial")
        raise ExportError("disk full")

    monkeypatch.setattr(PixelUNetExporter, "write", broken)
    with pytest.raises(ExportError, match="disk full"):
        export_run(run_dir, out, steps=2)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_cli_exports(run_dir, tmp_path, capsys):
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "cli"), "--steps", "2",
                 "--checkpoint", "step-000002"]) == 0
    assert "exported diffusers pipeline (2 steps)" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "cli" / "onestep_export.json").read_text())
    assert manifest["steps"] == 2 and manifest["checkpoint"] == "step-000002" and manifest["weights"] == "ema"
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "raw"), "--format", "onestep",
                 "--weights", "trained"]) == 0
    card = (tmp_path / "raw" / "README.md").read_text()
    assert "--weights trained" in card and "raw trained (not EMA)" in card and "Not evaluated" in card


def test_velocity_model_exports_as_euler_sampler(tmp_path):
    """A run without interval embedding (e.g. `onestep teacher-train`) is a velocity model: Euler steps."""
    from diffusers import DiffusionPipeline

    cfg = load_config("digits_teacher", [f"output_dir={tmp_path}", "name=v", "train.steps=1", "data.batch_size=4",
                                         "train.progress=false", "train.sample_steps=[1]"])
    Trainer(cfg).fit()
    out = export_run(tmp_path / "v", tmp_path / "e", steps=3)
    assert "Euler steps of v(z, t)" in (out / "README.md").read_text()
    velocity = load_student(load_run(tmp_path / "v"))[0]
    assert not velocity.has_interval_embedding
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    want, _ = expected_images(velocity, 3)
    got = pipe(batch_size=4, num_inference_steps=3, generator=torch.Generator().manual_seed(SEED),
               output_type="pt").images
    assert (got - want).abs().max().item() < TOL


def test_dense_time_student_exports_stock_at_one_step_and_as_onestep_pipeline(tmp_path):
    """A student of the dense-time teacher embeds t, not the 1000 t stock schedulers feed. Stock format: one
    step folds its time embedding at t = 1 into linear_1 (exact), more steps are refused in one line (nothing
    written); OneStepPipeline feeds time_scale * t and matches the sampler at any step count."""
    from diffusers import DiffusionPipeline

    from onestep.pipelines import OneStepPipeline

    cfg = load_config("digits_meanflow", [f"output_dir={tmp_path}", "name=d", "train.steps=1", "data.batch_size=4",
                                          "train.progress=false", "train.sample_every=0", "train.sample_steps=[1]"])
    Trainer(cfg).fit()
    with pytest.raises(ExportError, match=r"time scale is 1 \(e.g. distilled from the dense-time teacher\).*"
                                          r"--steps 2\).*--format onestep") as e:
        export_run(tmp_path / "d", tmp_path / "stock2", steps=2)
    assert "\n" not in str(e.value) and not (tmp_path / "stock2").exists()
    student = load_student(load_run(tmp_path / "d"))[0]
    assert student.time_scale == 1.0
    stock = DiffusionPipeline.from_pretrained(export_run(tmp_path / "d", tmp_path / "stock1", steps=1))
    stock.set_progress_bar_config(disable=True)
    assert type(stock).__name__ == "DDPMPipeline" and not stock.unet.time_embedding.linear_1.weight.any()
    want, _ = expected_images(student, 1)
    got = stock(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(SEED),
                output_type="pt").images
    assert (got - want).abs().max().item() < TOL
    # with only the interval embedding folded, the stock pipeline's timestep 1000 is far off: the time fold matters
    stock.unet = fold_interval_embedding(student.unet, 1, student.interval_scale)
    wrong = stock(batch_size=4, num_inference_steps=1, generator=torch.Generator().manual_seed(SEED),
                  output_type="pt").images
    assert (wrong - want).abs().max().item() > 100 * TOL
    assert "exact only for `num_inference_steps=1`" in (tmp_path / "stock1" / "README.md").read_text()
    out = export_run(tmp_path / "d", tmp_path / "k2", format="onestep", steps=2)
    pipe = OneStepPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.time_scale == 1.0
    for k in (1, 2, 3):
        want, _ = expected_images(student, k)
        got = pipe(batch_size=4, num_inference_steps=k, generator=torch.Generator().manual_seed(SEED),
                   output_type="pt").images
        assert (got - want).abs().max().item() < TOL
        # the same pipeline feeding 1000 t (the scheduler's timesteps) is far off: the time scale matters
        pipe.register_to_config(time_scale=None)
        wrong = pipe(batch_size=4, num_inference_steps=k, generator=torch.Generator().manual_seed(SEED),
                     output_type="pt").images
        pipe.register_to_config(time_scale=1.0)
        assert (wrong - want).abs().max().item() > 100 * TOL
    assert "timestep is 1 t" in (out / "README.md").read_text()


def test_interval_scale_is_honoured_by_the_fold_and_the_pipeline(tmp_path):
    """A student whose interval embedding sees 1 * (t - r) (MeanFlow's choice) exports exactly too."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

    from onestep.export import fold_interval_embedding, stock_flow_scheduler
    from onestep.pipelines import OneStepPipeline
    from onestep.student import AvgVelocityUNet

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False)
    student = AvgVelocityUNet.from_velocity_unet(unet, 1000.0, interval_scale=1.0).eval()
    with torch.no_grad():
        student.unet.class_embedding.linear_2.weight.normal_(0, 0.3)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for k in (1, 2):
        want = (student.sample(noise, steps=k).clamp(-1, 1) + 1) / 2
        stock = DDPMPipeline(unet=fold_interval_embedding(student.unet, k, student.interval_scale),
                             scheduler=stock_flow_scheduler(k))
        ours = OneStepPipeline(unet=student.unet, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
                               default_num_inference_steps=k, interval_scale=1.0)
        for pipe in (stock, ours):
            pipe.set_progress_bar_config(disable=True)
        stock_images = stock(batch_size=3, num_inference_steps=k, output_type="np",
                             generator=torch.Generator().manual_seed(0)).images
        assert abs(torch.from_numpy(stock_images).permute(0, 3, 1, 2) - want).max() < 1e-4
        assert (ours(latents=noise, num_inference_steps=k, output_type="pt").images - want).abs().max() < 1e-4
        # the default scale (1000) would be a different model: the test can fail
        wrong = DDPMPipeline(unet=fold_interval_embedding(student.unet, k, 1000.0), scheduler=stock_flow_scheduler(k))
        wrong.set_progress_bar_config(disable=True)
        wrong_images = wrong(batch_size=3, num_inference_steps=k, output_type="np",
                             generator=torch.Generator().manual_seed(0)).images
        assert abs(torch.from_numpy(wrong_images).permute(0, 3, 1, 2) - want).max() > 1e-3


def test_vp_consistency_student_is_told_one_step_in_every_format(tmp_path):
    """An sCM student of a VP teacher at --steps 2: the refusal names the re-noising sampler in every format,
    not the VP family's advice to use --format onestep (which would refuse it too)."""
    from test_export_families import _pixel_teacher_dir, make_run

    run = make_run(tmp_path, "unet", _pixel_teacher_dir(tmp_path / "teacher"), extra=("objective.name=scm",))
    for format in ("diffusers", "onestep"):
        with pytest.raises(ExportError, match="re-noise with fresh noise.*in every format"):
            export_run(run, tmp_path / f"out-{format}", format=format, steps=2)
