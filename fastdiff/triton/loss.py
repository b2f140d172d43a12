"""The fused diffusion training loss in Triton: per-sample weighted MSE of the
model output against the epsilon / x0 / v target, and its gradient.

Deterministic reduction: every program walks a chunk of TILES tiles of one
sample, keeps per-lane sums of squares in registers, and writes
``w_n / M * sum`` (float64) into a workspace [N, chunks]; the per-sample loss
is then a torch ``.sum(1)`` over that workspace (no atomics, the same result
run to run). With one chunk per sample the kernel writes the loss directly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ..ops import _kernel_checks as KC
from ..ops._layout import canonical, match_layout, per_sample
from ._philox import tile_normals


@triton.jit(do_not_specialize=["chunks", "T"])  # block count / table length
def _loss_kernel(out_ptr, x_ptr, noise_ptr, key_ptr, t_ptr, abar_ptr, w_ptr, grad_ptr, ws_ptr, gl_ptr,
                 M, chunks, T,
                 TARGET: tl.constexpr, NOISE_FROM_KEY: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, TILES: tl.constexpr, ALIGNED: tl.constexpr, I64: tl.constexpr,
                 BWD: tl.constexpr = False):
    pid = tl.program_id(0)
    n, start, lo, hi = C.chunk_of(pid, chunks, M, BLOCK * TILES, ALIGNED, I64)
    t = tl.load(t_ptr + n)
    valid = (t >= 0) & (t < T)
    ab = tl.load(abar_ptr + tl.where(valid, t, 0))
    a = tl.sqrt(ab).to(ACC)
    b = tl.sqrt(1.0 - ab).to(ACC)
    poison = tl.where(valid, 0.0, float("nan")).to(ACC)  # invalid t: NaN loss and gradient
    w_over_m = tl.load(w_ptr + n).to(tl.float64) / M
    if BWD:  # the recomputing backward: the incoming per-sample gradient folded into the scale
        gscale = (2.0 * w_over_m * tl.load(gl_ptr + n).to(tl.float64)).to(ACC)
    else:
        gscale = (2.0 * w_over_m).to(ACC)

    acc = tl.zeros([BLOCK], dtype=ACC)  # per-lane sums of squares over the chunk's tiles
    for i in range(TILES):
        tstart = start + i * BLOCK
        offs, mask = C.tile_at(tstart, lo, hi, BLOCK, ALIGNED)
        mo = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
        if TARGET == 1:  # sample
            tgt = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        else:
            if NOISE_FROM_KEY:
                eps = tile_normals(key_ptr, tstart, BLOCK).to(ACC)
            else:
                eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
            if TARGET == 0:  # epsilon
                tgt = eps
            else:  # v_prediction: sqrt(abar) eps - sqrt(1 - abar) x0
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
                tgt = a * eps - b * x
        d = mo - tgt + poison
        if NEED_GRAD:
            tl.store(grad_ptr + offs, (gscale * d).to(grad_ptr.dtype.element_ty), mask=mask)
        if not BWD:
            d = tl.where(mask, d, 0.0)
            acc += d * d
    if not BWD:
        # w_n / M * (this chunk's sum of squares), in float64: the loss is ws.sum(1)
        # (with one chunk per sample, ws is the loss itself, in the loss dtype)
        part = w_over_m * tl.sum(acc.to(tl.float64), axis=0)
        tl.store(ws_ptr + pid, part.to(ws_ptr.dtype.element_ty))


def _in_layout(x0, model_output, noise, key):
    """(x0, model_output, noise, key) as the kernels read them: x0 canonical, the others in its layout."""
    x = canonical(x0)
    return (x, match_layout(model_output, x), None if noise is None else match_layout(noise, x),
            None if key is None else key.contiguous())


@C.on_tensor_device
def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   noise, key, weight: torch.Tensor, target: int, need_grad: bool):
    """Schema ``diffusion_loss(model_output, x0, t, alphas_cumprod, noise?, key?, weight, target, need_grad)
    -> (per_sample, grad or empty)``; per_sample is float32 (float64 for float64 inputs)."""
    KC.check_loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target)
    target = int(target)
    x, mo, noise, key = _in_layout(x0, model_output, noise, key)
    N, M = x.size(0), per_sample(x)
    loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad = torch.empty_like(x) if need_grad else C.empty(x.dtype, x.device)
    if x.numel() == 0:
        return torch.zeros(N, dtype=loss_dtype, device=x.device), grad
    tiling = C.tiling("loss", N, M)
    if tiling.chunks == 1:
        ws = torch.empty(N, dtype=loss_dtype, device=x.device)
    else:
        ws = torch.empty(N, tiling.chunks, dtype=torch.float64, device=x.device)
    from_key = key is not None
    _loss_kernel[tiling.grid](
        mo, x, x if from_key else noise, key if from_key else t, t.contiguous(), alphas_cumprod.contiguous(),
        weight.contiguous(), grad if need_grad else x, ws, ws,
        M, tiling.chunks, alphas_cumprod.size(0),
        TARGET=target, NOISE_FROM_KEY=from_key, NEED_GRAD=bool(need_grad), ACC=C.acc_dtype(x.dtype),
        **tiling.meta_tiles)
    per = ws if tiling.chunks == 1 else ws.sum(1).to(loss_dtype)
    return per, grad


@C.on_tensor_device
def diffusion_loss_backward(grad_loss: torch.Tensor, model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                            alphas_cumprod: torch.Tensor, noise, key, weight: torch.Tensor, target: int):
    """Schema ``diffusion_loss_backward(grad_loss, model_output, x0, t, alphas_cumprod, noise?, key?, weight,
    target) -> grad``: grad_loss[n] * d loss_n / d model_output, recomputed in one pass (the noise
    regenerated from the key), in x0's canonical layout."""
    KC.check_loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target)
    KC.check_loss_grad(grad_loss, x0)
    target = int(target)
    x, mo, noise, key = _in_layout(x0, model_output, noise, key)
    N, M = x.size(0), per_sample(x)
    grad = torch.empty_like(x)
    if x.numel() == 0:
        return grad
    gl = grad_loss.to(torch.float64).contiguous()
    tiling = C.tiling("loss", N, M)
    from_key = key is not None
    _loss_kernel[tiling.grid](
        mo, x, x if from_key else noise, key if from_key else t, t.contiguous(), alphas_cumprod.contiguous(),
        weight.contiguous(), grad, gl, gl,
        M, tiling.chunks, alphas_cumprod.size(0),
        TARGET=target, NOISE_FROM_KEY=from_key, NEED_GRAD=True, ACC=C.acc_dtype(x.dtype), BWD=True,
        **tiling.meta_tiles)
    return grad
