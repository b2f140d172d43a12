"""The operators implemented with the plain-PyTorch reference (float64 maths).

Used on CPU when the extension is not built and as the ``reference`` GPU
backend; slow but exact. Signatures follow fastdiff/ops/_schemas.py.
"""
from __future__ import annotations

import torch

from .. import reference as ref
from ..reference import blocks as refb
from ._codes import PREDICTION, VARIANCE
from . import _kernel_checks as KC
from ._layout import attn_empty, canonical, empty_canonical, gn_empty_like, gn_stat_dtype


def _out(primary: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    o = empty_canonical(primary)
    o.copy_(value)
    return o


def _nan_invalid(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (value.dim() - 1)
    return torch.where(valid.reshape(shape).to(value.device), value, torch.full_like(value, float("nan")))


def _valid_t(t, T):
    return (t >= 0) & (t < T)


def _valid_pair(t, t_prev, T):
    return _valid_t(t, T) & (t_prev >= -1) & (t_prev < T) & (t_prev < t)


def _noise(primary, key):
    return ref.noise_like(canonical(primary), key)


def q_sample(x0, t, alphas_cumprod, noise):
    KC.check_q_sample(x0, t, alphas_cumprod, noise=noise)
    return _q_sample(x0, t, alphas_cumprod, noise)


def _q_sample(x0, t, alphas_cumprod, noise):
    T = alphas_cumprod.shape[0]
    tc = t.clamp(0, T - 1)
    v = _nan_invalid(ref.q_sample(x0, tc, alphas_cumprod, noise).to(torch.float64), _valid_t(t, T))
    return _out(x0, v)


def q_sample_rng(x0, t, alphas_cumprod, key, return_noise):
    KC.check_q_sample(x0, t, alphas_cumprod, key=key)
    z = _noise(x0, key)
    xt = _q_sample(x0, t, alphas_cumprod, z)
    nz = _out(x0, z) if return_noise else x0.new_empty(0)
    return xt, nz


def diffusion_loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target, need_grad):
    KC.check_loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target)
    return _loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target, need_grad)


def _loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target, need_grad):
    T = alphas_cumprod.shape[0]
    z = noise if noise is not None else _noise(x0, key)
    per, grad = ref.diffusion_loss(model_output, x0, t.clamp(0, T - 1), alphas_cumprod, z, weight,
                                   PREDICTION[target])
    valid = _valid_t(t, T)
    per = torch.where(valid.to(per.device), per, torch.full_like(per, float("nan")))
    per = per.to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
    g = _out(x0, _nan_invalid(grad.to(torch.float64), valid)) if need_grad else x0.new_empty(0)
    return per, g


def diffusion_loss_backward(grad_loss, model_output, x0, t, alphas_cumprod, noise, key, weight, target):
    KC.check_loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target)
    KC.check_loss_grad(grad_loss, x0)
    # grad_loss_n * d loss_n / d out = the gradient of the loss with weights w_n * grad_loss_n (float64, one rounding)
    w = weight.to(torch.float64) * grad_loss.to(device=weight.device, dtype=torch.float64)
    return _loss(model_output, x0, t, alphas_cumprod, noise, key, w, target, True)[1]


def _guided(model_output, uncond_output, guidance_scale, guidance_factor):
    """The (float64) prediction the step uses: model_output, or its
    classifier-free-guided combination with uncond_output."""
    from ._guidance import check_op_args

    check_op_args(model_output, uncond_output, guidance_scale, guidance_factor)
    if uncond_output is None:
        return model_output
    return ref.guided_output(model_output, uncond_output, guidance_scale, guidance_factor)


def ddpm_step(model_output, sample, t, t_prev, alphas_cumprod, model_var, noise, key, thresh,
              prediction_type, variance_type, clip_range, uncond_output=None, guidance_scale=1.0,
              guidance_factor=None):
    KC.check_ddpm(model_output, sample, t, t_prev, alphas_cumprod, model_var, noise, key, thresh, prediction_type,
                  variance_type)
    model_output = _guided(model_output, uncond_output, guidance_scale, guidance_factor)
    T = alphas_cumprod.shape[0]
    z = noise if noise is not None else (_noise(sample, key) if key is not None else None)
    tc, pc = t.clamp(0, T - 1), t_prev.clamp(-1, T - 1)
    prev, x0 = ref.ddpm_step(model_output, sample, tc, pc, alphas_cumprod, noise=z, model_var=model_var,
                             prediction_type=PREDICTION[prediction_type], variance_type=VARIANCE[variance_type],
                             clip_range=clip_range, thresh=thresh)
    valid = _valid_pair(t, t_prev, T)
    return (_out(sample, _nan_invalid(prev.to(torch.float64), valid)),
            _out(sample, _nan_invalid(x0.to(torch.float64), valid)))


