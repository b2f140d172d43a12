"""fastdiff.multistep_step: every backend against the float64 reference
(fastdiff/reference/multistep.py), its state updates, noise, layouts,
opcheck, torch.compile and bad input.

Tolerances. Each step is checked against float64 maths applied to the
kernel's own state before the call (so errors do not compound across steps).
For a linear form evaluated in precision ``acc`` (float32; float64 for
float64 data; the CPU kernel's float64 for float32 data only tightens this) with at most ~12 terms, the error is at most ~16 eps_acc times
the sum of |coefficient| * max|term| (the bound ``B`` computed below), and a
result stored in a lower precision adds half an ulp of that precision,
bounded by eps_dtype * |value|. In-kernel noise adds the float32 Box-Muller
error (|dz| <= 2e-6 r + 2.5e-7 / r, see tests/test_noise_stats.py) times
|a_z|. Nothing here depends on this CPU's rounding.
"""
from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.ops import _backend
from fastdiff.ops._schemas import op
from fastdiff.ops.multistep import (MULTISTEP_MAX_HISTORY, MULTISTEP_NCOEF, multistep_step,
                                    multistep_threshold)
from fastdiff.reference import multistep as refm
from fastdiff.reference.noise import philox_normal

from _backends import all_backends

BACKENDS = all_backends()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
COL = refm.COL


def _eps(dtype):
    return torch.finfo(dtype).eps


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_table(n_rows, K, kept, noise, gen, p_zero=0.3):
    """Random rows obeying the contract: ages > K, u_last without last_sample
    and a_z without noise are 0; push is 0 or 1; u_on is 0 or 1."""
    t = torch.rand(n_rows, MULTISTEP_NCOEF, generator=gen, dtype=torch.float64) * 2 - 1
    t[torch.rand(n_rows, MULTISTEP_NCOEF, generator=gen) < p_zero] = 0.0
    t[:, COL["u_on"]] = (torch.rand(n_rows, generator=gen) < 0.5).double()
    t[:, COL["push"]] = (torch.rand(n_rows, generator=gen) < 0.8).double()
    for j in range(K + 1, MULTISTEP_MAX_HISTORY + 1):
        t[:, COL[f"u_h{j}"]] = 0.0
        t[:, COL[f"a_h{j}"]] = 0.0
    if not kept:
        t[:, COL["u_last"]] = 0.0
    if noise == "none":
        t[:, COL["a_z"]] = 0.0
    return t


def _bounds(row, x, m, H, L, z, thresh):
    """Magnitude bounds (X0, XC, P) of x0, xc and prev (and of their rounding errors' scale) from the row
    and the inputs' maxima (see the module docstring)."""
    c = {n: abs(float(row[i])) for n, i in COL.items()}

    def mx(v):
        return float(v.abs().max()) if v is not None and v.numel() else 0.0

    X0 = c["c_x"] * mx(x) + c["c_m"] * mx(m)
    if thresh is not None:  # clamp to [-s, s] / s: an error e before becomes e / s, the value is <= 1
        X0 = X0 / float(thresh.min()) + 1.0
    Hm = max((mx(H[j]) for j in range(H.shape[0])), default=0.0)
    XC = mx(x)
    if float(row[COL["u_on"]]) != 0:
        XC = c["u_last"] * mx(L) + c["u_x0"] * X0 + sum(c[f"u_h{j}"] for j in range(1, 4)) * Hm
    P = (c["a_x"] * XC + c["a_m"] * mx(m) + c["a_x0"] * X0 + sum(c[f"a_h{j}"] for j in range(1, 4)) * Hm
         + c["a_z"] * mx(z))
    return X0, XC, P


def _assert_close(got, want, tol, what):
    got = got.detach().cpu().double()
    assert got.shape == want.shape, what
    diff = (got - want).abs()
    bad = ~(diff <= tol)  # NaN counts as bad
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} elements off; worst {float(diff.max()):.3g} "
                                 f"(tol {float(torch.as_tensor(tol).min()):.3g})")


