"""Timing of the benchmark suites: per-call timing (CUDA events on a GPU,
``perf_counter`` on CPU, interleaved rounds), statistics, the device's copy
bandwidth, last-level cache sizing of the rotating input sets, peak memory,
the torch.compile budget, and the small vocabulary every suite shares
(:class:`Case`, :class:`Skip`, dtype and shape parsing). The suites
(:mod:`~fastdiff.bench.ops`, :mod:`~fastdiff.bench.blocks`,
:mod:`~fastdiff.bench.e2e`) import this module and :mod:`._report`, never
each other."""
from __future__ import annotations

import gc
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import fastdiff
from fastdiff._args import resolve_device  # noqa: F401  (re-exported for the suites)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

T_TRAIN = 1000          # schedule length

# Timing budgets: (seconds of measured calls per case, minimum calls, maximum calls, warm-up seconds)
_CPU_FULL = (0.4, 5, 2000, 0.1)
_CPU_QUICK = (0.02, 3, 50, 0.0)
_GPU_FULL = (0.15, 10, 2000, 0.025)
_GPU_QUICK = (0.02, 5, 200, 0.005)


# ------------------------------------------------------------- parsing ------
def parse_shape(text: str) -> tuple:
    """'128x3x64x64' -> (128, 3, 64, 64)."""
    try:
        shape = tuple(int(p) for p in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 128x3x64x64, got {text!r}") from None
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ValueError(f"shape needs a batch and at least one more positive dimension, got {text!r}")
    return shape


def parse_dtype(text) -> torch.dtype:
    if isinstance(text, torch.dtype):
        return text
    key = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(text, text)
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[key]


def shape_str(shape) -> str:
    return "x".join(str(d) for d in shape)



# -------------------------------------------------------------- timing ------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def stats(times_ms: list) -> dict:
    s = sorted(times_ms)
    return {"median_ms": _quantile(s, 0.5), "p20_ms": _quantile(s, 0.2), "p80_ms": _quantile(s, 0.8),
            "reps": len(s)}


def _cpu_warmup(fn: Callable[[int], object], nsets: int, warm_s: float) -> float:
    """Warm-up calls of ``fn`` (at least 2, at most 100, ~warm_s seconds);
    returns the duration of the last one in seconds."""
    k, t0, last = 0, time.perf_counter(), 0.0
    while k < 2 or time.perf_counter() - t0 < warm_s:
        a = time.perf_counter()
        fn(k % nsets)
        last = time.perf_counter() - a
        k += 1
        if k >= 100:
            break
    return last


def time_calls(fn: Callable[[int], object], device: str, nsets: int = 1, quick: bool = False) -> dict:
    """Per-call times of ``fn(i)`` (i = the input set, rotating over ``nsets``)
    after a warm-up; returns median/p20/p80 in ms and the number of calls.
    The first call (compilation, autotuning, lazy initialisation) is made
    before the warm-up and reported separately as ``first_call_s``."""
    gpu = device == "cuda"
    target_s, min_reps, max_reps, warm_s = (_GPU_QUICK if quick else _GPU_FULL) if gpu else \
        (_CPU_QUICK if quick else _CPU_FULL)
    t0 = time.perf_counter()
    fn(0)
    sync(device)
    first = time.perf_counter() - t0
    if gpu:
        # estimate the per-call time with the queue full
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(5):
            fn(i % nsets)
        b.record()
        torch.cuda.synchronize()
        est = max(a.elapsed_time(b) / 5e3, 1e-6)
        for i in range(int(min(max(warm_s / est, 1), 200))):
            fn(i % nsets)
        reps = int(min(max(target_s / est, min_reps), max_reps))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(i % nsets)
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        last = _cpu_warmup(fn, nsets, warm_s)
        reps = int(min(max(target_s / max(last, 1e-7), min_reps), max_reps))
        times = []
        for i in range(reps):
            a = time.perf_counter()
            fn(i % nsets)
            times.append((time.perf_counter() - a) * 1e3)
    out = stats(times)
    out["first_call_s"] = first
    return out


def time_interleaved(fns: Sequence[Callable[[int], object]], nsets: int = 1, quick: bool = False) -> list:
    """CPU timing of several implementations of one case, interleaved so
    that a slow drift of the machine (other processes, frequency, a noisy
    neighbour VM) hits them all alike: after each function's first call and
    warm-up, rounds of ~20 ms per function (one or more timed calls each)
    are run in turn. Returns, per function, the stats dict of
    :func:`time_calls` or the exception it raised."""
    target_s, min_reps, max_reps, warm_s = _CPU_QUICK if quick else _CPU_FULL
    slice_s = 0.002 if quick else 0.02
    n = len(fns)
    res: list = [None] * n
    est, first = [1e-3] * n, [0.0] * n
    for i, fn in enumerate(fns):
        try:
            t0 = time.perf_counter()
            fn(0)
            first[i] = time.perf_counter() - t0
            est[i] = max(_cpu_warmup(fn, nsets, warm_s), 1e-7)
        except Exception as e:
            res[i] = e
    live = [i for i in range(n) if res[i] is None]
    rounds = int(max(min_reps, math.ceil(target_s / slice_s)))
    per_round = {i: int(min(max(slice_s / est[i], 1), max(max_reps // rounds, 1))) for i in live}
    times: dict = {i: [] for i in live}
    count = {i: 0 for i in live}
    for _ in range(rounds):
        for i in list(live):
            try:
                for _ in range(per_round[i]):
                    a = time.perf_counter()
                    fns[i](count[i] % nsets)
                    times[i].append((time.perf_counter() - a) * 1e3)
                    count[i] += 1
            except Exception as e:
                res[i] = e
                live.remove(i)
    for i in live:
        res[i] = stats(times[i])
        res[i]["first_call_s"] = first[i]
    return res


def time_cases(cases: list, device: str, nsets: int, quick: bool) -> list:
    """Stats (or the exception, or None when not runnable) for every case:
    interleaved on CPU, one case after the other on a GPU (CUDA events)."""
    out: list = [None] * len(cases)
    runnable = [i for i, c in enumerate(cases) if c.fn is not None]
    if device == "cpu":
        for i, r in zip(runnable, time_interleaved([cases[i].fn for i in runnable], nsets, quick)):
            out[i] = r
        return out
    for i in runnable:
        try:
            with use_backend(cases[i].backend):
                out[i] = time_calls(cases[i].fn, device, nsets, quick)
        except Exception as e:
            out[i] = e
    return out


def copy_bandwidth(device: str, quick: bool = False) -> float:
    """This device's copy bandwidth in GB/s (1e9 B/s): a large
    ``dst.copy_(src)`` (256 MB on CPU, 1 GiB on GPU), counting the bytes read
    plus the bytes written; the best median of three timing windows."""
    nbytes = (64 << 20 if quick else 256 << 20) if device == "cpu" else (256 << 20 if quick else 1 << 30)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    # the best of three windows: the reference is what the device can reach
    best = min(time_calls(lambda i: dst.copy_(src), device, 1, quick)["median_ms"] for _ in range(1 if quick else 3))
    del src, dst
    return 2 * nbytes / (best * 1e-3) / 1e9


def keep_freed_memory() -> str:
    """Tell glibc malloc to keep freed memory for reuse (no trimming, heap
    instead of mmap up to 32 MB), as jemalloc/tcmalloc setups do: without
    it every fresh multi-MB output is new pages, and first-touch page faults
    (several microseconds each in a VM) can dominate a CPU step. Process-wide;
    used by ``fastdiff bench --malloc-reuse``. Returns a note."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
        return "glibc malloc: freed memory kept for reuse" if ok else "mallopt refused the settings"
    except Exception as e:
        return f"malloc tuning unavailable ({type(e).__name__})"


def cache_bytes(device: str) -> int:
    """The last-level cache the rotating input sets must exceed."""
    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(p, "L2_cache_size", 0) or 50 << 20)
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
        return int(txt.rstrip("KMG")) * mult
    except Exception:
        return 32 << 20


def num_sets(set_bytes: int, cache: int) -> int:
    """Input sets to rotate: their total at least twice the cache (>= 2, <= 16)."""
    return int(min(max(math.ceil(2 * cache / max(set_bytes, 1)), 2), 16))


# --------------------------------------------------------------- cases ------


@dataclass
class Case:
    op: str
    impl: str                      # fastdiff[-backend] | diffusers | eager | compile
    fn: Optional[Callable[[int], object]]
    nbytes: int
    variant: str = ""
    backend: Optional[str] = None  # fastdiff GPU backend to select while timing
    note: str = ""                 # why it was skipped, or extra information




class Skip(Exception):
    pass



class Compiler:
    """torch.compile of the eager functions, one wrapper per function (it
    recompiles per shape/dtype), with a wall-clock budget for the whole run:
    compilation happens at the first call, so the budget is checked before
    each new (function, shape, dtype) is timed."""

    def __init__(self, enabled: bool, why_off: str, budget_s: float):
        self.enabled, self.why_off, self.budget_s = enabled, why_off, budget_s
        self.spent_s = 0.0
        self.wrappers: dict = {}
        self.failed: dict = {}

    def __call__(self, key: str, f: Callable) -> Callable:
        if not self.enabled:
            raise Skip(self.why_off)
        if key in self.failed:
            raise Skip(self.failed[key])
        if self.spent_s > self.budget_s:
            raise Skip(f"skipped: torch.compile budget ({self.budget_s:.0f} s) used up")
        if key not in self.wrappers:
            self.wrappers[key] = torch.compile(f, dynamic=False)
        return self.wrappers[key]


@contextmanager
def use_backend(backend: Optional[str]):
    if backend is None:
        yield
        return
    fastdiff.set_backend(backend)
    try:
        yield
    finally:
        fastdiff.set_backend("auto")



def free(device: str) -> None:
    """Release what the previous case left: Python garbage, then the CUDA cache."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()



# ------------------------------------------------------------ unet_step -----
_KINETO_LINE = re.compile(r"^(USDT|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \w+\.cpp:\d+\]")


@contextmanager
def _without_kineto_log():
    """Drop the profiler library's start/stop log lines (it writes them to
    file descriptor 2 itself); every other line written meanwhile is passed on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        tmp = tempfile.TemporaryFile()
        os.dup2(tmp.fileno(), 2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): leave it alone
        yield
        return
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
            if not _KINETO_LINE.match(line):
                sys.stderr.write(line)
        tmp.close()


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it
    started, on CPU: the allocation and free events of PyTorch's CPU
    allocator recorded by the profiler (``profile_memory``), summed in time
    order. Counts every tensor allocation (intermediate buffers inside ops
    included); memory a library allocates on its own (e.g. oneDNN scratch
    pads) is not seen."""
    from torch.profiler import ProfilerActivity, profile

    with _without_kineto_log():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    # raw allocator events (signed byte counts), in time order
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    cur = peak = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
    return peak


def step_peak_memory(fn: Callable[[], object], device: str, base_bytes: int) -> dict:
    """Peak memory of one training step ``fn()``: ``step_mem_bytes`` = the
    peak allocated above what was allocated when it started (GPU: the
    caching allocator's ``max_memory_allocated`` after a reset, minus
    ``memory_allocated`` at the start; CPU: :func:`cpu_peak_bytes`), and
    ``peak_mem_bytes`` = ``base_bytes`` (parameters, optimizer state,
    inputs) + that, the same definition on both devices."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mem_bytes": base_bytes + peak - start, "step_mem_bytes": peak - start,
                "cuda_max_allocated_bytes": peak, "mem_method": "torch.cuda.max_memory_allocated - start"}
    extra = cpu_peak_bytes(fn)
    return {"peak_mem_bytes": base_bytes + extra, "step_mem_bytes": extra,
            "mem_method": "torch.profiler profile_memory (CPU allocator events)"}


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total
