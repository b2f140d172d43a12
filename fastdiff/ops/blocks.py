"""Public fused U-Net block operators: GroupNorm(+add, +scale/shift)+SiLU and attention.

Both validate their arguments (errors name the argument) and call one
``torch.ops.fastdiff`` operator, differentiable through its registered
backward operator. See fastdiff/reference/blocks.py for the exact maths.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _backend
from . import _checks as _c
from ._layout import gn_stat_dtype

Tensor = torch.Tensor


def _vector(v, name: str, x: Tensor, per_sample: bool) -> Optional[Tensor]:
    """weight/bias (C,) or add/scale/shift (N, C) [or (N, C, 1, ...)] as the op takes them."""
    if v is None:
        return None
    _c.data(v, name, 0)
    N, C = x.shape[0], x.shape[1]
    if v.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {v.device}")
    if per_sample:
        if v.dim() >= 2 and v.shape[:2] == (N, C) and all(s == 1 for s in v.shape[2:]):
            v = v.reshape(N, C)
        else:
            raise ValueError(f"{name} must have shape ({N}, {C}) (one value per sample and channel; trailing "
                             f"size-1 dimensions are allowed), got {tuple(v.shape)}")
    elif v.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {tuple(v.shape)}")
    return v.to(gn_stat_dtype(x)).contiguous()


def group_norm_act(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                   eps: float = 1e-5, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                   shift: Optional[Tensor] = None, silu: bool = True) -> Tensor:
    """Fused ``silu(GroupNorm(x + add) * (1 + scale) + shift)`` in one pass over x.

    Args:
        x: (N, C, *spatial) data, float32/float16/bfloat16/float64, NCHW or
            channels_last (read natively; other layouts are made contiguous).
        num_groups: G, dividing C. Statistics (float32, two-level Welford)
            are taken over C/G channels x all spatial positions per sample.
        weight, bias: optional (C,) affine parameters.
        add: optional (N, C) per-(sample, channel) value added *before*
            normalising (the time-embedding add of a DDPM ResBlock).
        scale, shift: optional (N, C) values applied after the affine:
            ``h * (1 + scale) + shift`` (the scale-shift ResBlock of improved DDPM).
        silu: apply SiLU at the end (default) or not.

    Returns y shaped like x, in x's dtype and layout. Differentiable in x,
    weight, bias, add, scale and shift; the backward stores only the
    per-group statistics.
    """
    _c.data(x, "x", 2, "shape (N, C, *spatial)")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    C = x.shape[1]
    if C % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels C={C}")
    if x.shape[0] > 0 and x.numel() == 0:
        raise ValueError(f"x has no elements per group (shape {tuple(x.shape)}): GroupNorm needs C >= 1 and "
                         "non-empty spatial dimensions")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    w = _vector(weight, "weight", x, False)
    b = _vector(bias, "bias", x, False)
    a = _vector(add, "add", x, True)
    sc = _vector(scale, "scale", x, True)
    sh = _vector(shift, "shift", x, True)
    y, _, _ = torch.ops.fastdiff.group_norm_act(x, w, b, a, sc, sh, num_groups, float(eps),
                                                _c.flag(silu, "silu"))
    return y


def fused_attention_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """True when ``fastdiff.attention`` picks the fused (Triton) kernel by
    default: CUDA tensors in float16/bfloat16, head dim <= 512, and a Triton
    backend. float32 goes to SDPA by default (the fused kernel's exact fp32
    path runs without tensor cores); ``fused=True`` forces the kernel."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-1] > 512 or q.shape[-1] < 1:
        return False
    return _backend.current_backend("attention") != "reference"


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
              fused: Optional[bool] = None) -> Tensor:
    """``softmax(scale * q k^T) v`` over the last two dimensions.

    Args:
        q: (B, H, Lq, D) queries; k, v: (B, H, Lk, D) keys and values
            (Lk may differ from Lq: cross-attention to a context sequence).
            Any strides: views of one qkv projection are read in place.
        scale: default 1/sqrt(D).
        fused: None (default) uses the fused flash-style kernel where it is
            supported (:func:`fused_attention_supported`) and PyTorch's
            ``scaled_dot_product_attention`` elsewhere (CPU included); True
            forces the fastdiff operator (on CPU: the reference kernel), False
            forces SDPA.

    Returns (B, H, Lq, D) in q's dtype. The fused output is stored as
    (B, Lq, H, D), so ``out.transpose(1, 2).reshape(B, Lq, H * D)`` is a view.
    """
    for name, tnsr in (("q", q), ("k", k), ("v", v)):
        _c.data(tnsr, name, 0)
        if tnsr.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D), got {tuple(tnsr.shape)}")
        if tnsr.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {tnsr.dtype}")
        if tnsr.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {tnsr.device}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[-1] != D or v.shape[-1] != D \
            or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have shape (B={B}, H={H}, Lk, D={D}) with the same Lk, got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("k and v must have at least one position (Lk >= 1)")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = _c.number(scale, "scale")
    if fused is not None:
        fused = _c.flag(fused, "fused")
    if fused is None:
        fused = fused_attention_supported(q, k, v)
    if not fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out, _ = torch.ops.fastdiff.attention(q, k, v, float(scale))
    return out
