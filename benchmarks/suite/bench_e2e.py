"""pytest-benchmark suite of the end-to-end benchmarks (``fastdiff bench
train`` / ``fastdiff bench sample``): one training step, and one whole
sampling run, per configuration (diffusers eager, diffusers patched by
fastdiff.nn.patch, fastdiff eager, fastdiff CUDA-graph sampling on a GPU).

    pytest benchmarks/suite/bench_e2e.py --benchmark-only                  # CPU: tiny preset, ~1 min
    pytest benchmarks/suite/bench_e2e.py --benchmark-only -k "sample and ddim"
    FASTDIFF_BENCH_E2E_PRESET=digits-16 FASTDIFF_BENCH_E2E_BATCH=32 pytest benchmarks/suite/bench_e2e.py --benchmark-only
    pytest benchmarks/suite/bench_e2e.py --benchmark-only --benchmark-group-by=group   # on a GPU: ddpm-cifar10

Sizes: CPU ``FASTDIFF_BENCH_E2E_PRESET`` (default ``tiny``), batch
``FASTDIFF_BENCH_E2E_BATCH`` (default 4, training and sampling), DDPM /
DDIM steps ``FASTDIFF_BENCH_E2E_STEPS`` (default ``10,5``); GPU: the issue's
DDPM CIFAR-10 configuration (batch 128 for training, 256 images, DDPM 1000
and DDIM 50 steps; ``..._GPU`` variants of the same variables override),
precision ``FASTDIFF_BENCH_DTYPE`` (fp32 default; bf16 runs under autocast),
layout ``FASTDIFF_BENCH_LAYOUT`` (NCHW default, or NHWC). Each benchmark's
``extra_info`` holds the images per unit and the images/s of its median.
The configurations come from :mod:`fastdiff.bench_e2e` (the same code as
``fastdiff bench train|sample``); torch.compile is left to that command.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from fastdiff import bench as B
from fastdiff.bench import _timing as timing
from fastdiff.bench import e2e as E

HAS_CUDA = torch.cuda.is_available()
DTYPE = B.parse_dtype(os.environ.get("FASTDIFF_BENCH_DTYPE", "fp32"))
LAYOUT = os.environ.get("FASTDIFF_BENCH_LAYOUT", "NCHW").upper()


def _env(name, default, gpu):
    return os.environ.get(name + ("_GPU" if gpu else ""), default)


def _sizes(dev):
    gpu = dev == "cuda"
    preset = _env("FASTDIFF_BENCH_E2E_PRESET", "ddpm-cifar10" if gpu else "tiny", gpu)
    tb, sb = (128, 256) if gpu else (4, 4)
    batch = _env("FASTDIFF_BENCH_E2E_BATCH", "", gpu)
    if batch:
        tb = sb = int(batch)
    ddpm, ddim = (int(s) for s in _env("FASTDIFF_BENCH_E2E_STEPS", "1000,50" if gpu else "10,5", gpu).split(","))
    return preset, tb, sb, {"ddpm": ddpm, "ddim": ddim}


IMPLS = ("diffusers", "diffusers-patched", "fastdiff")


def _params():
    out = []
    gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
    for dev in ("cpu", "cuda"):
        marks = [pytest.mark.gpu, gpu_only] if dev == "cuda" else []
        for impl in IMPLS:
            out.append(pytest.param(dev, "train", "", impl, marks=marks, id=f"{dev}-train-{impl}"))
        sample_impls = IMPLS + (("fastdiff-graph",) if dev == "cuda" else ())
        for method, impl in itertools.product(E.METHODS, sample_impls):
            out.append(pytest.param(dev, "sample", method, impl, marks=marks, id=f"{dev}-sample-{method}-{impl}"))
    return out


@pytest.mark.parametrize("device,suite,method,impl", _params())
def test_e2e(benchmark, device, suite, method, impl):
    preset, tb, sb, steps = _sizes(device)
    batch = tb if suite == "train" else sb
    case = E.Case(suite, device, preset, batch, DTYPE, LAYOUT, method, steps.get(method, 1))
    try:
        built = (E._build_train if suite == "train" else E._build_sample)(case, impl)
    except timing.Skip as e:
        pytest.skip(str(e))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    counter = itertools.count()

    def unit():
        built.run(next(counter) % 2)
        sync()

    benchmark.group = f"{suite} {method} {preset} b{batch} {B.DTYPE_NAMES[DTYPE]} {LAYOUT} {device}".replace("  ", " ")
    benchmark.extra_info.update({"images": batch, "preset": preset, "impl": impl, "params": built.params,
                                 "steps": case.steps if suite == "sample" else None})
    if suite == "train":
        for _ in range(2):
            unit()
        benchmark(unit)
    else:  # whole sampling runs are long: a few rounds
        benchmark.pedantic(unit, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
    del built
    timing.free(device)
