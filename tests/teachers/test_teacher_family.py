"""A teacher family is its folder plus one registration line: a toy family written into a temporary folder
(adapter with declared capabilities, tiny builder, full-size spec) is validated, refused where its capabilities
say so, and dry-run (tiny build, training steps, full-size estimate) through the generic code, with no name table
of onestep edited. Also: every built-in family declares what the generic code asks."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml
from onestep.teachers import FullSizeSpec, Teacher, TeacherCapabilities

from onestep.config import ConfigError, load_config
from onestep.registry import TEACHERS

# the toy family's folder, as a contributor would write it under teachers/toy_flow/
DOC = Path(__file__).resolve().parents[2] / "docs" / "howto" / "add-teacher-family.md"


def toy_files() -> dict[str, str]:
    """The toy family's files as docs/howto/add-teacher-family.md shows them (`### teachers/toy_flow/<file>`)."""
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"### `teachers/toy_flow/([a-z_]+\.py)`\n\n```python\n(.*?)```", text, flags=re.S)
    assert [name for name, _ in found] == ["__init__.py", "teacher.py", "tiny.py", "full_size.py"]
    return dict(found)


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    import onestep.teachers

    folder = tmp_path / "toy_flow"    # teachers/toy_flow/, in a folder added to the package's search path
    folder.mkdir()
    for name, text in toy_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(onestep.teachers, "__path__", [*onestep.teachers.__path__, str(tmp_path)])
    TEACHERS.load_builtin()
    try:
        # the one registration line (teachers/__init__.py holds one per family)
        importlib.import_module("onestep.teachers.toy_flow")
        yield TEACHERS.get("toy_flow")
    finally:
        TEACHERS._entries.pop("toy_flow", None)
        name = "onestep.teachers.toy_flow"
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def _recipe(tmp_path, data: dict, **objective):
    values = {"name": "toy", "teacher": {"name": "toy_flow"}, "student": {"init": "teacher"},
              "objective": {"name": "splitmeanflow", **objective}, "data": data,
              "train": {"steps": 10, "mixed_precision": "no"}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_toy_family_from_its_folder_validates_and_dry_runs(toy_family, tmp_path, monkeypatch):
    from onestep.teachers.tiny import tiny_families

    from onestep.config import teacher_families
    from onestep.dryrun import dry_run, dry_run_families, full_size_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert issubclass(toy_family, Teacher) and toy_family.capabilities.space == "pixel"
    # the generic code's lists come from the registry: the toy family is in them
    assert "toy_flow" in teacher_families(adapter=True) and "toy_flow" not in teacher_families(conditioning="prompt")
    assert "toy_flow" in tiny_families() and "toy_flow" in dry_run_families()
    assert "toy/flow-unet" in full_size_models()
    # its capabilities decide which data sources fit: unconditional, so no prompts and no class labels
    with pytest.raises(ConfigError, match="data.name=prompts needs a text-to-image teacher"):
        load_config(_recipe(tmp_path, {"name": "prompts", "path": "p.txt", "teacher_steps": 1}))
    with pytest.raises(ConfigError, match="data.name=class_labels needs a class-conditional teacher"):
        load_config(_recipe(tmp_path, {"name": "class_labels", "teacher_steps": 1}))
    cfg = load_config(_recipe(tmp_path, {"name": "teacher_samples", "teacher_steps": 1, "batch_size": 2}))
    # --dry-run: tiny build through the family's builder, training steps, the full-size estimate from its spec
    lines = []
    result = dry_run(cfg, print_fn=lines.append, activations=False)
    out = "\n".join(lines)
    assert "config valid" in out and "estimated GPU memory at full size" in out
    assert "toy/flow-unet" in out
    tiny, est = result["tiny"], result["estimate"]
    assert tiny["sample_shape"] == (3, 8, 8) and tiny["steps"] >= 1 and set(tiny["groups"])
    assert est.teacher_params["denoiser"] > tiny["teacher_params"] > 0


def test_every_builtin_family_declares_its_capabilities():
    expected = {  # conditioning, space, time, adapter, tiny build
        "digits": ("none", "pixel", "flow", False, False), "gmm": ("class", "pixel", "flow", False, False),
        "unet": ("class", "pixel", "vp", True, True), "edm": ("class", "pixel", "edm", True, True),
        "stable_diffusion": ("prompt", "latent", "vp", True, True), "sdxl": ("prompt", "latent", "vp", True, True),
        "sd3": ("prompt", "latent", "flow", True, True), "flux": ("prompt", "latent", "flow", True, True),
        "sana": ("prompt", "latent", "flow", True, True),
    }
    for name, (conditioning, space, time, adapter, tiny) in expected.items():
        cls = TEACHERS.get(name)
        caps = cls.capabilities
        assert isinstance(caps, TeacherCapabilities)
        assert (caps.conditioning, caps.space, caps.time, caps.adapter) == (conditioning, space, time, adapter), name
        assert caps.vae == (space == "latent")
        assert (cls.tiny is not None) == tiny and (cls.full_size is not None) == tiny, name
        if cls.full_size is not None:
            assert isinstance(cls.full_size, FullSizeSpec) and cls.full_size.default in cls.full_size.models


def test_capabilities_refuse_unknown_values():
    with pytest.raises(ValueError, match="conditioning"):
        TeacherCapabilities(conditioning="text")
    with pytest.raises(ValueError, match="time"):
        TeacherCapabilities(time="ddpm")
