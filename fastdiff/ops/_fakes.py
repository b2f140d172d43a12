"""Fake (meta) kernels and autograd formulas of the fastdiff operators.

Fakes let ``torch.compile(fullgraph=True)`` trace the ops: they only state
output shapes, dtypes and strides (the layout rule of ``_layout``), so a new
timestep value never causes a recompilation (t is a tensor input).

Autograd: q_sample is linear in x0 and noise, so its backward is a
per-sample scale, written with ATen ops (which the compiler fuses). The
diffusion loss computes d(sum_n loss_n)/d(model_output) in its forward pass
(no extra read of x0/noise), and its backward is one broadcast multiply by the
incoming per-sample gradient; when the forward did not store it (the
key-driven path on a GPU, or ``store_grad=False``), the backward recomputes it
in one pass (``diffusion_loss_backward``). The reverse steps are sampling ops and are not
differentiable.
"""
from __future__ import annotations

import torch

from . import _kernel_checks as KC
from ._layout import attn_empty, empty_canonical, gn_empty_like, gn_stat_dtype
from ._schemas import NAMESPACE


def _f(name):
    return f"{NAMESPACE}::{name}"


@torch.library.register_fake(_f("q_sample"))
def _q_sample_fake(x0, t, alphas_cumprod, noise):
    KC.check_q_sample(x0, t, alphas_cumprod, noise=noise)
    return empty_canonical(x0)


@torch.library.register_fake(_f("q_sample_rng"))
def _q_sample_rng_fake(x0, t, alphas_cumprod, key, return_noise):
    KC.check_q_sample(x0, t, alphas_cumprod, key=key)
    return empty_canonical(x0), (empty_canonical(x0) if return_noise else x0.new_empty(0))


@torch.library.register_fake(_f("diffusion_loss"))
def _loss_fake(model_output, x0, t, alphas_cumprod, noise, key, weight, target, need_grad):
    KC.check_loss(model_output, x0, t, alphas_cumprod, noise, key, weight, target)
    per = x0.new_empty((x0.shape[0],), dtype=torch.float64 if x0.dtype == torch.float64 else torch.float32)
    return per, (empty_canonical(x0) if need_grad else x0.new_empty(0))


@torch.library.register_fake(_f("diffusion_loss_backward"))
def _loss_bwd_fake(grad_loss, model_output, x0, t, alphas_cumprod, noise, key, weight, target):
    return empty_canonical(x0)


@torch.library.register_fake(_f("ddpm_step"))
def _ddpm_fake(model_output, sample, t, t_prev, alphas_cumprod, model_var, noise, key, thresh, prediction_type,
               variance_type, clip_range, uncond_output=None, guidance_scale=1.0, guidance_factor=None):
    KC.check_ddpm(model_output, sample, t, t_prev, alphas_cumprod, model_var, noise, key, thresh, prediction_type,
                  variance_type)
    return empty_canonical(sample), empty_canonical(sample)


@torch.library.register_fake(_f("ddim_step"))
def _ddim_fake(model_output, sample, t, t_prev, alphas_cumprod, noise, key, thresh, prediction_type, clip_range, eta,
               final_alpha_cumprod, use_clipped_model_output, uncond_output=None, guidance_scale=1.0,
               guidance_factor=None):
    KC.check_ddim(model_output, sample, t, t_prev, alphas_cumprod, noise, key, thresh, prediction_type, eta)
    return empty_canonical(sample), empty_canonical(sample)


