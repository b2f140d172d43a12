"""fastdiff.nn.patch / unpatch on plain PyTorch models and on diffusers'
UNet2DModel / UNet2DConditionModel and their blocks.

Every patched model is compared with its unpatched self (forward and
parameter gradients, float32 tolerance), keeps its state_dict keys and
Parameter objects, reports what was replaced, and comes back unchanged
after unpatch.
"""
from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiff
from fastdiff import nn as fnn

TOL = dict(rtol=1e-4, atol=1e-5)


def _randomize_(module: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def _run(model, *inputs, out=lambda y: y, **kw):
    """(output, {param name: grad}) of sum(output^2), gradients cleared after."""
    model.zero_grad()
    y = out(model(*inputs, **kw))
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return y.detach(), grads


def _assert_grads_close(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    # one scale for all: some gradients are exactly 0 in exact arithmetic (the key bias
    # of attention), so their float32 values are pure rounding noise
    scale = max(v.abs().max().item() for v in b.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rel, atol=rel * scale, msg=lambda m: f"{k}: {m}")


def _snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def _assert_same_state(model, snap):
    sd = model.state_dict()
    assert list(sd) == list(snap)
    for k, v in sd.items():
        assert v.data_ptr() == snap[k][0], k  # the same storage, not a copy
        assert torch.equal(v, snap[k][1]), k


# ------------------------------------------------------------ plain torch ---
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1))
        self.norm = nn.GroupNorm(4, 8, eps=1e-6)  # called in forward, SiLU applied functionally
        self.head = nn.Sequential(nn.GroupNorm(2, 8, affine=False), nn.SiLU(inplace=True), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return self.head(F.silu(self.norm(self.body(x))))


def test_patch_plain_sequential():
    torch.manual_seed(0)
    model = _randomize_(_Net(), 0.2)
    x = torch.randn(2, 3, 6, 5)
    ref, g_ref = _run(model, x)
    snap = _snapshot(model)
    params = list(model.parameters())

    report = fnn.patch(model)
    assert report.counts == {"groupnorm_silu": 2, "groupnorm": 2}
    assert report.replaced["groupnorm_silu"] == ["body.1", "head.0"]
    assert sorted(report.replaced["groupnorm"]) == ["body.4", "norm"]
    assert "body.1" in str(report) and "GroupNormAct" in str(report)
    assert type(model.body[1]) is fnn.GroupNormAct and model.body[1].act
    assert type(model.body[2]) is nn.Identity and len(model.body) == 6
    assert type(model.body[4]) is fnn.GroupNormAct and not model.body[4].act
    assert type(model.norm) is fnn.GroupNormAct and not model.norm.act and model.norm.eps == 1e-6
    assert type(model.head[0]) is fnn.GroupNormAct and model.head[0].weight is None
    _assert_same_state(model, snap)
    assert all(a is b for a, b in zip(model.parameters(), params))  # optimisers keep working

    y, g = _run(model, x)
    torch.testing.assert_close(y, ref, **TOL)
    _assert_grads_close(g, g_ref)

    assert fnn.patch(model).total == 0  # patching twice finds nothing new
    restored = fnn.unpatch(model)
    assert restored.counts == report.counts
    assert type(model.body[1]) is nn.GroupNorm and type(model.body[2]) is nn.SiLU
    assert type(model.norm) is nn.GroupNorm and type(model.head[1]) is nn.SiLU and model.head[1].inplace
    assert not any(isinstance(m, fnn.GroupNormAct) for m in model.modules())
    _assert_same_state(model, snap)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert fnn.unpatch(model).total == 0


def test_patch_leaves_hooked_and_custom_modules_alone():
    class MySeq(nn.Sequential):
        def forward(self, x):  # not nn.Sequential.forward: the SiLU may be used differently
            return self[1](x) + self[0](x)

    hooked = nn.GroupNorm(2, 4)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    model = nn.Sequential(MySeq(nn.GroupNorm(2, 4), nn.SiLU()), hooked, nn.SiLU())
    x = torch.randn(2, 4, 3, 3)
    ref = model(x)
    report = fnn.patch(model)
    assert report.counts == {"groupnorm": 1}  # MySeq's norm, without its SiLU
    assert type(model[0][1]) is nn.SiLU and type(model[1]) is nn.GroupNorm and type(model[2]) is nn.SiLU
    assert "1" in report.skipped and "hooks" in report.skipped["1"]
    torch.testing.assert_close(model(x), ref, **TOL)
    fnn.unpatch(model)
    assert type(model[0][0]) is nn.GroupNorm


def test_patch_shared_group_norm_stays_shared():
    gn = nn.GroupNorm(2, 4)
    model = nn.Sequential(gn, nn.Conv2d(4, 4, 1), gn, nn.SiLU())
    _randomize_(model, 0.2)
    x = torch.randn(1, 4, 3, 2)
    ref = model(x)
    report = fnn.patch(model)
    assert report.counts == {"groupnorm": 1, "groupnorm_silu": 1}
    assert model[0].weight is model[2].weight is gn.weight
    torch.testing.assert_close(model(x), ref, **TOL)
    fnn.unpatch(model)
    assert model[0] is gn and model[2] is gn


def test_unpatch_picks_up_new_parameters_and_deepcopy():
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    fnn.patch(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        model.load_state_dict({"0.weight": torch.full((4,), 2.0), "0.bias": torch.full((4,), -1.0)})
    model[0].weight = nn.Parameter(torch.full((4,), 3.0))  # a new Parameter object swapped in
    fnn.unpatch(model)
    assert type(model[0]) is nn.GroupNorm and torch.all(model[0].weight == 3) and torch.all(model[0].bias == -1)
    # the deep copy carries its own undo records, pointing at its own modules
    assert type(clone[0]) is fnn.GroupNormAct
    assert fnn.unpatch(clone).total == 1 and type(clone[0]) is nn.GroupNorm and type(clone[1]) is nn.SiLU
    assert torch.all(clone[0].weight == 1)


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        fnn.patch(lambda x: x)


# --------------------------------------------------------------- diffusers --
@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def _unet2d(diffusers, mode):
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                              layers_per_block=1, norm_num_groups=8,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), resnet_time_scale_shift=mode)
    return _randomize_(m).eval()


