"""Benchmarks of the fused U-Net block operators, the second half of
``fastdiff bench`` (timing in :mod:`fastdiff.bench._timing`, reports in :mod:`fastdiff.bench._report`):

* ``group_norm_act``: GroupNorm + SiLU, plain / with the time-embedding add /
  with scale-shift, forward, backward (given a saved forward) and both, NCHW
  and channels_last, fastdiff (each backend) vs eager PyTorch vs
  ``torch.compile`` of the eager code;
* ``attention``: the attention core, forward and forward + backward, fastdiff's
  fused kernel (GPU) vs ``F.scaled_dot_product_attention`` (PyTorch's pick
  and, on a GPU, each SDPA backend) vs the textbook softmax(q k^T) v;
* ``unet_step``: one training step (forward + backward + Adam) of the DDPM
  CIFAR-10 U-Net of :mod:`fastdiff.nn`, with the fused modules and with
  stock PyTorch layers (:func:`fastdiff.nn.unfused`): time and peak memory.

    from fastdiff.bench import blocks
    rows = blocks.run_blocks("cpu", ["group_norm_act"], quick=True)

Bytes per case (the minimum traffic, T = one activation tensor):
group_norm_act forward 2T (x read, y written), backward 3T (x, dy read, dx
written), full 5T, plus the small vectors and statistics; attention forward
reads q, k, v and writes out, the backward reads q, k, v, out, dout, lse and
writes dq, dk, dv. FLOPs (attention): 4 B H Lq Lk D forward, 8 more backward
(no recomputation counted). See benchmarks/README.md.
"""
from __future__ import annotations

import copy
import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.bench import _report as report
from fastdiff.bench import _timing as timing
from fastdiff.ops import _backend

BLOCK_OPS = report.BLOCK_OPS
GROUPS = 32
EPS = 1e-5
GN_VARIANTS = ("plain", "add", "scale_shift")
LAYOUTS = ("NCHW", "NHWC")
GN_MODES = ("fwd", "bwd", "full")
ATTN_MODES = ("fwd", "fwd+bwd")
UNET_PRESET = "ddpm-cifar10"
UNET_QUICK_PRESET = "tiny"  # --quick: a seconds-long smoke of the same machinery

# GroupNorm inputs at the DDPM CIFAR-10 U-Net's resolutions (batch 128).
GN_SHAPES = {
    "cuda": [(128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8)],
    "cuda_full": [(128, 128, 32, 32), (128, 128, 16, 16), (128, 256, 16, 16), (128, 256, 8, 8)],
    # CPU default: the largest one at batch 8 (4 MB fp32), to keep `fastdiff bench` within minutes
    # on a small CPU (batch 128 is 64 MB per tensor: 16x the time of every call)
    "cpu": [(8, 128, 32, 32)],
    "cpu_full": [(128, 128, 32, 32), (128, 128, 16, 16), (128, 256, 16, 16), (128, 256, 8, 8)],
    # odd sizes on purpose: C/G = 3 channels per group, 7x5 positions
    "quick": [(2, 96, 7, 5)],
}


@dataclass(frozen=True)
class AttnCase:
    kind: str   # "self" | "cross"
    B: int
    H: int
    Lq: int
    Lk: int
    D: int

    @property
    def label(self) -> str:
        s = f"{self.B}x{self.H}x{self.Lq}x{self.D}"
        return s if self.kind == "self" else f"{s}/kv{self.Lk}"


# (B, H, Lq, Lk, D): the 16x16 self-attention of the DDPM U-Net at 256 channels
# (one head: D = 256), a 512-channel one, and a text cross-attention.
ATTN_CASES = {
    "cuda": [AttnCase("self", 128, 1, 256, 256, 256), AttnCase("self", 32, 1, 256, 256, 512),
             AttnCase("cross", 32, 8, 1024, 77, 64)],
    # CPU default: smaller batches (B=128 one-head fwd+bwd is ~26 GFLOP: ~2 s a call on 2 cores)
    "cpu": [AttnCase("self", 8, 1, 256, 256, 256), AttnCase("self", 2, 1, 256, 256, 512),
            AttnCase("cross", 2, 8, 1024, 77, 64)],
    "quick": [AttnCase("self", 2, 1, 48, 48, 40), AttnCase("cross", 1, 2, 40, 7, 24)],
}
UNET_BATCH = {"cuda": 128, "cpu": 2, "quick": 1}
UNET_IMAGE = (3, 32, 32)
# torch.compile wall-clock budget of the block ops (separate from the elementwise ops' budget)
COMPILE_BUDGET_S = {"cpu": 45.0, "cuda": 240.0}


