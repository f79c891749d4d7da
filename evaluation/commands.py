"""What `onestep eval fid|clip|geneval` and `onestep bench latency` do (`add_eval_parsers` builds their command lines).

Each command scores either a finished run (`--run runs/X`: its student, or its teacher with
`--model teacher`, rebuilt by onestep.runs from the checkpoint's EMA weights) or images
already on disk (`--images`), and writes a score JSON whose `protocol` block says how the number
was made (onestep.evaluation.report), next to the grid of the images it scored.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .fid import FIDInputError
from .geneval import GenEvalError

# ------------------------------------------------------------------------------- run models

class RunModels:
    """A run's student and teacher on `device`, and k-step samplers that return images in [-1, 1]."""

    def __init__(self, run: str, checkpoint: str | None, device: str):
        from onestep.runs import load_run, load_student

        self.info = load_run(run, checkpoint)
        student, teacher = load_student(self.info)
        self.student, self.teacher = student.to(device), teacher.to(device).eval()
        self.device = device

    def sampler(self, model: str, steps: int, guidance: float | None, solver: str = "euler"):
        """(noise, cond) -> decoded images of the student's or teacher's `steps`-step sampler."""
        if model not in ("student", "teacher"):
            raise FIDInputError(f"--model must be student or teacher, got {model!r}")
        student, teacher = self.student, self.teacher
        if model == "student":
            if guidance is not None:
                raise FIDInputError("--guidance applies to the teacher; a student bakes its guidance in")
            return lambda z, c: teacher.decode(student.sample(z, c, steps=steps))
        return lambda z, c: teacher.decode(teacher.sample(z, c, steps=steps, solver=solver, guidance=guidance))

    def encode_prompts(self, prompts: list[str]):
        if self.teacher.capabilities.conditioning != "prompt":
            raise FIDInputError(f"the run's teacher ({type(self.teacher).__name__}) is not text-to-image; "
                                "prompts need an SD-family teacher")
        with torch.no_grad():
            return self.teacher.encode_prompt(list(prompts))

    def describe(self, model: str, steps: int, guidance) -> dict:
        return {"run": str(self.info.run_dir), "checkpoint": self.info.checkpoint.name, "weights": self.info.weights,
                "model": model, "steps": steps, "guidance": guidance, "device": str(self.device)}


def read_prompts(path) -> list[str]:
    """Prompts from a .txt (one a line) or .jsonl (a `prompt` or `text` field a line) file."""
    path = Path(path)
    if not path.is_file():
        raise FIDInputError(f"prompts file not found: {path} (--prompts)")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(ln).get("prompt") or json.loads(ln)["text"] for ln in lines]
        except (ValueError, KeyError, AttributeError) as e:
            raise FIDInputError(f"{path}: every line must be JSON with a prompt or text field "
                                f"({type(e).__name__})") from None
    if not lines:
        raise FIDInputError(f"{path} holds no prompts")
    return lines


def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _need_source(args) -> None:
    if bool(args.run) == bool(args.images):
        raise FIDInputError("give either --run runs/X (generate and score) or --images DIR (score existing images)")


def _out_dir(args, name: str) -> Path:
    if args.out:
        return Path(args.out)
    if args.run:
        return Path(args.run) / "eval" / name
    return Path("eval") / name


# ---------------------------------------------------------------------------------- processes

def _processes(args):
    """The evaluation processes (onestep.evaluation.distributed): one, or those of accelerate launch /
    torchrun, each on its device (`--device auto`: the accelerator's)."""
    from .distributed import Processes

    return Processes(args.device)


def _report_work(procs, generated: list, work: dict) -> None:
    """One line a process under several processes: its share of the work, for the logs."""
    if procs.num_processes > 1:
        print(f"process {procs.process_index} of {procs.num_processes} ({procs.device}): generated shards "
              f"{generated}; features of {work.get('reference_images', 0)} reference and "
              f"{work.get('scored_images', 0)} scored images", flush=True)


def _run(command, args) -> int:
    """`command(args, processes)`, then the process group (if one was started) ends: after every
    process is done, or at once on an error (the launcher then stops the others)."""
    procs = _processes(args)
    try:
        code = command(args, procs)
    except BaseException:
        procs.close(wait=False)
        raise
    procs.close()
    return code


# ----------------------------------------------------------------------------------- eval fid

