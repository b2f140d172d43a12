"""The C++ CPU kernels on both of their instruction sets.

The noise generator, the float32 step and loss bodies and the GroupNorm kernels are
compiled for the x86-64 baseline and for AVX2 (+FMA for GroupNorm), and the
AVX2 build is chosen at load time when the CPU has it (csrc/cpu/isa.h). CI
machines have AVX2, so the baseline build (what a CPU without AVX2 runs)
would never run in a test. ``FASTDIFF_CPU_ISA=baseline`` forces it: each
build runs in its own subprocess on the same inputs, and both are checked
against the float64 reference with the suite's tolerances, and against each
other.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastdiff.ops import _backend
from fastdiff.reference import blocks as refb
from fastdiff.reference import diffusion as ref
from fastdiff.reference.noise import noise_like

pytestmark = pytest.mark.skipif(not _backend.has_cpu_extension(), reason="needs the C++ extension")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r"""
import sys, torch
import fastdiff, fastdiff._C as C
from fastdiff import NoiseSchedule
torch.set_num_threads(1)
s = NoiseSchedule.make("linear", 1000)
g = torch.Generator().manual_seed(0)
res = {"isa": C.cpu_isa()}
key = torch.tensor([987654321012, 3], dtype=torch.int64)
for shape in [(3, 5, 7, 9), (2, 3, 64, 65)]:  # odd per-sample sizes, several 256-normal blocks
    x0 = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    xt, nz = fastdiff.q_sample(x0, t, s, key=key, return_noise=True)
    out = torch.randn(shape, generator=g)
    tp = t - 1
    p1 = fastdiff.ddpm_step(out, t, x0, s, t_prev=tp, key=key)
    p2 = fastdiff.ddim_step(out, t, x0, s, t_prev=tp, eta=0.7, key=key, prediction_type="v_prediction")
    p3 = fastdiff.ddpm_step(out, t, x0, s, t_prev=tp, noise=nz, clip_sample=True, prediction_type="sample")
    res[shape] = dict(x0=x0, t=t, out=out, xt=xt, nz=nz, ddpm=p1, ddim=p2, ddpm_clip=p3)
    for tgt in ("epsilon", "sample", "v_prediction"):  # the loss: stored and recomputed gradients
        for store in (True, False):
            o = out.clone().requires_grad_(True)
            per = fastdiff.diffusion_loss(o, x0, t, s, key=key, target=tgt, reduction="none", store_grad=store)
            per.backward(torch.linspace(0.5, 2.0, shape[0]))
            res[shape][f"loss_{tgt}_{store}"] = (per.detach(), o.grad)
for dt in (torch.float32, torch.bfloat16):
    for cl in (False, True):
        x = torch.randn(3, 32, 9, 7, generator=g).to(dt) * 3 + 2
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
        add, sc, sh = (torch.randn(3, 32, generator=g) for _ in range(3))
        xr = x.clone().requires_grad_(True)
        y = fastdiff.group_norm_act(xr, 8, w, b, add=add, scale=sc, shift=sh)
        gy = torch.randn(y.shape, generator=g).to(dt)
        y.backward(gy)
        res[("gn", str(dt), cl)] = dict(x=x, w=w, b=b, add=add, sc=sc, sh=sh, y=y.detach(), gy=gy, dx=xr.grad)