# ------------------------------------------------------- byte/FLOP model ----
def gn_bytes(shape: Sequence[int], elem: int, variant: str, mode: str, groups: int = GROUPS) -> int:
    """Minimum traffic of one group_norm_act call: forward reads x and the
    vectors and writes y and the statistics; backward reads x, dy, the
    vectors and statistics and writes dx and the vector gradients."""
    N, C = shape[0], shape[1]
    T = math.prod(shape) * elem
    vec = 2 * C * 4 + {"plain": 0, "add": 1, "scale_shift": 2}[variant] * N * C * 4
    stats = 2 * N * groups * 4
    fwd = 2 * T + vec + stats
    bwd = 3 * T + vec + stats + vec
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def attn_bytes(c: AttnCase, elem: int, mode: str) -> int:
    """Forward: q, k, v read, out written. Forward + backward adds the
    log-sum-exp written, then q, k, v, out, dout, lse read and dq, dk, dv written."""
    q = c.B * c.H * c.Lq * c.D * elem
    kv = c.B * c.H * c.Lk * c.D * elem
    lse = c.B * c.H * c.Lq * 4
    fwd = 2 * q + 2 * kv
    if mode == "fwd":
        return fwd
    return fwd + lse + (3 * q + 2 * kv + lse) + (q + 2 * kv)


def attn_flops(c: AttnCase, mode: str) -> int:
    """Matmul FLOPs: q k^T and p v forward (4 B H Lq Lk D); dv, dp, dq, dk
    backward (8 B H Lq Lk D). Recomputation is not counted (same for all)."""
    f = 4 * c.B * c.H * c.Lq * c.Lk * c.D
    return f if mode == "fwd" else 3 * f


# ------------------------------------------------- eager implementations ----
def eager_group_norm_act(x, weight, bias, add, scale, shift, groups: int = GROUPS):
    """What a U-Net writes: (x + temb) -> F.group_norm -> * (1 + scale) + shift -> F.silu."""
    pc = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if add is not None:
        x = x + add.view(pc)
    h = F.group_norm(x, groups, weight, bias, EPS)
    if scale is not None:
        h = h * (1 + scale.view(pc)) + shift.view(pc)
    return F.silu(h)


def eager_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v, the textbook way."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.matmul(torch.softmax(s, dim=-1), v)


# ------------------------------------------------------------- helpers ------
def _impls(device: str, op: str, backward_op: str) -> list:
    """[(impl, GPU backend or None)] of fastdiff for ``op`` (and its backward)."""
    if device == "cpu":
        return [("fastdiff", None)]
    avail = [b for b in _backend.available_backends("cuda", op)
             if b != "reference" and b in _backend.available_backends("cuda", backward_op)]
    return [(f"fastdiff-{b}", b) for b in avail] or [("fastdiff-reference", "reference")]


def _cpu_backend_note(op: str, device: str) -> str:
    if device == "cpu" and _backend.current_backend(op, "cpu") == "reference":
        return "CPU runs the float64 reference kernel (C++ kernel not built): not a performance number"
    return ""


