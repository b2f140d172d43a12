"""Flash-style fused attention in Triton, forward and backward.

``out = softmax(scale * q k^T) v`` for q (B, H, Lq, D) and k, v (B, H, Lk, D),
never materialising the (Lq, Lk) score matrix; see fastdiff/reference/blocks.py
for the maths and fastdiff/ops/_schemas.py for the op contract.

Layout. q, k, v and grad_out are read in place through their four strides,
so views of one qkv projection -- (B, L, 3, H, D) from a linear layer, or
(B, 3*H*D, L) from a 1x1 conv -- cost no copy. Outputs (out, dq, dk, dv) are
stored (B, L, H, D) (``attn_empty``), so merging the heads is a free view; lse
is (B, H, Lq) float32, natural log of the *scaled* scores.

Kernels (1-D grids, program = (batch*head, row block), row block fastest so
that neighbouring programs share one head's K/V in L2):

* forward: one program per BLOCK_M query rows; loops over BLOCK_N key blocks
  with the online softmax (running max m, sum l, rescaled fp32 accumulator),
  in base 2 (scale * log2(e) folded into the scores, exp2).
* backward, deterministic (no atomics), two launches:
  1. dq: one program per BLOCK_M query rows; first computes
     delta = rowsum(dO * O) for its rows (stored for launch 2 -- this replaces
     the usual separate preprocess kernel and its extra read of dO), then
     loops over key blocks: p = exp2(s - lse), ds = p (dO v^T - delta),
     dq += ds k.
  2. dk, dv: one program per BLOCK_N key rows, k and v resident; loops over
     query blocks: dv += p^T dO, dk += ds^T q.

Masking. Sequence lengths need not be multiples of the blocks: each loop runs
its full blocks unmasked and its (at most one) tail block with masks; padded
key columns get score -inf (forward) or p = 0 (dq); padded query rows load
q = dO = 0 and lse = +inf, so their p is exactly 0 in the dk/dv loop (zero
tiles alone would give p = exp(0 - lse), which overflows to inf * 0 = NaN
when all real scores are very negative). Head
dims that are not powers of two (40, 80, 96, 160, ...) are padded to
BLOCK_D = next power of two (>= 16, tl.dot's minimum) with a D mask on every
load and store (compiled out when D == BLOCK_D).

Precision: fp32 accumulation everywhere; p and ds are rounded to the input
dtype before their matmuls (the flash-attention recipe). float32 inputs use
``input_precision="ieee"`` (exact fp32 FMA, no TF32). float64 is not
supported here (fastdiff.attention never sends it to the fused path).

No host synchronisation: nothing reads device values on the host, so the
launches can be captured in CUDA graphs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # older layouts of the package
    from triton.runtime.autotuner import OutOfResources

from ..ops._layout import attn_empty
from ._common import on_tensor_device

LOG2E = 1.4426950408889634  # host side
_LOG2E = tl.constexpr(LOG2E)  # the kernels may only read constexpr globals
_LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 512
FP32_PRECISION = "ieee"  # tl.dot input_precision for float32 ("tf32x3": tensor cores, near-fp32; not yet verified)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- device ---
@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. PREC: tl.dot's input_precision for float32
    operands ("" for float16/bfloat16).
    UPCAST: operands to fp32 first -- only under the Triton interpreter for
    bfloat16, whose tl.dot there multiplies the raw uint16 storage; bf16
    products are exact in fp32, so the result equals the GPU's bf16 MMA."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if PREC == "":
        r = tl.dot(a, b)
    else:
        r = tl.dot(a, b, input_precision=PREC)
    return r


@triton.jit
def _load(ptrs, rmask, dmask, MASK_R: tl.constexpr, MASK_D: tl.constexpr):
    """A [rows, BLOCK_D] tile, zero outside the masks that are on."""
    if MASK_R and MASK_D:
        x = tl.load(ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0)
    elif MASK_R:
        x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    elif MASK_D:
        x = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _tile_ptrs(base, start, srow, sd, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers of rows [start, start + ROWS) x [0, BLOCK_D), int64 offsets
    (a head's slice may span more than 2^31 elements of a strided parent)."""
    rows = (start + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    return base + rows[:, None] * srow + cols[None, :] * sd


@triton.jit
def _program_ids(n_blocks, H):
    """(block, batch, head) of this program; block index fastest."""
    pid = tl.program_id(0)
    blk = pid % n_blocks
    bh = pid // n_blocks
    return blk, (bh // H).to(tl.int64), (bh % H).to(tl.int64), bh.to(tl.int64)


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, start, end, Lk, qk_scale, dmask,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = _tile_ptrs(k_base, start, skn, skd, BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(v_base, start, svn, svd, BLOCK_N, BLOCK_D)
    k_step = tl.full([], BLOCK_N, tl.int64) * skn
    v_step = tl.full([], BLOCK_N, tl.int64) * svn
    for start_n in range(start, end, BLOCK_N):
        nmask = (start_n + offs_n) < Lk
        k = _load(k_ptrs, nmask, dmask, MASK_N, MASK_D)
        s = _mm(q, tl.trans(k), PREC, UPCAST) * qk_scale  # log2 units
        if MASK_N:
            s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_ptrs, nmask, dmask, MASK_N, MASK_D)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
        k_ptrs += k_step
        v_ptrs += v_step
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["n_mblocks"])  # a block count: no recompile per sequence length
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                     H, Lq, Lk, D, n_mblocks, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     MASK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    mb, b, h, bh = _program_ids(n_mblocks, H)
    start_m = mb * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    q = _load(_tile_ptrs(q_ptr + b * sqb + h * sqh, start_m, sqm, sqd, BLOCK_M, BLOCK_D), mmask, dmask,
              True, MASK_D)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, 0, n_full, Lk, qk_scale,
                              dmask, BLOCK_N, BLOCK_D, False, MASK_D, PREC, UPCAST)
    # the tail block (0 or 1 iterations), with the key mask
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_base, v_base, skn, skd, svn, svd, n_full, Lk, Lk, qk_scale,
                              dmask, BLOCK_N, BLOCK_D, True, MASK_D, PREC, UPCAST)

    out = acc / l_i[:, None]
    o_ptrs = _tile_ptrs(o_ptr + b * sob + h * soh, start_m, som, sod, BLOCK_M, BLOCK_D)
    if MASK_D:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mmask[:, None])
    lse = (m_i + tl.log2(l_i)) * _LN2  # natural log of sum_j exp(scale s_ij)
    tl.store(lse_ptr + bh * Lq + offs_m, lse, mask=mmask)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, start, end, Lk, qk_scale, dmask,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
             PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = _tile_ptrs(k_base, start, skn, skd, BLOCK_N, BLOCK_D)
    v_ptrs = _tile_ptrs(v_base, start, svn, svd, BLOCK_N, BLOCK_D)
    k_step = tl.full([], BLOCK_N, tl.int64) * skn
    v_step = tl.full([], BLOCK_N, tl.int64) * svn
    for start_n in range(start, end, BLOCK_N):
        nmask = (start_n + offs_n) < Lk
        k = _load(k_ptrs, nmask, dmask, MASK_N, MASK_D)
        v = _load(v_ptrs, nmask, dmask, MASK_N, MASK_D)
        p = tl.exp2(_mm(q, tl.trans(k), PREC, UPCAST) * qk_scale - lse2[:, None])
        if MASK_N:
            # padded keys (k = v = 0) add nothing to dq, but their p = exp(0 - lse) overflows
            # when every real score is very negative (inf * 0 = NaN): zero it
            p = tl.where(nmask[None, :], p, 0.0)
        dp = _mm(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PREC, UPCAST)
        k_ptrs += k_step
        v_ptrs += v_step
    return dq


