"""Can onestep turn on its Triton attention kernels? One run on a CUDA machine answers it.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--quick] [--no-timing]

The Triton kernels of ``onestep.kernels`` (forward, JVP, backward) have only run under Triton's CPU
interpreter, so ``fused_attention(impl="auto")`` uses the blockwise torch path everywhere and Triton
is opt-in (``impl="triton"``, attention backend ``fused_triton``). On a GPU this script:

1. compiles the kernels (the first forward, JVP and backward call per dtype, timed; a failure is
   recorded, not fatal);
2. checks them: for fp32, bf16 and fp16, without a mask, with a boolean mask (one fully masked row)
   and with an additive mask, at several shapes, the output, the gradients dq/dk/dv (backward of
   <out, g>) and the JVP (tangents on q, k, v) of the Triton kernels *and* of the torch path are
   compared with a float64 math reference computed from the same (rounded) inputs. An error is
   max |x - ref| / max |ref| per quantity; a case passes when every error is under TOLERANCES[dtype];
   the Triton-vs-torch-path difference is recorded too;
3. times Triton, the torch path and ``torch.nn.functional.scaled_dot_product_attention`` (forward,
   forward+backward; JVP for the two that have one) with CUDA events, median of repeats.

It writes one JSON file: device, torch/triton/CUDA versions, tolerances, per-case errors and
pass/fail (an error is null where the output was not finite; a candidate that raised has "error"
instead), compile times, timings (with the Triton / SDPA and torch path / Triton ratios), and a
summary ("triton_correct", worst error per dtype). Exit code 0 when every Triton case passes and
every kernel compiled, 1 otherwise, 2 without CUDA.

The comparison functions take any attention callable and device, so the tests run the same code on
CPU (torch path against the math reference; Triton under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onestep.kernels import fused_attention, math_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MASKS = (None, "bool", "additive")
QUANTITIES = ("out", "dq", "dk", "dv", "jvp")
# Max |x - ref| / max |ref| allowed per dtype, for every quantity. fp32: the kernels use IEEE fp32
# dots (no TF32) and fp32 accumulation, so errors are ~1e-6 (a wrong tile, mask or rescale is O(1)).
# fp16/bf16: inputs, outputs and (in the Triton kernels) the probabilities fed to P V are rounded to
# the dtype, unit roundoff u = 4.9e-4 / 3.9e-3. On CPU the torch path stays within ~1 u and the
# Triton kernels under the interpreter (fp16) within ~1.5 u; the tolerances allow ~10 u / ~8 u.
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
# (B, H, N, M, D): tile-aligned self-attention; SD-style cross-attention to 77 text tokens; lengths
# that are not multiples of the 64-wide tiles; FLUX's head dim 128; SANA's cross-attention head dim
# 112 (padded to 128 in the kernel) over 300 caption tokens
CHECK_SHAPES = [(2, 4, 256, 256, 64), (1, 8, 1000, 77, 64), (2, 2, 129, 300, 32), (1, 4, 1536, 1536, 128),
                (1, 4, 1024, 300, 112)]
QUICK_CHECK_SHAPES = CHECK_SHAPES[1:3]
# (label, B, H, N, M, D): SD3.5-medium 1024px (4096 image + 333 text tokens, 24 heads of 64), FLUX.1
# 1024px (4096 + 512 tokens, 24 heads of 128), SANA 1024px cross-attention (32x32 tokens to 300
# caption tokens, 20 heads of 112), a generic batch-4 self-attention
TIME_SHAPES = [("sd3.5m_1024", 1, 24, 4429, 4429, 64), ("flux_1024", 1, 24, 4608, 4608, 128),
               ("sana_cross_1024", 2, 20, 1024, 300, 112), ("generic_b4", 4, 16, 2048, 2048, 64)]
QUICK_TIME_SHAPES = TIME_SHAPES[:1]
TIME_DTYPES = ("bf16", "fp16", "fp32")


# ------------------------------------------------------------------------------------------------
# Correctness (device-agnostic)
# ------------------------------------------------------------------------------------------------
def attn_triton(q, k, v, mask=None):
    return fused_attention(q, k, v, mask, impl="triton")


def attn_torch_path(q, k, v, mask=None):
    return fused_attention(q, k, v, mask, impl="torch")


def make_inputs(shape, dtype, mask_kind, device, seed=0):
    """q, k, v, mask, tangents (dq, dk, dv) and the output cotangent g, in `dtype` on `device`."""
    B, H, N, M, D = shape
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: the timing shapes are large

    def rnd(*s):
        return torch.randn(*s, generator=g, device=device).to(dtype)

    def uniform(*s):
        return torch.rand(*s, generator=g, device=device)

    q, k, v = rnd(B, H, N, D), rnd(B, H, M, D), rnd(B, H, M, D)
    tangents = (rnd(B, H, N, D), rnd(B, H, M, D), rnd(B, H, M, D))
    grad_out = rnd(B, H, N, D)
    if mask_kind == "bool":  # keep ~70 % of the keys per (sample, query); one query row fully masked
        mask = uniform(B, 1, N, M) > 0.3
        mask[0, 0, min(1, N - 1)] = False
    elif mask_kind == "additive":  # per-key bias with padding-style -10000 entries, broadcast over queries
        mask = (rnd(B, 1, 1, M).float() - torch.where(uniform(B, 1, 1, M) > 0.8, 1e4, 0.0)).to(dtype)
    else:
        mask = None
    return q, k, v, mask, tangents, grad_out


def evaluate(attn, q, k, v, mask, tangents, grad_out):
    """{out, dq, dk, dv, jvp} of attn(q, k, v, mask): one torch.func.jvp, then backward of <out, g>."""
    prim = tuple(t.detach().clone().requires_grad_() for t in (q, k, v))
    out, jvp = torch.func.jvp(lambda a, b, c: attn(a, b, c, mask), prim, tangents)
    out.backward(grad_out)
    return {"out": out.detach(), "jvp": jvp.detach(), "dq": prim[0].grad, "dk": prim[1].grad, "dv": prim[2].grad}


def reference(q, k, v, mask, tangents, grad_out):
    """evaluate() of the math path in float64 on the same (already rounded) inputs."""
    up = lambda t: t.double()  # noqa: E731
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    return evaluate(lambda a, b, c, m: math_attention(a, b, c, m), up(q), up(k), up(v), mask64,
                    tuple(map(up, tangents)), up(grad_out))


def errors(result, ref):
    """max |x - ref| / max |ref| per quantity (inf when x has non-finite entries)."""
    errs = {}
    for name in QUANTITIES:
        x, r = result[name].double(), ref[name].double()
        scale = r.abs().max().item() or 1.0
        errs[name] = (x - r).abs().max().item() / scale if torch.isfinite(x).all() else float("inf")
    return errs


def check_case(candidates, shape, dtype_name, mask_kind, device, seed=0):
    """One case: each candidate attention (name -> callable(q, k, v, mask)) against the float64 reference.

    Returns {"shape", "dtype", "mask", "tolerance", "<name>": {"errors", "passed"} or {"error"},
    and "<a>_vs_<b>" max differences between the first two candidates when both ran}.
    """
    q, k, v, mask, tangents, grad_out = make_inputs(shape, DTYPES[dtype_name], mask_kind, device, seed)
    ref = reference(q, k, v, mask, tangents, grad_out)
    tol = TOLERANCES[dtype_name]
    record = {"shape": list(shape), "dtype": dtype_name, "mask": mask_kind, "tolerance": tol}
    results = {}
    for name, attn in candidates.items():
        try:
            results[name] = evaluate(attn, q, k, v, mask, tangents, grad_out)
        except Exception as e:  # a kernel that fails to compile or run is a failed case, not a crash
            record[name] = {"passed": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        errs = errors(results[name], ref)
        record[name] = {"errors": errs, "passed": all(e <= tol for e in errs.values())}
    names = list(results)
    if len(names) >= 2:
        a, b = results[names[0]], results[names[1]]
        record[f"{names[0]}_vs_{names[1]}"] = {n: (a[n].double() - b[n].double()).abs().max().item()
                                               for n in QUANTITIES}
    return record


def worst_error(cases, candidate, dtype_name):
    """The largest error of `candidate` over the cases of one dtype (inf where it failed to run)."""
    worst = None
    for c in cases:
        if c["dtype"] == dtype_name:
            e = max(c[candidate]["errors"].values()) if "errors" in c[candidate] else float("inf")
            worst = e if worst is None else max(worst, e)
    return worst


def correctness(candidates, shapes, dtype_names, device, masks=MASKS, log=print):
    cases = []
    for shape in shapes:
        for dtype_name in dtype_names:
            for mask_kind in masks:
                rec = check_case(candidates, shape, dtype_name, mask_kind, device)
                cases.append(rec)
                log(_case_line(rec, candidates))
    return cases


def _case_line(rec, candidates):
    parts = [f"{'x'.join(map(str, rec['shape']))} {rec['dtype']} mask={rec['mask']}"]
    for name in candidates:
        r = rec[name]
        worst = max(r["errors"].values()) if "errors" in r else float("nan")
        parts.append(f"{name}: {'ok' if r['passed'] else 'FAIL'} (max err {worst:.1e})"
                     + ("" if "errors" in r else f" {r['error'][:200]}"))
    return "  ".join(parts)


# ------------------------------------------------------------------------------------------------
# GPU-only parts: compile, timing
# ------------------------------------------------------------------------------------------------
def compile_kernels(device, dtype_names):
    """Time the first forward, JVP and backward call per dtype (Triton compiles a kernel on first use)."""
    out = {}
    for name in dtype_names:
        q, k, v, _, tangents, grad_out = make_inputs((1, 2, 64, 64, 64), DTYPES[name], None, device)
        rec = {}
        try:
            prim = tuple(t.requires_grad_() for t in (q, k, v))
            for stage, run in (("forward", lambda: attn_triton(*prim)),
                               ("jvp", lambda: torch.func.jvp(attn_triton, prim, tangents)),
                               ("backward", lambda: attn_triton(*prim).backward(grad_out))):
                torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                torch.cuda.synchronize()
                rec[f"{stage}_s"] = time.perf_counter() - start
            rec["ok"] = True
        except Exception as e:
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
        out[name] = rec
    return out


def _cuda_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timings(shapes, dtype_names, device, repeats, log=print):
    import torch.nn.functional as F

    rows = []
    for label, B, H, N, M, D in shapes:
        for name in dtype_names:
            q, k, v, _, tangents, grad_out = make_inputs((B, H, N, M, D), DTYPES[name], None, device)
            prim = tuple(t.requires_grad_() for t in (q, k, v))
            impls = {"sdpa": lambda a, b, c: F.scaled_dot_product_attention(a, b, c),
                     "triton": attn_triton, "torch_path": attn_torch_path}
            row = {"label": label, "shape": [B, H, N, M, D], "dtype": name}
            for impl, fn in impls.items():
                def fwd():
                    with torch.no_grad():
                        fn(*prim)

                def fwd_bwd():
                    for t in prim:
                        t.grad = None
                    fn(*prim).backward(grad_out)

                def jvp():
                    with torch.no_grad():
                        torch.func.jvp(fn, prim, tangents)

                stages = {"fwd": fwd, "fwd_bwd": fwd_bwd} | ({} if impl == "sdpa" else {"jvp": jvp})
                for stage, run in stages.items():
                    try:
                        row[f"{impl}_{stage}_ms"] = _cuda_ms(run, repeats)
                    except Exception as e:  # e.g. out of memory: recorded, the rest still runs
                        row[f"{impl}_{stage}_ms"] = None
                        row[f"{impl}_{stage}_error"] = f"{type(e).__name__}: {e}"[:500]
                    torch.cuda.empty_cache()
            for stage in ("fwd", "fwd_bwd"):
                t, s = row.get(f"triton_{stage}_ms"), row.get(f"sdpa_{stage}_ms")
                row[f"triton_over_sdpa_{stage}"] = t / s if t and s else None
            for stage in ("fwd", "fwd_bwd", "jvp"):
                t, p = row.get(f"triton_{stage}_ms"), row.get(f"torch_path_{stage}_ms")
                row[f"triton_speedup_over_torch_path_{stage}"] = p / t if t and p else None
            rows.append(row)
            log(f"{label} {name}: " + ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in row.items()
                                                if k.endswith("_ms") and v is not None))
            q = k = v = prim = tangents = grad_out = None  # free this shape's inputs before the next
            torch.cuda.empty_cache()
    return rows


def _cuda_device():
    return torch.device("cuda")


def _finite_or_none(obj):
    """The report as strict JSON: non-finite numbers (a kernel that gave inf/NaN) become null."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="two check shapes, one timing shape")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); this check needs a GPU",
              file=sys.stderr)
        return 2
    device = _cuda_device()
    started = time.time()
    report = {"device": torch.cuda.get_device_name(device),
              "capability": list(torch.cuda.get_device_capability(device)),
              "versions": _versions(), "tolerances": TOLERANCES,
              "error_measure": "max |x - ref| / max |ref|, ref = float64 math attention of the same rounded inputs",
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    dtype_names = list(DTYPES)
    if report["versions"]["triton"] is None:
        report["error"] = "triton is not installed"
        compiled = {}
    else:
        compiled = report["compile"] = compile_kernels(device, dtype_names)
        print("compile:", json.dumps(compiled))
    candidates = {"triton": attn_triton, "torch_path": attn_torch_path}
    shapes = QUICK_CHECK_SHAPES if args.quick else CHECK_SHAPES
    report["cases"] = correctness(candidates, shapes, dtype_names, device)
    if not args.no_timing:
        report["timings"] = timings(QUICK_TIME_SHAPES if args.quick else TIME_SHAPES, TIME_DTYPES, device, args.repeats)
    failed = [c for c in report["cases"] if not c["triton"]["passed"]]
    report["summary"] = {
        "triton_correct": not failed and all(r.get("ok") for r in compiled.values()) and bool(compiled),
        "triton_failed_cases": len(failed), "cases": len(report["cases"]),
        "torch_path_failed_cases": sum(not c["torch_path"]["passed"] for c in report["cases"]),
        "worst_triton_error": {name: worst_error(report["cases"], "triton", name) for name in dtype_names},
        "seconds": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite_or_none(report), indent=1, allow_nan=False) + "\n")
    print(f"triton correct: {report['summary']['triton_correct']} ({len(failed)} of {len(report['cases'])} cases "
          f"failed); wrote {args.out}")
    return 0 if report["summary"]["triton_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
