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

The U-Net block operators (GroupNorm+SiLU, attention, the U-Net training
step with its peak memory) are benchmarked by :mod:`fastdiff.bench_blocks`
through the same :func:`run`; ``ops`` may name them, or the families
``elementwise`` and ``blocks``.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.ops import _backend

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# op key -> what it times
OPS = {
    "q_sample_rng": "q_sample with the noise drawn (fastdiff: in the kernel; baselines: randn + formula)",
    "q_sample": "q_sample with the noise given",
    "diffusion_loss": "epsilon-target MSE loss, forward + backward",
    "ddpm_step": "DDPM ancestral step with noise (fixed_small variance)",
    "ddim_step": "DDIM step, eta = 0 (50-step respaced chain)",
    "multistep_step": "DPM-Solver++(2M) step (midpoint, epsilon model, one history slot): fastdiff.multistep_step "
                      "vs the same update in eager PyTorch",
}
# the U-Net block operators, timed by fastdiff.bench_blocks
BLOCK_OPS = {
    "group_norm_act": "GroupNorm+SiLU (plain, + time-embedding add, + scale/shift): forward, backward, both; "
                      "NCHW and channels_last",
    "attention": "attention core softmax(q k^T/sqrt(D)) v: forward, forward + backward (U-Net self-attention, "
                 "1 head; cross-attention to 77 keys)",
    "unet_step": "DDPM CIFAR-10 U-Net training step (forward + backward + Adam): time and peak memory, "
                 "fused modules vs stock PyTorch layers",
}
ALL_OPS = {**OPS, **BLOCK_OPS}
# what `fastdiff bench` (no --ops) runs
DEFAULT_OPS = tuple(ALL_OPS)
# --ops accepts these names for a whole family
FAMILIES = {"elementwise": tuple(OPS), "blocks": tuple(BLOCK_OPS)}
# speedup_vs_<baseline> of the fastdiff rows; sdpa: F.scaled_dot_product_attention (attention),
# stock: the U-Net built from stock PyTorch layers (unet_step)
BASELINES = ("diffusers", "eager", "compile", "sdpa", "stock")

DEFAULT_SHAPES = {
    "cpu": [(128, 3, 64, 64)],
    # 6 MB, 64 MB and 128 MB per fp32 tensor
    "cuda": [(128, 3, 64, 64), (256, 4, 128, 128), (128, 4, 256, 256)],
}
QUICK_SHAPES = {"cpu": [(8, 3, 32, 32)], "cuda": [(128, 3, 64, 64)]}

T_TRAIN = 1000          # schedule length
STEP_T = 500            # timestep of the reverse-step cases
DDIM_STEPS = 50         # DDIM chain length: t_prev = STEP_T - T_TRAIN // DDIM_STEPS

# Timing budgets: (seconds of measured calls per case, minimum calls, maximum calls, warm-up seconds)
_CPU_FULL = (0.4, 5, 2000, 0.1)
_CPU_QUICK = (0.02, 3, 50, 0.0)
_GPU_FULL = (0.15, 10, 2000, 0.025)
_GPU_QUICK = (0.02, 5, 200, 0.005)
# Wall-clock budget for torch.compile (all compilations of one run together)
COMPILE_BUDGET_S = {"cpu": 120.0, "cuda": 150.0}


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


def expand_ops(names: Optional[Sequence[str]]) -> list:
    """Op keys (or family names: elementwise, blocks) -> op keys, in order,
    without duplicates; None or empty -> :data:`DEFAULT_OPS`. Unknown names raise ValueError."""
    if not names:
        return list(DEFAULT_OPS)
    out = []
    for n in names:
        for o in FAMILIES.get(n, (n,)):
            if o not in ALL_OPS:
                raise ValueError(f"unknown op {o!r}; ops are {', '.join(ALL_OPS)} (families: "
                                 f"{', '.join(FAMILIES)})")
            if o not in out:
                out.append(o)
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA GPU")
    return device


# -------------------------------------------------------------- timing ------
def _sync(device: str) -> None:
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


def _stats(times_ms: list) -> dict:
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
    _sync(device)
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
    out = _stats(times)
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
        res[i] = _stats(times[i])
        res[i]["first_call_s"] = first[i]
    return res


def _time_cases(cases: list, device: str, nsets: int, quick: bool) -> list:
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
            with _use_backend(cases[i].backend):
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


def _cache_bytes(device: str) -> int:
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


def _num_sets(set_bytes: int, cache: int) -> int:
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


