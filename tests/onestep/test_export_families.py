"""`onestep export` of students of the standard pipelines (SD1.x, SDXL, SD3, FLUX, pixel DDPM) and LoRA.

Each run is a tiny teacher pipeline saved to a folder, a run directory whose checkpoint holds the
student (the teacher's backbone copy + interval MLP) with perturbed weights, so that a pipeline that
ignored the student's training or its t - r embedding would fail. The exported folders are loaded in a
process where `import onestep` fails and compared with onestep's own k-step sampler for the same
prompt and noise."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_export import NO_ONESTEP as BLOCK_ONESTEP
from test_export import snippet
from tiny_models import clip_text_encoder, clip_tokenizer, t5_encoder, tiny_sd_unet, tiny_vae

from onestep.build import build_student, build_teacher
from onestep.checkpoint import write_checksums
from onestep.cli import main
from onestep.config import load_config, to_yaml
from onestep.export import ExportError, export_run
from onestep.runs import load_run, load_student

TOL = 1e-4
PROMPT = "a cat"
SEQ = 16  # max_sequence_length of the T5 prompts
SIDE = 16  # image side: 8x8 latents


def _randomise(module, scale=0.05, seed=0):
    """diffusers zero-initialises output layers: random weights everywhere, so equalities are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _ddim(prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    # SD's own config: leading spacing, steps_offset 1, final alpha_bar of step 0
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def _sd(tok):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok)), tokenizer=tok,
                                   unet=tiny_sd_unet(), scheduler=_ddim("epsilon"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _sdxl(tok):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1),
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=12, seed=2), tokenizer=tok, tokenizer_2=tok,
        unet=tiny_sd_unet(cross_attention_dim=16, sdxl_projection=12), scheduler=_ddim("v_prediction"),
        force_zeros_for_empty_prompt=True)


def _sd3(tok):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip_text_encoder(len(tok), hidden=8, projection=8, seed=1), tokenizer=tok,
        text_encoder_2=clip_text_encoder(len(tok), hidden=8, projection=8, seed=2), tokenizer_2=tok,
        text_encoder_3=t5_encoder(len(tok), d_model=16), tokenizer_3=tok)


def _flux(tok):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    # the teacher's own scheduler shifts dynamically: the export must replace it
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                                max_image_seq_len=64)
    return FluxPipeline(transformer=transformer.eval(), scheduler=scheduler,
                        vae=tiny_vae(shift_factor=0.1, scaling_factor=0.3, use_quant_conv=False,
                                     use_post_quant_conv=False),
                        text_encoder=clip_text_encoder(len(tok), hidden=8, seed=1), tokenizer=tok,
                        text_encoder_2=t5_encoder(len(tok), d_model=16), tokenizer_2=tok)


def _sana(tok):
    from onestep.teachers.flow_transformer.tiny import tiny_sana_pipeline

    return tiny_sana_pipeline(tok)


BUILDERS = {"stable_diffusion": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "sana": _sana}
TEACHER_OPTIONS = {"stable_diffusion": [], "sdxl": [],
                   "sd3": [f"teacher.max_sequence_length={SEQ}", "teacher.dtype=float32"],
                   "flux": [f"teacher.max_sequence_length={SEQ}", "teacher.dtype=float32", f"teacher.resolution={SIDE}",
                            "teacher.guidance=2.5"],
                   "sana": [f"teacher.max_sequence_length={SEQ}", "teacher.dtype=float32",
                            "teacher.resolution=32"]}  # SanaPipeline wants sides divisible by 32
#: what a user passes to run the student (guidance off; FLUX-dev's embedded scale is the teacher's)
CALLS = {"stable_diffusion": dict(guidance_scale=1.0), "sdxl": dict(guidance_scale=1.0),
         "sd3": dict(guidance_scale=1.0, max_sequence_length=SEQ),
         "flux": dict(guidance_scale=2.5, max_sequence_length=SEQ),
         "sana": dict(guidance_scale=1.0, max_sequence_length=SEQ, use_resolution_binning=False)}
STEPS = {"stable_diffusion": (1,), "sdxl": (1,), "sd3": (1, 2), "flux": (1, 2), "sana": (2,)}


def _perturb_full(student, seed):
    _randomise(student.backbone, scale=0.02, seed=seed)
    _randomise(student.interval_embedding, scale=0.5, seed=seed + 100)


