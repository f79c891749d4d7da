"""set_attention_backend on the transformer teacher families (SD3, FLUX, SANA) and the UNets.

Each onestep processor must compute what diffusers' stock processor computes (fp32, <= 1e-5), masks
included; each comparison is also run against deliberately broken processors, to show it can fail.
Then torch.func.jvp through each whole tiny model, with respect to (latent, timestep), is checked
against central differences and against the JVP with the 'math' backend.

The tiny models are built here from the diffusers classes (not from onestep.teachers.tiny, whose
shapes follow the real families' latent channels).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention  # noqa: E402
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_flux import (  # noqa: E402
    FluxAttention,
    FluxAttnProcessor,
    FluxPosEmbed,
)

from onestep.kernels import (  # noqa: E402
    OnestepFluxAttnProcessor,
    OnestepSanaAttnProcessor,
    set_attention_backend,
)

B = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Single attention modules against diffusers' processors
# ------------------------------------------------------------------------------------------------
class _FluxNoRope(OnestepFluxAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, None)


class _FluxNoMask(OnestepFluxAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)


class _FluxScaled(OnestepFluxAttnProcessor):
    """Scores scaled by attn.scale * 1.1: a wrong softmax temperature."""

    def attend(self, q, k, v, mask, scale):
        return super().attend(q, k, v, mask, 1.1 * q.shape[-1] ** -0.5)


class _SanaNoMask(OnestepSanaAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, None)


class _SanaNoQNorm(OnestepSanaAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        norm, attn.norm_q = attn.norm_q, None
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
        finally:
            attn.norm_q = norm


def _randomise_norms(module, seed):
    # RMSNorm weights start at 1; random ones make a processor that skips a norm visibly wrong
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=_gen(seed)))


def _flux_case(kind, mask_kind):
    """A FluxAttention as in FLUX's double blocks ('joint') or single blocks ('single'), and its inputs."""
    torch.manual_seed(0)
    n_txt, n_img, dim = 5, 12, 16
    if kind == "joint":
        attn = FluxAttention(query_dim=dim, added_kv_proj_dim=dim, dim_head=8, heads=2, out_dim=dim,
                             context_pre_only=False, bias=True, eps=1e-6)
    else:
        attn = FluxAttention(query_dim=dim, dim_head=8, heads=2, out_dim=dim, bias=True, eps=1e-6, pre_only=True)
    _randomise_norms(attn, 1)
    ids = torch.cat([torch.zeros(n_txt, 3), torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4,
                                                          torch.arange(n_img) % 4], 1).float()])
    rope = FluxPosEmbed(theta=10000, axes_dim=[2, 2, 4])(ids)
    g = _gen(2)
    L = n_txt + n_img
    if kind == "joint":
        args = dict(hidden_states=torch.randn(B, n_img, dim, generator=g),
                    encoder_hidden_states=torch.randn(B, n_txt, dim, generator=g))
    else:
        args = dict(hidden_states=torch.randn(B, L, dim, generator=g))
    if mask_kind == "keys_bool":  # [B, L] key mask (diffusers' native backend reads it as [B, 1, 1, L])
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, 2:5] = False
        mask[1, -3:] = False
    elif mask_kind == "additive":  # per query and key, broadcast over heads
        mask = torch.randn(B, 1, L, L, generator=g) - torch.where(torch.rand(B, 1, L, L, generator=g) > 0.8, 20.0, 0.0)
    else:
        mask = None
    return attn, dict(args, attention_mask=mask, image_rotary_emb=rope)


