"""The accelerate trainer: exact resume, atomic checkpoints, the non-finite guard, teacher round trip."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from onestep.objectives.scm import SCMConfig
from onestep.objectives.smt import SMTConfig
from safetensors.torch import load_file

from onestep.config import load_config
from onestep.trainer import NonFiniteLossError, Trainer


def gmm_cfg(tmp_path, name, steps, **extra):
    overrides = [f"name={name}", f"output_dir={tmp_path}", "teacher.name=gmm", "student.init=scratch",
                 "student.backbone=mlp", "data.name=gmm", "data.batch_size=32", f"train.steps={steps}",
                 "train.progress=false", "train.checkpoint_every=5", "train.log_every=1", "train.keep_checkpoints=3"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path):
    sched = {"train.warmup_steps": 3, "train.decay_steps": 4}     # so the LR schedule must resume too
    full = Trainer(gmm_cfg(tmp_path, "full", 12, **sched)).fit()
    part = Trainer(gmm_cfg(tmp_path, "part", 12, **sched))
    save = part.save_checkpoint

    def save_then_crash():                                        # killed right after step 7's save
        save()
        if part.step == 7:
            raise KeyboardInterrupt
    part.save_checkpoint = save_then_crash
    part.cfg.train.checkpoint_every = 7
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    assert part.step == 7
    resumed = Trainer(gmm_cfg(tmp_path, "part", 12, **sched)).fit()  # resumes from step 7
    for (n, a), b in zip(full.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")  # same losses, step by step
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert ckpts == ["step-000007", "step-000010", "step-000012"]  # the last K are kept (every 5 after resume)
    assert (tmp_path / "part" / "config.yaml").is_file()


def test_interrupted_checkpoint_write_is_ignored(tmp_path):
    Trainer(gmm_cfg(tmp_path, "r", 5)).fit()
    ck = tmp_path / "r" / "checkpoints"
    # a kill during a save leaves only a .tmp folder, never a broken step-* folder
    shutil.copytree(ck / "step-000005", ck / "step-000009.tmp")
    (ck / "step-000009.tmp" / "trainable.safetensors").write_bytes(b"garbage")
    t = Trainer(gmm_cfg(tmp_path, "r", 6))
    assert t.maybe_resume() and t.step == 5


def test_checkpoint_holds_no_teacher_and_loads_safely(tmp_path):
    Trainer(gmm_cfg(tmp_path, "c", 5)).fit()
    ck = tmp_path / "c" / "checkpoints" / "step-000005"
    keys = load_file(ck / "trainable.safetensors").keys()
    assert keys and all(k.startswith("student.") for k in keys)
    torch.load(ck / "optim-student.pt", weights_only=True)   # tensors and plain containers only


def test_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    t = Trainer(gmm_cfg(tmp_path, "nan", 20, **{"train.max_nonfinite": 2}))
    original = t.objective.loss

    def poisoned(batch, step):
        out = original(batch, step)
        if step >= 5:
            out["student"] = out["student"] * float("nan")
        return out

    monkeypatch.setattr(t.objective, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="group 'student', step 5"):
        t.fit()
    assert t.step == 5
    ck = tmp_path / "nan" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000005"]
    assert all(torch.isfinite(p).all() for p in t.student.parameters())


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    """Two micro-batches of 16 == one batch of 32 when the data and draws line up."""
    # accelerate's gradient state is process-wide: finish trainer a before building trainer b
    x = torch.randn(32, 2)
    t_all, eps_all = torch.rand(32), torch.randn(32, 2)

    def fixed(obj, sl):
        def loss(batch, step):
            z = (1 - t_all[sl, None]) * x[sl] + t_all[sl, None] * eps_all[sl]
            pred = obj.student(z, t_all[sl], t_all[sl])
            l = (pred - (eps_all[sl] - x[sl])).pow(2).mean()
            return {"student": l, "log/loss": l.detach()}
        return loss

    a = Trainer(gmm_cfg(tmp_path, "big", 1, **{"objective.name": "flow_matching", "data.batch_size": 32}))
    init = {k: v.clone() for k, v in a.student.state_dict().items()}
    a.objective.loss = fixed(a.objective, slice(0, 32))
    a.train_step()
    b = Trainer(gmm_cfg(tmp_path, "acc", 1, **{"objective.name": "flow_matching", "data.batch_size": 16,
                                                 "train.grad_accum": 2}))
    b.student.load_state_dict(init)
    halves = iter([slice(0, 16), slice(16, 32)])
    b.objective.loss = lambda batch, step: fixed(b.objective, next(halves))(batch, step)
    b.train_step()
    for p, q in zip(a.student.parameters(), b.student.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_teacher_train_round_trip_through_from_pretrained(tmp_path):
    """`onestep teacher-train` on digits for a few steps; the saved folder loads with diffusers."""
    from onestep.teachers.digits import DigitsTeacher

    from onestep.cli import main

    out = tmp_path / "teacher"
    rc = main(["teacher-train", "--out", str(out), f"output_dir={tmp_path}", "train.steps=2",
               "data.batch_size=8", "train.progress=false", "train.sample_every=0", "train.sample_steps=[1]"])
    assert rc == 0 and (out / "diffusion_pytorch_model.safetensors").is_file()
    teacher = DigitsTeacher.from_pretrained(out)
    ema = load_file(tmp_path / "digits_teacher" / "checkpoints" / "step-000002" / "ema.safetensors")
    for name, p in teacher.model.named_parameters():
        assert torch.equal(p, ema[name])
    assert (tmp_path / "digits_teacher" / "samples" / "step-000002.png").is_file()


def test_missing_teacher_weights_name_the_file_and_the_option(tmp_path):
    from onestep.teachers.digits import DigitsTeacher

    with pytest.raises(FileNotFoundError, match="config.json.*teacher.path"):
        DigitsTeacher.from_pretrained(tmp_path / "nowhere")


def test_lr_schedule_and_logs(tmp_path):
    cfg = gmm_cfg(tmp_path, "lr", 10, **{"train.warmup_steps": 3, "train.decay_steps": 4})
    t = Trainer(cfg)
    factors = [t.lr_factor(s) for s in range(11)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[6] == 1.0
    assert factors[7:] == [0.75, 0.5, 0.25, 0.0]
    t.fit()
    assert any((tmp_path / "lr" / "tb").rglob("events.out.tfevents*"))     # tensorboard scalars
    rows = [json.loads(l) for l in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)) and "grad_norm/student" in rows[0]
    # the logged lr is the one the logged step was taken with
    assert [r["lr"] for r in rows] == pytest.approx([t.base_lr["student"] * f for f in factors[:10]], rel=1e-12)


def benchmark_module(name: str):
    """benchmarks/<name>.py as a module, under its own name."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"onestep_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_seed_spread_is_over_paired_ratios():
    """--noise-seeds (benchmarks/objectives.py, noise_seeds.py): the mean and sd of the per-seed ratios
    student / teacher (2 / 1 and 3 / 2), not the ratio of the means (5 / 3)."""
    from onestep.demo import seed_spread

    spread = seed_spread([7, 8], [2.0, 3.0], [1.0, 2.0])
    assert spread["ratio_mean"] == 1.75 and spread["ratio_sd"] == round(0.5 / 2 ** 0.5, 3)
    assert spread["noise_seeds"] == [7, 8] and spread["teacher50_digits_fid_seeds"] == [1.0, 2.0]