def _perturb_low_rank(student, seed):
    """A delta LoRA can carry exactly: rank-1 changes of a few Linear/Conv weights, a changed bias, and
    the interval embedding (which folds into the time embedding's bias)."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in student.backbone.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in layers[::3]:
            w = m.weight.reshape(m.weight.shape[0], -1)
            u, v = torch.randn(w.shape[0], 1, generator=gen), torch.randn(1, w.shape[1], generator=gen)
            m.weight.add_((0.1 * u @ v).reshape(m.weight.shape))
        layers[1].bias.add_(torch.randn(layers[1].bias.shape, generator=gen) * 0.1)
    _randomise(student.interval_embedding, scale=0.5, seed=seed + 100)


def make_run(root: Path, family: str, teacher_path, perturb=_perturb_full, name=None, extra=()) -> Path:
    """A run directory with config.yaml and one checkpoint (step 1) holding a perturbed student."""
    name = name or family
    cfg = load_config(None, [f"output_dir={root}", f"name={name}", f"teacher.name={family}",
                             f"teacher.path={teacher_path}", *TEACHER_OPTIONS.get(family, []), *extra])
    run = root / name
    ckpt = run / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    student = build_student(cfg, build_teacher(cfg))
    perturb(student, seed=7)
    params = {k: v.detach().contiguous() for k, v in student.named_parameters()}
    save_file(params, ckpt / "ema.safetensors")
    save_file({f"student.{k}": v for k, v in params.items()}, ckpt / "trainable.safetensors")
    write_checksums(ckpt)
    return run


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    tok = clip_tokenizer(root / "vocab")
    dirs = {}
    for family, build in BUILDERS.items():
        pipe = build(tok)
        _randomise(getattr(pipe, "unet", None) or pipe.transformer, seed=1)
        pipe.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(scope="module")
def runs(teacher_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {family: make_run(root, family, d) for family, d in teacher_dirs.items()}


@pytest.fixture(scope="module", autouse=True)
def _forget_loaded_students():
    yield
    _LOADED.clear()


_LOADED: dict = {}


def expected_latents(run: Path, steps: int, seed: int, zero_interval: bool = False) -> torch.Tensor:
    """onestep's own k-step sampler of the run's student, for PROMPT and CPU-seeded noise."""
    import copy

    if run not in _LOADED:
        _LOADED[run] = load_student(load_run(run))
    student, teacher = _LOADED[run]
    if zero_interval:  # the student without its interval embedding: a wrong fold would look like this
        student = copy.deepcopy(student)
        with torch.no_grad():
            student.interval_embedding.linear_2.weight.zero_()
            student.interval_embedding.linear_2.bias.zero_()
    noise = torch.randn(1, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
    return student.sample(noise, student.adapter.encode_prompt([PROMPT]), steps=steps), noise


# a process in which importing onestep fails (test_export's preamble), with this file's helpers
NO_ONESTEP = BLOCK_ONESTEP + """
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from safetensors.torch import load_file, save_file

def run(pipe, family, noise, call):
    pipe.set_progress_bar_config(disable=True)
    side = noise.shape[-1] * pipe.vae_scale_factor
    latents = FluxPipeline._pack_latents(noise, *noise.shape) if family == "flux" else noise
    out = pipe(prompt=[%r], latents=latents, output_type="latent", height=side, width=side, **call).images
    return FluxPipeline._unpack_latents(out, side, side, pipe.vae_scale_factor) if family == "flux" else out
