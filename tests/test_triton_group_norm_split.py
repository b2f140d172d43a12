"""The split forward and backward of the Triton GroupNorm
(fastdiff.triton.group_norm: per (group, chunk) partials, combine on the
device, apply), for few large groups (a VAE decode at 1x128x512x512 with 32
groups is 32 programs otherwise).

Parity against the float64 reference with the split forced (``split=``) on
tiny shapes under the interpreter, and the default choice (``split_plan``):
which path is picked for which shape and SM count.
"""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from fastdiff.ops._layout import gn_channels_last  # noqa: E402
from fastdiff.reference import blocks as refb  # noqa: E402
from fastdiff.triton import group_norm as tgn  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

LOOP = 16  # tile budget: several d- and s-tiles on these shapes


def _inputs(shape, G, dtype=torch.float32, layout="nchw", offset=0.0, opts="wbaxh", seed=0):
    gen = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + offset).to(dtype)
    if layout == "cl":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert gn_channels_last(x)
    elif layout == "strided":
        big = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        big[..., ::2] = x
        x = big[..., ::2]

    def vec(flag, *s, mul=1.0):
        return mul * torch.randn(*s, generator=gen, dtype=sd) if flag in opts else None

    vecs = (vec("w", C), vec("b", C), vec("a", N, C), vec("x", N, C, mul=0.5), vec("h", N, C))
    return (x.to(DEV),) + tuple(None if v is None else v.to(DEV) for v in vecs)


def _err(out, ref):
    r = ref.detach().cpu().double()
    return ((out.detach().cpu().double() - r).abs().max() / max(1.0, r.abs().max().item())).item()


def _check(args, G, silu, block, split, tol_stats, tol_y=None):
    """The split forward against the float64 reference, and its output contract
    against the one-program-per-group kernel's (shapes, dtypes, strides)."""
    x = args[0]
    y, mean, rstd = tgn.group_norm_act(*args, G, 1e-5, silu, block=block, split=split)
    y1, mean1, rstd1 = tgn.group_norm_act(*args, G, 1e-5, silu, block=block, split=None)
    assert y.shape == y1.shape and y.dtype == y1.dtype and y.stride() == y1.stride()
    assert mean.shape == mean1.shape and mean.dtype == mean1.dtype and rstd.dtype == rstd1.dtype
    ref = refb.group_norm_act(*(None if v is None else v.cpu() for v in args), G, 1e-5, silu)
    errs = {"y": _err(y, ref[0]), "mean": _err(mean, ref[1]), "rstd": _err(rstd, ref[2])}
    if tol_y is None:
        tol_y = tol_stats
    assert errs["y"] <= tol_y and errs["mean"] <= tol_stats and errs["rstd"] <= tol_stats, errs
    _check_bwd(args, mean, rstd, G, silu, block, split, tol_stats)
    return y, ref


NAMES = ("dx", "dweight", "dbias", "dadd", "dscale", "dshift")


def _check_bwd(args, mean, rstd, G, silu, block, split, tol):
    """The split backward against the float64 reference backward (from the
    same saved statistics): within ``tol`` (float32/64), or for fp16/bf16 dx
    within 2x the one-program kernel's error + one eps; shapes, dtypes and dx's
    strides as that kernel's."""
    x = args[0]
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(DEV)
    grads = tgn.group_norm_act_backward(dy, *args, mean, rstd, G, silu, block=block, split=split)
    grads1 = tgn.group_norm_act_backward(dy, *args, mean, rstd, G, silu, block=block)
    cpu = [None if v is None else v.cpu() for v in (dy, *args, mean, rstd)]
    ref = refb.group_norm_act_backward(*cpu, G, silu)
    assert grads[0].stride() == grads1[0].stride()
    bad = {}
    for name, a, a1, r in zip(NAMES, grads, grads1, ref):
        assert a.shape == a1.shape and a.dtype == a1.dtype, name
        if r is None or a.numel() == 0:
            assert a.numel() == 0 and a1.numel() == 0
            continue
        lim = tol
        if a.dtype in (torch.float16, torch.bfloat16):
            lim = 2 * _err(a1, r) + torch.finfo(a.dtype).eps
        if not _err(a, r) <= lim:
            bad[name] = (_err(a, r), lim)
    assert not bad, f"backward errors over their limits: {bad}"


