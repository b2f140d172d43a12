"""The gradient of the fused diffusion loss: stored in the forward (the
backward is one multiply) or recomputed in one pass (``diffusion_loss_backward``).

Every path is checked against the float64 reference gradient
2 w_n g_n (out - target) / M, for every target, weighting, noise source,
odd shapes, layouts and incoming gradients that are not all ones; gradcheck in
float64; double backward; and, with a dispatch-mode op counter, that the
stored path never recomputes (and never materialises a zeros gradient).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff import reference as ref
from fastdiff.ops._layout import canonical

from _backends import all_backends, in_layout as _layout

SCHED = fastdiff.NoiseSchedule.make("linear", 1000)
ABAR = SCHED.alphas_cumprod
TARGETS = ["epsilon", "sample", "v_prediction"]
KEY = torch.tensor([1234567, 1 << 33], dtype=torch.int64)


def _ref_grad(out, x0, t, noise64, w64, target, gout64):
    """float64 d(sum_n gout_n loss_n)/d out, and the per-sample losses."""
    per, g = ref.diffusion_loss(out.detach().double(), x0.double(), t, ABAR, noise64, w64 * gout64, target)
    per0, _ = ref.diffusion_loss(out.detach().double(), x0.double(), t, ABAR, noise64, w64, target)
    return per0, g


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def count(self, name):
        return sum(1 for c in self.calls if c.endswith(name))


# ------------------------------------------------ public function, CPU ----
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", ["noise", "key"])
@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "tensor"])
def test_grad_matches_reference(target, source, store, layout, weighting):
    g = torch.Generator().manual_seed(11)
    shape = (3, 5, 7, 9)
    x0 = _layout(torch.randn(shape, generator=g), layout)
    out = _layout(torch.randn(shape, generator=g), layout).requires_grad_(True)
    nz = _layout(torch.randn(shape, generator=g), layout)
    t = torch.tensor([0, 421, 999])
    w = torch.rand(3, generator=g) + 0.5 if weighting == "tensor" else weighting
    gout = torch.tensor([0.5, -2.0, 3.0])  # not all ones, one negative
    kw = dict(noise=nz) if source == "noise" else dict(key=KEY)
    per = fastdiff.diffusion_loss(out, x0, t, SCHED, target=target, weighting=w, reduction="none", store_grad=store,
                                  **kw)
    (per * gout).sum().backward()
    z64 = nz.double() if source == "noise" else ref.noise_like(canonical(x0), KEY)
    w64 = (w if weighting == "tensor" else SCHED.loss_weight(t, weighting, target)).double()
    per64, g64 = _ref_grad(out, x0, t, z64, w64, target, gout.double())
    torch.testing.assert_close(per.double(), per64, rtol=2e-5, atol=1e-7)
    scale = max(1.0, float(g64.abs().max()))
    assert float((out.grad.double() - g64).abs().max()) <= 2e-5 * scale
    assert out.grad.shape == out.shape


@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5), (3, 1, 129, 131), (2, 16385)])
@pytest.mark.parametrize("target", TARGETS)
def test_stored_and_recomputed_agree_odd_shapes(shape, target):
    """Odd per-sample sizes (tails of the 16-lane blocks, of the 256 blocks and of the 16K chunks)."""
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    grads = []
    for store in (True, False):
        out = torch.randn(shape, generator=torch.Generator().manual_seed(13)).requires_grad_(True)
        fastdiff.diffusion_loss(out, x0, t, SCHED, key=KEY, target=target, store_grad=store).backward()
        grads.append(out.grad)
    z64 = ref.noise_like(x0, KEY)
    _, g64 = ref.diffusion_loss(out.detach().double(), x0.double(), t, ABAR, z64, torch.ones(shape[0]), target)
    g64 = g64 / shape[0]
    for gr in grads:
        assert float((gr.double() - g64).abs().max()) <= 2e-5 * max(1e-3, float(g64.abs().max()))
    # the same float32 difference; the scale is rounded once (recompute) or twice (stored, then * 1/N)
    torch.testing.assert_close(grads[0], grads[1], rtol=3e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grad(dtype):
    g = torch.Generator().manual_seed(14)
    x0 = torch.randn(2, 3, 6, 5, generator=g).to(dtype)
    t = torch.tensor([10, 800])
    for store in (True, False):
        out = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(15)).to(dtype).requires_grad_(True)
        fastdiff.diffusion_loss(out, x0, t, SCHED, key=KEY, target="v_prediction", store_grad=store).backward()
        assert out.grad.dtype == dtype
        _, g64 = ref.diffusion_loss(out.detach().double(), x0.double(), t, ABAR, ref.noise_like(x0, KEY),
                                    torch.ones(2), "v_prediction")
        g64 = g64.double() / 2
        err = float((out.grad.double() - g64).abs().max())
        assert err <= 4 * torch.finfo(dtype).eps * float(g64.abs().max()), (store, err)


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("source", ["noise", "key"])
@pytest.mark.parametrize("target", TARGETS)
def test_gradcheck_float64(store, source, target):
    g = torch.Generator().manual_seed(16)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    nz = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    o = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 10, 900])
    kw = dict(noise=nz) if source == "noise" else dict(key=KEY)
    f = lambda out: fastdiff.diffusion_loss(out, x, t, SCHED, target=target, weighting="min_snr",  # noqa: E731
                                            reduction="none", store_grad=store, **kw)
    assert torch.autograd.gradcheck(f, (o,))


def test_invalid_t_gives_nan_grad_on_both_paths():
    x0 = torch.randn(2, 3, 4)
    for store in (True, False):
        out = torch.randn(2, 3, 4).requires_grad_(True)
        per, _ = fastdiff.ops._schemas.op("diffusion_loss")(out, x0, torch.tensor([5, 1000]), ABAR, None, KEY,
                                                         torch.ones(2), 0, store)
        per.sum().backward()
        assert torch.isnan(out.grad[1]).all() and torch.isfinite(out.grad[0]).all()


# --------------------------------------------------- what the backward runs ----
def _backward_ops(store, source="key", reduction="mean"):
    g = torch.Generator().manual_seed(17)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    out = torch.randn(4, 3, 8, 8, generator=g).requires_grad_(True)
    kw = dict(noise=torch.randn(4, 3, 8, 8, generator=g)) if source == "noise" else dict(key=KEY)
    loss = fastdiff.diffusion_loss(out, x0, torch.tensor([1, 2, 3, 4]), SCHED, store_grad=store,
                                   reduction=reduction, **kw)
    if reduction == "none":
        loss = loss.sum()
    with OpCounter() as c:
        loss.backward()
    return c


@pytest.mark.parametrize("source", ["noise", "key"])
def test_stored_path_never_recomputes(source):
    c = _backward_ops(True, source)
    assert c.count("diffusion_loss_backward") == 0 and c.count("diffusion_loss") == 0
    # one broadcast multiply over the data, no zeros for the unused gradient output
    big = [x for x in c.calls if x not in ("aten.expand", "aten.view", "aten.reshape", "aten.div", "aten._to_copy",
                                           "aten.detach", "aten.sum", "aten.mean")]
    assert c.count("aten.mul") == 1, c.calls
    assert not any(x in ("aten.zeros_like", "aten.zeros", "aten.fill_", "aten.zero_") for x in c.calls), c.calls
    assert all(x in ("aten.mul", "aten.new_empty_strided", "aten.empty_like", "aten.ones_like", "aten.copy_",
                     "aten.add_") for x in big), c.calls


@pytest.mark.parametrize("source", ["noise", "key"])
def test_recompute_path_is_one_pass(source):
    c = _backward_ops(False, source, "none")
    assert c.count("diffusion_loss_backward") == 1 and c.count("fastdiff.diffusion_loss") == 0
    assert c.count("aten.mul") == 0, c.calls


def test_default_choice():
    """Stored for explicit noise and for key= on the CPU (regenerating the noise there costs more than the
    stored gradient's traffic); recomputed for key= on a GPU (documented in diffusion_loss)."""
    assert _backward_ops(None, "noise").count("diffusion_loss_backward") == 0
    assert _backward_ops(None, "key").count("diffusion_loss_backward") == 0


def test_no_grad_forward_does_not_store():
    x0 = torch.randn(2, 3, 4)
    out = torch.randn(2, 3, 4, requires_grad=True)
    with OpCounter() as c, torch.no_grad():
        fastdiff.diffusion_loss(out, x0, 3, SCHED, key=KEY)
    assert c.count("fastdiff.diffusion_loss") == 1


# --------------------------------------------------------- double backward ----
@pytest.mark.parametrize("target", TARGETS)
def test_double_backward_stored(target):
    g = torch.Generator().manual_seed(18)
    x0 = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    nz = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 300, 998])
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    o = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = fastdiff.diffusion_loss(o, x0, t, SCHED, nz, target=target, weighting=w.float(), store_grad=True)
    (gr,) = torch.autograd.grad(loss, o, create_graph=True)
    (hv,) = torch.autograd.grad((gr * v).sum(), o)
    # Hessian-vector product of mean_n w_n mean_j (o - tgt)^2: 2 w_n / (N M) v
    want = 2 * w.float().double().reshape(3, 1, 1) / (3 * 10) * v
    torch.testing.assert_close(hv, want)
    assert torch.autograd.gradgradcheck(
        lambda out: fastdiff.diffusion_loss(out, x0, t, SCHED, nz, target=target, store_grad=True), (o,))


