"""GroupNorm(+add, +scale/shift, +SiLU) forward and backward in Triton.

Maths: fastdiff/reference/blocks.py. Layout: fastdiff/ops/_layout.py (x is
read NCHW-contiguous or channels-last in place, anything else is made
contiguous; y and dx take the layout that was read).

Programs. One program per (sample n, group g), grid ``(N * G,)``. A group is
D = C / G channels x S spatial positions, addressed as
``base + d * sC + s * sS`` with (sC, sS) = (S, 1) for NCHW and (1, C) for
channels-last. It is walked in 2-D tiles whose last (fastest) axis is the
contiguous one: [BLOCK_D, BLOCK_S] for NCHW, [BLOCK_S, BLOCK_D] for
channels-last, so loads vectorise along s (NCHW) or along the D adjacent
channels (NHWC) and per-channel sums are one tl.sum over the spatial axis.

Statistics are taken of d = (x - K) + add around a shift K near the mean
(the group's rough mean, or its first tile's mean): x - K is exact when
|mean| >> std, and mean = K + mean(d) keeps the low bits a plain fp32 mean
loses, so y stays accurate to its own rounding for inputs offset by 1e3.

* SINGLE (the whole padded group fits one tile): load once; K, mean(d) and
  the sum of squared deviations are three reductions of the registers; then
  normalise and store: x is read from DRAM once.
* looping (large groups): pass 1 walks the tiles and merges each tile's exact
  (count, mean, M2) of d into the running ones (Chan et al.): no
  E[x^2] - E[x]^2 cancellation however many tiles; pass 2 re-reads the group
  and writes y.

* split (few large groups: N * G programs would leave SMs idle, e.g. a VAE
  decode at 1x128x512x512 with 32 groups): each group's positions are cut
  into chunks, grid ``(N * G, chunks)``. Pass 1 (_gn_split_stats_kernel)
  writes each chunk's (K, mean(d), M2(d)) as the looping pass 1 does, with K
  the group's first-tile mean computed identically by every chunk; a combine
  in torch on the device (Chan et al., no host sync) gives mean/rstd; pass 2
  (_gn_split_apply_kernel) writes y of its chunk as the looping pass 2 does.
  ``split_plan`` chooses (SMs from the device; CPU_SMS off the GPU); the
  launcher's ``split=`` forces it (tests). The backward splits the same way:
  per-chunk per-channel A, B (_gn_split_bwd_sums_kernel), their sums, s1, s2
  and the A/B-only gradients in torch, then dx and per-chunk d add partials
  (_gn_split_bwd_dx_kernel), summed in torch (fixed order: deterministic).

Backward, per (n, g): pass 1 recomputes xhat, z and silu'(z), and reduces the
per-channel A = sum_s dz, B = sum_s dz xhat, which give the group's
s1 = mean(g dz) and s2 = mean(g dz xhat) (g = weight (1 + scale)); pass 2
writes dx = rstd (g dz - s1 - xhat s2) and d add[n, c] = sum_s dx (reduced in
registers while dx is stored). d shift = A and d scale = w B + b A are written
per (n, c); d weight / d bias are the sums over n of (1 + scale) B / (1 + scale) A,
written per (n, c) and reduced with a torch ``sum(0)`` (deterministic, no atomics).
With SINGLE, both passes work on the one tile held in registers.

Nothing here synchronises with the host: the launch geometry depends on shapes only.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as CM
from ..ops import _kernel_checks as KC
from ..ops._layout import gn_channels_last, gn_empty_like, gn_stat_dtype

Tensor = torch.Tensor

# ---------------------------------------------------------------- config ---
# Elements of the one tile holding a whole group (SINGLE path), and of the
# tiles of the looping path, per kernel; float64 halves both (twice the
# registers per element). Warps: the forward gives each thread ~16 elements
# of a tile, the backward (x, dy, xhat, dz live) ~8. UNTUNED on a GPU: chosen
# so that ptxas (sm_90) reports <= 128 registers and no spills for fp32/bf16
# (float64 fits without spills except a few bytes in the looping backward);
# retune these on a GPU.
SINGLE_MAX = {"fwd": 8192, "bwd": 4096}
LOOP_TILE = {"fwd": 2048, "bwd": 2048}
ELEMS_PER_THREAD = {"fwd": 16, "bwd": 8}


class _Geometry:
    """Tile shape of a call: BLOCK_D x BLOCK_S (powers of two), whether one
    tile holds the whole group (single), and the warps. ``block`` (tests)
    overrides both tile budgets."""

    def __init__(self, kind: str, D: int, S: int, channels_last: bool, f64: bool, block: Optional[int],
                 loop: bool = False):
        single_max, loop_tile = (block, block) if block else (SINGLE_MAX[kind], LOOP_TILE[kind])
        if f64 and not block:
            single_max, loop_tile = single_max // 2, loop_tile // 2
        # the contiguous extent gets its full power of two first, the other axis what is left
        ext_c, ext_o = (D, S) if channels_last else (S, D)
        pc, po = triton.next_power_of_2(ext_c), triton.next_power_of_2(ext_o)
        self.single = pc * po <= single_max and not loop  # loop: looping-path tiles (the split kernels)
        if self.single:
            bc, bo = pc, po
        else:
            bc = min(pc, loop_tile)
            bo = min(po, max(1, loop_tile // bc))
        self.block_d, self.block_s = (bc, bo) if channels_last else (bo, bc)
        self.num_warps = max(1, min(16, bc * bo // (32 * ELEMS_PER_THREAD[kind])))


# ---------------------------------------------------------------- device ---
@triton.jit
def _tile(d0, s0, D, S, C, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CL: tl.constexpr, I64: tl.constexpr):
    """(d, offs, mask) of the tile at channel d0, position s0 of a group: d the
    [BLOCK_D] channel indices within the group, offs the element offsets from
    the group's base, mask the elements inside the group."""
    d = d0 + tl.arange(0, BLOCK_D)
    s = s0 + tl.arange(0, BLOCK_S)
    if I64:
        d = d.to(tl.int64)
        s = s.to(tl.int64)
    if CL:  # [BLOCK_S, BLOCK_D], channels contiguous
        offs = s[:, None] * C + d[None, :]
        mask = (s[:, None] < S) & (d[None, :] < D)
    else:  # [BLOCK_D, BLOCK_S], positions contiguous
        offs = d[:, None] * S + s[None, :]
        mask = (d[:, None] < D) & (s[None, :] < S)
    return d, offs, mask