def test_noise_seeds_record_names_what_a_run_changed_and_its_train_time(tmp_path):
    """benchmarks/noise_seeds.py --record --recipe: the run's training settings (not its name, output folder,
    threads or progress bar), those that differ from the recipe as overrides, and the logged time at the scored
    checkpoint."""
    from onestep.config import setting_differences, training_settings

    module = benchmark_module("noise_seeds")
    recipe = training_settings(load_config("digits_scm"))
    run = training_settings(load_config("digits_scm", [
        "name=S1", "output_dir=/x", "train.num_threads=1", "train.progress=false",
        "seed=1", "objective.tangent_norm_c=1.0", "train.steps=2000"]))
    assert run["objective.tangent_norm_c"] == 1.0 and run["teacher.shipped"] == "dense" and "name" not in run
    # the objective's defaults are settings too (a recipe that spells one out trains the same); logging,
    # checkpoints, sample grids and scoring are not
    assert run["objective.time_clamp"] == SCMConfig().time_clamp and \
        "time_clamp" not in load_config("digits_scm").objective
    assert not [k for k in run if k.startswith(("eval.", "train.checkpoint", "train.log", "train.sample"))]
    assert setting_differences(run, recipe) == ["objective.tangent_norm_c=1.0", "seed=1", "train.steps=2000"]
    assert setting_differences(recipe, recipe) == []
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 5, "time_s": 1.5}, {"step": 10, "time_s": 3.0}, {"event": "checkpoint", "step": 10},
        {"step": 15, "time_s": 4.5}]))
    assert module.train_time(tmp_path, 10) == 3.0 and module.train_time(tmp_path, 4) is None
    assert module.train_time(tmp_path / "missing", 10) is None


