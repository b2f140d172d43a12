"""What only the Triton GroupNorm(+add, +scale/shift, +SiLU) kernels
(fastdiff.triton.group_norm) have, against the float64 reference: the looping
path forced by a tiny tile budget (every layout, option and dtype), rank 5,
int64 indexing, tile-merged statistics at a large offset, determinism, the tile
geometry and the launchers' checks. The single-tile path runs with every
backend in tests/test_group_norm.py.

Without a GPU they run under the Triton interpreter on CPU tensors (small shapes).
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

from fastdiff.ops import _reference_kernels as refk  # noqa: E402
from fastdiff.ops._layout import gn_channels_last  # noqa: E402
from fastdiff.reference import blocks as refb  # noqa: E402
from fastdiff.triton import _common  # noqa: E402
from fastdiff.triton import group_norm as tgn  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
# silu's exp(-z) overflows to inf for very negative z (and on masked lanes): correct, but numpy warns
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

LOOP = 16  # tile budget that forces the looping path (several d- and s-tiles) on these shapes


def _inputs(shape, G, dtype=torch.float32, layout="nchw", offset=0.0, opts="wbaxh", seed=0):
    """x and the optional vectors (w weight, b bias, a add, x scale, h shift)."""
    gen = torch.Generator().manual_seed(seed)
    N, C = shape[:2]
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + offset).to(dtype)
    if layout == "cl":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        assert gn_channels_last(x)
    elif layout == "strided":  # x[..., ::2] of a larger tensor: read through a contiguous copy
        big = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
        big[..., ::2] = x
        x = big[..., ::2]

    def vec(flag, *s, mul=1.0):
        return mul * torch.randn(*s, generator=gen, dtype=sd) if flag in opts else None

    vecs = (vec("w", C), vec("b", C), vec("a", N, C), vec("x", N, C, mul=0.5), vec("h", N, C))
    x = x.to(DEV)
    return (x,) + tuple(None if v is None else v.to(DEV) for v in vecs)


def _err(out, ref):
    """Max error relative to max(1, |ref|)."""
    if ref is None or ref.numel() == 0:
        return 0.0
    r = ref.detach().cpu().double()
    return ((out.detach().cpu().double() - r).abs().max() / max(1.0, r.abs().max().item())).item()


def _run(x, w, b, add, sc, sh, G, silu, block, seed=1, eps=1e-5):
    """Forward + backward of the Triton kernels, the float64 oracle, and the contract checks."""
    y, mean, rstd = tgn.group_norm_act(x, w, b, add, sc, sh, G, eps, silu, block=block)
    ky, km, _ = refk.group_norm_act(x.cpu(), *(None if v is None else v.cpu() for v in (w, b, add, sc, sh)),
                                    G, eps, silu)
    # output contract: shapes, dtypes and layouts of the reference kernels
    assert y.shape == ky.shape and y.dtype == ky.dtype and y.stride() == ky.stride()
    assert mean.shape == km.shape and mean.dtype == km.dtype and rstd.dtype == km.dtype
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(DEV)
    grads = tgn.group_norm_act_backward(dy, x, w, b, add, sc, sh, mean, rstd, G, silu, block=block)
    cpu = [None if v is None else v.cpu() for v in (dy, x, w, b, add, sc, sh, mean, rstd)]
    kg = refk.group_norm_act_backward(*cpu, G, silu)
    for a, r in zip(grads, kg):
        assert a.shape == r.shape and a.dtype == r.dtype
    assert grads[0].stride() == kg[0].stride()
    fwd = refb.group_norm_act(*cpu[1:7], G, eps, silu)
    bwd = refb.group_norm_act_backward(*cpu, G, silu)  # from the kernel's own saved statistics
    return (y, mean, rstd), grads, fwd, bwd, dy


def _check_fp(outs, grads, fwd, bwd, tol, what):
    errs = [_err(a, r) for a, r in zip(outs, fwd)] + [_err(a, r) for a, r in zip(grads, bwd)]
    names = ("y", "mean", "rstd")[:len(outs)]
    names = names + ("dx", "dweight", "dbias", "dadd", "dscale", "dshift")
    bad = {n: e for n, e in zip(names, errs) if not e <= tol}
    assert not bad, f"{what}: errors above {tol:g}: {bad}"


# (shape, G, layout, block): C/G not a power of two, odd spatial sizes, ranks 2..5. The
# single-tile path at ranks 2-4 runs with every backend in tests/test_group_norm.py.
CASES = [
    ((1, 6, 7, 5), 3, "nchw", LOOP),  # 3 spatial tiles per channel
    ((2, 12, 5), 4, "nchw", LOOP),  # 2 channel tiles, the last one partial
    ((2, 12, 5), 4, "cl", LOOP),
    ((1, 24, 5), 1, "cl", LOOP),  # D = 24: 2 channel tiles of 16
    ((1, 4, 2, 3, 2), 2, "cl", None),
    ((1, 4, 2, 3, 2), 2, "cl", LOOP),
    ((2, 6, 3, 5), 2, "strided", LOOP),
]


@pytest.mark.parametrize("shape,G,layout,block", CASES)
def test_fp32_matches_oracle(shape, G, layout, block):
    outs, grads, fwd, bwd, _ = _run(*_inputs(shape, G, layout=layout), G, True, block)
    _check_fp(outs, grads, fwd, bwd, 2e-5, f"{shape} G={G} {layout} block={block}")


@pytest.mark.parametrize("opts,silu,block", [
    ("", True, LOOP), ("b", False, LOOP), ("a", False, LOOP), ("x", True, LOOP), ("h", False, LOOP),
    ("axh", True, LOOP)])
def test_optional_inputs(opts, silu, block):
    shape, G = (2, 6, 3, 5), 3
    outs, grads, fwd, bwd, _ = _run(*_inputs(shape, G, opts=opts, seed=len(opts)), G, silu, block)
    for flag, gr in zip("wbaxh", grads[1:]):
        assert (gr.numel() == 0) == (flag not in opts)
    _check_fp(outs, grads, fwd, bwd, 2e-5, f"opts={opts!r} silu={silu}")


def test_matches_torch_autograd():
    """Against autograd of the same block written with F.group_norm and F.silu."""
    x, w, b, add, sc, sh = _inputs((2, 6, 5, 3), 3, layout="cl")
    (y, mean, rstd), grads, _, _, dy = _run(x, w, b, add, sc, sh, 3, True, None)
    leaves = [v.detach().clone().double().requires_grad_() for v in (x, w, b, add, sc, sh)]
    tx, tw, tb, ta, ts, th = leaves
    ty = F.silu(F.group_norm(tx + ta[..., None, None], 3, tw, tb, 1e-5) * (1 + ts[..., None, None])
                + th[..., None, None])
    ty.backward(dy.double())
    assert _err(y, ty) <= 2e-5
    for ours, leaf in zip(grads, leaves):
        assert _err(ours, leaf.grad) <= 2e-5


@pytest.mark.parametrize("block", [LOOP], ids=["loop"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_offset_statistics(layout, block):
    """Inputs offset by 1e3 (|mean| >> std): the statistics and y stay at fp32
    rounding level (a plain fp32 mean alone would cost ~3e-5 in y; torch's own
    channels-last CPU GroupNorm loses ~1e-2 here)."""
    x, w, b, add, sc, sh = _inputs((2, 4, 7, 5), 2, layout=layout, offset=1e3)
    outs, grads, fwd, bwd, _ = _run(x, w, b, add, sc, sh, 2, True, block)
    _check_fp(outs, grads, fwd, bwd, 2e-6, f"offset 1e3 {layout}")


def test_offset_nonstationary_group_looping():
    """A group whose channels sit at +1e3 and -1e3 (and a tile whose mean is far
    from the group's): the tile-merged statistics stay exact."""
    x, w, b, add, sc, sh = _inputs((1, 4, 5, 3), 1, opts="wb")
    x[:, :2] += 1e3
    x[:, 2:] -= 1e3
    outs, grads, fwd, bwd, _ = _run(x, w, b, add, sc, sh, 1, False, LOOP)
    # the mean (~0 here) to the rounding of x - K at |x| = 1e3; the rest as above
    assert (outs[1].cpu().double() - fwd[1]).abs().max().item() <= 1e-7 * 1e3
    _check_fp(outs[:1] + outs[2:], grads, fwd[:1] + fwd[2:], bwd, 2e-6, "nonstationary")


@pytest.mark.parametrize("dtype,layout,block", [(torch.float16, "cl", LOOP), (torch.bfloat16, "nchw", LOOP)])
def test_low_precision(dtype, layout, block):
    """y and dx: at most 2x the error of torch's own computation at that dtype
    (+ one eps); the float32 vector gradients and statistics at fp32 level."""
    shape, G = (2, 4, 5, 3), 2
    x, w, b, add, sc, sh = _inputs(shape, G, dtype=dtype, layout=layout)
    (y, mean, rstd), grads, fwd, bwd, dy = _run(x, w, b, add, sc, sh, G, True, block)
    leaves = [v.detach().clone().cpu().to(dtype).requires_grad_() for v in (x, w, b, add, sc, sh)]
    tx, tw, tb, ta, ts, th = leaves
    ty = F.silu(F.group_norm(tx + ta[..., None, None], G, tw, tb, 1e-5) * (1 + ts[..., None, None])
                + th[..., None, None])
    ty.backward(dy.cpu())
    eps = torch.finfo(dtype).eps
    assert _err(y, fwd[0]) <= 2 * _err(ty, fwd[0]) + eps
    assert _err(grads[0], bwd[0]) <= 2 * _err(tx.grad, bwd[0]) + eps
    for ours, ref in list(zip((mean, rstd), fwd[1:])) + list(zip(grads[1:], bwd[1:])):
        assert ours.dtype == torch.float32 and _err(ours, ref) <= 2e-5


@pytest.mark.parametrize("layout,offset,block", [("cl", 0.0, LOOP), ("nchw", 1e3, LOOP)])
def test_float64(layout, offset, block):
    x, w, b, add, sc, sh = _inputs((2, 4, 5, 3), 2, dtype=torch.float64, layout=layout, offset=offset)
    outs, grads, fwd, bwd, _ = _run(x, w, b, add, sc, sh, 2, True, block)
    assert all(t.dtype == torch.float64 for t in outs + tuple(grads))
    _check_fp(outs, grads, fwd, bwd, 1e-12, f"float64 offset={offset} {layout}")


def test_int64_indexing(monkeypatch):
    """The int64 offset variant (used when one sample exceeds int32 indexing)."""
    monkeypatch.setattr(_common, "I64_THRESHOLD", 0)
    for layout, block in (("nchw", None), ("cl", LOOP)):
        outs, grads, fwd, bwd, _ = _run(*_inputs((2, 6, 3, 5), 3, layout=layout), 3, True, block)
        _check_fp(outs, grads, fwd, bwd, 2e-5, f"int64 {layout}")


def test_deterministic():
    args = _inputs((2, 8, 5, 3), 2, layout="cl")
    _, mean, rstd = tgn.group_norm_act(*args, 2, 1e-5, True)
    dy = torch.randn(args[0].shape).to(DEV)
    g1 = tgn.group_norm_act_backward(dy, *args, mean, rstd, 2, True, block=LOOP)
    g2 = tgn.group_norm_act_backward(dy, *args, mean, rstd, 2, True, block=LOOP)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_geometry():
    """One tile holds a group when it fits the budget; otherwise the tiles are
    capped, the contiguous axis is filled first, and the budget override works."""
    g = tgn._Geometry("fwd", 40, 64, False, False, None)
    assert g.single and (g.block_d, g.block_s) == (64, 64)
    g = tgn._Geometry("fwd", 10, 96 * 96, False, False, None)
    assert not g.single and g.block_d * g.block_s <= tgn.LOOP_TILE["fwd"] and g.block_d == 1
    g = tgn._Geometry("bwd", 20, 32 * 32, True, False, None)
    assert not g.single and g.block_d == 32 and g.block_d * g.block_s <= tgn.LOOP_TILE["bwd"]
    g = tgn._Geometry("fwd", 3, 35, True, False, LOOP)
    assert not g.single and (g.block_d, g.block_s) == (4, 4)
    assert tgn._Geometry("fwd", 64, 128, False, False, None).single
    assert not tgn._Geometry("fwd", 64, 128, False, True, None).single  # float64: half the budget


def _vecs(**kw):
    C, N = 6, 2
    base = dict(weight=torch.randn(C), bias=torch.randn(C), add=torch.randn(N, C), scale=torch.randn(N, C),
                shift=torch.randn(N, C))
    base.update(kw)
    return [None if v is None else v.to(DEV) for v in base.values()]


@pytest.mark.parametrize("kw,match", [
    (dict(weight=torch.randn(5)), "weight"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), "bias"),
    (dict(add=torch.randn(6)), "add"),
    (dict(scale=torch.randn(2, 6, dtype=torch.float64)), "scale"),
    (dict(shift=torch.randn(3, 6)), "shift"),
])
def test_checks_vectors(kw, match):
    x = torch.randn(2, 6, 3, device=DEV)
    with pytest.raises(RuntimeError, match=match):
        tgn.group_norm_act(x, *_vecs(**kw), 3, 1e-5, True)
    with pytest.raises(RuntimeError, match=match):
        tgn.group_norm_act_backward(x, x, *_vecs(**kw), torch.zeros(2, 3, device=DEV),
                                    torch.ones(2, 3, device=DEV), 3, True)


def test_checks_x_groups_stats():
    x = torch.randn(2, 6, 3, device=DEV)
    none5 = [None] * 5
    with pytest.raises(RuntimeError, match="groups"):
        tgn.group_norm_act(x, *none5, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match="x must"):
        tgn.group_norm_act(torch.randn(6, device=DEV), *none5, 3, 1e-5, True)
    with pytest.raises(RuntimeError, match="x must"):
        tgn.group_norm_act(x.to(torch.int32), *none5, 3, 1e-5, True)
    with pytest.raises(RuntimeError, match="no elements"):
        tgn.group_norm_act(torch.randn(2, 6, 0, device=DEV), *none5, 3, 1e-5, True)
    m, r = torch.zeros(2, 3, device=DEV), torch.ones(2, 3, device=DEV)
    with pytest.raises(RuntimeError, match="mean"):
        tgn.group_norm_act_backward(x, x, *none5, torch.zeros(2, 2, device=DEV), r, 3, True)
    with pytest.raises(RuntimeError, match="rstd"):
        tgn.group_norm_act_backward(x, x, *none5, m, r.double(), 3, True)
    with pytest.raises(RuntimeError, match="grad_y"):
        tgn.group_norm_act_backward(x.half(), x, *none5, m, r, 3, True)
