"""The per-family recipes (configs/*.yaml), `onestep distill --dry-run`, and the options they need:
LoRA students (peft), gradient checkpointing, fp32 master weights, and the data sources of the adapter
teachers (prompts, class_labels, image_folder, teacher_samples).

References are independent of the code under test: a real build's parameter count for the meta build,
peft's own layers and state dict, the same computation without checkpointing, the teacher's own
sampler and the diffusers VAE for the data batches, and the teacher's velocity for the LoRA student."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import yaml
from onestep.teachers.tiny import save_tiny_teacher

from onestep.config import ConfigError, load_config

RECIPES = ["cifar10_splitmeanflow", "imagenet64_smd", "sd15_splitmeanflow", "sd15_fdistill", "sdxl_fdistill",
           "sd3_splitmeanflow", "flux_splitmeanflow", "sana_splitmeanflow"]
# f-distill steps its critic `critic_per_generator` times before the first generator step: 5-10 tiny steps
SLOW_RECIPES = {"sd15_fdistill", "sdxl_fdistill"}
FAMILIES = ["unet", "edm", "stable_diffusion", "sdxl", "sd3", "flux", "sana"]


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _config(tmp_path, values: dict, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return load_config(path)


def _tiny_teacher_section(family, tmp_path, class_conditional=False, **extra):
    base = {"name": family, **({"path": "x"} if family == "edm" else {}), **extra}
    return save_tiny_teacher(family, base, tmp_path / f"tiny-{family}", class_conditional=class_conditional)


def _build_teacher(section):
    from onestep.config import section_config
    from onestep.registry import TEACHERS, load_builtin

    load_builtin()
    cls, cfg = section_config("teacher", section, TEACHERS)
    return cls.from_config(cfg).freeze()


# ------------------------------------------------------------------------------------------------
# every shipped recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_and_names_a_real_model(recipe):
    cfg = load_config(recipe)
    assert cfg.teacher.get("path"), "a recipe names its teacher's hub id or folder"
    text = open(f"configs/{recipe}.yaml", encoding="utf-8").read()
    assert "NOT RUN AT FULL SIZE HERE" in text


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW_RECIPES else r
                                    for r in RECIPES])
def test_recipe_dry_runs_at_tiny_size_offline(recipe, offline):
    from onestep.dryrun import dry_run

    cfg = load_config(recipe)
    lines = []
    result = dry_run(cfg, print_fn=lines.append, activations=False)  # the full-size trace: test_activation_estimate.py
    out = "\n".join(lines)
    assert "config valid" in out and "estimated GPU memory at full size" in out
    assert "activations not estimated in this call" in out
    tiny, est = result["tiny"], result["estimate"]
    assert set(tiny["groups"]) and all(v is None or torch.isfinite(torch.tensor(v)) for v in tiny["losses"])
    if cfg.student.lora_rank > 0:
        assert 0 < tiny["student_trainable"] < tiny["student_total"]
        assert 0 < est.student_trainable < est.student_total
    else:
        assert tiny["student_trainable"] == tiny["student_total"]
    # the estimate's arithmetic: teacher weights in their dtype, trainable at 16 bytes
    bytes_per = {"float32": 4, "bfloat16": 2}[est.teacher_dtype]
    teacher_gib = sum(est.teacher_params.values()) * bytes_per / 1024 ** 3
    assert result["memory_total_gib"] >= teacher_gib + est.student_trainable * 16 / 1024 ** 3 - 1e-9


def test_distill_dry_run_flag(offline, capsys, tmp_path, monkeypatch):
    from onestep.cli import main

    monkeypatch.chdir(tmp_path)  # nothing may be written: no runs/ folder appears
    assert main(["distill", "--config", "imagenet64_smd", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tiny build" in out and "full size (meta-device build" in out and "GPU" in out.splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_dry_run_of_a_digits_recipe_is_a_one_line_error(capsys):
    from onestep.cli import main

    assert main(["distill", "--config", "digits_splitmeanflow", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dry-run" in err


# ------------------------------------------------------------------------------------------------
# full-size counts: the meta build equals a real build


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_count_of_a_config_equals_the_real_build(family, tmp_path, offline):
    from onestep.config import RunConfig
    from onestep.dryrun import _local_components, count, meta_model

    section = _tiny_teacher_section(family, tmp_path, class_conditional=family in ("unet", "edm"))
    teacher = _build_teacher(section)
    cfg = RunConfig(teacher=section)
    spec, _ = _local_components(cfg)
    meta = {k: meta_model(cls, conf) for k, (cls, conf) in spec.items()}
    assert all(p.is_meta for m in meta.values() for p in m.parameters())
    assert sum(count(m) for m in meta.values()) == count(teacher)
    assert count(meta["denoiser"]) == count(teacher.backbone())


def test_meta_counts_of_lora_and_interval_embedding_equal_the_real_student(tmp_path, offline):
    from onestep.build import add_lora
    from onestep.dryrun import interval_embedding_params, lora_params
    from onestep.student import student_from_teacher

    teacher = _build_teacher(_tiny_teacher_section("stable_diffusion", tmp_path))
    student = student_from_teacher(teacher)
    assert interval_embedding_params(teacher.backbone()) == \
        sum(p.numel() for p in student.interval_embedding.parameters())
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    trainable = add_lora(student, 4, None, targets)
    real_lora = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    assert real_lora == lora_params(teacher.backbone(), 4, targets) > 0
    assert trainable == real_lora + interval_embedding_params(teacher.backbone())


# ------------------------------------------------------------------------------------------------
# LoRA students and gradient checkpointing


def _probe_inputs(teacher, n=3, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *teacher.sample_shape, generator=gen).to(dtype)
    t = torch.tensor([0.2, 0.6, 0.95], dtype=dtype)[:n]
    cond = teacher.encode_prompt(["a cat", "the dog", "a cat and the dog"][:n]) if hasattr(teacher, "encode_prompt") \
        else None
    return z, t, cond


def _randomise_lora(net, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("family", ["stable_diffusion", "sd3"])
def test_lora_student_equals_teacher_at_init_and_only_adapters_train(family, tmp_path, offline):
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    cfg = _config(tmp_path, {"teacher": _tiny_teacher_section(family, tmp_path),
                             "student": {"init": "teacher", "lora_rank": 4, "lora_alpha": 8},
                             "objective": {"name": "splitmeanflow"},
                             "data": {"name": "prompts", "path": str(tmp_path / "p.txt"), "teacher_steps": 1}})
    from onestep.build import build_student, build_teacher

    teacher = build_teacher(cfg)
    student = build_student(cfg, teacher)
    assert any(isinstance(m, LoraLayer) for m in student.backbone.modules())
    z, t, cond = _probe_inputs(teacher)
    with torch.no_grad():
        torch.testing.assert_close(student(z, t, t, cond), teacher.velocity(z, t, cond), rtol=0, atol=1e-6)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("interval_embedding.") for n in trainable)
    assert any(n.startswith("interval_embedding.") for n in trainable)
    # peft's own export sees exactly the adapters, with the configured scale alpha / r = 2
    exported = get_peft_model_state_dict(student.backbone)
    assert exported and all("lora_" in k for k in exported)
    assert {n for n in trainable if "lora_" in n} == {"backbone." + k.replace(".weight", ".default.weight")
                                                       for k in exported}
    layer = next(m for m in student.backbone.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == 2.0
    # one optimizer step moves only the adapters and the interval embedding
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    _randomise_lora(student)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    r = torch.zeros_like(t)
    student(z, r, t, cond).pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


@pytest.mark.parametrize("family", ["stable_diffusion", "sd3", "unet"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, tmp_path, offline):
    from onestep.build import enable_gradient_checkpointing
    from onestep.student import student_from_teacher

    teacher = _build_teacher(_tiny_teacher_section(family, tmp_path)).to(torch.float64)
    plain = student_from_teacher(teacher)
    with torch.no_grad():  # move the zero-initialised interval embedding so that it matters
        plain.interval_embedding.linear_2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    ckpt = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(ckpt) == 1
    z, t, cond = _probe_inputs(teacher, dtype=torch.float64)
    if cond is not None:
        cond = cond.to(dtype=torch.float64)
    r = t / 2
    # a checkpointed unit (UNets: each resnet; transformers: each block) runs twice per step under
    # checkpointing: in the forward, and again in backward
    block = "down_blocks.1.resnets.0" if family != "sd3" else "transformer_blocks.0"
    results = []
    for net in (plain, ckpt):
        calls = []
        # a pre-hook: torch's non-reentrant recomputation stops early, before a forward hook would fire
        handle = net.backbone.get_submodule(block).register_forward_pre_hook(lambda *a: calls.append(1))
        net.train()
        loss = net(z, r, t, cond).pow(2).mean()
        loss.backward()
        handle.remove()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
                        len(calls)))
    (l0, g0, c0), (l1, g1, c1) = results
    assert c0 == 1 and c1 == 2, "checkpointing must recompute the block in backward"
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12)


def test_trainable_copies_of_a_bf16_teacher_train_in_fp32_and_share_the_lora(tmp_path, offline):
    section = _tiny_teacher_section("stable_diffusion", tmp_path)
    section["dtype"] = "bfloat16"
    cfg = _config(tmp_path, {"teacher": section, "student": {"init": "teacher", "lora_rank": 2},
                             "objective": {"name": "fdistill", "divergence": "reverse_kl", "gan_weight": 0.0},
                             "data": {"name": "prompts", "path": str(tmp_path / "p.txt")}})
    from onestep.build import build_objective, build_student, build_teacher

    teacher = build_teacher(cfg)
    assert teacher.model_dtype == torch.bfloat16
    student = build_student(cfg, teacher)
    objective = build_objective(cfg, student, teacher)
    for net in (objective.student, objective.fake_score):
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        frozen = [p for p in net.parameters() if not p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
        assert all("lora_" in n or n.startswith("interval_embedding.") for n, _ in trainable)
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    groups = objective.param_groups()
    assert sum(p.numel() for p in groups["fake_score"]) == sum(p.numel() for p in groups["student"])


# ------------------------------------------------------------------------------------------------
# data sources of the adapter teachers


def test_prompt_batches_carry_the_teachers_condition_and_samples(tmp_path, offline):
    from onestep.build import build_data, build_objective, build_student, build_teacher

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# a comment\nthe dog\n", encoding="utf-8")
    cfg = _config(tmp_path, {"teacher": _tiny_teacher_section("sd3", tmp_path), "student": {"init": "teacher"},
                             "objective": {"name": "splitmeanflow", "guidance": 2.0},
                             "data": {"name": "prompts", "path": str(prompts), "batch_size": 3, "teacher_steps": 2,
                                      "teacher_guidance": 2.0}})
    teacher = build_teacher(cfg)
    data = build_data(cfg, teacher)
    batch = data.batch(3, torch.Generator().manual_seed(5))
    # the same draws, by hand: prompt indices, then the noise, then the teacher's own sampler
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(2, (3,), generator=gen)
    texts = [["a cat", "the dog"][i] for i in idx.tolist()]
    cond = teacher.encode_prompt(texts)
    noise = torch.randn(3, *teacher.sample_shape, generator=gen)
    expected = teacher.sample(noise, cond, steps=2, guidance=2.0)
    torch.testing.assert_close(batch["cond"].prompt_embeds, cond.prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(batch["x"], expected, rtol=0, atol=0)
    assert batch["x"].shape == (3, *teacher.sample_shape)
    objective = build_objective(cfg, build_student(cfg, teacher), teacher)
    out = objective.loss(batch, 0)
    assert torch.isfinite(out["student"])


def test_class_label_batches_are_uniform_labels_and_teacher_samples(tmp_path, offline):
    from onestep.build import build_data, build_objective, build_student, build_teacher

    cfg = _config(tmp_path, {"teacher": _tiny_teacher_section("edm", tmp_path, class_conditional=True),
                             "student": {"init": "teacher"}, "objective": {"name": "smd", "gan_weight": 0.0,
                                                                            "critic_gan_weight": 0.0},
                             "data": {"name": "class_labels", "batch_size": 4, "teacher_steps": 2}})
    teacher = build_teacher(cfg)
    data = build_data(cfg, teacher)
    batch = data.batch(4, torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(teacher.num_classes, (4,), generator=gen)
    noise = torch.randn(4, *teacher.sample_shape, generator=gen)
    torch.testing.assert_close(batch["cond"], labels)
    torch.testing.assert_close(batch["x"], teacher.sample(noise, labels, steps=2), rtol=0, atol=0)
    assert 0 <= int(batch["cond"].min()) and int(batch["cond"].max()) < teacher.num_classes
    objective = build_objective(cfg, build_student(cfg, teacher), teacher)
    for step in range(objective.cfg.critic_per_generator):
        out = objective.loss(batch, step)
        assert all(torch.isfinite(out[g]) for g in objective.active_groups(step))


def test_placeholder_x_is_accepted_only_where_x_is_read_for_its_shape(tmp_path, offline):
    from onestep.build import build_data, build_objective, build_student, build_teacher

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    cfg = _config(tmp_path, {"teacher": _tiny_teacher_section("stable_diffusion", tmp_path),
                             "student": {"init": "teacher"},
                             "objective": {"name": "fdistill", "divergence": "reverse_kl", "gan_weight": 0.0,
                                           "critic_per_generator": 1},
                             "data": {"name": "prompts", "path": str(prompts), "batch_size": 2}})
    teacher = build_teacher(cfg)
    batch = build_data(cfg, teacher).batch(2, torch.Generator().manual_seed(0))
    assert torch.equal(batch["x"], torch.zeros(2, *teacher.sample_shape))
    objective = build_objective(cfg, build_student(cfg, teacher), teacher)
    torch.manual_seed(0)
    objective.generator = torch.Generator().manual_seed(9)
    a = {k: v for k, v in objective.loss(batch, 1).items()}
    # the objective never reads x's values: other values of the same shape give the same generator loss
    objective.generator = torch.Generator().manual_seed(9)
    b = objective.loss({**batch, "x": torch.randn_like(batch["x"])}, 1)
    torch.testing.assert_close(a["student"], b["student"], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="teacher_steps"):
        _config(tmp_path, {"teacher": _tiny_teacher_section("stable_diffusion", tmp_path),
                           "objective": {"name": "splitmeanflow"},
                           "data": {"name": "prompts", "path": str(prompts)}}, name="d.yaml")


def test_image_folder_batches_are_the_vae_latents(tmp_path, offline):
    from PIL import Image

    from onestep.build import build_data, build_teacher

    folder = tmp_path / "images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(3):  # 20 x 20: resized to the tiny teacher's 16 x 16
        Image.fromarray(torch.randint(0, 256, (20, 20, 3), generator=gen, dtype=torch.uint8).numpy()).save(
            folder / f"{i}.png")
    cfg = _config(tmp_path, {"teacher": _tiny_teacher_section("sd3", tmp_path),
                             "objective": {"name": "flow_matching", "target": "data"},
                             "data": {"name": "image_folder", "path": str(folder)}})
    teacher = build_teacher(cfg)
    batch = build_data(cfg, teacher).batch(2, torch.Generator().manual_seed(1))
    idx = torch.randint(3, (2,), generator=torch.Generator().manual_seed(1))
    images = torch.stack([torch.from_numpy(__import__("numpy").array(
        Image.open(folder / f"{i}.png").convert("RGB").resize((16, 16), Image.BICUBIC))).permute(2, 0, 1)
        for i in idx.tolist()]).float() / 127.5 - 1
    vae = teacher.vae
    expected = (vae.encode(images).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(batch["x"], expected, rtol=1e-5, atol=1e-6)
    assert batch["cond"] is None and batch["x"].shape == (2, *teacher.sample_shape)


# ------------------------------------------------------------------------------------------------
# bad combinations: one line, exit 2


def _bad_cases(tmp):
    prompts = str(tmp / "p.txt")
    sd = {"name": "stable_diffusion"}
    unet = {"name": "unet"}
    return {
        "prompts for a pixel UNet": {"teacher": unet, "data": {"name": "prompts", "path": prompts, "teacher_steps": 1}},
        "class labels for SD": {"teacher": sd, "data": {"name": "class_labels", "teacher_steps": 1}},
        "image folder without a path": {"teacher": {"name": "sdxl"}, "data": {"name": "image_folder"}},
        "prompts without a file": {"teacher": sd, "data": {"name": "prompts", "teacher_steps": 1}},
        "no samples for splitmeanflow": {"teacher": sd, "data": {"name": "prompts", "path": prompts}},
        "teacher samples with 0 steps": {"teacher": unet, "data": {"name": "teacher_samples"}},
        "prompts for the digits teacher": {"teacher": {"name": "digits"}, "data": {"name": "prompts", "path": prompts}},
        "negative LoRA rank": {"teacher": sd, "student": {"lora_rank": -1},
                               "data": {"name": "prompts", "path": prompts, "teacher_steps": 1}},
        "LoRA from scratch": {"teacher": {"name": "gmm"}, "data": {"name": "gmm"},
                              "student": {"init": "scratch", "backbone": "mlp", "lora_rank": 4}},
        "unknown data name": {"data": {"name": "imagenet"}},
    }


@pytest.mark.parametrize("case", list(_bad_cases(__import__("pathlib").Path("/tmp"))))
def test_bad_data_and_student_combinations_are_one_line_errors(case, tmp_path, capsys):
    from onestep.cli import main

    values = _bad_cases(tmp_path)[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"objective": {"name": "splitmeanflow"}, **values}))
    assert main(["distill", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("config error:"), err


@pytest.mark.parametrize("case", ["unconditional teacher with class labels", "LoRA targets that match nothing"])
def test_bad_combinations_found_at_build_time_are_one_line_errors(case, tmp_path, capsys, offline):
    from onestep.cli import main

    if case.startswith("unconditional"):
        values = {"teacher": _tiny_teacher_section("unet", tmp_path),
                  "data": {"name": "class_labels", "teacher_steps": 1}, "train": {"steps": 1}}
    else:
        values = {"teacher": _tiny_teacher_section("unet", tmp_path), "student": {"lora_rank": 2,
                                                                                   "lora_targets": ["no_such_layer"]},
                  "data": {"name": "teacher_samples", "teacher_steps": 1}, "train": {"steps": 1}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"objective": {"name": "splitmeanflow"}, "output_dir": str(tmp_path / "runs"),
                                    **values}))
    assert main(["distill", "--config", str(path), "train.device=cpu", "train.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("config error:"), err
    assert ("class_labels" in err) if case.startswith("unconditional") else ("lora_targets" in err)
