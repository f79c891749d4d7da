"""onestep.kernels: fused attention (forward, backward, JVP), Triton kernels, diffusers backend switch."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from onestep.kernels import FusedAttentionFunction, fused_attention, math_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These shapes are tiny: a second OpenMP thread only adds synchronisation, and on a shared
    # 2-core machine it can make each small op ~50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _qkv(B, H, N, M, D, dtype=torch.float32, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, M, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, M, Dv or D, generator=g, dtype=dtype)
    return q, k, v


def _mask(kind, B, H, N, M, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        keep = torch.rand(B, 1, N, M, generator=g) > 0.4
        keep[0, 0, 1] = False  # one fully masked row: output 0, like PyTorch's math SDPA
        return keep
    return torch.randn(1, H, 1, M, generator=g) * 2 - torch.where(torch.rand(1, H, 1, M, generator=g) > 0.8, 30.0, 0.0)


def _f64(mask):
    return mask.double() if mask is not None and mask.is_floating_point() else mask


# (B, H, N, M, D, block): N, M not multiples of the blocks, N != M, a single block, a 1-key case
SHAPES = [(2, 3, 37, 53, 16, (16, 8)), (1, 2, 100, 7, 8, (32, 32)), (2, 2, 20, 20, 8, 1024), (1, 1, 9, 1, 4, (4, 4))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_matches_float64_math(shape, mask_kind):
    B, H, N, M, D, block = shape
    q, k, v = _qkv(B, H, N, M, D)
    mask = _mask(mask_kind, B, H, N, M)
    dq, dk, dv = _qkv(B, H, N, M, D, seed=5)
    go = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(9))

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    fn = lambda a, b, c: fused_attention(a, b, c, mask, block_size=block)  # noqa: E731
    out, tangent = torch.func.jvp(fn, (qs, ks, vs), (dq, dk, dv))
    (out * go).sum().backward()

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_fn = lambda a, b, c: math_attention(a, b, c, _f64(mask))  # noqa: E731
    ref, ref_tangent = torch.func.jvp(ref_fn, (q64, k64, v64), (dq.double(), dk.double(), dv.double()))
    (ref * go.double()).sum().backward()

    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(tangent.double(), ref_tangent, atol=1e-5, rtol=0)
    for a, b in ((qs, q64), (ks, k64), (vs, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=0)
    if mask_kind == "bool":
        assert out[0, :, 1].abs().max() == 0 and torch.isfinite(tangent).all()


def test_value_head_dim_and_partial_tangents():
    q, k, v = _qkv(1, 2, 11, 13, 8, dtype=torch.float64, Dv=5)
    dq, dk, _ = _qkv(1, 2, 11, 13, 8, dtype=torch.float64, seed=3)
    for tangents in ((dq, torch.zeros_like(k), torch.zeros_like(v)), (torch.zeros_like(q), dk, torch.zeros_like(v))):
        _, t = torch.func.jvp(lambda a, b, c: fused_attention(a, b, c, block_size=4), (q, k, v), tangents)
        _, r = torch.func.jvp(math_attention, (q, k, v), tangents)
        torch.testing.assert_close(t, r, atol=1e-12, rtol=0)


def test_gradcheck_and_forward_ad_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 6, 5, 3, dtype=torch.float64))
    add = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    keep = torch.rand(1, 1, 6, 5) > 0.3
    keep[..., 0] = True  # gradcheck of lse needs every row to keep a key
    for mask in (None, add, keep):
        both = lambda a, b, c: FusedAttentionFunction.apply(a, b, c, mask, 0.7, (4, 2), "torch")  # noqa: E731
        assert torch.autograd.gradcheck(both, (q, k, v), check_forward_ad=True, check_backward_ad=True)
    # the torch path's backward records its ops, so second derivatives are right too
    assert torch.autograd.gradgradcheck(lambda a, b, c: fused_attention(a, b, c, block_size=(4, 2)), (q, k, v))


def test_forward_ad_api_and_func_grad():
    q, k, v = _qkv(2, 2, 7, 9, 4, dtype=torch.float64)
    dq, dk, dv = _qkv(2, 2, 7, 9, 4, dtype=torch.float64, seed=4)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in ((q, dq), (k, dk), (v, dv))]
        out = fwAD.unpack_dual(fused_attention(*duals, block_size=(3, 4)))
    _, ref = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(out.tangent, ref, atol=1e-12, rtol=0)

    g = torch.func.grad(lambda a: fused_attention(a, k, v, block_size=(3, 4)).pow(2).sum())(q)
    r = torch.func.grad(lambda a: math_attention(a, k, v).pow(2).sum())(q)
    torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


def test_jvp_matches_central_differences():
    q, k, v = _qkv(1, 2, 10, 12, 4, dtype=torch.float64)
    t = _qkv(1, 2, 10, 12, 4, dtype=torch.float64, seed=7)
    mask = _mask("additive", 1, 2, 10, 12).double()
    f = lambda a, b, c: fused_attention(a, b, c, mask, block_size=(4, 5))  # noqa: E731
    _, jvp = torch.func.jvp(f, (q, k, v), t)
    h = 1e-6
    fd = (f(*(p + h * d for p, d in zip((q, k, v), t))) - f(*(p - h * d for p, d in zip((q, k, v), t)))) / (2 * h)
    torch.testing.assert_close(jvp, fd, atol=1e-8, rtol=0)


class _TinyAttn(torch.nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64), heads
        self.out = torch.nn.Linear(dim, dim, dtype=torch.float64)

    def forward(self, x, attn):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(attn(q, k, v).transpose(1, 2).reshape(B, N, C)) + x


def test_meanflow_variants_grads_through_primal():
    """Variant A: (u, du) = jvp(f) then backward of u; variant B: u with grad, jvp under no_grad."""
    torch.manual_seed(0)
    net = _TinyAttn()
    x, tx = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    fused = lambda q, k, v: fused_attention(q, k, v, block_size=(4, 4))  # noqa: E731

    def grads(loss):
        net.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    u_ref = net(x, math_attention)
    g_ref = grads((u_ref ** 2).sum())
    _, du_ref = torch.func.jvp(lambda z: net(z, math_attention), (x,), (tx,))

    u, du = torch.func.jvp(lambda z: net(z, fused), (x,), (tx,))          # variant A
    g_a = grads((u ** 2).sum())
    torch.testing.assert_close(u, u_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(du, du_ref.detach(), atol=1e-12, rtol=0)
    for a, b in zip(g_a, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    u = net(x, fused)                                                      # variant B
    with torch.no_grad():
        _, du_b = torch.func.jvp(lambda z: net(z, fused), (x,), (tx,))
    g_b = grads((u ** 2).sum())
    assert not du_b.requires_grad
    torch.testing.assert_close(du_b, du_ref.detach(), atol=1e-12, rtol=0)
    for a, b in zip(g_b, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    # the tangent output is not differentiable: backprop through it must fail loudly
    _, du = torch.func.jvp(lambda z: net(z, fused), (x,), (tx,))
    with pytest.raises(RuntimeError, match="JVP .* not differentiable"):
        du.sum().backward()
    with fwAD.dual_level():
        q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 4, 4, 2, dtype=torch.float64))
        out = fused_attention(fwAD.make_dual(q, torch.ones_like(q)), k, v)
        with pytest.raises(RuntimeError, match="not differentiable"):
            fwAD.unpack_dual(out).tangent.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(dtype):
    q, k, v = _qkv(1, 2, 40, 70, 16, seed=2)
    t = _qkv(1, 2, 40, 70, 16, seed=3)
    lo = tuple(x.to(dtype) for x in (q, k, v))
    out, tan = torch.func.jvp(lambda a, b, c: fused_attention(a, b, c, block_size=(16, 32)), lo,
                              tuple(x.to(dtype) for x in t))
    ref, rtan = torch.func.jvp(math_attention, tuple(x.double() for x in lo), tuple(x.to(dtype).double() for x in t))
    assert out.dtype == dtype and tan.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref).abs().max() < 4 * eps
    assert (tan.double() - rtan).abs().max() < 16 * eps * rtan.abs().max()


def test_argument_errors():
    q, k, v = _qkv(1, 2, 4, 5, 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        fused_attention(q, k, v, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="4-D"):
        fused_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="one floating dtype"):
        fused_attention(q, k.double(), v)


def test_triton_needs_interpreter_on_cpu():
    pytest.importorskip("triton")
    q, k, v = _qkv(1, 1, 4, 4, 2)
    with pytest.raises(RuntimeError, match="impl='triton'.*TRITON_INTERPRET=1"):
        fused_attention(q, k, v, impl="triton")


_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from onestep.kernels import fused_attention, triton_attention
    assert triton_attention.interpreting()
    g = torch.Generator().manual_seed(0)
    B, H, N, M, D = 1, 2, 19, 23, 12          # not multiples of the 16-wide tiles; D padded to 16
    masks = [None, torch.rand(B, 1, N, M, generator=g) > 0.3, torch.randn(1, H, 1, M, generator=g)]
    masks[1][0, 0, 2] = False                 # fully masked row
    worst = 0.0
    for mask in masks:
        prim = tuple(torch.randn(s, generator=g).requires_grad_() for s in ((B, H, N, D), (B, H, M, D), (B, H, M, D)))
        tans = tuple(torch.randn(p.shape, generator=g) for p in prim)
        go = torch.randn(B, H, N, D, generator=g)
        res = {}
        for impl in ("torch", "triton"):
            for p in prim:
                p.grad = None
            out, tan = torch.func.jvp(lambda a, b, c: fused_attention(a, b, c, mask, impl=impl), prim, tans)
            (out * go).sum().backward()
            res[impl] = [out, tan] + [p.grad for p in prim]
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(res["torch"], res["triton"])))
    # Triton's backward is not differentiable: create_graph must fail loudly, not give wrong grads
    g, = torch.autograd.grad(fused_attention(*prim, impl="triton").sum(), prim[0], create_graph=True)
    try:
        g.sum().backward()
        raise SystemExit("double backward through Triton did not raise")
    except RuntimeError as e:
        assert "double backward" in str(e)
    # fp16: low-precision loads, casts and fp32 accumulation (the interpreter's bf16 dot is broken)
    prim = tuple(x.detach().half() for x in prim)
    tans = tuple(x.half() for x in tans)
    lo = {impl: torch.func.jvp(lambda a, b, c: fused_attention(a, b, c, impl=impl), prim, tans)
          for impl in ("torch", "triton")}
    for a, b in zip(lo["torch"], lo["triton"]):
        assert a.dtype == b.dtype == torch.float16 and (a.float() - b.float()).abs().max() < 4e-3
    print("MAXERR", worst)
    # benchmarks/gpu_check.py's comparison, as it runs on a GPU, with the interpreted kernels
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    cases = gc.correctness({"triton": gc.attn_triton, "torch_path": gc.attn_torch_path}, [(1, 2, 19, 23, 12)],
                           ["fp32", "fp16"], "cpu", log=lambda line: None)
    print("GPU_CHECK", len(cases), sum(not c[n]["passed"] for c in cases for n in ("triton", "torch_path")),
          gc.worst_error(cases, "triton", "fp32"), gc.worst_error(cases, "triton", "fp16"))
""")


