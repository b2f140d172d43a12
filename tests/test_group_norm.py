"""The GroupNorm(+add, +scale/shift)+SiLU operator family on every backend.

Each backend's forward and backward are compared with the float64 oracle
(fastdiff/reference/blocks.py, itself checked against torch's GroupNorm +
SiLU autograd below) on odd shapes, both layouts, strided inputs, every
optional input and every dtype; low precision follows the flash-attention
rule (error vs float64 no worse than ~2x eager PyTorch's at that dtype).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.ops import _reference_kernels as refk
from fastdiff.reference import blocks as refb
from fastdiff.ops._layout import gn_channels_last
from fastdiff.ops._schemas import op

from _backends import all_backends

BACKENDS = all_backends()

# (shape, groups): D = C/G odd or 1, spatial odd / absent / 1-D / 3-D
CASES = [
    ((1, 6, 7, 5), 3),
    ((3, 12, 5), 4),
    ((2, 10), 5),
    ((2, 8, 4, 4), 2),
    ((2, 9, 3, 1, 2), 3),
    ((1, 64, 9, 9), 32),
]
SMALL = {0, 1, 2, 3}  # the cases the Triton interpreter runs


def _inputs(shape, groups, dtype=torch.float32, opts="wbass", offset=0.0, seed=0, layout="nchw"):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset
    if layout == "nhwc" and len(shape) >= 3:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":
        x = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64)[..., ::2]
    x = x.to(dtype)
    sd = torch.float64 if dtype == torch.float64 else torch.float32

    def vec(*s):
        return (torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(sd)

    w = vec(C) + 1 if "w" in opts else None
    b = vec(C) if "b" in opts else None
    a = vec(N, C) * 4 if "a" in opts else None
    sc = vec(N, C) if opts.count("s") >= 1 else None
    sh = vec(N, C) if opts.count("s") >= 2 else None
    return x, w, b, a, sc, sh


def _expected_layout_ok(x, y):
    if gn_channels_last(x):
        return y.movedim(1, -1).is_contiguous()
    return y.is_contiguous()


def _device(backend, tensors):
    return [t.to(backend.device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _skip_big(backend, idx):
    if backend.small_only and idx not in SMALL:
        pytest.skip("Triton interpreter: small shapes only")


def _tol(dtype):
    return {torch.float64: (1e-10, 1e-10), torch.float32: (3e-5, 3e-5)}[dtype]


# ------------------------------------------------------------- oracle ------
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("opts", ["", "wb", "wba", "wbass", "as", "a"])
def test_reference_matches_torch_autograd(opts, silu):
    """The float64 oracle (forward and its hand-written backward) against
    torch's GroupNorm + SiLU with autograd."""
    x, w, b, a, sc, sh = _inputs((3, 6, 5, 4), 3, torch.float64, opts)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b, a, sc, sh)]
    x_, w_, b_, a_, sc_, sh_ = leaves
    h = x_ + a_[..., None, None] if a_ is not None else x_
    z = F.group_norm(h, 3, w_, b_, 1e-5)
    if sc_ is not None:
        z = z * (1 + sc_[..., None, None])
    if sh_ is not None:
        z = z + sh_[..., None, None]
    y_t = F.silu(z) if silu else z
    y, mean, rstd = refk.group_norm_act(x, w, b, a, sc, sh, 3, 1e-5, silu)
    torch.testing.assert_close(y, y_t.detach(), atol=1e-12, rtol=1e-12)
    gy = torch.randn_like(y)
    present = [t for t in leaves if t is not None]
    want = torch.autograd.grad(y_t, present, gy)
    got = refk.group_norm_act_backward(gy, x, w, b, a, sc, sh, mean, rstd, 3, silu)
    got = [gg for gg, t in zip(got, leaves) if t is not None]
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, atol=1e-11, rtol=1e-11)


