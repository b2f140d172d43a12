"""Fused attention: the Triton kernels (fastdiff.triton.attention) and the
public ``fastdiff.attention``, against the float64 oracle of
fastdiff/reference/blocks.py and PyTorch's scaled_dot_product_attention.

Without a GPU the Triton kernels run under the Triton interpreter on CPU
tensors: small shapes, and tiny blocks forced through the launchers' block_m /
block_n keywords so that the loops run several blocks and hit the tail masks.
float16/bfloat16 follow the flash-attention rule: the error against float64
may be at most 2x that of the same maths in plain PyTorch at that dtype, plus
one rounding unit.
"""
from __future__ import annotations

import importlib
import math
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.ops._schemas import op  # noqa: E402
from fastdiff.reference import blocks as refb  # noqa: E402

from _backends import all_backends  # noqa: E402

pytest.importorskip("triton")
# the module (fastdiff.triton re-exports its function under the same name)
A = importlib.import_module("fastdiff.triton.attention")

DEV = "cuda" if HAS_CUDA else "cpu"
LOWP = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------- inputs ---
def _inputs(B, H, Lq, Lk, D, dtype, layout="contiguous", seed=0):
    """q (B, H, Lq, D), k, v (B, H, Lk, D) as the layouts a model produces, plus
    grad_out. Every layout but "contiguous" gives views with odd strides."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEV)

    if layout == "contiguous":
        q, k, v = rnd(B, H, Lq, D), rnd(B, H, Lk, D), rnd(B, H, Lk, D)
    elif layout == "qkv_linear":  # one (B, L, 3, H, D) linear projection, self-attention
        assert Lq == Lk
        t = rnd(B, Lq, 3, H, D)
        q, k, v = (t[:, :, i].transpose(1, 2) for i in range(3))
    elif layout == "qkv_conv":  # one (B, 3*H*D, L) 1x1-conv output of an (H*W)-pixel feature map
        assert Lq == Lk
        t = rnd(B, 3 * H * D, Lq)
        q, k, v = (t[:, i * H * D:(i + 1) * H * D].unflatten(1, (H, D)).transpose(-1, -2) for i in range(3))
    elif layout == "cross":  # q (B, Lq, H, D); k, v from one (B, Lk, 2, H, D) context projection
        q = rnd(B, Lq, H, D).transpose(1, 2)
        t = rnd(B, Lk, 2, H, D)
        k, v = t[:, :, 0].transpose(1, 2), t[:, :, 1].transpose(1, 2)
    else:
        raise ValueError(layout)
    do = rnd(B, Lq, H, D).transpose(1, 2)  # grad_out, non-contiguous too
    return q, k, v, do


def _oracle(q, k, v, do, scale):
    """float64 (out, lse, dq, dk, dv) of the (already rounded) inputs."""
    q, k, v, do = (t.detach().cpu().double() for t in (q, k, v, do))
    out, lse = refb.attention(q, k, v, scale)
    return (out, lse) + tuple(refb.attention_backward(do, q, k, v, out, lse, scale))


def _torch_grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of fn(q, k, v) by PyTorch autograd, at the inputs' dtype."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _eager(scale):
    return lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _sdpa(scale):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)


def _err(x, ref64):
    return (x.detach().cpu().double() - ref64).abs().max().item()


def _check(got, ref64, dtype, what, lowp_ref=None):
    """fp32: 2e-5 relative to max(1, |ref|); fp16/bf16: 2x plain-PyTorch's error + one eps."""
    assert tuple(got.shape) == tuple(ref64.shape), what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(1.0, ref64.abs().max().item())
    err = _err(got, ref64)
    if dtype == torch.float32:
        assert err <= 2e-5 * scale, f"{what}: fp32 error {err:.3g} (scale {scale:.3g})"
    else:
        base = _err(lowp_ref, ref64)
        floor = torch.finfo(dtype).eps * scale
        assert err <= 2 * base + floor, f"{what}: {dtype} error {err:.3g} vs plain-torch {base:.3g}"


