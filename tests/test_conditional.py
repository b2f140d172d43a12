"""Conditional diffusion: the class-conditional / cross-attention UNet, the
classifier-free-guidance dropout of GaussianDiffusion and guided sampling.

Guided sampling is checked against an analytic oracle. For class
conditionals x0 | y ~ N(mu_y, s_y^2) per coordinate (the null label with its
own Gaussian N(mu_0, s_0^2)), the optimal noise predictors are affine in x_t,

    eps_y(x, t) = sqrt(1 - ab) (x - sqrt(ab) mu_y) / (ab s_y^2 + 1 - ab),

so the guided prediction eps_0 + w (eps_y - eps_0) is affine too, every
DDPM/DDIM step it drives is an affine map plus independent Gaussian noise,
and the exact mean and variance of the guided sampler's output follow step by
step. Empirical moments are compared with z-scores (|z| < 5), and the same
samples must reject the unguided chain's moments.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff import nn as fnn
from fastdiff.diffusion.gaussian import GaussianDiffusion

Z_MAX = 5.0
TOL = dict(rtol=1e-4, atol=1e-5)


def _randomize_(module, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


# ------------------------------------------------------------------ UNet ----
def test_unconditional_unet_state_dict_unchanged():
    base = fnn.UNet.from_preset("tiny")
    keys = set(base.state_dict())
    assert not any("label_emb" in k or "xattn" in k for k in keys)
    assert "context_dim" not in base.config and "cross_attn_resolutions" not in base.config
    cls = fnn.UNet.from_preset("tiny", num_classes=5)
    ctx = fnn.UNet.from_preset("tiny", context_dim=6)
    assert set(cls.state_dict()) - keys == {"label_emb.weight"}
    assert set(cls.state_dict()) >= keys and set(ctx.state_dict()) >= keys
    assert cls.label_emb.weight.shape == (6, 64)  # num_classes + 1 rows: the last is "no label"
    # cross-attention after the 8x8 self-attention blocks (down 1, up 0) and in the middle
    xa = [n for n, m in ctx.named_modules() if isinstance(m, fnn.AttentionBlock) and m.context_dim == 6]
    assert xa == ["down.1.xattn.0", "mid_xattn", "up.0.xattn.0", "up.0.xattn.1"]
    # the checkpoint rebuild path: the config makes the same model
    again = fnn.UNet(**ctx.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in ctx.state_dict().items()}


def test_class_conditional_unet_labels_matter_and_grads_flow():
    torch.manual_seed(0)
    m = _randomize_(fnn.UNet.from_preset("tiny", num_classes=3, zero_init=False), 0.05)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 50, 500, 999])
    y0 = m(x, t, class_labels=torch.tensor([0, 1, 2, 3]))
    y1 = m(x, t, class_labels=torch.tensor([1, 1, 2, 0]))
    assert y0.shape == x.shape
    diff = (y0 - y1).flatten(1).abs().amax(1)
    assert diff[0] > 1e-3 and diff[3] > 1e-3 and diff[1] == 0 and diff[2] == 0  # per-sample: only changed labels
    # the positional / y= spellings are the same call
    torch.testing.assert_close(m(x, t, torch.tensor([0, 1, 2, 3])), y0)
    torch.testing.assert_close(m(x, t, y=torch.tensor([0, 1, 2, 3])), y0)
    null = m.null_condition(class_labels=torch.tensor([2, 0, 1, 1]))
    assert set(null) == {"class_labels"} and null["class_labels"].tolist() == [3, 3, 3, 3]
    xg = x.clone().requires_grad_()
    m(xg, t, class_labels=torch.tensor([0, 1, 2, 3])).square().sum().backward()
    assert xg.grad.abs().sum() > 0
    g = m.label_emb.weight.grad
    assert all(g[i].abs().sum() > 0 for i in range(4))  # each used row, the null row included


def test_class_conditional_unet_bad_labels():
    m = fnn.UNet.from_preset("tiny", num_classes=3)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class_labels"):
        m(x, t)
    with pytest.raises(ValueError, match=r"class_labels.*\[0, 3\]"):
        m(x, t, class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"class_labels.*\[0, 3\]"):
        m(x, t, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="class_labels"):
        m(x, t, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        m(x, t, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="once"):
        m(x, t, torch.tensor([0, 1]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        fnn.UNet.from_preset("tiny")(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="context"):
        m(x, t, class_labels=torch.tensor([0, 1]), context=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="num_classes"):
        fnn.UNet.from_preset("tiny", num_classes=0)
    with pytest.raises(ValueError, match="not class-conditional"):
        fnn.UNet.from_preset("tiny").null_condition(class_labels=torch.tensor([0]))


def _xattn_plain(a: fnn.AttentionBlock, x, ctx):
    """The cross-attention block in plain PyTorch: explicit softmax(q k^T / sqrt(d)) v."""
    N, C, H, W = x.shape
    h = F.group_norm(x, a.norm.num_groups, a.norm.weight, a.norm.bias, a.norm.eps)
    q = a.q(h).reshape(N, a.heads, a.head_dim, H * W).transpose(-1, -2)
    kv = ctx @ a.kv.weight.T + a.kv.bias
    k = kv[..., :C].reshape(N, -1, a.heads, a.head_dim).transpose(1, 2)
    v = kv[..., C:].reshape(N, -1, a.heads, a.head_dim).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a.head_dim), -1)
    o = (p @ v).transpose(-1, -2).reshape(N, C, H, W)
    return x + F.conv2d(o, a.proj.weight, a.proj.bias)


@pytest.mark.parametrize("fused", [None, True])
def test_cross_attention_unet(fused):
    torch.manual_seed(1)
    m = _randomize_(fnn.UNet.from_preset("tiny", context_dim=6, heads=2, zero_init=False), 0.05)
    for mod in m.modules():
        if isinstance(mod, fnn.AttentionBlock):
            mod.fused = fused  # True: fastdiff's attention operator (reference kernel on the CPU), Lq != Lk
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 5, 6)
    out = m(x, t, context=ctx)
    assert out.shape == x.shape
    assert (out - m(x, t, context=ctx.flip(1) * 0.5)).abs().max() > 1e-4  # the context matters
    # the blocks, hooked inside the UNet, equal the plain-PyTorch computation on what they received
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, inp, o: seen.append((mod, inp, o)))
             for mod in m.modules() if isinstance(mod, fnn.AttentionBlock) and mod.context_dim]
    xg, cg = x.clone().requires_grad_(), ctx.clone().requires_grad_()
    m(xg, t, context=cg).square().sum().backward()
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    for mod, (h, c), o in seen:
        assert c.shape == (2, 5, 6)
        torch.testing.assert_close(o, _xattn_plain(mod, h, c), **TOL)
    # gradients reach the context and every cross-attention parameter
    assert cg.grad.abs().sum() > 0 and xg.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        if "xattn" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    null = m.null_condition(context=ctx)
    assert torch.equal(null["context"], torch.zeros_like(ctx))
    with pytest.raises(ValueError, match="context"):
        m(x, t)
    with pytest.raises(ValueError, match="context"):
        m(x, t, context=torch.randn(2, 5, 7))


# -------------------------------------------------- conditioning dropout ----
class _Recorder(nn.Module):
    """Records the conditioning it is called with; outputs zeros."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = []

    def null_condition(self, class_labels=None, context=None):
        out = {}
        if class_labels is not None:
            out["class_labels"] = torch.full_like(class_labels, self.num_classes)
        if context is not None:
            out["context"] = torch.zeros_like(context)
        return out

    def forward(self, x, t, **cond):
        self.calls.append({k: v.clone() for k, v in cond.items()})
        return x * self.w


