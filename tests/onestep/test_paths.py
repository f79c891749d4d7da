"""Tests for onestep.paths: time conventions, prediction types, discrete VP schedules.

The key test checks the conversions against an independent reference, diffusers' own DDIMScheduler:
a deterministic DDIM step of an epsilon/v/sample-predicting VP model must equal the Euler step in flow
time of the converted velocity, at the same timesteps, over whole trajectories.
"""

import math

import pytest
import torch

from onestep import paths
from onestep.paths import (
    PREDICTION_TYPES,
    DiscreteVPSchedule,
    edm_sigma_to_flow_t,
    edm_to_flow_x,
    eps_to_velocity,
    expand_like,
    flow_t_to_edm_sigma,
    flow_t_to_logsnr,
    flow_t_to_trig,
    flow_t_to_vp_alpha_bar,
    flow_t_to_vp_coefficients,
    flow_to_edm_x,
    flow_to_gaussian_x,
    flow_to_trig_x,
    flow_to_vp_x,
    gaussian_to_flow_t,
    gaussian_to_flow_x,
    interpolate,
    logsnr_to_flow_t,
    prediction_to_velocity,
    trig_to_flow_t,
    trig_to_flow_x,
    velocity_to_eps,
    velocity_to_prediction,
    velocity_to_score,
    velocity_to_x0,
    vp_alpha_bar_to_flow_t,
    vp_coefficients,
    vp_to_flow_x,
    x0_to_velocity,
)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)

# SD1.x / SD2.x training schedule
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000, beta_schedule="scaled_linear")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _t_grid(n=201, lo=1e-3, hi=1 - 1e-3):
    return torch.linspace(lo, hi, n, dtype=F64)


# ------------------------------------------------------------------------------------------------
# flow-time basics


def test_expand_like_shapes_and_dtype():
    x = torch.zeros(3, 2, 4, 5, dtype=F64)
    assert expand_like(torch.rand(3), x).shape == (3, 1, 1, 1)
    assert expand_like(torch.rand(3), x).dtype == F64
    assert expand_like(0.5, x).shape == (1, 1, 1, 1)
    assert expand_like(torch.rand(3, 1, 1, 1), x).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError):
        expand_like(torch.rand(3, 1, 1, 1, 1), x)