def ddim_step(model_output, sample, t, t_prev, alphas_cumprod, noise, key, thresh, prediction_type, clip_range,
              eta, final_alpha_cumprod, use_clipped_model_output, uncond_output=None, guidance_scale=1.0,
              guidance_factor=None):
    KC.check_ddim(model_output, sample, t, t_prev, alphas_cumprod, noise, key, thresh, prediction_type, eta)
    model_output = _guided(model_output, uncond_output, guidance_scale, guidance_factor)
    T = alphas_cumprod.shape[0]
    z = noise if noise is not None else (_noise(sample, key) if key is not None else None)
    tc, pc = t.clamp(0, T - 1), t_prev.clamp(-1, T - 1)
    prev, x0 = ref.ddim_step(model_output, sample, tc, pc, alphas_cumprod, noise=z, eta=eta,
                             prediction_type=PREDICTION[prediction_type], clip_range=clip_range, thresh=thresh,
                             final_alpha_cumprod=final_alpha_cumprod,
                             use_clipped_model_output=use_clipped_model_output)
    valid = _valid_pair(t, t_prev, T)
    return (_out(sample, _nan_invalid(prev.to(torch.float64), valid)),
            _out(sample, _nan_invalid(x0.to(torch.float64), valid)))


# ------------------------------------------------- U-Net block operators ----
def _empty_vec(x):
    return x.new_empty(0, dtype=gn_stat_dtype(x))


def group_norm_act(x, weight, bias, add, scale, shift, groups, eps, silu):
    KC.gn_check(x, weight, bias, add, scale, shift, groups)
    y, mean, rstd = refb.group_norm_act(x, weight, bias, add, scale, shift, groups, eps, silu)
    out = gn_empty_like(x)
    out.copy_(y)
    sd = gn_stat_dtype(x)
    return out, mean.to(sd), rstd.to(sd)


def group_norm_act_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd, groups, silu):
    KC.gn_check(x, weight, bias, add, scale, shift, groups, grad_y, mean, rstd)
    grads = refb.group_norm_act_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd, groups, silu)
    dx = gn_empty_like(x)
    dx.copy_(grads[0])
    sd = gn_stat_dtype(x)
    return (dx,) + tuple(_empty_vec(x) if g is None else g.to(sd) for g in grads[1:])


def attention(q, k, v, scale):
    o, lse = refb.attention(q, k, v, scale)
    out = attn_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], q)
    out.copy_(o)
    return out, lse.to(gn_stat_dtype(q))


def attention_backward(grad_out, q, k, v, out, lse, scale):
    grads = refb.attention_backward(grad_out, q, k, v, out, lse, scale)
    res = []
    for g, like in zip(grads, (q, k, v)):
        r = attn_empty(*like.shape, like)
        r.copy_(g)
        res.append(r)
    return tuple(res)


# ------------------------------------------------------ multistep samplers ----
def multistep_step(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh, clip_range,
                   return_x0, uncond_output=None, guidance_scale=1.0, guidance_factor=None):
    """Row ``step_index`` of ``coeffs`` (see fastdiff/reference/multistep.py).
    A row that cannot be applied (step_index outside the table, a non-finite
    coefficient, a history age beyond K, ...) raises ValueError on the CPU;
    on other devices it gives NaN outputs and leaves history/last_sample
    untouched (as the GPU kernels do). step_index is incremented either way."""
    from ..reference import multistep as refm
    from . import _multistep_common as msc

    msc.check(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh, clip_range)
    model_output = _guided(model_output, uncond_output, guidance_scale, guidance_factor)
    layout = msc.working_layout(sample, history, last_sample)
    K, kept = history.shape[0], last_sample.numel() > 0
    n_rows = coeffs.shape[0]
    i = int(step_index)
    if not 0 <= i < n_rows:
        problem = f"step_index={i} is outside the coefficient table's rows [0, {n_rows})"
    else:
        row = coeffs[i].detach().cpu()
        problem = refm.row_problem(row, K, kept, noise is not None or key is not None)
    prev = msc.empty_working(layout, sample.dtype)
    x0_out = msc.empty_working(layout, sample.dtype) if return_x0 else sample.new_empty(0)
    if problem is not None:
        if sample.device.type == "cpu":
            raise ValueError(f"coeffs row {i}: {problem}")
        prev.fill_(float("nan"))
        x0_out.fill_(float("nan"))
        step_index.add_(1)
        return prev, x0_out
    a_z = float(row[refm.COL["a_z"]])
    z = noise
    if z is None and key is not None and a_z != 0.0:
        z = refm.step_noise(layout, key, i)
    p, x0, hist_new, last_new = refm.multistep_step(model_output, sample, history, last_sample if kept else None,
                                                    row, i, noise=z, thresh=thresh, clip_range=clip_range)
    prev.copy_(p)
    if return_x0:
        x0_out.copy_(x0)
    if float(row[refm.COL["push"]]) != 0.0:
        if K > 0:
            history[i % K].copy_(hist_new[i % K])
        if kept:
            last_sample.copy_(last_new)
    step_index.add_(1)
    return prev, x0_out
