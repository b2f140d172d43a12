"""Every backend of every fused operator against the float64 reference.

Float32 must match tightly. For float16/bfloat16 we use the flash-attention
rule: our error against float64 may be at most ~2x the error of the same
maths written in plain PyTorch at that dtype (plus a rounding floor).
"""
from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff import reference as ref
from fastdiff.ops._layout import canonical

from _backends import all_backends
from _backends import check_vs_reference as _check, in_layout as _layout, skip_big as _skip_big

BACKENDS = all_backends()
SHAPES = [(3, 5, 7, 9), (1, 1, 1, 1), (2, 3, 5), (4, 3, 8, 8), (5, 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHED = fastdiff.NoiseSchedule.make("linear", 1000)
ABAR = SCHED.alphas_cumprod


def _t(n, gen, lo=0, hi=1000):
    return torch.randint(lo, hi, (n,), generator=gen)


# ------------------------------------------------------------- q_sample ----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig", "transposed"])
def test_q_sample_given_noise(backend, shape, dtype, layout):
    _skip_big(backend, shape)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    nz = torch.randn(shape, generator=g, dtype=torch.float64)
    t = _t(shape[0], g)
    xl = _layout(x0.to(dtype), layout)
    # transposed x with contiguous noise: inputs in different layouts
    nl = nz.to(dtype) if layout == "transposed" else _layout(nz.to(dtype), layout)
    out = backend("q_sample", xl.to(backend.device), t.to(backend.device), ABAR.to(backend.device),
                  nl.to(backend.device))
    assert out.dtype == dtype and out.shape == x0.shape and out.stride() == canonical(xl).stride()
    r64 = ref.q_sample(xl.double(), t, ABAR, nl.double())
    rlp = ref.q_sample(xl, t, ABAR, nl, compute_dtype=dtype)
    _check(out, r64, rlp, dtype, "x_t")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_q_sample_rng(backend, shape, dtype, layout):
    _skip_big(backend, shape)
    g = torch.Generator().manual_seed(2)
    x0 = _layout(torch.randn(shape, generator=g).to(dtype), layout)
    t = _t(shape[0], g)
    key = torch.tensor([987654321012, 3], dtype=torch.int64)
    d = backend.device
    xt, nz = backend("q_sample_rng", x0.to(d), t.to(d), ABAR.to(d), key.to(d), True)
    z64 = ref.noise_like(canonical(x0), key)
    _check(nz, z64, z64.to(dtype), dtype, "noise")
    r64 = ref.q_sample(x0.double(), t, ABAR, z64)
    rlp = ref.q_sample(x0, t, ABAR, z64.to(dtype), compute_dtype=dtype)
    _check(xt, r64, rlp, dtype, "x_t")
    # without returning the noise: same x_t, empty noise
    xt2, nz2 = backend("q_sample_rng", x0.to(d), t.to(d), ABAR.to(d), key.to(d), False)
    assert nz2.numel() == 0 and nz2.dtype == dtype
    assert torch.equal(xt2.cpu(), xt.cpu())
    # the outputs keep the input's (canonical) layout
    assert xt.stride() == canonical(x0).stride() and nz.stride() == xt.stride()


# ----------------------------------------------------------------- loss ----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 1, 1, 1), (2, 3, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [0, 1, 2])
@pytest.mark.parametrize("noise_mode", ["tensor", "key"])
def test_diffusion_loss(backend, shape, dtype, target, noise_mode):
    _skip_big(backend, shape)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(shape, generator=g).to(dtype)
    out = torch.randn(shape, generator=g).to(dtype)
    t = _t(shape[0], g)
    w = torch.rand(shape[0], generator=g) + 0.5
    key = torch.tensor([42, 1 << 40], dtype=torch.int64)
    z = ref.noise_like(x0, key)
    d = backend.device
    noise = z.to(dtype).to(d) if noise_mode == "tensor" else None
    k = key.to(d) if noise_mode == "key" else None
    per, grad = backend("diffusion_loss", out.to(d), x0.to(d), t.to(d), ABAR.to(d), noise, k, w.to(d), target, True)
    zz = z.to(dtype).double() if noise_mode == "tensor" else z
    tname = ("epsilon", "sample", "v_prediction")[target]
    per64, g64 = ref.diffusion_loss(out.double(), x0.double(), t, ABAR, zz, w, tname)
    per_lp, g_lp = ref.diffusion_loss(out, x0, t, ABAR, zz.to(dtype), w, tname, compute_dtype=torch.float32
                                      if dtype == torch.float32 else dtype)
    assert per.dtype == torch.float32 and per.shape == (shape[0],)
    torch.testing.assert_close(per.cpu().double(), per64, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-6)
    _check(grad, g64, g_lp, dtype, "grad")
    per2, grad2 = backend("diffusion_loss", out.to(d), x0.to(d), t.to(d), ABAR.to(d), noise, k, w.to(d), target,
                          False)
    assert grad2.numel() == 0
    torch.testing.assert_close(per2.cpu(), per.cpu())


# ---------------------------------------------------------- reverse steps ---
CLIPS = [("none", 0.0), ("clip", 1.0), ("clip2", 2.0), ("thresh", 0.0)]


def _thresh(n, gen):
    return (torch.rand(n, generator=gen) * 2 + 1).to(torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", [0, 1, 2])
@pytest.mark.parametrize("var", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("clip", CLIPS, ids=[c[0] for c in CLIPS])
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "key"])
def test_ddpm_step(backend, pred, var, clip, noise_mode):
    shape = (4, 3, 5, 7)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g)
    o = torch.randn(shape, generator=g)
    mv = (torch.rand(shape, generator=g) * 2 - 1) if var == 5 else (torch.rand(shape, generator=g) * 0.02 + 1e-4)
    mv = mv if var >= 4 else None
    t = torch.tensor([0, 1, 500, 999])
    tp = torch.tensor([-1, 0, 480, 979])  # a respaced chain, and the final step
    th = _thresh(4, g) if clip[0] == "thresh" else None
    key = torch.tensor([7, 9], dtype=torch.int64)
    z = ref.noise_like(x, key)
    d = backend.device
    nz = z.float().to(d) if noise_mode == "tensor" else None
    k = key.to(d) if noise_mode == "key" else None
    prev, x0 = backend("ddpm_step", o.to(d), x.to(d), t.to(d), tp.to(d), ABAR.to(d),
                       None if mv is None else mv.to(d), nz, k, None if th is None else th.to(d), pred, var, clip[1])
    zr = None if noise_mode == "none" else (z.float().double() if noise_mode == "tensor" else z)
    vname = ref.VARIANCE_TYPES[var]
    p64, x064 = ref.ddpm_step(o.double(), x.double(), t, tp, ABAR, noise=zr,
                              model_var=None if mv is None else mv.double(),
                              prediction_type=ref.PREDICTION_TYPES[pred], variance_type=vname,
                              clip_range=clip[1], thresh=th)
    _check(x0, x064, x064, torch.float32, "pred_original_sample")
    _check(prev, p64, p64, torch.float32, "prev_sample")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("var", [0, 5])
def test_ddpm_step_low_precision(backend, dtype, var):
    shape = (3, 5, 7, 9)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).to(dtype)
    o = torch.randn(shape, generator=g).to(dtype)
    nz = torch.randn(shape, generator=g).to(dtype)
    mv = (torch.rand(shape, generator=g) * 2 - 1).to(dtype) if var == 5 else None
    t = torch.tensor([3, 400, 999])
    tp = t - 1
    d = backend.device
    prev, x0 = backend("ddpm_step", o.to(d), x.to(d), t.to(d), tp.to(d), ABAR.to(d),
                       None if mv is None else mv.to(d), nz.to(d), None, None, 0, var, 1.0)
    kw = dict(clip_range=1.0, variance_type=ref.VARIANCE_TYPES[var])
    p64, x064 = ref.ddpm_step(o.double(), x.double(), t, tp, ABAR, noise=nz.double(),
                              model_var=None if mv is None else mv.double(), **kw)
    # plain bf16/fp16 maths is NaN here (abar_3 rounds to 1 and 1 - abar_t to 0), so the
    # baseline is PyTorch upcasting to float32 and rounding once: a stricter bar.
    plp, x0lp = ref.ddpm_step(o, x, t, tp, ABAR, noise=nz, model_var=mv, compute_dtype=torch.float32, **kw)
    _check(prev, p64, plp, dtype, "prev_sample")
    _check(x0, x064, x0lp, dtype, "pred_original_sample")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", [0, 1, 2])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", CLIPS, ids=[c[0] for c in CLIPS])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("final", [1.0, 0.9999])