def test_velocity_views_round_trip():
    g = _gen(1)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g, dtype=F64), torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    t = torch.rand(6, generator=g, dtype=F64) * 0.98 + 0.01
    x_t = interpolate(x0, eps, t)
    v = eps - x0
    torch.testing.assert_close(x_t, (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps, **TOL)
    torch.testing.assert_close(velocity_to_x0(x_t, t, v), x0, **TOL)
    torch.testing.assert_close(velocity_to_eps(x_t, t, v), eps, **TOL)
    torch.testing.assert_close(velocity_to_score(x_t, t, v), -eps / t[:, None, None, None], **TOL)
    torch.testing.assert_close(x0_to_velocity(x_t, t, x0), v, **TOL)
    torch.testing.assert_close(eps_to_velocity(x_t, t, eps), v, **TOL)
    # scalar and python-float t broadcast too
    torch.testing.assert_close(velocity_to_x0(x_t[:1], 0.3, v[:1]), x_t[:1] - 0.3 * v[:1], **TOL)


def test_interpolate_exact_at_ends_and_keeps_dtype():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(interpolate(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(2)), eps)
    assert interpolate(x0, eps, torch.rand(2, dtype=F64)).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# time maps


def test_vp_time_round_trip():
    t = _t_grid()
    ab = flow_t_to_vp_alpha_bar(t)
    torch.testing.assert_close(vp_alpha_bar_to_flow_t(ab), t, **TOL)
    ab = torch.linspace(1e-4, 1 - 1e-4, 201, dtype=F64)
    torch.testing.assert_close(flow_t_to_vp_alpha_bar(vp_alpha_bar_to_flow_t(ab)), ab, **TOL)
    # ends: abar = 1 is clean (t = 0), abar = 0 pure noise (t = 1)
    assert vp_alpha_bar_to_flow_t(torch.tensor([1.0, 0.0], dtype=F64)).tolist() == [0.0, 1.0]
    # coefficients at t have a^2 + b^2 = 1 and give back t
    a, b = flow_t_to_vp_coefficients(t)
    torch.testing.assert_close(a**2 + b**2, torch.ones_like(t), **TOL)
    torch.testing.assert_close(gaussian_to_flow_t(a, b), t, **TOL)
    torch.testing.assert_close(a**2, flow_t_to_vp_alpha_bar(t), **TOL)


def test_edm_time_round_trip():
    t = _t_grid()
    torch.testing.assert_close(edm_sigma_to_flow_t(flow_t_to_edm_sigma(t)), t, **TOL)
    sigma = torch.logspace(-3, 3, 101, dtype=F64)
    torch.testing.assert_close(flow_t_to_edm_sigma(edm_sigma_to_flow_t(sigma)), sigma, rtol=1e-10, atol=0)
    assert edm_sigma_to_flow_t(torch.tensor([0.0, math.inf], dtype=F64)).tolist() == [0.0, 1.0]


def test_trig_time_round_trip():
    t = _t_grid()
    torch.testing.assert_close(trig_to_flow_t(flow_t_to_trig(t)), t, **TOL)
    s = torch.linspace(0, math.pi / 2, 101, dtype=F64)
    torch.testing.assert_close(flow_t_to_trig(trig_to_flow_t(s)), s, **TOL)
    ends = flow_t_to_trig(torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    torch.testing.assert_close(ends, torch.tensor([0.0, math.pi / 4, math.pi / 2], dtype=F64), **TOL)


def test_logsnr_round_trip():
    t = _t_grid()
    torch.testing.assert_close(logsnr_to_flow_t(flow_t_to_logsnr(t)), t, **TOL)
    lam = torch.linspace(-15, 15, 101, dtype=F64)
    torch.testing.assert_close(flow_t_to_logsnr(logsnr_to_flow_t(lam)), lam, **TOL)
    # log-SNR is log(a^2 / b^2) = logit(abar) for VP
    ab = flow_t_to_vp_alpha_bar(t)
    torch.testing.assert_close(flow_t_to_logsnr(t), torch.logit(ab), rtol=1e-9, atol=1e-9)
    assert flow_t_to_logsnr(torch.tensor(0.5, dtype=F64)).item() == 0.0


def test_x_scalings_round_trip():
    g = _gen(2)
    x = torch.randn(5, 3, 2, 2, generator=g, dtype=F64)
    t = torch.rand(5, generator=g, dtype=F64) * 0.98 + 0.01
    ab = flow_t_to_vp_alpha_bar(t)
    torch.testing.assert_close(flow_to_vp_x(vp_to_flow_x(x, ab), t), x, **TOL)
    sigma = flow_t_to_edm_sigma(t)
    torch.testing.assert_close(flow_to_edm_x(edm_to_flow_x(x, sigma), t), x, **TOL)
    s = flow_t_to_trig(t)
    torch.testing.assert_close(flow_to_trig_x(trig_to_flow_x(x, s), t), x, **TOL)
    a, b = torch.rand(5, generator=g, dtype=F64) + 0.1, torch.rand(5, generator=g, dtype=F64) * 3
    torch.testing.assert_close(flow_to_gaussian_x(gaussian_to_flow_x(x, a, b), a, b), x, **TOL)


def test_native_paths_map_onto_the_flow_path():
    """x = a x0 + b eps in native coordinates is exactly interpolate(x0, eps, t) in flow coordinates."""
    g = _gen(3)
    x0, eps = torch.randn(7, 4, 3, generator=g, dtype=F64), torch.randn(7, 4, 3, generator=g, dtype=F64)
    e = lambda c: c[:, None, None]  # noqa: E731

    a, b = torch.rand(7, generator=g, dtype=F64) * 2 + 0.05, torch.rand(7, generator=g, dtype=F64) * 5 + 0.05
    x = e(a) * x0 + e(b) * eps
    torch.testing.assert_close(gaussian_to_flow_x(x, a, b), interpolate(x0, eps, gaussian_to_flow_t(a, b)), **TOL)

    ab = torch.rand(7, generator=g, dtype=F64) * 0.98 + 0.01  # VP / DDPM
    x = e(ab.sqrt()) * x0 + e((1 - ab).sqrt()) * eps
    torch.testing.assert_close(vp_to_flow_x(x, ab), interpolate(x0, eps, vp_alpha_bar_to_flow_t(ab)), **TOL)

    sigma = torch.logspace(-2, 2, 7, dtype=F64)  # EDM / VE
    x = x0 + e(sigma) * eps
    torch.testing.assert_close(edm_to_flow_x(x, sigma), interpolate(x0, eps, edm_sigma_to_flow_t(sigma)), **TOL)

    s = torch.rand(7, generator=g, dtype=F64) * (math.pi / 2)  # TrigFlow
    x = e(torch.cos(s)) * x0 + e(torch.sin(s)) * eps
    torch.testing.assert_close(trig_to_flow_x(x, s), interpolate(x0, eps, trig_to_flow_t(s)), **TOL)


# ------------------------------------------------------------------------------------------------
# prediction types


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("vp", [True, False], ids=["vp", "general"])
def test_prediction_types(prediction_type, vp):
    g = _gen(4)
    x0, eps = torch.randn(6, 3, 4, generator=g, dtype=F64), torch.randn(6, 3, 4, generator=g, dtype=F64)
    if vp:
        a, b = vp_coefficients(torch.rand(6, generator=g, dtype=F64) * 0.98 + 0.01)
    else:
        a, b = torch.rand(6, generator=g, dtype=F64) * 2 + 0.05, torch.rand(6, generator=g, dtype=F64) * 5 + 0.05
    ea, eb = a[:, None, None], b[:, None, None]
    x = ea * x0 + eb * eps
    # the prediction a perfect model of each kind would make
    truth = {"epsilon": eps, "sample": x0, "v_prediction": ea * eps - eb * x0, "flow": eps - x0}[prediction_type]
    v = prediction_to_velocity(truth, prediction_type, x, a, b)
    torch.testing.assert_close(v, eps - x0, **TOL)
    torch.testing.assert_close(velocity_to_prediction(v, prediction_type, x, a, b), truth, **TOL)
    # and for an arbitrary (inconsistent) prediction the two maps are inverse to each other
    pred = torch.randn(6, 3, 4, generator=g, dtype=F64)
    back = velocity_to_prediction(prediction_to_velocity(pred, prediction_type, x, a, b), prediction_type, x, a, b)
    torch.testing.assert_close(back, pred, **TOL)
    v = torch.randn(6, 3, 4, generator=g, dtype=F64)
    fwd = prediction_to_velocity(velocity_to_prediction(v, prediction_type, x, a, b), prediction_type, x, a, b)
    torch.testing.assert_close(fwd, v, **TOL)


def test_v_prediction_matches_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**SD_BETAS, prediction_type="v_prediction")
    sched.alphas_cumprod = sched.alphas_cumprod.to(F64)
    g = _gen(5)
    x0, eps = torch.randn(4, 2, 3, generator=g, dtype=F64), torch.randn(4, 2, 3, generator=g, dtype=F64)
    ts = torch.tensor([0, 10, 500, 999])
    v_diff = sched.get_velocity(x0, eps, ts)
    x = sched.add_noise(x0, eps, ts)
    a, b = vp_coefficients(sched.alphas_cumprod[ts])
    torch.testing.assert_close(prediction_to_velocity(v_diff, "v_prediction", x, a, b), eps - x0, **TOL)


def test_bad_prediction_type():
    x = torch.zeros(2, 3)
    for fn in (prediction_to_velocity, velocity_to_prediction):
        with pytest.raises(ValueError) as err:
            fn(x, "v", x, 0.6, 0.8)
        for name in PREDICTION_TYPES:
            assert name in str(err.value)


def test_float32_stays_float32():
    x = torch.randn(3, 2)
    t = torch.rand(3, dtype=F64)
    for out in (
        velocity_to_x0(x, t, x),
        eps_to_velocity(x, t, x),
        vp_to_flow_x(x, flow_t_to_vp_alpha_bar(t)),
        flow_to_edm_x(x, t),
        prediction_to_velocity(x, "epsilon", x, 0.6, 0.8),
        velocity_to_prediction(x, "v_prediction", x, torch.rand(3, dtype=F64), 0.8),
    ):
        assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# DiscreteVPSchedule


@pytest.fixture(scope="module")
def sd_schedule():
    return DiscreteVPSchedule.from_betas(**SD_BETAS)


def test_from_betas_matches_diffusers(sd_schedule):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SD_BETAS).alphas_cumprod.to(F64)
    assert torch.equal(sd_schedule.alphas_cumprod, ref)
    assert torch.equal(DiscreteVPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS)).alphas_cumprod, ref)
    assert sd_schedule.num_train_timesteps == 1000
    with pytest.raises(ValueError):
        DiscreteVPSchedule.from_scheduler(object())
    with pytest.raises(ValueError):
        DiscreteVPSchedule(torch.tensor([0.5, 0.9]))  # increasing: not a noise schedule


