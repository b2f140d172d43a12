"""The fused multistep-sampler step in Triton (fastdiff::multistep_step).

The maths is fastdiff/reference/multistep.py. Every program reads the step
index and its coefficient row on the device (16 float64 scalars, cached), so
nothing is read on the host and the call is CUDA-graph capturable. Terms whose
coefficient is exactly 0 are skipped by a run-time branch on the scalar (no
memory traffic for them). A row that cannot be applied (index outside the
table, a non-finite coefficient, a history age beyond K, u_last without
last_sample, a_z without noise, push not 0/1) writes NaN outputs and leaves
history / last_sample untouched; no out-of-bounds address is ever formed.

Advancing step_index: every program reads it, so no program of the main
kernel may write it (a program that finished early would change the row of
programs not yet started). It is incremented by a second one-program launch
queued behind the main one on the same stream: stream order guarantees all
reads are done, it needs no zero-initialised ticket counter (a last-block
ticket would need one per concurrent stream), and inside a CUDA graph the
extra node costs well under a microsecond.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _common as C
from ..ops._guidance import check_op_args
from ._philox import normal4
from ..ops import _multistep_common as msc

_NO_NOISE, _NOISE_TENSOR, _NOISE_KEY = 0, 1, 2


@triton.jit
def _step_normals(key_ptr, i, start, BLOCK: tl.constexpr):
    """Stream elements start .. start+BLOCK-1 of the key [seed, offset + i]."""
    seed = tl.load(key_ptr)
    off = tl.load(key_ptr + 1) + i  # int64 wrap-around, as the C++ kernels' uint64
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    o_lo = off.to(tl.uint32)
    o_hi = (off >> 32).to(tl.uint32)
    g = start.to(tl.int64) // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    z0, z1, z2, z3 = normal4(g, k0, k1, o_lo, o_hi)
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))  # lane l of group g lands at 4g + l (see _philox)
    return tl.reshape(z, [BLOCK])


@triton.jit
def _finite(v):
    return (v == v) & (v != float("inf")) & (v != float("-inf"))


@triton.jit(do_not_specialize=["clip_bits", "hstride", "gw_bits"])
def _multistep_kernel(mo_ptr, x_ptr, hist_ptr, last_ptr, coef_ptr, idx_ptr, noise_ptr, key_ptr, thresh_ptr,
                      prev_ptr, x0_ptr, u_ptr, gf_ptr, M, chunks, n_rows, hstride, clip_bits, gw_bits,
                      K: tl.constexpr, KEPT: tl.constexpr, NOISE: tl.constexpr, HAS_THRESH: tl.constexpr,
                      CLIP: tl.constexpr, RET_X0: tl.constexpr, GUIDED: tl.constexpr, HAS_GF: tl.constexpr,
                      ACC: tl.constexpr,
                      BLOCK: tl.constexpr, ALIGNED: tl.constexpr, I64: tl.constexpr):
    n, start, offs, mask = C.tile_of(tl.program_id(0), chunks, M, BLOCK, ALIGNED, I64)
    i = tl.load(idx_ptr)
    in_range = (i >= 0) & (i < n_rows)
    row = coef_ptr + tl.where(in_range, i, 0) * 16
    c_x = tl.load(row + 0)
    c_m = tl.load(row + 1)
    u_on = tl.load(row + 2)
    u_last = tl.load(row + 3)
    u_x0 = tl.load(row + 4)
    u_h1 = tl.load(row + 5)
    u_h2 = tl.load(row + 6)
    u_h3 = tl.load(row + 7)
    a_x = tl.load(row + 8)
    a_m = tl.load(row + 9)
    a_x0 = tl.load(row + 10)
    a_h1 = tl.load(row + 11)
    a_h2 = tl.load(row + 12)
    a_h3 = tl.load(row + 13)
    a_z = tl.load(row + 14)
    push = tl.load(row + 15)
    ok = in_range & _finite(c_x) & _finite(c_m) & _finite(u_on) & _finite(u_last) & _finite(u_x0)
    ok = ok & _finite(u_h1) & _finite(u_h2) & _finite(u_h3) & _finite(a_x) & _finite(a_m) & _finite(a_x0)
    ok = ok & _finite(a_h1) & _finite(a_h2) & _finite(a_h3) & _finite(a_z) & ((push == 0.0) | (push == 1.0))
    if K < 1:
        ok = ok & (u_h1 == 0.0) & (a_h1 == 0.0)
    if K < 2:
        ok = ok & (u_h2 == 0.0) & (a_h2 == 0.0)
    if K < 3:
        ok = ok & (u_h3 == 0.0) & (a_h3 == 0.0)
    if not KEPT:
        ok = ok & ((u_on == 0.0) | (u_last == 0.0))
    if NOISE == 0:
        ok = ok & (a_z == 0.0)
    ic = tl.where(in_range, i, 0)
    clip = C.f64_from_bits(clip_bits).to(ACC)
    if HAS_THRESH:
        s = tl.load(thresh_ptr + n).to(ACC)
    else:
        s = clip  # unused

    # the model output (read once); with classifier-free guidance f * (c + (w - 1)(c - u))
    zero = tl.zeros([BLOCK], dtype=ACC)
    mo = zero
    if (c_m != 0.0) | (a_m != 0.0):
        mo = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(ACC)
        if GUIDED:
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
            mo = mo + C.f64_from_bits(gw_bits).to(ACC) * (mo - u)
            if HAS_GF:
                mo = mo * tl.load(gf_ptr + n).to(ACC)
    # x0 = c_x * sample + c_m * model_output, then threshold / clip
    x0 = zero
    if c_x != 0.0:
        x0 = x0 + c_x.to(ACC) * tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if c_m != 0.0:
        x0 = x0 + c_m.to(ACC) * mo
    x0 = C.clip_x0(x0, clip, s, HAS_THRESH, CLIP)
    # H[j] = history[(i - j) mod K]
    h1 = hist_ptr
    h2 = hist_ptr
    h3 = hist_ptr
    if K >= 1:
        h1 = hist_ptr + ((ic - 1) % K + K) % K * hstride
    if K >= 2:
        h2 = hist_ptr + ((ic - 2) % K + K) % K * hstride
    if K >= 3:
        h3 = hist_ptr + ((ic - 3) % K + K) % K * hstride
    # xc
    xc = zero
    if u_on != 0.0:
        if KEPT:
            if u_last != 0.0:
                xc = xc + u_last.to(ACC) * tl.load(last_ptr + offs, mask=mask, other=0.0).to(ACC)
        if u_x0 != 0.0:
            xc = xc + u_x0.to(ACC) * x0
        if K >= 1:
            if u_h1 != 0.0:
                xc = xc + u_h1.to(ACC) * tl.load(h1 + offs, mask=mask, other=0.0).to(ACC)
        if K >= 2:
            if u_h2 != 0.0:
                xc = xc + u_h2.to(ACC) * tl.load(h2 + offs, mask=mask, other=0.0).to(ACC)
        if K >= 3:
            if u_h3 != 0.0:
                xc = xc + u_h3.to(ACC) * tl.load(h3 + offs, mask=mask, other=0.0).to(ACC)
    else:
        need = a_x != 0.0
        if KEPT:
            need = need | (push != 0.0)
        if need:
            xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    # prev
    r = zero
    if a_x != 0.0:
        r = r + a_x.to(ACC) * xc
    if a_m != 0.0:
        r = r + a_m.to(ACC) * mo
    if a_x0 != 0.0:
        r = r + a_x0.to(ACC) * x0
    if K >= 1:
        if a_h1 != 0.0:
            r = r + a_h1.to(ACC) * tl.load(h1 + offs, mask=mask, other=0.0).to(ACC)
    if K >= 2:
        if a_h2 != 0.0:
            r = r + a_h2.to(ACC) * tl.load(h2 + offs, mask=mask, other=0.0).to(ACC)
    if K >= 3:
        if a_h3 != 0.0:
            r = r + a_h3.to(ACC) * tl.load(h3 + offs, mask=mask, other=0.0).to(ACC)
    if NOISE != 0:
        if a_z != 0.0:
            if NOISE == 2:
                z = _step_normals(key_ptr, ic, start, BLOCK).to(ACC)
            else:
                z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
            r = r + a_z.to(ACC) * z
    nan = float("nan")
    tl.store(prev_ptr + offs, tl.where(ok, r, nan).to(prev_ptr.dtype.element_ty), mask=mask)
    if RET_X0:
        tl.store(x0_ptr + offs, tl.where(ok, x0, nan).to(x0_ptr.dtype.element_ty), mask=mask)
    # pushes, after every read of these elements (same program, same offsets)
    if ok & (push != 0.0):
        if K >= 1:
            tl.store(hist_ptr + (ic % K) * hstride + offs, x0.to(hist_ptr.dtype.element_ty), mask=mask)
        if KEPT:
            tl.store(last_ptr + offs, xc.to(last_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _advance_kernel(idx_ptr):
    tl.store(idx_ptr, tl.load(idx_ptr) + 1)


def _guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def multistep_step(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh, clip_range,
                   return_x0, uncond_output=None, guidance_scale=1.0, guidance_factor=None):
    """Schema ``multistep_step(model_output, sample, history!, last_sample!, coeffs, step_index!, noise?, key?,
    thresh?, clip_range, return_x0) -> (prev_sample, x0 or empty)``."""
    msc.check(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh, clip_range,
              exc=RuntimeError)
    layout = msc.working_layout(sample, history, last_sample)
    x = msc.in_layout(sample, layout)
    mo = msc.in_layout(model_output, layout)
    check_op_args(model_output, uncond_output, guidance_scale, guidance_factor)
    u = msc.in_layout(uncond_output, layout) if uncond_output is not None else None
    gf = guidance_factor.contiguous() if (u is not None and guidance_factor is not None) else None
    nz = msc.in_layout(noise, layout) if noise is not None else None
    K, kept = history.shape[0], last_sample.numel() > 0
    prev = msc.empty_working(layout, sample.dtype)
    x0 = msc.empty_working(layout, sample.dtype) if return_x0 else sample.new_empty(0)
    cf = coeffs.contiguous()
    with _guard(sample.device):
        if x.numel() > 0:
            tiling = C.tiling("step", x.size(0), x.numel() // x.size(0))  # numel > 0: N > 0
            meta = dict(tiling.meta)
            meta["I64"] = tiling.i64 or (K + 1) * x.numel() + 2 * tiling.block > C.I64_THRESHOLD
            mode = _NOISE_KEY if key is not None else (_NOISE_TENSOR if nz is not None else _NO_NOISE)
            _multistep_kernel[tiling.grid](
                mo, x, history if K > 0 else x, last_sample if kept else x, cf, step_index,
                nz if nz is not None else x, key if key is not None else step_index,
                thresh if thresh is not None else cf, prev, x0 if return_x0 else prev,
                u if u is not None else x, gf if gf is not None else cf,
                tiling.M, tiling.chunks, cf.size(0), history.stride(0) if K > 0 else 0, C.f64_bits(clip_range),
                C.f64_bits(float(guidance_scale) - 1.0),
                K=K, KEPT=kept, NOISE=mode, HAS_THRESH=thresh is not None, CLIP=float(clip_range) > 0.0,
                RET_X0=bool(return_x0), GUIDED=u is not None, HAS_GF=gf is not None, ACC=C.acc_dtype(x.dtype),
                **meta)
        _advance_kernel[(1,)](step_index)
    return prev, x0
