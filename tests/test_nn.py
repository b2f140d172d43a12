"""fastdiff.nn: the fused U-Net modules and the DDPM U-Net.

Every fused module is compared, forward and backward, with an unfused
re-implementation built from torch.nn.functional and the *same* parameters;
the U-Net is checked for the published parameter counts, shapes, layouts,
autocast and torch.compile(fullgraph=True).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiff
from fastdiff import nn as fnn
from fastdiff.nn import layers as L

TOL = dict(rtol=1e-4, atol=1e-5)


def _randomize_(module: nn.Module, scale: float = 0.2, seed: int = 0) -> nn.Module:
    """Nonzero, non-default values everywhere (the zero-initialised convs and
    unit norm weights would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def _grads(module: nn.Module, *inputs: torch.Tensor) -> dict:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    for i, x in enumerate(inputs):
        out[f"input{i}"] = x.grad.clone()
    return out


def _assert_grads_close(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in b.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rel, atol=rel * scale, msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------- GroupNormAct ----
@pytest.mark.parametrize("shape,groups,channels_last", [((2, 12, 5, 7), 4, False), ((2, 12, 5, 7), 4, True),
                                                        ((1, 6, 3, 3), 3, True), ((3, 10, 6), 5, False)])
@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_act_matches_torch(shape, groups, channels_last, act, affine):
    torch.manual_seed(0)
    m = _randomize_(fnn.GroupNormAct(groups, shape[1], eps=1e-5, affine=affine, act=act))
    ref = nn.GroupNorm(groups, shape[1], eps=1e-5, affine=affine)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(shape) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = m(x1)
    yr = ref(x2)
    yr = F.silu(yr) if act else yr
    torch.testing.assert_close(y, yr, **TOL)
    assert y.shape == x.shape and y.dtype == x.dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn(shape)
    y.backward(gy)
    yr.backward(gy)
    _assert_grads_close(_grads(m, x1), _grads(ref, x2))


def test_group_norm_act_add_scale_shift():
    torch.manual_seed(1)
    N, C, G = 2, 8, 2
    m = _randomize_(fnn.GroupNormAct(G, C))
    x = torch.randn(N, C, 4, 3)
    add, scale, shift = torch.randn(N, C), torch.randn(N, C) * 0.3, torch.randn(N, C)
    y = m(x, add=add, scale=scale, shift=shift)
    h = F.group_norm(x + add[:, :, None, None], G, m.weight, m.bias, m.eps)
    ref = F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
    torch.testing.assert_close(y, ref, **TOL)


def test_from_group_norm_shares_parameters():
    gn = _randomize_(nn.GroupNorm(4, 12, eps=1e-6))
    m = fnn.GroupNormAct.from_group_norm(gn, act=True)
    assert m.weight is gn.weight and m.bias is gn.bias
    assert isinstance(m, nn.GroupNorm) and m.eps == 1e-6 and m.num_groups == 4 and m.act
    assert m.state_dict().keys() == gn.state_dict().keys()
    x = torch.randn(2, 12, 3, 5)
    torch.testing.assert_close(m(x), F.silu(gn(x)), **TOL)
    plain = fnn.GroupNormAct.from_group_norm(nn.GroupNorm(3, 6, affine=False), act=False)
    assert plain.weight is None and plain.bias is None
    x = torch.randn(2, 6, 4)
    torch.testing.assert_close(plain(x), F.group_norm(x, 3, eps=1e-5), **TOL)
    with pytest.raises(TypeError, match="gn"):
        fnn.GroupNormAct.from_group_norm(nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"\(N, 12"):
        m(torch.randn(2, 10, 3, 3))


# ------------------------------------------------------------ timesteps -----
def test_timestep_embedding_values():
    t = torch.tensor([0, 1, 37, 999])
    dim = 10
    emb = fnn.timestep_embedding(t, dim)
    assert emb.shape == (4, 10) and emb.dtype == torch.float32
    half = dim // 2
    for n, tv in enumerate(t.tolist()):
        for i in range(half):
            f = 10000.0 ** (-i / (half - 1))
            assert emb[n, i].item() == pytest.approx(math.sin(tv * f), abs=2e-4)
            assert emb[n, half + i].item() == pytest.approx(math.cos(tv * f), abs=2e-4)
    odd = fnn.timestep_embedding(t.float() + 0.5, 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)
    assert fnn.timestep_embedding(t.double(), 6).dtype == torch.float64
    with pytest.raises(ValueError, match="t must have shape"):
        fnn.timestep_embedding(t[None], 8)
    with pytest.raises(ValueError, match="dim"):
        fnn.timestep_embedding(t, 0)


def test_timestep_embedding_matches_diffusers_convention():
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 3, 250, 999])
    ours = fnn.timestep_embedding(t, 32)
    theirs = emb_mod.get_timestep_embedding(t, 32, flip_sin_to_cos=False, downscale_freq_shift=1)
    # float32 arguments near t=999 carry ~6e-5 rounding either way
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)


