"""The in-kernel noise stream, written out in plain PyTorch.

Every backend (CPU C++, CUDA C++, Triton) draws its Gaussian noise from the
same counter-based generator, so the same key gives the same noise on every
device up to the rounding of the Box-Muller transform.

Definition
----------
A *key* is an int64 tensor of shape (2,): ``key = [seed, offset]``.
The noise for the tensor element at position ``i`` of the *memory order* of
the op's primary tensor (``x0`` for q_sample / the loss, ``sample`` for the
reverse steps) is

    g     = i // 4,  lane = i % 4
    words = Philox4x32-10(counter = (g_lo, g_hi, offset_lo, offset_hi),
                          key     = (seed_lo, seed_hi))
    u_a   = words[0] * 2^-32 + 2^-33          (in (0, 1], never 0)
    th_a  = words[1] * 2^-32 * 2 pi
    u_b   = words[2] * 2^-32 + 2^-33
    th_b  = words[3] * 2^-32 * 2 pi
    z     = [r_a cos th_a, r_a sin th_a, r_b cos th_b, r_b sin th_b][lane],
            r = sqrt(-2 ln u)

(x_lo / x_hi are the low and high 32-bit words of a 64-bit integer.)
One Philox call feeds four consecutive elements, which is what lets a kernel
generate noise at a quarter of the integer cost of one call per element.
"""
from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product a*b (a a constant,
    b an int64 tensor holding uint32 values), without int64 overflow."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    lo_part = p_lo + ((p_hi & 0xFFFF) << 16)
    lo = lo_part & MASK32
    hi = (p_hi >> 16) + (lo_part >> 32)
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (Salmon et al. 2011).

    ``k0``/``k1`` may be Python ints or tensors broadcastable with the counters.
    Returns the four output words as int64 tensors in [0, 2^32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    k0 = torch.as_tensor(k0, dtype=torch.int64) & MASK32
    k1 = torch.as_tensor(k1, dtype=torch.int64) & MASK32
    for r in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0), lo1, (hi0 ^ c3 ^ k1), lo0
        if r + 1 < rounds:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def split_key(key: torch.Tensor) -> tuple[int, int, int, int]:
    """(seed_lo, seed_hi, offset_lo, offset_hi) of a key tensor [seed, offset]."""
    seed, offset = (int(v) for v in key.detach().cpu().to(torch.int64).tolist())
    return seed & MASK32, (seed >> 32) & MASK32, offset & MASK32, (offset >> 32) & MASK32


def philox_normal(key: torch.Tensor, numel: int, dtype=torch.float64, start: int = 0) -> torch.Tensor:
    """Elements ``start .. start+numel-1`` of the Gaussian stream of ``key``,
    computed in float64 (cast to ``dtype``), on the CPU."""
    s_lo, s_hi, o_lo, o_hi = split_key(key)
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    idx = torch.arange(start, start + numel, dtype=torch.int64)
    g = idx // 4
    lane = idx % 4
    w0, w1, w2, w3 = philox4x32(g & MASK32, g >> 32, torch.full_like(g, o_lo), torch.full_like(g, o_hi), s_lo, s_hi)
    two32 = 2.0**-32
    u_a = w0.double() * two32 + 2.0**-33
    u_b = w2.double() * two32 + 2.0**-33
    th_a = w1.double() * two32 * (2 * math.pi)
    th_b = w3.double() * two32 * (2 * math.pi)
    r_a = torch.sqrt(-2.0 * torch.log(u_a))
    r_b = torch.sqrt(-2.0 * torch.log(u_b))
    z = torch.stack([r_a * torch.cos(th_a), r_a * torch.sin(th_a), r_b * torch.cos(th_b), r_b * torch.sin(th_b)], 1)
    return z.gather(1, lane[:, None]).squeeze(1).to(dtype)


def noise_like(x: torch.Tensor, key: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """The noise tensor a fused op draws for primary tensor ``x``: the stream
    laid out in ``x``'s memory order (x must be dense, batch-major; see
    :func:`fastdiff.ops._layout.canonical`)."""
    flat = philox_normal(key, x.numel(), dtype=dtype)
    out = torch.empty_like(x, dtype=dtype, device="cpu")
    # write the stream into memory order: as_strided view over out's storage
    out.as_strided((x.numel(),), (1,)).copy_(flat)
    return out.to(x.device)
