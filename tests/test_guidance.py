"""Classifier-free guidance fused into the step ops (ddpm_step, ddim_step,
multistep_step) and the fused schedulers.

* every backend on this machine against the float64 reference
  (fastdiff/reference/guidance.py + the step maths), odd shapes, layouts,
  float32/float16/bfloat16, with and without the rescale factor;
* the public functions against "combine in torch, then the unguided step"
  (diffusers' way), bounded by that path's own error against float64;
* guidance_scale = 1 is exactly the unguided step; bad arguments name
  themselves; opcheck and torch.compile;
* the oracle: class-conditional Gaussian data, where the exact conditional
  and unconditional eps are closed-form. With a Gaussian unconditional the
  guided eps is affine in x, so the guided DDPM/DDIM chain is an affine
  Gaussian chain whose exact moments we propagate in float64; the fused chain's
  sample moments must match them within a few standard errors. With the true
  (mixture) marginal as the unconditional the chain is not Gaussian; there the
  fused chain is compared with the same chain run by the float64 reference on
  the same noise, and at w = 1 it must reproduce the conditional chain's exact
  moments.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import fastdiff
from fastdiff import reference as ref
from fastdiff.reference import multistep as refm
from fastdiff.ops._schemas import op

from _backends import all_backends
from _backends import check_vs_reference as _check, in_layout as _layout, skip_big as _skip_big

BACKENDS = all_backends()
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one intra-op thread is faster on a busy CPU
SCHED = fastdiff.NoiseSchedule.make("linear", 1000)
ABAR = SCHED.alphas_cumprod


# ------------------------------------------------------------ op parity -----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stepper", ["ddpm", "ddim"])
@pytest.mark.parametrize("pred", [0, 1, 2])
@pytest.mark.parametrize("w,rescale", [(0.0, False), (4.5, False), (7.5, True)], ids=["w0", "w4.5", "w7.5-rescale"])
def test_guided_step_matches_float64(backend, stepper, pred, w, rescale):
    shape = (4, 3, 5, 7)
    g = torch.Generator().manual_seed(21 + pred)
    x, c, u = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    tp = torch.tensor([-1, 0, 480, 979])
    f = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5) if rescale else None
    key = torch.tensor([7, 9], dtype=torch.int64)
    z = ref.noise_like(x, key)
    d = backend.device
    dev = lambda v: None if v is None else v.to(d)  # noqa: E731
    g64 = ref.guided_output(c.double(), u.double(), w, f)
    if stepper == "ddpm":
        prev, x0 = backend("ddpm_step", c.to(d), x.to(d), t.to(d), tp.to(d), ABAR.to(d), None, None, key.to(d),
                           None, pred, 0, 0.0, u.to(d), w, dev(f))
        p64, x064 = ref.ddpm_step(g64, x.double(), t, tp, ABAR, noise=z, prediction_type=ref.PREDICTION_TYPES[pred])
    else:
        prev, x0 = backend("ddim_step", c.to(d), x.to(d), t.to(d), tp.to(d), ABAR.to(d), None, key.to(d), None, pred,
                           0.0, 0.5, 1.0, False, u.to(d), w, dev(f))
        p64, x064 = ref.ddim_step(g64, x.double(), t, tp, ABAR, noise=z, eta=0.5,
                                  prediction_type=ref.PREDICTION_TYPES[pred])
    _check(x0, x064, x064, torch.float32, "pred_original_sample")
    _check(prev, p64, p64, torch.float32, "prev_sample")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stepper", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [((3, 5, 7, 9), "channels_last"), ((2, 3, 5), "noncontig"),
                                          ((1, 1, 1, 1), "contiguous"), ((5, 7), "contiguous")])
def test_guided_step_dtypes_shapes_layouts(backend, stepper, dtype, shape, layout):
    _skip_big(backend, shape)
    g = torch.Generator().manual_seed(31)
    x, c, u, nz = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    t = torch.randint(3, 1000, (shape[0],), generator=g)
    tp = t - 1
    w = 3.0
    f = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5
    d = backend.device
    cl, ul, xl = (_layout(v, layout).to(d) for v in (c, u, x))
    if stepper == "ddpm":
        prev, x0 = backend("ddpm_step", cl, xl, t.to(d), tp.to(d), ABAR.to(d), None, nz.to(d), None, None, 0, 0,
                           1.0, ul, w, f.to(d))

        def refstep(o, xx, cd):
            return ref.ddpm_step(o, xx, t, tp, ABAR, noise=nz, clip_range=1.0, compute_dtype=cd)
    else:
        prev, x0 = backend("ddim_step", cl, xl, t.to(d), tp.to(d), ABAR.to(d), nz.to(d), None, None, 2, 1.0, 1.0,
                           1.0, False, ul, w, f.to(d))

        def refstep(o, xx, cd):
            return ref.ddim_step(o, xx, t, tp, ABAR, noise=nz, eta=1.0, prediction_type="v_prediction",
                                 clip_range=1.0, compute_dtype=cd)
    assert prev.dtype == dtype and prev.shape == shape
    p64, x064 = refstep(ref.guided_output(c, u, w, f), x.double(), torch.float64)
    # plain PyTorch at float32 (bf16/fp16 maths in place would be NaN at these t), rounded to dtype once
    glp = ref.guided_output(c, u, w, f, compute_dtype=torch.float32)
    plp, x0lp = refstep(glp, x, torch.float32)
    _check(prev, p64, plp, dtype, f"{stepper} prev_sample")
    _check(x0, x064, x0lp, dtype, f"{stepper} pred_original_sample")
    if layout == "channels_last":
        assert prev.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rescale", [False, True])
def test_guided_multistep_matches_float64(backend, dtype, rescale):
    shape = (3, 2, 5, 3)
    g = torch.Generator().manual_seed(41)
    K = 2
    row = torch.tensor([0.3, -0.7, 1.0, 0.0, 0.4, 0.2, -0.1, 0.0, 0.8, 0.25, 0.1, -0.3, 0.05, 0.0, 0.0, 1.0],
                       dtype=torch.float64)
    tab = row.reshape(1, 16)
    H = torch.randn((K,) + shape, generator=g).to(dtype)
    x, c, u = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    f = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5) if rescale else None
    w = 5.0
    d = backend.device
    si = torch.zeros((), dtype=torch.int64, device=d)
    Hd = H.clone().to(d)
    prev, x0 = backend("multistep_step", c.to(d), x.to(d), Hd, torch.empty(0, dtype=dtype, device=d), tab.to(d), si,
                       None, None, None, 0.0, True, u.to(d), w, None if f is None else f.to(d))
    p64, x064, h64, _ = refm.multistep_step(ref.guided_output(c, u, w, f), x.double(), H.double(), None, row, 0)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    scale = max(1.0, float(p64.abs().max()))
    assert float((prev.cpu().double() - p64).abs().max()) <= tol * scale
    assert float((x0.cpu().double() - x064).abs().max()) <= tol * max(1.0, float(x064.abs().max()))
    assert float((Hd[0].cpu().double() - h64[0]).abs().max()) <= tol * max(1.0, float(x064.abs().max()))
    assert int(si) == 1


# -------------------------------------------------- the public functions -----
def _torch_then_step(fn, c, u, w, phi, **kw):
    """diffusers' way: the combine (and rescale, as diffusers' ``rescale_noise_cfg`` writes it) as separate
    torch passes in the data dtype, then the step."""
    gd = u + w * (c - u)
    if phi:
        dims = list(range(1, c.ndim))
        rescaled = gd * (c.std(dim=dims, keepdim=True) / gd.std(dim=dims, keepdim=True))
        gd = phi * rescaled + (1 - phi) * gd
    return fn(gd, **kw)


@pytest.mark.parametrize("stepper", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("phi", [0.0, 0.7])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_public_matches_combine_then_step(stepper, dtype, phi, pred):
    shape = (4, 4, 9, 11)
    g = torch.Generator().manual_seed(51)
    x, c, u, nz = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    t = torch.tensor([999, 640, 200, 7])
    w = 6.0
    fn = fastdiff.ddpm_step if stepper == "ddpm" else fastdiff.ddim_step
    kw = dict(t=t, sample=x, schedule=SCHED, prediction_type=pred, noise=nz)
    if stepper == "ddim":
        kw["eta"] = 1.0
    ours, ours_x0 = fn(c, uncond_output=u, guidance_scale=w, guidance_rescale=phi, **kw)
    theirs, _ = _torch_then_step(lambda m, **k: fn(m, **k), c, u, w, phi, **kw)
    # float64 truth: the reference combine (+ rescale) and the float64 step
    g64 = ref.classifier_free_guidance(c, u, w, phi)
    kw64 = dict(kw, sample=x.double(), noise=nz.double())
    truth, truth_x0 = fn(g64, **kw64)
    e_ours = float((ours.double() - truth).abs().max())
    e_theirs = float((theirs.double() - truth).abs().max())
    floor = torch.finfo(dtype).eps * max(1.0, float(truth.abs().max()))
    assert e_ours <= 2 * e_theirs + floor, (e_ours, e_theirs)
    assert float((ours_x0.double() - truth_x0).abs().max()) <= 2e-5 * max(1.0, float(truth_x0.abs().max())) \
        if dtype == torch.float32 else True


@pytest.mark.parametrize("stepper", ["ddpm", "ddim"])
def test_scale_one_is_the_unguided_step(stepper):
    shape = (3, 4, 6, 5)
    g = torch.Generator().manual_seed(61)
    x, c, u = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([900, 400, 20])
    key = torch.tensor([3, 4], dtype=torch.int64)
    fn = fastdiff.ddpm_step if stepper == "ddpm" else fastdiff.ddim_step
    kw = dict(key=key) if stepper == "ddpm" else dict(eta=0.3, key=key)
    a = fn(c, t, x, SCHED, uncond_output=u, guidance_scale=1.0, **kw)
    b = fn(c, t, x, SCHED, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the kernel itself, handed u with w = 1: c + 0 * (c - u) is c exactly
    tt, tp = t, t - 1
    if stepper == "ddpm":
        k = op("ddpm_step")(c, x, tt, tp, ABAR, None, None, key, None, 0, 0, 0.0, u, 1.0, None)
    else:
        k = op("ddim_step")(c, x, tt, tp, ABAR, None, key, None, 0, 0.0, 0.3, 1.0, False, u, 1.0, None)
    assert torch.equal(k[0], b[0])
    # and rescale at w = 1 is a no-op up to the std ratio's rounding
    r = fn(c, t, x, SCHED, uncond_output=u, guidance_scale=1.0, guidance_rescale=0.5, **kw)
    torch.testing.assert_close(r[0], b[0], rtol=1e-6, atol=1e-6)


def test_learned_variance_uses_the_conditional_variance():
    shape = (2, 3, 4, 4)
    g = torch.Generator().manual_seed(71)
    x = torch.randn(shape, generator=g)
    c = torch.randn((2, 6, 4, 4), generator=g)
    u = torch.randn((2, 6, 4, 4), generator=g)
    nz = torch.randn(shape, generator=g)
    t = torch.tensor([500, 30])
    ours, _ = fastdiff.ddpm_step(c, t, x, SCHED, variance_type="learned_range", noise=nz, uncond_output=u,
                                 guidance_scale=3.0)
    ge = u[:, :3] + 3.0 * (c[:, :3] - u[:, :3])
    want, _ = fastdiff.ddpm_step(torch.cat([ge, c[:, 3:]], 1), t, x, SCHED, variance_type="learned_range", noise=nz)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_thresholding_uses_the_guided_prediction():
    shape = (3, 2, 8, 8)
    g = torch.Generator().manual_seed(81)
    x, c, u = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([10, 300, 800])
    kw = dict(thresholding=True, sample_max_value=2.5, key=torch.tensor([1, 2]), prediction_type="sample")
    ours = fastdiff.ddpm_step(c, t, x, SCHED, uncond_output=u, guidance_scale=4.0, **kw)
    want = fastdiff.ddpm_step(u + 4.0 * (c - u), t, x, SCHED, **kw)
    torch.testing.assert_close(ours[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], want[1], rtol=1e-5, atol=1e-5)


def test_rescale_factor_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(91)
    c, u = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    for w, phi in ((7.5, 0.7), (2.0, 1.0), (0.0, 0.3)):
        theirs = rescale_noise_cfg(u + w * (c - u), c, guidance_rescale=phi)
        torch.testing.assert_close(ref.classifier_free_guidance(c, u, w, phi), theirs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fastdiff.ops.classifier_free_guidance(c, u, w, phi), theirs, rtol=1e-12,
                                   atol=1e-12)


def test_zero_std_guided_output_has_factor_one():
    c = torch.ones(2, 3, 4)
    u = torch.ones(2, 3, 4) * 2  # g = c + (w-1)(c-u) is constant: std 0
    out = ref.classifier_free_guidance(c, u, 3.0, 0.7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, (u + 3.0 * (c - u)).double())


# --------------------------------------------------------- bad arguments -----
@pytest.mark.parametrize("stepper", ["ddpm", "ddim"])
@pytest.mark.parametrize("kw,exc,name", [
    (dict(uncond_output=torch.zeros(2, 3, 4, 5)), ValueError, "uncond_output"),
    (dict(uncond_output=torch.zeros(2, 3, 4, 4, dtype=torch.float64)), TypeError, "uncond_output"),
    (dict(uncond_output=torch.zeros(2, 3, 4, 4, device="meta")), ValueError, "uncond_output"),
    (dict(uncond_output=[1.0]), TypeError, "uncond_output"),
    (dict(uncond_output=torch.zeros(2, 3, 4, 4), guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(uncond_output=torch.zeros(2, 3, 4, 4), guidance_scale=float("inf")), ValueError, "guidance_scale"),
    (dict(uncond_output=torch.zeros(2, 3, 4, 4), guidance_scale="7"), TypeError, "guidance_scale"),
    (dict(uncond_output=torch.zeros(2, 3, 4, 4), guidance_scale=True), TypeError, "guidance_scale"),
    (dict(guidance_scale=7.5), ValueError, "guidance_scale"),
    (dict(guidance_rescale=0.5), ValueError, "guidance_rescale"),
    (dict(uncond_output=torch.zeros(2, 3, 4, 4), guidance_scale=2.0, guidance_rescale=1.5), ValueError,
     "guidance_rescale"),
])
def test_bad_guidance_arguments_name_themselves(stepper, kw, exc, name):
    fn = fastdiff.ddpm_step if stepper == "ddpm" else fastdiff.ddim_step
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(exc, match=name):
        fn(torch.randn(2, 3, 4, 4), 10, x, SCHED, **kw)


def test_bad_guidance_arguments_multistep():
    x = torch.randn(2, 3, 4)
    H = torch.zeros((1,) + x.shape)
    tab = torch.zeros(1, 16, dtype=torch.float64)
    tab[0, 8] = 1.0
    si = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="uncond_output"):
        fastdiff.multistep_step(x, x, H, x.new_empty(0), tab, si, uncond_output=torch.zeros(2, 3, 5),
                                guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        fastdiff.multistep_step(x, x, H, x.new_empty(0), tab, si, guidance_scale=2.0)
    assert int(si) == 0


def test_direct_op_call_checks_guidance_arguments():
    x = torch.randn(2, 3, 4)
    t = torch.tensor([5, 6])
    with pytest.raises(ValueError, match="uncond_output"):
        op("ddpm_step")(x, x, t, t - 1, ABAR, None, None, None, None, 0, 0, 0.0, torch.zeros(2, 3), 2.0, None)
    with pytest.raises(TypeError, match="guidance_factor"):
        op("ddim_step")(x, x, t, t - 1, ABAR, None, None, None, 0, 0.0, 0.0, 1.0, False, x, 2.0,
                        torch.ones(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="guidance_scale"):
        op("ddim_step")(x, x, t, t - 1, ABAR, None, None, None, 0, 0.0, 0.0, 1.0, False, x, float("nan"), None)


# ------------------------------------------------- opcheck, torch.compile -----
def test_opcheck_guided_steps():
    x, c, u = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    t = torch.tensor([50, 7])
    f = torch.tensor([0.9, 1.1], dtype=torch.float64)
    key = torch.tensor([1, 2])
    torch.library.opcheck(op("ddpm_step"), (c, x, t, t - 1, ABAR, None, None, key, None, 0, 0, 0.0, u, 3.0, f))
    torch.library.opcheck(op("ddim_step"), (c, x, t, t - 1, ABAR, None, None, None, 1, 0.0, 0.0, 1.0, False, u, 3.0,
                                            None))


def test_compile_guided_step_fullgraph_no_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()

    def one(x, t, key):
        c, u = x * 0.5, x * 0.25
        return fastdiff.ddpm_step(c, t, x, SCHED, key=key, uncond_output=u, guidance_scale=5.0,
                                  guidance_rescale=0.7)[0]

    cnt = CompileCounter()
    f = torch.compile(one, backend=cnt, fullgraph=True)
    x = torch.randn(2, 3, 4, 4)
    for t in (999, 500, 3):
        tt = torch.full((2,), t)
        k = torch.tensor([1, t])
        torch.testing.assert_close(f(x, tt, k), one(x, tt, k), rtol=1e-5, atol=1e-5)
    assert cnt.frame_count == 1


# ------------------------------------------------------------ schedulers -----
def test_fused_ddpm_ddim_schedulers_take_the_pair():
    from fastdiff.diffusion import FusedDDIMScheduler, FusedDDPMScheduler

    g = torch.Generator().manual_seed(101)
    x, c, u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for cls in (FusedDDPMScheduler, FusedDDIMScheduler):
        s = cls(num_train_timesteps=1000)
        s.set_timesteps(20)
        t = s.timesteps[3]
        key = torch.tensor([5, 6])
        a = s.step(c, t, x, key=key, uncond_output=u, guidance_scale=7.5, guidance_rescale=0.5).prev_sample
        gd = ref.classifier_free_guidance(c, u, 7.5, 0.5).float()
        b = s.step(gd, t, x, key=key).prev_sample
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["FusedDPMSolverMultistepScheduler", "FusedUniPCMultistepScheduler",
                                  "FusedEulerDiscreteScheduler", "FusedEulerAncestralDiscreteScheduler",
                                  "FusedFlowMatchEulerDiscreteScheduler"])
def test_multistep_schedulers_take_the_pair(name):
    import fastdiff.diffusion as fd

    cls = getattr(fd, name)
    g = torch.Generator().manual_seed(111)
    x = torch.randn(2, 3, 6, 6, generator=g)
    a_s, b_s = cls(), cls()
    for s in (a_s, b_s):
        s.set_timesteps(6)
    xa, xb = x.clone(), x.clone()
    for i, t in enumerate(a_s.timesteps[:4]):
        c = torch.randn(x.shape, generator=g)
        u = torch.randn(x.shape, generator=g)
        kw = {}
        if "Ancestral" in name:
            kw = dict(key=torch.tensor([9, i]))
        xa = a_s.step(c, t, xa, uncond_output=u, guidance_scale=4.0, **kw)[0]
        xb = b_s.step((u + 4.0 * (c - u)), t, xb, **kw)[0]
        torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- the oracle -----
# Per element, x0 | y ~ N(mu_y, s_y^2); classes y in {0, 1} with prior p_y.
MU = (1.5, -0.8)
SD = (0.5, 0.9)
PRIOR = (0.4, 0.6)
# the moment-matched Gaussian of the marginal (the "Gaussian unconditional")
MU_U = sum(p * m for p, m in zip(PRIOR, MU))
VAR_U = sum(p * (s * s + m * m) for p, m, s in zip(PRIOR, MU, SD)) - MU_U ** 2


def _eps_gauss(x, ab, mu, var):
    """Exact eps for x0 ~ N(mu, var): sqrt(1-ab)(x - sqrt(ab) mu)/(ab var + 1 - ab). ab per sample (N, 1...)."""
    return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * var + 1 - ab)


def _eps_mixture(x, ab):
    """Exact eps for the marginal mixture sum_y p_y N(mu_y, s_y^2): -sqrt(1-ab) * score."""
    logs, terms = [], []
    for p, m, s in zip(PRIOR, MU, SD):
        v = ab * s * s + 1 - ab
        d = x - ab.sqrt() * m
        logs.append(math.log(p) - 0.5 * torch.log(v) - 0.5 * d * d / v)
        terms.append(d / v)
    lw = torch.stack(logs)
    r = torch.softmax(lw, 0)
    return (1 - ab).sqrt() * (r * torch.stack(terms)).sum(0)


def _chain(n_steps):
    ts = torch.linspace(999, 0, n_steps).round().long()
    tps = torch.cat([ts[1:], torch.tensor([-1])])
    return ts, tps


def _predictions(x, t, y, uncond):
    ab = ABAR[t].reshape((-1,) + (1,) * (x.dim() - 1)).to(torch.float64)
    mu = torch.tensor(MU, dtype=torch.float64)[y].reshape(ab.shape)
    var = torch.tensor([s * s for s in SD], dtype=torch.float64)[y].reshape(ab.shape)
    xd = x.double()
    c = _eps_gauss(xd, ab, mu, var)
    u = _eps_gauss(xd, ab, MU_U, VAR_U) if uncond == "gauss" else _eps_mixture(xd, ab)
    return c, u


def _run_fused(stepper, x, y, w, n_steps, uncond, gen):
    ts, tps = _chain(n_steps)
    for t, tp in zip(ts.tolist(), tps.tolist()):
        n = x.shape[0]
        c, u = _predictions(x, torch.full((n,), t), y, uncond)
        z = torch.randn(x.shape, generator=gen)
        kw = dict(t_prev=tp, noise=z, uncond_output=u.float(), guidance_scale=w)
        if stepper == "ddpm":
            x = fastdiff.ddpm_step(c.float(), t, x, SCHED, **kw)[0]
        else:
            x = fastdiff.ddim_step(c.float(), t, x, SCHED, eta=1.0 if stepper == "ddim-eta1" else 0.0, **kw)[0]
    return x


def _run_reference(stepper, x, y, w, n_steps, uncond, gen):
    """The same chain in float64 with the reference maths and the same noise draws."""
    ts, tps = _chain(n_steps)
    x = x.double()
    for t, tp in zip(ts.tolist(), tps.tolist()):
        n = x.shape[0]
        tt, tpp = torch.full((n,), t), torch.full((n,), tp)
        c, u = _predictions(x, tt, y, uncond)
        z = torch.randn(x.shape, generator=gen).double()
        gd = ref.guided_output(c, u, w)
        if stepper == "ddpm":
            x = ref.ddpm_step(gd, x, tt, tpp, ABAR, noise=z)[0]
        else:
            x = ref.ddim_step(gd, x, tt, tpp, ABAR, noise=z, eta=1.0 if stepper == "ddim-eta1" else 0.0)[0]
    return x


@functools.lru_cache(maxsize=None)
def _exact_moments(stepper, w, n_steps):
    """{class: (mean, variance)} of the affine Gaussian chain driven by the guided eps with the Gaussian
    unconditional, propagated exactly in float64. The affine map of each step is read off the reference
    step itself (it is affine in x when eps is): prev = a x + b + sd z, probed at (x, z) = (0, 0), (1, 0),
    (0, 1) for both classes in one call."""
    ts, tps = _chain(n_steps)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    xp = torch.tensor([0.0, 1.0, 0.0] * 2, dtype=torch.float64).reshape(6, 1)
    zp = torch.tensor([0.0, 0.0, 1.0] * 2, dtype=torch.float64).reshape(6, 1)
    m, v = [0.0, 0.0], [1.0, 1.0]
    for t, tp in zip(ts.tolist(), tps.tolist()):
        tt, tpp = torch.full((6,), t), torch.full((6,), tp)
        c, u = _predictions(xp, tt, y, "gauss")
        gd = ref.guided_output(c, u, w)
        if stepper == "ddpm":
            out = ref.ddpm_step(gd, xp, tt, tpp, ABAR, noise=zp)[0]
        else:
            out = ref.ddim_step(gd, xp, tt, tpp, ABAR, noise=zp, eta=1.0 if stepper == "ddim-eta1" else 0.0)[0]
        out = out.reshape(-1).tolist()
        for k in (0, 1):
            b = out[3 * k]
            a, sd = out[3 * k + 1] - b, out[3 * k + 2] - b
            m[k], v[k] = a * m[k] + b, a * a * v[k] + sd * sd
    return {0: (m[0], v[0]), 1: (m[1], v[1])}


def _class_moments(x, y, yv):
    s = x[y == yv].double().reshape(-1)
    return s.mean().item(), s.var().item(), s.numel()


ORACLE_N, ORACLE_STEPS = 64, 40      # 64 x 768 elements: 24576 i.i.d. draws per class
MIX_SHAPE = (32, 3, 8, 8)             # 3072 per class: the float64 reference chain is the slow side


def _start(seed, shape=(ORACLE_N, 3, 16, 16)):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(shape[0]) % 2
    x = torch.randn(shape, generator=gen)
    return gen, y, x


@pytest.mark.parametrize("stepper", ["ddpm", "ddim", "ddim-eta1"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_oracle_gaussian_unconditional_exact_chain_moments(stepper, w):
    gen, y, x = _start(1234)
    out = _run_fused(stepper, x, y, w, ORACLE_STEPS, "gauss", gen)
    assert torch.isfinite(out).all()
    for yv in (0, 1):
        mean, var, n = _class_moments(out, y, yv)
        em, ev = _exact_moments(stepper, w, ORACLE_STEPS)[yv]
        se_m = math.sqrt(ev / n)
        se_v = ev * math.sqrt(2.0 / (n - 1))
        # elements of one sample are i.i.d. here (per-element data, i.i.d. noise and start): 5 SE is a
        # false-alarm rate below 1e-6 per check
        assert abs(mean - em) <= 5 * se_m, (stepper, w, yv, mean, em, se_m)
        assert abs(var - ev) <= 5 * se_v, (stepper, w, yv, var, ev, se_v)
        if w == 1.0:
            # w = 1 is the conditional chain: its exact moments approach the class's data distribution as
            # the chain refines (40 steps carry a finite-step bias; the full 1000-step chain ends within 3%)
            fm, fv = _exact_moments(stepper, 1.0, 1000)[yv]
            assert abs(fm - MU[yv]) < 0.01 * abs(MU[yv]) and abs(fv - SD[yv] ** 2) < 0.03 * SD[yv] ** 2, (fm, fv)


@pytest.mark.parametrize("stepper", ["ddpm", "ddim"])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_oracle_mixture_unconditional_matches_float64_chain(stepper, w):
    gen, y, x = _start(4321, MIX_SHAPE)
    out = _run_fused(stepper, x, y, w, ORACLE_STEPS, "mixture", gen)
    gen2, _, x2 = _start(4321, MIX_SHAPE)
    want = _run_reference(stepper, x2, y, w, ORACLE_STEPS, "mixture", gen2)
    for yv in (0, 1):
        mean, var, n = _class_moments(out, y, yv)
        rm, rv, _ = _class_moments(want, y, yv)
        assert abs(mean - rm) <= 5 * math.sqrt(rv / n) and abs(var - rv) <= 5 * rv * math.sqrt(2.0 / (n - 1))
        if w == 1.0:  # guided == conditional exactly: the affine conditional chain's exact moments
            em, ev = _exact_moments(stepper, 1.0, ORACLE_STEPS)[yv]
            assert abs(mean - em) <= 5 * math.sqrt(ev / n) and abs(var - ev) <= 5 * ev * math.sqrt(2.0 / (n - 1))
    # the same noise drives both chains: the float32 fused chain tracks the float64 one per element
    assert float((out.double() - want).abs().max()) < 1e-3
