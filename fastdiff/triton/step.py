"""The reverse-diffusion steps in Triton: ancestral DDPM and DDIM.

Per-sample coefficients are computed once per program in float64 exactly as
csrc/common.h (ddpm_coef / ddim_coef); per element the maths runs in float32
(float64 for float64 tensors). A sample whose t / t_prev is out of range
(t not in [0, T), t_prev not in [-1, T), or t_prev >= t) gets NaN outputs and
no out-of-range table read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ..ops import _kernel_checks as KC
from ..ops._guidance import check_op_args
from ..ops._layout import canonical, match_layout, per_sample
from ._philox import tile_normals

# noise sources (constexpr)
_NO_NOISE, _NOISE_TENSOR, _NOISE_KEY = 0, 1, 2


@triton.jit
def _load_pair(t_ptr, tp_ptr, abar_ptr, n, T, final_ab):
    """(t, valid, abar_t, abar_prev) in float64; abar_prev = final_ab at t_prev = -1."""
    t = tl.load(t_ptr + n)
    tp = tl.load(tp_ptr + n)
    valid = (t >= 0) & (t < T) & (tp >= -1) & (tp < T) & (tp < t)
    ab_t = tl.load(abar_ptr + tl.where(valid, t, 0))
    ab_p = tl.load(abar_ptr + tl.where(valid & (tp >= 0), tp, 0))
    ab_p = tl.where(tp >= 0, ab_p, final_ab)
    return t, valid, ab_t, ab_p


@triton.jit
def _noise_tile(noise_ptr, key_ptr, start, offs, mask, NOISE: tl.constexpr, BLOCK: tl.constexpr,
                ACC: tl.constexpr):
    if NOISE == 2:
        z = tile_normals(key_ptr, start, BLOCK).to(ACC)
    else:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
    return z


@triton.jit
def _load_output(mo_ptr, u_ptr, gf_ptr, n, offs, mask, gw, GUIDED: tl.constexpr, HAS_GF: tl.constexpr,
                 ACC: tl.constexpr):
    """The model output the step uses: with classifier-free guidance
    f * (c + (w - 1)(c - u)), both predictions read in this launch."""
    mo = tl.load(mo_ptr + offs, mask=mask, other=0.0).to(ACC)
    if GUIDED:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
        mo = mo + gw.to(ACC) * (mo - u)
        if HAS_GF:
            mo = mo * tl.load(gf_ptr + n).to(ACC)
    return mo


@triton.jit(do_not_specialize=["chunks", "T", "clip_bits", "gw_bits"])
def _ddpm_kernel(mo_ptr, x_ptr, var_ptr, noise_ptr, key_ptr, thresh_ptr, t_ptr, tp_ptr, abar_ptr,
                 prev_ptr, x0_ptr, u_ptr, gf_ptr, M, chunks, T, clip_bits, gw_bits,
                 PRED: tl.constexpr, VAR: tl.constexpr, NOISE: tl.constexpr, HAS_THRESH: tl.constexpr,
                 CLIP: tl.constexpr, GUIDED: tl.constexpr, HAS_GF: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr, I64: tl.constexpr):
    n, start, offs, mask = C.tile_of(tl.program_id(0), chunks, M, BLOCK, ALIGNED, I64)
    t, valid, ab_t, ab_p = _load_pair(t_ptr, tp_ptr, abar_ptr, n, T, 1.0)
    # common.h ddpm_coef, float64
    beta = 1.0 - ab_t / ab_p  # beta'_t, exact for respaced chains
    sab = tl.sqrt(ab_t).to(ACC)
    s1m = tl.sqrt(1.0 - ab_t).to(ACC)
    cx0 = (tl.sqrt(ab_p) * beta / (1.0 - ab_t)).to(ACC)
    cxt = (tl.sqrt(1.0 - beta) * (1.0 - ab_p) / (1.0 - ab_t)).to(ACC)
    small = (1.0 - ab_p) / (1.0 - ab_t) * beta
    small = tl.where(small < 1e-20, 1e-20, small)
    clip = C.f64_from_bits(clip_bits).to(ACC)
    if HAS_THRESH:
        s = tl.load(thresh_ptr + n).to(ACC)
    else:
        s = clip  # unused

    mo = _load_output(mo_ptr, u_ptr, gf_ptr, n, offs, mask, C.f64_from_bits(gw_bits), GUIDED, HAS_GF, ACC)
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    x0 = C.clip_x0(C.predict_x0(mo, xv, sab, s1m, PRED), clip, s, HAS_THRESH, CLIP)
    r = cx0 * x0 + cxt * xv
    if NOISE != 0:
        z = _noise_tile(noise_ptr, key_ptr, start, offs, mask, NOISE, BLOCK, ACC)
        if VAR == 4:  # learned: model_var is the variance
            mv = tl.load(var_ptr + offs, mask=mask, other=1.0).to(ACC)
            sd = C.sqrt_acc(mv)
        elif VAR == 5:  # learned_range: log-variance between log beta_tilde and log beta'
            mv = tl.load(var_ptr + offs, mask=mask, other=0.0).to(ACC)
            log_small = tl.log(small).to(ACC)
            log_large = tl.log(beta).to(ACC)
            frac = (mv + 1.0) * 0.5
            sd = tl.exp(0.5 * (frac * log_large + (1.0 - frac) * log_small))
        elif VAR == 2 or VAR == 3:  # fixed_large(_log)
            sd = tl.sqrt(beta).to(ACC)
        else:  # fixed_small(_log)
            sd = tl.sqrt(small).to(ACC)
        r = tl.where(t > 0, r + sd * z, r)  # no noise on the last step
    nan = float("nan")
    tl.store(prev_ptr + offs, tl.where(valid, r, nan).to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, tl.where(valid, x0, nan).to(x0_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["chunks", "T", "clip_bits", "eta_bits", "final_bits", "gw_bits"])
def _ddim_kernel(mo_ptr, x_ptr, noise_ptr, key_ptr, thresh_ptr, t_ptr, tp_ptr, abar_ptr,
                 prev_ptr, x0_ptr, u_ptr, gf_ptr, M, chunks, T, clip_bits, eta_bits, final_bits, gw_bits,
                 PRED: tl.constexpr, NOISE: tl.constexpr, HAS_THRESH: tl.constexpr, CLIP: tl.constexpr,
                 USE_CLIPPED: tl.constexpr, GUIDED: tl.constexpr, HAS_GF: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, ALIGNED: tl.constexpr, I64: tl.constexpr):
    n, start, offs, mask = C.tile_of(tl.program_id(0), chunks, M, BLOCK, ALIGNED, I64)
    eta = C.f64_from_bits(eta_bits)
    final_ab = C.f64_from_bits(final_bits)
    t, valid, ab_t, ab_p = _load_pair(t_ptr, tp_ptr, abar_ptr, n, T, final_ab)
    # common.h ddim_coef, float64
    var = (1.0 - ab_p) / (1.0 - ab_t) * (1.0 - ab_t / ab_p)
    std64 = eta * tl.sqrt(tl.where(var > 0.0, var, 0.0))
    dd = 1.0 - ab_p - std64 * std64
    sab = tl.sqrt(ab_t).to(ACC)
    s1m = tl.sqrt(1.0 - ab_t).to(ACC)
    cx0 = tl.sqrt(ab_p).to(ACC)
    cxt = tl.sqrt(tl.where(dd > 0.0, dd, 0.0)).to(ACC)  # coefficient of eps
    std = std64.to(ACC)
    clip = C.f64_from_bits(clip_bits).to(ACC)
    if HAS_THRESH:
        s = tl.load(thresh_ptr + n).to(ACC)
    else:
        s = clip  # unused

    mo = _load_output(mo_ptr, u_ptr, gf_ptr, n, offs, mask, C.f64_from_bits(gw_bits), GUIDED, HAS_GF, ACC)
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    x0 = C.clip_x0(C.predict_x0(mo, xv, sab, s1m, PRED), clip, s, HAS_THRESH, CLIP)
    if USE_CLIPPED:
        eps = (xv - sab * x0) / s1m
    elif PRED == 0:
        eps = mo
    elif PRED == 1:
        eps = (xv - sab * mo) / s1m
    else:
        eps = sab * mo + s1m * xv
    r = cx0 * x0 + cxt * eps
    if NOISE != 0:  # only when eta > 0 (host-side)
        z = _noise_tile(noise_ptr, key_ptr, start, offs, mask, NOISE, BLOCK, ACC)
        r = r + std * z
    nan = float("nan")
    tl.store(prev_ptr + offs, tl.where(valid, r, nan).to(prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, tl.where(valid, x0, nan).to(x0_ptr.dtype.element_ty), mask=mask)


def _prepare(model_output, sample, t, t_prev, abar, model_var, noise, key, thresh, prediction_type):
    """host.h prepare_step: (checked by the caller: _kernel_checks.check_ddpm / check_ddim), then every
    tensor in the sample's canonical layout."""
    pred = int(prediction_type)
    x = canonical(sample)
    mo = match_layout(model_output, x)
    if model_var is not None:
        model_var = match_layout(model_var, x)
    if noise is not None:
        noise = match_layout(noise, x)
    if key is not None:
        key = key.contiguous()
    if thresh is not None:
        thresh = thresh.contiguous()
    return x, mo, model_var, noise, key, thresh, pred