CASES = [  # (shape, G, layout, block, split): chunk counts 2..4, partial last chunks, d-tiles, ranks 2..5
    ((1, 6, 7, 5), 3, "nchw", LOOP, 3),    # S = 35: chunks of 16, 16, 3
    ((2, 12, 5), 4, "cl", LOOP, 2),        # D = 3 (not a power of two), chunks of 4 and 1
    ((1, 24, 5), 1, "cl", LOOP, 3),        # D = 24: 2 channel tiles of 16
    ((2, 12, 5), 4, "nchw", LOOP, 100),    # more chunks asked than tiles: one chunk per tile
    ((1, 4, 2, 3, 2), 2, "cl", LOOP, 2),
    ((2, 6, 3, 5), 2, "strided", LOOP, 2),  # read through a contiguous copy
    ((2, 10), 5, "nchw", None, 2),         # S = 1: one chunk, the split kernels still run
]


@pytest.mark.parametrize("shape,G,layout,block,split", CASES)
def test_fp32_matches_oracle(shape, G, layout, block, split):
    _check(_inputs(shape, G, layout=layout), G, True, block, split, 2e-5)


@pytest.mark.parametrize("opts,silu", [("", False), ("a", False), ("wb", True), ("xh", True), ("ax", False)])
def test_optional_inputs(opts, silu):
    _check(_inputs((2, 6, 3, 5), 3, opts=opts, seed=len(opts)), 3, silu, LOOP, 2, 2e-5)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_offset_statistics(layout):
    """Inputs offset by 1e3: the chunks share the shift K, so the combined
    statistics and y stay at fp32 rounding level, as with one program."""
    _check(_inputs((2, 4, 7, 5), 2, layout=layout, offset=1e3), 2, True, LOOP, 3, 2e-6)


def test_offset_nonstationary_group():
    """Chunks whose means sit at +1e3 and -1e3 (each chunk's mean far from the
    shared shift K): Chan's combine of the chunk partials stays exact."""
    x, w, b, *_ = _inputs((1, 2, 8, 4), 1, opts="wb")
    x[..., :4, :] += 1e3
    x[..., 4:, :] -= 1e3
    y, mean, rstd = tgn.group_norm_act(x, w, b, None, None, None, 1, 1e-5, False, block=LOOP, split=2)
    ref = refb.group_norm_act(x.cpu(), w.cpu(), b.cpu(), None, None, None, 1, 1e-5, False)
    assert (mean.cpu().double() - ref[1]).abs().max().item() <= 1e-7 * 1e3
    assert _err(y, ref[0]) <= 2e-6 and _err(rstd, ref[2]) <= 2e-6
    _check_bwd((x, w, b, None, None, None), mean, rstd, 1, False, LOOP, 2, 2e-6)


@pytest.mark.parametrize("dtype,layout", [(torch.float16, "cl"), (torch.bfloat16, "nchw")])
def test_low_precision(dtype, layout):
    """y: at most 2x the error of torch's own computation at that dtype (+ one
    eps); the float32 statistics at fp32 level."""
    G = 2
    args = _inputs((2, 4, 5, 3), G, dtype=dtype, layout=layout)
    y, ref = _check(args, G, True, LOOP, 2, 2e-5, tol_y=float("inf"))
    x, w, b, add, sc, sh = (v.cpu() for v in args)
    ty = F.silu(F.group_norm(x + add.to(dtype)[..., None, None], G, w.to(dtype), b.to(dtype), 1e-5)
                * (1 + sc.to(dtype)[..., None, None]) + sh.to(dtype)[..., None, None])
    assert _err(y, ref[0]) <= 2 * _err(ty, ref[0]) + torch.finfo(dtype).eps


@pytest.mark.parametrize("layout,offset", [("nchw", 1e3), ("cl", 0.0)])
def test_float64(layout, offset):
    _check(_inputs((2, 4, 5, 3), 2, dtype=torch.float64, layout=layout, offset=offset), 2, True, LOOP, 2, 1e-12)


