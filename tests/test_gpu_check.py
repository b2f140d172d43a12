"""The GPU check (benchmarks/gpu_check.sh, stage "correctness"): every GPU
path against the float64 reference, at real shapes, in about two minutes.

On a GPU these tests run at the shapes U-Nets use. Without one they are
skipped (marker ``gpu``), except under ``FASTDIFF_REHEARSE=1`` (what
``gpu_check.sh --rehearse`` sets): then they run on the CPU at tiny shapes,
the Triton kernels under the interpreter, so that the check's own code is
exercised by CI. The few tests that only mean something on a GPU (sync debug
mode, the 2^32-word noise sweep, the sanitizer-free NaN scan at 2^28
elements) skip in the rehearsal with a message.

Error rule (as the rest of the suite): float32 within a few 1e-5 of the
float64 reference relative to the output's magnitude; float16/bfloat16 no
worse than twice plain PyTorch's own error at that dtype plus one epsilon.
Lines starting with ``GPU-CHECK-NOTE`` are copied into the check's JSON summary.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time

import torch

HAS_CUDA = torch.cuda.is_available()
REHEARSE = os.environ.get("FASTDIFF_REHEARSE") == "1"
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import NoiseSchedule  # noqa: E402
from fastdiff.ops import _backend  # noqa: E402
from fastdiff.reference import blocks as refb  # noqa: E402
from fastdiff.reference import diffusion as ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.rehearse]
DEV = "cuda" if HAS_CUDA else "cpu"
LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True, scope="module")
def _rehearsal_one_thread():
    """The rehearsal's tiny shapes run faster (and steadier on a shared CI
    machine) on one intra-op thread."""
    before = torch.get_num_threads()
    if not HAS_CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def big(gpu, cpu):
    """The GPU value, or the rehearsal's tiny one."""
    return gpu if HAS_CUDA else cpu


def note(msg: str) -> None:
    print(f"GPU-CHECK-NOTE {msg}", flush=True)


def gpu_only(why: str):
    if not HAS_CUDA:
        pytest.skip(f"rehearsal: {why} needs a GPU")


def _gpu_backends():
    """The GPU backends of this installation (the rehearsal: Triton interpreted)."""
    out = []
    if HAS_CUDA and _backend.has_cuda_extension():
        out.append("cuda")
    if _backend.triton_module() is not None:
        out.append("triton")
    return out


def _kernel(opname, backend):
    if not HAS_CUDA:  # rehearsal: the Triton launcher itself, on CPU tensors under the interpreter
        return getattr(_backend.triton_module(), opname)
    return _backend.cuda_kernel(opname, backend)


def _err(x, ref64):
    return float((x.detach().double() - ref64.to(x.device)).abs().max())


def _check(got, ref64, dtype, what, lowp=None, fp32_tol=3e-5):
    assert tuple(got.shape) == tuple(ref64.shape), what
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    scale = max(1.0, float(ref64.abs().max()))
    err = _err(got, ref64)
    if dtype in (torch.float32, torch.float64):
        assert err <= fp32_tol * scale, f"{what}: {dtype} error {err:.3g} (scale {scale:.3g})"
    else:
        base = _err(lowp, ref64)
        assert err <= 2 * base + torch.finfo(dtype).eps * scale, f"{what}: {dtype} error {err:.3g} vs torch {base:.3g}"


