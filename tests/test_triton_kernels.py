"""What only the Triton step-family kernels (fastdiff.triton) have: Philox bit
identity, the tiling geometry, multi-chunk programs (forced tiny tiles), int64
indexing, float64 and the launchers' checks. Their correctness on every shape,
dtype, layout and option runs with the other backends in tests/test_ops.py.

Without a GPU they run under the Triton interpreter on CPU tensors (slow:
small shapes only); with one, on CUDA tensors.
"""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402

pytest.importorskip("triton")

import fastdiff.triton as ft  # noqa: E402
from fastdiff.reference import diffusion as ref  # noqa: E402
from fastdiff.reference.noise import noise_like, philox4x32, philox_normal, split_key  # noqa: E402
from fastdiff.triton import _common  # noqa: E402
from fastdiff.ops._layout import canonical, is_batch_major_dense  # noqa: E402
from fastdiff.triton._philox import normals, philox_words  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
PRED = ("epsilon", "sample", "v_prediction")


def _dev(*ts):
    return [None if v is None else v.to(DEV) for v in ts]


def _check(out, ref64, ref_lowp, dtype, what=""):
    """fp32: 2e-5 relative to max(1, |ref|); fp64: 1e-10; fp16/bf16: at most
    2x the error of the same maths done by PyTorch at that dtype + one eps."""
    out64 = out.detach().cpu().to(torch.float64)
    assert out64.shape == ref64.shape, what
    assert out.dtype == dtype, what
    assert torch.equal(torch.isnan(out64), torch.isnan(ref64)), f"{what}: NaN pattern differs"
    o, r = torch.nan_to_num(out64), torch.nan_to_num(ref64)
    if r.numel() == 0:
        return
    scale = max(1.0, r.abs().max().item())
    err = (o - r).abs().max().item()
    if dtype == torch.float32:
        assert err <= 2e-5 * scale, f"{what}: fp32 error {err:.3g} (scale {scale:.3g})"
    elif dtype == torch.float64:
        assert err <= 1e-10 * scale, f"{what}: fp64 error {err:.3g}"
    else:
        lowp = (torch.nan_to_num(ref_lowp.cpu().to(torch.float64)) - r).abs().max().item()
        floor = torch.finfo(dtype).eps * scale
        assert err <= 2 * lowp + floor, f"{what}: {dtype} error {err:.3g} vs plain-torch {lowp:.3g}"