def _z_and_tol(like, key, i):
    """Reference in-kernel noise of step i (float64, memory order of a contiguous ``like``) and the
    per-element float32 Box-Muller tolerance."""
    n = like.numel()
    pairs = philox_normal(refm.step_key(key, i), n + n % 2)
    r = pairs.reshape(-1, 2).pow(2).sum(1).sqrt().repeat_interleave(2)
    return pairs[:n].reshape(like.shape), (2e-6 * r + 2.5e-7 / r)[:n].reshape(like.shape)


def run_steps(backend, shape, dtype, state_dtype, K, kept, noise, n_steps, seed, thresh=False, clip=0.0,
              table=None):
    """n_steps consecutive calls through ``backend``, each checked against the
    float64 reference applied to the kernel's state before the call."""
    dev = backend.device
    kept = kept and torch.Size(shape).numel() > 0  # an empty last_sample means "not kept"
    g = torch.Generator().manual_seed(seed)
    n_rows = n_steps
    tab = table if table is not None else random_table(n_rows, K, kept, noise, g)
    H = torch.zeros((K,) + shape, dtype=state_dtype)
    H.copy_(torch.randn(H.shape, generator=g))  # "previous" predictions (as after a warm-up)
    L = torch.randn(shape, generator=g).to(state_dtype) if kept else torch.empty(0, dtype=state_dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    key = torch.tensor([int(torch.randint(-2**62, 2**62, (1,), generator=g)), 2**63 - 3], dtype=torch.int64)
    si = torch.zeros((), dtype=torch.int64)
    Hd, Ld, sid = H.to(dev), L.to(dev), si.to(dev)
    acc = _acc(dtype)
    for i in range(n_steps):
        m = torch.randn(shape, generator=g).to(dtype)
        th = (torch.rand(shape[0], generator=g) * 2 + 0.5).float() if thresh else None
        nz, ztol = None, torch.zeros(shape, dtype=torch.float64)
        if noise == "tensor":
            nz = torch.randn(shape, generator=g).to(dtype)
            z64 = nz.double()
        elif noise == "key":
            z64, ztol = _z_and_tol(x, key, i)
        else:
            z64 = None
        row = tab[i]
        H_before, L_before = Hd.detach().cpu().clone(), Ld.detach().cpu().clone()
        p64, x064, h64, l64 = refm.multistep_step(m.double(), x.double(), H_before.double(),
                                                  L_before.double() if kept else None, row, i, noise=z64,
                                                  thresh=th, clip_range=clip)
        prev, x0 = backend("multistep_step", m.to(dev), x.to(dev), Hd, Ld, tab.to(dev), sid,
                           nz.to(dev) if nz is not None else None, key.to(dev) if noise == "key" else None,
                           th.to(dev) if th is not None else None, float(clip), True)
        assert prev.dtype == dtype and prev.shape == shape and x0.shape == shape
        assert int(sid) == i + 1, "step_index must advance by one"
        X0, XC, P = _bounds(row, x.double(), m.double(), H_before.double(), L_before.double(), z64, th)
        az = abs(float(row[COL["a_z"]]))
        e_acc = 16 * _eps(acc)
        what = f"{backend} step {i} K={K} kept={kept} {dtype}/{state_dtype} noise={noise}"
        _assert_close(prev, p64, e_acc * (P + 1e-30) + _eps(dtype) * p64.abs() + az * ztol, what + " prev")
        _assert_close(x0, x064, e_acc * (X0 + 1e-30) + _eps(dtype) * x064.abs(), what + " x0")
        if K:
            _assert_close(Hd, h64, e_acc * (X0 + 1e-30) + _eps(state_dtype) * h64.abs(), what + " history")
        if kept:
            _assert_close(Ld, l64, e_acc * (XC + 1e-30) + _eps(state_dtype) * l64.abs(), what + " last_sample")
        x = prev.detach().cpu()
    return tab


# --------------------------------------------------------------- parity -----
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [0, 1, 2, 3])
@pytest.mark.parametrize("kept", [False, True], ids=["nolast", "last"])
@pytest.mark.parametrize("noise", ["none", "tensor", "key"])
def test_random_tables_float32(backend, K, kept, noise):
    """7 consecutive steps (4 for interpreted Triton; the ring wraps around for every K either way), random
    rows with zero coefficients, u_on and push on and off."""
    shape = (2, 3, 5, 7) if backend.small_only else (3, 4, 33, 17)
    run_steps(backend, shape, torch.float32, torch.float32, K, kept, noise, 4 if backend.small_only else 7,
              seed=100 * K + 10 * kept + len(noise))