def test_runs_table_groups_training_seeds_of_one_setting():
    """benchmarks/runs_table.py: runs that differ only in their training seed are one group (a changed setting
    or checkpoint is another); a run recorded twice counts once; goals are counted per run, at the first noise
    seed (ratio 2 / 1) and on the noise-seed mean."""
    from onestep.config import training_settings

    module = benchmark_module("runs_table")

    def record(run, seed, first, mean, overrides=(), checkpoint="step-003000"):
        settings = training_settings(load_config("digits_fdistill", [f"seed={seed}", *overrides]))
        return {"run": run, "checkpoint": checkpoint, "student_steps": 1, "recipe": "digits_fdistill",
                "training_seed": seed, "settings": settings,
                "digits_fid_seeds": [first, 9.0], "teacher50_digits_fid_seeds": [2.0, 3.0], "ratio_mean": mean}

    # D as recorded when the recipe's GAN weight was 3e-2 (nothing differed then but the seed): grouped by what
    # it trained with and labelled against the recipe as it is now, not with the recipe's runs
    stale = record("D", 2, 4.0, 2.0, ["objective.gan_weight=0.03"]) | {"differs_from_recipe": ["seed=2"]}
    groups = module.summarise([
        record("A", 0, 2.0, 1.0), record("B", 1, 3.0, 1.4), record("B", 1, 2.6, 1.1),    # B rescored: the last counts
        record("C", 1, 4.0, 2.0, ["train.steps=4000"]), record("A", 0, 5.0, 3.0, checkpoint="step-002500"), stale])
    assert [(g["settings"], g["checkpoint"], g["training_seeds"]) for g in groups] == [
        ([], "step-003000", [0, 1]), (["train.steps=4000"], "step-003000", [1]), ([], "step-002500", [0]),
        (["objective.gan_weight=0.03"], "step-003000", [2])]
    with pytest.raises(SystemExit, match="no `settings`"):
        module.summarise([{k: v for k, v in record("E", 0, 2.0, 1.0).items() if k != "settings"}])
    recipe = groups[0]
    assert recipe["ratio_first_seed"] == [1.0, 1.3] and recipe["ratio_mean"] == [1.0, 1.1]
    assert recipe["first_seed_mean"] == pytest.approx(1.15) and recipe["mean_of_means"] == pytest.approx(1.05)
    assert recipe["first_seed_sd"] == pytest.approx(0.3 / 2 ** 0.5) and groups[1]["mean_sd"] is None
    assert module.meets(recipe, 1.2) == (1, 2) and module.meets(recipe, 1.0) == (1, 1)
    assert module.parse_goals(["digits_fdistill=1.2"]) == {"digits_fdistill": 1.2}
    with pytest.raises(SystemExit, match="RECIPE=RATIO"):
        module.parse_goals(["digits_fdistill"])


def test_digit_classes_summary_counts_a_dropped_digit_as_half_its_share():
    """benchmarks/digit_classes.py: shares are the classifier's argmax counts; a model that never draws a 0 and
    draws 1s in its place is half of 0's training share away (total variation) from the training mix."""
    module = benchmark_module("digit_classes")
    train = torch.full((10,), 0.1, dtype=torch.float64)
    labels = torch.arange(100) % 10
    labels[labels == 0] = 1                      # every 0 drawn as a 1
    probs = torch.nn.functional.one_hot(labels, 10).double() * 0.6 + 0.04   # top probability 0.64
    out = module.class_summary(probs, train)
    assert out["n"] == 100 and out["class_share"][0] == 0.0 and out["class_share"][1] == 0.2
    assert out["tv_to_train"] == 0.1 and out["min_share"] == 0.0 and out["mean_top_prob"] == 0.64
    assert module.class_summary(torch.nn.functional.one_hot(torch.arange(100) % 10, 10).double(),
                                train)["tv_to_train"] == 0.0


def test_benchmark_scores_smt_from_data_next_to_the_shipped_teacher():
    """digits_smt (no teacher) is a benchmark recipe; its student is scored next to the shipped digits
    teacher, and a run's own teacher is kept."""
    from onestep.teachers.digits import DigitsTeacher

    from onestep.config import find_config, load_config
    from onestep.demo import reference_teacher

    bench = benchmark_module("objectives")
    assert "smt" in bench.FROM_DATA and bench.recipes_of("smt") == ["digits_smt"]
    # a variant recipe (same objective) is a row of its own; digits_scm_ladd is not a variant of scm
    assert bench.recipes_of("lightning") == ["digits_lightning", "digits_lightning_4step"]
    assert bench.recipes_of("scm") == ["digits_scm"]
    assert bench.teacher_label(load_config(find_config("digits_smt"))).startswith("none (trained from data")
    assert bench.teacher_label(load_config(find_config("digits_fdistill"))) == "digits"
    assert isinstance(reference_teacher(None), DigitsTeacher)
    own = object()
    assert reference_teacher(own) is own


