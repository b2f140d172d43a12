"""fastdiff.nn.upsample_conv: nearest x2 + 3x3 conv as four 2x2 phase convs,
and its use in fastdiff.nn.Upsample and in patched diffusers Upsample2D.

Exact identity in float64 (the folded kernels only regroup sums); in lower
precision the error against a float64 reference is bounded by the stock
path's own error (FACTOR x, plus a few ulps of the output's scale)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import nn as fnn
from fastdiff.nn import layers as L

FACTOR = 3.0


def _stock(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


def _case(n, ci, co, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g, dtype=torch.float64)
    k = torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / (3 * ci ** 0.5)
    b = torch.randn(co, generator=g, dtype=torch.float64)
    return x.to(dtype), k.to(dtype), b.to(dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 4, 5, 7), (3, 8, 2, 1, 6), (1, 16, 16, 4, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_is_exact_in_float64(shape, bias):
    x, k, b = _case(*shape)
    b = b if bias else None
    out = fnn.upsample_conv(x, k, b)
    ref = _stock(x, k, b)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "row_slice", "transposed_hw"])
def test_upsample_conv_layouts(layout):
    x, k, b = _case(2, 6, 5, 5, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "row_slice":
        x = torch.cat([x, x], 2)[:, :, ::2]  # every other row: strided, neither layout
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    out = fnn.upsample_conv(x, k, b)
    torch.testing.assert_close(out, _stock(x, k, b), rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_upsample_conv_gradients():
    x, k, b = (t.requires_grad_() for t in _case(2, 3, 2, 3, 2))
    assert torch.autograd.gradcheck(fnn.upsample_conv, (x, k, b))
    assert torch.autograd.gradgradcheck(fnn.upsample_conv, (x, k, b))
    # and the same gradients as the stock pair
    g = torch.randn(2, 2, 6, 4, dtype=torch.float64)
    ours = torch.autograd.grad(fnn.upsample_conv(x, k, b), (x, k, b), g)
    ref = torch.autograd.grad(_stock(x, k, b), (x, k, b), g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_upsample_conv_low_precision_error_bounded_by_stock(dtype):
    if dtype == torch.float16:  # CPU half convs exist in recent torch only
        try:
            F.conv2d(torch.ones(1, 1, 2, 2, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype))
        except RuntimeError:
            pytest.skip("no float16 conv on this CPU build")
    x64, k64, b64 = _case(2, 32, 16, 9, 6, seed=3)
    ref = _stock(x64, k64, b64)
    x, k, b = x64.to(dtype), k64.to(dtype), b64.to(dtype)
    e_stock = (_stock(x, k, b).double() - ref).abs().max().item()
    e_ours = (fnn.upsample_conv(x, k, b).double() - ref).abs().max().item()
    floor = 2 * torch.finfo(dtype).eps * ref.abs().max().item()
    assert e_ours <= FACTOR * e_stock + floor, (e_ours, e_stock)


def test_upsample_phase_weights_fold_the_kernel_rows_and_columns():
    k = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)  # rows (0 1 2) (3 4 5) (6 7 8)
    ph, pb = fnn.layers.upsample_phase_weights(k, torch.tensor([2.0], dtype=torch.float64))
    assert ph.shape == (4, 1, 2, 2) and pb.tolist() == [2.0] * 4
    # phase (0, 0): rows (w0, w1 + w2), then columns the same way
    assert ph[0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert ph[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_upsample_conv_bad_input():
    x, k, b = _case(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="x must be 4-D"):
        fnn.upsample_conv(x[0], k, b)
    with pytest.raises(ValueError, match="weight must be"):
        fnn.upsample_conv(x, k[:, :3], b)
    with pytest.raises(ValueError, match=r"weight must be a \(Cout, Cin, 3, 3\)"):
        fnn.upsample_conv(x, k[..., :2], b)
    with pytest.raises(ValueError, match="bias must have shape"):
        fnn.upsample_conv(x, k, b[:1])
    empty = fnn.upsample_conv(x[:0], k, b)
    assert empty.shape == (0, 2, 6, 6)


# ------------------------------------------------------ fastdiff.nn.Upsample --
def test_upsample_module_matches_unfused_and_caches_only_without_grad():
    torch.manual_seed(0)
    up = fnn.Upsample(6)
    x = torch.randn(2, 6, 5, 3)
    with fnn.unfused():
        ref = up(x)
    torch.testing.assert_close(up(x), ref, rtol=1e-5, atol=1e-5)
    assert "_fastdiff_upsample_phase" not in up.__dict__  # grad enabled, parameters require grad: no cache
    with torch.no_grad():
        torch.testing.assert_close(up(x), ref, rtol=1e-5, atol=1e-5)
        cached = up.__dict__["_fastdiff_upsample_phase"][1][0]
        up(x)
        assert up.__dict__["_fastdiff_upsample_phase"][1][0] is cached  # reused
        up.conv.weight.mul_(2)  # an in-place update (optimizer step, load_state_dict): recomputed
        with fnn.unfused():
            ref2 = up(x)
        torch.testing.assert_close(up(x), ref2, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        up.conv.bias.add_(1)
        with fnn.unfused():
            ref3 = up(x)
        torch.testing.assert_close(up(x), ref3, rtol=1e-5, atol=1e-5)
    # training still reaches the conv's parameters
    up(x).square().sum().backward()
    assert up.conv.weight.grad is not None and up.conv.bias.grad is not None
    assert fnn.Upsample(6).state_dict().keys() == up.state_dict().keys() == {"conv.weight", "conv.bias"}


def test_upsample_module_under_compile():
    torch.manual_seed(1)
    up = fnn.Upsample(4).eval()
    x = torch.randn(1, 4, 3, 5)
    with torch.no_grad():
        ref = up(x)
        out = torch.compile(up, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_upsample_conv(dtype, channels_last):
    x64, k64, b64 = _case(2, 64, 32, 17, 12, seed=5)
    ref = _stock(x64, k64, b64)
    x, k, b = x64.to("cuda", dtype), k64.to("cuda", dtype), b64.to("cuda", dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    e_stock = (_stock(x, k, b).double().cpu() - ref).abs().max().item()
    out = fnn.upsample_conv(x, k, b)
    e_ours = (out.double().cpu() - ref).abs().max().item()
    assert e_ours <= FACTOR * e_stock + 2 * torch.finfo(dtype).eps * ref.abs().max().item(), (e_ours, e_stock)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # gradients: against float64 on the CPU, no worse than the stock pair's
    g64 = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    leaves64 = [t.clone().requires_grad_() for t in (x64, k64, b64)]
    grads64 = torch.autograd.grad(_stock(*leaves64), leaves64, g64)
    x, k, b = (t.requires_grad_() for t in (x, k, b))
    g = g64.to("cuda", dtype)
    ours = torch.autograd.grad(fnn.upsample_conv(x, k, b), (x, k, b), g)
    stock = torch.autograd.grad(_stock(x, k, b), (x, k, b), g)
    for a, s, r in zip(ours, stock, grads64):
        e_a, e_s = ((t.double().cpu() - r).abs().max().item() for t in (a, s))
        assert e_a <= FACTOR * e_s + 2 * torch.finfo(dtype).eps * r.abs().max().item(), (e_a, e_s)


# -------------------------------------------------- diffusers Upsample2D ----
@pytest.fixture(autouse=False)
def diffusers():
    return pytest.importorskip("diffusers")


def _up2d(**kw):
    from diffusers.models.upsampling import Upsample2D
    torch.manual_seed(2)
    m = Upsample2D(8, **{"use_conv": True, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("name", ["conv", "Conv2d_0"])
def test_patch_upsample2d_matches_and_unpatches(diffusers, name):
    from diffusers.models.upsampling import Upsample2D
    m = _up2d(name=name)
    x = torch.randn(2, 8, 5, 6)
    ref = m(x)
    ref_sized = m(x, output_size=(10, 12))
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    report = fnn.patch(m)
    assert report.counts == {"upsample": 1} and type(m) is not Upsample2D and isinstance(m, Upsample2D)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x, output_size=(10, 12)), ref_sized, rtol=1e-5, atol=1e-5)
    assert m.state_dict().keys() == sd.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    # gradients reach the conv's parameters as in the stock module
    xg = x.clone().requires_grad_()
    m(xg).square().sum().backward()
    conv = getattr(m, name)
    assert xg.grad is not None and conv.weight.grad is not None
    assert fnn.patch(m).total == 0  # patching twice finds nothing new
    assert fnn.unpatch(m).counts == {"upsample": 1} and type(m) is Upsample2D
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)


def test_patched_upsample2d_falls_back_where_it_must(diffusers, monkeypatch):
    m = _up2d()
    fnn.patch(m)
    x = torch.randn(1, 8, 4, 5)
    calls = []
    monkeypatch.setattr(fnn.patching, "upsample_conv", lambda *a, **k: calls.append(1) or L.upsample_conv(*a, **k))
    m(x)
    assert calls == [1]
    m(x, output_size=(9, 11))  # not twice the input: the stock interpolate to that size
    assert m(x, output_size=(9, 11)).shape == (1, 8, 9, 11) and calls == [1]
    seen = []
    h = m.conv.register_forward_hook(lambda *a: seen.append(1))
    m(x)  # a hooked conv runs as a module, so its hook fires
    assert seen == [1] and calls == [1]
    h.remove()


@pytest.mark.parametrize("kw, why", [
    (dict(norm_type="ln_norm", eps=1e-5, elementwise_affine=True), "LayerNorm"),
    (dict(kernel_size=5, padding=2), "not 3x3"),
])
def test_patch_skips_other_upsample2d_with_a_reason(diffusers, kw, why):
    m = _up2d(**kw)
    report = fnn.patch(m)
    assert report.total == 0 and why in report.skipped["<root>"]
    plain = _up2d(use_conv=False)
    assert fnn.patch(plain).total == 0 and not fnn.patch(plain).skipped  # no conv: nothing to fuse, no noise
    transposed = _up2d(use_conv=False, use_conv_transpose=True)
    assert fnn.patch(transposed).total == 0


def test_patched_upsample2d_pickles_in_a_fresh_process(diffusers, monkeypatch):
    m = _up2d()
    fnn.patch(m)
    x = torch.randn(1, 8, 3, 3)
    blob = pickle.dumps(m)
    from fastdiff.nn import patching as patch_mod
    monkeypatch.delitem(patch_mod.__dict__, "FusedUpsample2D")
    monkeypatch.setattr(patch_mod, "_FUSED_CLASSES", {})
    fresh = pickle.loads(blob)
    assert type(fresh).__name__ == "FusedUpsample2D"
    torch.testing.assert_close(fresh(x), m(x))
    clone = copy.deepcopy(m)
    torch.testing.assert_close(clone(x), m(x))