@triton.jit
def _cvec(v, CL: tl.constexpr):
    """A per-channel [BLOCK_D] vector broadcast against a tile."""
    if CL:
        r = v[None, :]
    else:
        r = v[:, None]
    return r


@triton.jit
def _ssum(t, CL: tl.constexpr):
    """Per-channel sums over the spatial axis of a tile -> [BLOCK_D]."""
    if CL:
        r = tl.sum(t, axis=0)
    else:
        r = tl.sum(t, axis=1)
    return r


@triton.jit
def _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, nc, dmask,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SC: tl.constexpr,
            HAS_SH: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (add, w, b, 1 + scale, shift) of channels c (global index),
    nc = n * C + c; absent inputs give their neutral values."""
    one = tl.full(c.shape, 1.0, ACC)
    zero = tl.zeros(c.shape, ACC)
    add = tl.load(add_ptr + nc, mask=dmask, other=0.0).to(ACC) if HAS_ADD else zero
    w = tl.load(w_ptr + c, mask=dmask, other=0.0).to(ACC) if HAS_W else one
    b = tl.load(b_ptr + c, mask=dmask, other=0.0).to(ACC) if HAS_B else zero
    sc1 = 1.0 + tl.load(sc_ptr + nc, mask=dmask, other=0.0).to(ACC) if HAS_SC else one
    sh = tl.load(sh_ptr + nc, mask=dmask, other=0.0).to(ACC) if HAS_SH else zero
    return add, w, b, sc1, sh


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _group_base(pid, C, S, G, D, CL: tl.constexpr):
    """(n, g, element offset of group (n, g)) of program pid, the offset in int64."""
    n = pid // G
    g = pid - n * G
    if CL:
        base = n.to(tl.int64) * C * S + g.to(tl.int64) * D
    else:
        base = n.to(tl.int64) * C * S + g.to(tl.int64) * D * S
    return n, g, base


# Per-tile bodies shared by the one-program kernels (a whole group per
# program) and the split kernels (a chunk of positions [s_lo, s_hi) per
# program): each loops over the group's channel tiles and the given positions.
@triton.jit
def _shift(xg, add_ptr, n, g, C, S, D, HAS_ADD: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """K, the mean of h = x + add over the group's first tile: the shift the
    statistics are taken around (the same in every program of a group)."""
    d, offs, mask = _tile(0, 0, D, S, C, BLOCK_D, BLOCK_S, CL, I64)
    c = g * D + d
    add = _params(add_ptr, add_ptr, add_ptr, add_ptr, add_ptr, c, n * C + c, d < D,
                  False, False, HAS_ADD, False, False, ACC)[0]
    x = tl.load(xg + offs, mask=mask, other=0.0).to(ACC)
    k = (tl.zeros([], ACC) + tl.minimum(D, BLOCK_D)) * tl.minimum(S, BLOCK_S)
    return tl.sum(tl.sum(tl.where(mask, x + _cvec(add, CL), 0.0), axis=1), axis=0) / k


@triton.jit
def _centred_stats(xg, add_ptr, n, g, C, S, D, K, s_lo, s_hi, HAS_ADD: tl.constexpr, CL: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """(mean, M2) of d = (x - K) + add over positions [s_lo, s_hi): per tile
    an exact (count, mean, M2) in registers, merged into the running ones
    (Chan et al.), so there is no cancellation however many tiles."""
    k = tl.zeros([], ACC)
    md = tl.zeros([], ACC)
    m2 = tl.zeros([], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        c = g * D + d
        add = _params(add_ptr, add_ptr, add_ptr, add_ptr, add_ptr, c, n * C + c, d < D,
                      False, False, HAS_ADD, False, False, ACC)[0]
        add_c = _cvec(add, CL)
        nd = tl.minimum(D - d0, BLOCK_D)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            d_t, offs, mask = _tile(d0, s0, D, S, C, BLOCK_D, BLOCK_S, CL, I64)
            x = tl.load(xg + offs, mask=mask, other=0.0).to(ACC)
            dd = tl.where(mask, (x - K) + add_c, 0.0)
            kb = (tl.zeros([], ACC) + nd) * tl.minimum(S - s0, BLOCK_S)
            mb = tl.sum(tl.sum(dd, axis=1), axis=0) / kb
            db = tl.where(mask, dd - mb, 0.0)
            m2b = tl.sum(tl.sum(db * db, axis=1), axis=0)
            kn = k + kb
            delta = mb - md
            md += delta * (kb / kn)
            m2 += m2b + delta * delta * (k * kb / kn)
            k = kn
    return md, m2


@triton.jit
def _apply(xg, yg, K, md, rstd, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, n, g, C, S, D, s_lo, s_hi,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SC: tl.constexpr,
           HAS_SH: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """y over positions [s_lo, s_hi) from the group's (K, mean(d), rstd)."""
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        c = g * D + d
        add, w, b, sc1, sh = _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, n * C + c, d < D,
                                     HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, ACC)
        addm_c = _cvec(add - md, CL)  # (x - K) + (add - md) = h - mean, large parts cancelled first
        a_c = _cvec(rstd * w * sc1, CL)
        b_c = _cvec(b * sc1 + sh, CL)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            d_t, offs, mask = _tile(d0, s0, D, S, C, BLOCK_D, BLOCK_S, CL, I64)
            x = tl.load(xg + offs, mask=mask, other=0.0).to(ACC)
            z = ((x - K) + addm_c) * a_c + b_c
            if SILU:
                z = z * _sigmoid(z)
            tl.store(yg + offs, z.to(yg.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["eps_bits"])  # a float's bit pattern: no specialisation on its value
def _gn_fwd_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr,
                   C, S, G, D, eps_bits,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SC: tl.constexpr,
                   HAS_SH: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    n, g, base = _group_base(pid, C, S, G, D, CL)
    xg = x_ptr + base
    yg = y_ptr + base
    eps = CM.f64_from_bits(eps_bits).to(ACC)
    cnt = (tl.zeros([], ACC) + D) * S  # D or S may be specialised to a constexpr 1
    # statistics of d = (x - K) + add around a shift K near the mean (module docstring)
    if SINGLE:
        d, offs, mask = _tile(0, 0, D, S, C, BLOCK_D, BLOCK_S, CL, I64)
        dm = d < D
        c = g * D + d
        add, w, b, sc1, sh = _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, n * C + c, dm,
                                     HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, ACC)
        x = tl.load(xg + offs, mask=mask, other=0.0).to(ACC)
        add_c = _cvec(add, CL)
        K = tl.sum(tl.sum(tl.where(mask, x + add_c, 0.0), axis=1), axis=0) / cnt
        dd = tl.where(mask, (x - K) + add_c, 0.0)
        md = tl.sum(tl.sum(dd, axis=1), axis=0) / cnt
        dev = tl.where(mask, dd - md, 0.0)  # two-pass: no E[x^2] - E[x]^2 cancellation
        var = tl.sum(tl.sum(dev * dev, axis=1), axis=0) / cnt
        mean = K + md
        rstd = 1.0 / CM.sqrt_acc(var + eps)
        z = dev * _cvec(rstd * w * sc1, CL) + _cvec(b * sc1 + sh, CL)
        if SILU:
            z = z * _sigmoid(z)
        tl.store(yg + offs, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1 over the whole group (the first tile, read for K, is cache-hot), pass 2 re-reads x
        K = _shift(xg, add_ptr, n, g, C, S, D, HAS_ADD, CL, ACC, BLOCK_D, BLOCK_S, I64)
        md, m2 = _centred_stats(xg, add_ptr, n, g, C, S, D, K, 0, S, HAS_ADD, CL, ACC, BLOCK_D, BLOCK_S, I64)
        mean = K + md
        rstd = 1.0 / CM.sqrt_acc(m2 / cnt + eps)
        _apply(xg, yg, K, md, rstd, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, n, g, C, S, D, 0, S,
               HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, SILU, CL, ACC, BLOCK_D, BLOCK_S, I64)
    tl.store(mean_ptr + pid, mean.to(mean_ptr.dtype.element_ty))
    tl.store(rstd_ptr + pid, rstd.to(rstd_ptr.dtype.element_ty))


# ------------------------------------------------- split forward (stats, combine, apply) ---
@triton.jit
def _gn_split_stats_kernel(x_ptr, add_ptr, part_ptr, C, S, G, D, CS, SPLIT,
                           HAS_ADD: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """Pass 1 of the split forward: program (group pid, chunk j) reduces the
    positions [j CS, min(S, (j + 1) CS)) of all the group's channels to
    (K, mean(d), M2(d)) of d = (x - K) + add, written to part[pid, j, 0:3].
    K is the mean of the group's first tile, the same in every chunk (each
    program computes it: one cache-hot tile), so the chunks' (count, mean, M2)
    combine exactly (Chan et al.) without re-centring large means."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    n, g, base = _group_base(pid, C, S, G, D, CL)
    xg = x_ptr + base
    K = _shift(xg, add_ptr, n, g, C, S, D, HAS_ADD, CL, ACC, BLOCK_D, BLOCK_S, I64)
    s_lo = j * CS
    s_hi = tl.minimum(S, s_lo + CS)  # CS is a multiple of BLOCK_S: tiles never cross into the next chunk
    md, m2 = _centred_stats(xg, add_ptr, n, g, C, S, D, K, s_lo, s_hi, HAS_ADD, CL, ACC, BLOCK_D, BLOCK_S, I64)
    o = (pid * SPLIT + j) * 3
    tl.store(part_ptr + o, K)
    tl.store(part_ptr + o + 1, md)
    tl.store(part_ptr + o + 2, m2)


@triton.jit
def _gn_split_apply_kernel(x_ptr, y_ptr, k_ptr, md_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr,
                           C, S, G, D, CS,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SC: tl.constexpr,
                           HAS_SH: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """Pass 3 of the split forward: program (group pid, chunk j) writes y of
    its chunk from the combined (K, mean(d), rstd), as pass 2 of the looping
    kernel does."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    n, g, base = _group_base(pid, C, S, G, D, CL)
    K = tl.load(k_ptr + pid).to(ACC)
    md = tl.load(md_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    s_lo = j * CS
    _apply(x_ptr + base, y_ptr + base, K, md, rstd, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, n, g, C, S, D,
           s_lo, tl.minimum(S, s_lo + CS), HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, SILU, CL, ACC,
           BLOCK_D, BLOCK_S, I64)


@triton.jit
def _bwd_tile(dyg, xg, offs, mask, mean, add_c, rstd, gz_c, beta_c, SILU: tl.constexpr, CL: tl.constexpr,
              ACC: tl.constexpr):
    """(xhat, dz) of a tile, zero outside the group: xhat recomputed from x and
    the saved statistics, dz = dy silu'(z)."""
    x = tl.load(xg + offs, mask=mask, other=0.0).to(ACC)
    xhat = tl.where(mask, ((x - mean) + add_c) * rstd, 0.0)
    dz = tl.load(dyg + offs, mask=mask, other=0.0).to(ACC)
    if SILU:
        z = xhat * gz_c + beta_c
        sg = _sigmoid(z)
        dz = tl.where(mask, dz * (sg * (1.0 + z * (1.0 - sg))), 0.0)
    return xhat, dz


@triton.jit
def _bwd_store_vecs(A, B, w, b, sc1, nc, dm, dsc_ptr, dsh_ptr, wa_ptr, wb_ptr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SC: tl.constexpr, HAS_SH: tl.constexpr):
    """The per-(n, c) gradients that need only A and B."""
    if HAS_SH:
        tl.store(dsh_ptr + nc, A.to(dsh_ptr.dtype.element_ty), mask=dm)
    if HAS_SC:
        tl.store(dsc_ptr + nc, (w * B + b * A).to(dsc_ptr.dtype.element_ty), mask=dm)
    if HAS_B:
        tl.store(wa_ptr + nc, (sc1 * A).to(wa_ptr.dtype.element_ty), mask=dm)
    if HAS_W:
        tl.store(wb_ptr + nc, (sc1 * B).to(wb_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _bwd_sums(dyg, xg, mean, rstd, add_c, gz_c, beta_c, d0, s_lo, s_hi, C, S, D,
              SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """Per-channel A = sum dz and B = sum dz xhat of the channel tile at d0
    over positions [s_lo, s_hi)."""
    A = tl.zeros([BLOCK_D], ACC)
    B = tl.zeros([BLOCK_D], ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        d_t, offs, mask = _tile(d0, s0, D, S, C, BLOCK_D, BLOCK_S, CL, I64)
        xhat, dz = _bwd_tile(dyg, xg, offs, mask, mean, add_c, rstd, gz_c, beta_c, SILU, CL, ACC)
        A += _ssum(dz, CL)
        B += _ssum(dz * xhat, CL)
    return A, B


@triton.jit
def _bwd_dx(dyg, xg, dxg, mean, rstd, s1, s2, add_c, gz_c, beta_c, d0, s_lo, s_hi, C, S, D,
            HAS_ADD: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """dx of the channel tile at d0 over positions [s_lo, s_hi); returns its
    per-channel sums (d add) when HAS_ADD."""
    dsum = tl.zeros([BLOCK_D], ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        d_t, offs, mask = _tile(d0, s0, D, S, C, BLOCK_D, BLOCK_S, CL, I64)
        xhat, dz = _bwd_tile(dyg, xg, offs, mask, mean, add_c, rstd, gz_c, beta_c, SILU, CL, ACC)
        dx = rstd * (dz * gz_c - s1 - xhat * s2)
        tl.store(dxg + offs, dx.to(dxg.dtype.element_ty), mask=mask)
        if HAS_ADD:
            dsum += _ssum(tl.where(mask, dx, 0.0), CL)
    return dsum


@triton.jit
def _gn_split_bwd_sums_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, ab_ptr,
                              C, S, G, D, CS, SPLIT,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SC: tl.constexpr,
                              HAS_SH: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """Pass 1 of the split backward: program (group pid, chunk j) writes its
    chunk's per-channel A = sum dz, B = sum dz xhat to ab[pid, j, 0:2, :]."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    n, g, base = _group_base(pid, C, S, G, D, CL)
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    s_lo = j * CS
    s_hi = tl.minimum(S, s_lo + CS)
    o = (pid * SPLIT + j) * 2 * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        c = g * D + d
        add, w, b, sc1, sh = _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, n * C + c, dm,
                                     HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, ACC)
        A, B = _bwd_sums(dy_ptr + base, x_ptr + base, mean, rstd, _cvec(add, CL), _cvec(w * sc1, CL),
                         _cvec(b * sc1 + sh, CL), d0, s_lo, s_hi, C, S, D, SILU, CL, ACC, BLOCK_D, BLOCK_S, I64)
        tl.store(ab_ptr + o + d, A, mask=dm)
        tl.store(ab_ptr + o + D + d, B, mask=dm)


@triton.jit
def _gn_split_bwd_dx_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, s1_ptr, s2_ptr, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr,
                            dx_ptr, dpart_ptr, C, S, G, D, CS, SPLIT,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SC: tl.constexpr,
                            HAS_SH: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, I64: tl.constexpr):
    """Pass 2 of the split backward: dx of the chunk from the combined s1, s2,
    and (with add) the chunk's per-channel sums of dx to dpart[pid, j, :]."""
    pid = tl.program_id(0)
    j = tl.program_id(1)
    n, g, base = _group_base(pid, C, S, G, D, CL)
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    s1 = tl.load(s1_ptr + pid).to(ACC)
    s2 = tl.load(s2_ptr + pid).to(ACC)
    s_lo = j * CS
    s_hi = tl.minimum(S, s_lo + CS)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        c = g * D + d
        add, w, b, sc1, sh = _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, n * C + c, dm,
                                     HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, ACC)
        dsum = _bwd_dx(dy_ptr + base, x_ptr + base, dx_ptr + base, mean, rstd, s1, s2, _cvec(add, CL),
                       _cvec(w * sc1, CL), _cvec(b * sc1 + sh, CL), d0, s_lo, s_hi, C, S, D,
                       HAS_ADD, SILU, CL, ACC, BLOCK_D, BLOCK_S, I64)
        if HAS_ADD:
            tl.store(dpart_ptr + (pid * SPLIT + j) * D + d, dsum, mask=dm)


@triton.jit
def _gn_bwd_kernel(dy_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr,
                   dx_ptr, dadd_ptr, dsc_ptr, dsh_ptr, wa_ptr, wb_ptr,
                   C, S, G, D,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SC: tl.constexpr,
                   HAS_SH: tl.constexpr, SILU: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    n, g, base = _group_base(pid, C, S, G, D, CL)
    xg = x_ptr + base
    dyg = dy_ptr + base
    dxg = dx_ptr + base
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    cnt = (tl.zeros([], ACC) + D) * S  # D or S may be specialised to a constexpr 1
    if SINGLE:
        d, offs, mask = _tile(0, 0, D, S, C, BLOCK_D, BLOCK_S, CL, I64)
        dm = d < D
        c = g * D + d
        nc = n * C + c
        add, w, b, sc1, sh = _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, nc, dm,
                                     HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, ACC)
        gz = w * sc1  # d xhat = gz dz
        xhat, dz = _bwd_tile(dyg, xg, offs, mask, mean, _cvec(add, CL), rstd, _cvec(gz, CL),
                             _cvec(b * sc1 + sh, CL), SILU, CL, ACC)
        A = _ssum(dz, CL)
        B = _ssum(dz * xhat, CL)
        s1 = tl.sum(gz * A, axis=0) / cnt
        s2 = tl.sum(gz * B, axis=0) / cnt
        dx = rstd * (dz * _cvec(gz, CL) - s1 - xhat * s2)
        tl.store(dxg + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_ADD:
            tl.store(dadd_ptr + nc, _ssum(tl.where(mask, dx, 0.0), CL).to(dadd_ptr.dtype.element_ty), mask=dm)
        _bwd_store_vecs(A, B, w, b, sc1, nc, dm, dsc_ptr, dsh_ptr, wa_ptr, wb_ptr, HAS_W, HAS_B, HAS_SC, HAS_SH)
    else:
        # pass 1: per-channel A, B -> s1, s2 (and the A/B-only gradients)
        s1 = tl.zeros([], ACC)
        s2 = tl.zeros([], ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            c = g * D + d
            nc = n * C + c
            add, w, b, sc1, sh = _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, nc, dm,
                                         HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, ACC)
            gz = w * sc1
            A, B = _bwd_sums(dyg, xg, mean, rstd, _cvec(add, CL), _cvec(gz, CL), _cvec(b * sc1 + sh, CL),
                             d0, 0, S, C, S, D, SILU, CL, ACC, BLOCK_D, BLOCK_S, I64)
            s1 += tl.sum(gz * A, axis=0)
            s2 += tl.sum(gz * B, axis=0)
            _bwd_store_vecs(A, B, w, b, sc1, nc, dm, dsc_ptr, dsh_ptr, wa_ptr, wb_ptr,
                            HAS_W, HAS_B, HAS_SC, HAS_SH)
        s1 = s1 / cnt
        s2 = s2 / cnt
        # pass 2: dx, and d add = sum_s dx reduced on the way
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            c = g * D + d
            nc = n * C + c
            add, w, b, sc1, sh = _params(w_ptr, b_ptr, add_ptr, sc_ptr, sh_ptr, c, nc, dm,
                                         HAS_W, HAS_B, HAS_ADD, HAS_SC, HAS_SH, ACC)
            dsum = _bwd_dx(dyg, xg, dxg, mean, rstd, s1, s2, _cvec(add, CL), _cvec(w * sc1, CL),
                           _cvec(b * sc1 + sh, CL), d0, 0, S, C, S, D, HAS_ADD, SILU, CL, ACC, BLOCK_D, BLOCK_S, I64)
            if HAS_ADD:
                tl.store(dadd_ptr + nc, dsum.to(dadd_ptr.dtype.element_ty), mask=dm)


# ------------------------------------------------------------- host side ---
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_vector(v: Optional[Tensor], x: Tensor, name: str, per_sample: bool) -> Optional[Tensor]:
    return None if v is None else v.contiguous()


def _prepare(x: Tensor, weight, bias, add, scale, shift, groups: int, grad_y=None, mean=None, rstd=None):
    """Checks (csrc/blocks.h prepare_gn, stated once in fastdiff/ops/_kernel_checks.py) -> (x canonical,
    channels_last, N, C, S, G, D, vectors)."""
    KC.gn_check(x, weight, bias, add, scale, shift, groups, grad_y, mean, rstd)
    groups = int(groups)
    N, C = x.size(0), x.size(1)
    S = 0 if N == 0 or C == 0 else x.numel() // (N * C)
    D = C // groups
    vecs = (_check_vector(weight, x, "weight", False), _check_vector(bias, x, "bias", False),
            _check_vector(add, x, "add", True), _check_vector(scale, x, "scale", True),
            _check_vector(shift, x, "shift", True))
    cl = gn_channels_last(x)
    xc = x if (cl or x.is_contiguous()) else x.contiguous()
    return xc, cl, N, C, S, groups, D, vecs


def _flags(vecs):
    w, b, add, sc, sh = vecs
    return dict(HAS_W=w is not None, HAS_B=b is not None, HAS_ADD=add is not None, HAS_SC=sc is not None,
                HAS_SH=sh is not None)


def _i64(C: int, S: int) -> bool:
    # in-group offsets (< C * S, one sample) in int64 only when they may overflow int32
    return C * S + 2 * SINGLE_MAX["fwd"] > CM.I64_THRESHOLD


@CM.on_tensor_device
def group_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor],
                   scale: Optional[Tensor], shift: Optional[Tensor], groups: int, eps: float, silu: bool,
                   *, block: Optional[int] = None, split: Optional[int] = None):
    """Schema ``group_norm_act(x, weight?, bias?, add?, scale?, shift?, groups, eps, silu) -> (y, mean, rstd)``.

    ``block`` (tests only) caps the tile size in elements, forcing the looping
    path for groups larger than it. ``split`` (tests only) forces the split
    path with that many chunks per group (fewer when S has fewer tiles);
    None lets ``split_plan`` choose."""
    xc, cl, N, C, S, G, D, vecs = _prepare(x, weight, bias, add, scale, shift, groups)
    sd = gn_stat_dtype(x)
    y = gn_empty_like(xc)
    mean = torch.empty((N, G), dtype=sd, device=x.device)
    rstd = torch.empty((N, G), dtype=sd, device=x.device)
    if N == 0:
        return y, mean, rstd
    f64 = x.dtype == torch.float64
    plan = split_plan(N, G, D, S, cl, f64, _sm_count(x.device), block=block, split=split)
    if plan is not None:
        _split_forward(xc, y, mean, rstd, vecs, C, S, G, D, eps, silu, cl, plan)
        return y, mean, rstd
    geo = _Geometry("fwd", D, S, cl, f64, block)
    dummy = mean
    _gn_fwd_kernel[(N * G,)](
        xc, y, mean, rstd, *(dummy if v is None else v for v in vecs),
        C, S, G, D, CM.f64_bits(eps),
        SILU=bool(silu), CL=cl, ACC=CM.acc_dtype(x.dtype), BLOCK_D=geo.block_d, BLOCK_S=geo.block_s,
        SINGLE=geo.single, I64=_i64(C, S), num_warps=geo.num_warps, **_flags(vecs))
    return y, mean, rstd


# The split forward (few large groups): each group's positions are cut into
# chunks, one program per (group, chunk): stats -> combine (torch, on the
# device) -> apply. UNTUNED on a GPU: split when N * G programs leave SMs idle
# (N * G < SMs), into about SPLIT_PROGRAMS_PER_SM * SMs programs, each chunk at
# least SPLIT_MIN_CHUNK elements. Off the GPU (the interpreter) CPU_SMS stands in.
SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MIN_CHUNK = 4 * LOOP_TILE["fwd"]
CPU_SMS = 16


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return CPU_SMS


class SplitPlan:
    """chunks per group, chunk length CS (positions, a multiple of the tile's
    BLOCK_S) and the looping tile geometry of the split kernels."""

    def __init__(self, chunks: int, cs: int, geo: _Geometry):
        self.chunks, self.cs, self.geo = chunks, cs, geo

    def __repr__(self):
        return f"SplitPlan(chunks={self.chunks}, cs={self.cs}, block_d={self.geo.block_d}, block_s={self.geo.block_s})"


def split_plan(N: int, G: int, D: int, S: int, channels_last: bool, f64: bool, sms: int, *,
               block: Optional[int] = None, split: Optional[int] = None, kind: str = "fwd") -> Optional[SplitPlan]:
    """The split forward's plan for a call, or None for the one-program-per-group
    kernel. ``split`` forces the split path with at most that many chunks."""
    if N * G == 0:
        return None
    if split is None:
        if _Geometry(kind, D, S, channels_last, f64, block).single or N * G >= sms:
            return None
        want = -(-SPLIT_PROGRAMS_PER_SM * sms // (N * G))
        split = min(want, (D * S) // SPLIT_MIN_CHUNK)
        if split < 2:
            return None
        forced = False
    else:
        split = int(split)
        if split < 1:
            raise ValueError(f"fastdiff: split must be a positive number of chunks, got {split}")
        forced = True
    geo = _Geometry(kind, D, S, channels_last, f64, block, loop=True)
    per = -(-S // split)
    cs = -(-per // geo.block_s) * geo.block_s
    chunks = -(-S // cs)
    if chunks < 2 and not forced:
        return None
    return SplitPlan(chunks, cs, geo)


def _split_forward(xc, y, mean, rstd, vecs, C, S, G, D, eps, silu, cl, plan: SplitPlan):
    N = xc.size(0)
    NG, P = N * G, plan.chunks
    f64 = xc.dtype == torch.float64
    acc_t = torch.float64 if f64 else torch.float32
    dev = xc.device
    part = torch.empty((NG, P, 3), dtype=acc_t, device=dev)
    geo = plan.geo
    w, b, add, sc, sh = vecs
    i64 = _i64(C, S)
    _gn_split_stats_kernel[(NG, P)](
        xc, part if add is None else add, part, C, S, G, D, plan.cs, P,
        HAS_ADD=add is not None, CL=cl, ACC=CM.acc_dtype(xc.dtype), BLOCK_D=geo.block_d, BLOCK_S=geo.block_s,
        I64=i64, num_warps=geo.num_warps)
    # combine (Chan et al.) on the device, no host sync: every chunk has the same shift K
    cnt = torch.clamp(S - torch.arange(P, device=dev, dtype=acc_t) * plan.cs, max=plan.cs) * D  # [P]
    K = part[:, 0, 0].contiguous()
    mj, m2j = part[:, :, 1], part[:, :, 2]
    md = (mj * cnt).sum(1) / (D * S)
    m2 = m2j.sum(1) + ((mj - md[:, None]).square() * cnt).sum(1)
    r = 1.0 / torch.sqrt(m2 / (D * S) + eps)
    mean.copy_((K + md).view(N, G))
    rstd.copy_(r.view(N, G))
    dummy = part
    _gn_split_apply_kernel[(NG, P)](
        xc, y, K, md, r, *(dummy if v is None else v for v in vecs),
        C, S, G, D, plan.cs,
        SILU=bool(silu), CL=cl, ACC=CM.acc_dtype(xc.dtype), BLOCK_D=geo.block_d, BLOCK_S=geo.block_s,
        I64=i64, num_warps=geo.num_warps, **_flags(vecs))


def _split_backward(dy, xc, mean, rstd, vecs, dx, dadd, dscale, dshift, wa, wb, C, S, G, D, silu, cl,
                    plan: SplitPlan):
    """Split backward: per-chunk A, B (kernel) -> their sums, s1, s2 and the
    A/B-only gradients (torch on the device) -> dx and per-chunk d add (kernel)."""
    N = xc.size(0)
    NG, P = N * G, plan.chunks
    acc_t = torch.float64 if xc.dtype == torch.float64 else torch.float32
    dev = xc.device
    geo = plan.geo
    w, b, add, sc, sh = vecs
    i64 = _i64(C, S)
    acc = CM.acc_dtype(xc.dtype)
    ab = torch.empty((NG, P, 2, D), dtype=acc_t, device=dev)
    dummy = ab
    vargs = [dummy if v is None else v for v in vecs]
    _gn_split_bwd_sums_kernel[(NG, P)](
        dy, xc, mean, rstd, *vargs, ab, C, S, G, D, plan.cs, P,
        SILU=bool(silu), CL=cl, ACC=acc, BLOCK_D=geo.block_d, BLOCK_S=geo.block_s, I64=i64,
        num_warps=geo.num_warps, **_flags(vecs))
    AB = ab.sum(1)  # [NG, 2, D]: fixed order, deterministic
    A = AB[:, 0].reshape(N, C)
    B = AB[:, 1].reshape(N, C)
    sc1 = 1.0 + sc.to(acc_t) if sc is not None else torch.ones((), dtype=acc_t, device=dev)
    wv = w.to(acc_t) if w is not None else torch.ones((), dtype=acc_t, device=dev)
    bv = b.to(acc_t) if b is not None else torch.zeros((), dtype=acc_t, device=dev)
    gz = wv * sc1
    cnt = D * S
    s1 = ((gz * A).reshape(NG, D).sum(1) / cnt).contiguous()
    s2 = ((gz * B).reshape(NG, D).sum(1) / cnt).contiguous()
    if sh is not None:
        dshift.copy_(A)
    if sc is not None:
        dscale.copy_(wv * B + bv * A)
    if b is not None:
        wa.copy_(sc1 * A)
    if w is not None:
        wb.copy_(sc1 * B)
    dpart = torch.empty((NG, P, D) if add is not None else (1,), dtype=acc_t, device=dev)
    # half the warps of the other backward kernels: ptxas (sm_90, Triton 3.8) spilled 4 B in the bf16
    # channels-last dx kernel at 8 warps, none at 4 (every dtype/layout in tests/_triton_compile.py --full)
    _gn_split_bwd_dx_kernel[(NG, P)](
        dy, xc, mean, rstd, s1, s2, *vargs, dx, dpart, C, S, G, D, plan.cs, P,
        SILU=bool(silu), CL=cl, ACC=acc, BLOCK_D=geo.block_d, BLOCK_S=geo.block_s, I64=i64,
        num_warps=max(1, geo.num_warps // 2), **_flags(vecs))
    if add is not None:
        dadd.copy_(dpart.sum(1).reshape(N, C))


def _check_stat(s: Tensor, xc: Tensor, N: int, G: int, name: str) -> Tensor:
    return s.contiguous()  # checked by _prepare (KC.gn_check)


def _match_grad(grad_y: Tensor, xc: Tensor, cl: bool) -> Tensor:
    """grad_y (checked by _prepare) in xc's layout (copied only when it is in another one)."""
    if (gn_channels_last(grad_y) if cl else grad_y.is_contiguous()):
        return grad_y
    g = gn_empty_like(xc)
    g.copy_(grad_y)
    return g


@CM.on_tensor_device
def group_norm_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                            mean: Tensor, rstd: Tensor, groups: int, silu: bool, *, block: Optional[int] = None,
                            split: Optional[int] = None):
    """Schema ``group_norm_act_backward(grad_y, x, weight?, bias?, add?, scale?, shift?, mean, rstd, groups, silu)
    -> (dx, dweight, dbias, dadd, dscale, dshift)``; an absent input's gradient is an empty (0,) tensor.

    ``block`` (tests only) caps the tile size in elements, forcing the looping path;
    ``split`` (tests only) forces the split path, as in the forward."""
    xc, cl, N, C, S, G, D, vecs = _prepare(x, weight, bias, add, scale, shift, groups, grad_y, mean, rstd)
    mean = _check_stat(mean, xc, N, G, "mean")
    rstd = _check_stat(rstd, xc, N, G, "rstd")
    dy = _match_grad(grad_y, xc, cl)
    sd = gn_stat_dtype(x)
    dev = x.device
    w, b, add_, sc, sh = vecs

    def nc_or_empty(present):
        return torch.empty((N, C), dtype=sd, device=dev) if present else torch.empty(0, dtype=sd, device=dev)

    dx = gn_empty_like(xc)
    dadd, dscale, dshift = nc_or_empty(add_ is not None), nc_or_empty(sc is not None), nc_or_empty(sh is not None)
    wa, wb = nc_or_empty(b is not None), nc_or_empty(w is not None)  # (1 + scale) A, (1 + scale) B per (n, c)
    plan = split_plan(N, G, D, S, cl, x.dtype == torch.float64, _sm_count(dev), block=block, split=split,
                      kind="bwd") if N > 0 else None
    if plan is not None:
        _split_backward(dy, xc, mean, rstd, vecs, dx, dadd, dscale, dshift, wa, wb, C, S, G, D, silu, cl, plan)
    elif N > 0:
        geo = _Geometry("bwd", D, S, cl, x.dtype == torch.float64, block)
        dummy = mean
        outs = [dummy if t.numel() == 0 else t for t in (dadd, dscale, dshift, wa, wb)]
        _gn_bwd_kernel[(N * G,)](
            dy, xc, mean, rstd, *(dummy if v is None else v for v in vecs),
            dx, *outs,
            C, S, G, D,
            SILU=bool(silu), CL=cl, ACC=CM.acc_dtype(x.dtype), BLOCK_D=geo.block_d, BLOCK_S=geo.block_s,
            SINGLE=geo.single, I64=_i64(C, S), num_warps=geo.num_warps, **_flags(vecs))
    # deterministic reduction over the batch (zeros for N = 0, as the sum of nothing)
    dweight = wb.sum(0) if w is not None else torch.empty(0, dtype=sd, device=dev)
    dbias = wa.sum(0) if b is not None else torch.empty(0, dtype=sd, device=dev)
    return dx, dweight, dbias, dadd, dscale, dshift