def _row(case: timing.Case, shape: str, dtype: torch.dtype, device: str, nsets: int, copy_gbps: Optional[float],
         st, extra: Optional[dict] = None) -> dict:
    """One result row: the keys of :func:`fastdiff.bench.ops._row`, plus the
    block extras (flops/tflops, peak memory)."""
    r = {"op": case.op, "impl": case.impl, "variant": case.variant, "backend": case.backend,
         "shape": shape, "dtype": timing.DTYPE_NAMES.get(dtype, str(dtype)), "device": device,
         "bytes": case.nbytes or None, "input_sets": nsets,
         "pred_ms": case.nbytes / (copy_gbps * 1e9) * 1e3 if copy_gbps and case.nbytes else None,
         "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0, "gbps": None, "pct_copy_bw": None,
         "first_call_s": None, "note": case.note, "copy_gbps": copy_gbps, "flops": None, "tflops": None}
    if case.impl == "fastdiff" and device == "cpu":
        r["backend"] = _backend.current_backend("attention" if case.op == "attention" else "group_norm_act", "cpu")
    r.update(extra or {})
    if isinstance(st, dict):
        r.update(st)
        if case.nbytes:
            r["gbps"] = case.nbytes / (st["median_ms"] * 1e-3) / 1e9
            r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps if copy_gbps else None
        if r["flops"]:
            r["tflops"] = r["flops"] / (st["median_ms"] * 1e-3) / 1e12
    return r


def _timed_rows(cases: list, device: str, nsets: int, quick: bool, compiler, shape: str, dtype, copy_gbps,
                log, extras: Optional[list] = None) -> list:
    """Time ``cases`` (one case: its implementations interleaved on CPU) and
    turn them into rows; a failing implementation becomes a row with a note."""
    results = timing.time_cases(cases, device, nsets, quick)
    rows = []
    for j, (case, res) in enumerate(zip(cases, results)):
        st = None
        if isinstance(res, BaseException):
            msg = f"{type(res).__name__}: {str(res).strip().splitlines()[0] if str(res).strip() else ''}"
            case.note = (f"skipped: torch.compile failed ({msg[:160]})" if case.impl == "compile"
                         else f"failed: {msg[:200]}")
            timing.free(device)
        elif res is not None:
            st = res
            if case.impl == "compile":
                compiler.spent_s += st["first_call_s"]
                case.note = (case.note + "; " if case.note else "") + f"first call {st['first_call_s']:.1f} s"
        row = _row(case, shape, dtype, device, nsets, copy_gbps, st, extras[j] if extras else None)
        rows.append(row)
        label = f"{case.op:<15}{shape:<18}{row['dtype']:<6}{report.impl_label(case)}"
        log(f"  {label:<72}" + (f"{row['median_ms']:9.3f} ms" if st else f"  {case.note}"))
    return rows


def _compiled(compiler, key: str, fn: Callable):
    """A fresh torch.compile wrapper of ``fn`` for one case, or the skip
    reason. Dynamo's caches are reset first: they live on the function's code
    object, and one eager function compiled for many shapes/layouts/variants
    would otherwise hit the recompile limit and silently run eagerly."""
    try:
        if compiler.enabled and compiler.spent_s <= compiler.budget_s and key not in compiler.failed:
            torch._dynamo.reset()
        return compiler(key, fn), None
    except timing.Skip as e:
        return None, str(e)


# ------------------------------------------------------ group_norm_act ------
def _gn_inputs(shape, dtype, device, layout, variant, nsets, gen) -> list:
    """Per input set: x (requires grad, in ``layout``), the output gradient dy
    (x's layout, as the next layer's backward gives it), the fastdiff vectors
    (float32, its contract) and the eager vectors (x's dtype, as a model in
    that dtype holds them), all requiring grad."""
    N, C = shape[0], shape[1]
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    sets = []
    for _ in range(nsets):
        x = torch.randn(shape, generator=gen, device=device).to(dtype).to(memory_format=fmt)
        dy = torch.randn(shape, generator=gen, device=device).to(dtype).to(memory_format=fmt)
        vec = {"weight": 1 + 0.1 * torch.randn(C, generator=gen, device=device),
               "bias": 0.1 * torch.randn(C, generator=gen, device=device)}
        if variant == "add":
            vec["add"] = torch.randn(N, C, generator=gen, device=device)
        if variant == "scale_shift":
            vec["scale"] = 0.1 * torch.randn(N, C, generator=gen, device=device)
            vec["shift"] = 0.1 * torch.randn(N, C, generator=gen, device=device)
        sets.append({"x": x.requires_grad_(), "dy": dy,
                     "fastdiff": {k: v.clone().requires_grad_() for k, v in vec.items()},
                     "eager": {k: v.to(dtype).requires_grad_() for k, v in vec.items()}})
    return sets


