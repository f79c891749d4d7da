"""Full-size teachers on this CPU: peak memory and seconds per training step of each real family's recipe, next to
the `--dry-run` estimate.

    python benchmarks/full_size.py [--families sd15 sana600m ...] [--steps 2] [--keep DIR]

For each family, in fresh processes (one builds, one measures, so neither sees the other's memory):

1. build: the published architecture of every component (the configs `--dry-run` knows: onestep.dryrun's
   full_size_models(), from each family's teachers/<family>/full_size.py) with random weights in the recipe's
   teacher dtype, a byte-level tokenizer standing in for the real ones (nothing is downloaded), saved as the
   hub's pipeline folder;
2. measure: the recipe (`configs/<recipe>.yaml`) with teacher.path pointing at that folder, at the recipe's
   resolution, batch 1 and no gradient accumulation, its LoRA, gradient checkpointing and bf16 as the recipe says;
   data.teacher_steps 1 (the teacher's sampling of the data is a no-grad pass repeated teacher_steps times: it
   adds time, not memory). The trainer is built (weights loaded through the adapter's from_pretrained), then
   `--steps` training steps run while a thread samples the process's resident memory every 20 ms. Matmuls,
   convolutions and attention on bf16 operands are computed in fp32 and rounded back (`bf16_computed_in_fp32`:
   this CPU has no bf16 matrix units and runs bf16 GEMMs 200x slower than fp32); what the step holds keeps the
   recipe's dtypes, and the largest set of fp32 copies alive during one op is recorded with the row.

`measured_peak_bytes` is the resident peak during the steps minus the resident size of the same process right
after its imports (the runtime's own memory: Python, torch, diffusers, before any model); `estimated_peak_bytes`
is `--dry-run`'s estimate (onestep.dryrun.full_size_estimate: weights, optimizer state, EMA and activations).
Writes benchmarks/results/full_size.json, one row per family: family, recipe, measured_peak_bytes,
estimated_peak_bytes, seconds_per_step, and what was measured; the README's table is rendered from it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "full_size.json"

#: family -> (recipe, full_size_models() key, pipeline class, scheduler, recipe overrides)
FAMILIES = {
    "sd15": ("sd15_splitmeanflow", "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", "vp", []),
    "sana600m": ("sana_splitmeanflow", "Efficient-Large-Model/Sana_600M_1024px_diffusers", "SanaPipeline", "flow", []),
    "sdxl": ("sdxl_fdistill", "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "vp", []),
    "sd3": ("sd3_splitmeanflow", "stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3Pipeline", "flow",
            ["teacher.load_t5=false"]),
}


def _scheduler(kind: str):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "vp":  # SD's scaled-linear betas
        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build(family: str, folder: Path) -> None:
    """Random full-size weights of every component, saved as the pipeline folder the recipe's teacher loads."""
    import diffusers
    import torch
    from onestep.teachers.tiny import clip_tokenizer

    from onestep.dryrun import _class, full_size_models

    recipe, key, pipeline_name, scheduler, overrides = FAMILIES[family]
    from onestep.config import load_config

    dtype = getattr(torch, load_config(recipe).teacher.get("dtype", "float32"))
    spec = dict(full_size_models()[key])
    if "teacher.load_t5=false" in overrides:
        spec.pop("text_encoder_3", None)
    tok = clip_tokenizer(folder / "vocab", model_max_length=77)
    components = {}
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)      # weights are initialised directly in the teacher's dtype
    try:
        for name, (cls_name, config) in spec.items():
            cls = _class(cls_name)
            if hasattr(cls, "from_config"):
                model = cls.from_config(config)
            else:
                model = cls(cls.config_class(**config))
            components["unet" if name == "denoiser" and "UNet" in cls_name else
                       "transformer" if name == "denoiser" else name] = model.to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    for name in list(components):
        if name.startswith("text_encoder"):
            components[name.replace("text_encoder", "tokenizer")] = tok
    pipe_cls = getattr(diffusers, pipeline_name)
    extra = {}
    if pipeline_name == "StableDiffusionPipeline":
        extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if pipeline_name == "StableDiffusion3Pipeline" and "text_encoder_3" not in components:
        extra = dict(text_encoder_3=None, tokenizer_3=None)
    pipe = pipe_cls(**components, scheduler=_scheduler(scheduler), **extra)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)