""" % PROMPT


def isolated(script: str, cwd: Path):
    # -I: no current directory or PYTHON* variables on the path; onestep stays importable from the venv
    # (editable install), which is why the meta-path blocker is what proves it is not used
    full = NO_ONESTEP + script + ("\nassert not any(m == 'onestep' or m.startswith('onestep.') for m in sys.modules)"
                                  "\nprint('clean')\n")
    proc = subprocess.run([sys.executable, "-I", "-c", full], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("clean"), proc.stderr[-3000:]


#: the default run's exports (SD1.x, SDXL, SD3, FLUX); the slow run exports every family (and SANA) at every k
QUICK = ("stable_diffusion-k1", "sdxl-k1", "sd3-k2", "flux-k2")


@pytest.mark.parametrize("matrix", ["quick", pytest.param("all", marks=pytest.mark.slow)])
def test_stock_pipelines_load_without_onestep_and_match_the_sampler(runs, tmp_path, matrix):
    jobs = {}  # name -> (family, folder, steps, seed)
    for family, run in runs.items():
        for k in STEPS[family]:
            name = f"{family}-k{k}"
            if matrix == "all" or name in QUICK:
                jobs[name] = (family, str(export_run(run, tmp_path / name, steps=k)), k, 10 + k)
    for name, (family, folder, k, seed) in jobs.items():
        index = json.loads((Path(folder) / "model_index.json").read_text())
        expected_cls = {"stable_diffusion": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                        "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline"}[family]
        assert index["_class_name"] == expected_cls, name
    noises = {name: expected_latents(runs[f], k, seed)[1] for name, (f, _, k, seed) in jobs.items()}
    save_file(noises, tmp_path / "noises.safetensors")
    calls = {name: {**CALLS[f], "num_inference_steps": k} for name, (f, _, k, _) in jobs.items()}
    script = f"""
jobs, calls = {({n: (f, d) for n, (f, d, _, _) in jobs.items()})!r}, {calls!r}
noises = load_file("noises.safetensors")
out = {{}}
for name, (family, folder) in jobs.items():
    out[name] = run(DiffusionPipeline.from_pretrained(folder), family, noises[name], calls[name]).contiguous()
save_file(out, "latents.safetensors")
exec(compile({snippet(Path(jobs['sd3-k2'][1]) / 'README.md')!r}, "model card", "exec"))  # the card's snippet
"""
    isolated(script, tmp_path)
    assert (tmp_path / "sample.png").is_file()
    got = load_file(tmp_path / "latents.safetensors")
    for name, (family, _, k, seed) in jobs.items():
        want, _ = expected_latents(runs[family], k, seed)
        diff = (got[name] - want).abs().max().item()
        print(f"\n{name}: max |stock pipeline - onestep sampler| {diff:.2e} (max |latent| {want.abs().max():.2f})")
        assert got[name].shape == want.shape and diff < TOL, name
        wrong, _ = expected_latents(runs[family], k, seed, zero_interval=True)
        assert (got[name] - wrong).abs().max().item() > 1e-3, name  # the interval embedding matters: can fail


@pytest.mark.parametrize("family", ["stable_diffusion", "sdxl"])
def test_vp_students_refuse_more_than_one_step(runs, family, tmp_path):
    with pytest.raises(ExportError, match="only at --steps 1.*--format onestep --steps 2") as e:
        export_run(runs[family], tmp_path / "k2", steps=2)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "k2").exists()
    with pytest.raises(ExportError, match="--format diffusers"):  # flow families need no onestep scheduler
        export_run(runs["sd3"], tmp_path / "os", format="onestep", steps=2)


@pytest.mark.parametrize("family,steps", [("stable_diffusion", 2), ("sdxl", 3)])
def test_vp_students_at_k_steps_run_in_the_stock_pipeline_with_onestep_scheduler(runs, family, steps, tmp_path):
    """--format onestep: the teacher's stock pipeline class with onestep.pipelines.StudentVPScheduler, loaded by
    DiffusionPipeline.from_pretrained (onestep installed), equals the student's k-step sampler."""
    from diffusers import DiffusionPipeline

    out = export_run(runs[family], tmp_path / "os", format="onestep", steps=steps)
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["onestep.pipelines", "StudentVPScheduler"]
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == index["_class_name"] and type(pipe).__module__.startswith("diffusers.")
    want, noise = expected_latents(runs[family], steps, 21)
    got = pipe(prompt=[PROMPT], latents=noise.clone(), num_inference_steps=steps, height=SIDE, width=SIDE,
               output_type="latent", **CALLS[family]).images
    diff = (got - want).abs().max().item()
    print(f"\n{family} k={steps} (StudentVPScheduler): max |pipeline - onestep sampler| {diff:.2e}")
    assert diff < TOL
    wrong, _ = expected_latents(runs[family], steps, 21, zero_interval=True)
    assert (got - wrong).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match=f"num_inference_steps={steps}"):
        pipe(prompt=[PROMPT], num_inference_steps=steps + 1, height=SIDE, width=SIDE, output_type="latent")
    card = (out / "README.md").read_text()
    assert "StudentVPScheduler" in card and "needs onestep installed" in card


