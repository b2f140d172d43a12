"""The step operators of the diffusion family: forward noise, diffusion loss,
DDPM and DDIM steps (re-exported by :mod:`fastdiff.ops`).

Each function validates its arguments (raising ``ValueError``/``TypeError``
that name the argument), then calls one ``torch.ops.fastdiff`` operator,
which dispatches to the C++ CPU, CUDA C++ or Triton kernel.

Timesteps: ``t`` may be an int, a sequence or an integer tensor of shape
(N,) (or a scalar tensor, broadcast to the batch). Timesteps given as Python
values or CPU tensors are range-checked on the host. Timesteps already on a
GPU (or seen while torch.compile traces) are *not* checked on the host (that
would synchronise every step);
an out-of-range value there yields NaN in that sample's outputs — the
kernels never read outside the schedule table.

NaN or inf in the data propagate elementwise (IEEE arithmetic); the
functions do not scan inputs for them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

from . import _checks as _c
from . import _fakes  # noqa: F401  (registers fakes and autograd)
from . import _guidance
from . import direct as _d
from ._codes import PREDICTION, VARIANCE
from ..schedule import NoiseSchedule, WEIGHTINGS

Timesteps = Union[int, Sequence, torch.Tensor]
ScheduleLike = Union[NoiseSchedule, torch.Tensor]


def _key(key: Optional[torch.Tensor], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    if key is not None:
        if generator is not None:
            raise ValueError("pass either key or generator, not both")
        return _c.key(key, device)
    return draw_key(generator, device)


def draw_key(generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """A fresh noise key: an int64 tensor [seed, offset] drawn from
    ``generator`` (default: the global generator of ``device``).

    The draw happens on the device (one tiny kernel, no host sync), so it
    follows ``torch.manual_seed`` / the generator's state, is captured by CUDA
    graphs, and two draws are independent streams. The fused kernels expand
    the key into Gaussian noise (see fastdiff/reference/noise.py).
    """
    if generator is not None:
        _c.generator(generator)
        device = generator.device
    elif device is not None and not isinstance(device, torch.device):
        if not isinstance(device, (str, int)) or isinstance(device, bool):
            raise TypeError(f"device must be a torch.device, a str or an int, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: {e}") from e
    device = device if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} is not available (no CUDA device)")
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)


# ------------------------------------------------------------- forward ------
def q_sample(x0: torch.Tensor, t: Timesteps, schedule: ScheduleLike, noise: Optional[torch.Tensor] = None, *,
             generator: Optional[torch.Generator] = None, key: Optional[torch.Tensor] = None,
             return_noise: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Forward-noise x0 to timestep t: x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps.

    Args:
        x0: clean data, (N, ...) float32/float16/bfloat16/float64, any layout.
        t: timesteps, int or (N,) integer tensor, in [0, T).
        schedule: a :class:`NoiseSchedule` (or its float64 ``alphas_cumprod``).
        noise: eps, same shape/dtype/device as x0. If None it is drawn inside
            the kernel (Philox) from ``key``, or from a key drawn from
            ``generator`` (default: the global generator).
        return_noise: with in-kernel noise, also write the noise out (False
            saves a full tensor write; regenerate it later from the key).

    Returns:
        ``(x_t, noise)``: x_t like x0 (x0's layout); noise is the tensor
        given, the drawn noise, or None (``return_noise=False``).
        Differentiable with respect to x0 (and noise when given).
    """
    _c.batch(x0, "x0")
    dev = x0.device
    abar = _c.alphas_cumprod(schedule, dev)
    tt, _ = _c.timesteps(t, x0.shape[0], dev, abar.shape[0])
    if noise is not None:
        if key is not None or generator is not None:
            raise ValueError("pass either noise or key/generator, not both")
        return _d.q_sample_noise(x0, tt, abar, _c.tensor(noise, "noise")), noise
    return _d.q_sample_key(x0, tt, abar, _key(key, generator, dev), _c.flag(return_noise, "return_noise"))


def get_velocity(x0: torch.Tensor, noise: torch.Tensor, t: Timesteps, schedule: ScheduleLike) -> torch.Tensor:
    """The v-prediction target v = sqrt(abar_t) eps - sqrt(1-abar_t) x0, with
    the coefficients computed in float64 and applied in float32 (float64 for
    float64 data)."""
    _c.data(x0, "x0")
    _c.like(noise, x0, "noise", "x0")
    abar = _c.alphas_cumprod(schedule, x0.device)
    tt, _ = _c.timesteps(t, x0.shape[0], x0.device, abar.shape[0])
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    a = _fakes.per_sample_coef(abar, tt, "a", x0, acc)
    b = _fakes.per_sample_coef(abar, tt, "b", x0, acc)
    return (a * noise.to(acc) - b * x0.to(acc)).to(x0.dtype)