# --------------------------------------------------------- elementwise ops --
SCHED = NoiseSchedule.make("linear", 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", _gpu_backends())
def test_fused_ops_each_backend(backend, dtype):
    """q_sample, q_sample_rng, the loss, ddpm_step, ddim_step on one GPU
    backend at a real shape (odd per-sample size: no 4-alignment)."""
    shape = big((64, 3, 67, 61), (3, 2, 5, 3))
    g = torch.Generator().manual_seed(0)
    x0, out, nz = (torch.randn(shape, generator=g).to(DEV, dtype) for _ in range(3))
    N = shape[0]
    t = torch.randint(0, 1000, (N,), generator=g).to(DEV)
    tp = torch.clamp(t - 7, min=-1)
    ab = SCHED.alphas_cumprod.to(DEV)
    key = torch.tensor([1234, 5], dtype=torch.int64, device=DEV)
    x64, o64, n64 = x0.double(), out.double(), nz.double()
    low = lambda r: r.to(dtype).double() if dtype != torch.float32 else None  # noqa: E731

    xt = _kernel("q_sample", backend)(x0, t, ab, nz)
    r = ref.q_sample(x64, t, ab, n64)
    _check(xt, r, dtype, "q_sample", low(r), 2e-6)
    xt, noise = _kernel("q_sample_rng", backend)(x0, t, ab, key, True)
    assert bool(torch.isfinite(noise).all())
    r = ref.q_sample(x64, t, ab, noise.double())
    _check(xt, r, dtype, "q_sample_rng", low(r), 2e-6)
    w = torch.ones(N, device=DEV)
    loss, grad = _kernel("diffusion_loss", backend)(out, x0, t, ab, nz, None, w, 0, True)
    diff = o64 - n64
    M = diff[0].numel()
    _check(loss, diff.pow(2).flatten(1).mean(1), torch.float32, "loss", fp32_tol=1e-5)
    # the gradient 2 (out - noise) / M, compared at the scale of out - noise
    _check(grad.double() * (M / 2), diff, dtype, "loss grad",
           None if dtype == torch.float32 else (2 * (out - nz) / M).double() * (M / 2), 2e-6)
    # the recomputing backward (key-driven default on a GPU): grad_loss * the same gradient, from the key
    gl = torch.linspace(0.5, 2.0, N, device=DEV)
    gk = _kernel("diffusion_loss_backward", backend)(gl, out, x0, t, ab, None, key, w, 0)
    _, gs = _kernel("diffusion_loss", backend)(out, x0, t, ab, None, key, w, 0, True)
    _check(gk.double() * (M / 2), (gs.double() * gl.double().reshape(-1, 1, 1, 1)) * (M / 2), dtype,
           "loss backward (key)", None if dtype == torch.float32 else (gs.double() * gl.double().reshape(
               -1, 1, 1, 1)).to(dtype).double() * (M / 2), 2e-6)
    prev, x0h = _kernel("ddpm_step", backend)(out, x0, t, tp, ab, None, nz, None, None, 0, 0, 0.0)
    rp, rx = ref.ddpm_step(o64, x64, t, tp, ab, n64)
    _check(prev, rp, dtype, "ddpm_step", low(rp))
    prev, x0h = _kernel("ddim_step", backend)(out, x0, t, tp, ab, nz, None, None, 2, 0.0, 0.5, 1.0, False)
    rp, rx = ref.ddim_step(o64, x64, t, tp, ab, n64, 0.5, "v_prediction")
    _check(prev, rp, dtype, "ddim_step", low(rp))
    _check(x0h, rx, dtype, "ddim x0", low(rx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", _gpu_backends())
def test_guided_steps_each_backend(backend, dtype):
    """Classifier-free guidance fused into ddpm_step, ddim_step (with the rescale factor) and multistep_step
    on one GPU backend at a real shape (odd per-sample size), against float64."""
    from fastdiff.reference import guided_output
    from fastdiff.reference import multistep as refm

    shape = big((32, 4, 67, 61), (3, 2, 5, 3))
    g = torch.Generator().manual_seed(1)
    c, u, x, nz = (torch.randn(shape, generator=g).to(DEV, dtype) for _ in range(4))
    N = shape[0]
    t = torch.randint(1, 1000, (N,), generator=g).to(DEV)
    tp = torch.clamp(t - 20, min=-1)
    ab = SCHED.alphas_cumprod.to(DEV)
    f = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(DEV)
    w = 7.5
    low = lambda r: r.to(dtype).double() if dtype != torch.float32 else None  # noqa: E731
    g64 = guided_output(c, u, w).to(DEV)
    prev, _ = _kernel("ddpm_step", backend)(c, x, t, tp, ab, None, nz, None, None, 0, 0, 0.0, u, w, None)
    rp, _ = ref.ddpm_step(g64, x.double(), t, tp, ab, nz.double())
    _check(prev, rp, dtype, "guided ddpm_step", low(rp))
    gf64 = guided_output(c, u, w, f).to(DEV)
    prev, x0h = _kernel("ddim_step", backend)(c, x, t, tp, ab, nz, None, None, 2, 0.0, 0.5, 1.0, False, u, w, f)
    rp, rx = ref.ddim_step(gf64, x.double(), t, tp, ab, nz.double(), 0.5, "v_prediction")
    _check(prev, rp, dtype, "guided+rescaled ddim_step", low(rp))
    _check(x0h, rx, dtype, "guided ddim x0", low(rx))
    row = torch.tensor([0.5, -0.4, 0, 0, 0, 0, 0, 0, 0.9, 0.2, 0.3, -0.25, 0, 0, 0, 1], dtype=torch.float64)
    H = torch.randn((1,) + shape, generator=g).to(DEV, dtype)
    H0 = H.clone()
    si = torch.zeros((), dtype=torch.int64, device=DEV)
    prev, _ = _kernel("multistep_step", backend)(c, x, H, x.new_empty(0), row.reshape(1, 16).to(DEV), si, None,
                                                 None, None, 0.0, False, u, w, f)
    rp, _, _, _ = refm.multistep_step(gf64, x.double(), H0.double(), None, row, 0)
    _check(prev, rp, dtype, "guided multistep_step", low(rp))
    assert int(si) == 1


# ----------------------------------------------------------- GroupNorm ------
# A covering set: every (variant, dtype) pair once, every (variant, layout) and (layout, dtype) pair.
GN_VARIANTS = ("plain", "add", "scale_shift", "add+scale_shift")
GN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GN_CASES = [(v, d, ("NCHW", "NHWC")[(i + j) % 2]) for i, v in enumerate(GN_VARIANTS) for j, d in enumerate(GN_DTYPES)]
GN_SHAPES = big([(8, 256, 32, 32), (16, 128, 33, 17), (2, 512, 16, 16), (1, 128, 512, 512)], [(2, 8, 3, 5), (1, 4, 7, 2)])


def _gn_inputs(shape, groups, dtype, variant, layout, seed):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    x = x.to(DEV).contiguous(memory_format=torch.channels_last if layout == "NHWC" else torch.contiguous_format)
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(DEV)
    b = (0.1 * torch.randn(C, generator=g)).to(DEV)
    add = (torch.randn(N, C, generator=g)).to(DEV) if "add" in variant else None
    sc = (0.2 * torch.randn(N, C, generator=g)).to(DEV) if "scale_shift" in variant else None
    sh = (0.2 * torch.randn(N, C, generator=g)).to(DEV) if "scale_shift" in variant else None
    gy = torch.randn(shape, generator=g).to(dtype).to(DEV)
    return x, w, b, add, sc, sh, gy


def _gn_eager(x, groups, w, b, add, sc, sh, silu=True):
    """Plain PyTorch at the input's dtype: the low-precision yardstick."""
    h = x + add[:, :, None, None].to(x.dtype) if add is not None else x
    z = F.group_norm(h, groups, w.to(x.dtype), b.to(x.dtype), 1e-5)
    if sc is not None:
        z = z * (1 + sc[:, :, None, None].to(x.dtype)) + sh[:, :, None, None].to(x.dtype)
    return F.silu(z) if silu else z


@pytest.mark.parametrize("variant,dtype,layout", GN_CASES, ids=[f"{v}-{str(d)[6:]}-{l}" for v, d, l in GN_CASES])
@pytest.mark.parametrize("backend", _gpu_backends())
def test_group_norm_forward_backward(backend, variant, dtype, layout):
    idx = GN_CASES.index((variant, dtype, layout))
    shape = GN_SHAPES[idx % len(GN_SHAPES)]
    if shape[2] >= 512 and dtype != torch.float32 and variant != "plain":
        shape = GN_SHAPES[0]  # the VAE-sized case once per dtype is enough
    groups = big(32, 2)
    x, w, b, add, sc, sh, gy = _gn_inputs(shape, groups, dtype, variant, layout, idx)
    fwd = _kernel("group_norm_act", backend)
    bwd = _kernel("group_norm_act_backward", backend)
    y, mean, rstd = fwd(x, w, b, add, sc, sh, groups, 1e-5, True)
    if layout == "NHWC":
        assert y.is_contiguous(memory_format=torch.channels_last)  # the layout that was read
    d = lambda v: None if v is None else v.double()  # noqa: E731
    x64 = x.double()
    y64, m64, r64 = refb.group_norm_act(x64, d(w), d(b), d(add), d(sc), d(sh), groups, 1e-5, True)
    eager = _gn_eager(x, groups, w, b, add, sc, sh) if dtype != torch.float32 else None
    _check(y, y64, dtype, f"{backend} y", eager, 5e-5)
    _check(mean, m64, torch.float32, "mean", fp32_tol=2e-5)
    _check(rstd, r64, torch.float32, "rstd", fp32_tol=5e-5)
    grads = bwd(gy, x, w, b, add, sc, sh, mean, rstd, groups, True)
    g64 = refb.group_norm_act_backward(gy.double(), x64, d(w), d(b), d(add), d(sc), d(sh), m64, r64,
                                       groups, True)
    if dtype != torch.float32:  # plain torch autograd at the dtype
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, add, sc, sh)]
        _gn_eager(leaves[0], groups, *leaves[1:]).backward(gy)
        lowp = [t.grad if t is not None else None for t in leaves]
    for i, (got, r) in enumerate(zip(grads, g64)):
        if r is None or got.numel() == 0:
            continue
        name = ("dx", "dweight", "dbias", "dadd", "dscale", "dshift")[i]
        big_red = i in (1, 2)  # sums over N * spatial: float32 accumulation error grows with the count
        if got.dtype == torch.float32 or dtype == torch.float32:
            _check(got, r, torch.float32, f"{backend} {name}", fp32_tol=2e-4 if big_red else 5e-5)
        else:
            _check(got, r, dtype, f"{backend} {name}", lowp[i])


SPLIT_CASES = [((1, 128, 512, 512), torch.bfloat16, "NHWC", "add_scale_shift"),
               ((2, 64, 96, 80), torch.float32, "NCHW", "add")]


@pytest.mark.parametrize("shape,dtype,layout,variant", SPLIT_CASES, ids=["vae-bf16-NHWC", "fp32-NCHW"])
def test_triton_group_norm_split(shape, dtype, layout, variant):
    """The Triton split forward and backward (partials per chunk, combine, apply) at real
    shapes, as chosen by default (1x128x512x512 with 32 groups: 32 programs,
    split on any GPU with more than 32 SMs) and forced into 7 chunks, against
    the float64 reference."""
    tm = _backend.triton_module()
    if tm is None:
        pytest.skip("Triton is not installed")
    from fastdiff.triton import group_norm as tgn
    shape = shape if HAS_CUDA else (1, 4, 7, 5)
    groups = big(32, 2)
    x, w, b, add, sc, sh, gy = _gn_inputs(shape, groups, dtype, variant, layout, 7)
    N, C = shape[:2]
    S = x.numel() // (N * C)
    sms = tgn._sm_count(x.device)
    plan = tgn.split_plan(N, groups, C // groups, S, layout == "NHWC", False, sms)
    note(f"Triton GroupNorm split plan for {shape} G={groups} on {sms} SMs: {plan}")
    d = lambda v: None if v is None else v.double()  # noqa: E731
    y64, m64, r64 = refb.group_norm_act(x.double(), d(w), d(b), d(add), d(sc), d(sh), groups, 1e-5, True)
    eager = _gn_eager(x, groups, w, b, add, sc, sh) if dtype != torch.float32 else None
    lowp = None
    if dtype != torch.float32:  # plain torch autograd at the dtype: the low-precision yardstick
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, add, sc, sh)]
        _gn_eager(leaves[0], groups, *leaves[1:]).backward(gy)
        lowp = [t.grad if t is not None else None for t in leaves]
    g64 = refb.group_norm_act_backward(gy.double(), x.double(), d(w), d(b), d(add), d(sc), d(sh), m64, r64,
                                       groups, True)
    for split in (None, 7):
        y, mean, rstd = tm.group_norm_act(x, w, b, add, sc, sh, groups, 1e-5, True, split=split)
        if layout == "NHWC":
            assert y.is_contiguous(memory_format=torch.channels_last)
        _check(y, y64, dtype, f"split={split} y", eager, 5e-5)
        _check(mean, m64, torch.float32, f"split={split} mean", fp32_tol=2e-5)
        _check(rstd, r64, torch.float32, f"split={split} rstd", fp32_tol=5e-5)
        grads = tm.group_norm_act_backward(gy, x, w, b, add, sc, sh, mean, rstd, groups, True, split=split)
        for i, (got, r) in enumerate(zip(grads, g64)):
            if r is None or got.numel() == 0:
                continue
            name = f"split={split} " + ("dx", "dweight", "dbias", "dadd", "dscale", "dshift")[i]
            if got.dtype == torch.float32:
                _check(got, r, torch.float32, name, fp32_tol=2e-4 if i in (1, 2) else 5e-5)
            else:
                _check(got, r, dtype, name, lowp[i])


