"""FusedDDPMScheduler / FusedDDIMScheduler against diffusers' schedulers.

The operators' maths is checked step by step against diffusers in
test_diffusers_parity.py; this file checks the scheduler classes: config
handling, the timestep chain (t -> t_prev), how and when the noise is drawn,
pipelines with the scheduler swapped in, serialisation, the deliberate
differences from diffusers, and bad input.

Two levels of agreement (as in test_diffusers_parity.py):
* diffusers whose ``alphas_cumprod`` / ``one`` / ``final_alpha_cumprod`` were
  replaced by our float64 table, on float64 data: both evaluate the same
  formulas in float64, so they agree to ~1e-12 (1e-6 with dynamic
  thresholding, whose quantile fastdiff takes in float32);
* stock diffusers (float32 tables) on float32 data: 5e-5 of the output's
  magnitude plus 2e-7 / (1 - abar_prev) (diffusers' float32 1 - abar near
  t = 0; see ``_stock_tol`` in test_diffusers_parity.py).
Both sides draw the step noise from generators with the same seed.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput  # noqa: E402
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.diffusion.schedulers import FusedDDIMScheduler, FusedDDPMScheduler  # noqa: E402
from fastdiff.reference import diffusion as ref  # noqa: E402

SHAPE = (2, 3, 6, 6)
TOL_F64 = 1e-11
TOL_STEP = 5e-5
STOCK_ABAR_ERR = 2e-7


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inject_f64(theirs, ours):
    """Make diffusers evaluate its coefficients from our float64 table."""
    theirs.alphas_cumprod = ours.schedule.alphas_cumprod.clone()
    theirs.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(ours, "_final_abar"):
        theirs.final_alpha_cumprod = torch.tensor(ours._final_abar, dtype=torch.float64)


def _close(got, expected, tol, what):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    scale = max(1.0, float(expected.abs().max()))
    err = float((got.double() - expected.double()).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def _model_output(g, shape, dtype, variance_type=None):
    out = torch.randn(shape, generator=g, dtype=torch.float64)
    if variance_type == "learned_range":
        out = torch.cat([out, torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1], 1)
    elif variance_type == "learned":
        out = torch.cat([out, torch.rand(shape, generator=g, dtype=torch.float64) * 0.05 + 1e-4], 1)
    return out.to(dtype)


def _run_chain(ours, theirs, dtype, n_steps=None, timesteps=None, variance_type=None, step_kw=None, seed=0):
    """Step both schedulers through the chain from the same x_t each step
    (ours' previous output), with the same model output and the same
    generator seed; yields (t, t_prev, our output, their output)."""
    step_kw = step_kw or {}
    if n_steps is not None or timesteps is not None:
        ours.set_timesteps(n_steps, timesteps=timesteps)
        if timesteps is not None:
            theirs.set_timesteps(timesteps=timesteps)
        else:
            theirs.set_timesteps(n_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    g = _gen(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    ts = ours.timesteps.tolist()
    for i, t in enumerate(ts):
        out = _model_output(g, SHAPE, dtype, variance_type)
        tt = torch.tensor(t)  # pipelines pass a 0-d tensor
        a = ours.step(out, tt, x, generator=_gen(100 + i), **step_kw)
        b = theirs.step(out, tt, x, generator=_gen(100 + i), **step_kw)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        yield t, t_prev, a, b
        x = a.prev_sample


def _stock_tol(ours, t_prev, final=1.0):
    abar_prev = float(ours.schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else final
    k = 1.0 - abar_prev
    return TOL_STEP + (STOCK_ABAR_ERR / k if k > 0 else 0.0)


# ------------------------------------------------------------ DDPM grid -----
DDPM_CASES = [
    # beta_schedule, prediction_type, variance_type, clip ("threshold" / float / None), chain, extra config
    ("linear", "epsilon", "fixed_small", 1.0, dict(n=10), {}),
    ("scaled_linear", "epsilon", "fixed_small_log", None, dict(n=7), dict(timestep_spacing="trailing")),
    ("squaredcos_cap_v2", "sample", "fixed_large", 2.0, dict(n=9), dict(timestep_spacing="linspace")),
    ("linear", "v_prediction", "learned_range", "threshold", dict(n=10), dict(steps_offset=1)),
    ("sigmoid", "epsilon", "learned", None, dict(n=8), dict(timestep_spacing="trailing")),
    ("laplace", "sample", "fixed_small", 1.0, dict(n=6), {}),
    ("scaled_linear", "v_prediction", "fixed_small", None, dict(n=10),
     dict(timestep_spacing="trailing", rescale_betas_zero_snr=True)),
    ("linear", "epsilon", "fixed_small", 1.0, dict(timesteps=[999, 731, 420, 101, 7, 1]), {}),
    ("squaredcos_cap_v2", "v_prediction", "learned_range", None, dict(timesteps=[960, 500, 3]), {}),
]


def _clip_cfg(clip):
    if clip is None:
        return dict(clip_sample=False)
    if clip == "threshold":
        return dict(clip_sample=False, thresholding=True, sample_max_value=3.0)
    return dict(clip_sample=True, clip_sample_range=clip)


def _ddpm_pair(beta_schedule, pred, var, clip, extra):
    cfg = dict(beta_schedule=beta_schedule, prediction_type=pred, variance_type=var, **_clip_cfg(clip), **extra)
    return FusedDDPMScheduler(**cfg), DDPMScheduler(**cfg)


@pytest.mark.parametrize("case", DDPM_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{list(c[4].values())[0]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64table", "stock"])
def test_ddpm_chain_matches_diffusers(case, dtype):
    beta_schedule, pred, var, clip, chain, extra = case
    ours, theirs = _ddpm_pair(beta_schedule, pred, var, clip, extra)
    if dtype == torch.float64:
        _inject_f64(theirs, ours)
    tol_f64 = 1e-6 if clip == "threshold" else TOL_F64
    n = 0
    for t, t_prev, a, b in _run_chain(ours, theirs, dtype, chain.get("n"), chain.get("timesteps"), var):
        assert int(ours.previous_timestep(t)) == t_prev == int(theirs.previous_timestep(t))
        tol = tol_f64 if dtype == torch.float64 else _stock_tol(ours, t_prev)
        _close(a.pred_original_sample, b.pred_original_sample, tol, f"x0_hat at t={t}")
        _close(a.prev_sample, b.prev_sample, tol, f"prev_sample at t={t}")
        n += 1
    assert n == len(ours.timesteps) and n >= 3


def test_ddpm_default_chain_without_set_timesteps():
    """Before set_timesteps the chain is t -> t - 1 over all T steps."""
    ours, theirs = FusedDDPMScheduler(variance_type="fixed_large"), DDPMScheduler(variance_type="fixed_large")
    _inject_f64(theirs, ours)
    g = _gen(3)
    for t in (999, 500, 1, 0):
        x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        out = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        a = ours.step(out, t, x, generator=_gen(t))
        b = theirs.step(out, t, x, generator=_gen(t))
        assert ours.previous_timestep(t) == t - 1
        _close(a.prev_sample, b.prev_sample, TOL_F64, f"t={t}")


# ------------------------------------------------------------ DDIM grid -----
DDIM_CASES = [
    # beta_schedule, prediction_type, clip, n, config extra, eta, use_clipped_model_output
    ("linear", "epsilon", 1.0, 10, {}, 0.0, False),
    ("linear", "epsilon", 1.0, 10, {}, 1.0, True),
    ("scaled_linear", "sample", None, 8, dict(set_alpha_to_one=False, steps_offset=1), 0.5, False),
    ("squaredcos_cap_v2", "v_prediction", "threshold", 10, dict(timestep_spacing="trailing"), 1.0, False),
    ("scaled_linear", "v_prediction", None, 10,
     dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, set_alpha_to_one=False), 0.0, False),
    ("linear", "sample", 2.0, 20, dict(timestep_spacing="trailing", steps_offset=1), 0.3, True),
]


@pytest.mark.parametrize("case", DDIM_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-n{c[3]}-eta{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64table", "stock"])
def test_ddim_chain_matches_diffusers(case, dtype):
    beta_schedule, pred, clip, n, extra, eta, use_clipped = case
    cfg = dict(beta_schedule=beta_schedule, prediction_type=pred, **_clip_cfg(clip), **extra)
    ours, theirs = FusedDDIMScheduler(**cfg), DDIMScheduler(**cfg)
    if dtype == torch.float64:
        _inject_f64(theirs, ours)
    tol_f64 = 1e-6 if clip == "threshold" else TOL_F64
    kw = dict(eta=eta, use_clipped_model_output=use_clipped)
    steps = 0
    for t, t_prev, a, b in _run_chain(ours, theirs, dtype, n, step_kw=kw):
        tol = tol_f64 if dtype == torch.float64 else _stock_tol(ours, t_prev, ours._final_abar)
        if dtype == torch.float32 and eta > 0:
            tol *= 4  # sqrt(1 - abar_prev - sigma^2) cancels in float32 in diffusers
        _close(a.pred_original_sample, b.pred_original_sample, tol, f"x0_hat at t={t}")
        _close(a.prev_sample, b.prev_sample, tol, f"prev_sample at t={t}")
        steps += 1
    assert steps == n


def test_ddim_variance_noise_and_tuple_output():
    ours, theirs = FusedDDIMScheduler(), DDIMScheduler()
    _inject_f64(theirs, ours)
    ours.set_timesteps(5), theirs.set_timesteps(5)
    g = _gen(4)
    x, out, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    a = ours.step(out, 600, x, eta=0.7, variance_noise=z, return_dict=False)
    b = theirs.step(out, 600, x, eta=0.7, variance_noise=z)
    assert isinstance(a, tuple) and len(a) == 2
    _close(a[0], b.prev_sample, TOL_F64, "prev_sample")
    _close(a[1], b.pred_original_sample, TOL_F64, "x0_hat")
    assert isinstance(ours.step(out, 600, x), DDIMSchedulerOutput)


# ----------------------------------------------------- low precision --------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_low_precision_step_at_least_as_accurate_as_diffusers(dtype, kind):
    """float16/bfloat16: our error against the float64 truth (same inputs,
    same noise) is at most 2x diffusers' own low-precision error, and within
    4 ulps of the output's magnitude."""
    if kind == "ddpm":
        cfg = dict(prediction_type="v_prediction", variance_type="fixed_small", clip_sample=False)
        ours, theirs = FusedDDPMScheduler(**cfg), DDPMScheduler(**cfg)
        kw = {}
    else:
        cfg = dict(prediction_type="epsilon", clip_sample=False)
        ours, theirs = FusedDDIMScheduler(**cfg), DDIMScheduler(**cfg)
        kw = dict(eta=1.0)
    ours.set_timesteps(10), theirs.set_timesteps(10)
    abar = ours.schedule.alphas_cumprod
    g = _gen(5)
    eps_dtype = torch.finfo(dtype).eps
    for t in (900, 500, 100, 0):
        x = torch.randn(SHAPE, generator=g).to(dtype)
        out = torch.randn(SHAPE, generator=g).to(dtype)
        a = ours.step(out, t, x, generator=_gen(t), **kw).prev_sample
        b = theirs.step(out, t, x, generator=_gen(t), **kw).prev_sample
        z = randn_tensor(SHAPE, generator=_gen(t), dtype=dtype).double()  # the noise both drew
        tt = torch.full((SHAPE[0],), t)
        tp = torch.full((SHAPE[0],), int(ours.previous_timestep(t)))
        if kind == "ddpm":
            truth, _ = ref.ddpm_step(out.double(), x.double(), tt, tp, abar, z if t > 0 else None,
                                     prediction_type="v_prediction")
        else:
            truth, _ = ref.ddim_step(out.double(), x.double(), tt, tp, abar, z, 1.0)
        scale = float(truth.abs().max())
        err_ours = float((a.double() - truth).abs().max())
        err_theirs = float((b.double() - truth).abs().max())
        assert err_ours <= max(2 * err_theirs, 4 * eps_dtype * scale), (t, err_ours, err_theirs)


# ------------------------------------------------------------ pipelines -----
def _tiny_unet(out_channels=3, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), attention_head_dim=None).eval()


