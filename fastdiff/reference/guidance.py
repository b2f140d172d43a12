"""Classifier-free guidance, stated plainly in float64 (the oracle of the
guided step kernels).

Given the model's conditional prediction ``c`` and unconditional prediction
``u`` (in whatever parameterisation the model predicts: epsilon, x0 or v),
classifier-free guidance (Ho & Salimans 2022) with scale w uses

    g = u + w (c - u)         written as   g = c + (w - 1)(c - u)

(the second form is the same number in exact arithmetic and makes w = 1 give
exactly c). Guidance rescale (Lin et al. 2023, "Common Diffusion Noise
Schedules and Sample Steps are Flawed", sec. 3.4) with strength phi replaces g
by phi * g * std(c)/std(g) + (1 - phi) * g, the standard deviations taken per
sample over all its elements. That is g times a per-sample factor

    f_n = phi * std(c_n) / std(g_n) + (1 - phi),

so the fused kernels take f (N,) from a reduction pre-pass and apply
``f * (c + (w - 1)(c - u))`` per element. Where std(g_n) = 0 the ratio is
taken as 1 (diffusers divides by zero there). The ratio does not depend on
the std's Bessel correction; it is computed without one, so a one-element
sample is defined.
"""
from __future__ import annotations

from typing import Optional

import torch


def guidance_factor(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, guidance_rescale: float,
                    compute_dtype=torch.float64) -> torch.Tensor:
    """The per-sample rescale factor f (N,) in ``compute_dtype``."""
    c = cond.to(compute_dtype).reshape(cond.shape[0], -1)
    u = uncond.to(compute_dtype).reshape(cond.shape[0], -1)
    g = c + (guidance_scale - 1.0) * (c - u)
    sc = c.std(dim=1, correction=0)
    sg = g.std(dim=1, correction=0)
    ratio = torch.where(sg > 0, sc / torch.where(sg > 0, sg, torch.ones_like(sg)), torch.ones_like(sg))
    return guidance_rescale * ratio + (1.0 - guidance_rescale)


def guided_output(cond: torch.Tensor, uncond: Optional[torch.Tensor], guidance_scale: float = 1.0,
                  factor: Optional[torch.Tensor] = None, compute_dtype=torch.float64) -> torch.Tensor:
    """f * (c + (w - 1)(c - u)) in ``compute_dtype``; ``cond`` itself (cast)
    when ``uncond`` is None."""
    c = cond.to(compute_dtype)
    if uncond is None:
        return c
    g = c + (guidance_scale - 1.0) * (c - uncond.to(compute_dtype))
    if factor is not None:
        g = g * factor.to(device=g.device, dtype=compute_dtype).reshape((-1,) + (1,) * (g.dim() - 1))
    return g


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                             guidance_rescale: float = 0.0, compute_dtype=torch.float64) -> torch.Tensor:
    """The guided prediction (with rescale when ``guidance_rescale`` > 0), in ``compute_dtype``."""
    f = guidance_factor(cond, uncond, guidance_scale, guidance_rescale, compute_dtype) if guidance_rescale else None
    return guided_output(cond, uncond, guidance_scale, f, compute_dtype)


__all__ = ["guidance_factor", "guided_output", "classifier_free_guidance"]
