"""pytest-benchmark suite: the cases of ``fastdiff bench`` (fastdiff vs eager
PyTorch vs diffusers), one benchmark each.

    pytest benchmarks/ --benchmark-only                    # CPU, ~1 min
    pytest benchmarks/ --benchmark-only -k ddpm            # one operator
    FASTDIFF_BENCH_SHAPE=128x3x64x64 pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-compare  # against a saved run (--benchmark-autosave)

GPU cases (each compiled fastdiff backend separately) are skipped without a
GPU. The cases themselves (inputs rotating over several sets, the baselines'
code, byte counts) come from :mod:`fastdiff.bench`; torch.compile is left to
``fastdiff bench`` (its compilation time does not fit a ~1 min suite).
``extra_info`` of every benchmark holds its byte count, so GB/s can be
derived from the saved JSON.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastdiff
from fastdiff import bench as B
from fastdiff.bench import ops as BO

HAS_CUDA = torch.cuda.is_available()
SHAPE = {
    "cpu": B.parse_shape(os.environ.get("FASTDIFF_BENCH_SHAPE", "64x3x64x64")),
    "cuda": B.parse_shape(os.environ.get("FASTDIFF_BENCH_SHAPE_GPU", "256x4x128x128")),
}
DTYPE = B.parse_dtype(os.environ.get("FASTDIFF_BENCH_DTYPE", "fp32"))
# as `fastdiff bench` does by default: glibc keeps freed memory, so the timings
# do not depend on whether this process's heap layout makes outputs page-fault
if os.environ.get("FASTDIFF_BENCH_MALLOC_REUSE", "1") == "1":
    B.keep_freed_memory()

# op -> (fastdiff variants, baselines)
CASES = {
    "q_sample_rng": (["no noise out", "noise out"], ["diffusers", "eager"]),
    "q_sample": ([""], ["diffusers", "eager"]),
    "diffusion_loss": (["key", "key, recompute", "noise"], ["eager"]),
    "train_chain": ([""], ["diffusers", "eager"]),
    "ddpm_step": ([""], ["diffusers", "eager"]),
    "ddim_step": ([""], ["diffusers", "eager"]),
}


def _params():
    out = []
    gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
    for op, (variants, baselines) in CASES.items():
        for dev in ("cpu", "cuda"):
            marks = [pytest.mark.gpu, gpu] if dev == "cuda" else []
            impls = ["fastdiff"] if dev == "cpu" else ["fastdiff-cuda", "fastdiff-triton"]
            for impl in impls:
                for v in variants:
                    out.append(pytest.param(dev, op, impl, v, marks=marks,
                                            id=f"{dev}-{op}-{impl}" + (f"-{v.replace(' ', '_')}" if v else "")))
            for b in baselines:
                out.append(pytest.param(dev, op, b, "", marks=marks, id=f"{dev}-{op}-{b}"))
    return out


_cache: dict = {}


def _cases(device: str, op: str) -> list:
    """The cases of one op (inputs allocated once; only the latest op is kept)."""
    key = (device, op)
    if key not in _cache:
        _cache.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        shape = SHAPE[device]
        elem = torch.empty((), dtype=DTYPE).element_size()
        nsets = B.num_sets(BO._INPUTS_PER_SET[op] * torch.Size(shape).numel() * elem, B.cache_bytes(device))
        sched = fastdiff.NoiseSchedule.make("linear", B.T_TRAIN, device=device)
        diff_mod, note = BO._import_diffusers()
        compiler = B.Compiler(False, "not in the pytest suite", 0.0)
        ctx = BO._Ctx(device, DTYPE, shape, nsets, BO.fastdiff_impls(device), compiler, diff_mod, note, sched,
                     BO._tables(sched, DTYPE, device))
        gen = torch.Generator(device=device).manual_seed(0)
        _cache[key] = (BO._BUILDERS[op](ctx, gen), nsets)
    return _cache[key]


@pytest.mark.parametrize("device,op,impl,variant", _params())
def test_op(time_case, device, op, impl, variant):
    cases, nsets = _cases(device, op)
    case = next((c for c in cases if c.impl == impl and c.variant == variant), None)
    if case is None:
        pytest.skip(f"{impl} is not available here")
    label, dtype = B.shape_str(SHAPE[device]), B.DTYPE_NAMES[DTYPE]
    time_case(case, nsets, device, f"{op} {label} {dtype} {device}",
              {"bytes": case.nbytes, "shape": label, "dtype": dtype, "impl": impl, "variant": variant})