@pytest.mark.parametrize("mode", ["default", "scale_shift"])
def test_patch_diffusers_unet2d(diffusers, mode):
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    model = _unet2d(diffusers, mode)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    sample = functools.partial(_run, out=lambda o: o.sample)
    ref, g_ref = sample(model, x, t)
    snap = _snapshot(model)

    report = fnn.patch(model)
    assert report.counts == {"resnet_block": 8, "attention": 4, "norm_out_silu": 1, "upsample": 1}
    assert not report.skipped
    assert "down_blocks.1.attentions.0" in report.replaced["attention"]
    assert all(isinstance(m.processor, fnn.FastdiffAttnProcessor) for m in model.modules() if hasattr(m, "processor"))
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    assert len(blocks) == 8 and all(type(b) is not ResnetBlock2D for b in blocks)
    _assert_same_state(model, snap)

    y, g = sample(model, x, t)
    torch.testing.assert_close(y, ref, **TOL)
    _assert_grads_close(g, g_ref)

    fnn.unpatch(model)
    assert all(type(b) is ResnetBlock2D for b in blocks)
    assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules() if hasattr(m, "processor"))
    assert type(model.conv_norm_out) is nn.GroupNorm and type(model.conv_act) is nn.SiLU
    _assert_same_state(model, snap)
    torch.testing.assert_close(model(x, t).sample, ref, rtol=0, atol=0)