def test_benchmark_from_run_takes_a_teacherless_smt_run(tmp_path):
    """--from-run on a digits_smt run: its config (teacher none) is compared with the recipe's, and a
    run trained otherwise is refused."""
    from onestep.config import find_config, load_config

    overrides = [f"output_dir={tmp_path}", "name=smt", "train.steps=2", "data.batch_size=4", "train.progress=false",
                 "train.checkpoint_every=2", "objective.generator_warmup=1"]
    Trainer(load_config(find_config("digits_smt"), overrides)).fit()
    bench = benchmark_module("objectives")
    teacher, student, steps, _ = bench.finished_run(tmp_path / "smt", load_config(find_config("digits_smt"), overrides))
    assert teacher is None and steps == 2 and not student.training
    with pytest.raises(SystemExit, match="generator_warmup=1 "):
        bench.finished_run(tmp_path / "smt", load_config(find_config("digits_smt"), overrides[:-1]))
    # where it ran and what it saved along the way are not training; a default spelled out is the default
    same = [*overrides[:-2], "train.checkpoint_every=1", "train.sample_steps=[1]", "eval.seed=7", "name=other",
            "objective.generator_warmup=1", f"objective.sigma_data={SMTConfig().sigma_data}"]
    assert bench.finished_run(tmp_path / "smt", load_config(find_config("digits_smt"), same))[2] == 2


def test_benchmark_train_seconds_across_resumes():
    """benchmarks/objectives.py --from-run counts each resumed segment up to where the next picks up:
    a run killed at step 30 after a checkpoint at 20 and resumed there took 20 s + the resumed 25 s."""
    train_seconds = benchmark_module("objectives").train_seconds

    first = [{"step": s, "time_s": float(s)} for s in (10, 20, 30)]          # killed after 30, checkpoint 20
    resumed = [{"step": s, "time_s": float(s - 20) + 5} for s in (30, 40)]   # restarts its clock at step 20
    assert train_seconds(first) == 30.0
    assert train_seconds(first + resumed) == 20.0 + 25.0


def test_every_group_follows_the_runs_lr_schedule(tmp_path):
    """f-distill updates its generator every third step (critic_per_generator 2): each group's update at step s
    uses base_lr(group) * lr_factor(s), the run's clock, so the generator's LR also decays to ~0 over
    the last decay_steps (counting its own updates instead, it would still be at its full LR)."""
    cfg = gmm_cfg(tmp_path, "groups", 12, **{"objective.name": "fdistill", "objective.critic_per_generator": 2,
                                               "objective.lr": 1e-3, "objective.fake_score_lr": 2e-3,
                                               "train.warmup_steps": 2, "train.decay_steps": 6})
    t = Trainer(cfg)
    seen = []
    for g, opt in t.optimizers.items():
        def record(*a, _g=g, _opt=opt, _step=opt.step, **k):
            seen.append((t.step, _g, _opt.param_groups[0]["lr"]))
            return _step(*a, **k)
        opt.step = record
    t.fit()
    assert t.base_lr["student"] == 1e-3 and t.base_lr["fake_score"] == 2e-3
    assert {g for _, g, _ in seen} == set(t.base_lr) and {"student", "fake_score"} <= set(t.base_lr)
    for step, g, lr in seen:
        assert lr == pytest.approx(t.base_lr[g] * t.lr_factor(step), rel=1e-12), (step, g)
    generator = [(s, lr) for s, g, lr in seen if g == "student"]
    assert [s for s, _ in generator] == [2, 5, 8, 11] and generator[-1][1] == pytest.approx(1e-3 / 6)
    # metrics.jsonl logs every group's LR at the step just taken
    rows = [json.loads(l) for l in (tmp_path / "groups" / "metrics.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:
        for g in t.base_lr:
            assert r[f"lr/{g}"] == pytest.approx(t.base_lr[g] * t.lr_factor(r["step"] - 1), rel=1e-12), (r["step"], g)


def test_objective_milestones_are_always_saved_and_never_pruned(tmp_path):
    """Lightning declares its stage ends as milestones: a run with stage_iters [3, 2, 2] saving every 4th step and
    keeping 1 checkpoint ends with the stage ends 3, 5, 7 (7 is also the last step) and the newest other one, 4."""
    from onestep.checkpoint import finished_checkpoints

    cfg = gmm_cfg(tmp_path, "stages", 7, **{
        "objective.name": "lightning", "objective.teacher_steps": 8,
        "objective.stages": "[4,2,1]", "objective.stage_iters": "[3,2,2]", "objective.mse_stages": 1,
        "train.checkpoint_every": 4, "train.keep_checkpoints": 1, "train.sample_steps": "[1]"})
    trainer = Trainer(cfg).fit()
    assert trainer.objective.milestones() == [3, 5, 7]
    assert [int(p.name[5:]) for p in finished_checkpoints(trainer.ckpt_dir)] == [3, 4, 5, 7]