def _prepare_guidance(model_output, x, uncond_output, guidance_scale, guidance_factor):
    """host.h check_guidance: uncond in the sample's layout, factor contiguous."""
    check_op_args(model_output, uncond_output, guidance_scale, guidance_factor)
    if uncond_output is None:
        return None, None
    u = match_layout(uncond_output, x)
    return u, (guidance_factor.contiguous() if guidance_factor is not None else None)


def _noise_mode(noise, key):
    return _NOISE_KEY if key is not None else (_NOISE_TENSOR if noise is not None else _NO_NOISE)


@C.on_tensor_device
def ddpm_step(model_output, sample, t, t_prev, alphas_cumprod, model_var, noise, key, thresh, prediction_type,
              variance_type, clip_range, uncond_output=None, guidance_scale=1.0, guidance_factor=None):
    """Schema ``ddpm_step(model_output, sample, t, t_prev, alphas_cumprod, model_var?, noise?, key?, thresh?,
    prediction_type, variance_type, clip_range) -> (prev_sample, pred_original_sample)``."""
    KC.check_ddpm(model_output, sample, t, t_prev, alphas_cumprod, model_var, noise, key, thresh, prediction_type,
                  variance_type)
    var_type = int(variance_type)
    x, mo, mv, noise, key, thresh, pred = _prepare(model_output, sample, t, t_prev, alphas_cumprod, model_var,
                                                   noise, key, thresh, prediction_type)
    u, gf = _prepare_guidance(model_output, x, uncond_output, guidance_scale, guidance_factor)
    prev, x0 = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return prev, x0
    tiling = C.tiling("step", x.size(0), per_sample(x))
    mode = _noise_mode(noise, key)
    _ddpm_kernel[tiling.grid](
        mo, x, mv if mv is not None else x, noise if noise is not None else x, key if key is not None else t,
        thresh if thresh is not None else t, t.contiguous(), t_prev.contiguous(), alphas_cumprod.contiguous(),
        prev, x0, u if u is not None else x, gf if gf is not None else t,
        tiling.M, tiling.chunks, alphas_cumprod.size(0), C.f64_bits(clip_range),
        C.f64_bits(float(guidance_scale) - 1.0),
        PRED=pred, VAR=var_type, NOISE=mode, HAS_THRESH=thresh is not None, CLIP=float(clip_range) > 0.0,
        GUIDED=u is not None, HAS_GF=gf is not None, ACC=C.acc_dtype(x.dtype), **tiling.meta)
    return prev, x0