def _fd_group_norm_act(x, v):
    return fastdiff.group_norm_act(x, GROUPS, v["weight"], v["bias"], add=v.get("add"), scale=v.get("scale"),
                                   shift=v.get("shift"))


def _gn_timed_fn(mode: str, call: Callable, sets: list, which: str, backend: Optional[str]) -> Callable:
    """fn(i) of one implementation: "fwd" calls it (inputs require grad: the
    forward as in training); "full" is forward + ``autograd.grad``; "bwd"
    runs the forward of every set now (under ``backend``) and times
    ``autograd.grad(y, inputs, dy, retain_graph=True)`` on the kept graphs."""
    ins = [(s["x"], *s[which].values()) for s in sets]
    if mode == "fwd":
        return lambda i: call(sets[i]["x"], sets[i][which])
    if mode == "full":
        return lambda i: torch.autograd.grad(call(sets[i]["x"], sets[i][which]), ins[i], sets[i]["dy"])
    with timing.use_backend(backend):
        ys = [call(s["x"], s[which]) for s in sets]
    return lambda i: torch.autograd.grad(ys[i], ins[i], sets[i]["dy"], retain_graph=True)


def _gn_cases(mode, sets, impls, compiled, compile_note, nbytes, compiler=None) -> list:
    """The implementations of one (shape, dtype, variant, layout, mode): each
    fastdiff backend, eager, torch.compile (``compiled``, or None and the
    reason in ``compile_note``). One whose set-up fails (the kept forwards of
    "bwd") becomes a case with the error as its note."""
    def eager_call(f):
        return lambda x, v: f(x, v["weight"], v["bias"], v.get("add"), v.get("scale"), v.get("shift"))

    def case(impl, call, which, backend):
        t0 = time.perf_counter()
        try:
            fn = _gn_timed_fn(mode, call, sets, which, backend)
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
            return timing.Case("group_norm_act", impl, None, nbytes, "", backend,
                          note=f"skipped: torch.compile failed ({msg})" if impl == "compile" else f"failed: {msg}")
        if impl == "compile" and compiler is not None:  # "bwd" compiles the forward here
            compiler.spent_s += time.perf_counter() - t0
        return timing.Case("group_norm_act", impl, fn, nbytes, "", backend)

    cases = [case(impl, _fd_group_norm_act, "fastdiff", backend) for impl, backend in impls]
    cases.append(case("eager", eager_call(eager_group_norm_act), "eager", None))
    if compiled is None:
        cases.append(timing.Case("group_norm_act", "compile", None, nbytes, note=compile_note))
    else:
        cases.append(case("compile", eager_call(compiled), "eager", None))
    return cases


def group_norm_rows(device, shapes, dtypes, quick, compiler, copy_gbps, log, variants=GN_VARIANTS,
                    layouts=LAYOUTS, modes=GN_MODES) -> list:
    rows = []
    impls = _impls(device, "group_norm_act", "group_norm_act_backward")
    cache = timing.cache_bytes(device)
    note = _cpu_backend_note("group_norm_act", device)
    for shape in shapes:
        for dt in dtypes:
            elem = torch.empty((), dtype=dt).element_size()
            label = timing.shape_str(shape)
            if len(shape) < 3 or shape[1] % GROUPS:
                why = f"skipped: needs (N, C, *spatial) with C divisible by {GROUPS} groups"
                rows.append(_row(timing.Case("group_norm_act", "*", None, 0, note=why), label, dt, device, 0, copy_gbps,
                                 None))
                continue
            T = math.prod(shape) * elem
            nsets = timing.num_sets(3 * T, cache)  # x, y, dy per set
            for variant in variants:
                for layout in layouts:
                    if layout == "NHWC" and len(shape) != 4:
                        continue
                    gen = torch.Generator(device=device).manual_seed(1234)
                    try:
                        sets = _gn_inputs(shape, dt, device, layout, variant, nsets, gen)
                    except torch.OutOfMemoryError as e:
                        log(f"group_norm_act {label}: out of memory building inputs ({e})")
                        rows.append(_row(timing.Case("group_norm_act", "*", None, 0, f"{variant} {layout}",
                                                note="out of memory"), label, dt, device, nsets, copy_gbps, None))
                        timing.free(device)
                        continue
                    key = f"group_norm_act/{variant}/{layout}/{label}/{timing.DTYPE_NAMES.get(dt, dt)}"
                    compiled, cnote = _compiled(compiler, key, eager_group_norm_act)
                    for mode in modes:
                        var = f"{variant} {layout} {mode}"
                        nbytes = gn_bytes(shape, elem, variant, mode)
                        cases = _gn_cases(mode, sets, impls, compiled, cnote, nbytes, compiler)
                        for c in cases:
                            c.variant = var
                            if c.impl.startswith("fastdiff") and c.fn is not None and note:
                                c.note = note
                        rows += _timed_rows(cases, device, nsets, quick, compiler, label, dt, copy_gbps, log)
                        del cases
                        timing.free(device)
                    del sets, compiled
                    timing.free(device)
    return rows