def test_ddim_step(backend, pred, eta, clip, use_clipped, final):
    shape = (4, 3, 5, 7)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=g)
    o = torch.randn(shape, generator=g)
    t = torch.tensor([20, 1, 500, 999])
    tp = torch.tensor([-1, 0, 480, 979])
    th = _thresh(4, g) if clip[0] == "thresh" else None
    key = torch.tensor([11, 0], dtype=torch.int64)
    z = ref.noise_like(x, key)
    d = backend.device
    prev, x0 = backend("ddim_step", o.to(d), x.to(d), t.to(d), tp.to(d), ABAR.to(d), None, key.to(d),
                       None if th is None else th.to(d), pred, clip[1], eta, final, use_clipped)
    p64, x064 = ref.ddim_step(o.double(), x.double(), t, tp, ABAR, noise=z, eta=eta,
                              prediction_type=ref.PREDICTION_TYPES[pred], clip_range=clip[1], thresh=th,
                              final_alpha_cumprod=final, use_clipped_model_output=use_clipped)
    _check(x0, x064, x064, torch.float32, "pred_original_sample")
    _check(prev, p64, p64, torch.float32, "prev_sample")


def _ddpm_call(backend, o, x, t, tp, mv, noise, key, th, pred, var, clip):
    d = backend.device
    return backend("ddpm_step", *[None if v is None else v.to(d) for v in (o, x, t, tp, ABAR, mv, noise, key, th)],
                   pred, var, clip)


