"""JVP through attention: onestep's fused kernel vs the plain math path, on CPU.

    python benchmarks/attention.py [--seq-lens 256 1024 2048 4096] [--threads 1] [--repeats 5]

For each sequence length N (batch 1, 8 heads, head dim 64, fp32, self-attention) it times
``torch.func.jvp`` (primal and tangent together, tangents on q, k and v) through
``fused_attention`` and through softmax(q k^T / 8) v written with plain ops, and measures each one's
peak memory. Prints a table and writes benchmarks/results/attention.json as
{"rows": [{"seq_len", "max_abs_err", "jvp_peak_mem_ratio", "jvp_time_ratio", ...}], "protocol": {...}};
ratios are fused / math, max_abs_err is the fused path's max |error| over output and JVP against a
float64 math reference.

Every (path, N) runs in a fresh subprocess so that memory high-water marks do not mix.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"
B, H, D = 1, 8, 64


def _proc_status(*keys):
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0]) * 1024  # kB -> bytes
    return out


def _math(q, k, v):
    import torch

    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def worker(path: str, n: int, threads: int, repeats: int, block_size) -> dict:
    import torch

    from onestep.kernels import fused_attention

    torch.set_num_threads(threads)
    if path == "fused":
        fn = lambda q, k, v: fused_attention(q, k, v, block_size=block_size)  # noqa: E731
    else:
        fn = _math
    # initialise lazy state (functorch, BLAS, thread pool) on a tiny problem first
    tiny = [torch.randn(1, 1, 8, 8) for _ in range(3)]
    torch.func.jvp(fn, tuple(tiny), tuple(tiny))

    g = torch.Generator().manual_seed(0)
    primals = tuple(torch.randn(B, H, n, D, generator=g) for _ in range(3))
    tangents = tuple(torch.randn(B, H, n, D, generator=g) for _ in range(3))
    # Peak memory of one JVP call: reset the kernel's resident-set high-water mark (VmHWM) with
    # /proc/self/clear_refs, then peak VmHWM minus VmRSS right before the call. Inputs are
    # allocated (and resident) before the baseline, so only what the call allocates counts.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status("VmRSS")["VmRSS"]
    start = time.perf_counter()
    out, tan = torch.func.jvp(fn, primals, tangents)
    first = time.perf_counter() - start
    peak = _proc_status("VmHWM")["VmHWM"] - base

    times = []
    for _ in range(repeats):  # the call above was the warm-up
        del out, tan
        start = time.perf_counter()
        out, tan = torch.func.jvp(fn, primals, tangents)
        times.append(time.perf_counter() - start)

    # float64 reference, one head at a time to bound its memory
    err = 0.0
    for h in range(H):
        p64 = tuple(x[:, h:h + 1].double() for x in primals)
        t64 = tuple(x[:, h:h + 1].double() for x in tangents)
        ref, ref_tan = torch.func.jvp(_math, p64, t64)
        err = max(err, (out[:, h:h + 1].double() - ref).abs().max().item(),
                  (tan[:, h:h + 1].double() - ref_tan).abs().max().item())
    return {"path": path, "seq_len": n, "peak_bytes": peak, "first_call_s": first,
            "median_s": statistics.median(times), "times_s": times, "max_abs_err": err}


def _run_worker(path, n, args):
    cmd = [sys.executable, __file__, "--worker", path, str(n), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--block-size", *map(str, args.block_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {path} N={n} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, nargs=2, default=None, metavar=("QUERIES", "KEYS"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from onestep.kernels import DEFAULT_BLOCK_SIZE

    args.block_size = tuple(args.block_size or DEFAULT_BLOCK_SIZE)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.threads, args.repeats, args.block_size)))
        return

    import torch

    load_before = os.getloadavg()
    rows, raw = [], []
    for n in args.seq_lens:
        res = {path: _run_worker(path, n, args) for path in ("math", "fused")}
        raw += list(res.values())
        f, m = res["fused"], res["math"]
        rows.append({"seq_len": n, "max_abs_err": f["max_abs_err"],
                     "jvp_peak_mem_ratio": f["peak_bytes"] / m["peak_bytes"],
                     "jvp_time_ratio": f["median_s"] / m["median_s"],
                     "fused_peak_mib": f["peak_bytes"] / 2**20, "math_peak_mib": m["peak_bytes"] / 2**20,
                     "fused_ms": 1e3 * f["median_s"], "math_ms": 1e3 * m["median_s"],
                     "math_max_abs_err": m["max_abs_err"]})
        print(f"N={n}: {rows[-1]}", flush=True)

    protocol = {
        "op": "torch.func.jvp of attention(q, k, v) with tangents on q, k, v (primal + tangent in one call)",
        "shape": {"batch": B, "heads": H, "head_dim": D, "dtype": "float32", "self_attention": True, "mask": None},
        "math_path": "torch.softmax(q @ k.transpose(-1, -2) * head_dim ** -0.5, -1) @ v in fp32",
        "fused_path": f"onestep.kernels.fused_attention, torch implementation, block_size={list(args.block_size)}",
        "ratios": "fused / math",
        "max_abs_err": ("max |fused - float64 math| over the output and the JVP "
                        "(math_max_abs_err: the same for the fp32 math path)"),
        "peak_memory": ("fresh subprocess per (path, seq_len); after a tiny warm-up call and allocating inputs and "
                        "tangents, reset VmHWM via /proc/self/clear_refs, run one jvp call, peak = VmHWM - VmRSS "
                        "before the call (resident memory the call added at its peak)"),
        "time": f"median of {args.repeats} calls after one warm-up call, same process",
        "threads": args.threads,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "raw": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "protocol": protocol}, indent=1) + "\n")

    print("\n| seq len | max abs err | JVP peak mem (fused / math) | ratio | JVP time ms (fused / math) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['max_abs_err']:.1e} | {r['fused_peak_mib']:.1f} / {r['math_peak_mib']:.1f} MiB | "
              f"{r['jvp_peak_mem_ratio']:.3f} | {r['fused_ms']:.0f} / {r['math_ms']:.0f} | {r['jvp_time_ratio']:.2f} |")
    print(f"threads={args.threads}, load average before/after {protocol['load_average_before']} / "
          f"{protocol['load_average_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
