"""The operator schemas of the ``fastdiff`` namespace, defined once.

The C++ extension only *implements* these (``TORCH_LIBRARY_IMPL``), the
Triton backend registers Python kernels for the same names, and the fake
(meta) kernels live in :mod:`fastdiff.ops._fakes`. Defining the schemas here
means ``import fastdiff`` works, with the reference kernels, even when the
extension was not built.

The U-Net block ops (``group_norm_act``, ``attention`` and their backwards)
take float32 per-channel / per-(sample, channel) vectors and return float32
statistics (float64 for float64 data); see fastdiff/reference/blocks.py for
the maths and fastdiff/ops/_layout.py for the layouts.

Integer codes: prediction/target 0 epsilon, 1 sample, 2 v_prediction;
variance 0 fixed_small, 1 fixed_small_log, 2 fixed_large, 3 fixed_large_log,
4 learned, 5 learned_range. ``alphas_cumprod`` is float64; ``t`` int64 (N,).

Classifier-free guidance (the last three arguments of the steps): with
``uncond_output`` the kernels use f_n * (c + (guidance_scale - 1)(c - u)),
c = model_output, u = uncond_output, in place of the model output, f_n =
``guidance_factor`` (float64 (N,), guidance rescale) or 1; see
fastdiff/reference/guidance.py and fastdiff/ops/_guidance.py.
"""
from __future__ import annotations

import torch

NAMESPACE = "fastdiff"

SCHEMAS = {
    # x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) noise
    "q_sample": "q_sample(Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor noise) -> Tensor",
    # same, noise drawn in the kernel from key = [seed, offset]; returns (x_t, noise or empty)
    "q_sample_rng": "q_sample_rng(Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor key, bool return_noise)"
    " -> (Tensor, Tensor)",
    # per-sample weighted MSE against the epsilon/x0/v target (float32; float64 for float64
    # inputs) + its gradient (or empty)
    "diffusion_loss": "diffusion_loss(Tensor model_output, Tensor x0, Tensor t, Tensor alphas_cumprod,"
    " Tensor? noise, Tensor? key, Tensor weight, int target, bool need_grad) -> (Tensor, Tensor)",
    # the recomputing backward of diffusion_loss: grad_loss (N,) * d loss_n / d model_output, in one pass
    # over model_output and the inputs the target needs (the noise regenerated from the key)
    "diffusion_loss_backward": "diffusion_loss_backward(Tensor grad_loss, Tensor model_output, Tensor x0, Tensor t,"
    " Tensor alphas_cumprod, Tensor? noise, Tensor? key, Tensor weight, int target) -> Tensor",
    # ancestral DDPM step: (prev_sample, pred_original_sample)
    "ddpm_step": "ddpm_step(Tensor model_output, Tensor sample, Tensor t, Tensor t_prev, Tensor alphas_cumprod,"
    " Tensor? model_var, Tensor? noise, Tensor? key, Tensor? thresh, int prediction_type, int variance_type,"
    " float clip_range"
    ", Tensor? uncond_output=None, float guidance_scale=1.0, Tensor? guidance_factor=None) -> (Tensor, Tensor)",
    # DDIM step: (prev_sample, pred_original_sample)
    "ddim_step": "ddim_step(Tensor model_output, Tensor sample, Tensor t, Tensor t_prev, Tensor alphas_cumprod,"
    " Tensor? noise, Tensor? key, Tensor? thresh, int prediction_type, float clip_range, float eta,"
    " float final_alpha_cumprod, bool use_clipped_model_output"
    ", Tensor? uncond_output=None, float guidance_scale=1.0, Tensor? guidance_factor=None) -> (Tensor, Tensor)",
    # GroupNorm(x + add) * weight + bias, then * (1 + scale) + shift, then SiLU; returns
    # (y, mean, rstd), statistics (N, G). weight/bias (C,), add/scale/shift (N, C), all optional.
    "group_norm_act": "group_norm_act(Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor? scale,"
    " Tensor? shift, int groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)",
    # (dx, dweight, dbias, dadd, dscale, dshift); an absent optional input's gradient is empty
    "group_norm_act_backward": "group_norm_act_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias,"
    " Tensor? add, Tensor? scale, Tensor? shift, Tensor mean, Tensor rstd, int groups, bool silu)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    # softmax(scale q k^T) v for q (B, H, Lq, D), k/v (B, H, Lk, D), any strides; returns
    # (out, lse): out (B, H, Lq, D) stored as (B, Lq, H, D), lse (B, H, Lq) float32
    "attention": "attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
    # (dq, dk, dv), each stored as (B, L, H, D) like out
    "attention_backward": "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,"
    " Tensor lse, float scale) -> (Tensor, Tensor, Tensor)",
    # one step of a multistep sampler (DPM-Solver++, UniPC, Euler, flow matching): row i = step_index of the
    # float64 (n_rows, 16) coefficient table; updates the history ring buffer (K, *sample.shape), last_sample
    # (or empty) and step_index (+1) in place; returns (prev_sample, x0 or empty). See
    # fastdiff/reference/multistep.py for the maths and fastdiff/ops/multistep.py for the contract.
    "multistep_step": "multistep_step(Tensor model_output, Tensor sample, Tensor(a!) history,"
    " Tensor(b!) last_sample, Tensor coeffs, Tensor(c!) step_index, Tensor? noise, Tensor? key, Tensor? thresh,"
    " float clip_range, bool return_x0"
    ", Tensor? uncond_output=None, float guidance_scale=1.0, Tensor? guidance_factor=None) -> (Tensor, Tensor)",
}

# Tags: every op is a pure function of its inputs (the key makes the noise
# deterministic), so none needs the nondeterministic_seeded tag.
LIB = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    LIB.define(_schema)


def op(name: str):
    """The OpOverload ``torch.ops.fastdiff.<name>.default``."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default
