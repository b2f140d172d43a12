"""Pieces shared by the Triton kernels: tiling, the per-element maths of
csrc/common.h, and the launchers' host-side helpers.

Tiling. The grid is one-dimensional, ``N * chunks`` programs (grid dims y/z
would cap N at 65535). Program ``pid`` works on sample ``n = pid // chunks``,
chunk ``c = pid % chunks``: it loads t[n] (and t_prev[n]), computes the
per-sample coefficients once in float64 (scalars), then processes one tile of
``BLOCK`` elements of that sample in float32 (float64 for float64 tensors).
Tiles start on multiples of 4 of the *global* element index, so that a tile is
a whole number of Philox groups: when ``M % 4 != 0`` a sample's tiles start at
``4 * floor(n*M / 4)`` and the first / last tile is masked to the sample
(hence up to 3 elements of padding in ``chunks``).

Rounding. The per-sample coefficients are float64 (``tl.sqrt`` and ``/`` on
float64 are IEEE). The per-element float32 maths is the formula of
csrc/common.h but not its rounding: on the GPU Triton lowers a float32 ``/``
to ``div.full.f32`` and ``tl.sqrt`` to ``sqrt.approx.f32`` (about 2 ulp),
while the interpreter, the CPU and the CUDA C++ kernels divide and take
square roots correctly rounded. The backends therefore agree to a few
float32 ulps, not bit for bit; tests bound each against the float64
reference. (``sqrt_acc`` below is the exception: it asks for ``sqrt_rn``.)
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

from ..ops import _kernel_checks as _kc

# ----------------------------------------------------------------- tiles ---
# (BLOCK, num_warps, tiles per program) of the full-size tiles, per kernel. Memory-bound kernels:
# 2048 elements per program (8 KiB of each float32 stream) keeps enough bytes
# in flight per SM, and 4 warps give each thread 16 elements = four 16-byte
# vector accesses per stream (fp32) and 4 Philox groups to interleave (ILP
# for the 32-bit multiplies). Samples smaller than BLOCK get the next power of
# two >= M (+ padding) so that small-M / huge-N batches do not run mostly-masked
# tiles. Tunable on the GPU: BLOCK must be a power of two >= 16.
TILE_CONFIGS = {
    "q_sample": (2048, 4, 1),
    "loss": (2048, 4, 4),
    "step": (2048, 4, 1),
}
LOOPED = ("loss",)  # kernels that walk several tiles per program (the others take tiles = 1)
MIN_BLOCK = 16
MIN_PROGRAMS = 1024  # the loss's tiles per program shrink until the grid has this many programs
INT32_MAX = 2**31 - 1
I64_THRESHOLD = INT32_MAX  # flat indices beyond this need int64 arithmetic (tests lower it)


class Tiling:
    """Launch geometry of one call (host side): ``block`` elements per tile,
    ``tiles`` tiles per program (a chunk), ``chunks`` programs per sample.
    Use :func:`tiling` (cached) in launchers."""

    def __init__(self, kernel: str, N: int, M: int):
        block, warps, tiles = TILE_CONFIGS[kernel]
        tiles = tiles if kernel in LOOPED else 1
        self.aligned = M % 4 == 0  # every sample starts on a group boundary
        pad = 0 if self.aligned else 3
        need = M + pad
        if need < block:
            block = max(MIN_BLOCK, triton.next_power_of_2(need))
            warps = max(1, min(warps, block // 512))
        tiles = max(1, min(tiles, triton.cdiv(need, block)))
        while tiles > 1 and N * triton.cdiv(need, block * tiles) < MIN_PROGRAMS:
            tiles //= 2
        self.block, self.num_warps, self.tiles = block, warps, tiles
        self.N, self.M = N, M
        self.chunks = triton.cdiv(need, block * tiles) if M > 0 else 0
        self.programs = N * self.chunks
        if self.programs > INT32_MAX:
            raise RuntimeError(f"fastdiff (triton): tensor too large ({N} x {M} elements)")
        # int64 index arithmetic only when the flat indices may overflow int32
        self.i64 = N * M + 2 * block * tiles + 8 > I64_THRESHOLD

        self.grid = (self.programs,)
        self.meta = dict(BLOCK=self.block, ALIGNED=self.aligned, I64=self.i64, num_warps=self.num_warps)
        self.meta_tiles = dict(self.meta, TILES=self.tiles)


_TILINGS: dict = {}


def tiling(kernel: str, N: int, M: int) -> Tiling:
    """The (cached) Tiling of a call; the cache key includes the configs, so
    editing TILE_CONFIGS / MIN_PROGRAMS / I64_THRESHOLD takes effect at once."""
    k = (kernel, N, M, TILE_CONFIGS[kernel], MIN_PROGRAMS, I64_THRESHOLD)
    t = _TILINGS.get(k)
    if t is None:
        if len(_TILINGS) > 4096:
            _TILINGS.clear()
        t = _TILINGS[k] = Tiling(kernel, N, M)
    return t


@triton.jit
def chunk_of(pid, chunks, M, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, I64: tl.constexpr):
    """(n, start, lo, hi) of program ``pid``: its sample, the first
    (group-aligned) element of its chunk of CHUNK elements, and the sample's
    flat range [lo, hi)."""
    if I64:
        pid = pid.to(tl.int64)
    n = pid // chunks
    c = pid - n * chunks
    lo = n * M
    hi = lo + M
    if ALIGNED:
        start = lo + c * CHUNK
    else:
        start = (lo // 4) * 4 + c * CHUNK
    return n, start, lo, hi


@triton.jit
def tile_at(start, lo, hi, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Flat indices of the tile at ``start`` and the mask of those in [lo, hi)."""
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        mask = offs < hi
    else:
        mask = (offs >= lo) & (offs < hi)
    return offs, mask