def test_default_path_splits_when_few_large_groups(monkeypatch):
    """With nothing forced the launcher takes the split path exactly when
    split_plan says so (thresholds shrunk so that a tiny shape qualifies)."""
    monkeypatch.setattr(tgn, "SPLIT_MIN_CHUNK", 8)
    calls, bcalls = [], []
    real, breal = tgn._split_forward, tgn._split_backward
    monkeypatch.setattr(tgn, "_split_forward", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(tgn, "_split_backward", lambda *a: bcalls.append(a[-1]) or breal(*a))
    args = _inputs((1, 4, 9, 7), 2, layout="cl")
    _check(args, 2, True, LOOP, None, 2e-5)
    # the forced calls of _check and the default ones
    assert len(calls) == 2 and calls[1].chunks >= 2 and len(bcalls) == 2 and bcalls[1].chunks >= 2
    calls.clear()
    bcalls.clear()
    monkeypatch.setattr(tgn, "CPU_SMS", 2)  # N * G = 2 programs fill the "GPU": no split
    if not HAS_CUDA:
        y, mean, rstd = tgn.group_norm_act(*args, 2, 1e-5, True, block=LOOP)
        tgn.group_norm_act_backward(y, *args, mean, rstd, 2, True, block=LOOP)
        assert not calls and not bcalls


SMS = 132  # an H100/H200


@pytest.mark.parametrize("cl", [False, True])
def test_split_plan_vae_shapes(cl):
    # 1x128x512x512, 32 groups: 32 programs on 132 SMs -> split into ~4 programs per SM
    p = tgn.split_plan(1, 32, 4, 512 * 512, cl, False, SMS)
    want = -(-tgn.SPLIT_PROGRAMS_PER_SM * SMS // 32)  # 17, rounded to whole tiles per chunk: 16
    assert p is not None and SMS <= 32 * p.chunks <= 32 * want and p.chunks >= want // 2
    assert p.cs % p.geo.block_s == 0 and (p.chunks - 1) * p.cs < 512 * 512 <= p.chunks * p.cs
    assert not p.geo.single and p.geo.block_d * p.geo.block_s <= tgn.LOOP_TILE["fwd"]
    pb = tgn.split_plan(1, 32, 4, 512 * 512, cl, False, SMS, kind="bwd")  # the backward's warps per tile
    assert pb is not None and pb.chunks == p.chunks and pb.geo.num_warps >= p.geo.num_warps
    # 8x128x256x256: 256 programs already cover 132 SMs -> one program per group
    assert tgn.split_plan(8, 32, 4, 256 * 256, cl, False, SMS) is None
    # the same group on a smaller GPU (or the CPU stand-in) with few samples: split
    assert tgn.split_plan(2, 32, 4, 256 * 256, cl, False, 108) is not None


def test_split_plan_choices():
    # a group that fits one tile (the SINGLE kernel reads x once): never split by default
    assert tgn.split_plan(1, 1, 4, 1024, False, False, SMS) is None
    # a large group but chunks would be under SPLIT_MIN_CHUNK elements: capped
    D, S = 4, 4 * 1024  # 16384 elements = 2 minimum chunks
    p = tgn.split_plan(1, 1, D, S, False, False, SMS)
    assert p is not None and p.chunks == (D * S) // tgn.SPLIT_MIN_CHUNK
    # S of one tile cannot be split along the positions (NCHW, D large)
    assert tgn.split_plan(1, 1, 4096, 1, False, False, SMS) is None
    # float64 halves the tile budget; the plan still covers S
    p = tgn.split_plan(1, 4, 8, 64 * 64, True, True, SMS)
    assert p is not None and p.geo.block_d * p.geo.block_s <= tgn.LOOP_TILE["fwd"] // 2
    # forced: any group, even a single-tile one; chunks capped by S's tiles
    p = tgn.split_plan(4, 8, 2, 35, False, False, SMS, block=LOOP, split=3)
    assert p is not None and (p.chunks, p.cs) == (3, 16)
    assert tgn.split_plan(4, 8, 2, 35, False, False, SMS, split=1).chunks == 1
    assert tgn.split_plan(0, 8, 2, 35, False, False, SMS, split=2) is None
    with pytest.raises(ValueError, match="split"):
        tgn.split_plan(1, 1, 4, 1024, False, False, SMS, split=0)