def test_cuda_group_norm_alignment():
    """The CUDA GroupNorm takes a vectorised path for 16-byte aligned
    pointers and a scalar one otherwise, with different summation orders: a
    misaligned view of the same values must agree to float32 rounding
    (reported: whether the bits are equal too)."""
    gpu_only("the CUDA GroupNorm")
    if not _backend.has_cuda_extension():
        pytest.skip("the CUDA extension is not built")
    fwd = _kernel("group_norm_act", "cuda")
    shape = (4, 128, 33, 31)
    x = torch.randn(shape, device=DEV) * 3 + 1
    buf = torch.empty(x.numel() + 1, device=DEV)
    xm = buf[1:].view(shape)
    xm.copy_(x)
    w, b = torch.randn(128, device=DEV), torch.randn(128, device=DEV)
    ya, ma, ra = fwd(x, w, b, None, None, None, 32, 1e-5, True)
    yb, mb, rb = fwd(xm, w, b, None, None, None, 32, 1e-5, True)
    note(f"CUDA GroupNorm aligned vs misaligned view: bitwise equal {bool(torch.equal(ya, yb))}, "
         f"max |dy| {float((ya - yb).abs().max()):.3g}")
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mb, ma, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rb, ra, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- attention ----
ATT_CASES = big([(64, torch.bfloat16), (128, torch.float16), (256, torch.bfloat16), (512, torch.bfloat16),
                 (512, torch.float16), (64, torch.float32)],
                [(16, torch.float32), (40, torch.bfloat16)])


