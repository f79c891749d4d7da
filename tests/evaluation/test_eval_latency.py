"""measure_latency: warm-up calls are not timed, the median is taken, ms/image and images/s follow."""
import time

import pytest
from onestep.evaluation.latency import latency_table, measure_latency


def test_warmup_is_untimed_and_median_is_used():
    durations = iter([0.2, 0.2, 0.01, 0.03, 0.02, 0.5, 0.02])  # 2 slow warm-ups, then 5 timed calls
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(durations))

    row = measure_latency(fn, batch_size=4, warmup=2, repeats=5)
    assert len(calls) == 7 and len(row["times_ms"]) == 5
    assert row["median_ms_per_batch"] == pytest.approx(20, abs=8)  # median of 10, 30, 20, 500, 20
    assert row["ms_per_image"] == pytest.approx(row["median_ms_per_batch"] / 4)
    assert row["images_per_s"] == pytest.approx(4000 / row["median_ms_per_batch"])
    assert row["peak_memory_mb"] is None or row["peak_memory_mb"] > 0
    table = latency_table([{**row, "model": "student", "steps": 1}])
    assert "| student | 1 | 4 |" in table


def test_bad_arguments():
    with pytest.raises(ValueError):
        measure_latency(lambda: None, batch_size=0)


def test_feature_throughput_benchmark_runs(tmp_path):
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "feature_throughput.py"
    out = tmp_path / "ft.json"
    argv, sys.argv = sys.argv, [str(script), "--batch-size", "64", "--repeats", "1",
                            "--inception-batch-size", "1", "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert e.value.code == 0
    result = json.loads(out.read_text())
    assert result["rows"][0]["network"].startswith("digits-cnn-128") and result["rows"][0]["images_per_s"] > 0
    assert "target_met" in result and "versions" in result["protocol"]