def test_patch_diffusers_uses_fused_ops(diffusers, monkeypatch):
    """Through the fastdiff operators themselves (attention forced onto the
    fastdiff op, which on CPU is its reference kernel): each ResnetBlock2D
    makes exactly two group_norm_act calls and each Attention one of each."""
    calls = []
    gn, att = fastdiff.ops.group_norm_act, fastdiff.ops.attention

    def gn_spy(x, g, w, b, **kw):
        calls.append(("gn", kw["silu"], kw["add"] is not None or kw["scale"] is not None))
        return gn(x, g, w, b, **kw)

    def att_spy(q, k, v, scale=None, **kw):
        calls.append(("attn",))
        return att(q, k, v, scale, fused=True)

    model = _unet2d(diffusers, "scale_shift")
    # (diffusers' scale_shift mid-block attention has no group norm)
    n_attn_norms = sum(getattr(m, "group_norm", None) is not None for m in model.modules() if hasattr(m, "processor"))
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([5])
    ref = model(x, t).sample
    fnn.patch(model)
    monkeypatch.setattr(fastdiff.ops, "group_norm_act", gn_spy)
    monkeypatch.setattr(fastdiff.ops, "attention", att_spy)
    torch.testing.assert_close(model(x, t).sample, ref, **TOL)
    assert calls.count(("gn", True, True)) == 8  # norm2 + scale/shift + SiLU
    assert calls.count(("gn", True, False)) == 8 + 1  # norm1 + SiLU, conv_norm_out + SiLU
    assert calls.count(("gn", False, False)) == n_attn_norms == 3  # the attention group norms
    assert calls.count(("attn",)) == 4


def test_patch_diffusers_unet2d_condition(diffusers):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
    _randomize_(model).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 32)
    ref = model(x, t, encoder_hidden_states=ctx).sample
    snap = _snapshot(model)
    report = fnn.patch(model)
    # attn1 (self) and attn2 (cross) of 4 transformer blocks; the Transformer2DModel norms are lone GroupNorms
    assert report.counts == {"resnet_block": 8, "attention": 8, "norm_out_silu": 1, "groupnorm": 4, "upsample": 1}
    assert any(n.endswith("attn2") for n in report.replaced["attention"])
    _assert_same_state(model, snap)
    y = model(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(y, ref, **TOL)
    fnn.unpatch(model)
    _assert_same_state(model, snap)
    torch.testing.assert_close(model(x, t, encoder_hidden_states=ctx).sample, ref, rtol=0, atol=0)


def _attn_case(diffusers, **kw):
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(1)
    return _randomize_(Attention(**kw), 0.2).eval()


def test_patch_diffusers_attention_variants(diffusers):
    from diffusers.models.attention_processor import AttnProcessor
    # 4-D input, group norm, residual, output rescale (the UNet2DModel attention block)
    a = _attn_case(diffusers, query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                   rescale_output_factor=2.0, bias=True)
    x = torch.randn(2, 16, 3, 5)
    ref = a(x)
    assert fnn.patch(a).counts == {"attention": 1}
    torch.testing.assert_close(a(x), ref, **TOL)
    # attention masks go to the original processor
    mask = torch.zeros(2, 1, 15)
    mask[:, :, 7:] = -1e4
    fnn.unpatch(a)
    ref_masked = a(x, attention_mask=mask)
    fnn.patch(a)
    assert not torch.allclose(ref_masked, ref, atol=1e-3)
    torch.testing.assert_close(a(x, attention_mask=mask), ref_masked, rtol=0, atol=0)

    # 3-D cross-attention with a layer-normed context and a group norm on the queries
    a = _attn_case(diffusers, query_dim=12, cross_attention_dim=6, heads=3, dim_head=4, norm_num_groups=3,
                   cross_attention_norm="layer_norm")
    h, ctx = torch.randn(2, 7, 12), torch.randn(2, 4, 6)
    ref, g_ref = _run(a, h, encoder_hidden_states=ctx)
    fnn.patch(a)
    y, g = _run(a, h, encoder_hidden_states=ctx)
    torch.testing.assert_close(y, ref, **TOL)
    _assert_grads_close(g, g_ref)

    # scale_qk=False: diffusers runs the classic AttnProcessor with attn.scale = 1
    a = _attn_case(diffusers, query_dim=8, heads=2, dim_head=4, scale_qk=False)
    assert type(a.processor) is AttnProcessor
    h = torch.randn(2, 6, 8) * 2
    ref = a(h)
    fnn.patch(a)
    assert a.processor.scale_from_attn
    torch.testing.assert_close(a(h), ref, **TOL)
    fnn.unpatch(a)
    assert type(a.processor) is AttnProcessor


@pytest.mark.parametrize("mode", ["default", "scale_shift"])
@pytest.mark.parametrize("variant", ["plain", "up", "down"])
def test_patch_diffusers_resnet_block(diffusers, mode, variant):
    from diffusers.models.resnet import ResnetBlock2D
    torch.manual_seed(2)
    b = ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=10, groups=4, eps=1e-6,
                      time_embedding_norm=mode, output_scale_factor=2.0, skip_time_act=(variant == "down"),
                      up=variant == "up", down=variant == "down")
    _randomize_(b, 0.2).train()  # dropout is 0: training mode exercises the contiguous() shortcut path
    x, temb = torch.randn(2, 8, 6, 4), torch.randn(2, 10)
    ref, g_ref = _run(b, x, temb)
    assert fnn.patch(b).counts == {"resnet_block": 1}
    y, g = _run(b, x, temb)
    torch.testing.assert_close(y, ref, **TOL)
    _assert_grads_close(g, g_ref)
    # one embedding row for the whole batch broadcasts as in diffusers
    fnn.unpatch(b)
    ref1 = b(x, temb[:1])
    fnn.patch(b)
    torch.testing.assert_close(b(x, temb[:1]), ref1, **TOL)
    # no embedding: errors exactly where diffusers errors
    with pytest.raises(TypeError):
        b(x, None)
    assert type(b) is not ResnetBlock2D
    fnn.unpatch(b)
    assert type(b) is ResnetBlock2D