def _sana_cross_case(mask_kind):
    """SANA's cross-attention (qk_norm over all heads, as in SANA 1.5 / Sprint) and its inputs."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, qk_norm="rms_norm_across_heads", kv_heads=2, cross_attention_dim=8, heads=2,
                     dim_head=8, bias=True, out_bias=True, processor=SanaAttnProcessor2_0())
    _randomise_norms(attn, 1)
    g = _gen(2)
    args = dict(hidden_states=torch.randn(B, 12, 16, generator=g),
                encoder_hidden_states=torch.randn(B, 6, 8, generator=g))
    if mask_kind == "padding":  # what SanaTransformer2DModel makes of a [B, M] 1/0 caption mask
        keep = torch.ones(B, 6)
        keep[0, 4:] = 0
        args["attention_mask"] = ((1 - keep) * -10000.0).unsqueeze(1)
    return attn, args


def _outputs(module, args):
    out = module(**args)
    return out if isinstance(out, tuple) else (out,)


def _max_diff(module, processor, args, stock):
    module.set_processor(stock)
    ref = _outputs(module, args)
    module.set_processor(processor)
    out = _outputs(module, args)
    assert len(out) == len(ref) and all(o.shape == r.shape for o, r in zip(out, ref))
    assert all(torch.isfinite(r).all() and r.abs().max() > 1e-2 for r in ref)
    return max((o - r).abs().max().item() for o, r in zip(out, ref))


FLUX_CASES = [(kind, mask) for kind in ("joint", "single") for mask in (None, "keys_bool", "additive")]


@pytest.mark.parametrize("kind,mask_kind", FLUX_CASES, ids=[f"{k}-{m}" for k, m in FLUX_CASES])
def test_flux_processor_matches_diffusers(kind, mask_kind):
    attn, args = _flux_case(kind, mask_kind)
    for backend, block in (("fused", 4), ("fused", (8, 3)), ("math", None)):
        proc = OnestepFluxAttnProcessor(backend, block_size=block or 4)
        assert _max_diff(attn, proc, args, FluxAttnProcessor()) <= 1e-5, (backend, block)
    # the comparison sees a missing rotary embedding, an ignored mask, a wrong scale
    mutants = [_FluxNoRope(), _FluxScaled()] + ([_FluxNoMask()] if mask_kind else [])
    for mutant in mutants:
        assert _max_diff(attn, mutant, args, FluxAttnProcessor()) > 1e-3, type(mutant).__name__


@pytest.mark.parametrize("mask_kind", [None, "padding"])
def test_sana_cross_processor_matches_diffusers(mask_kind):
    attn, args = _sana_cross_case(mask_kind)
    for backend in ("fused", "math"):
        assert _max_diff(attn, OnestepSanaAttnProcessor(backend, block_size=4), args, SanaAttnProcessor2_0()) <= 1e-5
    for mutant in [_SanaNoQNorm()] + ([_SanaNoMask()] if mask_kind else []):
        assert _max_diff(attn, mutant, args, SanaAttnProcessor2_0()) > 1e-3, type(mutant).__name__


# ------------------------------------------------------------------------------------------------
# Whole tiny models
# ------------------------------------------------------------------------------------------------
def _randomise(model, scale=0.05):
    """Noise on every weight: diffusers zero-initialises some layers (output projections, modulation),
    which would hide parts of the network from the comparisons."""
    g = _gen(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _sd3():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    _randomise(model)
    g = _gen(3)
    enc, pooled = torch.randn(B, 5, 16, generator=g), torch.randn(B, 8, generator=g)
    x = torch.randn(B, 4, 8, 8, generator=g)

    def f(m, z, t):  # the SD3 adapter's call: timestep = 1000 t
        return m(z, encoder_hidden_states=enc.to(z.dtype), pooled_projections=pooled.to(z.dtype), timestep=1000 * t,
                 return_dict=False)[0]
    return model, x, f, 3  # two joint attentions + the dual (self-only) attention of layer 0


def _flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    _randomise(model)
    g = _gen(3)
    n_img, n_txt = 16, 5
    enc, pooled = torch.randn(B, n_txt, 16, generator=g), torch.randn(B, 8, generator=g)
    img_ids = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], 1).float()
    keep = torch.ones(B, n_txt + n_img, dtype=torch.bool)
    keep[0, 3:n_txt] = False  # padded prompt tokens of the first sample (text tokens come first)
    x = torch.randn(B, n_img, 16, generator=g)

    def f(m, z, t):  # the FLUX adapter's call (timestep in [0, 1]; FLUX multiplies by 1000 itself)
        return m(hidden_states=z, encoder_hidden_states=enc.to(z.dtype), pooled_projections=pooled.to(z.dtype),
                 timestep=t, guidance=torch.full((B,), 3.5, dtype=z.dtype), img_ids=img_ids,
                 txt_ids=torch.zeros(n_txt, 3), joint_attention_kwargs={"attention_mask": keep}, return_dict=False)[0]
    return model, x, f, 3  # one double block, two single blocks


def _sana():
    torch.manual_seed(0)
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=8, qk_norm="rms_norm_across_heads").eval()
    _randomise(model)
    g = _gen(3)
    enc = torch.randn(B, 6, 8, generator=g)
    keep = torch.ones(B, 6)
    keep[0, 4:] = 0
    x = torch.randn(B, 4, 8, 8, generator=g)

    def f(m, z, t):  # the SANA adapter's call: timestep = 1000 t, the caption's padding mask
        return m(z, encoder_hidden_states=enc.to(z.dtype), encoder_attention_mask=keep, timestep=1000 * t,
                 return_dict=False)[0]
    return model, x, f, 4  # per block: linear self-attention (kept) + cross-attention


def _sd_unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()
    _randomise(model)
    g = _gen(3)
    enc = torch.randn(B, 6, 16, generator=g)
    keep = torch.ones(B, 6)
    keep[1, 3:] = 0
    x = torch.randn(B, 4, 8, 8, generator=g)

    def f(m, z, t):
        return m(z, 1000 * t, encoder_hidden_states=enc.to(z.dtype), encoder_attention_mask=keep, return_dict=False)[0]
    return model, x, f, 8  # self + cross attention in 4 transformer blocks (down 1, mid 1, up 2)


def _pixel_unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    _randomise(model)
    x = torch.randn(B, 3, 8, 8, generator=_gen(3))

    def f(m, z, t):  # the digits UNet's call: timestep = 1000 t
        return m(z, 1000 * t, return_dict=False)[0]
    return model, x, f, 4  # AttnDownBlock2D, the mid block, AttnUpBlock2D (2 layers)


FAMILIES = {"sd3": _sd3, "flux": _flux, "sana": _sana, "sd_unet": _sd_unet, "pixel_unet": _pixel_unet}


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_outputs_match_stock(family):
    model, x, f, n_modules = FAMILIES[family]()
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = f(model, x, t)
        assert ref.abs().max() > 1e-2
        for backend in ("fused", "math"):
            assert set_attention_backend(model, backend, block_size=(8, 4)) == n_modules
            err = (f(model, x, t) - ref).abs().max().item()
            assert err <= 1e-5, (backend, err)
        assert set_attention_backend(model, "sdpa") == n_modules
        assert (f(model, x, t) - ref).abs().max() == 0  # back to diffusers' own processors
    if family == "sana":  # linear self-attention keeps diffusers' processor whatever the backend
        set_attention_backend(model, "fused")
        kinds = {type(m.processor).__name__ for m in model.modules() if isinstance(m, Attention)}
        assert kinds == {"SanaLinearAttnProcessor2_0", "OnestepSanaAttnProcessor"}


def test_unroutable_modules_are_refused():
    sana = _sana()[0]
    # diffusers has no xformers processor for SANA's cross-attention: refused before anything changes
    with pytest.raises(ValueError, match="attn2 .*no xformers processor"):
        set_attention_backend(sana, "xformers")
    assert {type(m.processor).__name__ for m in sana.modules() if isinstance(m, Attention)} == {
        "SanaLinearAttnProcessor2_0", "SanaAttnProcessor2_0"}

    class CustomFluxProcessor(FluxAttnProcessor):  # e.g. a user's variant: not silently replaced
        pass

    flux = _flux()[0]
    flux.single_transformer_blocks[1].attn.set_processor(CustomFluxProcessor())
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.1\.attn \(CustomFluxProcessor\)"):
        set_attention_backend(flux, "fused")
    assert type(flux.transformer_blocks[0].attn.processor) is FluxAttnProcessor


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# Every family computes its sinusoidal timestep embedding in float32 (of 1000 t, with frequencies up
# to 1), and SD3/FLUX/SANA also round some activations to float32 (RMS norms, FLUX's rotary
# embedding, SANA's linear attention), so even in float64 a central difference carries float32
# noise ~1e-7 |f| / h. Near 1000 t ~ 500 the rounding of the timestep alone puts ~1e-3 relative noise
# into it, at 1000 t ~ 3 about 1e-5, hence small times. The timestep tangent is scaled by 0.03 so that
# one h suits both parts: a timestep step of 1000 * 0.03 * h ~ 3e-3 (truncation ~ step^2 / 6) and a
# latent step of h = 1e-4; both parts of the JVP then have comparable size (checked below).
JVP_TIMES = (0.002, 0.004)
JVP_TIME_TANGENT = 0.03
JVP_H = 1e-4
JVP_FD_TOL = 5e-4


def _jvp_vs_central_difference(family):
    """(jvp, central difference, jvp with the latent tangent only), fused backend, float64."""
    model, x, f, _ = FAMILIES[family]()
    model = model.double()
    x, t = x.double(), torch.tensor(JVP_TIMES, dtype=torch.float64)
    g = _gen(11)
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    tt = JVP_TIME_TANGENT * torch.randn(B, generator=g, dtype=torch.float64)
    set_attention_backend(model, "fused", block_size=(8, 4))
    fn = lambda z, s: f(model, z, s)  # noqa: E731
    _, jvp = torch.func.jvp(fn, (x, t), (tx, tt))
    _, jvp_x = torch.func.jvp(fn, (x, t), (tx, torch.zeros_like(tt)))
    with torch.no_grad():
        fd = (fn(x + JVP_H * tx, t + JVP_H * tt) - fn(x - JVP_H * tx, t - JVP_H * tt)) / (2 * JVP_H)
    return model, fn, (x, t), (tx, tt), jvp, fd, jvp_x


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_jvp_matches_central_differences(family):
    """torch.func.jvp of the model's output w.r.t. (latent, timestep) along a random tangent, fused
    backend, float64: against central differences, and against the JVP with the math backend."""
    model, fn, primals, tangents, jvp, fd, jvp_x = _jvp_vs_central_difference(family)
    set_attention_backend(model, "math")
    _, jvp_math = torch.func.jvp(fn, primals, tangents)
    err_fd, err_math = _rel(jvp, fd), _rel(jvp, jvp_math)
    print(f"\n{family}: |jvp - central difference| / |jvp| = {err_fd:.1e} (h={JVP_H}); vs math backend {err_math:.1e}; "
          f"|latent part| / |jvp| = {(jvp_x.norm() / jvp.norm()).item():.2f}")
    assert err_fd < JVP_FD_TOL and err_math < 1e-10
    # both parts of the tangent matter: the check fails if either the latent or the timestep part is lost
    assert _rel(jvp_x, fd) > 20 * JVP_FD_TOL and _rel(jvp - jvp_x, fd) > 20 * JVP_FD_TOL


def test_whole_model_jvp_check_catches_a_wrong_attention_jvp(monkeypatch):
    """The check above fails when the fused kernel's JVP drops the query tangent (FLUX, SANA)."""
    import onestep.kernels.attention as ka

    real = ka._torch_jvp
    monkeypatch.setattr(ka, "_torch_jvp",
                        lambda q, k, v, o, lse, dq, dk, dv, *a: real(q, k, v, o, lse, None, dk, dv, *a))
    for family in ("flux", "sana"):
        _, _, _, _, jvp, fd, _ = _jvp_vs_central_difference(family)
        assert _rel(jvp, fd) > 5 * JVP_FD_TOL, family