torch.save(res, sys.argv[1])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("isa")
    script = d / "worker.py"
    script.write_text(_WORKER)
    out = {}
    for isa in ("default", "baseline"):
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        env.pop("FASTDIFF_CPU_ISA", None)
        if isa == "baseline":
            env["FASTDIFF_CPU_ISA"] = "baseline"
        r = subprocess.run([sys.executable, str(script), str(d / f"{isa}.pt")], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out[isa] = torch.load(d / f"{isa}.pt", weights_only=False)
    return out


def test_switch_selects_the_build(runs):
    assert runs["baseline"]["isa"] == "baseline"
    import fastdiff._C as C

    assert runs["default"]["isa"] == C.cpu_isa()  # this process: no switch set
    if "FASTDIFF_CPU_ISA" not in os.environ:
        assert runs["default"]["isa"] in ("avx2+fma", "avx2", "baseline")


def _close(got, want64, tol, what):
    scale = max(1.0, float(want64.abs().max()))
    err = float((got.double() - want64).abs().max())
    assert err <= tol * scale, f"{what}: error {err:.3g} > {tol:.3g} x {scale:.3g}"


@pytest.mark.parametrize("isa", ["default", "baseline"])
def test_elementwise_kernels_match_reference(runs, isa):
    from fastdiff import NoiseSchedule

    abar = NoiseSchedule.make("linear", 1000).alphas_cumprod
    key = torch.tensor([987654321012, 3], dtype=torch.int64)
    for shape, r in ((k, v) for k, v in runs[isa].items() if isinstance(k, tuple) and k[0] != "gn"):
        x0, t, out = r["x0"], r["t"], r["out"]
        z64 = noise_like(x0, key)
        _close(r["nz"], z64, 2e-6, f"{isa} noise {shape}")
        _close(r["xt"], ref.q_sample(x0.double(), t, abar, z64), 2e-6, f"{isa} x_t {shape}")
        want = ref.ddpm_step(out.double(), x0.double(), t, t - 1, abar, z64)
        _close(r["ddpm"][0], want[0], 2e-5, f"{isa} ddpm prev {shape}")
        want = ref.ddim_step(out.double(), x0.double(), t, t - 1, abar, z64, 0.7, "v_prediction")
        _close(r["ddim"][0], want[0], 2e-5, f"{isa} ddim prev {shape}")
        want = ref.ddpm_step(out.double(), x0.double(), t, t - 1, abar, r["nz"].double(), prediction_type="sample",
                             clip_range=1.0)
        _close(r["ddpm_clip"][0], want[0], 2e-5, f"{isa} ddpm clip prev {shape}")
        gl = torch.linspace(0.5, 2.0, shape[0], dtype=torch.float64)
        for tgt in ("epsilon", "sample", "v_prediction"):
            per64, _ = ref.diffusion_loss(out.double(), x0.double(), t, abar, z64, torch.ones(shape[0]), tgt)
            _, g64 = ref.diffusion_loss(out.double(), x0.double(), t, abar, z64, gl, tgt)
            for store in (True, False):
                per, grad = r[f"loss_{tgt}_{store}"]
                _close(per, per64, 2e-6, f"{isa} loss {tgt} {shape}")
                _close(grad, g64, 2e-6, f"{isa} loss grad {tgt} store={store} {shape}")


@pytest.mark.parametrize("isa", ["default", "baseline"])
def test_group_norm_matches_reference(runs, isa):
    for k, r in ((k, v) for k, v in runs[isa].items() if isinstance(k, tuple) and k[0] == "gn"):
        d = lambda v: v.double()  # noqa: E731
        y64, m64, r64 = refb.group_norm_act(d(r["x"]), d(r["w"]), d(r["b"]), d(r["add"]), d(r["sc"]), d(r["sh"]),
                                            8, 1e-5, True)
        g64 = refb.group_norm_act_backward(d(r["gy"]), d(r["x"]), d(r["w"]), d(r["b"]), d(r["add"]), d(r["sc"]),
                                           d(r["sh"]), m64, r64, 8, True)
        lowp = k[1] == "torch.bfloat16"
        _close(r["y"], y64, 2 ** -7 if lowp else 5e-6, f"{isa} {k} y")
        _close(r["dx"], g64[0], 2 ** -6 if lowp else 2e-5, f"{isa} {k} dx")


def test_builds_agree(runs):
    """Noise and the float32 step: the same IEEE operations in the same order
    in both builds (no FMA in the AVX2 clone), so the same bits. GroupNorm's
    AVX2 build uses FMA: equal to float32 rounding."""
    a, b = runs["default"], runs["baseline"]
    for k in a:
        if not isinstance(k, tuple):
            continue
        for name, va in a[k].items():
            vb = b[k][name]
            for x, y in zip(va if isinstance(va, tuple) else (va,), vb if isinstance(vb, tuple) else (vb,)):
                if k[0] == "gn":
                    torch.testing.assert_close(x, y, rtol=1e-2 if x.dtype == torch.bfloat16 else 1e-5,
                                               atol=1e-2 if x.dtype == torch.bfloat16 else 1e-5)
                else:
                    assert torch.equal(x, y), f"{k} {name}: the two builds differ"