# ------------------------------------------------------------- forward -----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx", range(len(CASES)))
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_oracle(backend, idx, layout, dtype):
    _skip_big(backend, idx)
    shape, G = CASES[idx]
    for opts, silu in [("wbass", True), ("", False), ("wba", True), ("as", True)]:
        x, w, b, a, sc, sh = _inputs(shape, G, dtype, opts, layout=layout, seed=idx)
        y, mean, rstd = backend("group_norm_act", *_device(backend, (x, w, b, a, sc, sh)), G, 1e-5, silu)
        ry, rmean, rrstd = refk.group_norm_act(x, w, b, a, sc, sh, G, 1e-5, silu)
        atol, rtol = _tol(dtype)
        assert y.dtype == dtype and y.shape == x.shape and _expected_layout_ok(x, y.cpu())
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        assert mean.dtype == sd and rstd.dtype == sd and mean.shape == (shape[0], G)
        torch.testing.assert_close(y.cpu(), ry, atol=atol, rtol=rtol)
        torch.testing.assert_close(mean.cpu(), rmean, atol=atol, rtol=rtol)
        torch.testing.assert_close(rstd.cpu(), rrstd, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_every_option_combination(backend):
    shape, G = CASES[0]
    for mask in itertools.product([0, 1], repeat=5):
        opts = "".join(c for c, m in zip("wba", mask[:3]) if m) + "s" * (mask[3] + mask[4] * mask[3])
        for silu in (True, False):
            x, w, b, a, sc, sh = _inputs(shape, G, torch.float32, opts)
            if mask[4] and not mask[3]:  # shift without scale
                sh = torch.randn(shape[0], shape[1])
            y = backend("group_norm_act", *_device(backend, (x, w, b, a, sc, sh)), G, 1e-5, silu)[0]
            ry = refk.group_norm_act(x, w, b, a, sc, sh, G, 1e-5, silu)[0]
            torch.testing.assert_close(y.cpu(), ry.float(), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_statistics(backend):
    """Inputs offset by 1e3 (|mean| ~ 700 x std): float32 statistics must stay
    accurate (a naive sum / sum-of-squares loses ~all digits of the variance)."""
    idx = 3 if backend.small_only else 5
    shape, G = CASES[idx]
    for layout in ("nchw", "nhwc"):
        x, w, b, a, sc, sh = _inputs(shape, G, torch.float32, "wba", offset=1e3, layout=layout)
        y, _, rstd = backend("group_norm_act", *_device(backend, (x, w, b, a, sc, sh)), G, 1e-5, True)
        ry, _, rrstd = refk.group_norm_act(x, w, b, a, sc, sh, G, 1e-5, True)
        # x itself is rounded to float32 (ulp 6e-5 at 1e3): that bounds the achievable accuracy
        torch.testing.assert_close(rstd.cpu(), rrstd.float(), rtol=1e-4, atol=0)
        torch.testing.assert_close(y.cpu(), ry.float(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_low_precision_flash_rule(backend, dtype, layout):
    """Error vs the float64 oracle at most ~2x eager PyTorch's at the same dtype."""
    idx = 3 if backend.small_only else 5
    shape, G = CASES[idx]
    x64, w, b, a, sc, sh = _inputs(shape, G, torch.float64, "wbass", layout=layout)
    x = x64.to(dtype)
    ry, _, _ = refb.group_norm_act(x, w, b, a, sc, sh, G, 1e-5, True)
    vecs = [v.float() for v in (w, b, a, sc, sh)]
    y = backend("group_norm_act", *_device(backend, (x, *vecs)), G, 1e-5, True)[0].cpu()
    assert y.dtype == dtype
    # eager PyTorch at this dtype: every op in `dtype` (what an unfused module does without autocast)
    e = F.group_norm(x + a.to(dtype)[..., None, None], G, w.to(dtype), b.to(dtype), 1e-5)
    e = F.silu(e * (1 + sc.to(dtype)[..., None, None]) + sh.to(dtype)[..., None, None])
    err = (y.double() - ry).abs().max().item()
    err_eager = (e.double() - ry).abs().max().item()
    assert err <= 2 * err_eager + 1e-3, (err, err_eager)


# ------------------------------------------------------------ backward -----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("idx", range(len(CASES)))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_oracle(backend, idx, layout, dtype):
    _skip_big(backend, idx)
    shape, G = CASES[idx]
    for opts, silu in [("wbass", True), ("", True), ("wba", False), ("a", True)]:
        x, w, b, a, sc, sh = _inputs(shape, G, dtype, opts, layout=layout, seed=idx + 10)
        _, mean, rstd = refk.group_norm_act(x, w, b, a, sc, sh, G, 1e-5, silu)
        sd = mean.dtype if dtype == torch.float64 else torch.float32
        mean, rstd = mean.to(sd), rstd.to(sd)
        gy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(idx)).to(dtype)
        got = backend("group_norm_act_backward", *_device(backend, (gy, x, w, b, a, sc, sh, mean, rstd)), G, silu)
        want = refk.group_norm_act_backward(gy, x, w, b, a, sc, sh, mean, rstd, G, silu)
        assert len(got) == 6
        assert _expected_layout_ok(x, got[0].cpu()) and got[0].dtype == dtype
        scale = 1e-10 if dtype == torch.float64 else 2e-4
        for name, gg, ww, inp in zip(["dx", "dweight", "dbias", "dadd", "dscale", "dshift"], got, want,
                                     (x, w, b, a, sc, sh)):
            if inp is None and name != "dx":
                assert gg.numel() == 0, name
                continue
            assert gg.shape == ww.shape, name
            mag = max(1.0, ww.abs().max().item())
            torch.testing.assert_close(gg.cpu(), ww, atol=scale * mag, rtol=scale, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_grad_in_other_layout(backend):
    """grad_y arriving channels_last for an NCHW x (and vice versa)."""
    shape, G = CASES[3]
    for layout in ("nchw", "nhwc"):
        x, w, b, a, sc, sh = _inputs(shape, G, torch.float32, "wbass", layout=layout)
        _, mean, rstd = backend("group_norm_act", *_device(backend, (x, w, b, a, sc, sh)), G, 1e-5, True)
        gy = torch.randn(shape)
        gy = gy.contiguous() if layout == "nhwc" else gy.contiguous(memory_format=torch.channels_last)
        got = backend("group_norm_act_backward", *_device(backend, (gy, x, w, b, a, sc, sh, mean, rstd)), G, True)
        want = refk.group_norm_act_backward(gy, x, w, b, a, sc, sh, mean.cpu(), rstd.cpu(), G, True)
        for gg, ww in zip(got, want):
            torch.testing.assert_close(gg.cpu(), ww.float(), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 6, 3, 3)
    w = torch.ones(6)
    y, mean, rstd = backend("group_norm_act", *_device(backend, (x, w, None, None, None, None)), 3, 1e-5, True)
    assert y.shape == x.shape and mean.shape == (0, 3) and rstd.shape == (0, 3)
    got = backend("group_norm_act_backward", *_device(backend, (x, x, w, None, None, None, None, mean, rstd)), 3,
                  True)
    assert got[0].shape == x.shape and got[1].shape == (6,) and torch.all(got[1] == 0)


# --------------------------------------------------------- public API ------
def _eager(x, G, w, b, a, sc, sh, silu=True):
    ex = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    h = x + a.reshape(ex) if a is not None else x
    z = F.group_norm(h, G, w, b, 1e-5)
    if sc is not None:
        z = z * (1 + sc.reshape(ex))
    if sh is not None:
        z = z + sh.reshape(ex)
    return F.silu(z) if silu else z


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_public_autograd_matches_torch(layout):
    x, w, b, a, sc, sh = _inputs((2, 8, 5, 3), 4, torch.float32, "wbass", layout=layout)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, a, sc, sh)]
    y = fastdiff.group_norm_act(leaves[0], 4, leaves[1], leaves[2], add=leaves[3][..., None, None],
                                scale=leaves[4], shift=leaves[5])
    e = _eager(*[leaves[0], 4] + leaves[1:])
    torch.testing.assert_close(y, e, atol=3e-5, rtol=3e-5)
    gy = torch.randn_like(y)
    for g1, g2 in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(e, leaves, gy)):
        torch.testing.assert_close(g1, g2, atol=2e-4, rtol=2e-4)


def test_public_partial_requires_grad():
    """Only some inputs need a gradient: the others get None, nothing breaks."""
    x, w, b, a, sc, sh = _inputs((2, 4, 3, 3), 2, torch.float32, "wbass")
    a = a.requires_grad_(True)
    y = fastdiff.group_norm_act(x, 2, w, b, add=a, scale=sc, shift=sh)
    (ga,) = torch.autograd.grad(y.square().sum(), [a])
    e = _eager(x, 2, w, b, a, sc, sh)
    (ge,) = torch.autograd.grad(e.square().sum(), [a])
    torch.testing.assert_close(ga, ge, atol=2e-4, rtol=2e-4)


def test_public_mixed_dtypes_under_autocast():
    """bf16 data with float32 parameters (what autocast produces) is accepted;
    the output keeps the data's dtype."""
    x, w, b, a, sc, sh = _inputs((2, 8, 4, 4), 4, torch.float32, "wba")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastdiff.group_norm_act(x.bfloat16(), 4, w, b, add=a.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _eager(x.bfloat16().float(), 4, w, b, a.bfloat16().float(), None, None),
                               atol=3e-2, rtol=3e-2)


def test_gradcheck():
    x, w, b, a, sc, sh = _inputs((2, 6, 3, 2), 3, torch.float64, "wbass")
    leaves = tuple(t.clone().requires_grad_(True) for t in (x, w, b, a, sc, sh))
    assert torch.autograd.gradcheck(
        lambda *t: fastdiff.group_norm_act(t[0], 3, t[1], t[2], add=t[3], scale=t[4], shift=t[5]), leaves)
    assert torch.autograd.gradcheck(lambda t: fastdiff.group_norm_act(t, 3, silu=False), (leaves[0],))


def test_opcheck():
    for opts, layout, silu in [("wbass", "nchw", True), ("", "nhwc", False), ("wba", "nhwc", True)]:
        x, w, b, a, sc, sh = _inputs((2, 6, 3, 2), 3, torch.float32, opts, layout=layout)
        x.requires_grad_(True)
        torch.library.opcheck(op("group_norm_act"), (x, w, b, a, sc, sh, 3, 1e-5, silu))
        _, mean, rstd = op("group_norm_act")(x.detach(), w, b, a, sc, sh, 3, 1e-5, silu)
        torch.library.opcheck(op("group_norm_act_backward"),
                              (torch.randn_like(x), x.detach(), w, b, a, sc, sh, mean, rstd, 3, silu))


def test_compile_fullgraph_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=cnt, fullgraph=True)
    def block(x, w, b, temb):
        return fastdiff.group_norm_act(x, 4, w, b, add=temb).sum()

    for n in range(3):
        x, w, b, a, _, _ = _inputs((2, 8, 4, 4), 4, torch.float32, "wba", seed=n)
        x.requires_grad_(True)
        out = block(x, w, b, a)
        out.backward()
        e = _eager(x.detach().requires_grad_(True), 4, w, b, a, None, None)
        torch.testing.assert_close(out, e.sum(), atol=1e-3, rtol=1e-4)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("bad, match", [
    (dict(G=5), "num_groups=5 must divide"),
    (dict(G=0), "num_groups must be a positive int"),
    (dict(G=True), "num_groups must be a positive int"),
    (dict(x=torch.randn(6)), r"x must have shape \(N, C, \*spatial\)"),
    (dict(x=torch.randint(0, 3, (2, 6, 3))), "x must be float32"),
    (dict(x=torch.randn(2, 6, 0)), "no elements per group"),
    (dict(w=torch.ones(5)), r"weight must have shape \(6,\)"),
    (dict(b=torch.ones(6, 1)), r"bias must have shape \(6,\)"),
    (dict(a=torch.ones(3, 6)), r"add must have shape \(2, 6\)"),
    (dict(sc=torch.ones(2, 6, 3, 3)), r"scale must have shape \(2, 6\)"),
    (dict(sh=torch.ones(2, 5, 1, 1)), r"shift must have shape \(2, 6\)"),
    (dict(w=torch.ones(6, device="meta")), "weight must be on x's device"),
    (dict(eps=-1.0), "eps must be"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(x="not a tensor"), "x must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(x=torch.randn(2, 6, 3, 3), G=3, w=None, b=None, a=None, sc=None, sh=None, eps=1e-5)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fastdiff.group_norm_act(args["x"], args["G"], args["w"], args["b"], eps=args["eps"], add=args["a"],
                                scale=args["sc"], shift=args["sh"])


def test_direct_op_call_bad_input_is_an_error_not_a_crash():
    x = torch.randn(2, 6, 3)
    with pytest.raises(RuntimeError):
        op("group_norm_act")(x, torch.ones(5), None, None, None, None, 3, 1e-5, True)
    with pytest.raises(RuntimeError):
        op("group_norm_act")(x, None, None, None, None, None, 4, 1e-5, True)
    with pytest.raises(RuntimeError):
        op("group_norm_act")(x, torch.ones(6, dtype=torch.float16), None, None, None, None, 3, 1e-5, True)