def _ddim_call(backend, o, x, t, tp, noise, key, th, pred, clip, eta, final, use_clipped):
    d = backend.device
    return backend("ddim_step", *[None if v is None else v.to(d) for v in (o, x, t, tp, ABAR, noise, key, th)],
                   pred, clip, eta, final, use_clipped)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
def test_ddpm_step_layouts(backend, layout):
    """The sample in another layout than the model output (and model variance)."""
    shape = (4, 3, 5, 7)
    g = torch.Generator().manual_seed(4)
    x = _layout(torch.randn(shape, generator=g), layout)
    o = torch.randn(shape, generator=g)
    mv = torch.rand(shape, generator=g) * 2 - 1
    t, tp = torch.tensor([0, 1, 500, 999]), torch.tensor([-1, 0, 480, 979])
    key = torch.tensor([7, 9], dtype=torch.int64)
    prev, x0 = _ddpm_call(backend, o, x, t, tp, mv, None, key, None, 0, 5, 0.0)
    assert prev.stride() == canonical(x).stride()
    p64, x064 = ref.ddpm_step(o.double(), x.double(), t, tp, ABAR, noise=ref.noise_like(canonical(x), key),
                              model_var=mv.double(), variance_type="learned_range")
    _check(x0, x064, x064, torch.float32, "pred_original_sample")
    _check(prev, p64, p64, torch.float32, "prev_sample")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [("thresh+clip", 2.0), ("clip", 1.0), ("thresh", 0.0)], ids=lambda c: c[0])
