"""The --dry-run estimate's activation term: LiveBytes counts what a pass holds at once (closed form on a chain of
matrix products), and the trace on fake tensors (no memory) counts exactly what the same pass on real tensors
holds, for a latent teacher loaded through its adapter from a local folder's configs. benchmarks/full_size.py
compares the whole estimate with peak memory measured at full size."""
import torch
from onestep.teachers.tiny import save_tiny_teacher

from onestep.config import load_config
from onestep.dryrun import LiveBytes, activation_bytes


def test_live_bytes_counts_what_is_held_at_once():
    a = torch.randn(64, 64)
    w = torch.randn(64, 64)
    with LiveBytes() as mode:
        h1 = a @ w            # 16 KiB
        h2 = h1 @ w           # 16 KiB
        view = h2[:32]        # a view: no new storage
        h3 = h2 @ w           # 16 KiB: 48 KiB alive at once
        del h1, h2            # h2's storage lives on in the view
        h4 = h3 @ w           # 16 KiB: 48 KiB again, not more
        assert mode.live == 3 * 64 * 64 * 4
        del view, h3
        assert mode.live == 64 * 64 * 4
    assert mode.peak == 3 * 64 * 64 * 4 and h4.shape == (64, 64)


def test_fake_trace_counts_what_the_real_pass_holds(tmp_path):
    """The same training pass (a LoRA student with gradient checkpointing under bf16 autocast, the recipe's batch) of
    a denoiser built from a local folder's config: traced on fake tensors, and run for real."""
    from onestep.dryrun import _full_size_spec, meta_free_model, training_pass_bytes

    teacher = save_tiny_teacher("sd3", {"name": "sd3"}, tmp_path / "sd3")
    overrides = [f"teacher.{k}={'null' if v is None else v}" for k, v in teacher.items()] + [
        "data.name=prompts", f"data.path={tmp_path / 'p.txt'}", "data.teacher_steps=1", "data.batch_size=2",
        "student.lora_rank=4", "student.gradient_checkpointing=true", "train.mixed_precision=bf16",
        "objective.name=splitmeanflow"]
    cfg = load_config(None, overrides)
    traced = activation_bytes(cfg)
    spec, source = _full_size_spec(cfg)
    assert str(tmp_path) in source                               # the folder's own config files
    torch.manual_seed(0)
    real = training_pass_bytes(meta_free_model(*spec["denoiser"]), cfg, spec, torch.float32)
    assert real > 0 and traced == real