# ---------------------------------------------------------------- loss ------
def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, t: Timesteps, schedule: ScheduleLike,
                   noise: Optional[torch.Tensor] = None, *, key: Optional[torch.Tensor] = None,
                   target: str = "epsilon", weighting: Union[str, torch.Tensor] = "uniform",
                   snr_gamma: float = 5.0, reduction: str = "mean",
                   store_grad: Optional[bool] = None) -> torch.Tensor:
    """Fused weighted MSE of a denoiser against the epsilon / x0 / v target.

    loss_n = w_n * mean_j (model_output - target)^2, computed in one pass
    that also produces d loss / d model_output (so backward is one multiply).

    Args:
        model_output: the model's prediction, shape/dtype/device of x0.
        x0: clean data (N, ...).
        t: the timesteps x_t was made at.
        schedule: the :class:`NoiseSchedule` (or alphas_cumprod).
        noise: the eps used to make x_t; or give ``key`` (the one q_sample
            used, e.g. ``fastdiff.q_sample(x0, t, s, key=k, return_noise=False)``)
            and the kernel regenerates eps instead of reading a stored tensor.
        target: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"``.
        weighting: ``"uniform"``, ``"min_snr"`` (gamma = ``snr_gamma``), or a
            float tensor (N,) of per-sample weights.
        reduction: ``"mean"`` (a scalar, mean over samples) or ``"none"``
            (per-sample losses, float32 (N,)).
        store_grad: where the backward gets d loss / d model_output. ``True``:
            the forward writes it (one extra tensor the size of x0 held until
            the backward), and the backward is one multiply by the incoming
            per-sample gradient. ``False``: the forward only reduces, and the
            backward recomputes the gradient in one pass (regenerating the
            noise from ``key``). ``None`` (default): stored, except for
            ``key=`` on a GPU, where recomputing moves fewer bytes (the noise
            costs no memory traffic there; on a CPU regenerating it costs more
            than the stored gradient's read and write).

    Gradients flow to model_output only.
    """
    _c.batch(x0, "x0")
    _c.tensor(model_output, "model_output")
    tgt = _c.choice(target, PREDICTION, "target")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    dev = x0.device
    abar = _c.alphas_cumprod(schedule, dev)
    n = x0.shape[0]
    tt, _ = _c.timesteps(t, n, dev, abar.shape[0])
    if (noise is None) == (key is None):
        raise ValueError("diffusion_loss needs exactly one of noise= or key=")
    if noise is not None:
        _c.tensor(noise, "noise")
    else:
        key = _c.key(key, dev)
    if isinstance(weighting, torch.Tensor):
        if weighting.shape != (n,):
            raise ValueError(f"weighting must have shape ({n},), got {tuple(weighting.shape)}")
        if weighting.is_complex() or weighting.dtype == torch.bool:
            raise TypeError(f"weighting must be a real tensor, got {weighting.dtype}")
        w = weighting.to(device=dev, dtype=torch.float32)
    else:
        _c.choice(weighting, WEIGHTINGS, "weighting")
        if weighting == "min_snr":
            _c.positive(snr_gamma, "snr_gamma")
        w = _d.loss_weights(abar, tt, weighting, target, snr_gamma)
    if store_grad is None:
        store_grad = key is None or dev.type == "cpu"
    else:
        store_grad = _c.flag(store_grad, "store_grad")
    per = _d.diffusion_loss(model_output, x0, tt, abar, w, tgt, noise=noise, key=key, store_grad=store_grad)
    return per.mean() if reduction == "mean" else per