@pytest.mark.parametrize("noise_mode", ["none", "tensor"])
def test_ddim_step_noise_and_threshold(backend, clip, noise_mode):
    """DDIM with no noise or a given noise tensor (key noise: test_ddim_step), and
    dynamic thresholding combined with a clip range; the DDPM step with both too."""
    shape = (4, 3, 5, 7)
    g = torch.Generator().manual_seed(6)
    x, o = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t, tp = torch.tensor([20, 1, 500, 999]), torch.tensor([-1, 0, 480, 979])
    th = _thresh(4, g) if clip[0].startswith("thresh") else None
    z = torch.randn(shape, generator=g) if noise_mode == "tensor" else None
    prev, x0 = _ddim_call(backend, o, x, t, tp, z, None, th, 2, clip[1], 0.5, 0.9999, True)
    p64, x064 = ref.ddim_step(o.double(), x.double(), t, tp, ABAR, noise=None if z is None else z.double(), eta=0.5,
                              prediction_type="v_prediction", clip_range=clip[1], thresh=th,
                              final_alpha_cumprod=0.9999, use_clipped_model_output=True)
    _check(x0, x064, x064, torch.float32, "ddim pred_original_sample")
    _check(prev, p64, p64, torch.float32, "ddim prev_sample")
    prev, x0 = _ddpm_call(backend, o, x, t, tp, None, z, None, th, 1, 0, clip[1])
    p64, x064 = ref.ddpm_step(o.double(), x.double(), t, tp, ABAR, noise=None if z is None else z.double(),
                              prediction_type="sample", clip_range=clip[1], thresh=th)
    _check(x0, x064, x064, torch.float32, "ddpm pred_original_sample")
    _check(prev, p64, p64, torch.float32, "ddpm prev_sample")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ddim_step_other_dtypes(backend, dtype):
    shape = (4, 3, 5, 7)
    g = torch.Generator().manual_seed(6)
    x, o, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    t, tp = torch.tensor([20, 1, 500, 999]), torch.tensor([-1, 0, 480, 979])
    prev, x0 = _ddim_call(backend, o, x, t, tp, z, None, None, 0, 1.0, 1.0, 0.9999, False)
    assert prev.dtype == dtype and x0.dtype == dtype
    kw = dict(eta=1.0, clip_range=1.0, final_alpha_cumprod=0.9999)
    p64, x064 = ref.ddim_step(o.double(), x.double(), t, tp, ABAR, noise=z.double(), **kw)
    plp, x0lp = ref.ddim_step(o, x, t, tp, ABAR, noise=z, compute_dtype=torch.float32, **kw)
    _check(prev, p64, plp, dtype, "prev_sample")
    _check(x0, x064, x0lp, dtype, "pred_original_sample")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_step_float64(backend):
    shape = (4, 3, 5, 7)
    g = torch.Generator().manual_seed(4)
    x, o, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    t, tp = torch.tensor([0, 1, 500, 999]), torch.tensor([-1, 0, 480, 979])
    prev, x0 = _ddpm_call(backend, o, x, t, tp, None, z, None, None, 2, 3, 1.0)
    assert prev.dtype == torch.float64
    p64, x064 = ref.ddpm_step(o, x, t, tp, ABAR, noise=z, prediction_type="v_prediction",
                              variance_type="fixed_large_log", clip_range=1.0)
    _check(x0, x064, None, torch.float64, "pred_original_sample")
    _check(prev, p64, None, torch.float64, "prev_sample")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_t_gives_nan_not_a_crash(backend):
    """Timesteps already on the device are not checked on the host; the
    kernels turn an out-of-range t (or t_prev) into NaN for that sample only."""
    d = backend.device
    x = torch.randn(5, 2, 3).to(d)
    t = torch.tensor([5, 1000, -3, 7, 4]).to(d)
    a = ABAR.to(d)
    key = torch.tensor([1, 2], dtype=torch.int64).to(d)
    bad = torch.tensor([False, True, True, False, False])

    def nan_where(out, mask):
        out = out.cpu()
        assert torch.isfinite(out[~mask]).all() and torch.isnan(out[mask]).all()

    nan_where(backend("q_sample", x, t, a, x), bad)
    nan_where(backend("q_sample_rng", x, t, a, key, False)[0], bad)
    for target in (0, 1, 2):
        per, grad = backend("diffusion_loss", x, x, t, a, None, key, torch.ones(5, device=d), target, True)
        nan_where(per, bad)
        nan_where(grad, bad)
    # t_prev: -1 is the end of the chain; < -1, >= T or >= t are invalid
    tp = torch.tensor([-1, 3, 2, 7, -2]).to(d)
    badp = torch.tensor([False, True, True, True, True])
    for pred in (0, 1, 2):
        prev, x0 = backend("ddpm_step", x, x, t, tp, a, None, None, key, None, pred, 0, 0.0)
        nan_where(prev, badp)
        assert torch.isnan(x0.cpu()[badp]).all()
        prev, x0 = backend("ddim_step", x, x, t, tp, a, None, key, None, pred, 0.0, 1.0, 1.0, False)
        nan_where(prev, badp)
        assert torch.isnan(x0.cpu()[badp]).all()
    # t_prev = T - 1 with t = T - 1: invalid (t_prev >= t); t_prev = T: invalid
    t2, tp2 = torch.tensor([999, 999]).to(d), torch.tensor([999, 1000]).to(d)
    prev, _ = backend("ddpm_step", x[:2], x[:2], t2, tp2, a, None, None, None, None, 0, 0, 0.0)
    assert torch.isnan(prev.cpu()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (3, 0, 4)])