def _images(pipe, seed, **kw):
    with torch.no_grad():
        return pipe(batch_size=2, generator=_gen(seed), output_type="np", **kw).images


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_pipeline_with_fused_scheduler_matches_diffusers(variance_type):
    unet = _tiny_unet(6 if variance_type == "learned_range" else 3)
    stock = DDPMScheduler(variance_type=variance_type, num_train_timesteps=1000)
    pipe = DDPMPipeline(unet=unet, scheduler=stock)
    pipe.set_progress_bar_config(disable=True)
    expected = _images(pipe, 7, num_inference_steps=12)
    pipe.scheduler = FusedDDPMScheduler.from_config(stock.config)
    assert isinstance(pipe.scheduler, FusedDDPMScheduler)
    got = _images(pipe, 7, num_inference_steps=12)
    assert got.shape == expected.shape == (2, 8, 8, 3)
    assert np.abs(got - expected).max() < 1e-4  # measured <= 4e-6 (float32 vs float64 tables)
    other = _images(pipe, 8, num_inference_steps=12)
    assert np.abs(other - got).max() > 1e-2  # the comparison can fail: the noise matters


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_with_fused_scheduler_matches_diffusers(eta):
    unet = _tiny_unet()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(clip_sample=True))
    pipe.set_progress_bar_config(disable=True)
    expected = _images(pipe, 3, num_inference_steps=10, eta=eta)
    # DDIMPipeline.__init__ converts its scheduler to DDIMScheduler: assign after construction
    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)
    got = _images(pipe, 3, num_inference_steps=10, eta=eta)
    assert isinstance(pipe.scheduler, FusedDDIMScheduler)
    assert np.abs(got - expected).max() < 1e-4  # measured <= 2e-5 (float32 vs float64 tables)