# ------------------------------------------------------------------------------------------------
# fused_triton: opt-in Triton kernels; impl="auto" stays on the torch path
# ------------------------------------------------------------------------------------------------
def test_auto_impl_never_picks_triton():
    from onestep.kernels.attention import _resolve_impl

    class CudaLike:  # what _resolve_impl may look at: a CUDA fp16 tensor's attributes
        is_cuda, dtype, device = True, torch.float16, torch.device("cuda")

    assert _resolve_impl("auto", CudaLike()) == "torch"
    assert _resolve_impl("auto", torch.zeros(1)) == "torch"


def test_fused_triton_backend_is_opt_in():
    pytest.importorskip("triton")
    model, x, f, n = _flux()
    assert set_attention_backend(model, "fused_triton") == n
    procs = [m.processor for m in model.modules() if isinstance(m, FluxAttention)]
    assert all(p.backend == "fused_triton" and p.impl == "triton" for p in procs)
    # on CPU without the interpreter the kernels cannot run: a clear error, not a silent fallback
    with pytest.raises(RuntimeError, match="impl='triton'.*CUDA"):
        f(model, x, torch.tensor([0.3, 0.8]))
    with pytest.raises(ValueError, match="fused_triton"):
        OnestepFluxAttnProcessor("fused_triton", impl="torch")


