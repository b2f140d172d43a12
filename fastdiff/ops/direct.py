"""The checked-once call path: the step operators on arguments that were
already validated and converted at the edge.

:mod:`fastdiff.ops.diffusion` (the public functions) checks user input and
then calls these; so do internal callers that checked their own arguments
once (``GaussianDiffusion``, the fused schedulers), instead of paying for
the public checks again on every call. The contract:

* ``t`` / ``t_prev``: int64 (N,) tensors on the data's device, range-checked
  by the caller if they came from the host (an out-of-range value still
  gives NaN in that sample, never an out-of-bounds read);
* ``abar``: the float64 alphas_cumprod table on the data's device;
* option codes as integers (fastdiff/ops/_codes.py).

The operators still check tensor dtypes, shapes and devices themselves
(csrc/host.h; fastdiff/ops/_kernel_checks.py for the Python kernels), so a
mistake raises ``TypeError`` / ``ValueError``, never a crash.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _fakes, _guidance
from ._schemas import op
from ..schedule import loss_weight

_Q_SAMPLE = op("q_sample")
_Q_SAMPLE_RNG = op("q_sample_rng")
_LOSS = op("diffusion_loss")
_DDPM = op("ddpm_step")
_DDIM = op("ddim_step")
_below_autograd = torch._C._AutoDispatchBelowAutograd
_compiling = torch.compiler.is_compiling
_ONES: dict = {}
_NO_GUIDANCE = (None, 1.0, None)  # (uncond_output, guidance_scale, guidance_factor): the plain step

#: the edge conversion of timesteps: ``timesteps(t, n, device, T, name="t", allow_final=False)`` ->
#: (int64 (n,) tensor on device, its values as a list or None), range-checked when they are on the host
timesteps = _checks.timesteps

#: the checked classifier-free guidance of the step operators' ``guidance=``:
#: ``guidance(model_output, uncond_output, guidance_scale, guidance_rescale)`` -> (uncond_output, w, factor),
#: where factor is guidance rescale's per-sample float64 (N,) pre-pass (None without rescale), and
#: (None, 1.0, None) when nothing is guided
guidance = _guidance.prepare
#: model_output, or the guided prediction of a checked ``guidance`` tuple in model_output's dtype (for
#: pre-passes that need it whole, such as dynamic thresholding)
guided_like = _guidance.guided_like


def _no_grad_needed(*tensors) -> bool:
    """True when no autograd graph can be recorded for these inputs, so the
    op can skip its (Python) autograd kernel; never while torch.compile traces."""
    if _compiling() or torch._C._are_functorch_transforms_active():
        return False
    if not torch.is_grad_enabled():
        return True
    for x in tensors:
        if x is not None and x.requires_grad:
            return False
    return True


def q_sample_key(x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, key: torch.Tensor,
                 return_noise: bool = True):
    """x_t (and the drawn noise, or None) with in-kernel noise from ``key``."""
    if _no_grad_needed(x0):
        with _below_autograd():
            xt, nz = _Q_SAMPLE_RNG._op(x0, t, abar, key, return_noise)
    else:
        xt, nz = _Q_SAMPLE_RNG(x0, t, abar, key, return_noise)
    return xt, (nz if return_noise else None)


def q_sample_noise(x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t with the given noise."""
    if _no_grad_needed(x0, noise):
        with _below_autograd():
            return _Q_SAMPLE._op(x0, t, abar, noise)
    return _Q_SAMPLE(x0, t, abar, noise)


def uniform_weight(n: int, device: torch.device) -> torch.Tensor:
    """A cached float32 (n,) tensor of ones (read-only: the loss weight of
    ``weighting="uniform"``, allocated once per (n, device))."""
    if _compiling():  # inside a compiled graph the ones are made in the graph (a cache would add guards)
        return torch.ones(n, dtype=torch.float32, device=device)
    k = (n, device)
    w = _ONES.get(k)
    if w is None:
        if len(_ONES) > 64:
            _ONES.clear()
        w = _ONES[k] = torch.ones(n, dtype=torch.float32, device=device)
    return w


