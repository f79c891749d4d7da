"""FSDP2 and DeepSpeed ZeRO-2 for real: two CPU processes (gloo, torchrun) with onestep's sharded strategies
train exactly like one process with the doubled batch, the frozen teacher sharded too (FSDP), its samples as
data (each process samples only its own rows: half the teacher work), checkpoints holding whole state dicts
gathered collectively (weights, EMA, optimizer state), clipping by the global norm; a sharded checkpoint
resumes in one process and exports to a stock diffusers pipeline. Not through accelerate's own plugins, which
fall back to DDP on a CPU: the test checks what wrapped the model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onestep.trainer import Trainer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sharded_worker import BATCH, EVERY, STEPS, sharded_cfg  # noqa: E402

ACCELERATE_CONFIGS = HERE.parents[1] / "configs" / "accelerate"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from onestep.teachers.tiny import save_tiny_teacher

    folder = tmp_path_factory.mktemp("teacher")
    save_tiny_teacher("unet", {"name": "unet"}, folder)
    return folder


def launch(out: Path, teacher: Path, config: str, label: str, *objectives: str) -> None:
    """`accelerate launch` with a shipped accelerate config, as a user starts a multi-GPU run (2 CPU processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", str(HERE / "sharded_worker.py"), str(out), str(teacher),
           label, *objectives]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("fsdp")
    launch(out, tiny_teacher, "fsdp", "fsdp", "splitmeanflow", "fdistill")
    return out


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("deepspeed")
    launch(out, tiny_teacher, "deepspeed_zero2", "deepspeed", "splitmeanflow", "fdistill")
    return out


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, tiny_teacher):
    """The references: one process (no sharding), the doubled batch."""
    out = tmp_path_factory.mktemp("single")
    runs = {}
    for objective in ("splitmeanflow", "fdistill"):
        t = Trainer(sharded_cfg(out, tiny_teacher, objective, 2 * BATCH, STEPS, "ddp"))
        t.fit(resume=False)
        runs[objective] = t
    return out, runs