def test_schedule_exact_at_integers(sd_schedule):
    k = torch.arange(1000)
    ac = sd_schedule.alphas_cumprod
    assert torch.equal(sd_schedule.flow_t(k.to(F64)), vp_alpha_bar_to_flow_t(ac))
    assert torch.equal(sd_schedule.alpha_bar(k.to(F64)), ac)
    # integer tensors and python ints work and give the default dtype
    assert sd_schedule.flow_t(k).dtype == torch.get_default_dtype()
    assert sd_schedule.flow_t(999).item() == pytest.approx(sd_schedule.t_max)
    # the inverse lands exactly on integers
    torch.testing.assert_close(sd_schedule.timestep(vp_alpha_bar_to_flow_t(ac)), k.to(F64), rtol=0, atol=1e-10)


def test_schedule_round_trip_fractional(sd_schedule):
    k = torch.rand(500, generator=_gen(6), dtype=F64) * 999
    k = torch.cat([k, torch.tensor([0.0, 0.5, 998.5, 999.0], dtype=F64)])
    torch.testing.assert_close(sd_schedule.timestep(sd_schedule.flow_t(k)), k, rtol=0, atol=1e-10)
    t = torch.linspace(sd_schedule.t_min, sd_schedule.t_max, 300, dtype=F64)
    torch.testing.assert_close(sd_schedule.flow_t(sd_schedule.timestep(t)), t, **TOL)
    # alpha_bar at fractional steps agrees with the flow time
    torch.testing.assert_close(sd_schedule.alpha_bar(k), flow_t_to_vp_alpha_bar(sd_schedule.flow_t(k)), **TOL)