def test_vp_lora_at_two_steps_uses_the_onestep_scheduler(lora_runs, teacher_dirs, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from onestep.pipelines import StudentVPScheduler

    out = export_run(lora_runs["stable_diffusion"], tmp_path / "l", format="lora", steps=2, lora_rank=2)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dirs["stable_diffusion"])
    pipe.load_lora_weights(out)
    pipe.scheduler = StudentVPScheduler.from_pretrained(out, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    want, noise = expected_latents(lora_runs["stable_diffusion"], 2, 8)
    got = pipe(prompt=[PROMPT], latents=noise.clone(), num_inference_steps=2, height=SIDE, width=SIDE,
               output_type="latent", **CALLS["stable_diffusion"]).images
    assert (got - want).abs().max().item() < TOL
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet(out / "README.md"), "model card", "exec"), {})  # imports StudentVPScheduler from onestep
    assert (tmp_path / "sample.png").is_file()


def test_reexport_is_byte_identical_and_card_names_the_scheduler(runs, tmp_path):
    out = tmp_path / "again"

    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    export_run(runs["stable_diffusion"], out, steps=1)
    first = files()
    export_run(runs["stable_diffusion"], out, steps=1)
    assert files() == first
    assert {Path(f).suffix for f in first} <= {".safetensors", ".json", ".md", ".txt"}
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for f in first)
    card = (out / "README.md").read_text()
    for text in ("StableDiffusionPipeline", "DDIMScheduler", "timestep_spacing=trailing", "set_alpha_to_one=True",
                 "guidance_scale=1.0", "teacher | `stable_diffusion`", "Not evaluated", "pipeline_tag: text-to-image"):
        assert text in card, text
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["timestep_spacing"] == "trailing"