@C.on_tensor_device
def ddim_step(model_output, sample, t, t_prev, alphas_cumprod, noise, key, thresh, prediction_type, clip_range,
              eta, final_alpha_cumprod, use_clipped_model_output, uncond_output=None, guidance_scale=1.0,
              guidance_factor=None):
    """Schema ``ddim_step(model_output, sample, t, t_prev, alphas_cumprod, noise?, key?, thresh?,
    prediction_type, clip_range, eta, final_alpha_cumprod, use_clipped_model_output)
    -> (prev_sample, pred_original_sample)``."""
    KC.check_ddim(model_output, sample, t, t_prev, alphas_cumprod, noise, key, thresh, prediction_type, eta)
    eta = float(eta)
    x, mo, _, noise, key, thresh, pred = _prepare(model_output, sample, t, t_prev, alphas_cumprod, None, noise,
                                                  key, thresh, prediction_type)
    u, gf = _prepare_guidance(model_output, x, uncond_output, guidance_scale, guidance_factor)
    prev, x0 = torch.empty_like(x), torch.empty_like(x)
    if x.numel() == 0:
        return prev, x0
    tiling = C.tiling("step", x.size(0), per_sample(x))
    mode = _noise_mode(noise, key) if eta > 0.0 else _NO_NOISE
    _ddim_kernel[tiling.grid](
        mo, x, noise if noise is not None else x, key if key is not None else t,
        thresh if thresh is not None else t, t.contiguous(), t_prev.contiguous(), alphas_cumprod.contiguous(),
        prev, x0, u if u is not None else x, gf if gf is not None else t, tiling.M, tiling.chunks,
        alphas_cumprod.size(0), C.f64_bits(clip_range), C.f64_bits(eta), C.f64_bits(final_alpha_cumprod),
        C.f64_bits(float(guidance_scale) - 1.0),
        PRED=pred, NOISE=mode, HAS_THRESH=thresh is not None, CLIP=float(clip_range) > 0.0,
        USE_CLIPPED=bool(use_clipped_model_output), GUIDED=u is not None, HAS_GF=gf is not None,
        ACC=C.acc_dtype(x.dtype), **tiling.meta)
    return prev, x0