def eval_fid(args) -> int:
    return _run(_eval_fid, args)


def _eval_fid(args, procs) -> int:
    from . import report
    from .fid import compute_fid
    from .generate import generate_shards

    _need_source(args)
    if args.num_samples < 2:
        raise FIDInputError(f"--num-samples must be >= 2, got {args.num_samples}")
    if args.shard_size < 1:
        raise FIDInputError(f"--shard-size must be >= 1, got {args.shard_size}")
    name = "fid" if args.images else f"fid-{args.model}-{args.steps}step"
    out = _out_dir(args, name)
    device = procs.device
    # every input is checked (names, weights, reference) before anything is generated or written
    from .fid import BACKENDS, MODES, feature_extractor, reference_statistics

    if args.backend not in BACKENDS or args.mode not in MODES:
        raise FIDInputError(f"--backend must be one of {', '.join(BACKENDS)} and --mode one of {', '.join(MODES)}; "
                            f"got {args.backend!r}, {args.mode!r}")
    with procs.main_process_first():  # one process downloads the weights, if they must be downloaded
        extractor = feature_extractor(args.features, args.mode, args.backend, args.inception_weights, device)
    reference = reference_statistics(args.reference, extractor, args.backend, args.mode, args.batch_size,
                                     return_features=True, progress=True, processes=procs, chunk=args.shard_size)
    generation = {"seeds": None, "steps": None, "guidance": None}
    made: list[int] = []
    if args.run:
        models = RunModels(args.run, args.checkpoint, device)
        sample = models.sampler(args.model, args.steps, args.guidance)
        teacher = models.teacher
        cond_fn = None
        if args.prompts:
            prompts = read_prompts(args.prompts)
            cond_fn = lambda idx: models.encode_prompts([prompts[i % len(prompts)] for i in idx])
        settings = models.describe(args.model, args.steps, args.guidance)
        source = generate_shards(sample, out / "samples", args.num_samples, tuple(teacher.sample_shape),
                                 shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
                                 num_classes=teacher.num_classes if cond_fn is None else None, cond_fn=cond_fn,
                                 settings=settings, accelerator=procs, device=device, progress=True, made=made)
        generation = {"seeds": {"seed": args.seed, "per_shard": "sha256('onestep-shard:{seed}:{shard}')",
                                "shard_size": args.shard_size}, "steps": args.steps, "guidance": args.guidance}
        extra = _without(settings, "steps", "guidance")
    else:
        source, extra = args.images, {"images": str(args.images)}
    result = compute_fid(source, reference, backend=args.backend, mode=args.mode, features=extractor,
                         batch_size=args.batch_size, device=device, progress=True, processes=procs,
                         chunk=args.shard_size)
    _report_work(procs, made, result["work"])
    if not procs.is_main_process:
        return 0
    p = result["protocol"]
    protocol = report.make_protocol(metric="fid", **{k: p[k] for k in ("backend", "mode", "feature_extractor",
                                    "feature_extractor_sha256", "reference", "num_generated", "num_reference",
                                    "resolution", "processes")}, **generation, resize=p["resize"], **extra)
    report.save_grid(result["grid_images"], out / "grid.png")
    path = report.write_score(out / "fid.json", result["scores"], protocol)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["scores"].items() if isinstance(v, float))
    print(f"{scores} ({p['num_generated']} samples vs {p['reference']}); written to {path} and {out / 'grid.png'}")
    return 0


# ---------------------------------------------------------------------------------- eval clip

def eval_clip(args) -> int:
    return _run(_eval_clip, args)


