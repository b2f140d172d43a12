"""The public functions: opcheck, gradcheck, torch.compile, bad input, fuzzing."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import reference as ref
from fastdiff.ops._layout import canonical
from fastdiff.ops._schemas import op

SCHED = fastdiff.NoiseSchedule.make("linear", 1000)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _dev_param():
    return [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES]


# ------------------------------------------------------------- opcheck -----
def _samples(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g).to(device)
    o = torch.randn(3, 4, 5, 6, generator=g).to(device)
    t = torch.tensor([0, 17, 999], device=device)
    a = SCHED.alphas_cumprod.to(device)
    k = torch.tensor([5, 6], dtype=torch.int64, device=device)
    w = torch.ones(3, device=device)
    xcl = x.contiguous(memory_format=torch.channels_last)
    return {
        "q_sample": [(x, t, a, o), (xcl, t, a, o), (x.requires_grad_(False).clone().requires_grad_(True), t, a, o)],
        "q_sample_rng": [(x, t, a, k, True), (x, t, a, k, False), (xcl, t, a, k, True)],
        "diffusion_loss": [(o, x, t, a, None, k, w, 0, True), (o, x, t, a, x, None, w, 2, False),
                           (o.clone().requires_grad_(True), x, t, a, None, k, w, 1, True)],
        "ddpm_step": [(o, x, t, t - 1, a, None, None, k, None, 0, 0, 1.0),
                      (o, xcl, t, t - 1, a, o.abs() * 0.01, x, None, None, 2, 4, 0.0)],
        "ddim_step": [(o, x, t, t - 1, a, None, k, None, 1, 0.0, 1.0, 1.0, True),
                      (o, x, t, t - 1, a, None, None, torch.full((3,), 1.5, device=device), 0, 0.0, 0.0, 1.0, False)],
    }


@pytest.mark.parametrize("device", _dev_param())
@pytest.mark.parametrize("name", ["q_sample", "q_sample_rng", "diffusion_loss", "ddpm_step", "ddim_step"])
def test_opcheck(device, name):
    for args in _samples(device)[name]:
        torch.library.opcheck(op(name), args)


# ----------------------------------------------------------- gradcheck -----
def test_gradcheck_q_sample():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    n = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, 700])
    assert torch.autograd.gradcheck(lambda a, b: fastdiff.q_sample(a, t, SCHED, b)[0], (x, n))
    assert torch.autograd.gradcheck(lambda a: fastdiff.q_sample(a, t, SCHED, key=torch.tensor([1, 2]))[0], (x,))


@pytest.mark.parametrize("target", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_gradcheck_loss(target, weighting):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    o = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 10, 900])
    k = torch.tensor([3, 4])
    f = lambda out: fastdiff.diffusion_loss(out, x, t, SCHED, key=k, target=target, weighting=weighting,  # noqa
                                            reduction="none")
    assert torch.autograd.gradcheck(f, (o,))


def test_loss_matches_textbook_mse_and_grad():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([1, 50, 500, 999])
    key = fastdiff.draw_key(torch.Generator().manual_seed(9))
    xt, eps = fastdiff.q_sample(x0, t, SCHED, key=key)
    out = (xt * 0.3).requires_grad_(True)
    loss = fastdiff.diffusion_loss(out, x0, t, SCHED, key=key)
    loss.backward()
    out2 = out.detach().clone().requires_grad_(True)
    ref_loss = torch.nn.functional.mse_loss(out2, eps)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.grad, out2.grad, rtol=1e-5, atol=1e-8)


def test_min_snr_weights():
    t = torch.tensor([0, 100, 999])
    snr = SCHED.snr()[t]
    w = SCHED.loss_weight(t, "min_snr", "epsilon", 5.0).double()
    torch.testing.assert_close(w, (snr.clamp(max=5.0) / snr), rtol=1e-6, atol=0)
    w = SCHED.loss_weight(t, "min_snr", "v_prediction", 5.0).double()
    torch.testing.assert_close(w, snr.clamp(max=5.0) / (snr + 1), rtol=1e-6, atol=0)
    zt = fastdiff.NoiseSchedule.make("linear", 1000, zero_terminal_snr=True)
    assert torch.isfinite(zt.loss_weight(torch.tensor([999]), "min_snr", "epsilon")).all()



def test_schedule_from_alphas_cumprod_shares_table_and_weights():
    from fastdiff.schedule import loss_weight

    abar = SCHED.alphas_cumprod
    s = fastdiff.NoiseSchedule.from_alphas_cumprod(abar)
    assert s.alphas_cumprod is abar  # a float64 table is shared, not copied
    torch.testing.assert_close(s.betas, SCHED.betas, rtol=1e-9, atol=1e-15)  # derived 1 - abar_t/abar_{t-1}
    exact = fastdiff.NoiseSchedule.from_alphas_cumprod(abar, betas=SCHED.betas, name="linear", config=SCHED.config)
    assert exact.betas is SCHED.betas and exact.name == "linear" and exact.config == SCHED.config
    t = torch.tensor([0, 7, 500, 999])
    for weighting, target in [("uniform", "epsilon"), ("min_snr", "epsilon"), ("min_snr", "sample"),
                              ("min_snr", "v_prediction")]:
        torch.testing.assert_close(loss_weight(abar, t, weighting, target), SCHED.loss_weight(t, weighting, target),
                                   rtol=0, atol=0)
    moved = SCHED.to("cpu")
    assert moved.alphas_cumprod.dtype == torch.float64 and moved.name == SCHED.name
    with pytest.raises(ValueError, match="alphas_cumprod"):
        fastdiff.NoiseSchedule.from_alphas_cumprod(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="betas"):
        fastdiff.NoiseSchedule.from_alphas_cumprod(abar, betas=SCHED.betas[:-1])
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(abar, t, "snr")

# --------------------------------------------------------- torch.compile ---
class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, gm, inputs):
        self.n += 1
        return gm.forward


def test_compile_training_loss_no_graph_break_no_recompile():
    torch._dynamo.reset()
    model = torch.nn.Conv2d(3, 3, 3, padding=1)

    def step(x0, t, key):
        xt, _ = fastdiff.q_sample(x0, t, SCHED, key=key, return_noise=False)
        return fastdiff.diffusion_loss(model(xt), x0, t, SCHED, key=key, weighting="min_snr")

    cnt = _Counter()
    f = torch.compile(step, backend=cnt, fullgraph=True)
    x0 = torch.randn(4, 3, 8, 8)
    for i in range(4):
        t = torch.randint(0, 1000, (4,))
        loss = f(x0, t, fastdiff.draw_key())
        loss.backward()
        ref_loss = step(x0, t, torch.tensor([0, 0]))  # runs eagerly too
        assert torch.isfinite(loss) and torch.isfinite(ref_loss)
    assert cnt.n == 1, f"compiled {cnt.n} times"


def test_compile_sampling_step_no_recompile():
    torch._dynamo.reset()

    def one(x, t, key):
        out = x * 0.5
        return fastdiff.ddpm_step(out, t, x, SCHED, key=key)[0]

    cnt = _Counter()
    f = torch.compile(one, backend=cnt, fullgraph=True)
    x = torch.randn(2, 3, 4, 4)
    for t in (999, 500, 3, 0):
        tt = torch.full((2,), t)
        k = torch.tensor([1, t])
        torch.testing.assert_close(f(x, tt, k), one(x, tt, k))
    assert cnt.n == 1, f"compiled {cnt.n} times"


def test_compile_inductor_runs():
    torch._dynamo.reset()
    f = torch.compile(lambda x, t, k: fastdiff.q_sample(x * 2, t, SCHED, key=k)[0] + 1, fullgraph=True)
    x = torch.randn(2, 3, 4)
    t = torch.tensor([1, 2])
    k = torch.tensor([3, 4])
    torch.testing.assert_close(f(x, t, k), fastdiff.q_sample(x * 2, t, SCHED, key=k)[0] + 1)


# ------------------------------------------------ reproducibility (API) ----
def test_generator_reproduces_noise():
    x = torch.randn(2, 3, 8)
    t = torch.tensor([5, 6])
    a = fastdiff.q_sample(x, t, SCHED, generator=torch.Generator().manual_seed(4))[1]
    b = fastdiff.q_sample(x, t, SCHED, generator=torch.Generator().manual_seed(4))[1]
    c = fastdiff.q_sample(x, t, SCHED, generator=torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = fastdiff.ddpm_step(x, t, x, SCHED)[0]
    torch.manual_seed(7)
    e = fastdiff.ddpm_step(x, t, x, SCHED)[0]
    assert torch.equal(d, e)


def test_learned_variance_split_channels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 4, generator=g)
    mo = torch.randn(2, 6, 4, 4, generator=g)
    n = torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([10, 500])
    prev, _ = fastdiff.ddpm_step(mo, t, x, SCHED, variance_type="learned_range", noise=n)
    p64, _ = ref.ddpm_step(mo[:, :3].double(), x.double(), t, t - 1, SCHED.alphas_cumprod, noise=n.double(),
                           model_var=mo[:, 3:].double(), variance_type="learned_range")
    torch.testing.assert_close(prev.double(), p64, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ bad input ----
X = torch.randn(2, 3, 4)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: fastdiff.q_sample(X, 1000, SCHED), ValueError, "t=1000"),
    (lambda: fastdiff.q_sample(X, -1, SCHED), ValueError, "t=-1"),
    (lambda: fastdiff.q_sample(X, torch.tensor([1, 5000]), SCHED), ValueError, "t has values"),
    (lambda: fastdiff.q_sample(X, torch.tensor([1, 2, 3]), SCHED), ValueError, "t must have shape (2,)"),
    (lambda: fastdiff.q_sample(X, torch.tensor([1.0, 2.0]), SCHED), TypeError, "integer"),
    (lambda: fastdiff.q_sample(X.int(), 1, SCHED), TypeError, "x0 must be float"),
    (lambda: fastdiff.q_sample(torch.tensor(1.0), 1, SCHED), ValueError, "batch dimension"),
    (lambda: fastdiff.q_sample(X, 1, SCHED, torch.randn(2, 3, 5)), ValueError, "noise must have the shape"),
    (lambda: fastdiff.q_sample(X, 1, SCHED, X.double()), TypeError, "noise must have the dtype"),
    (lambda: fastdiff.q_sample(X, 1, "linear"), TypeError, "schedule must be"),
    (lambda: fastdiff.q_sample(X, 1, torch.ones(3, 3)), ValueError, "1-D"),
    (lambda: fastdiff.q_sample(X, 1, SCHED, key=torch.tensor([1.0, 2.0])), TypeError, "key must be"),
    (lambda: fastdiff.diffusion_loss(X, X, 1, SCHED), ValueError, "exactly one of noise= or key="),
    (lambda: fastdiff.diffusion_loss(X, X, 1, SCHED, X, target="x0"), ValueError, "target must be"),
    (lambda: fastdiff.diffusion_loss(X, X, 1, SCHED, X, weighting="snr"), ValueError, "weighting must be"),
    (lambda: fastdiff.diffusion_loss(X, X, 1, SCHED, X, weighting=torch.ones(3)), ValueError, "weighting must"),
    (lambda: fastdiff.diffusion_loss(X[:1], X, 1, SCHED, X), ValueError, "model_output must have the shape"),
    (lambda: fastdiff.ddpm_step(X, 1, X, SCHED, prediction_type="eps"), ValueError, "prediction_type"),
    (lambda: fastdiff.ddpm_step(X, 1, X, SCHED, variance_type="big"), ValueError, "variance_type"),
    (lambda: fastdiff.ddpm_step(X, 1, X, SCHED, variance_type="learned"), ValueError, "needs model_var"),
    (lambda: fastdiff.ddpm_step(X, 5, X, SCHED, t_prev=torch.tensor([5, 9])), ValueError, "t_prev must be smaller"),
    (lambda: fastdiff.ddpm_step(X, 5, X, SCHED, t_prev=-2), ValueError, "t_prev=-2"),
    (lambda: fastdiff.ddpm_step(X, 5, X, SCHED, clip_sample=True, clip_sample_range=0), ValueError, "clip_sample"),
    (lambda: fastdiff.ddim_step(X, 5, X, SCHED, eta=-1.0), ValueError, "eta must be"),
    (lambda: fastdiff.ddim_step(X, 5, X, SCHED, final_alpha_cumprod=0.0), ValueError, "final_alpha_cumprod"),
    (lambda: fastdiff.ddim_step(X, 5, X, SCHED, thresholding=True, dynamic_thresholding_ratio=2.0), ValueError,
     "dynamic_thresholding_ratio"),
    (lambda: fastdiff.NoiseSchedule.make("quadratic"), ValueError, "schedule must be one of"),
    (lambda: fastdiff.NoiseSchedule.make("linear", 0), ValueError, "num_timesteps"),
    (lambda: fastdiff.NoiseSchedule.from_betas(torch.tensor([0.1, 1.5])), ValueError, "betas must lie"),
    (lambda: SCHED.timesteps(2000), ValueError, "num_steps"),
])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    assert words in str(e.value), str(e.value)


def test_direct_op_bad_input_raises_not_crashes():
    a = SCHED.alphas_cumprod
    # typed: a wrong dtype is a TypeError, a wrong shape a ValueError (csrc/host.h, ops/_kernel_checks.py)
    with pytest.raises(TypeError, match="alphas_cumprod must be float64"):
        op("q_sample")(X, torch.tensor([1, 2]), a.float(), X)
    with pytest.raises(ValueError, match="t must have shape"):
        op("q_sample")(X, torch.tensor([1]), a, X)
    with pytest.raises(TypeError, match="key must be"):
        op("q_sample_rng")(X, torch.tensor([1, 2]), a, torch.tensor([1]), True)
    with pytest.raises(ValueError, match="exactly one of noise, key"):
        op("diffusion_loss")(X, X, torch.tensor([1, 2]), a, None, None, torch.ones(2), 0, False)


# -------------------------------------------------------------- fuzzing ----
@st.composite
def _case(draw):
    nd = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=nd, max_size=nd)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    perm = draw(st.permutations(range(nd))) if nd > 1 else [0]
    T = draw(st.integers(2, 1000))
    t = draw(st.lists(st.integers(1, T - 1), min_size=shape[0], max_size=shape[0]))
    sched = draw(st.sampled_from(["linear", "cosine", "scaled_linear", "sigmoid"]))
    seed = draw(st.integers(0, 2**31))
    return shape, dtype, perm, T, t, sched, seed


def _strided(x, perm):
    """The same values, with memory laid out in dimension order ``perm``."""
    return x.permute(*perm).contiguous().permute(*sorted(range(len(perm)), key=lambda i: perm[i]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_fuzz_against_reference(case):
    shape, dtype, perm, T, t, sname, seed = case
    s = fastdiff.NoiseSchedule.make(sname, T)
    g = torch.Generator().manual_seed(seed)
    x0 = _strided(torch.randn(shape, generator=g).to(dtype), perm)
    out = _strided(torch.randn(shape, generator=g).to(dtype), perm[::-1])
    tt = torch.tensor(t)
    key = torch.tensor([seed, seed // 3])
    # in-kernel noise is float32-precision even for float64 data (documented), hence 2e-6
    tol = {torch.float32: 3e-5, torch.float64: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    xt, nz = fastdiff.q_sample(x0, tt, s, key=key)
    z = ref.noise_like(canonical(x0), key)
    r = ref.q_sample(x0.double(), tt, s.alphas_cumprod, z)
    assert (xt.double() - r).abs().max() <= tol * (1 + r.abs().max())
    per = fastdiff.diffusion_loss(out, x0, tt, s, key=key, target="v_prediction", reduction="none")
    p64, _ = ref.diffusion_loss(out.double(), x0.double(), tt, s.alphas_cumprod, z, torch.ones(shape[0]),
                                "v_prediction")
    assert torch.allclose(per.double(), p64, rtol=5 * tol + 1e-5, atol=1e-6)
    prev, x0h = fastdiff.ddim_step(out, tt, x0, s, eta=0.7, key=key, prediction_type="v_prediction")
    p64, _ = ref.ddim_step(out.double(), x0.double(), tt, tt - 1, s.alphas_cumprod, noise=z, eta=0.7,
                           prediction_type="v_prediction")
    assert (prev.double() - p64).abs().max() <= tol * (1 + p64.abs().max())


def test_import_without_extension_falls_back_and_warns_once():
    """With the compiled extension unavailable, fastdiff still imports, says
    so once, and runs the ops with the reference kernels on CPU."""
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastdiff\n"
        "    import fastdiff.ops\n"
        "msgs = [str(x.message) for x in w if 'fastdiff._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "s = fastdiff.NoiseSchedule.make('linear', 10)\n"
        "x = torch.randn(2, 3)\n"
        "xt, n = fastdiff.q_sample(x, torch.tensor([1, 2]), s, key=torch.tensor([1, 2]))\n"
        "from fastdiff.reference import noise_like\n"
        "assert torch.allclose(n.double(), noise_like(x, torch.tensor([1, 2])), atol=1e-6)\n"
        "d = fastdiff.info(as_dict=True)\n"
        "assert d['backends']['q_sample']['cpu'] == 'reference', d\n"
        "print('ok')\n"
    )
    import os

    env = dict(os.environ, FASTDIFF_DISABLE_EXTENSION="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_of_training_and_sampling_steps(backend):
    """The public functions, key draw included, can be captured in a CUDA
    graph: replays draw fresh noise (the generator's offset advances) and a
    replay equals the same step run eagerly from the same generator state."""
    if backend not in fastdiff.available_backends("cuda"):
        pytest.skip(f"{backend} backend not available")
    fastdiff.set_backend(backend)
    try:
        s = SCHED.to("cuda")
        x0 = torch.randn(4, 3, 16, 16, device="cuda")
        t = torch.tensor([0, 5, 500, 999], device="cuda")
        out = torch.empty_like(x0)

        def step():
            xt, _ = fastdiff.q_sample(x0, t, s, return_noise=False)
            prev, _ = fastdiff.ddpm_step(xt, t, xt, s)
            out.copy_(prev)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        g.replay()
        first = out.clone()
        g.replay()
        assert not torch.equal(first, out), "replays must draw fresh noise"
        assert torch.isfinite(out).all()
    finally:
        fastdiff.set_backend("auto")
