"""How the Triton launchers launch: on the tensors' device, and without
recompiling for values that are not worth a specialisation.

Triton launches on the *current* CUDA device. Every public launcher in
fastdiff.triton therefore runs under ``torch.cuda.device(<tensors' device>)``
(``_common.on_tensor_device``). Without a second GPU this is tested with a
mocked current device: the tensors are the interpreter's CPU tensors, the
launcher is told they live on cuda:1, ``torch.cuda.device`` is replaced by a
recorder, and every kernel launch records the device that was current when it
was issued. The real two-GPU check is ``test_gpu_launch_on_second_device``.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import fastdiff  # noqa: E402
import fastdiff.triton as ft  # noqa: E402
from fastdiff.triton import _common, _philox  # noqa: E402

# the modules (``fastdiff.triton.attention`` etc. are also the names of functions there)
q_sample, loss, step, group_norm, attention = (importlib.import_module(f"fastdiff.triton.{m}")
                                               for m in ("q_sample", "loss", "step", "group_norm", "attention"))
multistep = importlib.import_module("fastdiff.triton.multistep")

DEV = "cuda" if HAS_CUDA else "cpu"
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
MODULES = (q_sample, loss, step, group_norm, attention, _philox)


def _kernels():
    """(module, name) of every @triton.jit kernel that a launcher launches."""
    out = []
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "__getitem__") and hasattr(obj, "fn"):
                out.append((mod, name))
    return out


def _calls():
    """One small call of every public launcher: (name, thunk)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g).to(DEV)
    o = torch.randn(2, 4, 3, 3, generator=g).to(DEV)
    nz = torch.randn(2, 4, 3, 3, generator=g).to(DEV)
    t = torch.tensor([5, 700], device=DEV)
    tp = t - 1
    ab = ABAR.to(DEV)
    key = torch.tensor([7, 3], dtype=torch.int64, device=DEV)
    w1 = torch.ones(2, device=DEV)
    q = torch.randn(1, 2, 5, 8, generator=g).to(DEV)
    y, mean, rstd = ft.group_norm_act(x, None, None, None, None, None, 2, 1e-5, True)
    out, lse = ft.attention(q, q, q, 0.3)
    return [
        ("q_sample", lambda: ft.q_sample(x, t, ab, nz)),
        ("q_sample_rng", lambda: ft.q_sample_rng(x, t, ab, key, True)),
        ("diffusion_loss", lambda: ft.diffusion_loss(o, x, t, ab, None, key, w1, 0, True)),
        ("ddpm_step", lambda: ft.ddpm_step(o, x, t, tp, ab, None, nz, None, None, 0, 0, 0.0)),
        ("ddim_step", lambda: ft.ddim_step(o, x, t, tp, ab, None, key, None, 0, 0.0, 0.5, 1.0, False)),
        ("group_norm_act", lambda: ft.group_norm_act(x, None, None, None, None, None, 2, 1e-5, True)),
        ("group_norm_act_backward",
         lambda: ft.group_norm_act_backward(o, x, None, None, None, None, None, mean, rstd, 2, True)),
        ("attention", lambda: ft.attention(q, q, q, 0.3)),
        ("attention_backward", lambda: ft.attention_backward(q, q, q, q, out, lse, 0.3)),
        ("philox_words", lambda: _philox.philox_words(torch.arange(4, device=DEV), key)),
        ("normals", lambda: _philox.normals(key, 8, device=DEV)),
    ]


