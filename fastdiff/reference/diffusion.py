"""Plain-PyTorch statement of the maths every fused kernel implements.

These functions are the oracle of the test-suite: clear rather than fast.
They compute in float64 unless told otherwise (``compute_dtype``) and return
results in the input dtype. Per-sample timesteps ``t`` have shape (N,);
``alphas_cumprod`` is the (T,) table abar_t.

Conventions shared with the kernels (see docs/ARCHITECTURE.md):
* ``t_prev < 0`` means "the chain ends here": abar_prev = 1 for DDPM and
  ``final_alpha_cumprod`` for DDIM.
* DDPM adds noise only to samples whose ``t > 0``; DDIM adds ``sigma_t * z``
  whenever ``eta > 0`` (sigma_t is 0 at the end of the chain).
* ``clip_range > 0`` clamps x0_hat to [-clip_range, clip_range];
  ``thresh`` (per-sample s, shape (N,)) applies dynamic thresholding
  x0_hat <- clamp(x0_hat, -s, s) / s instead.
"""
from __future__ import annotations

import torch

from .noise import noise_like

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, final: float = 1.0) -> torch.Tensor:
    """abar[t] in float64, with ``final`` where t < 0."""
    table = alphas_cumprod.detach().to(torch.float64)
    t = t.to(device=table.device, dtype=torch.int64)
    vals = table[t.clamp(min=0)]
    return torch.where(t < 0, torch.full_like(vals, final), vals)


def q_sample(x0, t, alphas_cumprod, noise, compute_dtype=torch.float64):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    ab = _per_sample(_abar(alphas_cumprod, t), x0.ndim).to(x0.device)
    a = ab.sqrt().to(compute_dtype)
    b = (1 - ab).sqrt().to(compute_dtype)
    return (a * x0.to(compute_dtype) + b * noise.to(compute_dtype)).to(x0.dtype)


def get_velocity(x0, t, alphas_cumprod, noise, compute_dtype=torch.float64):
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    ab = _per_sample(_abar(alphas_cumprod, t), x0.ndim).to(x0.device)
    return (ab.sqrt().to(compute_dtype) * noise.to(compute_dtype)
            - (1 - ab).sqrt().to(compute_dtype) * x0.to(compute_dtype)).to(x0.dtype)


def loss_target(x0, t, alphas_cumprod, noise, target: str, compute_dtype=torch.float64):
    if target == "epsilon":
        return noise.to(compute_dtype)
    if target == "sample":
        return x0.to(compute_dtype)
    if target == "v_prediction":
        return get_velocity(x0.to(compute_dtype), t, alphas_cumprod, noise.to(compute_dtype), compute_dtype)
    raise ValueError(f"target must be one of {PREDICTION_TYPES}, got {target!r}")


def diffusion_loss(model_output, x0, t, alphas_cumprod, noise, weight, target="epsilon",
                   compute_dtype=torch.float64):
    """Per-sample weighted MSE and its gradient with respect to model_output.

    Returns ``(per_sample, grad)``: per_sample[n] = w_n * mean_j (out - target)^2
    (float32... here compute_dtype), grad = d(sum_n per_sample[n]) / d out
    = 2 w_n (out - target) / M, in model_output's dtype.
    """
    tgt = loss_target(x0, t, alphas_cumprod, noise, target, compute_dtype)
    diff = model_output.to(compute_dtype) - tgt
    n = diff.shape[0]
    m = diff[0].numel() if n else 0
    w = weight.to(compute_dtype).reshape(n)
    per = w * diff.reshape(n, -1).pow(2).mean(1) if m else torch.zeros(n, dtype=compute_dtype)
    grad = (2.0 / max(m, 1)) * _per_sample(w, diff.ndim) * diff
    return per, grad.to(model_output.dtype)


def predict_x0(model_output, sample, ab_t, prediction_type):
    if prediction_type == "epsilon":
        return (sample - (1 - ab_t).sqrt() * model_output) / ab_t.sqrt()
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return ab_t.sqrt() * sample - (1 - ab_t).sqrt() * model_output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _clip(x0, clip_range, thresh):
    if thresh is not None:
        s = _per_sample(thresh.to(x0.dtype), x0.ndim)
        return torch.minimum(torch.maximum(x0, -s), s) / s
    if clip_range is not None and clip_range > 0:
        return x0.clamp(-clip_range, clip_range)
    return x0