# -------------------------------------------------------- reverse steps -----
def _step_common(model_output, t, sample, schedule, t_prev, prediction_type, clip_sample, clip_sample_range,
                 thresholding, dynamic_thresholding_ratio, sample_max_value, noise, generator, key, want_noise,
                 guidance=(None, 1.0, None)):
    """The edge checks and conversions of both reverse steps; the kernel checks the tensors' dtypes, shapes
    and devices (typed errors naming them). ``guidance``: the checked (uncond, w, factor) of
    fastdiff/ops/_guidance.py (the thresholding pre-pass needs the guided prediction)."""
    _c.batch(sample, "sample")
    _c.tensor(model_output, "model_output")
    pred = _c.choice(prediction_type, PREDICTION, "prediction_type")
    dev = sample.device
    abar = _c.alphas_cumprod(schedule, dev)
    T, n = abar.shape[0], sample.shape[0]
    tt, tv = _c.timesteps(t, n, dev, T)
    if t_prev is None:
        tp = tt - 1
    else:
        tp, pv = _c.timesteps(t_prev, n, dev, T, "t_prev", allow_final=True)
        if tv is not None and pv is not None:
            if any(p >= c for p, c in zip(pv, tv)):
                raise ValueError("t_prev must be smaller than t for every sample")
        elif tp.device.type == "cpu" and tt.device.type == "cpu" and not _c.tracing() and bool((tp >= tt).any()):
            raise ValueError("t_prev must be smaller than t for every sample")
    clip = 0.0
    if _c.flag(clip_sample, "clip_sample"):
        clip = _c.positive(clip_sample_range, "clip_sample_range")
    thresh = None
    if _c.flag(thresholding, "thresholding"):
        r = _c.number(dynamic_thresholding_ratio, "dynamic_thresholding_ratio")
        if not 0 < r <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
        mv = _c.number(sample_max_value, "sample_max_value")
        if not mv >= 1:
            raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value}")
        _c.like(sample, sample, "sample", "sample")
        _c.like(model_output, sample, "model_output", "sample")  # computed on before the kernel checks it
        mo = model_output if guidance[0] is None else _guidance.guided(model_output, *guidance).to(sample.dtype)
        thresh = _d.threshold(mo, sample, tt, abar, pred, r, mv)
    k = None
    if noise is not None:
        if key is not None or generator is not None:
            raise ValueError("pass either noise or key/generator, not both")
        _c.tensor(noise, "noise")
    elif want_noise:
        k = _key(key, _c.generator(generator), dev)
    return pred, abar, tt, tp, clip, thresh, k