def test_kernel_noise_in_pipeline_is_reproducible():
    pipe = DDPMPipeline(unet=_tiny_unet(), scheduler=FusedDDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    default = _images(pipe, 11, num_inference_steps=8)
    pipe.scheduler.kernel_noise = True
    a = _images(pipe, 11, num_inference_steps=8)
    b = _images(pipe, 11, num_inference_steps=8)
    c = _images(pipe, 12, num_inference_steps=8)
    assert np.array_equal(a, b)  # the generator's seed drives the in-kernel noise
    assert np.isfinite(a).all()
    assert np.abs(a - c).max() > 1e-2 and np.abs(a - default).max() > 1e-2


def test_explicit_key_and_t0_leaves_generator_alone():
    s = FusedDDPMScheduler(clip_sample=False)
    s.set_timesteps(4)
    g = _gen(9)
    x, out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    k1, k2 = fastdiff.draw_key(_gen(1)), fastdiff.draw_key(_gen(2))
    a1 = s.step(out, 500, x, key=k1).prev_sample
    assert torch.equal(a1, s.step(out, 500, x, key=k1).prev_sample)
    assert not torch.equal(a1, s.step(out, 500, x, key=k2).prev_sample)
    # the key's noise enters with the posterior std: compare with the mean (t = 500 -> 250)
    mean = s.step(out, 500, x, variance_noise=torch.zeros_like(x)).prev_sample
    ab_t, ab_p = s.schedule.alphas_cumprod[500], s.schedule.alphas_cumprod[250]
    std = float(((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)).sqrt())
    z = (a1 - mean) / std
    assert 0.5 < float(z.std()) < 1.5
    # diffusers draws no noise at t = 0; neither do we (the generator state is untouched)
    g0 = _gen(4)
    state = g0.get_state()
    s.step(out, 0, x, generator=g0)
    assert torch.equal(g0.get_state(), state)


# ----------------------------------------------------- per-sample t ---------
def test_per_sample_timesteps_equal_separate_steps():
    s = FusedDDPMScheduler(prediction_type="v_prediction", variance_type="learned_range")
    s.set_timesteps(10)
    g = _gen(6)
    x = torch.randn(SHAPE[0] + 1, *SHAPE[1:], generator=g)
    out = torch.cat([torch.randn(x.shape, generator=g), torch.rand(x.shape, generator=g) * 2 - 1], 1)
    z = torch.randn(x.shape, generator=g)
    t = torch.tensor([900, 400, 0])
    batch = s.step(out, t, x, variance_noise=z)
    for i in range(3):
        one = s.step(out[i:i + 1], int(t[i]), x[i:i + 1], variance_noise=z[i:i + 1])
        _close(batch.prev_sample[i:i + 1], one.prev_sample, 1e-6, f"sample {i}")
        _close(batch.pred_original_sample[i:i + 1], one.pred_original_sample, 1e-6, f"x0 {i}")
    d = FusedDDIMScheduler()
    d.set_timesteps(10)
    both = d.step(out[:, :3], t, x, eta=0.0)
    _close(both.prev_sample[1:2], d.step(out[1:2, :3], 400, x[1:2]).prev_sample, 1e-6, "ddim")


# ------------------------------------------------ forward process -----------
@pytest.mark.parametrize("cls,stock", [(FusedDDPMScheduler, DDPMScheduler), (FusedDDIMScheduler, DDIMScheduler)])
def test_add_noise_and_velocity_match_diffusers(cls, stock):
    ours, theirs = cls(beta_schedule="scaled_linear"), stock(beta_schedule="scaled_linear")
    g = _gen(2)
    x0, z = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    _close(ours.add_noise(x0, z, t), theirs.add_noise(x0, z, t), 2e-5, "add_noise")
    _close(ours.get_velocity(x0, z, t), theirs.get_velocity(x0, z, t), 2e-5, "get_velocity")
    # scalar and (1,) timesteps broadcast over the batch
    _close(ours.add_noise(x0, z, 300), theirs.add_noise(x0, z, torch.tensor([300])), 2e-5, "int t")
    _close(ours.add_noise(x0, z, torch.tensor([300])), theirs.add_noise(x0, z, torch.tensor([300])), 2e-5, "(1,)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_add_noise_keeps_the_noise(dtype):
    """diffusers rounds abar_t to the sample dtype before 1 - abar_t: at
    small t that is 1 - 1 = 0 and x_t == x0 (no noise at all). Ours forms
    the coefficients in float64 and matches the float64 truth to rounding."""
    ours, theirs = FusedDDPMScheduler(), DDPMScheduler()
    g = _gen(8)
    x0, z = torch.randn(2, 3, 8, 8, generator=g).to(dtype), torch.randn(2, 3, 8, 8, generator=g).to(dtype)
    t = torch.tensor([0, 1])
    assert torch.equal(theirs.add_noise(x0, z, t), x0)  # diffusers' result: the noise is gone
    got = ours.add_noise(x0, z, t)
    abar = ours.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    truth = abar.sqrt() * x0.double() + (1 - abar).sqrt() * z.double()
    assert got.dtype == dtype
    assert float((got.double() - truth).abs().max()) <= torch.finfo(dtype).eps * float(truth.abs().max())
    assert not torch.equal(got, x0)


def test_fixed_large_log_is_finite_and_equals_fixed_large():
    """diffusers' fixed_large_log takes the square root of a log-variance
    (NaN); ours is the variance beta'_t, as fixed_large."""
    g = _gen(10)
    x, out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    theirs = DDPMScheduler(variance_type="fixed_large_log")
    assert torch.isnan(theirs.step(out, 500, x, generator=_gen(0)).prev_sample).all()
    ours = FusedDDPMScheduler(variance_type="fixed_large_log")
    large = FusedDDPMScheduler(variance_type="fixed_large")
    a = ours.step(out, 500, x, generator=_gen(0)).prev_sample
    assert torch.isfinite(a).all()
    assert torch.equal(a, large.step(out, 500, x, generator=_gen(0)).prev_sample)


def test_ddim_previous_timestep_follows_the_chain():
    """diffusers' DDIM steps to t - T // n, which leaves a linspace chain
    (999 -> 899 while the chain's next step is 888). Ours steps to the next
    timestep of the chain: with a perfect x0-predictor and eta = 0 the DDIM
    step from q(x_t | x0, eps) lands exactly on q(x_{t_prev} | x0, eps) at
    the timestep the model is given next."""
    ours = FusedDDIMScheduler(prediction_type="sample", clip_sample=False, timestep_spacing="linspace")
    theirs = DDIMScheduler(prediction_type="sample", clip_sample=False, timestep_spacing="linspace")
    ours.set_timesteps(10), theirs.set_timesteps(10)
    ts = ours.timesteps.tolist()
    assert ts[:2] == [999, 888] and torch.equal(ours.timesteps, theirs.timesteps)
    g = _gen(12)
    x0, z = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g,
                                                                              dtype=torch.float64)
    x = ours.add_noise(x0, z, ts[0])
    prev = ours.step(x0, ts[0], x).prev_sample
    _close(prev, ours.add_noise(x0, z, ts[1]), 1e-12, "on the chain")
    stock_prev = theirs.step(x0, ts[0], x).prev_sample
    _close(stock_prev, ours.add_noise(x0, z, 899), 1e-6, "diffusers lands on 999 - 100")
    assert float((stock_prev - prev).abs().max()) > 1e-3


# -------------------------------------------------------- config / io -------
def test_config_roundtrip_and_interop(tmp_path):
    ours = FusedDDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                              prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "FusedDDPMScheduler" and cfg["variance_type"] == "learned_range"
    back = FusedDDPMScheduler.from_pretrained(tmp_path)
    stock = DDPMScheduler.from_pretrained(tmp_path)  # diffusers reads our file
    for k in ("beta_schedule", "variance_type", "prediction_type", "timestep_spacing", "steps_offset"):
        assert back.config[k] == ours.config[k] == stock.config[k]
    assert torch.equal(back.schedule.alphas_cumprod, ours.schedule.alphas_cumprod)
    # stock -> fused -> stock, and across DDPM/DDIM (the other's options are dropped)
    d = FusedDDIMScheduler.from_config(stock.config)
    assert d.config.prediction_type == "v_prediction" and d.config.steps_offset == 1
    assert DDIMScheduler.from_config(d.config).config.timestep_spacing == "trailing"
    # DDPM-only options ride along as hidden config entries (as between diffusers' own classes)
    assert FusedDDPMScheduler.from_config(d.config).variance_type == "learned_range"
    p = FusedDDPMScheduler.from_config(DDIMScheduler(set_alpha_to_one=False, clip_sample=False).config)
    assert p.config.clip_sample is False and p.variance_type == "fixed_small"
    assert FusedDDIMScheduler in ours.compatibles and DDIMScheduler in ours.compatibles
    assert len(ours) == 1000 and ours.scale_model_input(torch.ones(1), 3).equal(torch.ones(1))
    # float32 tables for diffusers-style readers, float64 for the kernels
    assert ours.alphas_cumprod.dtype == torch.float32 and ours.schedule.alphas_cumprod.dtype == torch.float64


def test_pipeline_save_load_keeps_the_fused_scheduler(tmp_path):
    pipe = DDPMPipeline(unet=_tiny_unet(), scheduler=FusedDDPMScheduler(clip_sample=False))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][0].startswith("fastdiff") and index["scheduler"][1] == "FusedDDPMScheduler"
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, FusedDDPMScheduler) and loaded.scheduler.config.clip_sample is False
    assert os.path.exists(tmp_path / "scheduler" / "scheduler_config.json")


