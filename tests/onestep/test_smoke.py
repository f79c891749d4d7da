"""`onestep distill --config X --smoke` on every shipped recipe, through the CLI as a user runs it, offline: every
stage passes (train every group, checkpoint, resume, decoded grid, export in every format the family takes, load,
eval), smoke.json says so, and a broken stage fails the command. The fast suite rehearses one recipe per teacher
family; `make test-slow` every recipe."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from onestep import cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
#: one recipe per teacher family for the fast suite (digits with a smaller batch: the path, not the numbers)
FAST = {"digits_splitmeanflow": ["data.batch_size=8"], "cifar10_splitmeanflow": [], "imagenet64_smd": [],
        "sd15_splitmeanflow": [], "sdxl_fdistill": [], "sd3_splitmeanflow": [], "flux_splitmeanflow": [],
        "sana_splitmeanflow": []}
TEXT_TO_IMAGE = ("sd15", "sdxl", "sd3", "flux", "sana")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test (the smoke sets HF_HUB_OFFLINE itself)."""
    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def run_smoke(recipe: str, out: Path, *extra: str) -> tuple[int, dict]:
    code = cli.main(["distill", "--config", recipe, "--smoke", f"output_dir={out}", "train.num_threads=1", *extra])
    return code, json.loads((out / f"{recipe}-smoke" / "smoke.json").read_text())


def test_every_shipped_recipe_has_a_smoke_test():
    assert set(FAST) <= set(RECIPES) and len(RECIPES) >= 20


@pytest.mark.parametrize("recipe", [r if r in FAST else pytest.param(r, marks=pytest.mark.slow) for r in RECIPES])
def test_recipe_smoke_passes_every_stage(recipe, tmp_path, offline):
    code, record = run_smoke(recipe, tmp_path, *FAST.get(recipe, []))
    stages = {s["name"]: s for s in record["stages"]}
    failed = {n: s["detail"] for n, s in stages.items() if s["status"] not in ("ok", "n/a")}
    assert code == 0 and record["passed"] and not failed, failed
    for name in ("tiny_teacher", "train", "checkpoint", "resume", "sample_grid", "eval_fid"):
        assert stages[name]["status"] == "ok" and stages[name]["seconds"] >= 0 and stages[name]["peak_rss_bytes"] > 0
    exported = [n for n, s in stages.items() if n.startswith("export:") and s["status"] == "ok"]
    for name in exported:
        assert stages["load:" + name.split(":")[1]]["status"] == "ok"
    if recipe.startswith(TEXT_TO_IMAGE):
        assert stages["eval_clip"]["status"] == "ok"
        assert {"export:diffusers", "export:lora"} <= set(exported)     # stock pipeline and LoRA on the teacher's
    if recipe == "imagenet64_smd":                                      # EDM: no stock pipeline, eval from the run
        assert not exported and "generated from the run" in stages["eval_fid"]["detail"]
    grid = stages["sample_grid"]["detail"]
    assert ("3 channel(s)" in grid) or (recipe.startswith("digits") and "1 channel(s)" in grid)


def test_a_broken_stage_fails_the_smoke(tmp_path, offline, monkeypatch):
    """A grid of raw latents (what fit() wrote before the grid decoded through the VAE) fails sample_grid, the
    command exits 1 and smoke.json names it."""
    import torch
    from torchvision.utils import save_image

    from onestep.trainer import Trainer

    def raw_latents(self, n=None):
        path = self.run_dir / "samples" / "latents.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(torch.rand(4, 4, 8, 8), path)   # 4 latent channels, undecoded
        return path

    monkeypatch.setattr(Trainer, "save_samples", raw_latents)
    code, record = run_smoke("sd15_splitmeanflow", tmp_path)
    stages = {s["name"]: s for s in record["stages"]}
    assert code == 1 and not record["passed"]
    assert stages["sample_grid"]["status"] == "failed", stages["sample_grid"]