def ddpm_step(model_output: torch.Tensor, t: Timesteps, sample: torch.Tensor, schedule: ScheduleLike, *,
              t_prev: Optional[Timesteps] = None, prediction_type: str = "epsilon",
              variance_type: str = "fixed_small", clip_sample: bool = False, clip_sample_range: float = 1.0,
              thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              key: Optional[torch.Tensor] = None, model_var: Optional[torch.Tensor] = None,
              uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
              guidance_rescale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM step x_t -> x_{t_prev}, fused in one kernel launch.

    Args:
        model_output: the model's output for (sample, t); for
            ``variance_type="learned"/"learned_range"`` it may carry 2C
            channels (prediction, variance values), split without copying.
        t: current timesteps (int or (N,) tensor), in [0, T).
        sample: x_t, (N, C, ...) float32/float16/bfloat16/float64.
        schedule: the :class:`NoiseSchedule` (or alphas_cumprod).
        t_prev: previous timesteps (default t - 1; -1 ends the chain). Respaced
            chains pass their own; beta'_t = 1 - abar_t/abar_prev is used.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        variance_type: ``fixed_small`` (posterior beta~), ``fixed_large``
            (beta'), their ``_log`` forms (same values; diffusers'
            fixed_large_log returns NaN), ``learned`` (model gives the
            variance), ``learned_range`` (model gives v in [-1,1]:
            log-variance = (v+1)/2 log beta' + (1-v)/2 log beta~).
        clip_sample, clip_sample_range: clamp x0_hat to +-range.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's
            dynamic thresholding (an extra pass for the per-sample quantile).
        noise / generator / key: the step's noise: a given tensor, or drawn in
            the kernel from key (or a key drawn from generator). Samples with
            t = 0 get no noise.
        model_var: the variance values explicitly (instead of 2C channels).
        uncond_output: the model's unconditional prediction for classifier-free
            guidance (model_output is then the conditional one), shape, dtype
            and device of model_output. The step kernel reads both and uses
            uncond + guidance_scale * (model_output - uncond) in place of the
            model output (one launch, no separate combine pass), in whatever
            parameterisation prediction_type says (as diffusers' pipelines).
        guidance_scale: w, a finite float (1: no guidance; uncond_output is
            then not read unless guidance_rescale > 0).
        guidance_rescale: phi in [0, 1], Lin et al. (2023): the guided
            prediction is rescaled to the conditional one's per-sample std,
            mixed by phi. This costs a reduction pre-pass over both predictions
            (the per-sample stds); the rest stays in the fused step.
            With learned variances and 2C channels, uncond_output has 2C
            channels too and only its first C are used (the variance comes
            from the conditional output).

    Returns:
        ``(prev_sample, pred_original_sample)``, both like sample.
    """
    vt = _c.choice(variance_type, VARIANCE, "variance_type")
    _c.batch(sample, "sample")
    _c.tensor(model_output, "model_output")
    if uncond_output is not None:
        _guidance.check_uncond(uncond_output, model_output)
    if vt >= 4 and model_var is None:
        if model_output.dim() < 2 or sample.dim() < 2 or model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"variance_type={variance_type!r} needs model_var, or model_output with twice "
                             f"sample's channels")
        model_output, model_var = model_output.split(sample.shape[1], dim=1)
        if uncond_output is not None:
            uncond_output = uncond_output.split(sample.shape[1], dim=1)[0]
    elif vt < 4 and model_var is not None:
        raise ValueError(f"model_var is only used with learned variance types, not {variance_type!r}")
    if model_var is not None:
        _c.tensor(model_var, "model_var")
    g = _guidance.prepare(model_output, uncond_output, guidance_scale, guidance_rescale)
    pred, abar, tt, tp, clip, thresh, k = _step_common(
        model_output, t, sample, schedule, t_prev, prediction_type, clip_sample, clip_sample_range, thresholding,
        dynamic_thresholding_ratio, sample_max_value, noise, generator, key, want_noise=True, guidance=g)
    return _d.ddpm_step(model_output, sample, tt, tp, abar, prediction=pred, variance=vt, clip=clip,
                        model_var=model_var, noise=noise, key=k, thresh=thresh, guidance=g)


def ddim_step(model_output: torch.Tensor, t: Timesteps, sample: torch.Tensor, schedule: ScheduleLike, *,
              t_prev: Optional[Timesteps] = None, eta: float = 0.0, prediction_type: str = "epsilon",
              clip_sample: bool = False, clip_sample_range: float = 1.0, thresholding: bool = False,
              dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
              final_alpha_cumprod: float = 1.0, use_clipped_model_output: bool = False,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
              key: Optional[torch.Tensor] = None, uncond_output: Optional[torch.Tensor] = None,
              guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021), one kernel launch.

    prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1 - abar_t/abar_prev).

    Args are those of :func:`ddpm_step`, plus ``eta`` (0: deterministic DDIM,
    1: DDPM-like), ``final_alpha_cumprod`` (abar used where t_prev = -1;
    diffusers' ``set_alpha_to_one``), ``use_clipped_model_output`` (re-derive
    eps from the clipped x0_hat). t_prev defaults to t - 1. Noise is drawn
    only when eta > 0.

    Classifier-free guidance (``uncond_output``, ``guidance_scale``,
    ``guidance_rescale``) as in :func:`ddpm_step`: combined inside the step
    kernel; the rescale costs a per-sample std pre-pass.

    Returns ``(prev_sample, pred_original_sample)``.
    """
    eta = _c.number(eta, "eta")
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    final_alpha_cumprod = _c.number(final_alpha_cumprod, "final_alpha_cumprod")
    if not 0 < final_alpha_cumprod <= 1:
        raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod}")
    _c.tensor(model_output, "model_output")
    g = _guidance.prepare(model_output, uncond_output, guidance_scale, guidance_rescale)
    pred, abar, tt, tp, clip, thresh, k = _step_common(
        model_output, t, sample, schedule, t_prev, prediction_type, clip_sample, clip_sample_range, thresholding,
        dynamic_thresholding_ratio, sample_max_value, noise if eta > 0 else None, generator, key,
        want_noise=eta > 0, guidance=g)
    nz = noise if eta > 0 else None
    return _d.ddim_step(model_output, sample, tt, tp, abar, prediction=pred, clip=clip, eta=eta,
                        final_alpha_cumprod=final_alpha_cumprod,
                        use_clipped_model_output=_c.flag(use_clipped_model_output, "use_clipped_model_output"),
                        noise=nz, key=k, thresh=thresh, guidance=g)


__all__ = ["q_sample", "get_velocity", "diffusion_loss", "ddpm_step", "ddim_step", "draw_key"]
