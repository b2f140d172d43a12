"""pytest-benchmark suite of the U-Net block benchmarks of ``fastdiff bench``
(fastdiff vs eager PyTorch vs SDPA vs stock layers), one benchmark each.

    pytest benchmarks/suite/bench_blocks.py --benchmark-only               # CPU, ~2 min
    pytest benchmarks/suite/bench_blocks.py --benchmark-only -k "group_norm and NHWC"
    FASTDIFF_BENCH_BLOCK_SHAPE=8x256x16x16 pytest benchmarks/suite/bench_blocks.py --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Cases: group_norm_act (plain / + time-embedding add / + scale-shift; NCHW
and channels_last; forward, backward given a saved forward, forward +
backward) at ``FASTDIFF_BENCH_BLOCK_SHAPE`` (default 8x128x32x32 on CPU,
128x128x32x32 on GPU); attention forward and forward + backward, one-head
self-attention (B=8 on CPU, 128 on GPU; L=256, D=256) and cross-attention
(L=1024 queries, 77 keys, 8 heads, D=64); the U-Net training step
(``FASTDIFF_BENCH_UNET_BATCH``, default 2 on CPU, 128 on GPU), fused vs stock
layers, with its peak memory in ``extra_info``. GPU cases (each compiled
fastdiff backend separately) are skipped without a GPU; fastdiff's fused
attention is GPU-only. The cases (inputs rotating over several sets, the
baselines' code, byte and FLOP counts) come from :mod:`fastdiff.bench_blocks`;
torch.compile is left to ``fastdiff bench``.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from fastdiff import bench as B
from fastdiff.bench import blocks as BB

HAS_CUDA = torch.cuda.is_available()
SHAPE = {
    "cpu": B.parse_shape(os.environ.get("FASTDIFF_BENCH_BLOCK_SHAPE", "8x128x32x32")),
    "cuda": B.parse_shape(os.environ.get("FASTDIFF_BENCH_BLOCK_SHAPE_GPU", "128x128x32x32")),
}
ATTN = {
    "cpu": {"self": BB.AttnCase("self", 8, 1, 256, 256, 256), "cross": BB.AttnCase("cross", 2, 8, 1024, 77, 64)},
    "cuda": {"self": BB.AttnCase("self", 128, 1, 256, 256, 256), "cross": BB.AttnCase("cross", 32, 8, 1024, 77, 64)},
}
UNET_BATCH = {"cpu": int(os.environ.get("FASTDIFF_BENCH_UNET_BATCH", "2")),
              "cuda": int(os.environ.get("FASTDIFF_BENCH_UNET_BATCH_GPU", "128"))}
DTYPE = B.parse_dtype(os.environ.get("FASTDIFF_BENCH_DTYPE", "fp32"))
if os.environ.get("FASTDIFF_BENCH_MALLOC_REUSE", "1") == "1":  # as `fastdiff bench` does by default
    B.keep_freed_memory()


def _fastdiff_impls(dev):
    return ["fastdiff"] if dev == "cpu" else ["fastdiff-cuda", "fastdiff-triton"]


def _params():
    out = []
    gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
    for dev in ("cpu", "cuda"):
        marks = [pytest.mark.gpu, gpu] if dev == "cuda" else []
        for variant, layout, mode in itertools.product(BB.GN_VARIANTS, BB.LAYOUTS, BB.GN_MODES):
            for impl in _fastdiff_impls(dev) + ["eager"]:
                out.append(pytest.param(dev, "group_norm_act", impl, f"{variant} {layout} {mode}", marks=marks,
                                        id=f"{dev}-group_norm_act-{impl}-{variant}-{layout}-{mode}"))
        for kind, mode in itertools.product(("self", "cross"), BB.ATTN_MODES):
            impls = (["fastdiff-cuda", "fastdiff-triton"] if dev == "cuda" else []) + ["sdpa", "eager"]
            for impl in impls:
                out.append(pytest.param(dev, "attention", impl, f"{kind} {mode}", marks=marks,
                                        id=f"{dev}-attention-{impl}-{kind}-{mode}"))
        for impl in ("fastdiff", "stock"):
            out.append(pytest.param(dev, "unet_step", impl, BB.UNET_PRESET, marks=marks, id=f"{dev}-unet_step-{impl}"))
    return out


_cache: dict = {}


def _keep_only(key):
    if key not in _cache:
        _cache.clear()
        if HAS_CUDA:
            torch.cuda.empty_cache()


def _gn_cases(dev, variant_str):
    """(cases, nsets, shape label) of one group_norm_act case; the input sets
    of one (variant, layout) are kept for its three modes."""
    variant, layout, mode = variant_str.split()
    shape = SHAPE[dev]
    skey = ("gn-sets", dev, variant, layout)
    if skey not in _cache:
        _keep_only(skey)
        nsets = B.num_sets(3 * torch.Size(shape).numel() * torch.empty((), dtype=DTYPE).element_size(),
                            B.cache_bytes(dev))
        _cache[skey] = (BB._gn_inputs(shape, DTYPE, dev, layout, variant, nsets,
                                      torch.Generator(device=dev).manual_seed(0)), nsets)
    sets, nsets = _cache[skey]
    impls = BB._impls(dev, "group_norm_act", "group_norm_act_backward")
    nbytes = BB.gn_bytes(shape, torch.empty((), dtype=DTYPE).element_size(), variant, mode)
    cases = BB._gn_cases(mode, sets, impls, None, "not in the pytest suite", nbytes)
    return cases, nsets, B.shape_str(shape), {}


def _attn_cases(dev, variant_str):
    kind, mode = variant_str.split()
    c = ATTN[dev][kind]
    key = ("attn", dev, kind)
    if key not in _cache:
        _keep_only(key)
        nsets = BB.attn_num_sets(c, DTYPE, dev)
        _cache[key] = (BB._attn_inputs(c, DTYPE, dev, nsets, torch.Generator(device=dev).manual_seed(0)), nsets)
    inp, nsets = _cache[key]
    impls = BB._impls(dev, "attention", "attention_backward") if dev == "cuda" else []
    cases = BB._attn_cases(c, mode, inp, impls, dev, BB.attn_bytes(c, torch.empty((), dtype=DTYPE).element_size(),
                                                                   mode))
    return cases, nsets, c.label, {"flops": BB.attn_flops(c, mode)}


def _unet_cases(dev, preset):
    key = ("unet", dev)
    if key not in _cache:
        _keep_only(key)
        try:
            st = BB.unet_steps(dev, UNET_BATCH[dev], DTYPE, preset)
        except B.Skip as e:
            pytest.skip(str(e))
        mem = {impl: B.step_peak_memory(lambda: st[impl](1), dev, st["base_bytes"][impl])
               for impl in ("fastdiff", "stock")}
        _cache[key] = (st, mem)
    st, mem = _cache[key]
    cases = [B.Case("unet_step", impl, st[impl], 0, preset) for impl in ("fastdiff", "stock")]
    return cases, st["nsets"], B.shape_str(st["shape"]), mem


@pytest.mark.parametrize("device,op,impl,variant", _params())
def test_block(time_case, device, op, impl, variant):
    build = {"group_norm_act": _gn_cases, "attention": _attn_cases, "unet_step": _unet_cases}[op]
    cases, nsets, label, extra = build(device, variant)
    case = next((c for c in cases if c.impl == impl), None)
    if case is None:
        pytest.skip(f"{impl} is not available here")
    info = {"bytes": case.nbytes or None, "shape": label, "dtype": B.DTYPE_NAMES[DTYPE], "impl": impl,
            "variant": variant}
    info.update(extra.get(impl, {}) if op == "unet_step" else extra)
    time_case(case, nsets, device, f"{op} {label} {B.DTYPE_NAMES[DTYPE]} {device} [{variant}]", info)