def test_trained_betas_and_zero_snr_tables():
    betas = np.linspace(1e-4, 0.02, 50)
    s = FusedDDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    assert s.schedule.betas.dtype == torch.float64
    assert np.allclose(s.schedule.betas.numpy(), betas, rtol=0, atol=0)
    z = FusedDDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    assert float(z.schedule.alphas_cumprod[-1]) == 0.0
    stock = DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    assert torch.allclose(z.alphas_cumprod, stock.alphas_cumprod, atol=1e-6)


# -------------------------------------------------------------- errors ------
def test_bad_input_raises_clear_errors():
    s = FusedDDPMScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[5, 9, 1])
    with pytest.raises(ValueError, match="num_train_timesteps"):
        s.set_timesteps(timesteps=[1000, 3])
    with pytest.raises(ValueError, match="steps_offset"):
        FusedDDPMScheduler(steps_offset=5).set_timesteps(1000)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the scheduler's chain"):
        s.step(x, 950, x)
    with pytest.raises(ValueError, match="out of range"):
        s.step(x, 1000, x)
    with pytest.raises(TypeError, match="timestep"):
        s.step(x, torch.tensor(900.0), x)
    with pytest.raises(ValueError, match="timestep"):
        s.step(x, torch.tensor([900, 800, 700]), x)
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 3, 6, 5), 900, x)
    with pytest.raises(ValueError, match="variance_noise"):
        s.step(x, 900, x, generator=_gen(0), variance_noise=x)
    with pytest.raises(ValueError, match="learned_range"):
        FusedDDPMScheduler(variance_type="learned_range").step(x, 900, x)
    s.kernel_noise = True
    with pytest.raises(ValueError, match="kernel_noise"):
        s.step(x, 900, x, generator=[_gen(0), _gen(1)])
    d = FusedDDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(x, 900, x)
    d.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        d.step(x, 900, x, eta=-1.0)
    for kw, name in ((dict(beta_schedule="cubic"), "beta_schedule"), (dict(prediction_type="flow"), "prediction_type"),
                     (dict(timestep_spacing="log"), "timestep_spacing"), (dict(variance_type="big"), "variance_type"),
                     (dict(trained_betas=[0.1, 0.2]), "trained_betas")):
        with pytest.raises(ValueError, match=name):
            FusedDDPMScheduler(**kw)


def test_ddpm_output_type_and_dtype():
    s = FusedDDPMScheduler()
    x = torch.randn(SHAPE, dtype=torch.float16)
    r = s.step(x, 999, x, generator=_gen(0))
    assert isinstance(r, DDPMSchedulerOutput)
    assert r.prev_sample.dtype == r.pred_original_sample.dtype == torch.float16


# ----------------------------------------------------------------- GPU ------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [FusedDDPMScheduler, FusedDDIMScheduler])
def test_gpu_step_has_no_host_sync_and_matches_cpu(cls):
    s = cls(clip_sample=True)
    s.set_timesteps(10, device="cuda")
    g = _gen(0)
    x, out = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    kw = dict(eta=1.0) if cls is FusedDDIMScheduler else {}
    t = s.timesteps[2]
    xc, oc = x.cuda(), out.cuda()
    s.step(oc, t, xc, generator=torch.Generator("cuda").manual_seed(1), **kw)  # warm-up: tables to the GPU
    z = torch.randn(SHAPE, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = s.step(oc, t, xc, variance_noise=z, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    b = s.step(out, int(t), x, variance_noise=z.cpu(), **kw)
    _close(a.prev_sample.cpu(), b.prev_sample, 1e-5, "cuda vs cpu")
