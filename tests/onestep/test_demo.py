"""The demo's whole path on a tiny random teacher: train, evaluate, report.json/report.md/grid.png."""
import json

import torch
from diffusers import UNet2DModel

from onestep.config import load_config
from onestep.demo import run_demo


def save_tiny_teacher(path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False)
    unet.save_pretrained(path)


def test_demo_end_to_end_on_a_tiny_teacher(tmp_path):
    save_tiny_teacher(tmp_path / "teacher")
    cfg = load_config("demo", [f"output_dir={tmp_path}", f"teacher.path={tmp_path / 'teacher'}", "train.steps=3",
                               "data.batch_size=8", "train.progress=false", "eval.num_samples=24",
                               "eval.teacher_steps=[1,50]", "eval.student_steps=[1,2]", "train.sample_every=0",
                               "eval.noise_seeds=2"])
    report = run_demo(cfg)
    run = tmp_path / "demo"
    saved = json.loads((run / "report.json").read_text())
    assert [(r["model"], r["steps"]) for r in saved["rows"]] == [
        ("real", 0), ("teacher", 1), ("teacher", 50), ("student", 1), ("student", 2)]
    for r in saved["rows"]:
        assert r["digits_fid"] > 0
        assert (r["images_per_s"] is None) == (r["model"] == "real")
    assert saved["protocol"]["num_samples"] == 24 and saved["protocol"]["reference"] == "sklearn-digits/train"
    # a 1-step sampler is much faster than a 50-step one, whatever the weights
    by = {(r["model"], r["steps"]): r for r in saved["rows"]}
    assert by[("student", 1)]["images_per_s"] > 5 * by[("teacher", 50)]["images_per_s"]
    assert (run / "grid.png").is_file() and (run / "report.md").read_text().startswith("# onestep demo")
    assert (run / "config.yaml").is_file() and report["train_steps"] == 3
    # paired noise seeds: the first is the table's seed; every seed's ratio is scored on the same noise for
    # teacher and student, and the report leads with their mean ± sd (goals judged on the mean)
    spread = saved["seed_spread"]
    assert set(spread) == {"1-step", "2-step"}
    for k in (1, 2):
        s = spread[f"{k}-step"]
        assert s["noise_seeds"] == [1234, 1235]
        assert s["digits_fid_seeds"][0] == by[("student", k)]["digits_fid"]
        assert s["teacher50_digits_fid_seeds"][0] == by[("teacher", 50)]["digits_fid"]
        assert s["digits_fid_seeds"][1] != s["digits_fid_seeds"][0]        # another seed, another score
        ratios = [a / b for a, b in zip(s["digits_fid_seeds"], s["teacher50_digits_fid_seeds"])]
        assert s["ratio_mean"] == round(sum(ratios) / 2, 3)
        assert s["ratio_sd"] == round(abs(ratios[0] - ratios[1]) / 2 ** 0.5, 3)
    goal = next(t for t in saved["targets"] if t["what"].startswith("student 1-step FID / teacher 50-step"))
    assert goal["what"].endswith("(mean over noise seeds)") and \
        goal["value"] == round(spread["1-step"]["ratio_mean"], 4)
    assert "over 2 paired noise seeds (1234, 1235" in (run / "report.md").read_text().splitlines()[4]


def test_teacher_only_evaluation_scores_the_teacher_as_with_a_student(tmp_path):
    """benchmarks/teacher_steps.py scores a teacher with no student: the same teacher rows, no sampler."""
    from onestep.build import build_student, build_teacher
    from onestep.demo import evaluate_digits

    save_tiny_teacher(tmp_path / "teacher")
    cfg = load_config("demo", [f"teacher.path={tmp_path / 'teacher'}", "eval.num_samples=24",
                               "eval.teacher_steps=[1,3]", "eval.student_steps=[1]"])
    teacher = build_teacher(cfg)
    with_student = evaluate_digits(teacher, build_student(cfg, teacher), cfg, "cpu")
    cfg.eval.student_steps = []
    alone = evaluate_digits(teacher, None, cfg, "cpu")
    scores = lambda res: [(r["model"], r["steps"], r["digits_fid"]) for r in res["rows"]]  # noqa: E731
    assert scores(alone) == [s for s in scores(with_student) if s[0] != "student"]
    assert alone["protocol"]["student_sampler"] is None and with_student["protocol"]["student_sampler"]