@pytest.mark.parametrize("D,dtype", ATT_CASES, ids=[f"D{d}-{str(t)[6:]}" for d, t in ATT_CASES])
def test_attention_forward_backward(D, dtype):
    """Self-attention read from a strided (B, L, 3, H, D) projection and
    cross-attention to a short context, forward and backward, against the
    float64 oracle (fp32: the fused kernel forced, it is not the default)."""
    ft = _backend.triton_module()
    if ft is None:
        pytest.skip("no Triton")
    for B, H, Lq, Lk in (big((2, max(1, 512 // D), 1024, 1024), (1, 2, 9, 9)), big((2, 2, 4096, 12), (1, 1, 7, 3))):
        g = torch.Generator().manual_seed(D)
        if Lq == Lk:  # views of one projection: odd strides
            t = torch.randn(B, Lq, 3, H, D, generator=g).to(dtype).to(DEV)
            q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))
        else:
            q = torch.randn(B, H, Lq, D, generator=g).to(dtype).to(DEV)
            kv = torch.randn(B, Lk, 2, H, D, generator=g).to(dtype).to(DEV)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        do = torch.randn(B, H, Lq, D, generator=g).to(dtype).to(DEV)
        scale = 1 / math.sqrt(D)
        out, lse = ft.attention(q, k, v, scale)
        dq, dk, dv = ft.attention_backward(do, q, k, v, out, lse, scale)
        q64, k64, v64, do64 = (a.double() for a in (q, k, v, do))  # the oracle on the device
        o64, l64 = refb.attention(q64, k64, v64, scale)
        g64 = refb.attention_backward(do64, q64, k64, v64, o64, l64, scale)
        lowp = [None] * 4
        if dtype != torch.float32:
            qq, kk, vv = (a.detach().clone().requires_grad_(True) for a in (q, k, v))
            eo = torch.softmax((qq @ kk.transpose(-1, -2)) * scale, dim=-1) @ vv
            eo.backward(do)
            lowp = [eo.detach(), qq.grad, kk.grad, vv.grad]
        for got, r, e, nm in zip((out, dq, dk, dv), (o64, *g64), lowp, ("out", "dq", "dk", "dv")):
            _check(got, r, dtype, f"D={D} L={Lq}x{Lk} {nm}", e, 5e-5)


# ---------------------------------------------------------- patch() --------
diffusers = None


def _diffusers():
    global diffusers
    diffusers = pytest.importorskip("diffusers")
    return diffusers


def _randomize_(m, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def _models():
    """(name, builder, inputs) of the three diffusers models patch() targets."""
    df = _diffusers()
    res, ch, gr = big(32, 8), big((64, 128), (8, 16)), big(32, 4)

    def unet2d():
        return df.UNet2DModel(sample_size=res, in_channels=3, out_channels=3, block_out_channels=ch,
                              layers_per_block=1, norm_num_groups=gr,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=big(64, 8))

    def unet_cond():
        return df.UNet2DConditionModel(sample_size=res, in_channels=4, out_channels=4, block_out_channels=ch,
                                       layers_per_block=1, norm_num_groups=gr,
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                       cross_attention_dim=big(128, 8), attention_head_dim=big(32, 4))

    def vae():
        return df.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=ch, layers_per_block=1,
                                norm_num_groups=gr, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)

    n = big(4, 2)
    g = torch.Generator().manual_seed(3)
    x3 = torch.randn(n, 3, res, res, generator=g)
    x4 = torch.randn(n, 4, res, res, generator=g)
    t = torch.tensor([10, 900, 400, 1][:n])
    ctx = torch.randn(n, big(13, 5), big(128, 8), generator=g)
    return [("UNet2DModel", unet2d, lambda m, dt: m(x3.to(DEV, dt), t.to(DEV)).sample),
            ("UNet2DConditionModel", unet_cond,
             lambda m, dt: m(x4.to(DEV, dt), t.to(DEV), encoder_hidden_states=ctx.to(DEV, dt)).sample),
            ("AutoencoderKL", vae, lambda m, dt: m(x3.to(DEV, dt), sample_posterior=False).sample)]


def _out_and_grads(model, fwd, dtype):
    model.zero_grad()
    y = fwd(model, dtype)
    y.float().square().mean().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach().double(), grads


PATCH_CASES = [(w, d) for w in ("UNet2DModel", "UNet2DConditionModel", "AutoencoderKL")
               for d in (torch.float32, torch.bfloat16)
               if HAS_CUDA or d == torch.float32 or w == "UNet2DModel"]  # the rehearsal: bf16 once


@pytest.mark.parametrize("which,dtype", PATCH_CASES, ids=[f"{w}-{str(d)[6:]}" for w, d in PATCH_CASES])
def test_patch_diffusers_models(which, dtype):
    """patch() against the unpatched model: outputs and parameter gradients.
    fp32: to float32 rounding. bf16: the fp32 unpatched model is the truth,
    and the patched bf16 model must be no further from it than the
    unpatched bf16 model is (twice its error, plus a bf16 epsilon)."""
    from fastdiff import nn as fnn

    name, build, fwd = next(m for m in _models() if m[0] == which)
    torch.manual_seed(0)
    base = _randomize_(build()).to(DEV).eval()
    y32, g32 = _out_and_grads(base, fwd, torch.float32)
    if dtype == torch.float32:
        report = fnn.patch(base)
        assert sum(report.counts.values()) > 0, report
        y, g = _out_and_grads(base, fwd, torch.float32)
        _check(y.float(), y32, torch.float32, f"{name} out", fp32_tol=2e-4)
        gs = max(float(v.abs().max()) for v in g32.values())
        for k in g32:
            err = float((g[k] - g32[k]).abs().max())
            assert err <= 2e-3 * gs, f"{name} grad {k}: {err:.3g} (scale {gs:.3g})"
        return
    low = base.to(dtype)
    yl, gl = _out_and_grads(low, fwd, dtype)
    fnn.patch(low)
    yp, gp = _out_and_grads(low, fwd, dtype)
    e_out, e_base = _err(yp, y32), _err(yl, y32)
    scale = max(1.0, float(y32.abs().max()))
    note(f"patch {name} bf16: out error {e_out:.3g} vs unpatched bf16 {e_base:.3g}")
    assert e_out <= 2 * e_base + 2 ** -7 * scale, f"{name} out: {e_out:.3g} vs unpatched bf16 {e_base:.3g}"
    # gradients: the whole vector's relative L2 error (single entries of a bf16 gradient are noisy)
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    r, a, b = flat(g32), flat(gp), flat(gl)
    ea, eb = float((a - r).norm() / r.norm()), float((b - r).norm() / r.norm())
    assert ea <= 2 * eb + 2 ** -7, f"{name} grads: relative L2 error {ea:.3g} vs unpatched bf16 {eb:.3g}"


# ------------------------------------------- sampling, training, compile ----
def _unet_diffusion(T=100):
    from fastdiff.diffusion import GaussianDiffusion
    from fastdiff.nn import UNet

    torch.manual_seed(0)
    # the rehearsal: one resolution level (still GroupNorm+SiLU, time embedding, attention)
    model = UNet.from_preset("tiny", **({} if HAS_CUDA else dict(ch_mult=(1,), attn_resolutions=(16,))))
    return GaussianDiffusion(model, "linear", num_timesteps=T, sample_shape=(3, 16, 16)).to(DEV)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_cuda_graph_sampling_matches_eager(method):
    """The U-Net (GroupNorm + attention kernels) inside one captured step."""
    gpu_only("CUDA-graph capture")
    import warnings

    diff = _unet_diffusion()
    kw = dict(steps=20, method=method, eta=1.0 if method == "ddim" else 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and falls back: fail instead
        a = diff.sample(8, cuda_graph=True, generator=torch.Generator(DEV).manual_seed(0), **kw)
    b = diff.sample(8, cuda_graph=False, generator=torch.Generator(DEV).manual_seed(0), **kw)
    assert bool(torch.isfinite(a).all())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compiled_training_step_no_graph_break():
    """torch.compile(fullgraph=True) of the training loss (U-Net with fused
    GroupNorm/attention + q_sample + the fused loss): one graph, the same loss
    and gradients as eager. Inductor on the GPU; the rehearsal uses
    aot_eager (the same tracing, without a C++/Triton code-generation wait)."""
    import torch._dynamo

    diff = _unet_diffusion(1000)
    x0 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEV)
    t = torch.tensor([3, 500, 999, 42], device=DEV)

    torch._dynamo.reset()
    counter = {"graphs": 0}

    def backend(gm, example_inputs):
        counter["graphs"] += 1
        if HAS_CUDA:
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    compiled = torch.compile(lambda x, tt: diff(x, t=tt, check_finite=False), backend=backend, fullgraph=True)
    torch.manual_seed(5)
    t0 = time.perf_counter()
    with torch._inductor.config.patch(fallback_random=True):  # the noise key drawn as eager draws it
        lc = compiled(x0, t)
    lc.backward()
    gc = [p.grad.clone() for p in diff.parameters() if p.grad is not None]
    note(f"compiled training step (first call, {'inductor' if HAS_CUDA else 'aot_eager'}): "
         f"{time.perf_counter() - t0:.1f} s, {counter['graphs']} graph(s)")
    diff.zero_grad()
    torch.manual_seed(5)
    le = diff(x0, t=t, check_finite=False)
    le.backward()
    ge = [p.grad.clone() for p in diff.parameters() if p.grad is not None]
    assert counter["graphs"] == 1
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    # a new timestep batch does not recompile
    with torch._inductor.config.patch(fallback_random=True):
        compiled(x0, torch.tensor([1, 2, 3, 4], device=DEV)).backward()
    assert counter["graphs"] == 1


def test_graph_training_step_matches_eager_without_syncs(tmp_path):
    """TrainConfig(step_mode="graph"): the whole training step (draws, U-Net forward with the fused kernels,
    fused loss, backward, clipping, capturable fused AdamW with the device lr, EMA) captured in one CUDA graph
    matches the eager step over 20 steps (losses, grad norms, parameters, EMA), and the replays between log
    intervals never synchronise (sync debug mode "error"). More in tests/test_train_step.py (gpu marker)."""
    gpu_only("CUDA-graph capture of the training step")
    import warnings

    from fastdiff.data import load_dataset
    from fastdiff.train import TrainConfig, Trainer

    data = load_dataset("digits", image_size=16, n=256)
    data.data = data.data.expand(-1, 3, -1, -1).contiguous()  # the tiny preset takes RGB

    def run(mode, steps=20, log_every=5):
        c = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=5, lr_schedule="cosine", log_every=log_every,
                        checkpoint_every=0, num_samples=0, progress=False, out_dir=str(tmp_path / mode), device=DEV,
                        precision="bf16", channels_last=True, step_mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback
            tr = Trainer(_unet_diffusion(1000), data, c)
        t0 = time.perf_counter()
        h = tr.train()["history"]
        return tr, h, time.perf_counter() - t0

    g, hg, tg = run("graph")
    e, he, te = run("eager")
    assert isinstance(g._step_runner._graph, torch.cuda.CUDAGraph)  # captured, no fallback
    note(f"training step graph vs eager, tiny U-Net b32 bf16: 20 steps {tg:.2f} s vs {te:.2f} s (with set-up)")
    lg, le = torch.tensor([r["loss"] for r in hg]), torch.tensor([r["loss"] for r in he])
    torch.testing.assert_close(lg, le, rtol=2e-2, atol=2e-3)
    for a, b in zip(list(g.model.parameters()) + list(g.ema.model.parameters()),
                    list(e.model.parameters()) + list(e.ema.model.parameters())):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    # no synchronisation between log intervals: replays under sync debug mode "error"
    assert g._device_data is not None  # "auto": the 256 digits live on the GPU
    x = g._device_data.batch(g.stream.indices(0, 32))
    g.train_step(x)  # the batch's first use (its gather ran above, outside the checked region)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            g.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert g._first_bad_step() is None


def test_first_step_compile_time_ddpm_cifar10():
    """Reported, not asserted: the first forward+backward of the
    ddpm-cifar10 U-Net under bf16 autocast compiles the Triton kernels it
    uses (cold cache on a fresh machine); the second step shows the steady
    state. Counts the compiled variants of fastdiff's Triton kernels."""
    gpu_only("the first-step compile time")
    from fastdiff.nn import UNet

    model = UNet.from_preset("ddpm-cifar10").to(DEV).to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 32, 32, device=DEV).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (32,), device=DEV)
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            y = model(x, t)
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    note(f"ddpm-cifar10 bf16 channels_last fwd+bwd: first step {times[0]:.1f} s, second {times[1] * 1e3:.1f} ms, "
         f"{_compiled_kernel_variants()} compiled fastdiff Triton kernel variants")


