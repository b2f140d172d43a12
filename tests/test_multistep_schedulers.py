"""The fused multistep schedulers (DPM-Solver++, UniPC, Euler, Euler
ancestral, flow-matching Euler) against diffusers and against an analytic
oracle.

Agreement with diffusers is checked at three levels:
* the layout: ``timesteps`` equal, ``sigmas`` equal to float32 rounding;
* whole trajectories in float64: diffusers keeps float32 sigmas, so here its
  ``sigmas`` are replaced by our float64 ones and both evaluate the same maths
  (DPM-Solver++ rounds the sample to float32 inside its step, hence 1e-6);
  on top of that a plain float64 numpy evaluation of our coefficient table
  (``multistep_tables.evaluate_rows``) agrees to 1e-12;
* whole trajectories in float32: our error against the float64 trajectory is
  at most twice diffusers' own float32 error (plus 32 float32 ulps of the
  output's magnitude).

The oracle: for data x0 ~ N(mu, s^2) per coordinate the optimal model is known
in closed form, and the probability-flow ODE conserves
z = (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2), so the exact endpoint of
every trajectory is known; each ODE solver's error must fall at its order when
the number of steps doubles. The stochastic samplers are checked by their
output moments.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDPMPipeline, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel,
                       UniPCMultistepScheduler)

import fastdiff  # noqa: E402
from fastdiff.diffusion import multistep_tables as tb  # noqa: E402
from fastdiff.diffusion.multistep import (FusedDPMSolverMultistepScheduler,  # noqa: E402
                                          FusedEulerAncestralDiscreteScheduler, FusedEulerDiscreteScheduler,
                                          FusedFlowMatchEulerDiscreteScheduler, FusedUniPCMultistepScheduler)
from fastdiff.ops.multistep import MULTISTEP_COLUMNS, MULTISTEP_NCOEF  # noqa: E402

SHAPE = (2, 3, 4, 4)
PAIRS = {
    "dpm": (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler),
    "unipc": (UniPCMultistepScheduler, FusedUniPCMultistepScheduler),
    "euler": (EulerDiscreteScheduler, FusedEulerDiscreteScheduler),
    "euler_a": (EulerAncestralDiscreteScheduler, FusedEulerAncestralDiscreteScheduler),
    "flow": (FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler),
}


def toy_model(x, t):
    """A smooth deterministic stand-in for a network."""
    return torch.tanh(0.7 * x + 1e-3 * float(t)) * 0.9 + 0.05 * x


def run(sched, n, x_T, dtype, inject_sigmas=None, generator_seed=None, **step_kw):
    sched.set_timesteps(n)
    if inject_sigmas is not None:
        sched.sigmas = torch.from_numpy(inject_sigmas.copy())
    x = (x_T * float(getattr(sched, "init_noise_sigma", 1.0))).to(dtype)
    g = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    if g is not None:
        step_kw = dict(step_kw, generator=g)
    for t in sched.timesteps:
        xi = sched.scale_model_input(x, t) if hasattr(type(sched), "scale_model_input") else x
        x = sched.step(toy_model(xi, t).to(dtype), t, x, **step_kw).prev_sample
    return x


def scale(x):
    return float(x.abs().max())


# ------------------------------------------------------------ contract ------
def test_table_layout_matches_the_operator():
    assert tb.NCOEF == MULTISTEP_NCOEF
    assert tuple(tb.COLUMNS) == tuple(MULTISTEP_COLUMNS)


# -------------------------------------------------------- trajectories ------
CASES = [
    ("dpm", {}), ("dpm", dict(solver_order=3)), ("dpm", dict(solver_type="heun")), ("dpm", dict(solver_order=1)),
    ("dpm", dict(solver_order=3, solver_type="heun", prediction_type="v_prediction")),
    ("dpm", dict(prediction_type="sample")),
    ("dpm", dict(use_karras_sigmas=True)), ("dpm", dict(use_exponential_sigmas=True)),
    ("dpm", dict(use_beta_sigmas=True)), ("dpm", dict(use_lu_lambdas=True)),
    ("dpm", dict(final_sigmas_type="sigma_min")), ("dpm", dict(euler_at_final=True, solver_order=3)),
    ("dpm", dict(lower_order_final=False, final_sigmas_type="sigma_min", solver_order=3)),
    ("dpm", dict(thresholding=True, sample_max_value=1.5)),
    ("dpm", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)),
    ("dpm", dict(timestep_spacing="trailing", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("dpm", dict(timestep_spacing="leading", steps_offset=1, rescale_betas_zero_snr=True,
                 prediction_type="v_prediction")),
    ("dpm", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3)),
    ("dpm", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun",
                 prediction_type="v_prediction")),
    ("dpm", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="sample")),
    ("unipc", {}), ("unipc", dict(solver_order=3)), ("unipc", dict(solver_type="bh1", final_sigmas_type="sigma_min")),
    ("unipc", dict(solver_order=1)), ("unipc", dict(solver_order=3, prediction_type="v_prediction")),
    ("unipc", dict(use_karras_sigmas=True)), ("unipc", dict(use_exponential_sigmas=True)),
    ("unipc", dict(final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3, solver_type="bh1")),
    ("unipc", dict(disable_corrector=[0, 2])), ("unipc", dict(thresholding=True, sample_max_value=1.5)),
    ("unipc", dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5)),  # clamp max < 1
    ("unipc", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)),
    ("euler", {}), ("euler", dict(prediction_type="v_prediction")), ("euler", dict(use_karras_sigmas=True)),
    ("euler", dict(timestep_spacing="leading", steps_offset=1)), ("euler", dict(interpolation_type="log_linear")),
    ("euler", dict(final_sigmas_type="sigma_min", use_exponential_sigmas=True)),
    ("euler", dict(prediction_type="sample", use_beta_sigmas=True)),
    ("flow", {}), ("flow", dict(shift=3.0)), ("flow", dict(use_karras_sigmas=True, shift=3.0)),
    ("flow", dict(invert_sigmas=True)), ("flow", dict(shift_terminal=0.1, shift=2.0)),
]


def _ids(case):
    return case[0] + "-" + ("-".join(f"{k}={v}" for k, v in case[1].items()) or "default")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("n", [5, 10, 25])
def test_layout_and_float64_trajectory(case, n):
    kind, cfg = case
    D, F = PAIRS[kind]
    d, f = D(**cfg), F(**cfg)
    d.set_timesteps(n)
    f.set_timesteps(n)
    if d.timesteps.is_floating_point():  # fractional timesteps from float32 (diffusers) vs float64 sigmas
        np.testing.assert_allclose(f.timesteps.numpy(), d.timesteps.numpy(), rtol=2e-5, atol=1e-2)
    else:
        assert torch.equal(f.timesteps, d.timesteps)
    # 1e-4: diffusers' float32 1 - abar_0 = 1e-4 has only ~4 correct digits (sigma_min is off by 8e-5)
    np.testing.assert_allclose(f.sigmas.numpy(), d.sigmas.numpy(), rtol=1e-4, atol=1e-7)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ours = run(F(**cfg), n, x_T, torch.float64)
    ref = run(D(**cfg), n, x_T, torch.float64, inject_sigmas=f._sigmas64)
    # DPM-Solver++/Euler/flow round the sample to float32 inside diffusers' step; the thresholding
    # quantile is taken in float32 by both
    tol = 1e-6 if kind in ("dpm", "euler", "flow") or cfg.get("thresholding") else 1e-9
    assert float((ours - ref).abs().max()) <= tol * max(1.0, scale(ref)), cfg


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("dpm", "unipc", "euler")][::3],
                         ids=[_ids(c) for c in CASES if c[0] in ("dpm", "unipc", "euler")][::3])
def test_float32_no_worse_than_diffusers(case):
    kind, cfg = case
    D, F = PAIRS[kind]
    n = 10
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    truth = run(F(**cfg), n, x_T, torch.float64)
    ours = run(F(**cfg), n, x_T, torch.float32).double()
    theirs = run(D(**cfg), n, x_T, torch.float32).double()
    e_ours = float((ours - truth).abs().max())
    e_theirs = float((theirs - truth).abs().max())
    # floor: 32 float32 ulps of the output's magnitude; below it both errors are rounding noise (e.g. UniPC
    # with thresholding saturated at sample_max_value=0.5: ours 1-4e-6, diffusers' 0.6-2e-6, outputs ~1)
    assert e_ours <= 2 * e_theirs + 32 * torch.finfo(torch.float32).eps * scale(truth), (e_ours, e_theirs)


@pytest.mark.parametrize("kind,cfg", [("dpm", dict(solver_order=3)), ("unipc", dict(solver_order=3)),
                                      ("dpm", dict(solver_order=2, solver_type="heun"))])
def test_50_steps_and_table_evaluation(kind, cfg):
    """50 steps; and the table evaluated in plain float64 numpy gives the
    scheduler's trajectory (the kernel applies the rows as written)."""
    D, F = PAIRS[kind]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    f = F(**cfg)
    ours = run(f, 50, x_T, torch.float64)
    ref = run(D(**cfg), 50, x_T, torch.float64, inject_sigmas=f._sigmas64)
    assert float((ours - ref).abs().max()) <= 1e-6 * max(1.0, scale(ref))
    f.set_timesteps(50)
    ts = f.timesteps.tolist()
    xs = tb.evaluate_rows(f._coeffs.numpy(), lambda i, x: toy_model(torch.from_numpy(x), ts[i]).numpy(), x_T.numpy())
    np.testing.assert_allclose(xs[-1], ours.numpy(), rtol=0, atol=1e-12 * max(1.0, scale(ours)))


