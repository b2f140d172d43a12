"""Classifier-free guidance arguments of the step operators (ddpm_step,
ddim_step, multistep_step): checks naming the argument, and the guidance
rescale's per-sample factor (a reduction pre-pass; the combine itself runs
inside the step kernel). The maths is fastdiff/reference/guidance.py.

The op schemas take ``(uncond_output: Tensor?, guidance_scale: float,
guidance_factor: Tensor?)``: with ``uncond_output`` the kernel reads both
predictions and uses ``f_n * (c + (w - 1)(c - u))`` in place of the model
output (f_n = 1 when guidance_factor is None). guidance_factor is float64 (N,).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch


_PLAIN = (float, int)


def check_scales(guidance_scale, guidance_rescale) -> tuple[float, float]:
    for name, v in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v}")
    if not 0.0 <= float(guidance_rescale) <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    return float(guidance_scale), float(guidance_rescale)


def check_uncond(uncond_output, model_output: torch.Tensor) -> torch.Tensor:
    if not isinstance(uncond_output, torch.Tensor):
        raise TypeError(f"uncond_output must be a torch.Tensor, got {type(uncond_output).__name__}")
    if uncond_output.shape != model_output.shape:
        raise ValueError(f"uncond_output must have the shape of model_output {tuple(model_output.shape)}, got "
                         f"{tuple(uncond_output.shape)}")
    if uncond_output.dtype != model_output.dtype:
        raise TypeError(f"uncond_output must have the dtype of model_output ({model_output.dtype}), got "
                        f"{uncond_output.dtype}")
    if uncond_output.device != model_output.device:
        raise ValueError(f"uncond_output must be on model_output's device {model_output.device}, got "
                         f"{uncond_output.device}")
    return uncond_output


def prepare(model_output: torch.Tensor, uncond_output: Optional[torch.Tensor], guidance_scale,
            guidance_rescale) -> tuple[Optional[torch.Tensor], float, Optional[torch.Tensor]]:
    """Checked ``(uncond, w, factor)`` for the op. Without uncond_output,
    guidance_scale must be 1 and guidance_rescale 0. With w = 1 and no
    rescale the guided output is exactly model_output, so uncond_output is
    not passed on (the step then reads one prediction, not two)."""
    if uncond_output is None and type(guidance_scale) in _PLAIN and guidance_scale == 1 and \
            type(guidance_rescale) in _PLAIN and guidance_rescale == 0:
        return None, 1.0, None  # the unguided call (nearly every call): no further checks to make
    w, phi = check_scales(guidance_scale, guidance_rescale)
    if uncond_output is None:
        if w != 1.0:
            raise ValueError(f"guidance_scale={w} needs uncond_output (the unconditional prediction)")
        if phi != 0.0:
            raise ValueError(f"guidance_rescale={phi} needs uncond_output (the unconditional prediction)")
        return None, 1.0, None
    check_uncond(uncond_output, model_output)
    if w == 1.0 and phi == 0.0:
        return None, 1.0, None
    factor = rescale_factor(model_output, uncond_output, w, phi) if phi != 0.0 else None
    return uncond_output, w, factor


def rescale_factor(cond: torch.Tensor, uncond: torch.Tensor, w: float, phi: float) -> torch.Tensor:
    """f_n = phi std(c_n)/std(g_n) + 1 - phi as float64 (N,): the reduction
    pre-pass of guidance rescale (float32 statistics, float64 for float64
    data; device ops only, no host sync)."""
    acc = torch.float64 if cond.dtype == torch.float64 else torch.float32
    n = cond.shape[0]
    c = cond.reshape(n, -1).to(acc)
    g = torch.lerp(uncond.reshape(n, -1).to(acc), c, w)  # u + w (c - u): one pass, one temporary
    sc = c.std(dim=1, correction=0).to(torch.float64)
    sg = g.std(dim=1, correction=0).to(torch.float64)
    ok = sg > 0
    ratio = torch.where(ok, sc / torch.where(ok, sg, torch.ones_like(sg)), torch.ones_like(sg))
    return (phi * ratio + (1.0 - phi)).contiguous()


def guided(model_output: torch.Tensor, uncond: Optional[torch.Tensor], w: float,
           factor: Optional[torch.Tensor]) -> torch.Tensor:
    """The guided prediction in torch (float32, float64 for float64 data):
    for the pre-passes that need it whole (dynamic thresholding)."""
    acc = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    c = model_output.to(acc)
    if uncond is None:
        return c
    g = c + (w - 1.0) * (c - uncond.to(acc))
    if factor is not None:
        g = g * factor.to(acc).reshape((-1,) + (1,) * (g.dim() - 1))
    return g


def guided_like(model_output: torch.Tensor, guidance: tuple) -> torch.Tensor:
    """model_output, or (for a pre-pass such as dynamic thresholding) the
    guided prediction of the checked ``guidance = (uncond, w, factor)`` in
    model_output's dtype."""
    if guidance[0] is None:
        return model_output
    return guided(model_output, *guidance).to(model_output.dtype)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                             guidance_rescale: float = 0.0) -> torch.Tensor:
    """The guided prediction uncond + w (cond - uncond) (rescaled when
    guidance_rescale > 0), computed with torch ops as a separate pass, in
    cond's dtype. The fused steps do this inside their kernel (pass
    ``uncond_output=`` to them instead); this is for code that needs the
    guided tensor itself (e.g. a thresholding pre-pass)."""
    check_uncond(uncond, cond)
    u, w, f = prepare(cond, uncond, guidance_scale, guidance_rescale)
    return guided(cond, u, w, f).to(cond.dtype)


def check_op_args(model_output, uncond_output, guidance_scale, guidance_factor) -> None:
    """The kernels' own checks of the guidance inputs (csrc/host.h
    check_guidance: same types and messages), for direct torch.ops calls."""
    from . import _kernel_checks as KC

    if uncond_output is not None:
        KC.check_same_like(uncond_output, model_output, "uncond_output", "model_output")
    if not math.isfinite(float(guidance_scale)):
        raise ValueError(f"fastdiff: guidance_scale must be finite, got {KC.cpp_float(guidance_scale)}")
    if guidance_factor is not None:
        n = model_output.shape[0]
        if guidance_factor.dtype != torch.float64:
            raise TypeError(f"fastdiff: guidance_factor must be float64, got {KC.cpp_dtype(guidance_factor.dtype)}")
        if guidance_factor.dim() != 1 or guidance_factor.shape[0] != n:
            raise ValueError(f"fastdiff: guidance_factor must have shape ({n},), got {KC.cpp_sizes(guidance_factor)}")
        if guidance_factor.device != model_output.device:
            raise ValueError(f"fastdiff: guidance_factor must be on {model_output.device}, got "
                             f"{guidance_factor.device}")