@dataclass
class _Ctx:
    device: str
    dtype: torch.dtype
    shape: tuple
    nsets: int
    fastdiff_impls: list           # [(impl name, GPU backend or None)]
    compile_fn: Callable           # compile_fn(key, f) -> compiled f, or raises _Skip
    diffusers: Optional[object]    # the diffusers module, or None
    diffusers_note: str = ""
    sched: fastdiff.NoiseSchedule = None
    tables: dict = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def randn(self, gen: torch.Generator) -> list:
        return [torch.randn(self.shape, generator=gen, device=self.device, dtype=torch.float32).to(self.dtype)
                for _ in range(self.nsets)]


class _Skip(Exception):
    pass


def _tables(sched: fastdiff.NoiseSchedule, dtype: torch.dtype, device: str) -> dict:
    """The per-timestep coefficient tables of the textbook eager code, in the
    data dtype (as a user would precompute them)."""
    ab = sched.alphas_cumprod.to(device=device, dtype=torch.float64)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    c_x0 = ab_prev.sqrt() * beta / (1 - ab)
    c_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    var = (beta * (1 - ab_prev) / (1 - ab)).clamp(min=1e-20)
    sigma = var.sqrt()
    sigma[0] = 0.0  # no noise at the last step
    tab = {"sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt(), "c_x0": c_x0, "c_xt": c_xt, "sigma": sigma}
    return {k: v.to(dtype) for k, v in tab.items()}


# The textbook eager implementations (also what torch.compile gets).
def eager_q_sample_rng(x0, t, sqrt_ab, sqrt_1m_ab):
    noise = torch.randn_like(x0)
    shp = (-1,) + (1,) * (x0.dim() - 1)
    return sqrt_ab[t].view(shp) * x0 + sqrt_1m_ab[t].view(shp) * noise, noise


def eager_q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab):
    shp = (-1,) + (1,) * (x0.dim() - 1)
    return sqrt_ab[t].view(shp) * x0 + sqrt_1m_ab[t].view(shp) * noise


def eager_mse(model_output, noise):
    return F.mse_loss(model_output, noise)


def eager_ddpm_step(eps, x, t, sqrt_ab, sqrt_1m_ab, c_x0, c_xt, sigma):
    shp = (-1,) + (1,) * (x.dim() - 1)
    x0 = (x - sqrt_1m_ab[t].view(shp) * eps) / sqrt_ab[t].view(shp)
    mean = c_x0[t].view(shp) * x0 + c_xt[t].view(shp) * x
    noise = torch.randn_like(x)
    return mean + sigma[t].view(shp) * noise, x0


def eager_ddim_step(eps, x, t, t_prev, sqrt_ab, sqrt_1m_ab):
    shp = (-1,) + (1,) * (x.dim() - 1)
    x0 = (x - sqrt_1m_ab[t].view(shp) * eps) / sqrt_ab[t].view(shp)
    return sqrt_ab[t_prev].view(shp) * x0 + sqrt_1m_ab[t_prev].view(shp) * eps, x0


def _compile_case(ctx: _Ctx, op: str, eager_fn: Callable, nbytes: int, call: Callable) -> Case:
    """The torch.compile row of ``op``: ``call(compiled eager_fn, i)``, or a
    skipped row with the reason (compilation off, failed or over budget)."""
    try:
        cf = ctx.compile_fn(op, eager_fn)
    except _Skip as e:
        return Case(op, "compile", None, nbytes, note=str(e))
    return Case(op, "compile", lambda i: call(cf, i), nbytes)