@pytest.mark.parametrize("kind,cfg,seed_kw", [
    ("dpm", dict(algorithm_type="sde-dpmsolver++"), {}),
    ("dpm", dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"), {}),
    ("dpm", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), {}),
    ("dpm", dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"), {}),
    ("euler_a", {}, {}), ("euler_a", dict(prediction_type="v_prediction"), {}),
    ("flow", dict(stochastic_sampling=True), {}),
    ("euler", {}, dict(s_churn=1.0)),
])
def test_stochastic_trajectory_same_noise_as_diffusers(kind, cfg, seed_kw):
    D, F = PAIRS[kind]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = F(**cfg)
    ours = run(f, 10, x_T, torch.float64, generator_seed=7, **seed_kw)
    ref = run(D(**cfg), 10, x_T, torch.float64, generator_seed=7, inject_sigmas=f._sigmas64, **seed_kw)
    assert float((ours - ref).abs().max()) <= 1e-6 * max(1.0, scale(ref))


def test_kernel_noise_is_reproducible_and_differs_from_diffusers():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for _ in range(2):
        f = FusedEulerAncestralDiscreteScheduler()
        f.kernel_noise = True
        outs.append(run(f, 8, x_T, torch.float64, generator_seed=3))
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()
    ref = run(FusedEulerAncestralDiscreteScheduler(), 8, x_T, torch.float64, generator_seed=3)
    assert float((ref - outs[0]).abs().max()) > 1e-3


# ----------------------------------------------------- deliberate diffs -----
def test_unipc_bh1_final_zero_is_finite_where_diffusers_is_nan():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = run(UniPCMultistepScheduler(solver_type="bh1"), 6, x_T, torch.float64)
    ours = run(FusedUniPCMultistepScheduler(solver_type="bh1"), 6, x_T, torch.float64)
    assert torch.isnan(ref).all()          # diffusers: B(h) = -inf times a zero residual
    assert torch.isfinite(ours).all()
    # the last step to sigma = 0 returns the (corrected) data prediction; bh2 takes the same last step
    ours2 = run(FusedUniPCMultistepScheduler(solver_type="bh1", final_sigmas_type="sigma_min"), 6, x_T,
                torch.float64)
    assert float((ours - ours2).abs().max()) < 0.5 * scale(ours)


def test_degenerate_steps_take_their_limits():
    """Steps diffusers evaluates as 0/0 or inf*0: a higher-order step into
    sigma = 0 (UniPC, lower_order_final=False) is first order, a repeated
    timestep is the identity and the next step lowers its order; all finite."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = run(UniPCMultistepScheduler(solver_order=2, lower_order_final=False), 10, x_T, torch.float64)
    ours = run(FusedUniPCMultistepScheduler(solver_order=2, lower_order_final=False), 10, x_T, torch.float64)
    assert not torch.isfinite(ref).all() and torch.isfinite(ours).all()
    s = FusedUniPCMultistepScheduler(solver_order=2, lower_order_final=False)
    s.set_timesteps(10)
    assert s._coeffs[-1, tb.C["a_h1"]] == 0 and s._coeffs[-1, tb.C["a_x0"]] == 1.0  # x_end = x0
    for S in (FusedDPMSolverMultistepScheduler, FusedUniPCMultistepScheduler):
        s = S(num_train_timesteps=25, solver_order=3)
        s.set_timesteps(25)  # linspace(0, 24, 26).round() repeats a timestep
        assert len(set(s.timesteps.tolist())) < 25 and torch.isfinite(s._coeffs).all()
        assert torch.isfinite(run(S(num_train_timesteps=25, solver_order=3), 25, x_T, torch.float64)).all()


def test_unsupported_variants_raise():
    with pytest.raises(NotImplementedError, match="thresholding"):
        FusedDPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True)
    with pytest.raises(ValueError, match="sigma_min"):
        FusedDPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(NotImplementedError, match="predict_x0"):
        FusedUniPCMultistepScheduler(predict_x0=False)
    s = FusedFlowMatchEulerDiscreteScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        s.step(torch.zeros(1, 2), s.timesteps[0], torch.zeros(1, 2), per_token_timesteps=torch.ones(1, 2))


# -------------------------------------------------------- start / state -----
def test_begin_index_mid_chain_warms_up_like_diffusers():
    """img2img: set_begin_index(k) starts mid-chain with first-order warm-up."""
    for kind, cfg in (("dpm", dict(solver_order=3)), ("unipc", dict(solver_order=3))):
        D, F = PAIRS[kind]
        out = []
        for S in (D, F):
            s = S(**cfg)
            s.set_timesteps(12)
            s.set_begin_index(4)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            for t in s.timesteps[4:]:
                x = s.step(toy_model(x, t), t, x).prev_sample
            out.append(x)
        assert float((out[0] - out[1]).abs().max()) <= 1e-5 * scale(out[0]), kind


def test_first_timestep_mid_chain_without_begin_index():
    d, f = DPMSolverMultistepScheduler(solver_order=2), FusedDPMSolverMultistepScheduler(solver_order=2)
    out = []
    for s in (d, f):
        s.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in s.timesteps[3:]:
            x = s.step(toy_model(x, t), t, x).prev_sample
        out.append(x)
        assert s.step_index == 10
    assert float((out[0] - out[1]).abs().max()) <= 1e-5 * scale(out[0])


def test_second_run_after_set_timesteps_restarts_cleanly_with_fixed_buffers():
    f = FusedUniPCMultistepScheduler(solver_order=3)
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    a = run(f, 8, x_T, torch.float64)
    hist, last, coeffs, counter = (f._history.data_ptr(), f._last.data_ptr(), f._coeffs.data_ptr(),
                                   f._counter.data_ptr())
    b = run(f, 8, x_T, torch.float64)
    assert torch.equal(a, b)
    assert (f._history.data_ptr(), f._last.data_ptr(), f._coeffs.data_ptr(), f._counter.data_ptr()) == \
        (hist, last, coeffs, counter)


def test_euler_before_set_timesteps_runs_the_training_chain():
    x = torch.randn(SHAPE, dtype=torch.float64)
    for D, F in (PAIRS["euler"], PAIRS["euler_a"]):
        d, f = D(), F()
        assert f.num_inference_steps is None and torch.is_tensor(f.init_noise_sigma)
        assert abs(float(d.init_noise_sigma) - float(f.init_noise_sigma)) < 1e-3
        t = d.timesteps[0]
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        a = d.step(toy_model(d.scale_model_input(x, t), t), t, x, generator=g1).prev_sample
        b = f.step(toy_model(f.scale_model_input(x, t), t), t, x, generator=g2).prev_sample
        assert float((a - b).abs().max()) < 1e-4 * scale(a)


def test_config_round_trip_with_diffusers(tmp_path):
    for kind, cfg in (("dpm", dict(solver_order=3, use_karras_sigmas=True)), ("unipc", dict(solver_type="bh1")),
                      ("euler", dict(prediction_type="v_prediction")), ("euler_a", {}), ("flow", dict(shift=3.0))):
        D, F = PAIRS[kind]
        f = F.from_config(D(**cfg).config)
        for k, v in cfg.items():
            assert f.config[k] == v
        d = D.from_config(f.config)
        for k, v in cfg.items():
            assert d.config[k] == v
        f.save_pretrained(tmp_path / kind)
        g = F.from_pretrained(tmp_path / kind)
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert strip(g.config) == strip(f.config)


def test_add_noise_and_scale_model_input_match_diffusers():
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    eps = torch.randn(SHAPE, dtype=torch.float64)
    for kind in ("dpm", "unipc", "euler", "euler_a"):
        D, F = PAIRS[kind]
        d, f = D(), F()
        d.set_timesteps(10)
        f.set_timesteps(10)
        t = d.timesteps[[2, 5]]
        a = d.add_noise(x0, eps, t)
        b = f.add_noise(x0, eps, t)
        assert float((a - b).abs().max()) <= 1e-6 * scale(a), kind
        if kind.startswith("euler"):
            for s in (d, f):
                s.set_timesteps(10)
            t0 = d.timesteps[0]
            assert float((d.scale_model_input(x0, t0) - f.scale_model_input(x0, t0)).abs().max()) < 1e-6
            assert abs(d.init_noise_sigma - f.init_noise_sigma) < 1e-5 * float(d.init_noise_sigma)
    d, f = FlowMatchEulerDiscreteScheduler(shift=3.0), FusedFlowMatchEulerDiscreteScheduler(shift=3.0)
    d.set_timesteps(10)
    f.set_timesteps(10)
    t = d.timesteps[[1, 4]]
    assert float((d.scale_noise(x0, t, eps) - f.scale_noise(x0, t, eps)).abs().max()) < 1e-6


# ------------------------------------------------------------ pipeline ------
@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("kind,cfg", [("dpm", {}), ("dpm", dict(algorithm_type="sde-dpmsolver++")),
                                      ("euler_a", {})])
def test_pipeline_same_images_after_swap(tiny_unet, one_thread, kind, cfg):
    D, F = PAIRS[kind]
    images = []
    for S in (D, F):
        pipe = DDPMPipeline(unet=tiny_unet, scheduler=D(**cfg))
        pipe.scheduler = S.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                           output_type="np").images)
    assert np.abs(images[0] - images[1]).max() < 2e-4


# -------------------------------------------------------------- oracle ------
MU, S_DATA = 0.3, 0.5


def _oracle_eps(x, sigma, flow=False):
    """E[eps | x] for x0 ~ N(MU, S^2): VP x = a x0 + s eps (sigma = s / a), or
    flow x = (1 - sigma) x0 + sigma eps."""
    a, s = tb.vp_alpha_sigma(sigma, flow)
    a, s = float(a), float(s)
    return s * (x - a * MU) / (a * a * S_DATA ** 2 + s * s)


def _oracle_x0(x, sigma, flow=False):
    """E[x0 | x] for the same data."""
    a, s = (float(v) for v in tb.vp_alpha_sigma(sigma, flow))
    return MU + a * S_DATA ** 2 * (x - a * MU) / (a * a * S_DATA ** 2 + s * s)


def _ode_endpoint(x_T, sig_T, sig_end, flow=False):
    a0, s0 = (float(v) for v in tb.vp_alpha_sigma(sig_T, flow))
    a1, s1 = (float(v) for v in tb.vp_alpha_sigma(sig_end, flow))
    z = (x_T - a0 * MU) / math.sqrt(a0 * a0 * S_DATA ** 2 + s0 * s0)
    return a1 * MU + math.sqrt(a1 * a1 * S_DATA ** 2 + s1 * s1) * z


def _oracle_run(sched, n, x_T, flow=False, ve=False):
    """x_T is the VP/flow sample at the first sigma; returns (x_end in the VP/flow
    scale, first sigma, end sigma)."""
    sched.set_timesteps(n)
    sig = sched._sigmas64
    x = x_T * math.sqrt(sig[0] ** 2 + 1) if ve else x_T.clone()
    for i, t in enumerate(sched.timesteps):
        xi = sched.scale_model_input(x, t)
        x_vp = xi if ve else x
        eps = _oracle_eps(x_vp, sig[i], flow)
        out = eps - _oracle_x0(x_vp, sig[i], flow) if flow else eps  # flow models predict eps - x0
        x = sched.step(out, t, x).prev_sample
    end = sig[n]
    if ve:
        x = x / math.sqrt(end ** 2 + 1)
    return x, sig[0], end


ORDER_CASES = [  # (scheduler, config, order of convergence)
    (FusedDPMSolverMultistepScheduler, dict(solver_order=1), 1),
    (FusedEulerDiscreteScheduler, {}, 1),
    (FusedDPMSolverMultistepScheduler, dict(solver_order=2), 2),
    (FusedDPMSolverMultistepScheduler, dict(solver_order=2, solver_type="heun"), 2),
    (FusedUniPCMultistepScheduler, dict(solver_order=1), 2),     # UniPC-p with its corrector: order p + 1
    (FusedDPMSolverMultistepScheduler, dict(solver_order=3), 3),
    (FusedUniPCMultistepScheduler, dict(solver_order=2), 3),
    (FusedUniPCMultistepScheduler, dict(solver_order=2, solver_type="bh1"), 3),
]


@pytest.mark.parametrize("S,cfg,order", ORDER_CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in ORDER_CASES])
def test_oracle_ode_error_falls_at_the_solver_order(S, cfg, order):
    """Karras sigmas, a final sigma_min step and no lower-order final steps:
    the endpoint error against the exact ODE solution must halve per doubling
    of the steps for first order, quarter for second order; third-order
    solvers must beat 16x over two doublings and the second-order error."""
    extra = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")
    if S is not FusedEulerDiscreteScheduler:
        extra["lower_order_final"] = False
    x_T = torch.linspace(-3, 3, 64, dtype=torch.float64)[None]
    errs = []
    for n in (16, 32, 64):
        x, s0, s1 = _oracle_run(S(**cfg, **extra), n, x_T, ve=S is FusedEulerDiscreteScheduler)
        errs.append(float((x - _ode_endpoint(x_T, s0, s1)).abs().max()))
    ratios = [errs[k] / errs[k + 1] for k in range(len(errs) - 1)]
    if order == 1:
        assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)
    elif order == 2:
        assert ratios[-1] > 3.3 and errs[-1] < 0.012, (errs, ratios)
    else:
        assert errs[0] / errs[-1] > 11 and errs[-1] < 0.004, (errs, ratios)


def test_oracle_flow_euler_first_order():
    x_T = torch.linspace(-3, 3, 64, dtype=torch.float64)[None]
    errs = []
    for n in (8, 16, 32, 64):
        s = FusedFlowMatchEulerDiscreteScheduler(shift=2.0)
        x, s0, s1 = _oracle_run(s, n, x_T, flow=True)
        errs.append(float((x - _ode_endpoint(x_T, s0, s1, flow=True)).abs().max()))
    assert errs[-1] < 0.06 and all(1.8 < errs[k] / errs[k + 1] < 2.2 for k in range(3)), errs


def _oracle_linear(sigma, c_in, flow):
    """The oracle model output as p * x + q for the scheduler's sample x
    (c_in: the model-input scale)."""
    a, s = (float(v) for v in tb.vp_alpha_sigma(sigma, flow))
    d = a * a * S_DATA ** 2 + s * s
    pe, qe = s / d * c_in, -s * a * MU / d                    # eps*
    if not flow:
        return pe, qe
    px, qx = a * S_DATA ** 2 / d * c_in, MU - a * a * S_DATA ** 2 * MU / d  # E[x0 | x]
    return pe - px, qe - qx


def exact_moments(coeffs: np.ndarray, sigmas: np.ndarray, m0: float, v0: float, flow=False, ve=False):
    """Exact mean and variance of a sampler's output driven by the oracle: the
    state (x, H1, H2, H3, last, 1) is jointly Gaussian and every row is an
    affine map of it plus a_z times fresh noise."""
    C = tb.C
    mu = np.array([m0, 0, 0, 0, 0, 1.0])
    cov = np.zeros((6, 6))
    cov[0, 0] = v0
    for i, r in enumerate(coeffs):
        c_in = 1 / math.sqrt(sigmas[i] ** 2 + 1) if ve else 1.0
        p, q = _oracle_linear(sigmas[i], c_in, flow)
        m = np.array([p, 0, 0, 0, 0, q])                        # model output
        x = np.eye(6)[0]
        H = [np.eye(6)[j] for j in (1, 2, 3)]
        last = np.eye(6)[4]
        x0 = r[C["c_x"]] * x + r[C["c_m"]] * m
        xc = (r[C["u_last"]] * last + r[C["u_x0"]] * x0 + sum(r[U] * h for U, h in zip(tb.U_H, H))
              if r[C["u_on"]] else x)
        prev = r[C["a_x"]] * xc + r[C["a_m"]] * m + r[C["a_x0"]] * x0 + sum(r[A] * h for A, h in zip(tb.A_H, H))
        M = np.zeros((6, 6))
        M[0] = prev
        M[1], M[2], M[3] = (x0, H[0], H[1]) if r[C["push"]] else (H[0], H[1], H[2])
        M[4] = xc if r[C["push"]] else last
        M[5, 5] = 1.0
        g = np.zeros(6)
        g[0] = r[C["a_z"]]
        mu = M @ mu
        cov = M @ cov @ M.T + np.outer(g, g)
    return mu[0], cov[0, 0]


STOCHASTIC = [
    (FusedEulerAncestralDiscreteScheduler, {}, False, True),
    (FusedDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), False, False),
    (FusedDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                                            use_karras_sigmas=True), False, False),
    (FusedFlowMatchEulerDiscreteScheduler, dict(stochastic_sampling=True, shift=3.0), True, False),
]


@pytest.mark.parametrize("kernel_noise", [False, True])
@pytest.mark.parametrize("S,cfg,flow,ve", STOCHASTIC, ids=[f"{c[0].__name__}-{c[1]}" for c in STOCHASTIC])
def test_oracle_stochastic_samplers_exact_moments(S, cfg, flow, ve, kernel_noise):
    """Driven by the oracle every stochastic sampler is an affine Gaussian
    chain, so its output mean and variance are known exactly: the empirical
    moments of 20000 i.i.d. values must match them (|z| < 5), with diffusers'
    noise draws and with the in-kernel noise."""
    sched = S(**cfg)
    sched.kernel_noise = kernel_noise
    n = 12
    sched.set_timesteps(n)
    s0 = sched._sigmas64[0]
    a0, sg0 = (float(v) for v in tb.vp_alpha_sigma(s0, flow))
    m0, v0 = a0 * MU, a0 * a0 * S_DATA ** 2 + sg0 * sg0
    g = torch.Generator().manual_seed(11)
    x_T = m0 + math.sqrt(v0) * torch.randn(1, 20000, dtype=torch.float64, generator=g)
    torch.manual_seed(12)
    x, _, end = _oracle_run(sched, n, x_T, flow=flow, ve=ve)
    if ve:
        m0, v0 = m0 * math.sqrt(s0 ** 2 + 1), v0 * (s0 ** 2 + 1)
    mean, var = exact_moments(sched._coeffs.numpy(), sched._sigmas64, m0, v0, flow, ve)
    if ve:
        mean, var = mean / math.sqrt(end ** 2 + 1), var / (end ** 2 + 1)
    N = x.numel()
    z_mean = (float(x.mean()) - mean) / math.sqrt(var / N)
    z_var = (float(x.var()) - var) / (var * math.sqrt(2 / N))
    assert abs(z_mean) < 5 and abs(z_var) < 5, (z_mean, z_var, mean, var)


def test_oracle_sde_dpmsolver_reaches_the_data_distribution():
    torch.manual_seed(0)
    sched = FusedDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(40)
    s0 = sched._sigmas64[0]
    a0, sg0 = (float(v) for v in tb.vp_alpha_sigma(s0, False))
    x_T = a0 * MU + math.sqrt(a0 * a0 * S_DATA ** 2 + sg0 * sg0) * torch.randn(1, 20000, dtype=torch.float64)
    x, _, end = _oracle_run(sched, 40, x_T)
    assert end == 0.0
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.std()) / S_DATA - 1) < 0.05


# ------------------------------------------------------ no host sync --------
@pytest.mark.parametrize("S,cfg", [(FusedDPMSolverMultistepScheduler, {}),
                                   (FusedUniPCMultistepScheduler, dict(solver_order=3)),
                                   (FusedEulerDiscreteScheduler, {}),
                                   (FusedDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++",
                                                                           thresholding=True)),
                                   (FusedEulerAncestralDiscreteScheduler, {}),
                                   (FusedFlowMatchEulerDiscreteScheduler, {})])
def test_compiled_step_loop_full_graph_no_recompile(S, cfg):
    import torch._dynamo
    torch._dynamo.reset()
    s = S(**cfg)
    s.set_timesteps(6)
    x = torch.randn(SHAPE)
    ts = s.timesteps
    x = s.step(toy_model(s.scale_model_input(x, ts[0]), 0), ts[0], x).prev_sample  # the run starts eagerly

    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def step(x, t):
        return s.step(toy_model(s.scale_model_input(x, t), 0), t, x).prev_sample

    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in ts[1:]:
            x = step(x, t)
    assert len(compiles) == 1 and torch.isfinite(x).all()
    assert s.step_index == 6


# ------------------------------------------------------------ bad input ------
def test_bad_input_is_named():
    s = FusedDPMSolverMultistepScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 10, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.zeros(2, 3, 4, 5), s.timesteps[0], x)
    with pytest.raises(TypeError, match="model_output"):
        s.step("x", s.timesteps[0], x)
    for t in s.timesteps:
        x = s.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="step_index"):   # past the end of the chain
        s.step(x, s.timesteps[-1], x)
    with pytest.raises(ValueError, match="prediction_type"):
        FusedDPMSolverMultistepScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="solver_order"):
        FusedUniPCMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="Only one"):
        FusedEulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        FusedEulerDiscreteScheduler(final_sigmas_type="one")
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        FusedDPMSolverMultistepScheduler(thresholding=True, dynamic_thresholding_ratio=1.5)
    e = FusedEulerDiscreteScheduler()
    e.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        e.step(x, 3, x)
    with pytest.raises(ValueError, match="not in the scheduler"):
        e.step(x, torch.tensor(3.5), x)
    with pytest.raises(ValueError, match="begin_index"):
        e.set_begin_index(-1)


# -------------------------------------------------- GaussianDiffusion ------
class _TimestepOracle(torch.nn.Module):
    """The oracle as a GaussianDiffusion model: eps*(x_t, t) for x0 ~ N(MU, S^2)."""

    def __init__(self, abar: torch.Tensor):
        super().__init__()
        self.register_buffer("abar", abar.double())

    def forward(self, x, t):
        ab = self.abar[t].to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        return s * (x - a * MU) / (ab * S_DATA ** 2 + 1 - ab)


def _gaussian_diffusion(**kw):
    sched = fastdiff.NoiseSchedule.make("linear", 1000)
    model = _TimestepOracle(sched.alphas_cumprod)
    return fastdiff.GaussianDiffusion(model, sched, sample_shape=(64,), clip_sample=False, **kw), sched


@pytest.mark.parametrize("method,order,S,cfg", [
    ("dpmsolver++", 2, FusedDPMSolverMultistepScheduler, {}),
    ("dpmsolver++", 3, FusedDPMSolverMultistepScheduler, dict(solver_order=3)),
    ("unipc", 2, FusedUniPCMultistepScheduler, {}),
])
def test_gaussian_diffusion_multistep_matches_the_scheduler(method, order, S, cfg):
    """sample(method=...) runs the same table as the scheduler on the same
    timesteps (custom timesteps = the diffusion's respaced chain), and lands
    near the exact ODE endpoint."""
    diff, sched = _gaussian_diffusion()
    steps = 20
    x_T = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = diff.sample(2, steps=steps, method=method, order=order, x_T=x_T, dtype=torch.float64)
    ts = sched.timesteps(steps, "leading")
    s = S(**cfg)
    if S is FusedDPMSolverMultistepScheduler:
        s.set_timesteps(timesteps=ts.tolist())
    else:  # UniPC has no custom timesteps: lay its table out on ours
        s.set_timesteps(steps)
        abar = sched.alphas_cumprod.numpy()
        sig = np.sqrt((1 - abar[ts.numpy()]) / abar[ts.numpy()])
        s.timesteps = ts
        s._finish(np.concatenate([sig, [0.0]]), ts.numpy(), None)
    x = x_T.clone()
    for t in s.timesteps:
        x = s.step(diff.model(x, t.reshape(1).expand(2)), t, x).prev_sample
    assert float((out - x).abs().max()) < 1e-10
    exact = _ode_endpoint(x_T, float(np.sqrt((1 - sched.alphas_cumprod[ts[0]]) / sched.alphas_cumprod[ts[0]])), 0.0)
    err = float((out - exact).abs().max())
    assert err < 0.5  # 20 uniformly spaced steps are coarse for this stiff oracle; 40 steps do better
    if order == 3:
        return  # (3M extrapolates badly over the log-SNR jump of the last uniform steps: not monotone here)
    out40 = diff.sample(2, steps=40, method=method, order=order, x_T=x_T, dtype=torch.float64)
    exact40 = _ode_endpoint(x_T, float(np.sqrt((1 - sched.alphas_cumprod[975]) / sched.alphas_cumprod[975])),
                            0.0)
    assert float((out40 - exact40).abs().max()) < 0.6 * err


def test_gaussian_diffusion_euler_methods():
    diff, sched = _gaussian_diffusion()
    x_T = torch.randn(1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, traj = diff.sample(1, steps=40, method="euler", spacing="trailing", x_T=x_T, dtype=torch.float64,
                            return_trajectory=True)
    t0 = sched.timesteps(40, "trailing")[0]
    ab = float(sched.alphas_cumprod[t0])
    exact = _ode_endpoint(x_T, math.sqrt((1 - ab) / ab), 0.0)
    assert float((out - exact).abs().max()) < 0.15
    assert traj.shape == (41, 1, 64) and torch.allclose(traj[0], x_T, rtol=1e-12, atol=0) \
        and torch.equal(traj[-1], out)
    # Euler ancestral: in-kernel noise from the generator, reproducible; moments near the data's
    a = diff.sample(200, steps=40, method="euler_ancestral", generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    b = diff.sample(200, steps=40, method="euler_ancestral", generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    assert torch.equal(a, b)
    assert abs(float(a.mean()) - MU) < 0.03 and abs(float(a.std()) / S_DATA - 1) < 0.15
    # float32 and clipping run; clipped samples stay in range
    c = fastdiff.GaussianDiffusion(diff.model, sched, sample_shape=(64,), clip_sample=True, clip_sample_range=0.5)
    for m in ("euler", "dpmsolver++", "unipc"):
        y = c.sample(4, steps=10, method=m, generator=torch.Generator().manual_seed(2))
        assert y.dtype == torch.float32 and float(y.abs().max()) <= 0.5 + 1e-6, m


def test_gaussian_diffusion_multistep_bad_input():
    diff, _ = _gaussian_diffusion()
    with pytest.raises(ValueError, match="order"):
        diff.sample(2, steps=5, method="euler", order=2)
    with pytest.raises(ValueError, match="order"):
        diff.sample(2, steps=5, method="dpmsolver++", order=4)
    with pytest.raises(ValueError, match="eta"):
        diff.sample(2, steps=5, method="unipc", eta=0.5)
    with pytest.raises(ValueError, match="method"):
        diff.sample(2, steps=5, method="heun")
    with pytest.raises(ValueError, match="cuda_graph"):
        diff.sample(2, steps=5, method="dpmsolver++", cuda_graph=True)


# ------------------------------------------------------------------ CLI ----
def test_cli_sample_multistep_methods(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "fastdiff", *args], cwd=root, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    out = tmp_path / "roll"
    run("train", "--dataset", "swissroll", "--steps", "20", "--batch", "64", "--log-every", "10",
        "--checkpoint-every", "20", "--num-samples", "0", "--timesteps", "100", "--out", str(out), "--no-progress",
        "--threads", "1")
    for method, extra in (("dpmsolver++", ["--order", "3"]),):  # (the other methods: sample() tests above)
        dest = tmp_path / f"{method}.npz"
        r = run("sample", "--checkpoint", str(out), "--n", "20", "--method", method, *extra, "--steps", "8",
                "--out", str(dest), "--no-progress", "--threads", "1")
        assert "20 samples" in r.stdout
        s = np.load(dest)["samples"]
        assert s.shape == (20, 2) and np.isfinite(s).all()


def test_cli_sample_rejects_bad_order(capsys):
    from fastdiff import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--checkpoint", "nowhere", "--method", "unipc", "--order", "4"])
    assert e.value.code == 2 and "--order" in capsys.readouterr().err


def test_ddpm_ddim_get_variance_matches_diffusers():
    """diffusers' private _get_variance, which its own tests and some pipelines call."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from fastdiff.diffusion.schedulers import FusedDDIMScheduler, FusedDDPMScheduler
    for vt in ("fixed_small", "fixed_large", "fixed_small_log"):
        d, f = DDPMScheduler(variance_type=vt), FusedDDPMScheduler(variance_type=vt)
        for t in (0, 1, 487, 999):
            want = float(d._get_variance(t))
            assert abs(want - float(f._get_variance(t))) < 1e-6 * max(1.0, want)
    v = torch.tensor([-0.5, 0.5])
    d, f = DDPMScheduler(variance_type="learned_range"), FusedDDPMScheduler(variance_type="learned_range")
    assert torch.allclose(d._get_variance(500, v), f._get_variance(500, v).float(), rtol=1e-5)
    d, f = DDIMScheduler(), FusedDDIMScheduler()
    for t, tp in ((0, 0), (420, 400), (999, -1)):
        assert abs(float(d._get_variance(t, tp)) - float(f._get_variance(t, tp))) < 1e-6
    with pytest.raises(ValueError, match="out of range"):
        f._get_variance(1000, 10)