def test_time_embedding_module():
    m = fnn.TimeEmbedding(16, 64)
    e = m(torch.tensor([1, 500, 999]))
    assert e.shape == (3, 64)
    ref = m.fc2(F.silu(m.fc1(fnn.timestep_embedding(torch.tensor([1, 500, 999]), 16))))
    torch.testing.assert_close(e, ref)


# -------------------------------------------------------------- ResBlock ----
def _resblock_unfused(b: fnn.ResBlock, x, temb):
    h = F.silu(F.group_norm(x, b.norm1.num_groups, b.norm1.weight, b.norm1.bias, b.norm1.eps))
    h = b.conv1(h)
    e = b.temb_proj(F.silu(temb))[:, :, None, None]
    if b.scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = F.group_norm(h, b.norm2.num_groups, b.norm2.weight, b.norm2.bias, b.norm2.eps) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, b.norm2.num_groups, b.norm2.weight, b.norm2.bias, b.norm2.eps)
    h = b.conv2(F.silu(h))
    skip = x if isinstance(b.skip, nn.Identity) else b.skip(x)
    return skip + h


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("in_ch,out_ch", [(8, 8), (8, 12)])
def test_resblock_matches_unfused(scale_shift, in_ch, out_ch):
    torch.manual_seed(2)
    b = _randomize_(fnn.ResBlock(in_ch, out_ch, temb_ch=10, groups=4, scale_shift=scale_shift)).eval()
    assert b.temb_proj.out_features == out_ch * (2 if scale_shift else 1)
    assert isinstance(b.skip, nn.Conv2d) == (in_ch != out_ch)
    x = torch.randn(2, in_ch, 6, 5)
    temb = torch.randn(2, 10)
    x1, t1 = x.clone().requires_grad_(), temb.clone().requires_grad_()
    x2, t2 = x.clone().requires_grad_(), temb.clone().requires_grad_()
    y = b(x1, t1)
    y.square().sum().backward()
    g1 = _grads(b, x1, t1)
    b.zero_grad()
    yr = _resblock_unfused(b, x2, t2)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, **TOL)
    _assert_grads_close(g1, _grads(b, x2, t2))


def test_resblock_zero_init_and_dropout():
    b = fnn.ResBlock(8, 8, temb_ch=4, groups=4, dropout=0.5, zero_init=True).eval()
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(b(x, torch.randn(1, 4)), x)  # identity at init
    b = fnn.ResBlock(8, 8, temb_ch=None, groups=4)
    assert b(x).shape == x.shape
    with pytest.raises(ValueError, match="temb"):
        fnn.ResBlock(8, 8, temb_ch=4, groups=4)(x)


# -------------------------------------------------------- AttentionBlock ----
def _attention_unfused(a: fnn.AttentionBlock, x):
    N, C, H, W = x.shape
    h = F.group_norm(x, a.norm.num_groups, a.norm.weight, a.norm.bias, a.norm.eps)
    qkv = a.qkv(h).reshape(N, 3 * C, H * W)
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(N, a.heads, a.head_dim, H * W).permute(0, 1, 3, 2).contiguous()
               for i in range(3))
    o = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, hd)
    o = o.permute(0, 1, 3, 2).reshape(N, C, H, W)
    return x + a.proj(o)


