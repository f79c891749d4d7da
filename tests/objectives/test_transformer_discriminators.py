"""Discriminator heads on transformer teachers (tiny SD3 and SANA from onestep.teachers.flow_transformer.tiny).

Transformer blocks return tokens [B, N, C]; the token heads are Conv1d over [B, C, N]. f-distill, SMD / SMT
(both mixture nets) and Lightning take one critic and one generator step with finite losses; every token head
gives one logit
per image token of the tiny model (64: SD3 16 channels, SANA 8); and the logits equal the heads applied to
the image tokens explicitly transposed to [B, C, N] (read by the test's own hooks: SD3's joint blocks return
(text, image) streams). The tiny FLUX has as many tokens as channels (16), so it could not tell the layouts
apart and is left out.
"""
from __future__ import annotations

import pytest
import torch
from onestep.objectives.discriminators import FeatureDiscriminator, TokenHead
from test_recipes import _build_teacher, _tiny_teacher_section

from onestep import paths
from onestep.student import sinusoidal_embedding, student_from_teacher

FAMILIES = ["sd3", "sana"]
PROMPTS = ["a cat", "the dog"]


@pytest.fixture(scope="module", params=FAMILIES)
def teacher(request, tmp_path_factory):
    return _build_teacher(_tiny_teacher_section(request.param, tmp_path_factory.mktemp(request.param)))