def test_double_backward_recompute_raises():
    o = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    loss = fastdiff.diffusion_loss(o, torch.randn(2, 3, dtype=torch.float64), 4, SCHED, key=KEY, store_grad=False)
    with pytest.raises(RuntimeError, match="store_grad=True"):
        torch.autograd.grad(loss, o, create_graph=True)


# ------------------------------------------------ the backward op, per backend ----
@pytest.mark.parametrize("backend", all_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("target", [0, 1, 2])
@pytest.mark.parametrize("source", ["noise", "key"])
def test_backward_op(backend, dtype, target, source):
    g = torch.Generator().manual_seed(19)
    shape = (3, 3, 5, 7)
    x0 = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    out = torch.randn(shape, generator=g).to(dtype)
    t = torch.tensor([0, 500, 1000])  # the last is out of range: NaN
    w = torch.rand(3, generator=g) + 0.5
    gl = torch.tensor([1.5, -0.25, 2.0])
    z64 = ref.noise_like(canonical(x0), KEY)
    nz = z64.to(dtype) if source == "noise" else None
    d = backend.device
    grad = backend("diffusion_loss_backward", gl.to(d), out.to(d), x0.to(d), t.to(d), ABAR.to(d),
                   None if nz is None else nz.to(d), KEY.to(d) if nz is None else None, w.to(d), target)
    assert grad.dtype == dtype and grad.shape == shape and grad.stride() == x0.stride()
    zz = nz.double() if nz is not None else z64
    tname = TARGETS[target]
    _, g64 = ref.diffusion_loss(out.double(), x0.double(), t.clamp(max=999), ABAR, zz, w.double() * gl.double(),
                                tname)
    got = grad.cpu().double()
    assert torch.isnan(got[2]).all()
    err = float((got[:2] - g64[:2]).abs().max())
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2 ** -7}[dtype]
    if dtype == torch.float64 and nz is None:
        tol = 2e-6  # the regenerated noise is float32-precision (docs/ARCHITECTURE.md)
    assert err <= tol * max(1.0, float(g64[:2].abs().max())), err
    # the forward's stored gradient scaled by gl gives the same values
    _, gs = backend("diffusion_loss", out.to(d), x0.to(d), t.to(d), ABAR.to(d), None if nz is None else nz.to(d),
                    KEY.to(d) if nz is None else None, w.to(d), target, True)
    scaled = gs.cpu().double() * gl.double().reshape(3, 1, 1, 1)
    assert float((scaled[:2] - got[:2]).abs().max()) <= 2 * tol * max(1.0, float(g64[:2].abs().max()))