@pytest.mark.parametrize("heads,head_dim", [(1, None), (None, 4)])
@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_matches_unfused(heads, head_dim, fused, channels_last):
    torch.manual_seed(3)
    a = _randomize_(fnn.AttentionBlock(12, heads=heads, head_dim=head_dim, groups=4, fused=fused))
    assert a.heads == (1 if head_dim is None else 3)
    x = torch.randn(2, 12, 5, 3)
    if channels_last:
        a = a.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = a(x1)
    y.square().sum().backward()
    g1 = _grads(a, x1)
    a.zero_grad()
    yr = _attention_unfused(a, x2)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, **TOL)
    _assert_grads_close(g1, _grads(a, x2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_reads_qkv_views(monkeypatch, channels_last):
    """q, k, v reach fastdiff.attention as strided views of the one qkv
    output (no permute copies); channels_last makes head_dim unit-stride."""
    seen = {}
    orig = L._attention

    def spy(q, k, v, scale=None, *, fused=None):
        seen.update(q=q, k=k, v=v)
        return orig(q, k, v, scale, fused=fused)

    monkeypatch.setattr(L, "_attention", spy)
    a = fnn.AttentionBlock(8, heads=2, groups=4)
    x = torch.randn(2, 8, 4, 6)
    if channels_last:
        a, x = a.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    a(x)
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert q.shape == k.shape == v.shape == (2, 2, 24, 4)
    base = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == base and v.untyped_storage().data_ptr() == base
    assert q.untyped_storage().nbytes() == 2 * 3 * 8 * 24 * 4  # exactly the qkv conv output
    assert not q.is_contiguous()
    assert (q.stride(-1) == 1) == channels_last


def test_cross_attention_block():
    torch.manual_seed(4)
    a = _randomize_(fnn.AttentionBlock(8, heads=2, groups=4, context_dim=6))
    x, ctx = torch.randn(2, 8, 3, 5), torch.randn(2, 7, 6)
    y = a(x, ctx)
    assert y.shape == x.shape
    # unfused: q from the normed map, k/v from the context
    h = F.group_norm(x, 4, a.norm.weight, a.norm.bias, a.norm.eps)
    q = a.q(h).reshape(2, 2, 4, 15).transpose(-1, -2)
    kv = a.kv(ctx)
    k = kv[..., :8].reshape(2, 7, 2, 4).transpose(1, 2)
    v = kv[..., 8:].reshape(2, 7, 2, 4).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(y, x + a.proj(o), **TOL)
    with pytest.raises(ValueError, match="context"):
        a(x)
    with pytest.raises(ValueError, match="context"):
        a(x, torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="context"):
        fnn.AttentionBlock(8, groups=4)(x, ctx)
    with pytest.raises(ValueError, match="head_dim"):
        fnn.AttentionBlock(8, head_dim=3, groups=4)


def test_resampling_and_mlp():
    x = torch.randn(2, 4, 6, 10)
    assert fnn.Downsample(4)(x).shape == (2, 4, 3, 5)
    assert fnn.Downsample(4, padding="symmetric")(x).shape == (2, 4, 3, 5)
    assert fnn.Downsample(4, with_conv=False)(x).shape == (2, 4, 3, 5)
    assert fnn.Upsample(4)(x).shape == (2, 4, 12, 20)
    torch.testing.assert_close(fnn.Upsample(4, with_conv=False)(x)[:, :, ::2, ::2], x)
    mlp = fnn.MLPDenoiser(dim=2, hidden=32, layers=2, temb_dim=16)
    pts = torch.randn(5, 2, requires_grad=True)
    out = mlp(pts, torch.randint(0, 1000, (5,)))
    assert out.shape == (5, 2)
    out.sum().backward()
    assert pts.grad is not None and all(p.grad is not None for p in mlp.parameters())
    assert mlp(pts, 10).shape == (5, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        mlp(torch.randn(5, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="t must have shape"):
        mlp(pts, torch.zeros(4))


# ------------------------------------------------------------------ UNet ----
def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_ddpm_cifar10_parameter_count():
    with torch.device("meta"):
        m = fnn.UNet.from_preset("ddpm-cifar10")
    n = _count(m)
    assert 35.6e6 < n < 35.8e6, n  # Ho et al. 2020: 35.7M
    assert n == 35_746_307
    with torch.device("meta"):
        big = fnn.UNet.from_preset("ddpm-256")
    assert 113.5e6 < _count(big) < 114.0e6  # the 256x256 models: 114M
    with torch.device("meta"):
        assert _count(fnn.UNet.from_preset("tiny")) < 0.5e6
        for name in ("digits-16", "digits-32"):
            assert 0.5e6 < _count(fnn.UNet.from_preset(name)) < 2e6
    with pytest.raises(ValueError, match="unknown preset"):
        fnn.UNet.from_preset("nope")


def test_ddpm_cifar10_layout():
    """Attention after every ResBlock at 16x16 and in the middle only."""
    with torch.device("meta"):
        m = fnn.UNet.from_preset("ddpm-cifar10")
    attn = [n for n, mod in m.named_modules() if isinstance(mod, fnn.AttentionBlock)]
    assert attn == ["down.1.attn.0", "down.1.attn.1", "mid.1", "up.2.attn.0", "up.2.attn.1", "up.2.attn.2"]
    assert sum(isinstance(mod, fnn.ResBlock) for mod in m.modules()) == 4 * 2 + 2 + 4 * 3


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(5)
    return _randomize_(fnn.UNet.from_preset("tiny"), scale=0.1).eval()


def test_unet_tiny_forward_backward(tiny):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = tiny(x, torch.tensor([1, 900]))
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().mean().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in tiny.parameters())
    tiny.zero_grad()
    # a scalar / int t broadcasts; other sizes divisible by 2 run
    assert tiny(torch.randn(1, 3, 8, 12), 5).shape == (1, 3, 8, 12)
    assert tiny(torch.randn(2, 3, 16, 16), torch.tensor(7)).shape == (2, 3, 16, 16)


def test_unet_zero_init_outputs_zero():
    m = fnn.UNet.from_preset("tiny")
    assert torch.count_nonzero(m(torch.randn(1, 3, 16, 16), torch.tensor([3]))) == 0


def test_unet_learn_sigma_and_classes():
    m = fnn.UNet.from_preset("tiny", learn_sigma=True, num_classes=4, scale_shift=True, heads=2)
    y = m(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.tensor([0, 3]))
    assert y.shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="y"):
        m(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y"):
        fnn.UNet.from_preset("tiny")(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.tensor([0, 1]))


def test_unet_channels_last_matches(tiny):
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    ref = tiny(x, t)
    cl = fnn.UNet.from_preset("tiny").eval()
    cl.load_state_dict(tiny.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    y = cl(x.to(memory_format=torch.channels_last), t)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_unet_autocast_bf16_close_to_fp32(tiny):
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    ref = tiny(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tiny(x, t)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 0.05, err


def test_unet_compile_fullgraph_matches_eager(tiny):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    ref = tiny(x, t)
    ref.square().sum().backward()
    g_ref = _grads(tiny)
    tiny.zero_grad()
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(tiny, fullgraph=True, backend=counter)
    y = compiled(x, t)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    _assert_grads_close(_grads(tiny), g_ref, rel=1e-5)
    tiny.zero_grad()
    # a new timestep value does not recompile (t is a tensor input)
    torch.testing.assert_close(compiled(x, torch.tensor([3, 999])), tiny(x, torch.tensor([3, 999])),
                               rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_unet_bad_inputs(tiny):
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, H, W\)"):
        tiny(torch.randn(2, 4, 16, 16), t)
    with pytest.raises(ValueError, match="x must have shape"):
        tiny(torch.randn(2, 3, 16), t)
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny(torch.randn(2, 3, 15, 16), t)
    with pytest.raises(ValueError, match="multiples of 8"):
        fnn.UNet.from_preset("ddpm-cifar10", ch=32, groups=8)(torch.randn(1, 3, 12, 12), 1)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        tiny(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="t must have shape"):
        tiny(torch.randn(2, 3, 16, 16), torch.zeros(2, 1))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        tiny(torch.zeros(2, 3, 16, 16, dtype=torch.int64), t)
    with pytest.raises(ValueError, match="groups"):
        fnn.UNet(ch=24, groups=32)


def test_unet_uses_the_fused_ops(monkeypatch, tiny):
    """Every norm of the U-Net is one group_norm_act call (the ResBlock's
    second with the time embedding fused in) and attention one attention call."""
    calls = []
    gn, att = fastdiff.ops.group_norm_act, fastdiff.ops.attention

    def gn_spy(x, g, w, b, **kw):
        calls.append(("gn", kw["add"] is not None, kw["silu"]))
        return gn(x, g, w, b, **kw)

    def attn_spy(*args, **kw):
        calls.append(("attn",))
        return att(*args, **kw)

    monkeypatch.setattr(fastdiff.ops, "group_norm_act", gn_spy)
    monkeypatch.setattr(fastdiff.ops, "attention", attn_spy)
    tiny(torch.randn(1, 3, 16, 16), torch.tensor([4]))
    n_res = sum(isinstance(m, fnn.ResBlock) for m in tiny.modules())
    n_attn = sum(isinstance(m, fnn.AttentionBlock) for m in tiny.modules())
    assert calls.count(("gn", True, True)) == n_res  # norm2 + temb add + SiLU
    assert calls.count(("gn", False, True)) == n_res + 1  # norm1 and norm_out
    assert calls.count(("gn", False, False)) == n_attn
    assert calls.count(("attn",)) == n_attn


def test_unfused_context_gives_the_stock_computation():
    """fastdiff.nn.unfused(): the same model computed with stock ops (the
    benchmark baseline) agrees with the fused path, and the flag is restored."""
    from fastdiff.nn import layers, unfused

    torch.manual_seed(0)
    m = fnn.UNet.from_preset("tiny", zero_init=False).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    fused = m(x, t)
    with unfused():
        assert layers._STOCK
        stock = m(x, t)
    assert not layers._STOCK
    torch.testing.assert_close(fused, stock, atol=1e-4, rtol=1e-4)