def _compiled_kernel_variants() -> int:
    import importlib

    n = 0
    for m in ("q_sample", "loss", "step", "group_norm", "attention"):
        mod = importlib.import_module(f"fastdiff.triton.{m}")
        for name, k in vars(mod).items():
            caches = getattr(k, "device_caches", None) if name.endswith("_kernel") else None
            if isinstance(caches, dict):
                for v in caches.values():
                    n += len(v[0]) if isinstance(v, tuple) and isinstance(v[0], dict) else 0
    return n


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_one_process_nccl(tmp_path):
    """A one-process NCCL group (gloo in the rehearsal): the Trainer's
    cross-rank reductions (loss, divergence check) go through the backend."""
    import torch.distributed as dist
    from fastdiff.train import Trainer, TrainConfig

    backend = "nccl" if HAS_CUDA else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        diff = _unet_diffusion(1000)
        data = torch.randn(16, 3, 16, 16)
        cfg = TrainConfig(steps=4, batch_size=4, log_every=2, checkpoint_every=0, num_samples=0, progress=False,
                          out_dir=str(tmp_path), device=DEV, precision="bf16" if HAS_CUDA else "fp32",
                          channels_last=HAS_CUDA)
        tr = Trainer(diff, data, cfg)
        summary = tr.train()
        assert summary["steps"] == 4 and math.isfinite(summary["final_loss"])
        assert dist.get_backend() == backend
        tr.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_no_host_sync_in_sampling_and_training_step(tmp_path):
    """torch.cuda.set_sync_debug_mode("error") around a sampling loop and a
    Trainer step: any synchronising call fails. (The CUDA-graph sampler is
    left out: ``torch.cuda.graph`` itself synchronises before a capture.)"""
    gpu_only("torch.cuda.set_sync_debug_mode")
    from fastdiff.train import Trainer, TrainConfig

    diff = _unet_diffusion(1000)
    gen = torch.Generator(DEV).manual_seed(0)
    diff.sample(2, steps=3, method="ddim", generator=gen, cuda_graph=False)  # warm-up: compile, allocate
    cfg = TrainConfig(steps=2, batch_size=4, log_every=1000, checkpoint_every=0, num_samples=0, progress=False,
                      out_dir=str(tmp_path), device=DEV, precision="bf16")
    tr = Trainer(diff, torch.randn(8, 3, 16, 16), cfg)
    tr.train()  # warm-up, and sets up the device-side accumulators
    x0 = torch.randn(4, 3, 16, 16, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        diff.sample(2, steps=5, method="ddim", eta=1.0, generator=gen, cuda_graph=False)
        diff.sample(2, steps=5, method="ddpm", generator=gen, cuda_graph=False)
        tr._train_step(x0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# --------------------------------------------------------------- noise ------
def test_cuda_box_muller_all_uniform_words():
    """Every one of the 2^32 values of the uniform's input word through the
    CUDA Box-Muller: no NaN, log(u) never > 0, and the radius sqrt(-2 ln u)
    within float32 rounding of float64 (the old __logf gave NaN or an error
    of ~1e-3 for u just below 1)."""
    gpu_only("the CUDA generator")
    if not _backend.has_cuda_extension():
        pytest.skip("the CUDA extension is not built")
    import fastdiff._C as C

    t0 = time.perf_counter()
    bad, worst_abs, worst_rel = 0, 0.0, 0.0
    step = 1 << 30
    for start in range(0, 1 << 32, step):
        b, a, r = C.box_muller_radius_check_cuda(start, step, torch.cuda.current_device())
        bad, worst_abs, worst_rel = bad + b, max(worst_abs, a), max(worst_rel, r)
    note(f"CUDA Box-Muller over 2^32 words: {bad} bad, max abs radius error {worst_abs:.3g}, "
         f"max rel {worst_rel:.3g} ({time.perf_counter() - t0:.1f} s)")
    assert bad == 0
    assert worst_abs <= 2e-6 and worst_rel <= 5e-7


@pytest.mark.parametrize("backend", _gpu_backends())
def test_q_sample_rng_nan_scan(backend):
    """In-kernel noise at a large size (2^28 draws on the GPU): all finite,
    and the standard moments of N(0, 1)."""
    n = big(1 << 28, 1 << 12)
    x0 = torch.zeros(big(1 << 12, 4), n // big(1 << 12, 4), device=DEV)
    t = torch.full((x0.shape[0],), 999, device=DEV)
    ab = SCHED.alphas_cumprod.to(DEV)
    key = torch.tensor([2026, 12], dtype=torch.int64, device=DEV)
    _, noise = _kernel("q_sample_rng", backend)(x0, t, ab, key, True)
    nonfinite = int((~torch.isfinite(noise)).sum())
    mean, var = float(noise.double().mean()), float(noise.double().var())
    note(f"q_sample_rng {backend}: {n} draws, {nonfinite} non-finite, mean {mean:.2e}, var {var:.6f}")
    assert nonfinite == 0
    assert abs(mean) < 6 / math.sqrt(n) and abs(var - 1) < 6 * math.sqrt(2 / n)