def test_cond_dropout_is_seeded_and_per_sample():
    rec = _Recorder()
    diff = GaussianDiffusion(rec, "linear", num_timesteps=100, sample_shape=(3,), cond_drop_prob=0.3)
    n = 4000
    x0 = torch.randn(n, 3) * 0.1
    y = torch.arange(n) % 10
    ctx = torch.randn(n, 2, 4) + 1
    diff(x0, class_labels=y, context=ctx, generator=torch.Generator().manual_seed(5))
    diff(x0, class_labels=y, context=ctx, generator=torch.Generator().manual_seed(5))
    a, b = rec.calls
    assert torch.equal(a["class_labels"], b["class_labels"]) and torch.equal(a["context"], b["context"])
    dropped = a["class_labels"] == 10
    # labels and context are dropped together, per sample; the kept ones are untouched
    assert torch.equal(dropped, (a["context"] == 0).all(2).all(1))
    assert torch.equal(a["class_labels"][~dropped], y[~dropped])
    assert torch.equal(a["context"][~dropped], ctx[~dropped])
    frac = dropped.double().mean().item()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    # eval mode: no dropout; p = 0: nothing drawn, the same t/noise stream as an unconditional loss
    diff.eval()
    diff(x0, class_labels=y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(rec.calls[-1]["class_labels"], y)
    diff.train()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    diff0 = GaussianDiffusion(rec, "linear", num_timesteps=100, sample_shape=(3,))
    diff0(x0, class_labels=y, generator=g1)
    diff0(x0, generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert rec.calls[-1]["class_labels"].eq(10).all()  # no labels: the null label (the model requires labels)
    # p = 1: everything dropped
    GaussianDiffusion(rec, "linear", num_timesteps=100, sample_shape=(3,), cond_drop_prob=1.0)(x0, class_labels=y)
    assert rec.calls[-1]["class_labels"].eq(10).all()
    with pytest.raises(ValueError, match="cond_drop_prob"):
        GaussianDiffusion(rec, "linear", cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="class_labels"):
        diff(x0, class_labels=y[:-1])
    assert GaussianDiffusion.from_config(rec, diff.config).cond_drop_prob == 0.3
    assert "cond_drop_prob" not in diff0.config


def test_conditional_unet_trains_through_gaussian_diffusion():
    torch.manual_seed(0)
    m = fnn.UNet.from_preset("tiny", num_classes=4, context_dim=5)
    diff = GaussianDiffusion(m, "linear", num_timesteps=50, cond_drop_prob=0.5)
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    loss = diff(x0, class_labels=torch.tensor([0, 3, 1]), context=torch.randn(3, 2, 5),
                generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and m.label_emb.weight.grad is not None


# -------------------------------------------------------- guided sampling ----
class ClassGaussianOracle(nn.Module):
    """The exact eps predictor for x0 | y ~ N(mu[y], s[y]^2) per coordinate; the
    null label (index len(mu) - 1) has its own Gaussian."""

    def __init__(self, schedule, mu, s):
        super().__init__()
        ab = schedule.alphas_cumprod.double()[:, None]
        mu, s = torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
        d = ab * s * s + 1 - ab
        self.register_buffer("a", (1 - ab).sqrt() / d)  # (T, classes + 1)
        self.register_buffer("b", -(1 - ab).sqrt() * ab.sqrt() * mu / d)
        self.num_classes = len(mu) - 1
        self.calls = 0

    def null_condition(self, class_labels=None, context=None):
        return {"class_labels": torch.full_like(class_labels, self.num_classes)}

    def forward(self, x, t, class_labels):
        self.calls += 1
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (self.a[t, class_labels].reshape(shape) * x.double()
                + self.b[t, class_labels].reshape(shape)).to(x.dtype)


def guided_chain_moments(abar, ts, mu_c, s_c, mu_u, s_u, w, method, eta=0.0):
    """Exact output (mean, var) of DDPM (fixed_small) / DDIM driven by the
    guided eps = eps_u + w (eps_c - eps_u) = A x + B (no clipping)."""
    m, v = 0.0, 1.0
    for i, t in enumerate(ts):
        tp = ts[i + 1] if i + 1 < len(ts) else -1
        ab = abar[t]
        abp = abar[tp] if tp >= 0 else 1.0
        coef = []
        for mu, s in ((mu_c, s_c), (mu_u, s_u)):
            d = ab * s * s + 1 - ab
            coef.append((math.sqrt(1 - ab) / d, -math.sqrt(1 - ab) * math.sqrt(ab) * mu / d))
        (ac, bc), (au, bu) = coef
        A, B = au + w * (ac - au), bu + w * (bc - bu)
        P, Q = (1 - math.sqrt(1 - ab) * A) / math.sqrt(ab), -math.sqrt(1 - ab) * B / math.sqrt(ab)
        if tp < 0:
            m, v = P * m + Q, P * P * v
            continue
        if method == "ddpm":
            bp = 1 - ab / abp
            c0, c1 = math.sqrt(abp) * bp / (1 - ab), math.sqrt(1 - bp) * (1 - abp) / (1 - ab)
            sig2 = (1 - abp) / (1 - ab) * bp
            a, b = c0 * P + c1, c0 * Q
        else:
            sig2 = eta * eta * (1 - abp) / (1 - ab) * (1 - ab / abp)
            k = math.sqrt(max(1 - abp - sig2, 0.0))
            a, b = math.sqrt(abp) * P + k * A, math.sqrt(abp) * Q + k * B
        m, v = a * m + b, a * a * v + sig2
    return m, v


def _z(x, m, v):
    x = x.double().flatten()
    M = x.numel()
    return (x.mean().item() - m) / math.sqrt(v / M), (x.var().item() - v) / (v * math.sqrt(2.0 / (M - 1)))


MUS, SS = [-0.5, 0.4, 0.0], [0.15, 0.1, 0.5]  # classes 0, 1, then the null label's Gaussian


@pytest.mark.parametrize("method,steps,eta,w", [("ddpm", 100, 0.0, 3.0), ("ddim", 20, 0.0, 2.0),
                                                ("ddim", 20, 1.0, 4.0), ("ddpm", 100, 0.0, 0.0)])
def test_guided_sampler_matches_exact_chain(method, steps, eta, w):
    sched = NoiseSchedule.make("linear", 1000)
    model = ClassGaussianOracle(sched, MUS, SS)
    diff = GaussianDiffusion(model, sched, sample_shape=(64,), clip_sample=False)
    n = 512
    y = torch.arange(n) % 2
    x = diff.sample(n, steps=steps, method=method, eta=eta, class_labels=y, guidance_scale=w,
                    generator=torch.Generator().manual_seed(11))
    assert model.calls == steps  # one (2n-row) model call per step
    abar = sched.alphas_cumprod.double().numpy()
    ts = sched.timesteps(steps).tolist()
    for c in (0, 1):
        xc = x[y == c]
        m, v = guided_chain_moments(abar, ts, MUS[c], SS[c], MUS[2], SS[2], w, method, eta)
        zm, zv = _z(xc, m, v)
        assert abs(zm) < Z_MAX and abs(zv) < Z_MAX, (c, xc.mean().item(), m, xc.var().item(), v, zm, zv)
        # power: the unguided (w = 1) chain's moments are rejected
        m1, v1 = guided_chain_moments(abar, ts, MUS[c], SS[c], MUS[2], SS[2], 1.0, method, eta)
        assert max(abs(z) for z in _z(xc, m1, v1)) > 2 * Z_MAX


def _python_guided(model_fn, w, r):
    """A model that returns the guided prediction computed in plain PyTorch
    (out_u + w (out_c - out_u), rescaled toward out_c's per-sample std as
    diffusers' rescale_noise_cfg), for the unguided sampler."""

    def f(x, t, class_labels):
        null = torch.full_like(class_labels, model_fn.num_classes)
        oc = model_fn(x, t, class_labels).double()
        ou = model_fn(x, t, null).double()
        g = ou + w * (oc - ou)
        if r:
            dims = tuple(range(1, g.dim()))
            g = r * g * (oc.std(dims, keepdim=True) / g.std(dims, keepdim=True)) + (1 - r) * g
        return g.to(x.dtype)

    return f


class _Wrap(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, t, **kw):
        return self.f(x, t, **kw)


@pytest.mark.parametrize("method,kw", [("ddpm", {}), ("ddim", dict(eta=0.5)), ("dpmsolver++", {}),
                                       ("unipc", {}), ("euler_ancestral", {})])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guided_step_equals_python_combination(method, kw, rescale):
    """The fused guided step gives what the unguided sampler gives for a model
    whose output is the guided combination (same noise: same generator)."""
    sched = NoiseSchedule.make("linear", 1000)
    model = ClassGaussianOracle(sched, MUS, SS)
    y = torch.tensor([0, 1, 1, 0, 1])
    common = dict(steps=10, method=method, **kw)
    fused = GaussianDiffusion(model, sched, sample_shape=(2, 4, 4), clip_sample=True)
    got = fused.sample(5, class_labels=y, guidance_scale=2.5, guidance_rescale=rescale,
                       generator=torch.Generator().manual_seed(3), **common)
    ref_model = _Wrap(_python_guided(model, 2.5, rescale))
    ref = GaussianDiffusion(ref_model, sched, sample_shape=(2, 4, 4), clip_sample=True)
    want = ref.sample(5, class_labels=y, generator=torch.Generator().manual_seed(3), **common)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guidance_argument_checks():
    sched = NoiseSchedule.make("linear", 100)
    model = ClassGaussianOracle(sched, MUS, SS)
    diff = GaussianDiffusion(model, sched, sample_shape=(4,))
    with pytest.raises(ValueError, match="guidance_rescale"):
        diff.sample(2, steps=5, guidance_rescale=0.5)  # no condition
    with pytest.raises(ValueError, match="guidance_rescale"):
        diff.sample(2, steps=5, class_labels=[0, 1], guidance_scale=2.0, guidance_rescale=2.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        diff.sample(2, steps=5, class_labels=[0, 1], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="class_labels"):
        diff.sample(2, steps=5, class_labels=[0, 1, 1])
    # w = 1 and no condition: one n-row call per step (the null label when none is given)
    model.calls = 0
    diff.sample(3, steps=5, class_labels=1)
    diff.sample(3, steps=5)
    assert model.calls == 10
    plain = GaussianDiffusion(_Wrap(lambda x, t, **kw: x * 0), sched, sample_shape=(4,))
    with pytest.raises(ValueError, match="null_condition"):
        plain.sample(2, steps=3, class_labels=[0, 1], guidance_scale=2.0)


# ----------------------------------------------------------- trainer / CLI ----
def test_trainer_needs_labels_for_a_conditional_model(tmp_path):
    from fastdiff.data import InMemoryDataset
    from fastdiff.train import TrainConfig, Trainer

    m = fnn.UNet.from_preset("tiny", num_classes=3)
    cfg = TrainConfig(steps=1, batch_size=2, device="cpu", out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="no labels"):
        Trainer(GaussianDiffusion(m, "linear", num_timesteps=10), torch.zeros(4, 3, 16, 16), cfg)
    bad = InMemoryDataset(torch.zeros(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes=3"):
        Trainer(GaussianDiffusion(m, "linear", num_timesteps=10), bad, cfg)


def test_cli_conditional_errors(tmp_path, capsys):
    from fastdiff.cli import main

    rc = main(["train", "--dataset", "swissroll", "--class-conditional", "--steps", "1", "--out", str(tmp_path),
               "--device", "cpu", "--no-progress"])
    assert rc == 2 and "--class-conditional" in capsys.readouterr().err
    rc = main(["train", "--dataset", "digits", "--class-conditional", "--cond-drop-prob", "1.5", "--steps", "1",
               "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert rc == 2 and "--cond-drop-prob" in capsys.readouterr().err