# (data dtype, history / last_sample dtype): the state is the data's dtype or float32
DTYPE_CASES = [(d, d) for d in DTYPES] + [(d, torch.float32) for d in DTYPES if d != torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,state_dtype", DTYPE_CASES, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPE_CASES])
def test_dtypes(backend, dtype, state_dtype):
    shape = (2, 5, 3, 3) if backend.small_only else (3, 5, 31, 9)
    run_steps(backend, shape, dtype, state_dtype, 2, True, "key", 5, seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (2, 1, 1, 1), (3, 7, 1, 5), (4, 2, 3, 5, 2), (0, 3, 4)],
                         ids=str)
def test_odd_shapes(backend, shape):
    run_steps(backend, shape, torch.float32, torch.float32, 3, True, "key", 4, seed=sum(shape) + len(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["thresh", "clip"])
def test_threshold_and_clip(backend, mode):
    shape = (3, 2, 4, 5)
    run_steps(backend, shape, torch.float32, torch.float32, 2, False, "none", 4, seed=3,
              thresh=mode == "thresh", clip=0.7 if mode == "clip" else 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_coefficients_are_not_read(backend):
    """NaN in unused history slots, last_sample and noise must not reach the outputs: a term whose
    coefficient is exactly 0 is not read."""
    dev = backend.device
    shape = (2, 3, 4)
    g = torch.Generator().manual_seed(5)
    x, m = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    H = torch.full((3,) + shape, float("nan"))
    H[2] = torch.randn(shape, generator=g)  # i = 3: H[1] = slot 2 is the only one read
    L = torch.full(shape, float("nan"))
    nz = torch.full(shape, float("nan"))
    tab = torch.zeros(4, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[3, [COL["c_x"], COL["c_m"], COL["a_x"], COL["a_x0"], COL["a_h1"]]] = torch.tensor(
        [1.5, -0.5, 0.9, 0.2, -0.3], dtype=torch.float64)
    si = torch.tensor(3)
    prev, x0 = backend("multistep_step", m.to(dev), x.to(dev), H.to(dev), L.to(dev), tab.to(dev), si.to(dev),
                       nz.to(dev), None, None, 0.0, True)
    want = 0.9 * x + 0.2 * (1.5 * x - 0.5 * m) - 0.3 * H[2]
    assert torch.isfinite(prev.cpu()).all()
    torch.testing.assert_close(prev.cpu(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ the ring ------
def test_ring_buffer_semantics():
    """The slots hold x0 of steps i-1, i-2, ... after consecutive pushes; H[j] is x0 of j steps ago."""
    shape = (2, 3)
    K = 3
    H = torch.zeros((K,) + shape)
    tab = torch.zeros(8, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[:, COL["c_m"]] = 1.0  # x0 = model_output
    tab[:, COL["push"]] = 1.0
    tab[5, COL["a_h1"]], tab[6, COL["a_h2"]], tab[7, COL["a_h3"]] = 1.0, 1.0, 1.0
    si = torch.zeros((), dtype=torch.int64)
    outs = {}
    for i in range(8):
        m = torch.full(shape, float(i))
        prev, x0 = fastdiff.multistep_step(m, torch.zeros(shape), H, torch.empty(0), tab, si, return_x0=True)
        outs[i] = prev
        assert torch.equal(H[i % K], m)
    assert torch.equal(outs[5], torch.full(shape, 4.0))  # H[1] at i=5: x0 of step 4
    assert torch.equal(outs[6], torch.full(shape, 4.0))  # H[2] at i=6: x0 of step 4
    assert torch.equal(outs[7], torch.full(shape, 4.0))  # H[3] at i=7: x0 of step 4, read before step 7's push


def test_push_off_leaves_state():
    shape = (2, 4)
    H = torch.randn((2,) + shape)
    L = torch.randn(shape)
    H0, L0 = H.clone(), L.clone()
    tab = torch.zeros(1, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[0, [COL["c_x"], COL["u_on"], COL["u_last"], COL["a_x"]]] = torch.tensor([1.0, 1.0, 0.5, 1.0],
                                                                                 dtype=torch.float64)
    si = torch.zeros((), dtype=torch.int64)
    fastdiff.multistep_step(torch.randn(shape), torch.randn(shape), H, L, tab, si)
    assert torch.equal(H, H0) and torch.equal(L, L0) and int(si) == 1


# ---------------------------------------------------------------- layouts ---
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """model_output / sample / noise in any layout are copied into the working layout (that of the
    history slots); history in channels_last fixes a channels_last working layout for the outputs."""
    dev = backend.device
    shape = (2, 3, 4, 5)
    g = torch.Generator().manual_seed(11)
    tab = random_table(3, 2, True, "tensor", g)
    x = torch.randn(shape, generator=g)
    m = torch.randn(shape, generator=g)
    nz = torch.randn(shape, generator=g)
    H = torch.randn((2,) + shape, generator=g)
    L = torch.randn(shape, generator=g)

    def call(x_, m_, nz_, H_, L_):
        si = torch.tensor(1, device=dev)
        prev, x0 = backend("multistep_step", m_.to(dev), x_.to(dev), H_, L_, tab.to(dev), si, nz_.to(dev), None,
                           None, 0.0, True)
        return prev, x0

    Hc, Lc = H.clone().to(dev), L.clone().to(dev)
    p_ref, x0_ref = call(x, m, nz, Hc, Lc)
    # strided views and channels_last inputs, contiguous state
    big = torch.zeros(2, 6, 4, 5)
    xs = big[:, ::2]
    xs.copy_(x)
    Hn, Ln = H.clone().to(dev), L.clone().to(dev)
    p, x0 = call(xs, m.contiguous(memory_format=torch.channels_last), nz.transpose(2, 3).contiguous().transpose(2, 3),
                 Hn, Ln)
    assert p.is_contiguous()
    torch.testing.assert_close(p.cpu(), p_ref.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(Hn.cpu(), Hc.cpu(), rtol=0, atol=0)
    # channels_last state: outputs come back channels_last with the same values
    Hcl = H.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3).to(dev)
    Lcl = L.contiguous(memory_format=torch.channels_last).to(dev)
    p2, x02 = call(x, m, nz, Hcl, Lcl)
    assert p2.stride() == Lcl.stride() and x02.stride() == Lcl.stride()
    torch.testing.assert_close(p2.cpu(), p_ref.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Hcl.cpu(), Hc.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(Lcl.cpu(), Lc.cpu(), rtol=1e-6, atol=1e-6)


def test_key_noise_follows_working_memory_order():
    """With channels_last state the in-kernel noise is laid out in channels_last memory order."""
    shape = (2, 3, 4, 5)
    key = torch.tensor([123, 456], dtype=torch.int64)
    tab = torch.zeros(3, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[:, COL["a_z"]] = 1.0  # prev = z
    H = torch.zeros((1,) + shape).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    si = torch.tensor(2)
    prev, _ = fastdiff.multistep_step(torch.zeros(shape), torch.zeros(shape), H, torch.empty(0), tab, si, key=key)
    want = refm.step_noise(H[0], key, 2)
    assert prev.stride() == H[0].stride()
    torch.testing.assert_close(prev.double(), want, rtol=0, atol=3e-5)


# ------------------------------------------------------------------ noise ---
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_noise_statistics_and_determinism(backend):
    """prev = z: each step's noise is N(0, 1) (mean, variance within 5 standard errors), different from
    the previous step's (correlation within 5 SE of 0), equal to the reference stream of [seed, offset+i],
    and the same key replays the same run."""
    dev = backend.device
    shape = (2, 1, 16, 16) if backend.small_only or backend.name == "reference" else (4, 4, 32, 32)
    n = torch.Size(shape).numel()
    key = torch.tensor([0x1234_5678_9ABC_DEF0 - 2**63, 7], dtype=torch.int64)
    tab = torch.zeros(3, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[:, COL["a_z"]] = 1.0

    def run():
        si = torch.zeros((), dtype=torch.int64, device=dev)
        H = torch.zeros((0,) + shape, device=dev)
        zs = []
        for _ in range(3):
            p, _ = backend("multistep_step", torch.zeros(shape, device=dev), torch.zeros(shape, device=dev), H,
                           torch.empty(0, device=dev), tab.to(dev), si, None, key.to(dev), None, 0.0, False)
            zs.append(p.cpu().double().reshape(-1))
        return zs

    zs = run()
    for i, z in enumerate(zs):
        assert abs(float(z.mean())) < 5 / n ** 0.5, f"step {i} mean"
        assert abs(float(z.var()) - 1) < 5 * (2 / (n - 1)) ** 0.5, f"step {i} variance"
        want, tol = _z_and_tol(z, key, i)
        assert bool(((z - want).abs() <= tol).all()), f"step {i} is not the stream of [seed, offset + {i}]"
    for a, b in ((0, 1), (1, 2), (0, 2)):
        r = float(torch.corrcoef(torch.stack([zs[a], zs[b]]))[0, 1])
        assert abs(r) < 5 / n ** 0.5, f"steps {a} and {b} correlated: {r}"
    again = run()
    for z, z2 in zip(zs, again):
        assert torch.equal(z, z2), "the same key must reproduce the run"


def test_noise_not_drawn_without_a_z():
    """A row with a_z = 0 gives the same result with and without a key."""
    shape = (2, 3)
    tab = torch.zeros(1, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[0, COL["a_x"]] = 1.0
    x = torch.randn(shape)
    p1, _ = fastdiff.multistep_step(x, x, torch.zeros((0,) + shape), torch.empty(0), tab, torch.tensor(0),
                                    key=fastdiff.draw_key())
    assert torch.equal(p1, x)


# --------------------------------------------------------- row guards -------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0].name in ("cpp", "reference")])
@pytest.mark.parametrize("problem", ["index", "nan", "age", "u_last", "a_z", "push"])
def test_bad_row_raises_on_cpu_and_changes_nothing(backend, problem):
    b = backend
    shape = (2, 3)
    tab = torch.zeros(2, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[:, COL["c_x"]] = 1.0
    tab[:, COL["push"]] = 1.0
    si = torch.tensor(1)
    if problem == "index":
        si = torch.tensor(2)
    elif problem == "nan":
        tab[1, COL["a_m"]] = float("nan")
    elif problem == "age":
        tab[1, COL["a_h2"]] = 0.5
    elif problem == "u_last":
        tab[1, COL["u_on"]], tab[1, COL["u_last"]] = 1.0, 1.0
    elif problem == "a_z":
        tab[1, COL["a_z"]] = 1.0
    else:
        tab[1, COL["push"]] = 0.5
    H = torch.randn((1,) + shape)
    H0, si0 = H.clone(), si.clone()
    with pytest.raises(ValueError, match="step_index|coeffs"):
        b("multistep_step", torch.randn(shape), torch.randn(shape), H, torch.empty(0), tab, si, None, None, None,
          0.0, False)
    assert torch.equal(H, H0) and torch.equal(si, si0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0].name in ("triton", "cuda")])
def test_bad_row_gives_nan_on_device_kernels(backend):
    """The device kernels cannot raise without a host sync: NaN outputs, no state write, index advanced."""
    dev = backend.device
    shape = (2, 3)
    tab = torch.zeros(2, MULTISTEP_NCOEF, dtype=torch.float64)
    tab[:, COL["c_x"]], tab[:, COL["a_x"]], tab[:, COL["push"]] = 1.0, 1.0, 1.0
    for si_val, t in ((5, tab), (1, tab.clone().index_fill_(1, torch.tensor([COL["a_h3"]]), 1.0))):
        H = torch.randn((1,) + shape, device=dev)
        H0 = H.clone()
        si = torch.tensor(si_val, device=dev)
        p, x0 = backend("multistep_step", torch.randn(shape, device=dev), torch.randn(shape, device=dev), H,
                        torch.empty(0, device=dev), t.to(dev), si, None, None, None, 0.0, True)
        assert torch.isnan(p).all() and torch.isnan(x0).all()
        assert torch.equal(H, H0) and int(si) == si_val + 1


# ------------------------------------------------------------ threshold -----
def test_multistep_threshold_matches_dynamic_threshold():
    g = torch.Generator().manual_seed(2)
    shape = (3, 4, 8)
    x, m = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    tab = random_table(4, 1, False, "none", g)
    si = torch.tensor(2)
    s = multistep_threshold(m, x, tab, si, ratio=0.9, max_value=2.5)
    x0 = tab[2, 0] * x.double() + tab[2, 1] * m.double()
    want = fastdiff.reference.dynamic_threshold(x0, 0.9, 2.5)
    torch.testing.assert_close(s, want.float(), rtol=1e-5, atol=1e-5)
    assert int(si) == 2  # not advanced


# ------------------------------------------------------- opcheck / compile ---
def _args(shape=(2, 3, 4), K=2, kept=True, key=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    tab = random_table(6, K, kept, "key" if key else "none", g)
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.zeros((K,) + shape),
            torch.randn(shape, generator=g) if kept else torch.empty(0), tab, torch.tensor(1),
            None, torch.tensor([3, 4]) if key else None, None, 0.0, True)


@pytest.mark.parametrize("variant", ["key", "nokey_nolast", "K0"])
def test_opcheck(variant):
    args = _args(K=0 if variant == "K0" else 2, kept=variant != "nokey_nolast", key=variant != "nokey_nolast")
    torch.library.opcheck(op("multistep_step"), args)


def test_opcheck_reference_kernel_without_extension(monkeypatch):
    """The Python reference kernel satisfies the same schema (mutations, aliasing)."""
    lib = torch.library.Library("fastdiff", "IMPL")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib.impl("multistep_step", _backend.cuda_kernel("multistep_step", "reference"), "CPU")
    try:
        torch.library.opcheck(op("multistep_step"), _args())
    finally:
        lib._destroy()


def test_compile_five_step_loop_fullgraph_no_recompile():
    """A 5-step sampling loop compiles to one graph (no graph break: fullgraph=True), the step function
    compiles once across steps (step_index is a tensor), and results equal eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    shape = (2, 3, 8, 8)
    g = torch.Generator().manual_seed(4)
    tab = random_table(10, 2, True, "key", g)
    x0 = torch.randn(shape, generator=g)
    mo = torch.randn(shape, generator=g)
    key = torch.tensor([9, 10])

    def step(x, H, L, si):
        p, _ = fastdiff.multistep_step(mo * 0.5 + x * 0.1, x, H, L, tab, si, key=key)
        return p

    def loop(x, H, L, si):
        for _ in range(5):
            x = step(x, H, L, si)
        return x

    def fresh():
        return torch.zeros((2,) + shape), torch.zeros(shape), torch.zeros((), dtype=torch.int64)

    He, Le, se = fresh()
    want = loop(x0, He, Le, se)

    cnt = CompileCounterWithBackend("aot_eager")
    Hc, Lc, sc = fresh()
    got = torch.compile(loop, backend=cnt, fullgraph=True)(x0, Hc, Lc, sc)
    assert cnt.frame_count == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(Hc, He) and torch.equal(Lc, Le) and int(sc) == 5

    cnt1 = CompileCounterWithBackend("aot_eager")
    f = torch.compile(step, backend=cnt1, fullgraph=True)
    H1, L1, s1 = fresh()
    x = x0
    for _ in range(5):
        x = f(x, H1, L1, s1)
    assert cnt1.frame_count == 1, f"recompiled: {cnt1.frame_count} compilations over 5 steps"
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    assert int(s1) == 5


# -------------------------------------------------------------- bad input ---
def _good():
    shape = (2, 3, 4)
    return dict(model_output=torch.randn(shape), sample=torch.randn(shape), history=torch.zeros((2,) + shape),
                last_sample=torch.zeros(shape), coeffs=torch.zeros(4, MULTISTEP_NCOEF, dtype=torch.float64),
                step_index=torch.tensor(0))


def _call(**over):
    a = _good()
    kw = {k: over.pop(k) for k in list(over) if k in ("noise", "key", "thresh", "clip_range", "return_x0")}
    a.update(over)
    return fastdiff.multistep_step(a["model_output"], a["sample"], a["history"], a["last_sample"], a["coeffs"],
                                   a["step_index"], **kw)


BAD = [
    (dict(model_output=torch.randn(2, 3, 5)), ValueError, "model_output"),
    (dict(model_output=torch.randn(2, 3, 4).double()), TypeError, "model_output"),
    (dict(sample=torch.randn(2, 3, 4).int()), TypeError, "sample"),
    (dict(sample=torch.tensor(1.0)), ValueError, "sample"),
    (dict(sample=[1.0]), TypeError, "sample"),
    (dict(history=torch.zeros(4, 2, 3, 4)), ValueError, "history"),
    (dict(history=torch.zeros(2, 2, 3, 5)), ValueError, "history"),
    (dict(history=torch.zeros(2, 2, 3, 4, dtype=torch.float16)), TypeError, "history"),
    (dict(history=torch.zeros(2, 2, 6, 4)[:, :, ::2]), ValueError, "history"),
    (dict(history=None), TypeError, "history"),
    (dict(last_sample=torch.zeros(2, 3, 5)), ValueError, "last_sample"),
    (dict(last_sample=torch.zeros(2, 3, 4).double()), TypeError, "last_sample"),
    (dict(last_sample=torch.zeros(2, 4, 3).transpose(1, 2)), ValueError, "last_sample"),
    (dict(coeffs=torch.zeros(4, 16)), TypeError, "coeffs"),
    (dict(coeffs=torch.zeros(4, 15, dtype=torch.float64)), ValueError, "coeffs"),
    (dict(coeffs=torch.zeros(0, 16, dtype=torch.float64)), ValueError, "coeffs"),
    (dict(coeffs=torch.zeros(4, 16, dtype=torch.float64).index_fill_(0, torch.tensor([3]), float("nan"))),
     ValueError, "coeffs"),
    (dict(step_index=torch.tensor(0.0)), TypeError, "step_index"),
    (dict(step_index=torch.tensor([0])), ValueError, "step_index"),
    (dict(step_index=torch.tensor(4)), ValueError, "step_index"),
    (dict(step_index=torch.tensor(-1)), ValueError, "step_index"),
    (dict(step_index=0), TypeError, "step_index"),
    (dict(noise=torch.randn(2, 3, 5)), ValueError, "noise"),
    (dict(noise=torch.randn(2, 3, 4), key=torch.tensor([1, 2])), ValueError, "noise or key"),
    (dict(key=torch.tensor([1, 2, 3])), TypeError, "key"),
    (dict(key=torch.tensor([1.0, 2.0])), TypeError, "key"),
    (dict(thresh=torch.ones(3)), ValueError, "thresh"),
    (dict(thresh=torch.ones(2, dtype=torch.float64)), TypeError, "thresh"),
    (dict(thresh=torch.tensor([1.0, 0.0])), ValueError, "thresh"),
    (dict(clip_range=-1.0), ValueError, "clip_range"),
    (dict(clip_range=float("nan")), ValueError, "clip_range"),
    (dict(clip_range="1"), TypeError, "clip_range"),
]


@pytest.mark.parametrize("over,exc,name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(over, exc, name):
    with pytest.raises(exc, match=name):
        _call(**over)


@pytest.mark.parametrize("problem", ["age", "a_z"])
def test_bad_row_through_public_function(problem):
    a = _good()
    a["coeffs"][0, COL["a_h3"] if problem == "age" else COL["a_z"]] = 1.0
    with pytest.raises(ValueError, match="coeffs row 0"):
        fastdiff.multistep_step(*a.values())


def test_direct_op_call_checks_arguments():
    """torch.ops.fastdiff.multistep_step itself (C++ or reference kernel) rejects bad shapes."""
    a = _good()
    with pytest.raises((ValueError, RuntimeError), match="history"):
        op("multistep_step")(a["model_output"], a["sample"], torch.zeros(5, 2, 3, 4), a["last_sample"], a["coeffs"],
                             a["step_index"], None, None, None, 0.0, False)


def test_constants_exported():
    assert MULTISTEP_NCOEF == 16 and MULTISTEP_MAX_HISTORY == 3
    assert fastdiff.multistep_step is multistep_step