def _check_layouts(out, lse, grads, q, k, v):
    """out/dq/dk/dv logical (B, H, L, D) stored (B, L, H, D); lse float32 contiguous."""
    assert out.dtype == q.dtype and out.transpose(1, 2).is_contiguous()
    assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3]
    for g, like in zip(grads, (q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype and g.transpose(1, 2).is_contiguous()


def _run(q, k, v, do, scale, blocks=(None, None)):
    bm, bn = blocks
    out, lse = A.attention(q, k, v, scale, block_m=bm, block_n=bn)
    grads = A.attention_backward(do, q, k, v, out, lse, scale, block_m=bm, block_n=bn)
    return out, lse, grads


# ------------------------------------------------------- Triton kernels ---
# (B, H, Lq, Lk, D, layout, (block_m, block_n)): odd lengths, Lk != Lq both
# ways, head dims that are not powers of two, several blocks per loop + tails
FP32_CASES = [
    (1, 1, 1, 1, 8, "contiguous", (None, None)),
    (2, 2, 7, 7, 8, "qkv_linear", (16, 16)),
    (1, 2, 33, 33, 40, "qkv_conv", (16, 16)),
    (2, 1, 33, 77, 64, "cross", (16, 32)),  # cross-attention to a 77-token context
    (1, 2, 48, 7, 64, "cross", (16, 16)),
    (1, 1, 20, 20, 96, "qkv_linear", (16, 16)),
    (1, 1, 17, 9, 256, "cross", (16, 16)),
    (1, 1, 5, 3, 512, "contiguous", (None, None)),
]


@pytest.mark.parametrize("case", FP32_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}")
def test_triton_fp32_matches_oracle_and_sdpa(case):
    B, H, Lq, Lk, D, layout, blocks = case
    q, k, v, do = _inputs(B, H, Lq, Lk, D, torch.float32, layout)
    scale = 1.0 / math.sqrt(D)
    out, lse, grads = _run(q, k, v, do, scale, blocks)
    _check_layouts(out, lse, grads, q, k, v)
    o64, lse64, *g64 = _oracle(q, k, v, do, scale)
    _check(out, o64, torch.float32, "out")
    _check(lse, lse64, torch.float32, "lse")
    for g, r, nm in zip(grads, g64, ("dq", "dk", "dv")):
        _check(g, r, torch.float32, nm)
    # and PyTorch's own SDPA, forward and backward
    so, *sg = _torch_grads(_sdpa(scale), q, k, v, do)
    torch.testing.assert_close(out, so, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, sg):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


LOWP_CASES = [
    (1, 2, 33, 20, 40, "cross", (16, 16)),
    (2, 1, 24, 24, 64, "qkv_conv", (16, 16)),
    (1, 1, 9, 9, 256, "qkv_linear", (None, None)),
]


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", LOWP_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}")
def test_triton_lowp_flash_rule(case, dtype):
    B, H, Lq, Lk, D, layout, blocks = case
    q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype, layout, seed=1)
    scale = 1.0 / math.sqrt(D)
    out, lse, grads = _run(q, k, v, do, scale, blocks)
    _check_layouts(out, lse, grads, q, k, v)
    o64, lse64, *g64 = _oracle(q, k, v, do, scale)
    eo, *eg = _torch_grads(_eager(scale), q, k, v, do)
    _check(out, o64, dtype, "out", eo)
    # lse: fp32 scores of exactly-representable products, so fp32-accurate
    assert _err(lse, lse64) <= 1e-5 * max(1.0, lse64.abs().max().item())
    for g, r, e, nm in zip(grads, g64, eg, ("dq", "dk", "dv")):
        _check(g, r, dtype, nm, e)
    # and PyTorch's SDPA at the same dtype (on CPU it keeps p in fp32, so it is
    # the stricter yardstick; rounding p to the input dtype is what GPU flash kernels do)
    so, *sg = _torch_grads(_sdpa(scale), q, k, v, do)
    for x, s, r, nm in zip((out, *grads), (so, *sg), (o64, *g64), ("out", "dq", "dk", "dv")):
        _check(x, r, dtype, nm + " vs sdpa", s)


@pytest.mark.parametrize("layout", ["qkv_linear", "qkv_conv"])
def test_strided_views_read_in_place(layout):
    """Views of one projection give exactly the results of contiguous copies
    (the kernels read the strides; nothing is reordered on the host)."""
    q, k, v, do = _inputs(2, 2, 19, 19, 24, torch.float32, layout, seed=3)
    scale = 0.3
    res = _run(q, k, v, do, scale, (16, 16))
    dense = _run(*(t.contiguous() for t in (q, k, v, do)), scale, (16, 16))
    for a, b in zip((res[0], res[1], *res[2]), (dense[0], dense[1], *dense[2])):
        torch.testing.assert_close(a, b, rtol=0, atol=0 if not HAS_CUDA else 1e-6)


