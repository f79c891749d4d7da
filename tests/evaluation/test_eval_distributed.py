"""`onestep eval fid` and `eval clip` under torchrun with 2 CPU processes (gloo) give the scores of 1
process (FID to 1e-6; precision/recall, density/coverage and CLIP exactly), while each process
generates and extracts only its share: sample shards and image chunks c with c mod 2 = its rank."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from onestep.cli import main
from onestep.config import load_config
from onestep.trainer import Trainer

HERE = Path(__file__).resolve().parent
N, SHARD, REF = 40, 16, 300  # 3 shards (16, 16, 8): process 0 makes shards 0 and 2, process 1 shard 1
IMAGES, CHUNK = 30, 4  # 8 chunks of an image folder: 0, 2, 4, 6 (16 images) and 1, 3, 5, 7 (14)
WORK = re.compile(r"process (\d) of 2 \(cpu\): generated shards \[([\d, ]*)\]; features of (\d+) reference "
                  r"and (\d+) scored images")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run trained for one step, 300 digits as the reference, 5 images with prompts and a tiny CLIP."""
    from onestep.evaluation.fid import to_uint8_images
    from test_eval_clip_score import tiny_clip

    from onestep.data import load_digits

    root = tmp_path_factory.mktemp("evaldist")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False)
    unet.save_pretrained(root / "teacher")
    cfg = load_config("demo", [f"output_dir={root}", "name=tiny", f"teacher.path={root / 'teacher'}",
                               "train.steps=1", "train.checkpoint_every=1", "data.batch_size=4",
                               "train.progress=false", "train.sample_every=0", "train.sample_steps=[1]"])
    Trainer(cfg).fit()
    np.savez(root / "ref.npz", images=load_digits("train").images[:REF].numpy())
    # held-out digits as PNG files: a folder whose precision/recall against the reference is not 0 or 1
    folder = root / "images"
    folder.mkdir()
    for i, im in enumerate(to_uint8_images(load_digits("heldout").images[:IMAGES])):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    words = ["a cat", "the dog", "a red cat", "two dogs", "a bird"]
    (root / "prompts.txt").write_text("".join(f"{words[i % 5]} {i}\n" for i in range(IMAGES)))
    return {"root": root, "run": root / "tiny", "ref": root / "ref.npz", "images": folder,
            "prompts": root / "prompts.txt", "clip": tiny_clip(root)}


def commands(s: dict, tag: str) -> list[list[str]]:
    """fid of the run's samples, fid of an image folder (the first command's samples: the cache of
    the reference is then used), CLIP of an image folder; --device left at auto."""
    out = s["root"] / tag
    fid = ["eval", "fid", "--reference", str(s["ref"]), "--features", "digits", "--backend", "torchmetrics",
           "--shard-size", str(SHARD), "--batch-size", "8"]
    return [fid + ["--run", str(s["run"]), "--num-samples", str(N), "--steps", "2", "--out", str(out / "fid-run")],
            fid + ["--images", str(s["images"]), "--shard-size", str(CHUNK), "--out", str(out / "fid-images")],
            ["eval", "clip", "--images", str(s["images"]), "--prompts", str(s["prompts"]), "--clip-model",
             str(s["clip"]), "--shard-size", str(CHUNK), "--batch-size", "3", "--out", str(out / "clip")]]