def _eval_clip(args, procs) -> int:
    from . import report
    from .clip_score import clip_score_of_chunks, load_clip
    from .fid import first_images, image_chunks
    from .generate import generate_shards

    _need_source(args)
    if args.shard_size < 1:
        raise FIDInputError(f"--shard-size must be >= 1, got {args.shard_size}")
    prompts = read_prompts(args.prompts)
    out = _out_dir(args, "clip" if args.images else f"clip-{args.model}-{args.steps}step")
    device = procs.device
    generation, extra = {"seeds": None, "steps": None, "guidance": None}, {"images": str(args.images)}
    made: list[int] = []
    if args.run:
        models = RunModels(args.run, args.checkpoint, device)
        settings = models.describe(args.model, args.steps, args.guidance)
        extra = _without(settings, "steps", "guidance")
        source = generate_shards(models.sampler(args.model, args.steps, args.guidance), out / "samples", len(prompts),
                                 tuple(models.teacher.sample_shape), shard_size=args.shard_size,
                                 batch_size=args.batch_size, seed=args.seed,
                                 cond_fn=lambda idx: models.encode_prompts([prompts[i] for i in idx]),
                                 settings={**settings, "prompts": str(args.prompts)}, accelerator=procs,
                                 device=device, made=made)
        generation = {"seeds": {"seed": args.seed, "per_shard": "sha256('onestep-shard:{seed}:{shard}')"},
                      "steps": args.steps, "guidance": args.guidance}
    else:
        source = args.images
    chunks = image_chunks(source, args.shard_size)
    num_images = chunks[-1].stop if chunks else 0
    if num_images != len(prompts):
        raise FIDInputError(f"{num_images} images but {len(prompts)} prompts in {args.prompts} "
                            "(one image a prompt, in order)")
    model, processor = load_clip(args.clip_model)
    scores = clip_score_of_chunks(chunks, prompts, model=(model, processor), batch_size=args.batch_size,
                                  device=device, processes=procs)
    mine = procs.mine(len(chunks))
    _report_work(procs, made, {"scored_images": sum(len(chunks[c]) for c in mine)})
    if not procs.is_main_process:
        return 0
    shown = first_images(source, 64, args.shard_size)
    protocol = report.make_protocol(metric="clip_score", backend="torchmetrics.CLIPScore", mode=None,
                                    feature_extractor=f"CLIP {args.clip_model}",
                                    feature_extractor_sha256=report.module_sha256(model), reference=str(args.prompts),
                                    num_generated=num_images, num_reference=None, resolution=list(shown.shape[1:3]),
                                    processes=procs.num_processes, **generation, **extra)
    report.save_grid(shown, out / "grid.png")
    path = report.write_score(out / "clip.json", scores, protocol)
    print(f"CLIP score {scores['clip_score']:.4f} ({num_images} images, {args.clip_model}); written to {path}")
    return 0


# ------------------------------------------------------------------------------- eval geneval

def eval_geneval(args) -> int:
    from . import geneval as G
    from . import report
    from .distributed import Processes, launched

    if launched():
        # its detector and colour classifier run image by image and write one results file; not sharded
        raise GenEvalError("onestep eval geneval runs in one process: start it without accelerate launch or torchrun")
    args.device = str(Processes(args.device).device)  # auto: CUDA if there, else the CPU
    _need_source(args)
    metadata = G.read_metadata(args.metadata)
    out = _out_dir(args, "geneval" if args.images else f"geneval-{args.model}-{args.steps}step")
    generation, extra = {"seeds": None, "steps": None, "guidance": None}, {"images": str(args.images)}
    if args.run:
        models = RunModels(args.run, args.checkpoint, args.device)
        sample = models.sampler(args.model, args.steps, args.guidance)
        shape = tuple(models.teacher.sample_shape)

        def sample_prompts(prompts, seed):
            noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed)).to(args.device)
            with torch.no_grad():
                return sample(noise, models.encode_prompts(prompts))

        image_dir = G.generate_images(sample_prompts, metadata, out / "images", args.images_per_prompt, args.seed)
        extra = _without(models.describe(args.model, args.steps, args.guidance), "steps", "guidance")
        generation = {"seeds": {"seed": args.seed, "per_prompt": "seed + prompt index"}, "steps": args.steps,
                      "guidance": args.guidance}
    else:
        image_dir = Path(args.images)
    options = G.Options()
    if args.detector_backend == "mmdet":
        if not args.mmdet_config:
            raise GenEvalError("--detector-backend mmdet needs --mmdet-config and --detector CHECKPOINT.pth")
        detector = G.MMDetDetector(args.mmdet_config, args.detector, device=args.device)
    elif args.detector_backend == "transformers":
        detector = G.Mask2FormerDetector(args.detector, device=args.device,
                                         input_size=tuple(_int_list(args.detector_size, "--detector-size")))
    else:
        raise GenEvalError(f"--detector-backend must be transformers or mmdet, got {args.detector_backend!r}")
    colors = G.ClipColorClassifier(args.clip_model, device=args.device, options=options)
    results = G.evaluate_folder(image_dir, detector, colors, options)
    summary = G.summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    first = sorted(image_dir.glob("[0-9]*/samples/*.png"))[:64]
    from PIL import Image

    if first:
        report.save_grid(np.stack([np.asarray(Image.open(f).convert("RGB").resize((128, 128))) for f in first]),
                         out / "grid.png")
    sha = (report.module_sha256(detector.model)
           if hasattr(detector, "model") and hasattr(detector.model, "state_dict") else None)
    protocol = report.make_protocol(metric="geneval", backend=f"onestep.geneval ({args.detector_backend})", mode=None,
                                    feature_extractor=f"detector {detector.name}; colours CLIP {args.clip_model}",
                                    feature_extractor_sha256=sha, reference=str(args.metadata or G.METADATA_URL),
                                    num_generated=len(results), num_reference=None, resolution=None,
                                    options=vars(options), images_per_prompt=args.images_per_prompt,
                                    detector_input_size=args.detector_size,
                                    **generation, **extra)
    path = report.write_score(out / "geneval.json", summary, protocol)
    tasks = ", ".join(f"{t} {v:.3f}" for t, v in summary["tasks"].items())
    print(f"GenEval overall {summary['overall']:.4f} ({tasks}); written to {path}")
    return 0