def test_config_accepts_fused_triton(tmp_path):
    from onestep.config import ConfigError, load_config

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "teacher")
    base = [f"teacher.path={tmp_path / 'teacher'}"]
    assert load_config("digits_meanflow", base + ["student.attention=fused_triton"]).student.attention == "fused_triton"
    with pytest.raises(ConfigError, match="allowed: sdpa, xformers, math, fused, fused_triton"):
        load_config("digits_meanflow", base + ["student.attention=flash"])


_TRITON_FAMILIES = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests/onestep/kernels")
    from test_attention_families import FAMILIES
    from onestep.kernels import set_attention_backend, triton_attention
    assert triton_attention.interpreting()
    torch.set_num_threads(1)
    for family in ("flux", "sana"):
        model, x, f, n = FAMILIES[family]()
        t = torch.tensor([0.3, 0.8])
        tx, tt = torch.randn_like(x), torch.randn_like(t)
        fn = lambda z, s: f(model, z, s)
        res = {}
        for backend in ("fused", "fused_triton"):
            set_attention_backend(model, backend)
            res[backend] = torch.func.jvp(fn, (x, t), (tx, tt))
        set_attention_backend(model, "sdpa")
        with torch.no_grad():
            ref = fn(x, t)
        errs = [(res["fused_triton"][0] - ref).abs().max().item(),
                ((res["fused_triton"][1] - res["fused"][1]).norm() / res["fused"][1].norm()).item()]
        print(family, "MAXERR", *errs)