def _grad_of(o: torch.Tensor, loss: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Forward + backward of ``loss()`` with respect to ``o`` (grad cleared first)."""
    o.grad = None
    loss().backward()
    return o.grad


def _cases_q_sample_rng(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    x0s = ctx.randn(gen)
    n = ctx.shape[0]
    ts = [torch.randint(0, T_TRAIN, (n,), generator=gen, device=dev) for _ in range(ctx.nsets)]
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        for rn in (False, True):
            def f(i, rn=rn):
                k = fastdiff.draw_key(device=dev)
                return fastdiff.q_sample(x0s[i], ts[i], s, key=k, return_noise=rn)
            cases.append(Case("q_sample_rng", impl, f, (3 if rn else 2) * B,
                              "noise out" if rn else "no noise out", backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False)

        def fd(i):
            noise = torch.randn(x0s[i].shape, device=dev, dtype=x0s[i].dtype)
            return sch.add_noise(x0s[i], noise, ts[i]), noise
        cases.append(Case("q_sample_rng", "diffusers", fd, 3 * B))
    else:
        cases.append(Case("q_sample_rng", "diffusers", None, 3 * B, note=ctx.diffusers_note))
    a, b = tab["sqrt_ab"], tab["sqrt_1m_ab"]
    cases.append(Case("q_sample_rng", "eager", lambda i: eager_q_sample_rng(x0s[i], ts[i], a, b), 3 * B))
    cases.append(_compile_case(ctx, "q_sample_rng", eager_q_sample_rng, 3 * B, lambda cf, i: cf(x0s[i], ts[i], a, b)))
    return cases


def _cases_q_sample(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    x0s, noises = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    ts = [torch.randint(0, T_TRAIN, (n,), generator=gen, device=dev) for _ in range(ctx.nsets)]
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        cases.append(Case("q_sample", impl, lambda i: fastdiff.q_sample(x0s[i], ts[i], s, noises[i]), 3 * B,
                          backend=backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False)
        cases.append(Case("q_sample", "diffusers", lambda i: sch.add_noise(x0s[i], noises[i], ts[i]), 3 * B))
    else:
        cases.append(Case("q_sample", "diffusers", None, 3 * B, note=ctx.diffusers_note))
    a, b = tab["sqrt_ab"], tab["sqrt_1m_ab"]
    cases.append(Case("q_sample", "eager", lambda i: eager_q_sample(x0s[i], noises[i], ts[i], a, b), 3 * B))
    cases.append(_compile_case(ctx, "q_sample", eager_q_sample, 3 * B,
                               lambda cf, i: cf(x0s[i], noises[i], ts[i], a, b)))
    return cases


def _cases_diffusion_loss(ctx: _Ctx, gen) -> list:
    """Forward + backward of the epsilon-target loss. fastdiff regenerates the
    noise from the key q_sample used (reads model_output and x0, writes the
    gradient); the baselines read model_output and the stored noise."""
    dev, B = ctx.device, ctx.tensor_bytes
    outs = [o.requires_grad_() for o in ctx.randn(gen)]
    x0s, noises = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    ts = [torch.randint(0, T_TRAIN, (n,), generator=gen, device=dev) for _ in range(ctx.nsets)]
    keys = [fastdiff.draw_key(gen) for _ in range(ctx.nsets)]
    s = ctx.sched
    cases = []
    def fd_key(i):
        return _grad_of(outs[i], lambda: fastdiff.diffusion_loss(outs[i], x0s[i], ts[i], s, key=keys[i]))

    def fd_noise(i):
        return _grad_of(outs[i], lambda: fastdiff.diffusion_loss(outs[i], x0s[i], ts[i], s, noises[i]))
    for impl, backend in ctx.fastdiff_impls:
        cases.append(Case("diffusion_loss", impl, fd_key, 3 * B, "key", backend))
        cases.append(Case("diffusion_loss", impl, fd_noise, 4 * B, "noise", backend))
    cases.append(Case("diffusion_loss", "diffusers", None, 3 * B,
                      note="diffusers has no loss function (its training scripts use F.mse_loss = eager)"))
    cases.append(Case("diffusion_loss", "eager", lambda i: _grad_of(outs[i], lambda: eager_mse(outs[i], noises[i])),
                      3 * B))
    cases.append(_compile_case(ctx, "diffusion_loss", eager_mse, 3 * B,
                               lambda cf, i: _grad_of(outs[i], lambda: cf(outs[i], noises[i]))))
    return cases


def _cases_ddpm_step(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    eps, xs = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    tt = torch.full((n,), STEP_T, dtype=torch.int64, device=dev)
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        def f(i):
            k = fastdiff.draw_key(device=dev)
            return fastdiff.ddpm_step(eps[i], tt, xs[i], s, key=k)
        cases.append(Case("ddpm_step", impl, f, 4 * B, backend=backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False,
                                          variance_type="fixed_small")
        g = torch.Generator(device=dev).manual_seed(0)
        cases.append(Case("ddpm_step", "diffusers",
                          lambda i: sch.step(eps[i], STEP_T, xs[i], generator=g, return_dict=False), 4 * B))
    else:
        cases.append(Case("ddpm_step", "diffusers", None, 4 * B, note=ctx.diffusers_note))
    args = (tab["sqrt_ab"], tab["sqrt_1m_ab"], tab["c_x0"], tab["c_xt"], tab["sigma"])
    cases.append(Case("ddpm_step", "eager", lambda i: eager_ddpm_step(eps[i], xs[i], tt, *args), 4 * B))
    cases.append(_compile_case(ctx, "ddpm_step", eager_ddpm_step, 4 * B, lambda cf, i: cf(eps[i], xs[i], tt, *args)))
    return cases


def _cases_ddim_step(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    eps, xs = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    prev_t = STEP_T - T_TRAIN // DDIM_STEPS
    tt = torch.full((n,), STEP_T, dtype=torch.int64, device=dev)
    tp = torch.full((n,), prev_t, dtype=torch.int64, device=dev)
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        cases.append(Case("ddim_step", impl,
                          lambda i: fastdiff.ddim_step(eps[i], tt, xs[i], s, t_prev=tp, eta=0.0),
                          4 * B, backend=backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDIMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False,
                                          set_alpha_to_one=True)
        sch.set_timesteps(DDIM_STEPS)
        cases.append(Case("ddim_step", "diffusers",
                          lambda i: sch.step(eps[i], STEP_T, xs[i], eta=0.0, return_dict=False), 4 * B))
    else:
        cases.append(Case("ddim_step", "diffusers", None, 4 * B, note=ctx.diffusers_note))
    a, b = tab["sqrt_ab"], tab["sqrt_1m_ab"]
    cases.append(Case("ddim_step", "eager", lambda i: eager_ddim_step(eps[i], xs[i], tt, tp, a, b), 4 * B))
    cases.append(_compile_case(ctx, "ddim_step", eager_ddim_step, 4 * B,
                               lambda cf, i: cf(eps[i], xs[i], tt, tp, a, b)))
    return cases


def _dpmpp_2m_scalars(sched: fastdiff.NoiseSchedule, t_prev_prev: int, t_cur: int, t_next: int) -> dict:
    """alpha/sigma/h/r0 of one DPM-Solver++(2M) step t_cur -> t_next after t_prev_prev (float64 host maths)."""
    ab = sched.alphas_cumprod.double().cpu()
    al = {t: math.sqrt(float(ab[t])) for t in (t_prev_prev, t_cur, t_next)}
    sg = {t: math.sqrt(1 - float(ab[t])) for t in (t_prev_prev, t_cur, t_next)}
    lam = {t: math.log(al[t] / sg[t]) for t in al}
    h, h0 = lam[t_next] - lam[t_cur], lam[t_cur] - lam[t_prev_prev]
    return dict(alpha_s=al[t_cur], sigma_s=sg[t_cur], alpha_t=al[t_next], sigma_t=sg[t_next], h=h, r0=h0 / h)


def eager_dpmpp_2m(eps, x, prev_x0, alpha_s, sigma_s, alpha_t, sigma_t, h, r0):
    """DPM-Solver++(2M), midpoint, epsilon model: the update diffusers' DPMSolverMultistepScheduler makes,
    written with Python-float coefficients."""
    x0 = (x - sigma_s * eps) / alpha_s
    d1 = (1.0 / r0) * (x0 - prev_x0)
    e = math.expm1(-h)
    return (sigma_t / sigma_s) * x - (alpha_t * e) * x0 - 0.5 * (alpha_t * e) * d1, x0


def _cases_multistep_step(ctx: _Ctx, gen) -> list:
    """Minimum traffic of a 2M step: read x, eps and the previous x0, write prev and the new x0 (5 tensors)."""
    dev, B = ctx.device, ctx.tensor_bytes
    eps, xs = ctx.randn(gen), ctx.randn(gen)
    stride = T_TRAIN // 20
    c = _dpmpp_2m_scalars(ctx.sched, STEP_T + stride, STEP_T, STEP_T - stride)
    e = math.expm1(-c["h"])
    A = c["alpha_t"] * e
    row = torch.zeros(fastdiff.ops.multistep.MULTISTEP_NCOEF, dtype=torch.float64)
    row[0], row[1] = 1 / c["alpha_s"], -c["sigma_s"] / c["alpha_s"]        # x0 = (x - sigma_s eps) / alpha_s
    row[8], row[10], row[11] = c["sigma_t"] / c["sigma_s"], -A - 0.5 * A / c["r0"], 0.5 * A / c["r0"]
    row[15] = 1.0                                                          # push x0 into the history
    coeffs = row.repeat(2, 1).to(dev)
    hist = torch.randn((1,) + ctx.shape, generator=gen, device=dev, dtype=torch.float32).to(ctx.dtype)
    empty = torch.empty(0, device=dev, dtype=ctx.dtype)
    si = torch.ones((), dtype=torch.int64, device=dev)
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        def f(i):
            si.fill_(1)  # replay row 1 (the op advances step_index)
            return fastdiff.multistep_step(eps[i], xs[i], hist, empty, coeffs, si)
        cases.append(Case("multistep_step", impl, f, 5 * B, backend=backend))
    prev_x0 = hist[0]
    cases.append(Case("multistep_step", "eager", lambda i: eager_dpmpp_2m(eps[i], xs[i], prev_x0, **c), 5 * B))
    cases.append(_compile_case(ctx, "multistep_step", eager_dpmpp_2m, 5 * B,
                               lambda cf, i: cf(eps[i], xs[i], prev_x0, **c)))
    return cases


_BUILDERS = {
    "q_sample_rng": _cases_q_sample_rng,
    "q_sample": _cases_q_sample,
    "diffusion_loss": _cases_diffusion_loss,
    "ddpm_step": _cases_ddpm_step,
    "ddim_step": _cases_ddim_step,
    "multistep_step": _cases_multistep_step,
}
# full-size tensors each input set holds (for the rotation count)
_INPUTS_PER_SET = {"q_sample_rng": 1, "q_sample": 2, "diffusion_loss": 3, "ddpm_step": 2, "ddim_step": 2,
                   "multistep_step": 2}


def fastdiff_impls(device: str) -> list:
    """[(impl name, backend)]: on CPU the one CPU kernel; on a GPU every
    compiled backend available (CUDA C++, Triton), each timed separately."""
    if device == "cpu":
        return [("fastdiff", None)]
    avail = [b for b in _backend.available_backends("cuda") if b != "reference"] or ["reference"]
    return [(f"fastdiff-{b}", b) for b in avail]


@contextmanager
def _use_backend(backend: Optional[str]):
    if backend is None:
        yield
        return
    fastdiff.set_backend(backend)
    try:
        yield
    finally:
        fastdiff.set_backend("auto")


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers import DDIMScheduler, DDPMScheduler  # noqa: F401
        return diffusers, ""
    except Exception as e:
        return None, f"diffusers not importable ({type(e).__name__}: {e})"


class _Compiler:
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
            raise _Skip(self.why_off)
        if key in self.failed:
            raise _Skip(self.failed[key])
        if self.spent_s > self.budget_s:
            raise _Skip(f"skipped: torch.compile budget ({self.budget_s:.0f} s) used up")
        if key not in self.wrappers:
            self.wrappers[key] = torch.compile(f, dynamic=False)
        return self.wrappers[key]


def _row(case: Case, ctx: _Ctx, copy_gbps: float, st: Optional[dict]) -> dict:
    r = {"op": case.op, "impl": case.impl, "variant": case.variant, "backend": case.backend,
         "shape": shape_str(ctx.shape), "dtype": DTYPE_NAMES.get(ctx.dtype, str(ctx.dtype)),
         "device": ctx.device, "bytes": case.nbytes, "input_sets": ctx.nsets,
         "pred_ms": case.nbytes / (copy_gbps * 1e9) * 1e3 if copy_gbps else None,
         "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0, "gbps": None, "pct_copy_bw": None,
         "first_call_s": None, "note": case.note}
    if case.impl == "fastdiff" and ctx.device == "cpu":
        r["backend"] = _backend.current_backend(_KERNEL_OF.get(case.op, case.op), "cpu")
    if st is not None:
        r.update(st)
        r["gbps"] = case.nbytes / (st["median_ms"] * 1e-3) / 1e9
        r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps if copy_gbps else None
    return r


_KERNEL_OF = {"q_sample_rng": "q_sample_rng", "q_sample": "q_sample", "diffusion_loss": "diffusion_loss",
              "ddpm_step": "ddpm_step", "ddim_step": "ddim_step", "multistep_step": "multistep_step"}


def add_speedups(rows: list) -> list:
    """speedup_vs_<baseline> = baseline median / this row's median, for
    every fastdiff row, against the baseline row of the same op/shape/dtype
    and the same variant (block ops: layout, mode, ...) or, failing that,
    the baseline row without a variant (the elementwise baselines)."""
    index = {(r["op"], r["shape"], r["dtype"], r["impl"], r.get("variant") or ""): r for r in rows
             if not r["impl"].startswith("fastdiff")}
    for r in rows:
        for b in BASELINES:
            r[f"speedup_vs_{b}"] = None
        if not r["impl"].startswith("fastdiff") or not r["median_ms"]:
            continue
        for b in BASELINES:
            key = (r["op"], r["shape"], r["dtype"], b)
            base = index.get(key + (r.get("variant") or "",)) or index.get(key + ("",))
            if base is not None and base["median_ms"]:
                r[f"speedup_vs_{b}"] = base["median_ms"] / r["median_ms"]
    return rows


def run(device: str = "cpu", ops: Optional[Sequence[str]] = None, dtype="fp32", shapes=None, quick: bool = False,
        compile: Optional[bool] = None, log: Optional[Callable[[str], None]] = None,
        copy_gbps: Optional[float] = None, full: bool = False, block_shapes=None, batch: Optional[int] = None,
        compile_budget_s: Optional[float] = None, unet_preset: Optional[str] = None) -> list:
    """Time every case of ``ops`` (default: :data:`DEFAULT_OPS`, all of them; family
    names allowed, see :func:`expand_ops`). The elementwise ops run at each
    of ``shapes`` (default: :data:`DEFAULT_SHAPES`, or :data:`QUICK_SHAPES`
    with ``quick``); the block ops at ``block_shapes`` (feature maps
    N x C x H x W; default: the DDPM CIFAR-10 shapes of
    :mod:`fastdiff.bench_blocks`, smaller batches on CPU unless ``full``;
    ``batch`` replaces their batch and the U-Net step's, whose model is
    ``fastdiff.nn.UNet.from_preset(unet_preset)``, default "ddpm-cifar10",
    "tiny" with ``quick``). dtype(s):
    "fp32"/"fp16"/"bf16", one or a list. ``compile`` (default: on unless
    ``quick``) adds the torch.compile baseline; ``compile_budget_s`` caps the
    compilation time of each family (default: :data:`COMPILE_BUDGET_S`, and
    the block budget of :mod:`fastdiff.bench_blocks`). Returns one dict per
    case (see :func:`format_table`); every row carries ``copy_gbps``."""
    device = resolve_device(device)
    log = log or (lambda msg: None)
    ops = expand_ops(ops)
    block_ops = [o for o in ops if o in BLOCK_OPS]
    ops = [o for o in ops if o in OPS]
    dtypes = [parse_dtype(d) for d in ([dtype] if isinstance(dtype, (str, torch.dtype)) else dtype)]
    if shapes is None:
        shapes = (QUICK_SHAPES if quick else DEFAULT_SHAPES)[device]
    shapes = [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]
    if compile is None:
        compile = not quick
    why_off = "skipped: --no-compile" if not quick else "skipped in --quick (use --compile to time it)"
    compiler = _Compiler(bool(compile), why_off, COMPILE_BUDGET_S[device] if compile_budget_s is None
                         else compile_budget_s)
    diff_mod, diff_note = _import_diffusers() if ops else (None, "")
    if copy_gbps is None and (ops or [o for o in block_ops if o != "unet_step"]):
        log(f"measuring the {device} copy bandwidth ...")
        copy_gbps = copy_bandwidth(device, quick)
        log(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    cache = _cache_bytes(device)
    sched = fastdiff.NoiseSchedule.make("linear", T_TRAIN, device=device)
    rows = []
    for shape in shapes if ops else ():
        for dt in dtypes:
            elem = torch.empty((), dtype=dt).element_size()
            for op_name in ops:
                set_bytes = _INPUTS_PER_SET[op_name] * math.prod(shape) * elem
                ctx = _Ctx(device, dt, shape, _num_sets(set_bytes, cache), fastdiff_impls(device), compiler,
                           diff_mod, diff_note, sched, _tables(sched, dt, device))
                gen = torch.Generator(device=device).manual_seed(1234)
                try:
                    cases = _BUILDERS[op_name](ctx, gen)
                except torch.OutOfMemoryError as e:
                    log(f"{op_name} {shape_str(shape)}: out of memory building inputs ({e})")
                    rows.append(_row(Case(op_name, "*", None, 0, note="out of memory"), ctx, copy_gbps, None))
                    _free(device)
                    continue
                results = _time_cases(cases, device, ctx.nsets, quick)
                for case, res in zip(cases, results):
                    label = f"{op_name:<15}{shape_str(shape):<16}{DTYPE_NAMES[dt]:<6}{_impl_label(case)}"
                    st = None
                    if isinstance(res, BaseException):  # a failing case must not end the run
                        msg = f"{type(res).__name__}: {str(res).strip().splitlines()[0] if str(res).strip() else ''}"
                        if case.impl == "compile":
                            compiler.failed[op_name] = f"skipped: torch.compile failed ({msg[:160]})"
                            case.note = compiler.failed[op_name]
                        else:
                            case.note = f"failed: {msg[:200]}"
                        _free(device)
                    elif res is not None:
                        st = res
                        if case.impl == "compile":
                            compiler.spent_s += st["first_call_s"]
                            case.note = f"first call (compile) {st['first_call_s']:.1f} s"
                    row = _row(case, ctx, copy_gbps, st)
                    row["copy_gbps"] = copy_gbps
                    rows.append(row)
                    log(f"  {label:<70}" + (f"{row['median_ms']:9.3f} ms" if st else f"  {case.note}"))
                del cases, ctx
                _free(device)
    if block_ops:
        from . import bench_blocks

        rows += bench_blocks.run_blocks(device, block_ops, dtypes, block_shapes, quick, full, compile, log, copy_gbps,
                                        batch, compile_budget_s, unet_preset)
    return add_speedups(rows)


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _impl_label(r) -> str:
    impl = r.impl if isinstance(r, Case) else r["impl"]
    var = r.variant if isinstance(r, Case) else r.get("variant")
    return f"{impl} [{var}]" if var else impl


# ------------------------------------------------------------- reports ------
def _sections(rows: list) -> list:
    """[(block op or None, rows)] in order of first appearance: the
    elementwise ops together (None), then one section per block op."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["op"] if r["op"] in BLOCK_OPS else None, []).append(r)
    return list(out.items())


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


# optional columns: (header, shown when any row has this key set, cell)
_EXTRA_COLS = [
    ("GB/s", "bytes", lambda r: _fmt(r.get("gbps"), ".1f")),
    ("% copy", "bytes", lambda r: _fmt(r.get("pct_copy_bw"), ".0f") + ("%" if r.get("pct_copy_bw") is not None
                                                                        else "")),
    ("TFLOP/s", "flops", lambda r: _fmt(r.get("tflops"), ".3g")),
    ("peak MiB", "peak_mem_bytes", lambda r: _fmt(r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None
                                                  else None, ".0f")),
    ("step MiB", "step_mem_bytes", lambda r: _fmt(r["step_mem_bytes"] / 2**20 if r.get("step_mem_bytes") is not None
                                                  else None, ".0f")),
    ("mem vs stock", "peak_mem_bytes", lambda r: "" if r.get("peak_mem_ratio_vs_stock") is None
     else f"{r['peak_mem_ratio_vs_stock']:.2f}"),
    ("step vs stock", "step_mem_bytes", lambda r: "" if r.get("step_mem_ratio_vs_stock") is None
     else f"{r['step_mem_ratio_vs_stock']:.2f}"),
]


def _section_table(rows: list, block: bool) -> tuple:
    """(lines, notes) of one section: only the columns its rows fill, and a
    'vs <baseline>' column for each baseline timed in it."""
    extra = [c for c in _EXTRA_COLS if any(r.get(c[1]) for r in rows)]
    bases = [b for b in BASELINES if any(r["impl"] == b for r in rows)]
    head = ["op", "shape", "dtype", "impl", "median ms", "p20 ms", "p80 ms"] + [c[0] for c in extra] + \
        [f"vs {b}" for b in bases]
    body, notes, merged = [], [], {}
    for r in rows:
        if r["median_ms"] is None:
            body.append([r["op"], r["shape"], r["dtype"], _impl_label(r), "-", "-", "-"] + ["-"] * len(extra)
                        + [""] * len(bases))
            if not block:
                notes.append(f"{r['op']} {r['shape']} {r['dtype']} {_impl_label(r)}: {r['note'] or 'not run'}")
        else:
            body.append([r["op"], r["shape"], r["dtype"], _impl_label(r), _fmt(r["median_ms"], ".3f"),
                         _fmt(r["p20_ms"], ".3f"), _fmt(r["p80_ms"], ".3f")] + [c[2](r) for c in extra]
                        + [("" if r.get(f"speedup_vs_{b}") is None else f"{r[f'speedup_vs_{b}']:.2f}x")
                           for b in bases])
        note = r.get("note") or ("not run" if r["median_ms"] is None else "")
        if block and note and not note.startswith("first call"):
            # block sections have many cases: one line per (impl, note), with its count
            note = note.split("; first call")[0]
            merged.setdefault(note, []).append(r)
    for note, rs in merged.items():
        impls = ", ".join(dict.fromkeys(r["impl"] for r in rs))
        where = f"{rs[0]['shape']} {rs[0]['dtype']}" + (f" [{rs[0]['variant']}]" if rs[0].get("variant") else "") \
            if len(rs) == 1 else f"{len(rs)} rows"
        notes.append(f"{rows[0]['op']} {impls} ({where}): {note}")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    right = set(range(4, len(head)))

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body):
        key = (r["op"], r["shape"], r["dtype"]) + ((r.get("variant"),) if block else ())
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(cells))
    return out, notes


