"""The layout rule every backend follows (mirrors csrc/host.h).

The primary tensor (x0, or sample for the steps) is used as it is when it is
dense, non-overlapping and batch-major (NCHW, channels_last, ...), else made
contiguous; outputs take the primary's layout; the in-kernel noise stream is
laid out in the primary's memory order.
"""
from __future__ import annotations

import torch


def is_non_overlapping_and_dense(x: torch.Tensor) -> bool:
    """True when x's elements fill one block of memory exactly once, in any
    dimension order (ATen's TensorImpl::is_non_overlapping_and_dense)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def is_batch_major_dense(x: torch.Tensor) -> bool:
    if not is_non_overlapping_and_dense(x):
        return False
    if x.dim() == 0 or x.shape[0] <= 1 or x.numel() == 0:
        return True
    return x.stride(0) == x.numel() // x.shape[0]


def canonical(x: torch.Tensor) -> torch.Tensor:
    return x if is_batch_major_dense(x) else x.contiguous()


def empty_canonical(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised output with the layout the kernels give for primary ``x``."""
    if is_batch_major_dense(x):
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


def match_layout(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (same shape as the canonical ``ref``) with exactly ref's strides:
    the secondary tensors of a step op (copied only when they differ)."""
    if x.stride() == ref.stride() and is_non_overlapping_and_dense(x):
        return x
    out = torch.empty_like(ref, dtype=x.dtype)
    out.copy_(x)
    return out


def per_sample(x: torch.Tensor) -> int:
    """Elements per sample of a batch-major tensor."""
    return 0 if x.size(0) == 0 else x.numel() // x.size(0)


# ------------------------------------------------- U-Net block operators ----
# GroupNorm: x (N, C, *spatial) is read either NC* contiguous ("NCHW") or
# channels-last ("NHWC": x.movedim(1, -1) contiguous); any other layout is
# made contiguous. Outputs (y, dx) take the layout that was read.
def gn_channels_last(x: torch.Tensor) -> bool:
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def gn_canonical(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() or gn_channels_last(x) else x.contiguous()


def gn_empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised tensor shaped like x in the layout a GroupNorm kernel reads x in."""
    dtype = dtype or x.dtype
    if gn_channels_last(x):
        return torch.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def gn_stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of statistics and of per-channel vectors for data x."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Attention: out, dq, dk, dv of logical shape (B, H, L, D) are stored as
# (B, L, H, D), so out.transpose(1, 2).reshape(B, L, H * D) is free.
def attn_empty(B: int, H: int, L: int, D: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((B, L, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


# The GroupNorm argument checks of the Python kernels live with the other kernel-level checks.
from ._kernel_checks import gn_check  # noqa: E402,F401