def torchrun(argvs: list[list[str]], cmd_file: Path, cache: Path) -> str:
    """Run `onestep` command lines in 2 processes (tests/evaluation/eval_distributed_worker.py); their stdout."""
    cmd_file.write_text(json.dumps(argvs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ONESTEP_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "eval_distributed_worker.py"), str(cmd_file)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((cmd_file.parent / f"{cmd_file.stem}-rank{rank}.json").read_text()) == [0] * len(argvs)
    return proc.stdout


@pytest.fixture(scope="module")
def one_and_two(setup):
    """The commands in this process (1 process), then in one torchrun launch with 2 processes, each
    with a fresh reference cache; returns (the two output roots, the 2-process stdout)."""
    root = setup["root"]
    saved = os.environ.get("ONESTEP_CACHE")
    os.environ["ONESTEP_CACHE"] = str(root / "cache1")
    try:
        assert [main(argv) for argv in commands(setup, "one")] == [0, 0, 0]
    finally:
        os.environ.pop("ONESTEP_CACHE") if saved is None else os.environ.__setitem__("ONESTEP_CACHE", saved)
    stdout = torchrun(commands(setup, "two"), root / "two.json", root / "cache2")
    return root / "one", root / "two", stdout


def scores(path: Path) -> dict:
    return json.loads(path.read_text())["scores"]


def test_two_processes_score_as_one(one_and_two):
    one, two, _ = one_and_two
    for name in ("fid-run", "fid-images"):
        a, b = scores(one / name / "fid.json"), scores(two / name / "fid.json")
        assert a["fid"] > 1.0 and abs(a["fid"] - b["fid"]) <= 1e-6, (name, a, b)
        for key in ("precision", "recall", "density", "coverage"):  # counts over the same features: exact
            assert a[key] == b[key], (name, key)
    digits = scores(two / "fid-images" / "fid.json")
    assert all(0 < digits[key] < 1 for key in ("precision", "recall", "coverage")), digits  # not degenerate
    a, b = scores(one / "clip" / "clip.json"), scores(two / "clip" / "clip.json")
    assert a == b and a["num_images"] == IMAGES and a["clip_score"] > 0
    protocol = json.loads((two / "fid-run" / "fid.json").read_text())["protocol"]
    assert protocol["processes"] == 2 and protocol["num_generated"] == N and protocol["num_reference"] == REF
    assert protocol["device"] == "cpu"  # --device auto on a machine without CUDA


def test_each_process_did_its_share(one_and_two):
    from onestep.evaluation.fid import load_images

    one, two, stdout = one_and_two
    work = [(int(r), g, int(ref), int(gen)) for r, g, ref, gen in WORK.findall(stdout)]
    fid_run, fid_images, clip = (sorted(work[i:i + 2]) for i in (0, 2, 4))
    assert len(work) == 6, stdout
    # 300 reference digits in chunks of 16: 10 chunks (9 x 16 + 12) for process 0, 9 for process 1
    assert fid_run == [(0, "0, 2", 156, 24), (1, "1", 144, 16)]
    # the reference is cached now; the image folder's chunks of 4 alternate between the processes
    assert fid_images == [(0, "", 0, 16), (1, "", 0, 14)]
    assert clip == [(0, "", 0, 16), (1, "", 0, 14)]
    assert stdout.count("written to") == 3  # only the main process writes and reports the scores
    # the 2 processes made exactly the samples of 1 process
    np.testing.assert_array_equal(load_images(two / "fid-run" / "samples"), load_images(one / "fid-run" / "samples"))


def test_a_lost_share_would_change_the_fid(one_and_two, setup):
    """The 1e-6 agreement is a real check: without process 1's shard the FID moves by far more."""
    from onestep.evaluation.fid import (
        DigitsImageFeatures,
        image_features,
        load_images,
        reference_statistics,
        torchmetrics_frechet,
    )

    one, _, _ = one_and_two
    extractor = DigitsImageFeatures()
    ref = reference_statistics(setup["ref"], extractor, "torchmetrics", cache_dir=setup["root"] / "cache3")
    feats = image_features(load_images(one / "fid-run" / "samples"), extractor, "torchmetrics")
    full = torchmetrics_frechet(feats, ref["mu"], ref["sigma"], ref["n"], feats.shape[1])
    assert full == pytest.approx(scores(one / "fid-run" / "fid.json")["fid"], rel=1e-6)
    without = np.concatenate([feats[:SHARD], feats[2 * SHARD:]])  # shard 1 dropped
    assert abs(torchmetrics_frechet(without, ref["mu"], ref["sigma"], ref["n"], feats.shape[1]) - full) > 1e-3


@pytest.mark.slow
def test_a_command_launched_alone(one_and_two, setup):
    """`onestep eval fid` as `accelerate launch` runs it: alone in its processes, starting the process
    group itself and ending it (after all processes are done) when it returns."""
    one, _, _ = one_and_two
    root = setup["root"]
    stdout = torchrun(commands(setup, "alone")[:1], root / "alone.json", root / "cache4")
    work = sorted((int(r), g, int(ref), int(gen)) for r, g, ref, gen in WORK.findall(stdout))
    assert work == [(0, "0, 2", 156, 24), (1, "1", 144, 16)] and stdout.count("written to") == 1
    assert scores(root / "alone" / "fid-run" / "fid.json") == scores(one / "fid-run" / "fid.json")