def test_grad_out_any_strides_and_expanded():
    """grad_out as an expanded (stride-0) view, e.g. the gradient of a sum."""
    q, k, v, _ = _inputs(1, 2, 13, 11, 16, torch.float32, "cross", seed=4)
    do = torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(5)).to(DEV).expand(1, 2, 13, 16)
    scale = 0.25
    out, lse = A.attention(q, k, v, scale, block_m=16, block_n=16)
    g = A.attention_backward(do, q, k, v, out, lse, scale, block_m=16, block_n=16)
    g_dense = A.attention_backward(do.contiguous(), q, k, v, out, lse, scale, block_m=16, block_n=16)
    o64, lse64, *g64 = _oracle(q, k, v, do, scale)
    for a, b, r in zip(g, g_dense, g64):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        _check(a, r, torch.float32, "grad")


# the interpreter's numpy warns about the inf/NaN of padded rows that are never stored
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_very_negative_scores_with_padded_blocks():
    """Every score ~ -100 (lse ~ -100): padded keys/queries must not turn
    exp(0 - lse) = inf into NaN gradients."""
    g = torch.Generator().manual_seed(13)
    q = (5 + 0.1 * torch.randn(1, 1, 5, 16, generator=g)).to(DEV)
    k = (-5 + 0.1 * torch.randn(1, 1, 7, 16, generator=g)).to(DEV)
    v = torch.randn(1, 1, 7, 16, generator=g).to(DEV)
    do = torch.randn(1, 1, 5, 16, generator=g).to(DEV)
    out, lse, grads = _run(q, k, v, do, 0.25, (16, 16))
    o64, lse64, *g64 = _oracle(q, k, v, do, 0.25)
    assert lse64.max() < -90
    _check(out, o64, torch.float32, "out")
    _check(lse, lse64, torch.float32, "lse")
    for x, r, nm in zip(grads, g64, ("dq", "dk", "dv")):
        _check(x, r, torch.float32, nm)