# ------------------------------------------------------------- autograd ----
def per_sample_coef(alphas_cumprod: torch.Tensor, t: torch.Tensor, which: str, like: torch.Tensor,
                    dtype=None) -> torch.Tensor:
    """sqrt(abar_t) or sqrt(1-abar_t) per sample, shaped to broadcast against
    ``like``, in ``dtype`` (default like's); NaN for out-of-range t (as the kernels)."""
    T = alphas_cumprod.shape[0]
    ab = alphas_cumprod[t.clamp(0, T - 1)]
    c = ab.sqrt() if which == "a" else (1 - ab).sqrt()
    c = torch.where((t >= 0) & (t < T), c, torch.full_like(c, float("nan")))
    return c.to(dtype or like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def _q_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _q_backward(ctx, grad):
    t, abar = ctx.saved_tensors
    gx = grad * per_sample_coef(abar, t, "a", grad) if ctx.needs_input_grad[0] else None
    gn = grad * per_sample_coef(abar, t, "b", grad) if ctx.needs_input_grad[3] else None
    return gx, None, None, gn


def _q_rng_backward(ctx, grad, grad_noise):
    t, abar = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        gx = grad * per_sample_coef(abar, t, "a", grad)
        # the returned noise does not depend on x0: grad_noise contributes nothing
    return gx, None, None, None, None


def _loss_setup(ctx, inputs, output):
    # inputs: model_output, x0, t, alphas_cumprod, noise, key, weight, target, need_grad
    # the gradient output is rarely differentiated: no zeros tensor materialised for it in the backward
    ctx.set_materialize_grads(False)
    ctx.stored = bool(inputs[8])
    if ctx.stored:  # the forward wrote d(sum_n loss_n)/d model_output: the backward is one multiply
        ctx.save_for_backward(output[1])
        ctx.dd = (inputs[6], inputs[2], inputs[3].shape[0])  # weight, t, T: for a double backward only
    else:  # recompute in the backward (diffusion_loss_backward), from the key when there is one
        ctx.target = inputs[7]
        ctx.save_for_backward(*inputs[:7])


def _loss_backward(ctx, grad_per_sample, grad_grad):
    """Stored gradient: g * grad_per_sample (one broadcast multiply, no pass over x0 or the noise).
    Otherwise one recomputing pass (``diffusion_loss_backward``). ``grad_grad`` is only defined when
    something differentiated the gradient output itself (double backward through the stored path):
    g = 2 w_n / M (out - target), so it contributes 2 w_n / M * grad_grad."""
    gm = None
    if ctx.stored:
        (g,) = ctx.saved_tensors
        if grad_per_sample is not None:
            gs = grad_per_sample if grad_per_sample.dtype == g.dtype else grad_per_sample.to(g.dtype)
            gm = g * gs.view((-1,) + (1,) * (g.dim() - 1))
        if grad_grad is not None and grad_grad.numel():
            weight, t, T = ctx.dd
            m = g.numel() // g.shape[0]
            c = torch.where((t >= 0) & (t < T), weight.to(torch.float64) * (2.0 / m), float("nan"))
            gg = grad_grad * c.to(grad_grad.dtype).view((-1,) + (1,) * (grad_grad.dim() - 1))
            gm = gg if gm is None else gm + gg
    elif grad_per_sample is not None:
        model_output, x0, t, abar, noise, key, weight = ctx.saved_tensors
        if torch.is_grad_enabled() and (model_output.requires_grad or grad_per_sample.requires_grad):
            raise RuntimeError(
                "fastdiff.diffusion_loss: double backward (create_graph=True) needs the stored gradient; "
                "call fastdiff.diffusion_loss(..., store_grad=True)")
        gm = torch.ops.fastdiff.diffusion_loss_backward.default(
            grad_per_sample, model_output, x0, t, abar, noise, key, weight, ctx.target)
    return gm, None, None, None, None, None, None, None, None


torch.library.register_autograd(_f("q_sample"), _q_backward, setup_context=_q_setup)
torch.library.register_autograd(_f("q_sample_rng"), _q_rng_backward, setup_context=_q_setup)
torch.library.register_autograd(_f("diffusion_loss"), _loss_backward, setup_context=_loss_setup)


# ------------------------------------------------- U-Net block operators ----
@torch.library.register_fake(_f("group_norm_act"))
def _gn_fake(x, weight, bias, add, scale, shift, groups, eps, silu):
    KC.gn_check(x, weight, bias, add, scale, shift, groups)
    sd = gn_stat_dtype(x)
    return gn_empty_like(x), x.new_empty((x.shape[0], groups), dtype=sd), x.new_empty((x.shape[0], groups), dtype=sd)


@torch.library.register_fake(_f("group_norm_act_backward"))
def _gn_bwd_fake(grad_y, x, weight, bias, add, scale, shift, mean, rstd, groups, silu):
    KC.gn_check(x, weight, bias, add, scale, shift, groups, grad_y, mean, rstd)
    sd = gn_stat_dtype(x)

    def like(v):
        return x.new_empty(0, dtype=sd) if v is None else torch.empty_like(v, dtype=sd,
                                                                          memory_format=torch.contiguous_format)

    return gn_empty_like(x), like(weight), like(bias), like(add), like(scale), like(shift)


@torch.library.register_fake(_f("attention"))
def _attn_fake(q, k, v, scale):
    B, H, Lq, _ = q.shape
    return attn_empty(B, H, Lq, v.shape[3], q), q.new_empty((B, H, Lq), dtype=gn_stat_dtype(q))


@torch.library.register_fake(_f("attention_backward"))
def _attn_bwd_fake(grad_out, q, k, v, out, lse, scale):
    return attn_empty(*q.shape, q), attn_empty(*k.shape, k), attn_empty(*v.shape, v)


def _gn_setup(ctx, inputs, output):
    x, weight, bias, add, scale, shift, groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.groups, ctx.silu = groups, silu
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)


def _gn_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    grads = torch.ops.fastdiff.group_norm_act_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd,
                                                       ctx.groups, ctx.silu)
    need = ctx.needs_input_grad
    out = [g if (n < 6 and need[n]) else None for n, g in enumerate(grads)]
    return (*out, None, None, None)


def _attn_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, lse)


def _attn_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastdiff.attention_backward(grad_out, q, k, v, out, lse, ctx.scale)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None)


torch.library.register_autograd(_f("group_norm_act"), _gn_backward, setup_context=_gn_setup)
torch.library.register_autograd(_f("attention"), _attn_backward, setup_context=_attn_setup)


# ------------------------------------------------------ multistep samplers ----
@torch.library.register_fake(_f("multistep_step"))
def _multistep_fake(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh, clip_range,
                    return_x0, uncond_output=None, guidance_scale=1.0, guidance_factor=None):
    from ._multistep_common import empty_working, working_layout

    layout = working_layout(sample, history, last_sample)
    x0 = empty_working(layout, sample.dtype) if return_x0 else sample.new_empty(0)
    return empty_working(layout, sample.dtype), x0
