"""Benchmark engine of fastdiff: every fused operator against the ways people
write the same step today (eager PyTorch, diffusers, ``torch.compile``), on CPU
or GPU.

    from fastdiff import bench
    rows = bench.run("cpu", ops=None, dtype="fp32", shapes=None, quick=False)
    print(bench.format_table(rows))

What is measured (see benchmarks/README.md):

* every case is one Python call as a user would write it (argument checks,
  key draw, allocation of the outputs included), called back to back;
* inputs rotate among several identical-shape sets so that the data touched
  exceeds the last-level cache (GPU L2 / CPU L3) and is read from memory;
* GPU: CUDA events around every call (the queue is kept full, no sync
  between calls), one case after the other; CPU: ``time.perf_counter``
  around every call, the implementations of a case interleaved in ~20 ms
  rounds (a drifting machine hits them alike). Median, p20 and p80 of the
  per-call times, in ms;
* bytes: each input tensor read once + each output tensor written once (the
  minimum traffic of the case as called, tiny per-sample tensors ignored),
  turned into GB/s and into a % of this device's copy bandwidth (one large
  ``dst.copy_(src)``, bytes = read + write). ``pred_ms`` = bytes / copy
  bandwidth is the memory-bound prediction;
* speedup = baseline median / fastdiff median, per baseline.

The suites: :mod:`.ops` (the elementwise step operators), :mod:`.blocks`
(GroupNorm+SiLU, attention, the U-Net training step with its peak memory)
and :mod:`.e2e` (end-to-end training and sampling, ``fastdiff bench
train|sample``). :func:`run` runs the first two; ``ops`` may name their
operators or the families ``elementwise`` and ``blocks``. Timing lives in
:mod:`._timing`, tables/JSON/plots in :mod:`._report`; the suites import
those two and never each other. :mod:`.cli` owns the ``fastdiff bench``
subcommand.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import blocks as _blocks
from . import ops as _ops
from ._report import (ALL_OPS, BASELINES, BLOCK_OPS, DEFAULT_OPS, FAMILIES, OPS, add_speedups, cpu_model,
                      expand_ops, format_table, impl_label, metadata, plot, to_json)
from ._timing import (DTYPE_NAMES, DTYPES, T_TRAIN, Case, Compiler, Skip, cache_bytes, copy_bandwidth, cpu_peak_bytes, free,
                      keep_freed_memory, num_sets, parse_dtype, parse_shape, resolve_device, shape_str,
                      step_peak_memory, time_calls, time_interleaved, use_backend)
from .ops import COMPILE_BUDGET_S, DEFAULT_SHAPES, QUICK_SHAPES

__all__ = ["run", "format_table", "metadata", "to_json", "plot", "add_speedups", "expand_ops", "time_calls",
           "time_interleaved", "copy_bandwidth", "keep_freed_memory", "parse_shape", "parse_dtype", "shape_str",
           "resolve_device", "OPS", "BLOCK_OPS", "ALL_OPS", "DEFAULT_OPS", "FAMILIES", "BASELINES", "DTYPES",
           "DTYPE_NAMES", "DEFAULT_SHAPES", "QUICK_SHAPES", "COMPILE_BUDGET_S"]


def run(device: str = "cpu", ops: Optional[Sequence[str]] = None, dtype="fp32", shapes=None, quick: bool = False,
        compile: Optional[bool] = None, log: Optional[Callable[[str], None]] = None,
        copy_gbps: Optional[float] = None, full: bool = False, block_shapes=None, batch: Optional[int] = None,
        compile_budget_s: Optional[float] = None, unet_preset: Optional[str] = None) -> list:
    """Time every case of ``ops`` (default: :data:`DEFAULT_OPS`, all of them; family
    names allowed, see :func:`expand_ops`). The elementwise ops run at each
    of ``shapes`` (default: :data:`DEFAULT_SHAPES`, or :data:`QUICK_SHAPES`
    with ``quick``); the block ops at ``block_shapes`` (feature maps
    N x C x H x W; default: the DDPM CIFAR-10 shapes of
    :mod:`fastdiff.bench.blocks`, smaller batches on CPU unless ``full``;
    ``batch`` replaces their batch and the U-Net step's, whose model is
    ``fastdiff.nn.UNet.from_preset(unet_preset)``, default "ddpm-cifar10",
    "tiny" with ``quick``). dtype(s):
    "fp32"/"fp16"/"bf16", one or a list. ``compile`` (default: on unless
    ``quick``) adds the torch.compile baseline; ``compile_budget_s`` caps the
    compilation time of each family (default: :data:`COMPILE_BUDGET_S`, and
    the block budget of :mod:`fastdiff.bench.blocks`). Returns one dict per
    case (see :func:`format_table`); every row carries ``copy_gbps``."""
    device = resolve_device(device)
    log = log or (lambda msg: None)
    names = expand_ops(ops)
    block_ops = [o for o in names if o in BLOCK_OPS]
    elem_ops = [o for o in names if o in OPS]
    dtypes = [parse_dtype(d) for d in ([dtype] if isinstance(dtype, (str, torch.dtype)) else dtype)]
    if copy_gbps is None and (elem_ops or [o for o in block_ops if o != "unet_step"]):
        log(f"measuring the {device} copy bandwidth ...")
        copy_gbps = copy_bandwidth(device, quick)
        log(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    rows = []
    if elem_ops:
        rows += _ops.run_ops(device, elem_ops, dtypes, shapes, quick, compile, log, copy_gbps, compile_budget_s)
    if block_ops:
        rows += _blocks.run_blocks(device, block_ops, dtypes, block_shapes, quick, full, compile, log, copy_gbps,
                                  batch, compile_budget_s, unet_preset)
    return add_speedups(rows)

