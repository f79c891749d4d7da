"""The results tables of README.md and docs/**/*.md are rendered from benchmarks/results/ (benchmarks/report.py),
never typed: a committed table that differs from its rendering fails here, and so does a marked table with no renderer
or a renderer whose table appears nowhere."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def report_module():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_equals_its_rendering():
    report = report_module()
    files = report.files()
    assert ROOT / "README.md" in files and any(p.parent.name == "methods" for p in files)
    seen = set()
    for path in files:
        text = path.read_text(encoding="utf-8")
        _, changed = report.render(text)
        assert not changed, f"{path.relative_to(ROOT)}: tables differ from benchmarks/results: {changed}; " \
                            f"run python benchmarks/report.py"
        seen |= {m[1] for m in report._BLOCK.findall(text)}
    assert set(report.RENDERERS) <= seen, f"renderers with no table: {set(report.RENDERERS) - seen}"


def test_every_method_page_has_its_expected_results():
    report = report_module()
    for name in report.OBJECTIVE_NAMES:
        text = (ROOT / "docs" / "methods" / f"{name}.md").read_text(encoding="utf-8")
        assert f"<!-- table:expected_{name} -->" in text, name


def test_a_hand_edited_table_is_caught():
    report = report_module()
    text = (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")
    edited = text.replace("<!-- /table:smoke -->", "| typed | by hand |\n<!-- /table:smoke -->", 1)
    assert report.render(edited)[1] == ["smoke"]
    with pytest.raises(KeyError, match="no renderer"):
        report.render("<!-- table:unknown -->\nx\n<!-- /table:unknown -->")
    assert report.render("<!-- table:smoke -->\n<!-- /table:smoke -->")[1] == ["smoke"]   # an empty table too