def test_backward_op_bad_grad_loss():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="grad_loss"):
        fastdiff.ops._schemas.op("diffusion_loss_backward")(torch.ones(3), x, x, torch.tensor([1, 2]), ABAR, x, None,
                                                            torch.ones(2), 0)


def test_opcheck_backward_op():
    from fastdiff.ops._schemas import op

    g = torch.Generator().manual_seed(20)
    x = torch.randn(3, 4, 5, generator=g)
    o = torch.randn(3, 4, 5, generator=g)
    t = torch.tensor([0, 17, 999])
    gl = torch.tensor([1.0, 2.0, -1.0])
    w = torch.ones(3)
    for args in [(gl, o, x, t, ABAR, None, KEY, w, 0), (gl, o, x, t, ABAR, x, None, w, 2),
                 (gl, o, x.contiguous(memory_format=torch.contiguous_format), t, ABAR, None, KEY, w, 1)]:
        torch.library.opcheck(op("diffusion_loss_backward"), args)
    # the forward with need_grad=False now has a working backward (recompute)
    torch.library.opcheck(op("diffusion_loss"), (o.clone().requires_grad_(True), x, t, ABAR, None, KEY, w, 0, False))


def test_compile_recompute_path():
    torch._dynamo.reset()
    x0 = torch.randn(2, 3, 4)
    out = torch.randn(2, 3, 4, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(o, t):
        return fastdiff.diffusion_loss(o, x0, t, SCHED, key=KEY, store_grad=False)

    f(out, torch.tensor([3, 4])).backward()
    want = out.grad.clone()
    out.grad = None
    fastdiff.diffusion_loss(out, x0, torch.tensor([3, 4]), SCHED, key=KEY).backward()
    torch.testing.assert_close(want, out.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_default_recomputes_key_path():
    x0 = torch.randn(4, 3, 16, 16, device="cuda")
    out = torch.randn(4, 3, 16, 16, device="cuda", requires_grad=True)
    key = KEY.cuda()
    loss = fastdiff.diffusion_loss(out, x0, torch.tensor([1, 2, 3, 999], device="cuda"), SCHED.to("cuda"), key=key)
    with OpCounter() as c:
        loss.backward()
    assert c.count("diffusion_loss_backward") == 1
    want = out.grad.clone()
    out.grad = None
    fastdiff.diffusion_loss(out, x0, torch.tensor([1, 2, 3, 999], device="cuda"), SCHED.to("cuda"), key=key,
                            store_grad=True).backward()
    torch.testing.assert_close(out.grad, want, rtol=1e-6, atol=0)