def test_empty(backend, shape):
    """An empty batch, and samples with no elements: empty outputs (zero loss), no launch errors."""
    d = backend.device
    x = torch.randn(shape).to(d)
    t = torch.zeros(shape[0], dtype=torch.int64).to(d)
    a = ABAR.to(d)
    key = torch.tensor([1, 2], dtype=torch.int64).to(d)
    assert backend("q_sample", x, t, a, x).shape == x.shape
    xt, nz = backend("q_sample_rng", x, t, a, key, True)
    assert xt.shape == x.shape and nz.shape == x.shape
    per, grad = backend("diffusion_loss", x, x, t, a, x, None, torch.ones(shape[0], device=d), 0, True)
    assert per.shape == (shape[0],) and grad.shape == x.shape and (per == 0).all()
    prev, x0 = backend("ddpm_step", x, x, t, t - 1, a, None, None, key, None, 0, 0, 0.0)
    assert prev.shape == x.shape and x0.shape == x.shape
    prev, x0 = backend("ddim_step", x, x, t, t - 1, a, None, key, None, 0, 0.0, 1.0, 1.0, False)
    assert prev.shape == x.shape and x0.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_propagates(backend):
    """NaN in the data propagates elementwise (documented; inputs are not scanned)."""
    d = backend.device
    x = torch.randn(2, 3, 4)
    x[0, 1, 2] = float("nan")
    t = torch.tensor([3, 4])
    xt = backend("q_sample", x.to(d), t.to(d), ABAR.to(d), torch.randn(2, 3, 4).to(d)).cpu()
    assert torch.isnan(xt[0, 1, 2]) and torch.isnan(xt).sum() == 1
    prev, x0 = _ddpm_call(backend, x, x, t, t - 1, None, None, None, None, 0, 0, 1.0)
    assert torch.isnan(x0.cpu()).sum() == 1 and torch.isnan(prev.cpu()).sum() == 1


def test_nan_input_propagates_public():
    x = torch.randn(2, 3, 4)
    x[0, 1, 2] = float("nan")
    xt, _ = fastdiff.q_sample(x, torch.tensor([3, 4]), SCHED, torch.randn(2, 3, 4))
    assert torch.isnan(xt[0, 1, 2]) and torch.isfinite(xt[1]).all() and torch.isnan(xt).sum() == 1


def test_float64_cpu_matches_reference():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    o = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    n = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 999])
    prev, x0 = fastdiff.ddpm_step(o, t, x, SCHED, noise=n, variance_type="fixed_large")
    p64, _ = ref.ddpm_step(o, x, t, t - 1, ABAR, noise=n, variance_type="fixed_large")
    torch.testing.assert_close(prev, p64, rtol=1e-12, atol=1e-12)