def format_table(rows: list) -> str:
    """An aligned text table: op, shape, dtype, impl, median/p20/p80 ms,
    GB/s, % of the copy bandwidth and the fastdiff speedups ('x' = baseline
    time / fastdiff time); notes for skipped cases follow. The block ops
    get a section each, with the columns they fill (TFLOP/s for attention,
    peak memory for the U-Net step)."""
    out, notes = [], []
    for block, sec in _sections(rows):
        if block is not None:
            if out:
                out.append("")
            out.append(f"== {block}: {BLOCK_OPS[block]}")
        lines, n = _section_table(sec, block is not None)
        out += lines
        notes += n
    cbw = next((r.get("copy_gbps") for r in rows if r.get("copy_gbps")), None)
    if cbw:
        out.append("")
        out.append(f"copy bandwidth (dst.copy_(src), read + write): {cbw:.1f} GB/s; "
                   "bytes = inputs read once + outputs written once")
    if notes:
        out.append("notes:")
        out.extend(f"  {n}" for n in notes)
    return "\n".join(out)


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.lower().startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> Optional[dict]:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    d = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
         "memory_gib": round(p.total_memory / 2**30, 1), "l2_mib": round(_cache_bytes("cuda") / 2**20, 1),
         "driver": None}
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if res.returncode == 0:
            d["driver"] = res.stdout.strip().splitlines()[0]
    except Exception:
        pass
    return d


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", None)
    except Exception:
        return None


