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
