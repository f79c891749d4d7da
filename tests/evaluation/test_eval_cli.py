"""`onestep eval fid` and `onestep bench latency` on a tiny finished run: score files carry the full
protocol, the scored samples are the run's student samples, bad input is one line and exit 2."""
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from onestep.evaluation.report import PROTOCOL_KEYS

from onestep.cli import main
from onestep.config import load_config
from onestep.trainer import Trainer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))  # reference statistics cache


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, add_attention=False)
    unet.save_pretrained(root / "teacher")
    cfg = load_config("demo", [f"output_dir={root}", "name=tiny", f"teacher.path={root / 'teacher'}",
                               "train.steps=1", "train.checkpoint_every=1", "data.batch_size=4",
                               "train.progress=false", "train.sample_every=0", "train.sample_steps=[1]"])
    Trainer(cfg).fit()
    return root / "tiny"


@pytest.fixture(scope="module")
def digits_ref(tmp_path_factory):
    from onestep.data import load_digits

    path = tmp_path_factory.mktemp("ref") / "digits_train.npz"
    np.savez(path, images=load_digits("train").images[:300].numpy())
    return path


def test_eval_fid_on_a_run(run_dir, digits_ref, tmp_path, capsys):
    from onestep.evaluation.fid import compute_fid, load_images
    from onestep.evaluation.generate import shard_generator

    from onestep.runs import load_run, load_student

    out = tmp_path / "fid"
    args = ["eval", "fid", "--run", str(run_dir), "--reference", str(digits_ref), "--features", "digits",
            "--backend", "torchmetrics", "--num-samples", "40", "--shard-size", "16", "--batch-size", "16",
            "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    score = json.loads((out / "fid.json").read_text())
    assert set(PROTOCOL_KEYS) <= set(score["protocol"])
    p = score["protocol"]
    assert (p["num_generated"], p["num_reference"], p["steps"], p["backend"]) == (40, 300, 2, "torchmetrics")
    assert p["feature_extractor"] == "digits-cnn-128" and len(p["feature_extractor_sha256"]) == 64
    assert p["versions"]["torch"] == torch.__version__ and (out / "grid.png").is_file()
    # the scored images are the student's 2-step samples of shard 0's noise
    student, teacher = load_student(load_run(run_dir))
    noise = torch.randn((16, 1, 16, 16), generator=shard_generator(0, 0))
    expected = ((student.sample(noise, steps=2).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    got = load_images(out / "samples")[:16, :, :, 0]
    assert np.abs(got.astype(int) - expected[:, 0].numpy().astype(int)).max() <= 1
    again = compute_fid(out / "samples", digits_ref, backend="torchmetrics", features="digits")
    assert again["scores"]["fid"] == pytest.approx(score["scores"]["fid"], rel=1e-6)
    # a second run resumes: nothing to generate, same score
    assert main(args) == 0
    assert json.loads((out / "fid.json").read_text())["scores"]["fid"] == pytest.approx(score["scores"]["fid"])


def test_bench_latency(run_dir, tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--run", str(run_dir), "--teacher-steps", "4", "--student-steps", "1,2",
                 "--batch-size", "8", "--warmup", "1", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["scores"]["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("teacher", 4), ("student", 1), ("student", 2)]
    assert all(r["ms_per_image"] > 0 and len(r["times_ms"]) == 2 for r in rows)
    assert "| student | 1 | 8 |" in capsys.readouterr().out


@pytest.mark.parametrize("extra,words", [
    (["--images", "x"], "either --run"),
    (["--reference", "cifar10-train", "--features", "digits"], "needs --features inception"),
    (["--backend", "nope"], "backend"),
    (["--reference", "cifar10-train", "--inception-weights", "/nonexistent/inc.pt"], "/nonexistent/inc.pt"),
    (["--model", "teacher", "--guidance", "2", "--reference", "missing.npz"], "not found"),
    (["--device", "tpu9"], "--device must be"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nope"], "--device"),
])
def test_bad_input_is_one_line_exit_2(run_dir, digits_ref, tmp_path, capsys, extra, words):
    args = ["eval", "fid", "--run", str(run_dir), "--num-samples", "8", "--shard-size", "8",
            "--out", str(tmp_path / "o")]
    if "--reference" not in extra:
        args += ["--reference", str(digits_ref), "--features", "digits"]
    capsys.readouterr()
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o").exists()  # checked before anything was generated


def test_latency_bad_steps(run_dir, capsys):
    assert main(["bench", "latency", "--run", str(run_dir), "--student-steps", "1,x"]) == 2
    assert "--student-steps" in capsys.readouterr().err


def test_eval_clip_and_geneval_on_image_folders(tmp_path, capsys):
    from onestep.evaluation.clip_score import clip_score
    from PIL import Image
    from test_eval_clip_score import tiny_clip
    from test_eval_geneval import tiny_mask2former

    clip = tiny_clip(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\nthe dog\na red cat\n")
    out = tmp_path / "clip_out"
    assert main(["eval", "clip", "--images", str(folder), "--prompts", str(prompts), "--clip-model", str(clip),
                 "--out", str(out)]) == 0
    score = json.loads((out / "clip.json").read_text())
    assert set(PROTOCOL_KEYS) <= set(score["protocol"])
    expected = clip_score(images, ["a cat", "the dog", "a red cat"], model=clip)["clip_score"]
    assert score["scores"]["clip_score"] == pytest.approx(expected, rel=1e-5)
    # GenEval layout, scored with a tiny random Mask2Former and CLIP: the pipeline runs end to end
    gen = tmp_path / "geneval_imgs"
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    (gen / "00000" / "samples").mkdir(parents=True)
    (gen / "00000" / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
    for i in range(2):
        Image.fromarray(images[i]).save(gen / "00000" / "samples" / f"{i:04d}.png")
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text(json.dumps(meta) + "\n")
    out = tmp_path / "geneval_out"
    assert main(["eval", "geneval", "--images", str(gen), "--metadata", str(metadata), "--detector",
                 str(tiny_mask2former(tmp_path / "m2f")), "--detector-size", "64,96", "--clip-model", str(clip),
                 "--out", str(out)]) == 0
    result = json.loads((out / "geneval.json").read_text())
    assert result["scores"]["num_images"] == 2 and set(result["scores"]["tasks"]) == {"single_object"}
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 and (out / "grid.png").is_file()
    assert set(PROTOCOL_KEYS) <= set(result["protocol"])
    capsys.readouterr()
    assert main(["eval", "clip", "--images", str(folder), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "--prompts" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A tiny Stable Diffusion teacher (random weights) and a run holding its student, untrained."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file
    from tiny_models import clip_text_encoder, clip_tokenizer, tiny_sd_unet, tiny_vae

    from onestep.build import build_student, build_teacher
    from onestep.checkpoint import write_checksums
    from onestep.config import to_yaml

    root = tmp_path_factory.mktemp("sdrun")
    tok = clip_tokenizer(root / "vocab")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok,
                                   unet=tiny_sd_unet(), scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    cfg = load_config(None, [f"output_dir={root}", "name=sd", "teacher.name=stable_diffusion",
                             f"teacher.path={root / 'sd'}"])
    run = root / "sd"
    run.mkdir(exist_ok=True)
    ckpt = run / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    params = {k: v.detach().contiguous() for k, v in build_student(cfg, build_teacher(cfg)).named_parameters()}
    save_file(params, ckpt / "ema.safetensors")
    save_file({f"student.{k}": v for k, v in params.items()}, ckpt / "trainable.safetensors")
    write_checksums(ckpt)
    return run


def test_clip_and_geneval_generate_from_a_text_to_image_run(sd_run, tmp_path):
    from onestep.evaluation.clip_score import clip_score
    from onestep.evaluation.fid import load_images
    from test_eval_clip_score import tiny_clip
    from test_eval_geneval import tiny_mask2former

    clip = tiny_clip(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\nthe dog\n")
    out = tmp_path / "clip"
    assert main(["eval", "clip", "--run", str(sd_run), "--prompts", str(prompts), "--clip-model", str(clip),
                 "--out", str(out), "--batch-size", "2"]) == 0
    score = json.loads((out / "clip.json").read_text())
    images = load_images(out / "samples")
    assert images.shape[0] == 2 and score["protocol"]["steps"] == 1 and score["protocol"]["model"] == "student"
    assert score["scores"]["clip_score"] == pytest.approx(
        clip_score(images, ["a cat", "the dog"], model=clip)["clip_score"], rel=1e-5)
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(json.dumps({"tag": "two_object", "include": [{"class": "cat", "count": 1},
                                                                 {"class": "dog", "count": 1}],
                                "prompt": "a photo of a cat and a dog"}) + "\n")
    out = tmp_path / "geneval"
    assert main(["eval", "geneval", "--run", str(sd_run), "--metadata", str(meta), "--images-per-prompt", "2",
                 "--detector", str(tiny_mask2former(tmp_path / "m2f")), "--detector-size", "64,96",
                 "--clip-model", str(clip), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images" / "00000" / "samples").iterdir()) == ["0000.png", "0001.png"]
    result = json.loads((out / "geneval.json").read_text())
    assert result["scores"]["num_images"] == 2 and result["protocol"]["seeds"]["seed"] == 0


def test_geneval_refuses_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under accelerate launch / torchrun
    assert main(["eval", "geneval", "--images", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one process" in err