@pytest.fixture(scope="module")
def lora_runs(teacher_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_runs")
    return {f: make_run(root, f, teacher_dirs[f], perturb=_perturb_low_rank) for f in ("stable_diffusion", "sd3")}


def test_lora_on_the_teacher_pipeline_reproduces_the_student(lora_runs, runs, teacher_dirs, tmp_path):
    jobs = {"stable_diffusion": 1, "sd3": 2}
    folders = {f: str(export_run(lora_runs[f], tmp_path / f"lora-{f}", format="lora", steps=k, lora_rank=2))
               for f, k in jobs.items()}
    for f, folder in folders.items():
        names = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
        assert names == ["README.md", "onestep_export.json", "pytorch_lora_weights.safetensors",
                         "scheduler/scheduler_config.json"], names
        keys = load_file(Path(folder) / "pytorch_lora_weights.safetensors").keys()
        assert all(".lora_A." in k or ".lora_B." in k for k in keys) and any(k.endswith("lora_B.bias") for k in keys)
    noises = {f: expected_latents(lora_runs[f], k, 5)[1] for f, k in jobs.items()}
    save_file(noises, tmp_path / "noises.safetensors")
    script = f"""
from diffusers import FlowMatchEulerDiscreteScheduler, DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
classes = {{"stable_diffusion": (StableDiffusionPipeline, DDIMScheduler),
           "sd3": (StableDiffusion3Pipeline, FlowMatchEulerDiscreteScheduler)}}
jobs, folders, teachers = {jobs!r}, {folders!r}, {({f: str(teacher_dirs[f]) for f in jobs})!r}
calls = {({f: CALLS[f] for f in jobs})!r}
noises = load_file("noises.safetensors")
out = {{}}
for family, k in jobs.items():
    pipe_cls, sched_cls = classes[family]
    pipe = pipe_cls.from_pretrained(teachers[family])
    pipe.load_lora_weights(folders[family])
    pipe.scheduler = sched_cls.from_pretrained(folders[family], subfolder="scheduler")
    out[family] = run(pipe, family, noises[family], {{**calls[family], "num_inference_steps": k}}).contiguous()
save_file(out, "latents.safetensors")
exec(compile({snippet(Path(folders['stable_diffusion']) / 'README.md')!r}, "model card", "exec"))
"""
    isolated(script, tmp_path)
    assert (tmp_path / "sample.png").is_file()
    got = load_file(tmp_path / "latents.safetensors")
    for f, k in jobs.items():
        want, _ = expected_latents(lora_runs[f], k, 5)
        diff = (got[f] - want).abs().max().item()
        print(f"\nLoRA {f} k={k}: max |teacher pipeline + LoRA - onestep sampler| {diff:.2e}")
        assert diff < TOL, f
        wrong, _ = expected_latents(lora_runs[f], k, 5, zero_interval=True)
        assert (got[f] - wrong).abs().max().item() > 1e-3, f
    card = (Path(folders["sd3"]) / "README.md").read_text()
    assert "load_lora_weights" in card and "largest relative residual" in card
    # a rank-1 change of a layer without bias plus the folded bias: lora_bias for all, which fuse_lora refuses
    sd_card = (Path(folders["stable_diffusion"]) / "README.md").read_text()
    assert "`pipe.fuse_lora()` is not possible" in sd_card


def _perturb_lora_student(student, seed):
    """A LoRA-trained student (peft layers from student.lora_rank): random adapters and interval MLP."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.backbone.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    _randomise(student.interval_embedding, scale=0.5, seed=seed + 100)


def test_peft_lora_student_exports_merged_and_as_lora(teacher_dirs, tmp_path):
    """A student trained as LoRA (peft layers): --format diffusers merges them into a plain transformer,
    --format lora re-factors the merged delta at the run's rank (exact: it is that rank)."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    run = make_run(tmp_path, "sd3", teacher_dirs["sd3"], perturb=_perturb_lora_student, name="peft",
                   extra=["student.lora_rank=2"])
    merged = export_run(run, tmp_path / "merged", steps=2)
    assert not any("lora" in k for k in load_file(merged / "transformer" / "diffusion_pytorch_model.safetensors"))
    lora = export_run(run, tmp_path / "lora", steps=2, format="lora")
    assert json.loads((lora / "onestep_export.json").read_text())["lora_rank"] == 2
    assert {v.shape[0] for k, v in load_file(lora / "pytorch_lora_weights.safetensors").items() if "lora_A" in k} == {2}
    want, noise = expected_latents(run, 2, 3)
    stock = DiffusionPipeline.from_pretrained(merged)
    teacher_pipe = StableDiffusion3Pipeline.from_pretrained(teacher_dirs["sd3"])
    teacher_pipe.load_lora_weights(lora)
    teacher_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(lora, subfolder="scheduler")
    for pipe in (stock, teacher_pipe):
        pipe.set_progress_bar_config(disable=True)
        got = pipe(prompt=[PROMPT], latents=noise.clone(), num_inference_steps=2, height=SIDE, width=SIDE,
                   output_type="latent", **CALLS["sd3"]).images
        assert (got - want).abs().max().item() < TOL, type(pipe).__name__


def test_lora_of_a_full_rank_delta_is_refused_unless_allowed(runs, tmp_path, capsys):
    run = str(runs["sd3"])  # every weight perturbed: rank 1 leaves large residuals
    rc = main(["export", "--run", run, "--out", str(tmp_path / "l"), "--format", "lora", "--lora-rank", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "relative residual" in err and "--allow-lora-residual" in err, err
    assert not (tmp_path / "l").exists()
    assert main(["export", "--run", run, "--out", str(tmp_path / "l"), "--format", "lora", "--lora-rank", "1",
                 "--allow-lora-residual"]) == 0
    card = (tmp_path / "l" / "README.md").read_text()
    assert "only approximates the student" in card and "At export" not in card  # no self-check claimed
    first = {p.name: p.read_bytes() for p in (tmp_path / "l").rglob("*") if p.is_file()}
    assert main(["export", "--run", run, "--out", str(tmp_path / "l"), "--format", "lora", "--lora-rank", "1",
                 "--allow-lora-residual"]) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "l").rglob("*") if p.is_file()} == first  # idempotent
    assert json.loads((tmp_path / "l" / "onestep_export.json").read_text())["lora_rank"] == 1
    rc = main(["export", "--run", run, "--out", str(tmp_path / "m"), "--format", "lora", "--lora-rank", "x"])
    assert rc == 2 and "--lora-rank must be an integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# pixel DDPM UNets and EDM