""")


def test_fused_triton_families_under_interpreter():
    """FLUX and SANA through the Triton kernels (CPU interpreter): outputs equal diffusers', JVPs the torch path's."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    res = subprocess.run([sys.executable, "-c", _TRITON_FAMILIES], env=env, capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line.split() for line in res.stdout.splitlines() if "MAXERR" in line]
    assert [line[0] for line in lines] == ["flux", "sana"], res.stdout
    for line in lines:
        out_err, jvp_err = float(line[2]), float(line[3])
        assert out_err <= 1e-5 and jvp_err <= 1e-5, line


@pytest.mark.parametrize("family", ["sd3", "flux", "sana"])
@pytest.mark.parametrize("search", ["adaspa", "flexprefill"])
def test_sparse_backend_on_transformer_families(family, search):
    """backend 'sparse': threshold 1 keeps every block, so the model equals diffusers' own to fp32 rounding;
    a lower threshold drops blocks (SD3's joint attention, FLUX without a prompt mask) and changes the output;
    masked products (SANA's cross-attention, FLUX with a padded prompt) run dense."""
    model, x, f, n_modules = FAMILIES[family]()
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = f(model, x, t)
        set_attention_backend(model, "sparse", search=search, threshold=1.0, sparse_block_size=4)
        assert (f(model, x, t) - ref).abs().max() <= 1e-5
        searches = [m.processor.search for m in model.modules() if hasattr(getattr(m, "processor", None), "search")]
        assert len(searches) == (n_modules - 2 if family == "sana" else n_modules)   # SANA: linear self-attention
        set_attention_backend(model, "sparse", search=search, threshold=0.3, sparse_block_size=4)
        got = f(model, x, t)
        if family == "sana":
            assert (got - ref).abs().max() <= 1e-5
        elif family == "sd3":
            assert (got - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown sparse attention search"):
        set_attention_backend(model, "sparse", search="topk")
    with pytest.raises(ValueError, match="apply to backend 'sparse' only"):
        set_attention_backend(model, "fused", js_threshold=0.1)


def test_attention_backend_is_scoped_to_one_sampling_call():
    """`with attention_backend(model, "sparse", ...)`: fresh searches per block (an AdaSpa pattern searched at the
    call's first denoising step, reused at the others), and diffusers' processors back afterwards, even after an
    error inside the block."""
    from onestep.kernels import attention_backend

    model, x, f, _ = FAMILIES["sd3"]()
    stock = [m.processor for m in model.modules() if isinstance(m, Attention)]
    times = torch.linspace(1.0, 0.25, 4)

    def searches(m):
        return [mod.processor.search for mod in m.modules() if hasattr(getattr(mod, "processor", None), "search")]

    with torch.no_grad():
        ref = f(model, x, times[0].repeat(B))
        with attention_backend(model, "sparse", search="adaspa", threshold=0.5, sparse_block_size=4) as m:
            first = searches(m)
            for t in times:                                  # the steps of one sampling call
                f(model, x, t.repeat(B))
        assert first and all(s.calls == len(times) and s.last_search == 0 for s in first)
        assert [m.processor for m in model.modules() if isinstance(m, Attention)] == stock
        assert torch.equal(f(model, x, times[0].repeat(B)), ref)
        with pytest.raises(RuntimeError, match="inside"):
            with attention_backend(model, "sparse", search="adaspa", threshold=0.5, sparse_block_size=4) as m:
                assert all(s.calls == 0 for s in searches(m))    # a new call, new searches
                raise RuntimeError("an error inside the block")
        assert [m.processor for m in model.modules() if isinstance(m, Attention)] == stock
