"""Forward diffusion q(x_t | x0) in Triton: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise,
with the noise given or drawn in the kernel from key = [seed, offset]."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ..ops._layout import canonical, match_layout, per_sample
from ._philox import tile_normals


@triton.jit(do_not_specialize=["chunks", "T"])  # block count / table length
def _q_sample_kernel(x_ptr, noise_ptr, key_ptr, t_ptr, abar_ptr, out_ptr, noise_out_ptr,
                     M, chunks, T,
                     NOISE_FROM_KEY: tl.constexpr, STORE_NOISE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr, ALIGNED: tl.constexpr, I64: tl.constexpr):
    n, start, offs, mask = C.tile_of(tl.program_id(0), chunks, M, BLOCK, ALIGNED, I64)
    # per-sample coefficients, float64 (common.h q_coef); NaN for t outside [0, T)
    t = tl.load(t_ptr + n)
    valid = (t >= 0) & (t < T)
    ab = tl.load(abar_ptr + tl.where(valid, t, 0))
    a = tl.where(valid, tl.sqrt(ab), float("nan")).to(ACC)
    b = tl.where(valid, tl.sqrt(1.0 - ab), float("nan")).to(ACC)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NOISE_FROM_KEY:
        zf = tile_normals(key_ptr, start, BLOCK)
        z = zf.to(ACC)
        if STORE_NOISE:
            tl.store(noise_out_ptr + offs, zf.to(noise_out_ptr.dtype.element_ty), mask=mask)
    else:
        z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (a * x + b * z).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x0, t, abar, noise, key, return_noise):
    C.check_common(x0, "x0", t, abar)
    x = canonical(x0)
    if noise is not None:
        C.check_like(noise, x0, "noise", "x0")
        noise = match_layout(noise, x)
    if key is not None:
        C.check_key(key, x0)
        key = key.contiguous()
    out = torch.empty_like(x)
    noise_out = torch.empty_like(x) if return_noise else C.empty(x.dtype, x.device)
    N, M = x.size(0), per_sample(x)
    if x.numel() == 0:
        return out, noise_out
    tiling = C.tiling("q_sample", N, M)
    from_key = key is not None
    _q_sample_kernel[tiling.grid](
        x, x if from_key else noise, key if from_key else t, t.contiguous(), abar.contiguous(), out,
        noise_out if return_noise else out,
        M, tiling.chunks, abar.size(0),
        NOISE_FROM_KEY=from_key, STORE_NOISE=bool(return_noise), ACC=C.acc_dtype(x.dtype), **tiling.meta)
    return out, noise_out


@C.on_tensor_device
def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Schema ``q_sample(x0, t, alphas_cumprod, noise) -> x_t``."""
    return _launch(x0, t, alphas_cumprod, noise, None, False)[0]


@C.on_tensor_device
def q_sample_rng(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, key: torch.Tensor,
                 return_noise: bool):
    """Schema ``q_sample_rng(x0, t, alphas_cumprod, key, return_noise) -> (x_t, noise or empty)``;
    the noise is the key's stream in x0's (canonical) memory order."""
    return _launch(x0, t, alphas_cumprod, None, key, return_noise)