@pytest.mark.skipif(HAS_CUDA, reason="the mocked-device test runs the interpreter (CPU tensors)")
def test_every_launch_runs_on_the_tensors_device(monkeypatch):
    current = {"dev": 0}  # the mocked current device
    entered = []
    launches = []

    @contextlib.contextmanager
    def fake_device(dev):
        idx = torch.device(dev).index
        entered.append(idx)
        before, current["dev"] = current["dev"], idx
        try:
            yield
        finally:
            current["dev"] = before

    class Recorder:
        def __init__(self, kern, name):
            self.kern, self.name = kern, name

        def __getitem__(self, grid):
            run = self.kern[grid]

            def launch(*a, **k):
                launches.append((self.name, current["dev"]))
                return run(*a, **k)

            return launch

    kernels = _kernels()
    assert len(kernels) >= 10, kernels
    calls = _calls()  # set-up outside the mock
    for mod, name in kernels:
        monkeypatch.setattr(mod, name, Recorder(getattr(mod, name), name))
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(_common, "cuda_device_of", lambda args: torch.device("cuda", 1))
    for what, call in calls:
        launches.clear()
        call()
        assert launches, f"{what}: no kernel launched"
        assert all(d == 1 for _, d in launches), f"{what}: launched on the current device, not cuda:1: {launches}"
    assert current["dev"] == 0  # restored after every call


def test_cuda_device_of():
    assert _common.cuda_device_of((1, "a", torch.zeros(1))) is None
    assert _common.cuda_device_of(()) is None


def test_block_counts_and_float_bits_are_not_specialised():
    """Arguments whose values vary from call to call but change nothing in
    the generated code (block counts, the table length, a float's bit
    pattern) are ``do_not_specialize``: otherwise Triton compiles a kernel
    per class of value (== 1, divisible by 16), which cost 3-4 extra
    compilations in one ddpm-cifar10 forward+backward on the H100."""
    want = {
        (q_sample, "_q_sample_kernel"): {"chunks", "T"},
        (loss, "_loss_kernel"): {"chunks", "T"},
        (step, "_ddpm_kernel"): {"chunks", "T", "clip_bits", "gw_bits"},
        (step, "_ddim_kernel"): {"chunks", "T", "clip_bits", "eta_bits", "final_bits", "gw_bits"},
        (multistep, "_multistep_kernel"): {"clip_bits", "hstride", "gw_bits"},
        (group_norm, "_gn_fwd_kernel"): {"eps_bits"},
        (attention, "_attn_fwd_kernel"): {"n_mblocks"},
        (attention, "_attn_bwd_dq_kernel"): {"n_mblocks"},
        (attention, "_attn_bwd_dkdv_kernel"): {"n_nblocks"},
    }
    for (mod, name), args in want.items():
        kern = getattr(mod, name)
        names = kern.arg_names if hasattr(kern, "arg_names") else []
        dns = kern.kwargs.get("do_not_specialize") if hasattr(kern, "kwargs") else None
        if dns is None:  # a compiling JITFunction: indices of the parameters
            dns = [names[i] if isinstance(i, int) else i for i in kern.do_not_specialize]
        assert args <= set(dns), f"{name}: {sorted(args - set(dns))} are specialised"
        assert args <= set(names), f"{name}: {sorted(args - set(names))} are not its arguments"


@pytest.mark.gpu
def test_gpu_launch_on_second_device():
    """Tensors on the last GPU while device 0 is current: every launcher
    gives the same result as on device 0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs (the mocked-device test covers the guard)")
    last = torch.cuda.device_count() - 1
    with torch.cuda.device(0):
        x = torch.randn(4, 64, 8, 8, device="cuda:0")
        nz = torch.randn_like(x)
        t = torch.tensor([1, 10, 500, 999], device="cuda:0")
        a0 = ft.q_sample(x, t, ABAR.cuda(), nz)
        y0 = ft.group_norm_act(x, None, None, None, None, None, 32, 1e-5, True)[0]
        a1 = ft.q_sample(x.to(last), t.to(last), ABAR.to(f"cuda:{last}"), nz.to(last))
        y1 = ft.group_norm_act(x.to(last), None, None, None, None, None, 32, 1e-5, True)[0]
        assert torch.cuda.current_device() == 0
    torch.testing.assert_close(a1.cpu(), a0.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(y1.cpu(), y0.cpu(), rtol=0, atol=0)
