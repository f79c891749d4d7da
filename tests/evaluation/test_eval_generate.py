"""Sharded sample files: deterministic per (seed, shard), resumable after an interruption with the
same samples as an uninterrupted run, refused with other settings."""
import numpy as np
import pytest
import torch
from onestep.evaluation.fid import FIDInputError, load_images
from onestep.evaluation.generate import GenerationError, generate_shards


def sampler(calls, fail_after=None):
    def sample(noise, cond):
        calls.append(len(noise))
        if fail_after is not None and len(calls) > fail_after:
            raise KeyboardInterrupt  # an interruption in the middle of a run
        return torch.tanh(noise.repeat(1, 3, 1, 1) + (0 if cond is None else cond[:, None, None, None] / 10))
    return sample


def test_resume_after_interruption_gives_the_same_samples(tmp_path):
    kw = dict(num_samples=23, noise_shape=(1, 4, 4), shard_size=5, batch_size=2, seed=7, num_classes=10, progress=False)
    full_calls = []
    generate_shards(sampler(full_calls), tmp_path / "full", **kw)
    full = load_images(tmp_path / "full")
    assert full.shape == (23, 4, 4, 3) and full.dtype == np.uint8
    calls = []
    with pytest.raises(KeyboardInterrupt):
        generate_shards(sampler(calls, fail_after=7), tmp_path / "cut", **kw)  # dies inside shard 2
    assert len(list((tmp_path / "cut").glob("shard-*.npz"))) == 2
    with pytest.raises(FIDInputError, match="resume"):
        load_images(tmp_path / "cut")
    more = []
    generate_shards(sampler(more), tmp_path / "cut", **kw)
    assert sum(more) == 23 - 10  # only the missing shards were generated
    np.testing.assert_array_equal(load_images(tmp_path / "cut"), full)


def test_other_settings_are_refused(tmp_path):
    kw = dict(num_samples=4, noise_shape=(1, 2, 2), shard_size=2, progress=False)
    generate_shards(sampler([]), tmp_path, settings={"steps": 1}, **kw)
    with pytest.raises(GenerationError, match="settings"):
        generate_shards(sampler([]), tmp_path, settings={"steps": 2}, **kw)
    with pytest.raises(GenerationError, match="seed"):
        generate_shards(sampler([]), tmp_path, settings={"steps": 1}, seed=1, **kw)
