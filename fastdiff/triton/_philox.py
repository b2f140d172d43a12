"""The in-kernel noise stream of fastdiff in Triton.

Definition (fastdiff/reference/noise.py): element ``i`` of the primary
tensor's memory order takes lane ``i % 4`` of Philox4x32-10 group
``g = i // 4`` with counter ``(g_lo, g_hi, offset_lo, offset_hi)`` and key
``(seed_lo, seed_hi)`` from the int64 key tensor ``[seed, offset]``, turned
into four normals by Box-Muller.

The Philox words are bit-identical to the reference (uint32 arithmetic and
``tl.umulhi``). Box-Muller runs in float32 with a branch-free logarithm and
sine/cosine written out here (the same method as the CPU kernels,
csrc/cpu/ops.cpp) rather than ``tl.log`` / ``tl.sin`` / ``tl.cos``: their
accuracy then does not depend on how a Triton version lowers those
(``log`` of ``u`` just below 1 must stay <= 0, or ``sqrt(-2 log u)`` is NaN).
The interpreter and the GPU evaluate the same formulas but do not round
alike: on the GPU ``tl.fdiv`` and ``tl.sqrt`` are the approximate
``div.full.f32`` / ``sqrt.approx.f32`` (about 2 ulp), the interpreter uses
numpy's correctly rounded ones. So the Philox words are bit-identical
everywhere, while the normals agree with the reference, the CPU and the
CUDA kernels only to a few float32 ulps (which is what the tests bound).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import on_tensor_device

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
TWO_M32 = tl.constexpr(2.3283064365386963e-10)  # 2^-32
TWO_M33 = tl.constexpr(1.1641532182693481e-10)  # 2^-33


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (counter c0..c3, key k0, k1, all uint32).

    Returns the four output words (uint32), bit-identical to
    ``fastdiff.reference.philox4x32``.
    """
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _log_unit(u):
    """ln(u) for float32 u in [2^-33, 1]: exponent split, mantissa folded into
    [sqrt(1/2), sqrt(2)), then 2 atanh(s) as a series (abs. error < 1e-9
    before rounding; exactly 0 at u = 1 and < 0 below it)."""
    bits = u.to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = m > 1.41421356
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    s = tl.fdiv(m - 1.0, m + 1.0)  # fast division (2 ulp) is plenty here; |s| <= 0.1716
    s2 = s * s
    p = 1.0 + s2 * (0.3333333333333333 + s2 * (0.2 + s2 * (0.14285714285714285 + s2 * 0.1111111111111111)))
    return e.to(tl.float32) * 0.69314718 + 2.0 * s * p


@triton.jit
def _sincos_2pi(v):
    """(sin, cos) of 2*pi*v for float32 v in [0, 1]: nearest quarter turn, then
    Taylor polynomials on [-pi/4, pi/4] (truncation error < 2e-9)."""
    x = v * 4.0
    qf = tl.floor(x + 0.5)
    p = (x - qf) * 1.57079633
    q = qf.to(tl.int32) & 3
    p2 = p * p
    sp = p * (1.0 + p2 * (-0.16666666666666666 + p2 * (0.008333333333333333 + p2 * (
        -0.0001984126984126984 + p2 * 2.7557319223985893e-06))))
    cp = 1.0 + p2 * (-0.5 + p2 * (0.041666666666666664 + p2 * (-0.001388888888888889 + p2 * (
        2.48015873015873e-05 + p2 * -2.755731922398589e-07))))
    swap = (q & 1) != 0
    s = tl.where(swap, cp, sp)
    c = tl.where(swap, sp, cp)
    s = tl.where((q & 2) != 0, -s, s)
    c = tl.where(((q + 1) & 2) != 0, -c, c)
    return s, c


