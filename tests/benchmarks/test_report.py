"""The README's results tables are rendered from benchmarks/results/*.json (benchmarks/report.py), never typed:
a committed table that differs from its rendering fails here, and so does a marked table with no renderer."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def report_module():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_equal_their_rendering():
    report = report_module()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    _, changed = report.render(text)
    assert not changed, f"tables differ from benchmarks/results: {changed}; run python benchmarks/report.py"
    assert set(report.RENDERERS) <= {m[1] for m in report._BLOCK.findall(text)}   # every renderer has its table


def test_a_hand_edited_table_is_caught():
    report = report_module()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    edited = text.replace("<!-- /table:smoke -->", "| typed | by hand |\n<!-- /table:smoke -->", 1)
    assert report.render(edited)[1] == ["smoke"]
    with pytest.raises(KeyError, match="no renderer"):
        report.render("<!-- table:unknown -->\nx\n<!-- /table:unknown -->")
