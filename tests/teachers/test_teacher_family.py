"""A teacher family is its folder plus one registration line: a toy family written into a temporary folder
(adapter with declared capabilities, tiny builder, full-size spec) is validated, refused where its capabilities
say so, and dry-run (tiny build, training steps, full-size estimate) through the generic code, with no name table
of onestep edited. Also: every built-in family declares what the generic code asks."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import yaml

from onestep.config import ConfigError, load_config
from onestep.registry import TEACHERS
from onestep.teachers import FullSizeSpec, Teacher, TeacherCapabilities

# the toy family's folder, as a contributor would write it under teachers/toy_flow/
TOY_FILES = {
    "__init__.py": '''
        """A toy flow teacher: a tiny pixel UNet2DModel read as a flow velocity (timestep 1000 t)."""
        from toy_flow.teacher import ToyFlowTeacher
        ''',
    "teacher.py": '''
        from dataclasses import dataclass
        from typing import Optional

        from onestep.registry import TEACHERS
        from onestep.teachers.base import Teacher
        from onestep.teachers.capabilities import TeacherCapabilities
        from toy_flow.full_size import TOY_FULL_SIZE
        from toy_flow.tiny import save_tiny


        @dataclass
        class ToyFlowTeacherConfig:
            path: str = "toy/flow-unet"
            subfolder: Optional[str] = "unet"
            dtype: Optional[str] = None
            device: Optional[str] = None
            variant: Optional[str] = None
            revision: Optional[str] = None


        @TEACHERS.register("toy_flow")
        class ToyFlowTeacher(Teacher):
            Config = ToyFlowTeacherConfig
            capabilities = TeacherCapabilities(conditioning="none", space="pixel", time="flow", adapter=True)
            tiny = staticmethod(save_tiny)
            full_size = TOY_FULL_SIZE

            def __init__(self, unet):
                super().__init__()
                self.unet = unet
                self.sample_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
                self.freeze()

            def _velocity(self, x, t, cond):
                return self.unet(x, 1000 * t).sample

            def backbone(self):
                return self.unet

            @classmethod
            def from_config(cls, cfg):
                from diffusers import UNet2DModel

                return cls(UNet2DModel.from_pretrained(cfg.path, subfolder=cfg.subfolder, use_safetensors=True))
        ''',
    "tiny.py": '''
        from onestep.teachers.unet.tiny import tiny_pixel_unet


        def save_tiny(cfg, folder, class_conditional):
            tiny_pixel_unet(seed=3).save_pretrained(folder / "unet", safe_serialization=True)
            return {"path": str(folder), "subfolder": "unet"}
        ''',
    "full_size.py": '''
        from onestep.teachers.capabilities import FullSizeSpec

        _UNET = ("UNet2DModel", dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                     layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D")))
        TOY_FULL_SIZE = FullSizeSpec({"toy/flow-unet": {"denoiser": _UNET}}, default="toy/flow-unet", pipeline=False)
        ''',
}


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    folder = tmp_path / "toy_flow"
    folder.mkdir()
    for name, text in TOY_FILES.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    TEACHERS.load_builtin()
    try:
        importlib.import_module("toy_flow")  # the one registration line (teachers/__init__.py holds one per family)
        yield TEACHERS.get("toy_flow")
    finally:
        TEACHERS._entries.pop("toy_flow", None)
        for module in [m for m in sys.modules if m == "toy_flow" or m.startswith("toy_flow.")]:
            del sys.modules[module]


def _recipe(tmp_path, data: dict, **objective):
    values = {"name": "toy", "teacher": {"name": "toy_flow"}, "student": {"init": "teacher"},
              "objective": {"name": "splitmeanflow", **objective}, "data": data,
              "train": {"steps": 10, "mixed_precision": "no"}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_toy_family_from_its_folder_validates_and_dry_runs(toy_family, tmp_path, monkeypatch):
    from onestep.config import teacher_families
    from onestep.dryrun import dry_run, dry_run_families, full_size_models
    from onestep.teachers.tiny import tiny_families

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