def _pixel_teacher_dir(root: Path, num_class_embeds=None) -> Path:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    _randomise(unet, seed=2)
    unet.save_pretrained(root / "unet")
    _ddim("v_prediction").save_pretrained(root / "scheduler")
    return root


def test_pixel_ddpm_student_exports_to_ddpm_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    run = make_run(tmp_path, "unet", _pixel_teacher_dir(tmp_path / "t"))
    out = export_run(run, tmp_path / "e", steps=1)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=3, num_inference_steps=1, generator=torch.Generator().manual_seed(4), output_type="pt").images
    student, _ = load_student(load_run(run))
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    want = (student.sample(noise, steps=1) / 2 + 0.5).clamp(0, 1)
    assert (got - want).abs().max().item() < TOL
    with pytest.raises(ExportError, match="only at --steps 1"):
        export_run(run, tmp_path / "e2", steps=2)
    onestep_k3 = export_run(run, tmp_path / "e4", format="onestep", steps=3)  # DDPMPipeline + StudentVPScheduler
    pipe = DiffusionPipeline.from_pretrained(onestep_k3)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=3, num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="pt").images
    assert (got - (student.sample(noise, steps=3) / 2 + 0.5).clamp(0, 1)).abs().max().item() < TOL
    with pytest.raises(ExportError, match="no load_lora_weights"):
        export_run(run, tmp_path / "e3", format="lora")


def test_families_without_a_stock_pipeline_explain_what_to_use(tmp_path, capsys):
    cond = make_run(tmp_path, "unet", _pixel_teacher_dir(tmp_path / "c", num_class_embeds=4), name="cond")
    with pytest.raises(ExportError, match="DDPMPipeline takes no class labels"):
        export_run(cond, tmp_path / "x")
    edm = tmp_path / "edm"
    (edm / "checkpoints" / "step-000001").mkdir(parents=True)
    cfg = load_config(None, ["name=edm", "teacher.name=edm", f"teacher.path={tmp_path / 'missing'}"])
    (edm / "config.yaml").write_text(to_yaml(cfg))
    for f in ("ema.safetensors", "trainable.safetensors"):
        save_file({"x": torch.zeros(1)}, edm / "checkpoints" / "step-000001" / f)
    write_checksums(edm / "checkpoints" / "step-000001")
    assert main(["export", "--run", str(edm), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no stock diffusers pipeline" in err and "build_student" in err, err
    rc = main(["export", "--run", str(cond), "--out", str(tmp_path / "y"), "--format", "onestep"])
    assert rc == 2 and "DDPMPipeline takes no class labels" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_model_card_reports_the_runs_eval_scores_and_protocols(runs, tmp_path):
    import shutil

    run = tmp_path / "scored"
    shutil.copytree(runs["sd3"], run)
    (run / "eval").mkdir()
    protocol = {"metric": "fid", "backend": "torchmetrics", "mode": "clean", "reference": "coco-val-1k",
                "num_generated": 1000, "num_reference": 1000, "seeds": {"noise_seed": 0}, "steps": 2, "guidance": None,
                "resolution": [16, 16], "versions": {"torch": "2.14.1"}, "run": str(run), "checkpoint": "step-000001",
                "weights": "ema", "model": "student"}
    (run / "eval" / "fid.json").write_text(json.dumps({"scores": {"fid": 23.25}, "protocol": protocol}))
    latency = {**protocol, "metric": "latency", "checkpoint": "step-000009", "steps": None, "model": "both"}
    rows = [{"model": "teacher", "steps": 28, "ms_per_image": 812.5},
            {"model": "student", "steps": 2, "ms_per_image": 61.0}]
    (run / "eval" / "latency.json").write_text(json.dumps({"scores": {"rows": rows}, "protocol": latency}))
    (run / "eval" / "notes.json").write_text("[1, 2]")  # not a score file: ignored
    card = (export_run(run, tmp_path / "e", steps=2) / "README.md").read_text()
    assert ("**fid** from `eval/fid.json` (model student, steps 2, checkpoint step-000001, weights ema) "
            "- scores this export") in card
    assert "Scores: fid = 23.25." in card and "reference: coco-val-1k" in card and "versions: torch 2.14.1" in card
    assert "**latency** from `eval/latency.json`" in card and "not this export's checkpoint" in card
    assert "| student | 2 | 61 |" in card and "Not evaluated" not in card