def test_patch_diffusers_resnet_block_without_temb(diffusers):
    from diffusers.models.resnet import ResnetBlock2D
    torch.manual_seed(3)
    b = _randomize_(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=2), 0.2).eval()
    x = torch.randn(2, 8, 5, 3)
    ref = b(x, None)
    fnn.patch(b)
    torch.testing.assert_close(b(x, None), ref, **TOL)


def test_patch_diffusers_skips_non_silu_and_pickles(diffusers, monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D
    b = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4, non_linearity="mish")
    report = fnn.patch(b)
    assert report.total == 2 and report.counts == {"groupnorm": 2}  # only the bare norms
    assert "Mish" in report.skipped["<root>"]
    fnn.unpatch(b)
    ok = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4).eval()
    fnn.patch(ok)
    x, temb = torch.randn(1, 8, 4, 4), torch.randn(1, 4)
    clone = pickle.loads(pickle.dumps(ok))
    assert type(clone) is type(ok)
    torch.testing.assert_close(clone(x, temb), ok(x, temb))
    # in a fresh process the fused class does not exist yet: it is built on lookup
    from fastdiff.nn import patching as patch_mod
    blob = pickle.dumps(ok)
    monkeypatch.delitem(patch_mod.__dict__, "FusedResnetBlock2D")
    monkeypatch.setattr(patch_mod, "_FUSED_CLASSES", {})
    fresh = pickle.loads(blob)
    assert type(fresh).__name__ == "FusedResnetBlock2D" and isinstance(fresh, ResnetBlock2D)
    torch.testing.assert_close(fresh(x, temb), ok(x, temb))
    assert fnn.unpatch(fresh).total == 1 and type(fresh) is ResnetBlock2D