def metadata(device: str, copy_gbps: Optional[float] = None, **extra) -> dict:
    """The context a result needs to be read later: hardware, versions,
    commit, date, copy bandwidth."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "gpu": _gpu_info() if device == "cuda" else None,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "fastdiff": fastdiff.__version__,
        "fastdiff_extension": _backend.status()["extension"],
        "git_commit": _git_commit(),
        "copy_gbps": copy_gbps,
        "timing": ("CUDA events per call, queue kept full, one case after the other" if device == "cuda" else
                   "time.perf_counter per call, the implementations of a case interleaved in ~20 ms rounds")
        + "; median/p20/p80 of the per-call times after warm-up; inputs rotated over several sets",
        **extra,
    }


def to_json(rows: list, meta: dict) -> dict:
    return {"meta": meta, "rows": rows}


def plot(rows: list, path: str) -> str:
    """A bar chart of the fastdiff speedups (one group per op/shape/dtype,
    and per variant for the block ops; one bar per fastdiff impl x
    baseline; for the U-Net step also stock/fastdiff peak memory), one
    panel per section of :func:`format_table`. Returns a message; needs
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib is not importable ({type(e).__name__})"
    panels = [(block, [r for r in sec if r["impl"].startswith("fastdiff") and r["median_ms"]])
              for block, sec in _sections(rows)]
    panels = [(b, sec) for b, sec in panels if sec]
    if not panels:
        return "plot skipped: no fastdiff rows were timed"
    sizes = []
    for block, sec in panels:
        vals: dict = {}  # (group, series) -> value
        groups, series = [], []
        for r in sec:
            g = f"{r['shape']} {r['dtype']}\n{r.get('variant') or ''}" if block else \
                f"{r['op']}\n{r['shape']} {r['dtype']}"
            label = r["impl"] if block else _impl_label(r)
            pairs = [(f"{label} vs {b}", r.get(f"speedup_vs_{b}")) for b in BASELINES]
            if r.get("peak_mem_ratio_vs_stock"):
                pairs.append((f"{label}: stock / fastdiff peak memory", 1.0 / r["peak_mem_ratio_vs_stock"]))
            for name, v in pairs:
                if v:
                    groups += [g] if g not in groups else []
                    series += [name] if name not in series else []
                    vals[(g, name)] = v
        sizes.append((groups, series, vals))
    # the elementwise panel keeps its old width; block panels (many variants) get room for their bars
    width = max(8.0, min(40.0, max(1.6 * len(g) if b is None else 0.35 * len(g) * max(len(s), 1) + 2
                                   for (b, _), (g, s, _) in zip(panels, sizes))))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 5 * len(panels)), squeeze=False)
    for ax, (block, _), (groups, series, vals) in zip(axes[:, 0], panels, sizes):
        w = 0.8 / max(len(series), 1)
        for k, name in enumerate(series):
            v = [vals.get((g, name), 0.0) for g in groups]
            bars = ax.bar([i + k * w for i in range(len(groups))], [x or float("nan") for x in v], w, label=name)
            for bar, x in zip(bars, v):
                if x:
                    ax.annotate(f"{x:.2g}x", (bar.get_x() + bar.get_width() / 2, x), ha="center", va="bottom",
                                fontsize=6)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=8 if len(groups) <= 12 else 6, rotation=0 if len(groups) <= 12 else 90)
        ax.set_ylabel("speedup (baseline time / fastdiff time)")
        what = f"{block}: " if block else ("elementwise ops: " if len(panels) > 1 else "")
        ax.set_title(f"{what}fastdiff speedups on {rows[0]['device']}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
