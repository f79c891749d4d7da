"""benchmarks/gpu_check.py without a GPU: the exit without CUDA, and its comparison code run on CPU
(the torch path against the float64 math reference; wrong kernels are caught; the Triton kernels
under TRITON_INTERPRET=1 are checked in tests/onestep/kernels/test_attention.py's interpreter subprocess)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onestep.kernels import fused_attention

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _load()
CPU_SHAPES = [(1, 2, 70, 45, 16), (2, 1, 33, 77, 32)]  # lengths off the tiles, cross-attention to 77 tokens


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_without_cuda_exits_2_with_one_line(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=120)
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), lines
    assert not out.exists()


def test_torch_path_passes_the_check_on_cpu():
    cases = gc.correctness({"torch_path": gc.attn_torch_path}, CPU_SHAPES, list(gc.DTYPES), "cpu",
                           log=lambda line: None)
    assert len(cases) == len(CPU_SHAPES) * 3 * 3
    assert [c["torch_path"]["passed"] for c in cases] == [True] * len(cases), \
        [c for c in cases if not c["torch_path"]["passed"]]
    worst = {d: gc.worst_error(cases, "torch_path", d) for d in gc.DTYPES}
    print("\ntorch path worst error / tolerance:", {d: f"{worst[d]:.1e} / {gc.TOLERANCES[d]:.0e}" for d in worst})
    # the errors are real measurements at each dtype's precision, not zeros
    assert 0 < worst["fp32"] < 1e-5 and 1e-4 < worst["fp16"] < 1e-3 and 1e-3 < worst["bf16"] < 1e-2
    json.dumps(cases)  # what the report stores


def _failing(case, name="bad"):
    return (sorted(q for q, e in case[name]["errors"].items() if e > case["tolerance"])
            if "errors" in case[name] else None)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_the_check_catches_wrong_kernels(dtype, monkeypatch):
    import onestep.kernels.attention as ka

    shape = CPU_SHAPES[0]
    # softmax temperature 2 % off: every quantity is wrong
    bad_scale = lambda q, k, v, m: fused_attention(q, k, v, m, scale=1.02 * q.shape[-1] ** -0.5)  # noqa: E731
    assert _failing(gc.check_case({"bad": bad_scale}, shape, dtype, None, "cpu")) == ["dk", "dq", "dv", "jvp", "out"]
    # a kernel that ignores the mask fails the masked cases only
    no_mask = lambda q, k, v, m: fused_attention(q, k, v)  # noqa: E731
    assert gc.check_case({"bad": no_mask}, shape, dtype, None, "cpu")["bad"]["passed"]
    for mask_kind in ("bool", "additive"):
        assert "out" in _failing(gc.check_case({"bad": no_mask}, shape, dtype, mask_kind, "cpu"))
    # a wrong JVP rule (the query tangent dropped) fails only "jvp"; a wrong backward only its gradient
    real_jvp, real_bwd = ka._torch_jvp, ka._torch_backward
    monkeypatch.setattr(ka, "_torch_jvp",
                        lambda q, k, v, o, lse, dq, dk, dv, *a: real_jvp(q, k, v, o, lse, None, dk, dv, *a))
    assert _failing(gc.check_case({"bad": gc.attn_torch_path}, shape, dtype, "bool", "cpu")) == ["jvp"]
    monkeypatch.setattr(ka, "_torch_jvp", real_jvp)

    def half_dk(*args):
        dq, dk, dv = real_bwd(*args)
        return dq, dk * 0.9, dv

    monkeypatch.setattr(ka, "_torch_backward", half_dk)
    assert _failing(gc.check_case({"bad": gc.attn_torch_path}, shape, dtype, None, "cpu")) == ["dk"]


def test_a_kernel_that_fails_or_gives_nan_is_a_failed_case():
    def broken(q, k, v, m):
        raise RuntimeError("no kernel image is available")

    nan = lambda q, k, v, m: fused_attention(q, k, v, m) * float("nan")  # noqa: E731
    case = gc.check_case({"bad": broken, "nan": nan}, CPU_SHAPES[1], "fp32", None, "cpu")
    assert case["bad"] == {"passed": False, "error": "RuntimeError: no kernel image is available"}
    assert not case["nan"]["passed"] and case["nan"]["errors"]["out"] == float("inf")
    assert gc.worst_error([case], "bad", "fp32") == float("inf")


def test_main_writes_the_report(tmp_path, monkeypatch):
    """main() end to end on CPU posing as CUDA (tiny shapes): the Triton kernels cannot run there, which
    the report records as failed cases (exit 1) while the torch path and SDPA are checked and timed."""
    import time

    class Event:  # CUDA events replaced by a wall clock
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return 1e3 * (end.t - self.t)

    for name, value in {"is_available": lambda: True, "get_device_name": lambda d=None: "cpu posing as cuda",
                        "get_device_capability": lambda d=None: (0, 0), "synchronize": lambda *a: None,
                        "empty_cache": lambda: None, "Event": Event}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(gc, "_cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(gc, "QUICK_CHECK_SHAPES", [CPU_SHAPES[0]])
    monkeypatch.setattr(gc, "QUICK_TIME_SHAPES", [("tiny", 1, 2, 40, 30, 16)])
    out = tmp_path / "report.json"
    assert gc.main(["--out", str(out), "--quick", "--repeats", "1"]) == 1
    report = json.loads(out.read_text())
    assert report["device"] == "cpu posing as cuda" and report["versions"]["torch"] == torch.__version__
    assert report["tolerances"] == gc.TOLERANCES
    assert all(not c["triton"]["passed"] and "CUDA" in c["triton"]["error"] for c in report["cases"])
    assert all(c["torch_path"]["passed"] for c in report["cases"]) and len(report["cases"]) == 9
    assert not report["summary"]["triton_correct"] and report["summary"]["worst_triton_error"]["fp32"] is None
    assert report["summary"]["triton_failed_cases"] == 9 and report["summary"]["torch_path_failed_cases"] == 0
    assert {r["dtype"] for r in report["timings"]} == {"bf16", "fp16", "fp32"}
    for row in report["timings"]:
        assert row["sdpa_fwd_ms"] > 0 and row["sdpa_fwd_bwd_ms"] > 0 and row["torch_path_jvp_ms"] > 0
        assert row["triton_fwd_ms"] is None and "CUDA" in row["triton_fwd_error"]