def loss_weights(abar: torch.Tensor, t: torch.Tensor, weighting: str, target: str, snr_gamma: float
                 ) -> torch.Tensor:
    """Per-sample float32 weights on t's device (``uniform``: the cached ones)."""
    if weighting == "uniform":
        return uniform_weight(t.shape[0], t.device)
    return loss_weight(abar, t, weighting, target, snr_gamma).to(t.device)


def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                   weight: torch.Tensor, target: int, *, noise: Optional[torch.Tensor] = None,
                   key: Optional[torch.Tensor] = None, store_grad: bool = True) -> torch.Tensor:
    """Per-sample weighted losses (float32 (N,); float64 for float64 data),
    differentiable in model_output. ``store_grad``: the forward writes
    d loss / d model_output for the backward (else the backward recomputes it
    in one pass: :func:`fastdiff.diffusion_loss`)."""
    need_grad = bool(store_grad and torch.is_grad_enabled() and model_output.requires_grad)
    per, _ = _LOSS(model_output, x0, t, abar, noise, key, weight, target, need_grad)
    return per


def threshold(model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, pred: int,
              ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample dynamic-thresholding bound s (float32 (N,)): the ``ratio``
    quantile of |x0_hat|, clamped to [1, max_value]. An extra pass: the
    quantile needs a whole sample's x0_hat before the fused step can use it."""
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    a = _fakes.per_sample_coef(abar, t, "a", sample, acc)
    b = _fakes.per_sample_coef(abar, t, "b", sample, acc)
    o, x = model_output.to(acc), sample.to(acc)
    x0 = (x - b * o) / a if pred == 0 else (o if pred == 1 else a * x - b * o)
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    # (max_value beyond float32's range means no upper bound, not an overflow error)
    hi = min(max_value, torch.finfo(torch.float32).max)
    return torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=hi).contiguous()


def ddpm_step(model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              abar: torch.Tensor, *, prediction: int = 0, variance: int = 0, clip: float = 0.0,
              model_var: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
              key: Optional[torch.Tensor] = None, thresh: Optional[torch.Tensor] = None,
              guidance: tuple = _NO_GUIDANCE):
    """(prev_sample, pred_original_sample) of one ancestral DDPM step;
    ``guidance``: the checked (uncond_output, scale, factor) of
    fastdiff/ops/_guidance.py ``prepare``."""
    # OpOverload._op: the C++ entry that OpOverload.__call__ forwards to (one Python frame less per call);
    # the OpOverload itself while torch.compile traces
    return (_DDPM if _compiling() else _DDPM._op)(model_output, sample, t, t_prev, abar, model_var, noise, key,
                                                   thresh, prediction, variance, clip, *guidance)


def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              abar: torch.Tensor, *, prediction: int = 0, clip: float = 0.0, eta: float = 0.0,
              final_alpha_cumprod: float = 1.0, use_clipped_model_output: bool = False,
              noise: Optional[torch.Tensor] = None, key: Optional[torch.Tensor] = None,
              thresh: Optional[torch.Tensor] = None, guidance: tuple = _NO_GUIDANCE):
    """(prev_sample, pred_original_sample) of one DDIM step (noise only used when eta > 0); ``guidance`` as
    in :func:`ddpm_step`."""
    return (_DDIM if _compiling() else _DDIM._op)(model_output, sample, t, t_prev, abar, noise, key, thresh,
                                                   prediction, clip, eta, final_alpha_cumprod,
                                                   use_clipped_model_output, *guidance)


__all__ = ["timesteps", "q_sample_key", "q_sample_noise", "diffusion_loss", "loss_weights", "uniform_weight", "threshold",
           "ddpm_step", "ddim_step"]