def test_schedule_monotone_and_between_neighbours(sd_schedule):
    k = torch.linspace(0, 999, 20001, dtype=F64)
    t = sd_schedule.flow_t(k)
    assert bool((t[1:] > t[:-1]).all())
    assert bool((sd_schedule.timestep(t)[1:] > sd_schedule.timestep(t)[:-1]).all())
    frac = torch.rand(200, generator=_gen(7), dtype=F64) * 998
    lo, hi = sd_schedule.flow_t(frac.floor()), sd_schedule.flow_t(frac.floor() + 1)
    tf = sd_schedule.flow_t(frac)
    assert bool(((tf >= lo) & (tf <= hi)).all())


def test_schedule_logsnr_linear_between_steps(sd_schedule):
    g = _gen(8)
    lo = torch.randint(0, 999, (300,), generator=g).to(F64)
    w = torch.rand(300, generator=g, dtype=F64)
    lam = flow_t_to_logsnr(sd_schedule.flow_t(lo + w))
    lam0, lam1 = flow_t_to_logsnr(sd_schedule.flow_t(lo)), flow_t_to_logsnr(sd_schedule.flow_t(lo + 1))
    torch.testing.assert_close(lam, (1 - w) * lam0 + w * lam1, **TOL)


def test_schedule_clamps_and_dtypes(sd_schedule):
    t_max, t_min = sd_schedule.t_max, sd_schedule.t_min
    assert 0.9 < t_max < 0.95 and 0 < t_min < 0.05
    out = sd_schedule.timestep(torch.tensor([0.0, t_min / 2, (t_max + 1) / 2, 1.0], dtype=F64))
    assert out.tolist() == [0.0, 0.0, 999.0, 999.0]
    assert sd_schedule.flow_t(torch.tensor([-3.0, 1e4], dtype=F64)).tolist() == [t_min, t_max]
    assert sd_schedule.flow_t(torch.tensor([10.5], dtype=torch.float32)).dtype == torch.float32
    assert sd_schedule.timestep(torch.tensor(0.5, dtype=torch.float32)).shape == ()
    assert sd_schedule.timestep(0.5).dtype == torch.get_default_dtype()