def _t(n, gen, lo=0, hi=1000):
    return torch.randint(lo, hi, (n,), generator=gen)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiny tiles (two per program), so that small tensors span several chunks per sample."""
    monkeypatch.setattr(_common, "TILE_CONFIGS", {k: (32, 1, 2) for k in _common.TILE_CONFIGS})
    monkeypatch.setattr(_common, "MIN_PROGRAMS", 1)


# ---------------------------------------------------------------- Philox ----
def test_philox_words_bit_identical():
    g = torch.cat([torch.arange(256), torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 5,
                                                   2**40 + 12345, 2**52 + 3, 2**62 + 7, 2**63 - 1]),
                   torch.randint(0, 2**62, (64,), generator=torch.Generator().manual_seed(0))])
    for key in ([0, 0], [987654321012, 3], [42, 1 << 40], [-5, -7], [2**63 - 1, -(2**63)]):
        key = torch.tensor(key, dtype=torch.int64)
        s_lo, s_hi, o_lo, o_hi = split_key(key)
        want = torch.stack(philox4x32(g & 0xFFFFFFFF, g >> 32, torch.full_like(g, o_lo), torch.full_like(g, o_hi),
                                      s_lo, s_hi), 1)
        got = philox_words(g.to(DEV), key.to(DEV)).cpu()
        assert torch.equal(got, want), f"key {key.tolist()}"


@pytest.mark.parametrize("start", [0, 4, 2**34 + 8])
def test_normals_match_reference(start):
    key = torch.tensor([987654321012, (1 << 40) + 3], dtype=torch.int64)
    z = normals(key.to(DEV), 3000, start=start).cpu().double()
    zr = philox_normal(key, 3000, start=start)
    # float32 Box-Muller: u is rounded to float32, which dominates near u = 1
    assert (z - zr).abs().max().item() < 1e-4
    assert torch.isfinite(z).all()


def test_layout_rule():
    x = torch.randn(2, 3, 4, 5)
    assert is_batch_major_dense(x) and is_batch_major_dense(x.contiguous(memory_format=torch.channels_last))
    assert not is_batch_major_dense(x.transpose(0, 1).contiguous().transpose(0, 1))
    assert not is_batch_major_dense(x[:, ::2])
    assert is_batch_major_dense(x[:1].transpose(1, 3))  # one sample: any dense order
    assert canonical(x[:, ::2]).is_contiguous()


def test_tiling_geometry():
    t = _common.Tiling("step", 3_000_000, 3)  # huge N, tiny samples: flat 1-D grid
    assert t.grid == (3_000_000,) and t.block == 16 and not t.aligned
    t = _common.Tiling("step", 7, 12288)
    assert t.aligned and t.chunks == 12288 // t.block and not t.i64
    t = _common.Tiling("step", 2, 5000)  # unaligned: room for the 3-element shift
    assert t.chunks == -(-(5000 + 3) // t.block)
    assert _common.Tiling("loss", 70000, 40000).i64
    t = _common.Tiling("loss", 64, 3 * 256 * 256)  # big batch: several tiles per program
    assert t.tiles == _common.TILE_CONFIGS["loss"][2] and t.chunks == 3 * 256 * 256 // (t.block * t.tiles)
    assert _common.Tiling("loss", 2, 3 * 256 * 256).tiles == 1  # small batch: more programs instead


# ------------------------------------------------------------- q_sample ----
@pytest.mark.parametrize("shape", [(3, 37), (2, 64), (4, 3, 5)])
def test_q_sample_rng_multi_chunk(small_tiles, shape):
    """Several tiles per sample, sample starts not on a multiple of 4."""
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(shape, generator=g)
    t = _t(shape[0], g)
    key = torch.tensor([5, 6], dtype=torch.int64)
    xt, nz = ft.q_sample_rng(*_dev(x0, t, ABAR, key), True)
    z64 = noise_like(x0, key)
    _check(nz, z64, z64, torch.float32, "noise")
    _check(xt, ref.q_sample(x0.double(), t, ABAR, z64), None, torch.float32, "x_t")


def test_q_sample_float64_and_int64_indexing(monkeypatch):
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    nz = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    t = _t(3, g)
    out = ft.q_sample(*_dev(x0, t, ABAR, nz))
    _check(out, ref.q_sample(x0, t, ABAR, nz), None, torch.float64, "x_t f64")
    monkeypatch.setattr(_common, "I64_THRESHOLD", 0)  # force the int64 index path
    out2 = ft.q_sample(*_dev(x0, t, ABAR, nz))
    assert torch.equal(out.cpu(), out2.cpu())
    key = torch.tensor([3, 4], dtype=torch.int64)
    xt, nzk = ft.q_sample_rng(*_dev(x0, t, ABAR, key), True)
    z64 = noise_like(x0, key)
    assert (nzk.cpu() - z64).abs().max().item() < 1e-4  # float32 Box-Muller
    torch.testing.assert_close(xt.cpu(), ref.q_sample(x0, t, ABAR, nzk.cpu()), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- loss ----
@pytest.mark.parametrize("shape", [(3, 37), (2, 3, 5, 7)])
@pytest.mark.parametrize("target", [0, 2])
def test_diffusion_loss_multi_chunk(small_tiles, shape, target):
    g = torch.Generator().manual_seed(13)
    x0 = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last) if len(shape) == 4 else \
        torch.randn(shape, generator=g)
    t = _t(shape[0], g)
    w = torch.rand(shape[0], generator=g) + 0.5
    key = torch.tensor([1, 2], dtype=torch.int64)
    per, grad = ft.diffusion_loss(*_dev(out, x0, t, ABAR, None, key, w), target, True)
    per64, g64 = ref.diffusion_loss(out.double(), x0.double(), t, ABAR, noise_like(x0, key), w, PRED[target])
    torch.testing.assert_close(per.cpu().double(), per64, rtol=1e-5, atol=1e-7)
    _check(grad, g64, None, torch.float32, "grad")


def test_diffusion_loss_float64():
    g = torch.Generator().manual_seed(14)
    x0, out, nz = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = _t(2, g)
    w = torch.rand(2, generator=g) + 0.5
    per, grad = ft.diffusion_loss(*_dev(out, x0, t, ABAR, nz, None, w), 2, True)
    per64, g64 = ref.diffusion_loss(out, x0, t, ABAR, nz, w, "v_prediction")
    assert per.dtype == torch.float64
    torch.testing.assert_close(per.cpu(), per64, rtol=1e-12, atol=1e-14)
    _check(grad, g64, None, torch.float64, "grad")


# ---------------------------------------------------------- reverse steps ---
CLIPS = [("none", 0.0), ("clip", 1.0), ("thresh", 0.0), ("thresh+clip", 2.0)]


def _thresh(n, gen):
    return (torch.rand(n, generator=gen) * 2 + 1).to(torch.float32)


def _ddpm_case(pred, var, clip, noise_mode, shape=(4, 3, 5, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g).to(dtype)
    o = torch.randn(shape, generator=g).to(dtype)
    mv = (torch.rand(shape, generator=g) * 2 - 1) if var == 5 else (torch.rand(shape, generator=g) * 0.02 + 1e-4)
    mv = mv.to(dtype) if var >= 4 else None
    t = torch.tensor([0, 1, 500, 999])[: shape[0]]
    tp = torch.tensor([-1, 0, 480, 979])[: shape[0]]  # the final step, and a respaced chain
    th = _thresh(shape[0], g) if clip[0].startswith("thresh") else None
    key = torch.tensor([7, 9], dtype=torch.int64)
    z = noise_like(canonical(x), key)
    nz = z.to(dtype) if noise_mode == "tensor" else None
    k = key if noise_mode == "key" else None
    prev, x0 = ft.ddpm_step(*_dev(o, x, t, tp, ABAR, mv, nz, k, th), pred, var, clip[1])
    zr = None if noise_mode == "none" else (nz.double() if noise_mode == "tensor" else z)
    kw = dict(noise=zr, model_var=None if mv is None else mv.double(), prediction_type=PRED[pred],
              variance_type=ref.VARIANCE_TYPES[var], clip_range=clip[1], thresh=th)
    p64, x064 = ref.ddpm_step(o.double(), x.double(), t, tp, ABAR, **kw)
    return prev, x0, p64, x064, (o, x, t, tp, kw)


def _ddim(pred, eta, clip, use_clipped, final, noise_mode="key", dtype=torch.float32, shape=(4, 3, 5, 7)):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=g).to(dtype)
    o = torch.randn(shape, generator=g).to(dtype)
    t = torch.tensor([20, 1, 500, 999])[: shape[0]]
    tp = torch.tensor([-1, 0, 480, 979])[: shape[0]]
    th = _thresh(shape[0], g) if clip[0].startswith("thresh") else None
    key = torch.tensor([11, 0], dtype=torch.int64)
    z = noise_like(x, key)
    nz = z.to(dtype) if noise_mode == "tensor" else None
    k = key if noise_mode == "key" else None
    prev, x0 = ft.ddim_step(*_dev(o, x, t, tp, ABAR, nz, k, th), pred, clip[1], eta, final, use_clipped)
    zr = None if noise_mode == "none" else (nz.double() if noise_mode == "tensor" else z)
    kw = dict(noise=zr, eta=eta, prediction_type=PRED[pred], clip_range=clip[1], thresh=th,
              final_alpha_cumprod=final, use_clipped_model_output=use_clipped)
    p64, x064 = ref.ddim_step(o.double(), x.double(), t, tp, ABAR, **kw)
    return prev, x0, p64, x064, (o, x, t, tp, kw)


def test_steps_multi_chunk(small_tiles):
    for shape in [(2, 3, 5, 7), (4, 1, 8, 8)]:
        prev, x0, p64, x064, _ = _ddpm_case(1, 0, ("thresh", 0.0), "key", shape=shape)
        _check(prev, p64, None, torch.float32, f"ddpm prev {shape}")
        prev, x0, p64, x064, _ = _ddim(0, 1.0, ("none", 0.0), False, 1.0, shape=shape)
        _check(prev, p64, None, torch.float32, f"ddim prev {shape}")


def test_argument_errors():
    x = torch.randn(2, 3).to(DEV)
    t = torch.tensor([1, 2]).to(DEV)
    a = ABAR.to(DEV)
    key = torch.tensor([1, 2], dtype=torch.int64).to(DEV)
    with pytest.raises(ValueError, match="exactly one of noise, key"):
        ft.diffusion_loss(x, x, t, a, None, None, torch.ones(2).to(DEV), 0, False)
    with pytest.raises(ValueError, match="noise or key"):
        ft.ddpm_step(x, x, t, t - 1, a, None, x, key, None, 0, 0, 0.0)
    with pytest.raises(ValueError, match="need model_var"):
        ft.ddpm_step(x, x, t, t - 1, a, None, None, None, None, 0, 4, 0.0)
    with pytest.raises(TypeError, match="t must be int64"):
        ft.q_sample(x, t.int(), a, x)


# ------------------------------------------------------------ GPU only ------
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_huge_batch_and_large_sample():
    """N beyond the 65535 grid-dimension limit, and samples spanning many tiles."""
    key = torch.tensor([123, 456], dtype=torch.int64, device="cuda")
    for shape in [(200_000, 3), (100_001, 8), (3, 3, 257, 129)]:
        x0 = torch.randn(shape, device="cuda")
        t = torch.randint(0, 1000, (shape[0],), device="cuda")
        xt, nz = ft.q_sample_rng(x0, t, ABAR.cuda(), key, True)
        z64 = noise_like(x0, key.cpu()).cpu()
        assert (nz.cpu().double() - z64).abs().max().item() < 2e-4
        r = ref.q_sample(x0.cpu().double(), t.cpu(), ABAR, nz.cpu().double())
        assert (xt.cpu().double() - r).abs().max().item() < 1e-5
        w = torch.rand(shape[0], device="cuda")
        per, _ = ft.diffusion_loss(x0, x0, t, ABAR.cuda(), nz, None, w, 0, False)
        per64, _ = ref.diffusion_loss(x0.cpu().double(), x0.cpu().double(), t.cpu(), ABAR, nz.cpu().double(),
                                      w.cpu(), "epsilon")
        torch.testing.assert_close(per.cpu().double(), per64, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    x = torch.randn(4, 3, 32, 32, device="cuda")
    o = torch.randn_like(x)
    t = torch.randint(1, 1000, (4,), device="cuda")
    tp = t - 1
    a = ABAR.cuda()
    key = torch.tensor([1, 0], dtype=torch.int64, device="cuda")

    def run():
        xt, _ = ft.q_sample_rng(x, t, a, key, False)
        prev, _ = ft.ddpm_step(o, xt, t, tp, a, None, None, key, None, 0, 0, 1.0)
        prev2, _ = ft.ddim_step(o, prev, t, tp, a, None, key, None, 0, 1.0, 1.0, 1.0, False)
        per, _ = ft.diffusion_loss(o, x, t, a, None, key, torch.ones(4, device="cuda"), 2, False)
        return prev2, per

    eager = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    key.copy_(torch.tensor([1, 0]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static[0], eager[0]) and torch.equal(static[1], eager[1])
    key.copy_(torch.tensor([2, 0]))  # the key is read on the device: new noise on replay
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(static[0], eager[0])