def bf16_computed_in_fp32():
    """A dispatch mode under which matmuls, convolutions and attention with bf16 operands are computed in fp32 and
    rounded back to the dtype the op returns for bf16.

    CPUs without AVX512-BF16/AMX (this one) run bf16 GEMMs at about 0.3 GFLOPS, 200x slower than fp32, which
    turns one full-size step into hours. Every tensor that outlives an op keeps the recipe's dtype and shape, so
    what a step holds is unchanged; the fp32 copies exist only during the op, and the largest such set is
    recorded (`max_fp32_transient_bytes`) so the peak can be read with it in mind."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves, tree_map

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
           aten.convolution_backward.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}

    class BF16ComputedInFP32(TorchDispatchMode):
        max_fp32_transient_bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func not in ops or not any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
                                          for a in tree_leaves((args, kwargs))):
                return func(*args, **kwargs)
            # the dtypes the op returns for these operands, from its meta kernel
            to_meta = (lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a)
            expected = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
            up = (lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a)
            args32, kwargs32 = tree_map(up, args), tree_map(up, kwargs)
            out = func(*args32, **kwargs32)
            self.max_fp32_transient_bytes = max(self.max_fp32_transient_bytes, sum(
                a.numel() * 4 for a in tree_leaves((args32, kwargs32, out))
                if isinstance(a, torch.Tensor) and a.dtype == torch.float32))
            down = (lambda o, e: o.to(e.dtype) if isinstance(o, torch.Tensor) else o)
            if isinstance(out, (tuple, list)):
                return type(out)(down(o, e) for o, e in zip(out, expected))
            return down(out, expected)

    return BF16ComputedInFP32()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(family: str, folder: Path, steps: int) -> dict:
    """Load the recipe on the saved folder and time `steps` training steps; resident memory sampled throughout."""
    import ctypes

    import torch

    from onestep.config import load_config
    from onestep.dryrun import LiveBytes, dry_run_estimate
    from onestep.smoke import PeakMemory
    from onestep.trainer import Trainer

    baseline = _rss()
    recipe, _, _, _, overrides = FAMILIES[family]
    prompts = folder / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a street\n", encoding="utf-8")
    cfg = load_config(recipe, [f"teacher.path={folder / 'pipe'}", f"data.path={prompts}", "data.batch_size=1",
                               "data.teacher_steps=1", "train.grad_accum=1", "train.progress=false",
                               f"output_dir={folder / 'runs'}", "train.checkpoint_every=1000000", *overrides])
    estimate = dry_run_estimate(cfg)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    built_s = time.perf_counter() - t0
    ctypes.CDLL("libc.so.6").malloc_trim(0)   # what loading freed goes back to the system before the steps
    loaded = _rss()
    times = []
    # the bytes of tensors alive at the step's peak, apart from the allocator: those resident before the steps
    # (parameters, buffers, EMA) plus the largest sum alive at once of those the steps create (LiveBytes)
    held = {}
    for t in [*trainer.objective.state_dict(keep_vars=True).values(), *getattr(trainer.ema, "shadow_params", [])]:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            held[torch._C._storage_id(t)] = t.untyped_storage().nbytes()
    live, shim = LiveBytes(), bf16_computed_in_fp32()
    with PeakMemory() as mem, live, shim:
        for _ in range(steps):
            start = time.perf_counter()
            logs = trainer.train_step()
            trainer.step += 1
            times.append(time.perf_counter() - start)
    if trainer.nonfinite_in_a_row:
        raise RuntimeError(f"non-finite loss at full size: {logs}")
    return {"family": family, "recipe": recipe, "measured_peak_bytes": mem.peak - baseline,
            "measured_tensor_peak_bytes": sum(held.values()) + live.peak,
            "estimated_peak_bytes": int(estimate["total_bytes"]), "estimate": estimate["parts"],
            "seconds_per_step": round(sum(times) / len(times), 1), "step_seconds": [round(t, 1) for t in times],
            "loaded_bytes": loaded - baseline, "runtime_bytes": baseline, "build_seconds": round(built_s, 1),
            "steps": steps, "groups": sorted(trainer.objective.active_groups(0)),
            "resolution": trainer.teacher.resolution, "overrides": overrides + ["data.batch_size=1",
                                                                               "data.teacher_steps=1",
                                                                               "train.grad_accum=1"],
            "threads": torch.get_num_threads(), "max_fp32_transient_bytes": shim.max_fp32_transient_bytes,
            "compute": "matmuls, convolutions and attention with bf16 operands computed in fp32 and rounded to bf16 "
                       "(bf16 GEMMs run at ~0.3 GFLOPS on this CPU); seconds are this CPU's, not a GPU's"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--keep", help="build into (and reuse) this folder instead of a temporary one")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--phase", choices=("build", "measure"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase == "build":
        build(args.families[0], Path(args.folder))
        return
    if args.phase == "measure":
        print("RESULT " + json.dumps(measure(args.families[0], Path(args.folder), args.steps)), flush=True)
        return
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    for family in args.families:
        with tempfile.TemporaryDirectory(prefix=f"onestep-full-{family}-") as tmp:
            folder = Path(args.keep) / family if args.keep else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            me = [sys.executable, __file__, "--families", family, "--folder", str(folder), "--steps", str(args.steps)]
            if not (folder / "pipe" / "model_index.json").is_file():
                subprocess.run([*me, "--phase", "build"], check=True)
            proc = subprocess.run([*me, "--phase", "measure"], capture_output=True, text=True)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not result:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                row = {"family": family, "recipe": FAMILIES[family][0], "failed": tail[0][:300]}
            else:
                row = json.loads(result[0][len("RESULT "):])
            row.update(date=time.strftime("%Y-%m-%d"),
                       command="python benchmarks/full_size.py " + " ".join(argv or sys.argv[1:]))
            print(row, flush=True)
            rows = [r for r in rows if r["family"] != family] + [row]
    import torch

    # rows of earlier calls are kept (each with its own command and date); the protocol is the machine's
    protocol = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "torch": torch.__version__}
    out.write_text(json.dumps({"rows": rows, "protocol": protocol}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