# ----------------------------------------------------------------------------- bench latency

def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise FIDInputError(f"{option} must be comma-separated integers >= 1, got {text!r}")
    return values


def bench_latency(args) -> int:
    from . import report
    from .latency import latency_table, measure_latency

    teacher_steps = _int_list(args.teacher_steps, "--teacher-steps")
    student_steps = _int_list(args.student_steps, "--student-steps")
    models = RunModels(args.run, args.checkpoint, args.device)
    teacher, b = models.teacher, args.batch_size
    noise = torch.randn((b, *teacher.sample_shape), generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    if teacher.capabilities.conditioning == "prompt":
        cond = models.encode_prompts([args.prompt] * b)  # encoded once, outside the timing
    elif teacher.num_classes:
        cond = torch.randint(0, teacher.num_classes, (b,),
                             generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    else:
        cond = None
    rows = []
    for model, steps_list in (("teacher", teacher_steps), ("student", student_steps)):
        for steps in steps_list:
            fn = models.sampler(model, steps, args.guidance if model == "teacher" else None)
            with torch.no_grad():
                row = measure_latency(lambda: fn(noise, cond), b, warmup=args.warmup, repeats=args.repeats,
                                      device=args.device)
            rows.append({"model": model, "steps": steps, **row})
            print(f"{model} {steps} step(s): {row['ms_per_image']:.3f} ms/image", flush=True)
    with torch.no_grad():
        resolution = list(teacher.decode(noise[:1]).shape[-2:]) if noise.ndim == 4 else None
    protocol = report.make_protocol(metric="latency", backend="onestep.bench", mode=None, feature_extractor=None,
                                    feature_extractor_sha256=None, reference=None, num_generated=None,
                                    num_reference=None, seeds={"noise_seed": args.seed}, steps=None,
                                    guidance=args.guidance, resolution=resolution, batch_size=b,
                                    timing="median of repeats after warm-up, device-synchronised; includes decode, "
                                           "excludes prompt encoding", torch_threads=torch.get_num_threads(),
                                    **{k: v for k, v in models.describe("both", None, args.guidance).items()
                                       if k not in ("model", "steps", "guidance")})
    table = latency_table(rows)
    print(table)
    out = Path(args.out) if args.out else Path(args.run) / "eval" / "latency.json"
    report.write_score(out, {"rows": rows}, protocol)
    print(f"written to {out}")
    return 0


# ------------------------------------------------------------------------------- the command line

def _run_eval(args) -> int:
    return {"fid": eval_fid, "clip": eval_clip, "geneval": eval_geneval}[args.eval_command](args)


def add_eval_parsers(sub) -> None:
    """Add `eval fid|clip|geneval` and `bench latency` to an argparse subparsers object (`onestep`'s own, or a
    parser of the smoke rehearsal, which runs the commands as a user does). `args.func(args)` runs one."""
    ev = sub.add_parser("eval", help="score a run's samples or an image folder: FID, CLIP score, GenEval")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)

    def eval_parser(name, help_):
        sp = ev_sub.add_parser(name, help=help_)
        sp.add_argument("--run", help="a finished run, e.g. runs/demo (its samples are generated and scored)")
        sp.add_argument("--images", help="score these images instead (folder, .npz, or shard folder)")
        sp.add_argument("--checkpoint", help="step-N (default: the latest)")
        sp.add_argument("--model", default="student", help="student (default) or teacher")
        sp.add_argument("--steps", type=int, default=1, help="sampling steps (default 1)")
        sp.add_argument("--guidance", type=float, help="teacher CFG scale (default: none)")
        sp.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--shard-size", type=int, default=1000,
                        help="samples per resumable shard file; with --images, images per chunk (default 1000). "
                             "Shards and chunks are the units that processes share")
        sp.add_argument("--device", default="auto",
                        help="auto (default: CUDA if there, else the CPU; each process's own GPU under accelerate "
                             "launch / torchrun), cpu, cuda or cuda:N")
        sp.add_argument("--out", help="output folder (default: RUN/eval/<metric>-<model>-<k>step)")
        sp.set_defaults(func=_run_eval)
        return sp

    # fid and clip shard generation and feature extraction across the processes of accelerate launch / torchrun
    fid = eval_parser("fid", "FID (+ precision/recall, density/coverage) with clean-fid or torchmetrics; "
                      "shared across processes under accelerate launch / torchrun")
    fid.add_argument("--reference", required=True, help="cifar10-train, cifar10-test, an .npz (mu, sigma or "
                     "images), or an image folder (statistics cached)")
    fid.add_argument("--num-samples", type=int, default=10000)
    fid.add_argument("--backend", default="clean-fid", help="clean-fid (default) or torchmetrics")
    fid.add_argument("--mode", default="clean", help="clean (default), legacy_pytorch or legacy_tensorflow")
    fid.add_argument("--features", default="inception", help="inception (default) or digits")
    fid.add_argument("--inception-weights", help="local Inception weights file (offline use)")
    fid.add_argument("--prompts", help="text-to-image runs: prompts file (.txt or .jsonl), cycled over samples")
    clip = eval_parser("clip", "CLIP score (torchmetrics) of text-to-image samples; shared across processes "
                       "under accelerate launch / torchrun")
    clip.add_argument("--prompts", required=True, help="prompts file (.txt or .jsonl), one image per prompt")
    clip.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="hub id or local folder")
    gen = eval_parser("geneval", "GenEval (Mask2Former via transformers; mmdet optional); one process only "
                      "(not under accelerate launch / torchrun)")
    gen.add_argument("--metadata", help="GenEval evaluation_metadata.jsonl (default: download GenEval's)")
    gen.add_argument("--images-per-prompt", type=int, default=4)
    gen.add_argument("--detector", default="facebook/mask2former-swin-small-coco-instance",
                     help="hub id or local folder (mmdet: the .pth checkpoint)")
    gen.add_argument("--detector-backend", default="transformers", help="transformers (default) or mmdet")
    gen.add_argument("--mmdet-config", help="mmdet config file (with --detector-backend mmdet)")
    gen.add_argument("--detector-size", default="800,1333", help="shortest,longest input edge (default 800,1333)")
    gen.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                     help="colour classifier: hub id or folder")
    bench = sub.add_parser("bench", help="benchmarks of a run")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    lat = bench_sub.add_parser("latency", help="ms/image and images/s: teacher at N steps vs student at 1/2/4")
    lat.add_argument("--run", required=True, help="a finished run, e.g. runs/demo")
    lat.add_argument("--checkpoint", help="step-N (default: the latest)")
    lat.add_argument("--teacher-steps", default="50", help="comma-separated (default 50)")
    lat.add_argument("--student-steps", default="1,2,4", help="comma-separated (default 1,2,4)")
    lat.add_argument("--batch-size", type=int, default=16)
    lat.add_argument("--warmup", type=int, default=2)
    lat.add_argument("--repeats", type=int, default=5)
    lat.add_argument("--guidance", type=float, help="teacher CFG scale (default: none)")
    lat.add_argument("--prompt", default="a photo of a cat", help="text-to-image runs: the prompt")
    lat.add_argument("--seed", type=int, default=0)
    lat.add_argument("--device", default="cpu")
    lat.add_argument("--out", help="JSON file (default: RUN/eval/latency.json)")
    lat.set_defaults(func=bench_latency)