def test_schedule_zero_terminal_snr():
    """alpha_bar reaching 0 (or 1) has infinite log-SNR: that segment interpolates in flow time."""
    ac = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.0], dtype=F64)
    s = DiscreteVPSchedule(ac)
    k = torch.linspace(0, 4, 401, dtype=F64)
    t = s.flow_t(k)
    assert bool(torch.isfinite(t).all()) and bool((t[1:] > t[:-1]).all())
    assert t[0].item() == 0.0 and t[-1].item() == 1.0
    torch.testing.assert_close(s.timestep(t), k, rtol=0, atol=1e-10)
    assert s.timestep(torch.tensor([0.0, 1.0], dtype=F64)).tolist() == [0.0, 4.0]


# ------------------------------------------------------------------------------------------------
# THE KEY TEST: diffusers' DDIM step == Euler step of the converted velocity in flow time


def _model(d, seed=9):
    g = _gen(seed)
    w = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    c = torch.randn(d, generator=g, dtype=F64)

    def model(x, timestep):
        s = float(timestep) / 1000
        flat = x.reshape(x.shape[0], -1)
        # (flat[:, :, None] * w).sum(1) is flat @ w without BLAS, whose threads crawl on a busy CPU
        out = torch.tanh((flat[:, :, None] * w).sum(1) + math.sin(3 * s) * c) + 0.3 * math.cos(2 * s) * flat
        return out.reshape(x.shape)

    return model


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_equals_flow_euler_step(prediction_type, num_steps, spacing):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        **SD_BETAS,
        set_alpha_to_one=True,
        clip_sample=False,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )
    # Let diffusers do its arithmetic in float64: the same schedule values, upcast (its float32
    # sqrt would otherwise limit agreement to ~1e-7).
    sched.alphas_cumprod = sched.alphas_cumprod.to(F64)
    sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod).to(F64)
    sched.set_timesteps(num_steps)
    vp = DiscreteVPSchedule.from_scheduler(sched)
    model = _model(2 * 3 * 3)

    x_ref = torch.randn(4, 2, 3, 3, generator=_gen(10), dtype=F64)
    x = x_ref.clone()
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    for k in sched.timesteps:
        k = int(k)
        x_ref = sched.step(model(x_ref, k), k, x_ref, eta=0.0).prev_sample

        # ours: native VP -> flow coordinates, velocity, Euler step in flow time, back to VP
        t_k = vp.flow_t(torch.tensor(float(k), dtype=F64))
        a, b = vp_coefficients(vp.alpha_bar(torch.tensor(float(k), dtype=F64)))
        assert gaussian_to_flow_t(a, b).item() == pytest.approx(t_k.item(), rel=1e-14)
        x_flow = vp_to_flow_x(x, vp.alpha_bar(torch.tensor(float(k), dtype=F64)))
        v = prediction_to_velocity(model(x, k), prediction_type, x, a, b)
        prev = k - stride  # diffusers' DDIM goes to k - N // steps; below 0 it uses final_alpha_cumprod = 1
        t_prev = vp.flow_t(torch.tensor(float(prev), dtype=F64)) if prev >= 0 else torch.tensor(0.0, dtype=F64)
        x_flow = x_flow + (t_prev - t_k) * v
        x = flow_to_vp_x(x_flow, t_prev)

        err = (x - x_ref).abs().max() / x_ref.abs().max()
        assert err < 1e-10, f"step at timestep {k}: relative error {err:.3e}"
    assert len(sched.timesteps) == num_steps


def test_module_exports():
    for name in paths.__all__:
        assert hasattr(paths, name), name
