"""Argument checks: one home, the same on every backend, typed errors on every public path.

* Direct ``torch.ops.fastdiff`` calls with bad arguments fail with the same
  exception type and message on every backend this machine can run: the C++
  CPU kernels (csrc/host.h, csrc/blocks.h), the reference kernels and the
  Triton launchers (their checks run before any launch, so they need no GPU
  and no interpreter), and the fakes that torch.compile traces with.
* Every public function raises TypeError or ValueError for any wrong value
  of any argument (hypothesis throws arbitrary Python values at them).
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import fastdiff
from fastdiff.ops import _backend
from fastdiff.ops import _kernel_checks as KC
from fastdiff.ops._schemas import op

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

f32, f64, i64 = torch.float32, torch.float64, torch.int64


def _backends():
    out = []
    if _backend.has_cpu_extension():
        out.append(("cpp", lambda name: op(name)))
    out.append(("reference", lambda name: _backend.cuda_kernel(name, "reference")))
    if importlib.util.find_spec("triton") is not None and _backend.triton_module() is not None:
        out.append(("triton", lambda name: _backend.cuda_kernel(name, "triton")))

    def fake(name):
        from torch._subclasses.fake_tensor import FakeTensorMode

        def call(*args):
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                return op(name)(*fargs)
        return call
    out.append(("fake", fake))
    return out


BACKENDS = _backends()


def _step_base():
    x = torch.randn(2, 3, 4)
    return dict(model_output=torch.randn(2, 3, 4), sample=x, t=torch.tensor([5, 9]), t_prev=torch.tensor([4, 8]),
                abar=fastdiff.NoiseSchedule.make(num_timesteps=10).alphas_cumprod, model_var=None, noise=None,
                key=None, thresh=None)


def _ddpm(**kw):
    a = {**_step_base(), "prediction_type": 0, "variance_type": 0, "clip_range": 0.0}
    a.update(kw)
    return "ddpm_step", [a[k] for k in ("model_output", "sample", "t", "t_prev", "abar", "model_var", "noise", "key",
                                        "thresh", "prediction_type", "variance_type", "clip_range")]


def _ddim(**kw):
    a = {**_step_base(), "prediction_type": 0, "clip_range": 0.0, "eta": 0.0, "final": 1.0, "use_clipped": False}
    a.pop("model_var")
    a.update(kw)
    return "ddim_step", [a[k] for k in ("model_output", "sample", "t", "t_prev", "abar", "noise", "key", "thresh",
                                        "prediction_type", "clip_range", "eta", "final", "use_clipped")]


def _q(**kw):
    a = {"x0": torch.randn(2, 3), "t": torch.tensor([1, 2]), "abar": fastdiff.NoiseSchedule.make(
        num_timesteps=10).alphas_cumprod, "noise": torch.randn(2, 3)}
    a.update(kw)
    return "q_sample", [a["x0"], a["t"], a["abar"], a["noise"]]


def _qrng(**kw):
    a = {"x0": torch.randn(2, 3), "t": torch.tensor([1, 2]), "abar": fastdiff.NoiseSchedule.make(
        num_timesteps=10).alphas_cumprod, "key": torch.tensor([1, 2]), "rn": True}
    a.update(kw)
    return "q_sample_rng", [a["x0"], a["t"], a["abar"], a["key"], a["rn"]]


def _loss(**kw):
    a = {"mo": torch.randn(2, 3), "x0": torch.randn(2, 3), "t": torch.tensor([1, 2]),
         "abar": fastdiff.NoiseSchedule.make(num_timesteps=10).alphas_cumprod, "noise": torch.randn(2, 3),
         "key": None, "w": torch.ones(2), "target": 0, "need_grad": False}
    a.update(kw)
    return "diffusion_loss", [a[k] for k in ("mo", "x0", "t", "abar", "noise", "key", "w", "target", "need_grad")]


def _gn(**kw):
    a = {"x": torch.randn(2, 4, 3), "w": None, "b": None, "add": None, "scale": None, "shift": None, "groups": 2,
         "eps": 1e-5, "silu": True}
    a.update(kw)
    return "group_norm_act", [a[k] for k in ("x", "w", "b", "add", "scale", "shift", "groups", "eps", "silu")]


def _gn_bwd(**kw):
    a = {"gy": torch.randn(2, 4, 3), "x": torch.randn(2, 4, 3), "w": None, "b": None, "add": None, "scale": None,
         "shift": None, "mean": torch.zeros(2, 2), "rstd": torch.ones(2, 2), "groups": 2, "silu": True}
    a.update(kw)
    return "group_norm_act_backward", [a[k] for k in ("gy", "x", "w", "b", "add", "scale", "shift", "mean", "rstd",
                                                      "groups", "silu")]


BAD_CALLS = {
    "ddpm model_output shape": _ddpm(model_output=torch.randn(2, 3, 5)),
    "ddpm model_output dtype": _ddpm(model_output=torch.randn(2, 3, 4, dtype=f64)),
    "ddpm sample int": _ddpm(sample=torch.ones(2, 3, 4, dtype=i64)),
    "ddpm sample scalar": _ddpm(sample=torch.tensor(1.0), model_output=torch.tensor(1.0)),
    "ddpm t shape": _ddpm(t=torch.tensor([1, 2, 3])),
    "ddpm t dtype": _ddpm(t=torch.tensor([1, 2], dtype=torch.int32)),
    "ddpm abar float32": _ddpm(abar=torch.ones(10)),
    "ddpm abar 2-D": _ddpm(abar=torch.ones(2, 5, dtype=f64)),
    "ddpm t_prev int32": _ddpm(t_prev=torch.tensor([1, 2], dtype=torch.int32)),
    "ddpm prediction code": _ddpm(prediction_type=3),
    "ddpm variance code": _ddpm(variance_type=6),
    "ddpm learned without model_var": _ddpm(variance_type=5),
    "ddpm model_var dtype": _ddpm(variance_type=4, model_var=torch.randn(2, 3, 4, dtype=f64)),
    "ddpm noise and key": _ddpm(noise=torch.randn(2, 3, 4), key=torch.tensor([1, 2])),
    "ddpm noise shape": _ddpm(noise=torch.randn(2, 12)),
    "ddpm key dtype": _ddpm(key=torch.tensor([1.0, 2.0])),
    "ddpm key shape": _ddpm(key=torch.tensor([1, 2, 3])),
    "ddpm thresh dtype": _ddpm(thresh=torch.ones(2, dtype=f64)),
    "ddpm thresh shape": _ddpm(thresh=torch.ones(3)),
    "ddim eta": _ddim(eta=-1.0),
    "ddim eta nan": _ddim(eta=math.nan),
    "ddim model_output shape": _ddim(model_output=torch.randn(3, 3, 4)),
    "ddim key": _ddim(key=torch.tensor([1], dtype=i64)),
    "q_sample noise dtype": _q(noise=torch.randn(2, 3, dtype=torch.float16)),
    "q_sample x0 int": _q(x0=torch.ones(2, 3, dtype=i64)),
    "q_sample abar float32": _q(abar=torch.ones(10)),
    "q_sample_rng key": _qrng(key=torch.tensor([1, 2, 3])),
    "q_sample_rng t": _qrng(t=torch.tensor([[1, 2]])),
    "loss weight float64": _loss(w=torch.ones(2, dtype=f64)),
    "loss model_output shape": _loss(mo=torch.randn(2, 4)),
    "loss neither noise nor key": _loss(noise=None),
    "loss target code": _loss(target=5),
    "gn groups": _gn(groups=3),
    "gn weight dtype": _gn(w=torch.ones(4, dtype=f64)),
    "gn weight shape": _gn(w=torch.ones(3)),
    "gn add shape": _gn(add=torch.ones(2, 3)),
    "gn x 1-D": _gn(x=torch.randn(4)),
    "gn x int": _gn(x=torch.ones(2, 4, 3, dtype=i64)),
    "gn no elements": _gn(x=torch.randn(2, 4, 0)),
    "gn bwd grad_y": _gn_bwd(gy=torch.randn(2, 4, 2)),
    "gn bwd mean": _gn_bwd(mean=torch.zeros(2, 3)),
}


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e).split("\nException raised from")[0]
    return None, None


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_direct_call_same_error_on_every_backend(case):
    name, args = BAD_CALLS[case]
    got = {}
    for bname, get in BACKENDS:
        got[bname] = _outcome(lambda: get(name)(*args))
    kinds = {b: k for b, (k, _) in got.items()}
    assert all(k is not None for k in kinds.values()), f"{case}: some backend accepted the call: {got}"
    first = next(iter(got.values()))
    assert first[0] in (TypeError, ValueError, RuntimeError)
    assert first[1].startswith("fastdiff: "), first
    for b, g in got.items():
        assert g == first, f"{case}: {b} raised {g}, {next(iter(got))} raised {first}"


def test_step_checks_are_typed():
    # the step family: a wrong dtype is a TypeError, a wrong shape/device/code a ValueError (C++ and Python alike)
    assert _outcome(lambda: op("ddpm_step")(*BAD_CALLS["ddpm model_output dtype"][1]))[0] is TypeError
    assert _outcome(lambda: op("ddpm_step")(*BAD_CALLS["ddpm model_output shape"][1]))[0] is ValueError
    assert _outcome(lambda: op("ddpm_step")(*BAD_CALLS["ddpm variance code"][1]))[0] is ValueError


def test_cpp_formatting_helpers():
    assert KC.cpp_dtype(torch.float32) == "Float" and KC.cpp_dtype(torch.int64) == "Long"
    assert KC.cpp_dtype(torch.uint16 if hasattr(torch, "uint16") else torch.uint8) in ("UInt16", "Byte")
    assert KC.cpp_sizes(torch.empty(2, 0, 3)) == "[2, 0, 3]" and KC.cpp_sizes(torch.tensor(1.0)) == "[]"


def test_public_errors_name_the_argument():
    s = fastdiff.NoiseSchedule.make(num_timesteps=10)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="model_output must have the shape of sample"):
        fastdiff.ddpm_step(torch.randn(2, 3, 5), 5, x, s)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        fastdiff.ddpm_step(x, 5, "x", s, variance_type="learned_range")
    with pytest.raises(TypeError, match="model_output must be a torch.Tensor"):
        fastdiff.ddpm_step([1.0], 5, x, s, variance_type="learned_range")
    with pytest.raises(TypeError, match="noise must have the dtype of x0"):
        fastdiff.q_sample(x, 3, s, x.double())
    with pytest.raises(TypeError, match="prediction_type must be one of"):
        fastdiff.ddim_step(x, 5, x, s, prediction_type=None)
    with pytest.raises(ValueError, match=r"t has values in \[12, 12\]"):
        fastdiff.q_sample(x, torch.tensor([12, 12]), s)


# ------------------------------------------------------------ hypothesis ----
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.bool, torch.complex64]


@st.composite
def _tensors(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=4)))
    x = torch.randn(shape, dtype=torch.float64)
    if draw(st.booleans()) and x.numel():
        x.view(-1)[0] = math.nan
    return x.to(dtype) if dtype != torch.bool else x > 0


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 1005), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=4), st.sampled_from(["epsilon", "fixed_small", "learned_range", "mean", "cpu"]),
                   st.lists(st.integers(-2, 12), max_size=3), _tensors())


def _sched():
    return fastdiff.NoiseSchedule.make(num_timesteps=10)


def _calls():
    """name -> (callable, default kwargs): every public entry point with valid defaults."""
    from fastdiff.diffusion import FusedDDIMScheduler, FusedDDPMScheduler
    from fastdiff.ops.multistep import multistep_threshold

    x = torch.randn(2, 4, 3)
    s = _sched()
    ddpm = FusedDDPMScheduler(num_train_timesteps=10)
    ddim = FusedDDIMScheduler(num_train_timesteps=10)
    ddim.set_timesteps(5)
    tab = torch.zeros(3, fastdiff.ops.multistep.MULTISTEP_NCOEF, dtype=f64)
    tab[:, 0] = 1.0
    return {
        "q_sample": (fastdiff.q_sample, dict(x0=x, t=3, schedule=s, noise=None, generator=None, key=None,
                                             return_noise=True)),
        "get_velocity": (fastdiff.get_velocity, dict(x0=x, noise=torch.randn(2, 4, 3), t=3, schedule=s)),
        "diffusion_loss": (fastdiff.diffusion_loss, dict(model_output=torch.randn(2, 4, 3), x0=x, t=3, schedule=s,
                                                         noise=torch.randn(2, 4, 3), key=None, target="epsilon",
                                                         weighting="uniform", snr_gamma=5.0, reduction="mean")),
        "ddpm_step": (fastdiff.ddpm_step, dict(model_output=torch.randn(2, 4, 3), t=5, sample=x, schedule=s,
                                               t_prev=None, prediction_type="epsilon", variance_type="fixed_small",
                                               clip_sample=False, clip_sample_range=1.0, thresholding=False,
                                               dynamic_thresholding_ratio=0.995, sample_max_value=1.0, noise=None,
                                               generator=None, key=None, model_var=None)),
        "ddim_step": (fastdiff.ddim_step, dict(model_output=torch.randn(2, 4, 3), t=5, sample=x, schedule=s,
                                               t_prev=None, eta=0.5, prediction_type="epsilon", clip_sample=False,
                                               clip_sample_range=1.0, thresholding=False,
                                               dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                                               final_alpha_cumprod=1.0, use_clipped_model_output=False, noise=None,
                                               generator=None, key=None)),
        "multistep_step": (fastdiff.multistep_step, dict(model_output=torch.randn(2, 4, 3), sample=x,
                                                         history=torch.zeros(1, 2, 4, 3), last_sample=torch.empty(0),
                                                         coeffs=tab, step_index=torch.tensor(0), noise=None, key=None,
                                                         thresh=None, clip_range=0.0, return_x0=False)),
        "multistep_threshold": (multistep_threshold, dict(model_output=torch.randn(2, 4, 3), sample=x, coeffs=tab,
                                                          step_index=torch.tensor(0), ratio=0.9, max_value=1.5)),
        "group_norm_act": (fastdiff.group_norm_act, dict(x=x, num_groups=2, weight=None, bias=None, eps=1e-5,
                                                         add=None, scale=None, shift=None, silu=True)),
        "attention": (fastdiff.attention, dict(q=torch.randn(1, 1, 3, 4), k=torch.randn(1, 1, 2, 4),
                                               v=torch.randn(1, 1, 2, 4), scale=None, fused=None)),
        "draw_key": (fastdiff.draw_key, dict(generator=None, device=None)),
        "NoiseSchedule.make": (fastdiff.NoiseSchedule.make, dict(name="linear", num_timesteps=10, beta_start=1e-4,
                                                                 beta_end=0.02)),
        "FusedDDPMScheduler.step": (ddpm.step, dict(model_output=torch.randn(2, 4, 3), timestep=5, sample=x,
                                                    generator=None, return_dict=True, variance_noise=None,
                                                    key=None)),
        "FusedDDPMScheduler.add_noise": (ddpm.add_noise, dict(original_samples=x, noise=torch.randn(2, 4, 3),
                                                              timesteps=3)),
        "FusedDDPMScheduler.set_timesteps": (FusedDDPMScheduler(num_train_timesteps=10).set_timesteps, dict(num_inference_steps=5, device=None)),
        "FusedDDIMScheduler.step": (ddim.step, dict(model_output=torch.randn(2, 4, 3), timestep=int(ddim.timesteps[1]),
                                                    sample=x, eta=0.0, use_clipped_model_output=False,
                                                    generator=None, variance_noise=None, return_dict=True, key=None)),
    }


CALLS = _calls()


@pytest.mark.parametrize("name", list(CALLS))
def test_public_defaults_run(name):
    fn, kw = CALLS[name]
    fn(**kw)


@pytest.mark.parametrize("name", list(CALLS))
@settings(max_examples=int(os.environ.get("FASTDIFF_FUZZ_EXAMPLES", 60)), deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=os.environ.get("FASTDIFF_FUZZ_EXAMPLES") is None)
@given(data=st.data())
def test_public_functions_raise_only_typed_errors(name, data):
    fn, kw = CALLS[name]
    arg = data.draw(st.sampled_from(sorted(kw)), label="argument")
    value = data.draw(VALUES, label="value")
    kw = dict(kw, **{arg: value})
    try:
        fn(**kw)
    except (TypeError, ValueError):
        pass