def image_tokens(teacher) -> int:
    """N of the tiny model: its latent's patches."""
    h, w = teacher.sample_shape[-2:]
    patch = teacher.backbone().config.patch_size
    return (h // patch) * (w // patch)


def block_tokens(net, names, run) -> list[torch.Tensor]:
    """The image-token output [B, N, C] of the blocks `names` of `net` while `run()` executes."""
    found = {}

    def keep(name):
        def hook(module, args, output):
            found[name] = output[1] if isinstance(output, tuple) else output   # SD3: (text, image)
        return hook

    handles = [net.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [found[n] for n in names]


def transposed_reference(disc: FeatureDiscriminator, tokens: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """The heads of `disc` applied to [B, C, N] copies of the tokens, concatenated: [B, heads * N]."""
    t_emb = sinusoidal_embedding(t.reshape(-1).float() * disc.time_scale, disc.emb_dim)
    return torch.cat([head(f.transpose(1, 2).contiguous(), t_emb) for head, f in zip(disc.heads, tokens)], dim=1)


def check_token_heads(disc: FeatureDiscriminator, tokens, t, logits, n_tokens: int) -> None:
    assert all(isinstance(h, TokenHead) for h in disc.heads) and len(disc.heads) == len(tokens)
    assert all(f.dim() == 3 and f.shape[1] == n_tokens for f in tokens)      # [B, N, C] from the blocks
    assert logits.shape == (tokens[0].shape[0], len(tokens) * n_tokens)     # one logit per token and head
    reference = transposed_reference(disc, tokens, t)
    print(f"\n{len(tokens)} heads x {n_tokens} tokens of {tokens[0].shape[2]} channels: "
          f"max |logits - heads on transposed tokens| {(logits - reference).abs().max().item():.2e}")
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)


def batch_of(teacher, seed=0):
    x = torch.randn(2, *teacher.sample_shape, generator=torch.Generator().manual_seed(seed))
    return {"x": x, "cond": teacher.encode_prompt(PROMPTS)}


def noisy(teacher, batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(2, generator=gen) * 0.8 + 0.1
    return paths.interpolate(batch["x"], torch.randn(batch["x"].shape, generator=gen), t), t


def step_and_check(obj, batch, steps: list[int], group_of_step) -> None:
    """Losses of `steps` finite, and each step's loss gives every trainable parameter of its group a finite
    gradient."""
    groups = obj.param_groups()
    for step in steps:
        out = obj.loss(batch, step)
        for group in obj.active_groups(step):
            loss = out[group]
            assert torch.isfinite(loss), (step, group, loss)
            params = [p for p in groups[group] if p.requires_grad]
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert set(obj.active_groups(step)) == set(group_of_step[step])


def test_token_features_are_read_channels_first():
    """A [B, N, C] feature's logits are the head's on its [B, C, N] transpose, one per token."""
    torch.manual_seed(0)
    tokens = [torch.randn(3, 10, 6), torch.randn(3, 4, 12)]
    disc = FeatureDiscriminator(tokens, hidden=8)
    assert [h.conv_in.in_channels for h in disc.heads] == [6, 12]
    t = torch.rand(3)
    logits = disc(tokens, t)
    assert logits.shape == (3, 10 + 4)
    torch.testing.assert_close(logits, transposed_reference(disc, tokens, t), rtol=1e-5, atol=1e-6)


def test_fdistill_heads_on_transformer_tokens(teacher):
    from onestep.objectives.fdistill import FDistill, FDistillConfig

    torch.manual_seed(0)
    obj = FDistill(student_from_teacher(teacher), teacher, FDistillConfig(critic_per_generator=1, head_hidden=16))
    obj.generator = torch.Generator().manual_seed(0)
    layers = list(teacher.default_feature_layers)
    assert len(layers) == 2   # both tiny models have 2 transformer blocks
    batch = batch_of(teacher)
    x_t, t = noisy(teacher, batch)
    tokens = block_tokens(teacher.backbone(), layers, lambda: teacher.velocity(x_t, t, batch["cond"]))
    with torch.no_grad():
        logits = obj.discriminator_logits(x_t, t, batch["cond"])
    check_token_heads(obj.discriminator, tokens, t, logits, image_tokens(teacher))
    step_and_check(obj, batch, [0, 1], {0: ["fake_score", "disc"], 1: ["student"]})


@pytest.mark.parametrize("name", ["smd", "smt"])
def test_smt_gan_heads_on_transformer_tokens(teacher, name):
    from onestep.objectives.smt import SMD, SMT, SMDConfig, SMTConfig

    cls, config = {"smd": (SMD, SMDConfig), "smt": (SMT, SMTConfig)}[name]
    # no default bottleneck for transformers; both blocks (SD3's last one returns no text stream)
    layers = ["net.backbone.transformer_blocks.0", "net.backbone.transformer_blocks.1"]
    torch.manual_seed(0)
    obj = cls(student_from_teacher(teacher), teacher, config(critic_per_generator=2, gan_layers=layers, head_hidden=16,
                                                             gan_weight=0.1, critic_gan_weight=0.1))
    obj.generator = torch.Generator().manual_seed(0)
    batch = batch_of(teacher)
    x_t, t = noisy(teacher, batch)
    half = torch.full_like(t, 0.5)
    tokens = block_tokens(obj.score_net, layers, lambda: obj.score_net(x_t, t, half, batch["cond"]))
    with torch.no_grad():
        logits = obj.bottleneck_logits(x_t, t, batch["cond"])
    check_token_heads(obj.gan_head, tokens, t, logits, image_tokens(teacher))
    step_and_check(obj, batch, [0, 1], {0: ["score"], 1: ["student", "score"]})


def test_explicit_smd_logit_head_on_transformer_tokens(teacher):
    """SMD's explicit mixture reads the teacher's default feature layers: no gan_layers to name."""
    from onestep.objectives.smt import SMD, SMDConfig

    torch.manual_seed(0)
    obj = SMD(student_from_teacher(teacher), teacher, SMDConfig(mixture="explicit", critic_per_generator=2,
                                                                head_hidden=16, gan_weight=0.1, critic_gan_weight=0.1))
    obj.generator = torch.Generator().manual_seed(0)
    batch = batch_of(teacher)
    x_t, t = noisy(teacher, batch)
    tokens = block_tokens(teacher.backbone(), list(teacher.default_feature_layers),
                          lambda: teacher.velocity(x_t, t, batch["cond"]))
    with torch.no_grad():
        logits = obj.score_net.head(teacher.features(x_t, t, batch["cond"]), t)
        assert torch.equal(obj.bottleneck_logits(x_t, t, batch["cond"])[:, 0], logits.mean(1))
    check_token_heads(obj.score_net.head, tokens, t, logits, image_tokens(teacher))
    step_and_check(obj, batch, [0, 1], {0: ["score"], 1: ["student", "score"]})


def test_lightning_heads_on_transformer_tokens(teacher):
    """Lightning's conditional head reads the tokens of x_t' and x_t joined along channels [B, N, 2C]."""
    from onestep.objectives.discriminators import concat_channels
    from onestep.objectives.lightning import Lightning, LightningConfig

    torch.manual_seed(0)
    cfg = LightningConfig(teacher_steps=4, stages=[2, 1], stage_iters=[4, 4], mse_stages=0, disc_hidden=16)
    obj = Lightning(student_from_teacher(teacher), teacher, cfg)
    obj.generator = torch.Generator().manual_seed(0)
    batch = batch_of(teacher)
    x_t, t = noisy(teacher, batch)
    x_s, s = noisy(teacher, batch, seed=2)
    net = obj.disc_backbone
    tokens = block_tokens(net, obj.disc_layers, lambda: net(x_t, t, t, batch["cond"]))
    start = block_tokens(net, obj.disc_layers, lambda: net(x_s, s, s, batch["cond"]))
    n = image_tokens(teacher)
    with torch.no_grad():
        feats = obj._encoder_features(x_t, t, batch["cond"])
        check_token_heads(obj.disc_unconditional, tokens, t, obj.disc_unconditional(feats, t), n)
        pair = [concat_channels(f, g) for f, g in zip(feats, obj._encoder_features(x_s, s, batch["cond"]))]
        check_token_heads(obj.disc_conditional, [torch.cat([f, g], dim=2) for f, g in zip(tokens, start)], t,
                          obj.disc_conditional(pair, t), n)
    # conditional phase: G (step 0) then D (step 1); unconditional: steps 2, 3
    step_and_check(obj, batch, [0, 1, 2, 3], {0: ["student"], 1: ["disc"], 2: ["student"], 3: ["disc"]})