def checkpoint(run: Path, step: int) -> dict:
    ck = run / "checkpoints" / f"step-{step:06d}"
    tensors = {f"trainable/{k}": v for k, v in load_file(ck / "trainable.safetensors").items()}
    tensors.update({f"ema/{k}": v for k, v in load_file(ck / "ema.safetensors").items()})
    for f in sorted(ck.glob("optim-*.pt")):
        state = torch.load(f, weights_only=True)
        for name, entry in state["state"].items():
            for k, v in entry.items():
                tensors[f"{f.stem}/{name}/{k}"] = torch.as_tensor(v, dtype=torch.float64)
    return tensors


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    assert all(a[k].shape == b[k].shape for k in a)         # whole tensors, not shards
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def grad_norms(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [v for row in rows for k, v in sorted(row.items()) if k.startswith("grad_norm/")]


def logged(run: Path, key: str) -> list[float]:
    return [row[key] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in row]


def rank_record(out: Path, objective: str, strategy: str, rank: int) -> dict:
    return json.loads((out / f"{objective}-{strategy}-rank{rank}.json").read_text())


@pytest.mark.parametrize("objective", ["splitmeanflow", "fdistill"])
def test_fsdp_two_processes_equal_one_with_the_doubled_batch(fsdp_runs, single_runs, objective):
    single_out, single = single_runs
    for rank in (0, 1):
        assert rank_record(fsdp_runs, objective, "fsdp", rank)["strategy"] == "FullyShardedDataParallel"
    for step in (EVERY, STEPS):
        ours, ref = checkpoint(fsdp_runs / f"{objective}-fsdp", step), checkpoint(single_out / f"{objective}-ddp", step)
        assert max_diff(ours, ref) <= 1e-5, step
    groups = {k.split("/")[0] for k in ref}
    assert {"trainable", "ema", "optim-student"} <= groups and (objective != "fdistill" or "optim-fake_score" in groups)
    # it trained: the comparison can fail
    start = checkpoint(single_out / f"{objective}-ddp", EVERY)
    assert max((ref[k].double() - start[k].double()).abs().max().item()
               for k in ref if k.startswith("trainable/")) > 1e-4
    ours_norms, ref_norms = grad_norms(fsdp_runs / f"{objective}-fsdp"), grad_norms(single_out / f"{objective}-ddp")
    assert len(ours_norms) == len(ref_norms) > 0
    assert max(abs(a - b) / b for a, b in zip(ours_norms, ref_norms)) <= 1e-4
    # the logged loss is the run's, not rank 0's share of it
    ours_loss, ref_loss = (logged(fsdp_runs / f"{objective}-fsdp", "loss"),
                           logged(single_out / f"{objective}-ddp", "loss"))
    assert len(ours_loss) == len(ref_loss) == STEPS
    assert max(abs(a - b) / max(abs(b), 1e-3) for a, b in zip(ours_loss, ref_loss)) <= 1e-4


def test_clipping_acts_and_uses_the_global_norm(fsdp_runs, single_runs):
    single_out, _ = single_runs
    ours, ref = grad_norms(fsdp_runs / "splitmeanflow-fsdp"), grad_norms(single_out / "splitmeanflow-ddp")
    assert len(ours) == len(ref) == STEPS
    assert min(ref) > 0.05              # train.clip_grad_norm=0.05 clips at every step
    assert max(abs(a - b) / b for a, b in zip(ours, ref)) <= 1e-4   # a shard's own norm would be ~1/sqrt(2) of it


def test_each_process_samples_only_its_rows_of_teacher_data(fsdp_runs, single_runs):
    _, single = single_runs
    one = single["splitmeanflow"].data.teacher_passes
    per_rank = [rank_record(fsdp_runs, "splitmeanflow", "fsdp", r)["teacher_rows"] for r in (0, 1)]
    assert one == STEPS * 2 * BATCH * 2                 # steps x doubled batch x teacher_steps
    assert per_rank == [one // 2, one // 2]


def test_a_sharded_checkpoint_resumes_in_one_process(fsdp_runs, single_runs, tmp_path, tiny_teacher):
    import shutil

    single_out, _ = single_runs
    run = tmp_path / "splitmeanflow-ddp"
    shutil.copytree(fsdp_runs / "splitmeanflow-fsdp", run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:06d}")          # resume from step 10 of the 2-process run
    resumed = Trainer(sharded_cfg(tmp_path, tiny_teacher, "splitmeanflow", 2 * BATCH, STEPS, "ddp")).fit(resume=True)
    assert resumed.step == STEPS
    assert max_diff(checkpoint(run, STEPS), checkpoint(single_out / "splitmeanflow-ddp", STEPS)) <= 1e-5


def test_a_sharded_checkpoint_exports_to_stock_diffusers(fsdp_runs, single_runs, tmp_path):
    from diffusers import DiffusionPipeline

    from onestep.export import export_run

    single_out, _ = single_runs
    images = []
    for run, name in ((fsdp_runs / "splitmeanflow-fsdp", "sharded"), (single_out / "splitmeanflow-ddp", "single")):
        out = export_run(run, tmp_path / name, steps=1)
        pipe = DiffusionPipeline.from_pretrained(out)
        images.append(pipe(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                           output_type="np").images)
    assert images[0].shape == (2, 8, 8, 3)
    assert abs(images[0] - images[1]).max() <= 1e-4


def test_deepspeed_two_processes_equal_one_with_the_doubled_batch(deepspeed_runs, single_runs):
    single_out, _ = single_runs
    for rank in (0, 1):
        assert rank_record(deepspeed_runs, "splitmeanflow", "deepspeed", rank)["strategy"] == "DeepSpeedZero2"
    for step in (EVERY, STEPS):
        ours = checkpoint(deepspeed_runs / "splitmeanflow-deepspeed", step)
        assert max_diff(ours, checkpoint(single_out / "splitmeanflow-ddp", step)) <= 1e-5, step


def test_deepspeed_refuses_objectives_with_several_optimizer_groups(deepspeed_runs):
    message = rank_record(deepspeed_runs, "fdistill", "deepspeed", 0)["refused"]
    assert "train.distributed=deepspeed" in message and "fake_score" in message and "\n" not in message