@triton.jit(do_not_specialize=["n_mblocks"])
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sob, soh, som, sod, sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
                        H, Lq, Lk, D, n_mblocks, qk_scale, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        MASK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    mb, b, h, bh = _program_ids(n_mblocks, H)
    start_m = mb * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    q = _load(_tile_ptrs(q_ptr + b * sqb + h * sqh, start_m, sqm, sqd, BLOCK_M, BLOCK_D), mmask, dmask,
              True, MASK_D)
    do = _load(_tile_ptrs(do_ptr + b * sdob + h * sdoh, start_m, sdom, sdod, BLOCK_M, BLOCK_D), mmask, dmask,
               True, MASK_D)
    o = _load(_tile_ptrs(o_ptr + b * sob + h * soh, start_m, som, sod, BLOCK_M, BLOCK_D), mmask, dmask,
              True, MASK_D)
    # the preprocess, fused: delta = rowsum(dO * O), kept for the dk/dv launch
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + bh * Lq + offs_m, delta, mask=mmask)
    lse2 = tl.load(lse_ptr + bh * Lq + offs_m, mask=mmask, other=0.0) * _LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    n_full = (Lk // BLOCK_N) * BLOCK_N
    dq = _dq_loop(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, 0, n_full, Lk, qk_scale, dmask,
                  BLOCK_N, BLOCK_D, False, MASK_D, PREC, UPCAST)
    dq = _dq_loop(dq, q, do, lse2, delta, k_base, v_base, skn, skd, svn, svd, n_full, Lk, Lk, qk_scale, dmask,
                  BLOCK_N, BLOCK_D, True, MASK_D, PREC, UPCAST)
    dq_ptrs = _tile_ptrs(dq_ptr + b * sdqb + h * sdqh, start_m, sdqm, sdqd, BLOCK_M, BLOCK_D)
    dq = dq * scale
    if MASK_D:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    else:
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mmask[:, None])


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_row, delta_row, sqm, sqd, sdom, sdod, start, end, Lq, qk_scale,
               dmask, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASK_M: tl.constexpr, MASK_D: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    q_ptrs = _tile_ptrs(q_base, start, sqm, sqd, BLOCK_M, BLOCK_D)
    do_ptrs = _tile_ptrs(do_base, start, sdom, sdod, BLOCK_M, BLOCK_D)
    q_step = tl.full([], BLOCK_M, tl.int64) * sqm
    do_step = tl.full([], BLOCK_M, tl.int64) * sdom
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        mmask = rows < Lq
        q = _load(q_ptrs, mmask, dmask, MASK_M, MASK_D)
        do = _load(do_ptrs, mmask, dmask, MASK_M, MASK_D)
        if MASK_M:
            # padded rows: q = dO = 0 make their terms vanish; lse = +inf also gives p = 0
            # (not exp(0 - lse), which could overflow)
            lse2 = tl.load(lse_row + rows, mask=mmask, other=float("inf")) * _LOG2E
            delta = tl.load(delta_row + rows, mask=mmask, other=0.0)
        else:
            lse2 = tl.load(lse_row + rows) * _LOG2E
            delta = tl.load(delta_row + rows)
        pT = tl.exp2(_mm(k, tl.trans(q), PREC, UPCAST) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
        dv += _mm(pT.to(do.dtype), do, PREC, UPCAST)
        dpT = _mm(v, tl.trans(do), PREC, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk += _mm(dsT.to(q.dtype), q, PREC, UPCAST)
        q_ptrs += q_step
        do_ptrs += do_step
    return dk, dv


@triton.jit(do_not_specialize=["n_nblocks"])
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                          sdob, sdoh, sdom, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                          H, Lq, Lk, D, n_nblocks, qk_scale, scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          MASK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    nb, b, h, bh = _program_ids(n_nblocks, H)
    start_n = nb * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < Lk
    dmask = offs_d < D
    k = _load(_tile_ptrs(k_ptr + b * skb + h * skh, start_n, skn, skd, BLOCK_N, BLOCK_D), nmask, dmask,
              True, MASK_D)
    v = _load(_tile_ptrs(v_ptr + b * svb + h * svh, start_n, svn, svd, BLOCK_N, BLOCK_D), nmask, dmask,
              True, MASK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + b * sdob + h * sdoh
    lse_row = lse_ptr + bh * Lq
    delta_row = delta_ptr + bh * Lq
    m_full = (Lq // BLOCK_M) * BLOCK_M
    dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_row, delta_row, sqm, sqd, sdom, sdod, 0, m_full, Lq,
                        qk_scale, dmask, BLOCK_M, BLOCK_D, False, MASK_D, PREC, UPCAST)
    dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, lse_row, delta_row, sqm, sqd, sdom, sdod, m_full, Lq, Lq,
                        qk_scale, dmask, BLOCK_M, BLOCK_D, True, MASK_D, PREC, UPCAST)
    dk_ptrs = _tile_ptrs(dk_ptr + b * sdkb + h * sdkh, start_n, sdkn, sdkd, BLOCK_N, BLOCK_D)
    dv_ptrs = _tile_ptrs(dv_ptr + b * sdvb + h * sdvh, start_n, sdvn, sdvd, BLOCK_N, BLOCK_D)
    dk = dk * scale
    if MASK_D:
        omask = nmask[:, None] & dmask[None, :]
    else:
        omask = nmask[:, None]
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=omask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=omask)


# ---------------------------------------------------------------- configs ---
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by the padded
# head dim Dp = BLOCK_D and the element size e. BLOCK_M is always the query
# block, BLOCK_N the key block. UNTUNED (no GPU was available): chosen from
# ahead-of-time compiles for sm_80 and sm_90 (triton 3.8, ptxas -v) so that
# every fp16/bf16 entry compiles without register spills and its shared memory
# fits an A100 (163 KB per block; the H100 has 227 KB). Benchmark and tune on
# a GPU. Shared memory model, fitted to those compiles (p and ds stay in
# registers; S = stages):
#   fwd   e*(BM*Dp + 2*S*BN*Dp)              q resident, k/v pipelined
#   dq    e*(2*BM*Dp + 2*S*BN*Dp)            q/dO resident, k/v pipelined
#   dkdv  e*(2*BN*Dp + max(3, 2*S)*BM*Dp)+1K k/v resident, q/dO pipelined
# The comments give "model / compiled sm_90 / compiled sm_80" in KB.
# float32 uses exact (ieee) FMA dots, no tensor cores: small tiles and 8 warps
# keep most entries spill-free, but Triton's FMA dot holds whole K=Dp rows per
# thread, so dq at D >= 256 spills (a few KB) whatever the tiles.
_CONFIGS = {
    ("fwd", 2): {64: (128, 64, 8, 3),    # 64 / 64 / 48
                 128: (128, 64, 8, 2),   # 96 / 96 / 64
                 256: (64, 32, 8, 2),    # 96 / 96 / 68
                 512: (32, 32, 8, 1)},   # 96 / 66 / 66
    ("dq", 2): {64: (64, 64, 4, 2),      # 48 / 48 / 32
                128: (64, 64, 8, 2),     # 96 / 96 / 72
                256: (32, 32, 8, 2),     # 96 / 66 / 66
                512: (32, 16, 8, 1)},    # 96 / 96 / 96
    ("dkdv", 2): {64: (32, 64, 4, 2),    # 33 / 32 / 24
                  128: (64, 64, 8, 2),   # 97 / 97 / 73
                  256: (32, 32, 8, 2),   # 97 / 66 / 66
                  512: (32, 16, 8, 1)},  # 129 / 128 / 128
    ("fwd", 4): {64: (64, 32, 8, 2),     # 48 / 40 / 40
                 128: (32, 32, 8, 2),    # 80 / 52 / 52   (sm_90: 0.5 KB spills)
                 256: (32, 16, 8, 1),    # 64 / 50 / 50
                 512: (16, 16, 4, 1)},   # 96 / 64 / 64
    ("dq", 4): {64: (64, 32, 8, 2),      # 64 / 56 / 56
                128: (32, 32, 8, 2),     # 96 / 68 / 68
                256: (16, 32, 8, 1),     # 96 / 96 / 96   (spills ~4.5 KB)
                512: (16, 16, 8, 1)},    # 128 / 128 / 128 (spills ~4 KB)
    ("dkdv", 4): {64: (32, 32, 4, 2),    # 49 / 36 / 36   (sm_90: 0.8 KB spills, 1.5 KB at D=40)
                  128: (32, 32, 8, 2),   # 97 / 68 / 68   (sm_90: 0.4 KB spills)
                  256: (16, 32, 8, 1),   # 113 / 98 / 98
                  512: (16, 16, 8, 1)},  # 161 / 129 / 129
}
MIN_BLOCK = 16  # tl.dot needs M, N, K >= 16
_DEGRADED: dict = {}  # (kernel, Dp, elem, device) -> config that launched after OutOfResources


def _smem(kernel: str, cfg, Dp: int, elem: int) -> int:
    """Shared memory (bytes) of a config, the model of the table's comment."""
    bm, bn, _, st = cfg
    if kernel == "fwd":
        return elem * (bm * Dp + 2 * st * bn * Dp)
    if kernel == "dq":
        return elem * (2 * bm * Dp + 2 * st * bn * Dp)
    return elem * (2 * bn * Dp + max(3, 2 * st) * bm * Dp) + 1024  # + lse/delta staging


@functools.lru_cache(maxsize=None)
def _smem_budget(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
        except Exception:
            pass
    return 163 * 1024


def _halve(cfg):
    bm, bn, w, _ = cfg
    return (max(MIN_BLOCK, bm // 2), max(MIN_BLOCK, bn // 2), w, 1)


def config(kernel: str, D: int, dtype: torch.dtype, device=None, block_m=None, block_n=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` in {"fwd", "dq",
    "dkdv"} for head dim D; block_m / block_n (powers of two >= 16) override
    the table (tests use tiny blocks to exercise the loops and masks)."""
    Dp = _block_d(D)
    elem = 4 if dtype == torch.float32 else 2
    cfg = _CONFIGS[(kernel, elem)][max(64, Dp)]
    device = torch.device(device) if device is not None else torch.device("cpu")
    # a GPU with less shared memory per block (e.g. sm86/sm89: 99 KB): shrink to fit; if even
    # 16x16 tiles exceed the model (fp32, D=512 there) they are tried anyway (the model is
    # an upper bound at that size) and _launch_rows says clearly if they do not fit
    budget = _smem_budget(device)
    while _smem(kernel, cfg, Dp, elem) > budget and (cfg[0] > MIN_BLOCK or cfg[1] > MIN_BLOCK or cfg[3] > 1):
        cfg = (cfg[0], cfg[1], cfg[2], 1) if cfg[3] > 1 else _halve(cfg)
    cfg = _DEGRADED.get((kernel, Dp, elem, str(device)), cfg)
    if block_m is not None or block_n is not None:
        for b in (block_m, block_n):
            if b is not None and (b < MIN_BLOCK or b & (b - 1)):
                raise ValueError(f"fastdiff: attention block sizes must be powers of two >= {MIN_BLOCK}, got {b}")
        cfg = (block_m or cfg[0], block_n or cfg[1], cfg[2], cfg[3])
    return cfg


def _block_d(D: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(D))


# ------------------------------------------------------------ host side ---
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_qkv(q, k, v):
    for t, nm in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise RuntimeError(f"fastdiff: attention {nm} must be a 4-D tensor (B, H, L, D), got "
                               f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.dtype not in _DTYPES:
        raise RuntimeError(f"fastdiff: the Triton attention kernel supports float32, float16 and bfloat16, got "
                           f"{q.dtype} (float64 runs on the reference backend: fastdiff.set_backend('reference', "
                           "'attention'), or fastdiff.attention(..., fused=False))")
    for t, nm in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype or t.device != q.device:
            raise RuntimeError(f"fastdiff: attention {nm} must have q's dtype and device ({q.dtype}, {q.device}), "
                               f"got ({t.dtype}, {t.device})")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[3] != D or v.shape[3] != D \
            or k.shape[2] != v.shape[2]:
        raise RuntimeError(f"fastdiff: attention k and v must have shape (B={B}, H={H}, Lk, D={D}) with the same "
                           f"Lk, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] < 1:
        raise RuntimeError("fastdiff: attention needs at least one key (Lk >= 1)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise RuntimeError(f"fastdiff: the Triton attention kernel supports head dims 1..{MAX_HEAD_DIM}, got {D}")


def _meta(dtype: torch.dtype, D: int) -> dict:
    BD = _block_d(D)
    return dict(BLOCK_D=BD, MASK_D=BD != D, PREC=FP32_PRECISION if dtype == torch.float32 else "",
                UPCAST=_interpreting() and dtype == torch.bfloat16)


def _strides(*ts):
    return [s for t in ts for s in t.stride()]


@on_tensor_device
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
              block_m: int | None = None, block_n: int | None = None):
    """Schema ``attention(q, k, v, scale) -> (out, lse)``: out (B, H, Lq, D)
    stored (B, Lq, H, D) in q's dtype; lse (B, H, Lq) float32. q, k, v may
    have any strides. block_m / block_n override the tuned block sizes."""
    _check_qkv(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = attn_empty(B, H, Lq, D, q)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    scale = float(scale)
    args = (q, k, v, out, lse, *_strides(q, k, v, out), H, Lq, Lk, D)
    meta = _meta(q.dtype, D)
    _launch_rows(_attn_fwd_kernel, "fwd", args, (scale * LOG2E,), Lq, B * H, D, q, block_m, block_n, meta)
    return out, lse


def _launch_rows(kernel_fn, name, args, tail_args, L, BH, D, like, block_m, block_n, meta):
    """Launch a kernel whose programs tile ``L`` rows by its row block (BLOCK_M
    for fwd/dq, BLOCK_N for dkdv); the grid and the block count passed to the
    kernel follow the config actually launched. On OutOfResources (an untuned
    guess too large for this GPU) retry once with halved blocks, and remember
    the smaller config for this (kernel, head dim, dtype, device)."""
    cfg = config(name, D, like.dtype, like.device, block_m, block_n)
    smaller = None

    def go(c):
        bm, bn, warps, stages = c
        rows = bn if name == "dkdv" else bm
        nblk = triton.cdiv(L, rows)
        kernel_fn[(BH * nblk,)](*args, nblk, *tail_args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                num_stages=stages, **meta)

    # (the public launchers run on the tensors' device: @on_tensor_device)
    try:
        go(cfg)
    except OutOfResources:
        smaller = _halve(cfg)
        try:
            go(smaller)
        except OutOfResources as e:
            raise RuntimeError(
                f"fastdiff: the Triton attention {name} kernel for head dim {D} ({like.dtype}) does not fit "
                f"this GPU even with {smaller[0]}x{smaller[1]} tiles ({e}); use "
                "fastdiff.attention(..., fused=False)") from e
    if smaller is not None and block_m is None and block_n is None:
        _DEGRADED[(name, _block_d(D), 4 if like.dtype == torch.float32 else 2, str(like.device))] = smaller


@on_tensor_device
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float, *,
                       block_m: int | None = None, block_n: int | None = None):
    """Schema ``attention_backward(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)``,
    each stored (B, L, H, D) in its input's dtype. grad_out and out may have
    any strides; lse is the forward's (B, H, Lq) float32."""
    _check_qkv(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    for t, nm in ((grad_out, "grad_out"), (out, "out")):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, H, Lq, D) or t.dtype != q.dtype \
                or t.device != q.device:
            raise RuntimeError(f"fastdiff: attention_backward {nm} must be a ({B}, {H}, {Lq}, {D}) {q.dtype} "
                               f"tensor on {q.device}, got {getattr(t, 'dtype', None)} "
                               f"{tuple(getattr(t, 'shape', ()))}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, Lq) or lse.device != q.device:
        raise RuntimeError(f"fastdiff: attention_backward lse must be a ({B}, {H}, {Lq}) tensor on {q.device}")
    lse = lse.to(torch.float32).contiguous()  # no-op for the forward's lse
    dq = attn_empty(B, H, Lq, D, q)
    dk = attn_empty(B, H, Lk, D, k)
    dv = attn_empty(B, H, Lk, D, v)
    if B * H == 0:
        return dq, dk, dv
    if Lq == 0:  # no queries: no gradient flows to k and v
        return dq, dk.zero_(), dv.zero_()
    scale = float(scale)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    meta = _meta(q.dtype, D)
    tail = (scale * LOG2E, scale)
    # launch 1 writes delta, launch 2 reads it (same stream: ordered, no sync)
    _launch_rows(_attn_bwd_dq_kernel, "dq",
                 (q, k, v, out, grad_out, lse, delta, dq, *_strides(q, k, v, out, grad_out, dq), H, Lq, Lk, D),
                 tail, Lq, B * H, D, q, block_m, block_n, meta)
    _launch_rows(_attn_bwd_dkdv_kernel, "dkdv",
                 (q, k, v, grad_out, lse, delta, dk, dv, *_strides(q, k, v, grad_out, dk, dv), H, Lq, Lk, D),
                 tail, Lk, B * H, D, q, block_m, block_n, meta)
    return dq, dk, dv