@triton.jit
def tile_of(pid, chunks, M, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, I64: tl.constexpr):
    """(n, start, offs, mask) of program ``pid`` when a chunk is one tile."""
    n, start, lo, hi = chunk_of(pid, chunks, M, BLOCK, ALIGNED, I64)
    offs, mask = tile_at(start, lo, hi, BLOCK, ALIGNED)
    return n, start, offs, mask


@triton.jit
def f64_from_bits(bits):
    """A float64 scalar passed as its int64 bit pattern (Triton passes Python
    floats as float32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def sqrt_acc(x):
    """Correctly rounded square root in x's precision (float32 ``sqrt_rn``,
    float64 ``sqrt``), unlike a plain float32 ``tl.sqrt`` on the GPU."""
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def predict_x0(out, x, sqrt_ab, sqrt_1m_ab, PRED: tl.constexpr):
    """x0_hat from the model output (common.h predict_x0)."""
    if PRED == 0:  # epsilon
        r = (x - sqrt_1m_ab * out) / sqrt_ab
    elif PRED == 1:  # sample
        r = out
    else:  # v_prediction
        r = sqrt_ab * x - sqrt_1m_ab * out
    return r


@triton.jit
def _clamp(x, lo, hi):
    # NaN passes through (comparisons are false), as in common.h
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def clip_x0(x0, clip, s, HAS_THRESH: tl.constexpr, CLIP: tl.constexpr):
    """common.h clip_x0: dynamic threshold when s > 0, else clamp to
    [-clip, clip] when clip > 0 (CLIP: clip_range > 0, known on the host)."""
    if CLIP:
        clipped = _clamp(x0, -clip, clip)
    else:
        clipped = x0
    if HAS_THRESH:
        r = tl.where(s > 0, _clamp(x0, -s, s) / s, clipped)
    else:
        r = clipped
    return r


# ----------------------------------------------------------- host side ---
def cuda_device_of(args) -> "torch.device | None":
    """The device of the first CUDA tensor among ``args`` (None if none)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def on_tensor_device(fn):
    """Launcher decorator: Triton launches on the *current* CUDA device and
    its current stream, so run the launcher with the current device set to
    its tensors' device (``torch.cuda.device``, as PyTorch's own ops do).
    Without it, tensors on cuda:1 with cuda:0 current were read by a kernel
    on device 0 (an illegal address, or a read unordered against the
    producer's stream)."""

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        dev = cuda_device_of(args)
        with torch.cuda.device(dev) if dev is not None else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return launcher


def f64_bits(v: float) -> int:
    """The int64 bit pattern of float64 ``v`` (decoded by f64_from_bits)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def empty(dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


# The kernel-level argument checks are those of every Python kernel (same
# exception types and messages as csrc/host.h): fastdiff/ops/_kernel_checks.py.
check_common = _kc.check_common
check_like = _kc.check_same_like
check_key = _kc.check_key
check_per_sample_f32 = _kc.check_per_sample_f32