# ------------------------------------------------------------ attention -----
_SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def _sdpa_pick(q, k, v) -> str:
    """The SDPA backend PyTorch picks for these inputs (its own chooser)."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v)).name.lower()
    except Exception:
        return "unknown"


def _attn_inputs(c: AttnCase, dtype, device: str, nsets: int, gen) -> dict:
    """Per input set: q, k, v (B, H, L, D) contiguous, requiring grad, and dout."""
    def r(L, grad=True):
        t = torch.randn(c.B, c.H, L, c.D, generator=gen, device=device).to(dtype)
        return t.requires_grad_() if grad else t
    return {"q": [r(c.Lq) for _ in range(nsets)], "k": [r(c.Lk) for _ in range(nsets)],
            "v": [r(c.Lk) for _ in range(nsets)], "dout": [r(c.Lq, False) for _ in range(nsets)]}


def _attn_cases(c: AttnCase, mode: str, inp: dict, impls: list, device: str, nbytes: int) -> list:
    """The implementations of one attention case: fastdiff's fused kernel
    (each GPU backend; n/a on CPU), SDPA as PyTorch picks it and, on a GPU,
    forced to each of its backends, and the textbook code. "fwd+bwd" adds
    ``autograd.grad(out, (q, k, v), dout)``."""
    qs, ks, vs, dos = inp["q"], inp["k"], inp["v"], inp["dout"]

    def wrap(f, ctx=None):
        def call(i):
            with (ctx() if ctx else nullcontext()):
                out = f(qs[i], ks[i], vs[i])
            if mode == "fwd":
                return out
            return torch.autograd.grad(out, (qs[i], ks[i], vs[i]), dos[i])
        return call

    cases = []
    if device == "cpu":
        cases.append(timing.Case("attention", "fastdiff", None, nbytes, note=(
            "n/a on CPU: the fused kernel is GPU-only; fastdiff.attention() calls SDPA here (= the sdpa row)")))
    for impl, backend in impls:
        cases.append(timing.Case("attention", impl, wrap(lambda q, k, v: fastdiff.attention(q, k, v, fused=True)),
                            nbytes, "", backend))
    pick = _sdpa_pick(qs[0].detach(), ks[0].detach(), vs[0].detach())
    cases.append(timing.Case("attention", "sdpa", wrap(F.scaled_dot_product_attention), nbytes,
                        note=f"PyTorch picks {pick}"))
    if device == "cuda":
        from torch.nn.attention import sdpa_kernel

        for name in _SDPA_BACKENDS:
            cases.append(timing.Case("attention", f"sdpa-{name}", wrap(
                F.scaled_dot_product_attention, lambda name=name: sdpa_kernel(_sdpa_backend(name))), nbytes))
    cases.append(timing.Case("attention", "eager", wrap(eager_attention), nbytes))
    for cc in cases:
        cc.variant = f"{c.kind} {mode}"
    return cases


def attn_num_sets(c: AttnCase, dtype, device: str) -> int:
    return timing.num_sets(attn_bytes(c, torch.empty((), dtype=dtype).element_size(), "fwd+bwd") // 2,
                       timing.cache_bytes(device))


def attention_rows(device, cases_: Sequence[AttnCase], dtypes, quick, copy_gbps, log, modes=ATTN_MODES) -> list:
    rows = []
    impls = _impls(device, "attention", "attention_backward") if device == "cuda" else []
    for c in cases_:
        for dt in dtypes:
            elem = torch.empty((), dtype=dt).element_size()
            nsets = attn_num_sets(c, dt, device)
            gen = torch.Generator(device=device).manual_seed(1234)
            try:
                inp = _attn_inputs(c, dt, device, nsets, gen)
            except torch.OutOfMemoryError as e:
                log(f"attention {c.label}: out of memory building inputs ({e})")
                rows.append(_row(timing.Case("attention", "*", None, 0, note="out of memory"), c.label, dt, device,
                                 nsets, copy_gbps, None))
                timing.free(device)
                continue
            for mode in modes:
                cases = _attn_cases(c, mode, inp, impls, device, attn_bytes(c, elem, mode))
                extra = {"flops": attn_flops(c, mode)}
                rows += _timed_rows(cases, device, nsets, quick, None, c.label, dt, copy_gbps, log,
                                    [extra] * len(cases))
                del cases
                timing.free(device)
            del inp
            timing.free(device)
    return rows




def _load_unet(preset: str):
    """(UNet class, unfused) from fastdiff.nn, or raises Skip with the reason."""
    try:
        from fastdiff.nn import UNet
    except Exception as e:
        raise timing.Skip(f"skipped: fastdiff.nn.UNet is not importable ({type(e).__name__}: {str(e)[:120]})")
    try:
        from fastdiff.nn import unfused
    except Exception as e:
        raise timing.Skip(f"skipped: fastdiff.nn.unfused (the stock-layer variant) is not importable "
                      f"({type(e).__name__}: {str(e)[:120]})")
    return (lambda: UNet.from_preset(preset)), unfused


def _call_unfused(unfused: Callable, model):
    """``unfused(model)``, or ``unfused()`` for a global switch that takes no model."""
    try:
        params = inspect.signature(unfused).parameters.values()
        takes_model = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    except (TypeError, ValueError):  # no signature (a builtin): assume the documented unfused(model)
        takes_model = True
    return unfused(model) if takes_model else unfused()


def _stock(model, unfused):
    """(stock model, context to run it in): ``unfused`` may give a context
    manager (the same model computes with stock ops inside it) or return a
    model (applied to a copy, so ``model`` stays fused)."""
    probe = _call_unfused(unfused, copy.deepcopy(model))
    if hasattr(probe, "__enter__") and hasattr(probe, "__exit__"):
        return model, lambda: _call_unfused(unfused, model)
    if isinstance(probe, torch.nn.Module):
        return probe, nullcontext
    raise TypeError(f"fastdiff.nn.unfused returned {type(probe).__name__}: expected a context manager or a module")


def _model_input_shape(model, batch: int) -> tuple:
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    c = cfg.get("in_ch") or getattr(model, "in_ch", None) or getattr(model, "in_channels", None) or UNET_IMAGE[0]
    s = cfg.get("image_size") or getattr(model, "image_size", None) or getattr(model, "sample_size", None) \
        or UNET_IMAGE[1]
    s = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
    return (batch, int(c), *map(int, s))


def unet_steps(device: str, batch: int, dtype, preset: str = UNET_PRESET,
               model_factory: Optional[Callable[[], torch.nn.Module]] = None,
               unfused: Optional[Callable] = None) -> dict:
    """The two training steps of the U-Net benchmark, each ``step(i)`` (i:
    input set) = forward + MSE loss + backward + Adam step + zero_grad, one
    step already taken (the optimizer state exists). Returns {"fastdiff":
    step, "stock": step, "shape": input shape, "nsets": 2, "base_bytes":
    {impl: bytes of parameters + optimizer state + inputs}}. The model is
    ``model_factory()`` (default ``fastdiff.nn.UNet.from_preset(preset)``),
    the stock variant ``unfused`` (default ``fastdiff.nn.unfused``) applied to
    it; bf16/fp16 run under ``torch.autocast``. Raises ``Skip`` when
    fastdiff.nn is missing."""
    dtype = timing.parse_dtype(dtype)
    if model_factory is None:
        model_factory, unf = _load_unet(preset)
        unfused = unfused or unf
    elif unfused is None:
        unfused = _load_unet(preset)[1]
    torch.manual_seed(0)
    model = model_factory().to(device).train()
    stock_model, stock_ctx = _stock(model, unfused)
    shape = _model_input_shape(model, batch)
    gen = torch.Generator(device=device).manual_seed(0)
    nsets = 2
    xs = [torch.randn(shape, generator=gen, device=device) for _ in range(nsets)]
    noises = [torch.randn(shape, generator=gen, device=device) for _ in range(nsets)]
    ts = [torch.randint(0, timing.T_TRAIN, (shape[0],), generator=gen, device=device) for _ in range(nsets)]
    amp = dtype != torch.float32
    # one optimizer per model object: with a context-manager unfused both steps train the same parameters
    opts = {id(m): torch.optim.Adam(m.parameters(), lr=2e-4) for m in (model, stock_model)}

    def make_step(m, ctx):
        opt = opts[id(m)]

        def step(i):
            with ctx(), (torch.autocast(device, dtype=dtype) if amp else nullcontext()):
                out = m(xs[i], ts[i])
                if not isinstance(out, torch.Tensor):  # a diffusers-style output object or tuple
                    out = out.sample if hasattr(out, "sample") else out[0]
                loss = F.mse_loss(out.float(), noises[i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    out = {"shape": shape, "nsets": nsets, "base_bytes": {}}
    for impl, m, ctx in (("fastdiff", model, nullcontext), ("stock", stock_model, stock_ctx)):
        out[impl] = make_step(m, ctx)
        out[impl](0)
        opt = opts[id(m)]
        out["base_bytes"][impl] = timing.storage_bytes(list(m.parameters()) + [t for st in opt.state.values()
                                                                         for t in st.values()] + xs + noises + ts)
    return out


def unet_rows(device, batch: int, dtypes, quick, log, preset: str = UNET_PRESET,
              model_factory: Optional[Callable[[], torch.nn.Module]] = None,
              unfused: Optional[Callable] = None) -> list:
    """Time and peak memory of one training step, fused vs stock layers (see
    :func:`unet_steps`). The fastdiff row carries ``peak_mem_ratio_vs_stock``
    and ``step_mem_ratio_vs_stock`` (fastdiff / stock)."""
    rows = []
    for dt in [timing.parse_dtype(d) for d in dtypes]:
        label = timing.shape_str((batch, *UNET_IMAGE))

        def fail(why):
            log(f"  unet_step {label} {timing.DTYPE_NAMES.get(dt, dt)}: {why}")
            return [_row(timing.Case("unet_step", impl, None, 0, preset, note=why), label, dt, device, 0, None, None)
                    for impl in ("fastdiff", "stock")]

        try:
            st = unet_steps(device, batch, dt, preset, model_factory, unfused)
            label = timing.shape_str(st["shape"])
            mem = [timing.step_peak_memory(lambda: st[impl](1), device, st["base_bytes"][impl])
                   for impl in ("fastdiff", "stock")]
        except timing.Skip as e:
            rows += fail(str(e))
            continue
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            rows += fail(f"failed: {type(e).__name__}: {msg}")
            st = None
            timing.free(device)
            continue
        amp = dt != torch.float32
        cases = [timing.Case("unet_step", "fastdiff", st["fastdiff"], 0, preset,
                        note=_cpu_backend_note("group_norm_act", device)),
                 timing.Case("unet_step", "stock", st["stock"], 0, preset,
                        note="fastdiff.nn.unfused: stock PyTorch layers")]
        for m in mem:
            m["autocast"] = timing.DTYPE_NAMES.get(dt) if amp else None
        for k in ("peak_mem_bytes", "step_mem_bytes"):
            mem[0][k.replace("_bytes", "_ratio_vs_stock")] = mem[0][k] / mem[1][k] if mem[1][k] else None
        rows += _timed_rows(cases, device, st["nsets"], quick, None, label, dt, None, log, mem)
        rows[-2]["backend"] = _backend.current_backend("group_norm_act", device)
        log(f"  unet_step peak memory: fastdiff {mem[0]['peak_mem_bytes'] / 2**20:.0f} MiB, stock "
            f"{mem[1]['peak_mem_bytes'] / 2**20:.0f} MiB (above the start of the step: "
            f"{mem[0]['step_mem_bytes'] / 2**20:.0f} / {mem[1]['step_mem_bytes'] / 2**20:.0f} MiB)")
        del st, cases
        timing.free(device)
    return rows


# ----------------------------------------------------------------- run ------
def default_gn_shapes(device: str, quick: bool, full: bool, batch: Optional[int]) -> list:
    shapes = GN_SHAPES["quick"] if quick else GN_SHAPES[device + ("_full" if full else "")]
    return [(batch, *s[1:]) for s in shapes] if batch else list(shapes)


def default_attn_cases(device: str, quick: bool, full: bool, batch: Optional[int], shapes=None) -> list:
    if shapes:  # feature maps (N, C, *spatial): one-head self-attention over the positions
        cs = [AttnCase("self", s[0], 1, math.prod(s[2:]), math.prod(s[2:]), s[1]) for s in shapes]
    else:
        cs = ATTN_CASES["quick" if quick else ("cuda" if full else device)]
    if batch:
        cs = [AttnCase(c.kind, batch, c.H, c.Lq, c.Lk, c.D) for c in cs]
    return list(cs)


def run_blocks(device: str = "cpu", ops: Optional[Sequence[str]] = None, dtype="fp32", shapes=None,
               quick: bool = False, full: bool = False, compile: Optional[bool] = None,
               log: Optional[Callable[[str], None]] = None, copy_gbps: Optional[float] = None,
               batch: Optional[int] = None, compile_budget_s: Optional[float] = None,
               unet_preset: Optional[str] = None) -> list:
    """Rows of the block benchmarks ``ops`` (default: all of :data:`BLOCK_OPS`).
    ``shapes``: feature maps (N, C, H, W) for group_norm_act and for
    one-head self-attention (default: the DDPM CIFAR-10 shapes, smaller
    batches on CPU; ``full``: the GPU sizes on CPU too; ``quick``: tiny).
    ``batch`` replaces the batch of the default shapes and of the U-Net step
    (``unet_preset``: a :data:`fastdiff.nn.PRESETS` name; default
    ``ddpm-cifar10``, ``tiny`` with ``quick``)."""
    device = timing.resolve_device(device)
    log = log or (lambda msg: None)
    ops = list(BLOCK_OPS) if not ops else list(ops)
    for o in ops:
        if o not in BLOCK_OPS:
            raise ValueError(f"unknown block op {o!r}; block ops are {', '.join(BLOCK_OPS)}")
    dtypes = [timing.parse_dtype(d) for d in ([dtype] if isinstance(dtype, (str, torch.dtype)) else dtype)]
    shapes = [timing.parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes] if shapes else None
    if compile is None:
        compile = not quick
    why_off = "skipped: --no-compile" if not quick else "skipped in --quick (use --compile to time it)"
    budget = COMPILE_BUDGET_S[device] if compile_budget_s is None else compile_budget_s
    compiler = timing.Compiler(bool(compile), why_off, budget)
    if copy_gbps is None and ("group_norm_act" in ops or "attention" in ops):
        log(f"measuring the {device} copy bandwidth ...")
        copy_gbps = timing.copy_bandwidth(device, quick)
        log(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    rows = []
    if "group_norm_act" in ops:
        rows += group_norm_rows(device, shapes or default_gn_shapes(device, quick, full, batch), dtypes, quick,
                                compiler, copy_gbps, log)
    if "attention" in ops:
        rows += attention_rows(device, default_attn_cases(device, quick, full, batch, shapes), dtypes, quick,
                               copy_gbps, log)
    if "unet_step" in ops:
        nb = batch or UNET_BATCH["quick" if quick else ("cuda" if full else device)]
        preset = unet_preset or (UNET_QUICK_PRESET if quick else UNET_PRESET)
        rows += unet_rows(device, nb, dtypes, quick, log, preset)
    for r in rows:
        r.setdefault("copy_gbps", copy_gbps)
        if r.get("copy_gbps") is None:
            r["copy_gbps"] = copy_gbps
    return rows