def test_triton_rejects_bad_inputs():
    q, k, v, _ = _inputs(1, 1, 4, 5, 8, torch.float32)
    with pytest.raises(RuntimeError, match="float64"):
        A.attention(q.double(), k.double(), v.double(), 1.0)
    with pytest.raises(RuntimeError, match="4-D"):
        A.attention(q[0], k, v, 1.0)
    with pytest.raises(RuntimeError, match="same Lk"):
        A.attention(q, k, v[:, :, :3], 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        A.attention(q, k.half(), v, 1.0)
    with pytest.raises(RuntimeError, match="Lk >= 1"):
        A.attention(q, k[:, :, :0], v[:, :, :0], 1.0)
    big = torch.zeros(1, 1, 2, 513, device=DEV)
    with pytest.raises(RuntimeError, match="head dims"):
        A.attention(big, big, big, 1.0)
    out, lse = A.attention(q, k, v, 1.0)
    with pytest.raises(RuntimeError, match="grad_out"):
        A.attention_backward(out[:, :, :3], q, k, v, out, lse, 1.0)
    with pytest.raises(ValueError, match="powers of two"):
        A.attention(q, k, v, 1.0, block_m=24)


def test_triton_empty_query_sequence():
    q, k, v, _ = _inputs(2, 3, 0, 5, 8, torch.float32)
    out, lse = A.attention(q, k, v, 1.0)
    assert out.shape == (2, 3, 0, 8) and lse.shape == (2, 3, 0)
    dq, dk, dv = A.attention_backward(out, q, k, v, out, lse, 1.0)
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()


def test_config_table_fits_shared_memory(monkeypatch):
    dims = (1, 8, 40, 64, 80, 96, 128, 160, 256, 320, 512)
    for budget in (163 * 1024, 99 * 1024):  # A100 (H100 has 227 KB); sm86/sm89 parts
        monkeypatch.setattr(A, "_smem_budget", lambda dev, b=budget: b)
        for kernel in ("fwd", "dq", "dkdv"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for D in dims:
                    bm, bn, warps, stages = cfg = A.config(kernel, D, dtype)
                    for blk in (bm, bn):
                        assert blk >= 16 and blk & (blk - 1) == 0
                    assert warps in (1, 2, 4, 8) and stages >= 1
                    elem = 4 if dtype == torch.float32 else 2
                    # fits, or is already the smallest config (fp32 D=512 at 99 KB: launched
                    # anyway, the estimate counts the resident tiles that may stay in registers)
                    fits = A._smem(kernel, cfg, A._block_d(D), elem) <= budget
                    assert fits or (bm, bn, stages) == (16, 16, 1), (kernel, dtype, D, cfg)
                    if budget == 163 * 1024:
                        assert fits


def test_out_of_resources_retries_with_halved_blocks(monkeypatch):
    """A config too large for the GPU degrades (halved blocks, 1 stage) instead
    of failing, and the smaller config is remembered."""
    monkeypatch.setattr(A, "_DEGRADED", {})
    bm, bn, _, st = A.config("fwd", 32, torch.float32)
    hm, hn, _, hs = A._halve((bm, bn, 4, st))
    assert (hm, hn, hs) == (bm // 2, bn // 2, 1) and hn >= 16
    real = A._attn_fwd_kernel
    seen = []

    class Flaky:  # "out of shared memory" with the table's tiles
        def __getitem__(self, grid):
            def launch(*args, **meta):
                seen.append((meta["BLOCK_M"], meta["BLOCK_N"], meta["num_stages"]))
                if (meta["BLOCK_M"], meta["BLOCK_N"]) == (bm, bn):
                    raise A.OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(A, "_attn_fwd_kernel", Flaky())
    q, k, v, do = _inputs(1, 1, 40, 70, 32, torch.float32, seed=6)
    out, lse = A.attention(q, k, v, 0.2)
    o64, lse64, *_ = _oracle(q, k, v, do, 0.2)
    _check(out, o64, torch.float32, "out")
    _check(lse, lse64, torch.float32, "lse")
    assert seen == [(bm, bn, st), (hm, hn, 1)]
    A.attention(q, k, v, 0.2)  # remembered: straight to the smaller tiles
    assert seen[2:] == [(hm, hn, 1)]


@pytest.mark.parametrize("backend", all_backends())
def test_backends_agree_on_the_op_contract(backend):
    """Every backend of the attention ops (schema-level call) against the oracle."""
    B, H, Lq, Lk, D = 2, 2, 9, 13, 24
    g = torch.Generator().manual_seed(7)
    t = torch.randn(B, Lk, 2, H, D, generator=g).to(backend.device)
    q = torch.randn(B, Lq, H, D, generator=g).to(backend.device).transpose(1, 2)
    k, v = t[:, :, 0].transpose(1, 2), t[:, :, 1].transpose(1, 2)
    do = torch.randn(B, H, Lq, D, generator=g).to(backend.device)
    out, lse = backend("attention", q, k, v, 0.3)
    grads = backend("attention_backward", do, q, k, v, out, lse, 0.3)
    _check_layouts(out, lse, grads, q, k, v)
    o64, lse64, *g64 = _oracle(q, k, v, do, 0.3)
    _check(out, o64, torch.float32, "out")
    _check(lse, lse64, torch.float32, "lse")
    for x, r, nm in zip(grads, g64, ("dq", "dk", "dv")):
        _check(x, r, torch.float32, nm)


# ------------------------------------------------------------ public API ---
def test_public_cpu_default_is_sdpa_and_fused_is_the_op():
    q, k, v, do = _inputs(2, 2, 11, 6, 16, torch.float32, "contiguous", seed=8)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    assert not fastdiff.ops.blocks.fused_attention_supported(q, k, v)
    default = fastdiff.attention(q, k, v)
    assert torch.equal(default, F.scaled_dot_product_attention(q, k, v))
    assert default.is_contiguous()  # SDPA's layout, not the op's
    fused = fastdiff.attention(q, k, v, fused=True)
    assert fused.transpose(1, 2).is_contiguous()  # the op's (B, L, H, D) storage
    o64, *_ = _oracle(q, k, v, do, 0.25)
    _check(fused, o64, torch.float32, "fused")
    _check(default, o64, torch.float32, "sdpa")
    forced = fastdiff.attention(q, k, v, 0.5, fused=False)
    assert torch.equal(forced, F.scaled_dot_product_attention(q, k, v, scale=0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_public_gradients(dtype):
    q, k, v, do = _inputs(1, 2, 7, 5, 8, dtype, "cross", seed=9)
    q, k, v, do = (t.cpu() for t in (q, k, v, do))
    o, dq, dk, dv = _torch_grads(lambda a, b, c: fastdiff.attention(a, b, c, 0.4, fused=True), q, k, v, do)
    o64, lse64, *g64 = _oracle(q, k, v, do, 0.4)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for x, r in zip((o, dq, dk, dv), (o64, *g64)):
        assert x.dtype == dtype and _err(x, r) <= tol * max(1.0, r.abs().max().item())
    if dtype == torch.float64:
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        assert torch.autograd.gradcheck(lambda a, b, c: fastdiff.attention(a, b, c, fused=True), (qq, kk, vv))


def _bad_calls():
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 6, 8)
    return [
        (lambda: fastdiff.attention(q[0], k, k), ValueError, "q must have shape"),
        (lambda: fastdiff.attention(q, k[0], k), ValueError, "k must have shape"),
        (lambda: fastdiff.attention(q, torch.randn(2, 2, 6, 8), k), ValueError, "B=1, H=2"),
        (lambda: fastdiff.attention(q, torch.randn(1, 3, 6, 8), k), ValueError, "B=1, H=2"),
        (lambda: fastdiff.attention(q, torch.randn(1, 2, 6, 4), k), ValueError, "D=8"),
        (lambda: fastdiff.attention(q, k, torch.randn(1, 2, 7, 8)), ValueError, "same Lk"),
        (lambda: fastdiff.attention(q, k, k.half()), TypeError, "v must have q's dtype"),
        (lambda: fastdiff.attention(q, k.to("meta"), k), ValueError, "k must be on q's device"),
        (lambda: fastdiff.attention(q, k[:, :, :0], k[:, :, :0]), ValueError, "Lk >= 1"),
        (lambda: fastdiff.attention(q.long(), k, k), TypeError, "q must be float32"),
        (lambda: fastdiff.attention(q, "k", k), TypeError, "k must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_public_bad_inputs_raise_clear_errors(i):
    call, exc, words = _bad_calls()[i]
    with pytest.raises(exc, match=words):
        call()


def test_opcheck_attention_ops():
    g = torch.Generator().manual_seed(10)
    q = torch.randn(2, 2, 5, 8, generator=g)
    kv = torch.randn(2, 7, 2, 2, 8, generator=g)  # strided k, v views
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    torch.library.opcheck(op("attention"), (q, k, v, 0.35))
    torch.library.opcheck(op("attention"), (q.requires_grad_(True), k.requires_grad_(True), v, 0.35))
    out, lse = op("attention")(q.detach(), k.detach(), v, 0.35)
    do = torch.randn(2, 2, 5, 8, generator=g)
    torch.library.opcheck(op("attention_backward"), (do, q.detach(), k.detach(), v, out, lse, 0.35))


def test_compile_fullgraph_fused_attention():
    torch._dynamo.reset()

    def f(q, k, v):
        return fastdiff.attention(q * 2, k, v, fused=True).transpose(1, 2).flatten(2).sum(-1)

    q, k, v, _ = _inputs(2, 2, 9, 6, 8, torch.float32, "cross", seed=11)
    q, k, v = (t.cpu().requires_grad_(True) for t in (q, k, v))
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = cf(q, k, v)
    gy = torch.autograd.grad(y.square().sum(), (q, k, v))
    y0 = f(q, k, v)
    g0 = torch.autograd.grad(y0.square().sum(), (q, k, v))
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(gy, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- GPU ---
@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 64, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_gpu_public_fused_default_configs(D, dtype):
    """The default (untested-without-GPU) block configs compile, fit and are
    accurate: U-Net self-attention at 32x32 (L=1024) and cross-attention to 77 tokens.
    float32 is not fused by default (``fused_attention_supported`` is False:
    SDPA is the default there), so its configs are reached with fused=True."""
    fp32 = dtype == torch.float32
    for B, H, Lq, Lk, layout in ((2, max(1, 256 // D), 1024, 1024, "qkv_conv"), (2, 2, 1000, 77, "cross")):
        q, k, v, do = _inputs(B, H, Lq, Lk, D, dtype, layout, seed=12)
        assert fastdiff.ops.blocks.fused_attention_supported(q, k, v) is not fp32
        scale = 1.0 / math.sqrt(D)
        o, dq, dk, dv = _torch_grads(lambda a, b, c: fastdiff.attention(a, b, c, fused=True if fp32 else None),
                                     q, k, v, do)
        assert o.transpose(1, 2).is_contiguous()  # went through the fused op
        o64, lse64, *g64 = _oracle(q, k, v, do, scale)
        if dtype == torch.float32:
            for x, r, nm in zip((o, dq, dk, dv), (o64, *g64), ("out", "dq", "dk", "dv")):
                _check(x, r, dtype, nm)
        else:
            eo, *eg = _torch_grads(_eager(scale), q, k, v, do)
            for x, r, e, nm in zip((o, dq, dk, dv), (o64, *g64), (eo, *eg), ("out", "dq", "dk", "dv")):
                _check(x, r, dtype, nm, e)