def test_triton_interpreter_matches_torch_path():
    """Triton reads TRITON_INTERPRET when triton.language is imported, so this runs in a subprocess."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    gpu_check = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
        "benchmarks", "gpu_check.py")
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, gpu_check], env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    err = float(res.stdout.split("MAXERR")[-1].split()[0])
    assert err < 1e-5, err
    # gpu_check: 6 cases (fp32/fp16 x no/bool/additive mask), none failed, Triton's errors at each dtype's precision
    n_cases, n_failed, err32, err16 = res.stdout.split("GPU_CHECK")[-1].split()
    assert (int(n_cases), int(n_failed)) == (6, 0), res.stdout
    assert float(err32) < 1e-5 and float(err16) < 2e-3, res.stdout


# ------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")
from onestep.kernels import ATTENTION_BACKENDS, set_attention_backend  # noqa: E402


def _unet(dtype):
    torch.manual_seed(0)
    # AttnDownBlock2D/AttnUpBlock2D + the mid-block attention (add_attention defaults to True)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).to(dtype).eval()


def _central_difference(f, x, t, h=1e-5):
    return (f(x + h * t) - f(x - h * t)) / (2 * h)


def test_unet_fused_backend_output_and_jvp():
    unet = _unet(torch.float32)
    x, ts = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 500.0])
    ref = unet(x, ts).sample
    assert set_attention_backend(unet, "fused") == 4
    assert unet.mid_block.attentions[0].processor.backend == "fused"
    torch.testing.assert_close(unet(x, ts).sample, ref, atol=1e-5, rtol=0)

    unet = unet.double()
    x, tx, ts = x.double(), torch.randn(2, 3, 8, 8, dtype=torch.float64), ts.double()
    f = lambda z: unet(z, ts).sample  # noqa: E731
    for backend in ("fused", "math"):
        set_attention_backend(unet, backend)
        _, jvp = torch.func.jvp(f, (x,), (tx,))
        torch.testing.assert_close(jvp, _central_difference(f, x, tx), atol=1e-7, rtol=0)
    set_attention_backend(unet, "sdpa")
    assert type(unet.mid_block.attentions[0].processor).__name__ == "AttnProcessor2_0"


def test_dit_fused_backend_output_and_jvp():
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                          norm_num_groups=4).eval()
    x, ts, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 5]), torch.tensor([0, 3])
    ref = dit(x, timestep=ts, class_labels=labels).sample
    assert set_attention_backend(dit, "fused") == 1
    torch.testing.assert_close(dit(x, timestep=ts, class_labels=labels).sample, ref, atol=1e-5, rtol=0)
    dit = dit.double()
    f = lambda z: dit(z, timestep=ts, class_labels=labels).sample  # noqa: E731
    x, tx = x.double(), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    _, jvp = torch.func.jvp(f, (x,), (tx,))
    torch.testing.assert_close(jvp, _central_difference(f, x, tx), atol=1e-7, rtol=0)


def test_sd3_joint_attention_fused_backend():
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    x, enc, pooled, ts = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 8), torch.tensor([0.3, 0.8])
    f = lambda z: sd3(z, encoder_hidden_states=enc, pooled_projections=pooled, timestep=ts).sample  # noqa: E731
    ref = f(x)
    assert set_attention_backend(sd3, "fused") == 3  # two joint attentions + one dual (self-only) attention
    torch.testing.assert_close(f(x), ref, atol=1e-5, rtol=0)
    # SD3 computes parts of itself in fp32, so finite differences are noisy: compare with the math path
    sd3, x, enc, pooled, ts = sd3.double(), x.double(), enc.double(), pooled.double(), ts.double()
    tx = torch.randn_like(x)
    _, jvp = torch.func.jvp(f, (x,), (tx,))
    set_attention_backend(sd3, "math")
    _, ref_jvp = torch.func.jvp(f, (x,), (tx,))
    torch.testing.assert_close(jvp, ref_jvp, atol=1e-10, rtol=0)


def test_attention_module_features_match_sdpa():
    """Cross-attention with norm_cross and a mask; group norm, 4-D input, residual and rescale."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from onestep.kernels import OnestepAttnProcessor

    torch.manual_seed(0)
    cross = Attention(16, cross_attention_dim=12, heads=2, dim_head=8, cross_attention_norm="layer_norm").eval()
    h, enc = torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    bias = torch.zeros(2, 1, 7)
    bias[0, 0, 4:] = -10000.0  # diffusers' padding-mask convention
    spatial = Attention(16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                        rescale_output_factor=2.0, bias=True).eval()
    fmap = torch.randn(2, 16, 3, 5)
    for module, args in ((cross, dict(hidden_states=h, encoder_hidden_states=enc, attention_mask=bias)),
                         (spatial, dict(hidden_states=fmap))):
        module.set_processor(AttnProcessor2_0())
        ref = module(**args)
        for backend in ("fused", "math"):
            module.set_processor(OnestepAttnProcessor(backend, block_size=4))
            torch.testing.assert_close(module(**args), ref, atol=1e-5, rtol=0)


def test_backend_errors():
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor

    unet = _unet(torch.float32)
    assert ATTENTION_BACKENDS == ("sdpa", "xformers", "math", "fused", "fused_triton", "sparse")
    with pytest.raises(ValueError, match="sdpa, xformers, math, fused, fused_triton, sparse"):
        set_attention_backend(unet, "flash")
    try:
        import xformers  # noqa: F401
        has_xformers = True
    except ImportError:
        has_xformers = False
    with pytest.raises(RuntimeError) as err:
        set_attention_backend(unet, "xformers")  # CPU model: no xformers kernels either way
    msg = str(err.value)
    assert "\n" not in msg and ("pip install onestep[xformers]" in msg or (has_xformers and "CUDA" in msg))
    odd = torch.nn.Sequential(Attention(8, heads=2, dim_head=4, added_kv_proj_dim=6, processor=AttnAddedKVProcessor()))
    with pytest.raises(ValueError, match="AttnAddedKVProcessor"):
        set_attention_backend(odd, "fused")