def dynamic_threshold(x0_hat, ratio=0.995, max_value=1.0):
    """Per-sample s of Imagen's dynamic thresholding: the ``ratio`` quantile of
    |x0_hat| over each sample, clamped to [1, max_value]."""
    flat = x0_hat.detach().reshape(x0_hat.shape[0], -1).abs().to(torch.float32)
    s = torch.quantile(flat, ratio, dim=1)
    return s.clamp(min=1.0, max=max_value)


def ddpm_step(model_output, sample, t, t_prev, alphas_cumprod, noise=None, model_var=None,
              prediction_type="epsilon", variance_type="fixed_small", clip_range=0.0, thresh=None,
              compute_dtype=torch.float64):
    """Ancestral DDPM step x_t -> x_{t_prev}; returns (prev_sample, pred_original_sample)."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    nd = sample.ndim
    dev = sample.device
    ab_t = _per_sample(_abar(alphas_cumprod, t), nd).to(dev, compute_dtype)
    ab_p = _per_sample(_abar(alphas_cumprod, t_prev, 1.0), nd).to(dev, compute_dtype)
    x = sample.to(compute_dtype)
    out = model_output.to(compute_dtype)
    x0 = _clip(predict_x0(out, x, ab_t, prediction_type), clip_range, thresh)
    beta_t = 1 - ab_t / ab_p  # beta'_t: correct for respaced chains
    c_x0 = ab_p.sqrt() * beta_t / (1 - ab_t)
    c_xt = (1 - beta_t).sqrt() * (1 - ab_p) / (1 - ab_t)
    mean = c_x0 * x0 + c_xt * x
    if noise is not None:
        var_small = ((1 - ab_p) / (1 - ab_t) * beta_t).clamp(min=1e-20)
        if variance_type in ("fixed_small", "fixed_small_log"):
            std = var_small.sqrt()
        elif variance_type in ("fixed_large", "fixed_large_log"):
            std = beta_t.sqrt()
        elif variance_type == "learned":
            std = model_var.to(compute_dtype).sqrt()
        else:  # learned_range: interpolate log-variance between beta_tilde and beta'
            frac = (model_var.to(compute_dtype) + 1) / 2
            std = torch.exp(0.5 * (frac * beta_t.log() + (1 - frac) * var_small.log()))
        live = _per_sample((t.to(dev) > 0).to(compute_dtype), nd)
        mean = mean + live * std * noise.to(compute_dtype)
    return mean.to(sample.dtype), x0.to(sample.dtype)


def ddim_step(model_output, sample, t, t_prev, alphas_cumprod, noise=None, eta=0.0,
              prediction_type="epsilon", clip_range=0.0, thresh=None, final_alpha_cumprod=1.0,
              use_clipped_model_output=False, compute_dtype=torch.float64):
    """DDIM step (Song et al. 2021, eq. 12); returns (prev_sample, pred_original_sample)."""
    nd = sample.ndim
    dev = sample.device
    ab_t = _per_sample(_abar(alphas_cumprod, t), nd).to(dev, compute_dtype)
    ab_p = _per_sample(_abar(alphas_cumprod, t_prev, final_alpha_cumprod), nd).to(dev, compute_dtype)
    x = sample.to(compute_dtype)
    out = model_output.to(compute_dtype)
    if prediction_type == "epsilon":
        eps = out
    elif prediction_type == "sample":
        eps = (x - ab_t.sqrt() * out) / (1 - ab_t).sqrt()
    elif prediction_type == "v_prediction":
        eps = ab_t.sqrt() * out + (1 - ab_t).sqrt() * x
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    x0 = _clip(predict_x0(out, x, ab_t, prediction_type), clip_range, thresh)
    var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
    std = eta * var.sqrt()
    if use_clipped_model_output:
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    prev = ab_p.sqrt() * x0 + (1 - ab_p - std**2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        prev = prev + std * noise.to(compute_dtype)
    return prev.to(sample.dtype), x0.to(sample.dtype)


__all__ = ["q_sample", "get_velocity", "loss_target", "diffusion_loss", "predict_x0", "dynamic_threshold",
           "ddpm_step", "ddim_step", "noise_like", "PREDICTION_TYPES", "VARIANCE_TYPES"]
