"""The layout rule of the Triton launchers (the same as csrc/host.h).

The primary tensor (x0 for q_sample / the loss, sample for the reverse steps)
is used as it is when it is dense, non-overlapping and batch-major (NCHW,
channels_last, ...), else made contiguous. Every other same-shape tensor is
given exactly the primary's strides (copied only when it differs), and the
outputs are ``empty_like(primary)``. The kernels then see flat arrays in which
sample ``n`` owns elements ``[n*M, (n+1)*M)`` of memory order.
"""
from __future__ import annotations

import torch


from ..ops._layout import canonical, is_batch_major_dense, is_non_overlapping_and_dense  # noqa: F401  (one rule)


def match_layout(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (same shape as the canonical ``ref``) with exactly ref's strides."""
    if x.stride() == ref.stride() and is_non_overlapping_and_dense(x):
        return x
    out = torch.empty_like(ref, dtype=x.dtype)
    out.copy_(x)
    return out


def per_sample(x: torch.Tensor) -> int:
    """Elements per sample of a batch-major tensor."""
    return 0 if x.size(0) == 0 else x.numel() // x.size(0)