@triton.jit
def box_muller(wa, wb):
    """Two standard normals (float32) from two uint32 words: u in (0, 1],
    angle 2*pi*wb*2^-32; returns (r cos, r sin)."""
    u = wa.to(tl.float32) * TWO_M32 + TWO_M33
    r = tl.sqrt(-2.0 * _log_unit(u))  # argument >= 0 (exactly 0 at u = 1)
    s, c = _sincos_2pi(wb.to(tl.float32) * TWO_M32)
    return r * c, r * s


@triton.jit
def normal4(g, k0, k1, o_lo, o_hi):
    """The four normals of Philox groups ``g`` (int64 block, >= 0) for key words
    (k0, k1) = (seed_lo, seed_hi) and offset words (o_lo, o_hi), all uint32
    scalars: lanes 0..3 of elements 4g .. 4g+3 of the stream."""
    c0 = g.to(tl.uint32)  # truncation: low word
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + o_lo
    c3 = tl.zeros_like(c0) + o_hi
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = box_muller(w0, w1)
    z2, z3 = box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def key_words(key_ptr):
    """(seed_lo, seed_hi, offset_lo, offset_hi) as uint32 scalars, read on the
    device from the int64 key tensor [seed, offset]."""
    seed = tl.load(key_ptr)
    off = tl.load(key_ptr + 1)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32), off.to(tl.uint32), (off >> 32).to(tl.uint32)


@triton.jit
def tile_normals(key_ptr, start, BLOCK: tl.constexpr):
    """Normals of stream elements ``start .. start+BLOCK-1`` (float32 [BLOCK]);
    ``start`` must be a multiple of 4. One Philox call per group of four
    elements, on a [BLOCK // 4] block, expanded to the four lanes by joining
    them on two new minor axes and flattening ([G, 2, 2] -> [BLOCK])."""
    k0, k1, o_lo, o_hi = key_words(key_ptr)
    g = start.to(tl.int64) // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    z0, z1, z2, z3 = normal4(g, k0, k1, o_lo, o_hi)
    # join appends a new minor axis: join(join(z0, z2), join(z1, z3))[g, j, i]
    # is lane 2j + i, so the row-major flattening puts lane l of group g at 4g + l
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))  # [G, 2, 2]
    return tl.reshape(z, [BLOCK])


@triton.jit
def _philox_words_kernel(g_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Test hook: the raw words of groups g_ptr[0..n) -> out_ptr[4*i + lane]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0)
    k0, k1, o_lo, o_hi = key_words(key_ptr)
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + o_lo
    c3 = tl.zeros_like(c0) + o_hi
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * offs, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int64), mask=mask)


@triton.jit
def _normals_kernel(key_ptr, out_ptr, start, n, BLOCK: tl.constexpr):
    """Test hook: stream elements start .. start+n-1 (start a multiple of 4)."""
    pid = tl.program_id(0)
    s = start + pid.to(tl.int64) * BLOCK
    z = tile_normals(key_ptr, s, BLOCK)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, z, mask=offs < n)


@on_tensor_device
def philox_words(g, key):
    """The Philox words of groups ``g`` (int64 tensor) as an int64 (len(g), 4)
    tensor of uint32 values (for tests)."""
    import torch

    g = g.to(torch.int64).contiguous()
    out = torch.empty(g.numel(), 4, dtype=torch.int64, device=g.device)
    if g.numel():
        BLOCK = 128
        _philox_words_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, key.contiguous(), out, g.numel(), BLOCK=BLOCK)
    return out


@on_tensor_device
def normals(key, numel, start=0, device=None):
    """Elements ``start .. start+numel-1`` of the stream as float32 (for tests;
    ``start`` a multiple of 4)."""
    import torch

    assert start % 4 == 0
    out = torch.empty(numel, dtype=torch.float32, device=device or key.device)
    if numel:
        BLOCK = 256
        _normals_kernel[(triton.cdiv(numel, BLOCK),)](key.contiguous(), out, start, numel, BLOCK=BLOCK)
    return out
