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

from collections.abc import Sequence
from typing import Optional, Union

import torch

from . import _fakes  # noqa: F401  (registers fakes and autograd)
from . import _guidance
from ._codes import PREDICTION, VARIANCE, code
from ._schemas import op
from ..schedule import NoiseSchedule, loss_weight

Timesteps = Union[int, Sequence, torch.Tensor]
ScheduleLike = Union[NoiseSchedule, torch.Tensor]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------- checks ----
def _check_data(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (shape (N, ...)), got a scalar")
    return x


def _check_like(x, ref: torch.Tensor, name: str, ref_name: str) -> torch.Tensor:
    _check_data(x, name)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")
    return x


def _alphas_cumprod(schedule: ScheduleLike, device: torch.device, name: str = "schedule") -> torch.Tensor:
    if isinstance(schedule, NoiseSchedule):
        table = schedule.alphas_cumprod
    elif isinstance(schedule, torch.Tensor):
        table = schedule
    else:
        raise TypeError(f"{name} must be a fastdiff.NoiseSchedule or an alphas_cumprod tensor, got "
                        f"{type(schedule).__name__}")
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError(f"{name}: alphas_cumprod must be a non-empty 1-D table, got shape {tuple(table.shape)}")
    if not table.is_floating_point():
        raise TypeError(f"{name}: alphas_cumprod must be floating point, got {table.dtype}")
    if table.device != device:
        if table.device.type != "cpu":
            raise ValueError(f"{name} is on {table.device} but the data is on {device}; move it with "
                             f"schedule.to({str(device)!r})")
        table = table.to(device)  # a CPU table used with GPU data: copied (cache it with .to(device))
    return table.to(torch.float64)


def _tracing() -> bool:
    """Under torch.compile tracing no value can be read on the host; the
    kernels' own guard (NaN for an out-of-range t) covers that case."""
    return torch.compiler.is_compiling()


def _timesteps(t: Timesteps, n: int, device: torch.device, T: int, name: str = "t",
               allow_final: bool = False) -> torch.Tensor:
    """t as an int64 (N,) tensor on ``device``; host-side range check when t
    is not already on a GPU."""
    lo = -1 if allow_final else 0
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(t, int):
        if not lo <= t < T:
            raise ValueError(f"{name}={t} is out of range [{lo}, {T})")
        return torch.full((n,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except Exception as e:
            raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor") from e
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1).expand(n)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() and not _tracing():
        mn, mx = int(t.min()), int(t.max())
        if mn < lo or mx >= T:
            raise ValueError(f"{name} has values in [{mn}, {mx}], outside [{lo}, {T})")
    elif t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device} but the data is on {device}")
    return t.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()


def _key(key: Optional[torch.Tensor], generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    if key is not None:
        if not isinstance(key, torch.Tensor) or key.shape != (2,) or key.dtype != torch.int64:
            raise TypeError("key must be an int64 tensor of shape (2,) ([seed, offset]); make one with "
                            "fastdiff.draw_key()")
        return key.to(device)
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
        device = generator.device
    device = torch.device(device) if device is not None else torch.device("cpu")
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
    _check_data(x0, "x0")
    abar = _alphas_cumprod(schedule, x0.device)
    tt = _timesteps(t, x0.shape[0], x0.device, abar.shape[0])
    if noise is not None:
        if key is not None or generator is not None:
            raise ValueError("pass either noise or key/generator, not both")
        _check_like(noise, x0, "noise", "x0")
        return op("q_sample")(x0, tt, abar, noise), noise
    k = _key(key, generator, x0.device)
    xt, nz = op("q_sample_rng")(x0, tt, abar, k, bool(return_noise))
    return xt, (nz if return_noise else None)


def get_velocity(x0: torch.Tensor, noise: torch.Tensor, t: Timesteps, schedule: ScheduleLike) -> torch.Tensor:
    """The v-prediction target v = sqrt(abar_t) eps - sqrt(1-abar_t) x0, with
    the coefficients computed in float64 and applied in float32 (float64 for
    float64 data)."""
    _check_data(x0, "x0")
    _check_like(noise, x0, "noise", "x0")
    abar = _alphas_cumprod(schedule, x0.device)
    tt = _timesteps(t, x0.shape[0], x0.device, abar.shape[0])
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
    _check_data(x0, "x0")
    _check_like(model_output, x0, "model_output", "x0")
    tgt = code(target, PREDICTION, "target")
    abar = _alphas_cumprod(schedule, x0.device)
    n = x0.shape[0]
    tt = _timesteps(t, n, x0.device, abar.shape[0])
    if (noise is None) == (key is None):
        raise ValueError("diffusion_loss needs exactly one of noise= or key=")
    if noise is not None:
        _check_like(noise, x0, "noise", "x0")
    elif not isinstance(key, torch.Tensor) or key.shape != (2,) or key.dtype != torch.int64:
        raise TypeError("key must be the int64 (2,) tensor that q_sample used")
    else:
        key = key.to(x0.device)
    if isinstance(weighting, torch.Tensor):
        if weighting.shape != (n,):
            raise ValueError(f"weighting must have shape ({n},), got {tuple(weighting.shape)}")
        w = weighting.to(device=x0.device, dtype=torch.float32)
    else:
        w = loss_weight(abar, tt, weighting, target, snr_gamma).to(x0.device)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if store_grad is None:
        store_grad = key is None or x0.device.type == "cpu"
    need_grad = bool(store_grad and torch.is_grad_enabled() and model_output.requires_grad)
    per, _ = op("diffusion_loss")(model_output, x0, tt, abar, noise, key, w, tgt, need_grad)
    return per.mean() if reduction == "mean" else per


# -------------------------------------------------------- reverse steps -----
def _threshold(model_output, sample, tt, abar, pred, ratio, max_value):
    """Per-sample dynamic-thresholding s (an extra pass: the quantile needs
    the whole x0_hat of a sample before the fused step can use it)."""
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    a = _fakes.per_sample_coef(abar, tt, "a", sample, acc)
    b = _fakes.per_sample_coef(abar, tt, "b", sample, acc)
    o, x = model_output.to(acc), sample.to(acc)
    x0 = (x - b * o) / a if pred == 0 else (o if pred == 1 else a * x - b * o)
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    return torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value).contiguous()


def _step_common(model_output, t, sample, schedule, t_prev, prediction_type, clip_sample, clip_sample_range,
                 thresholding, dynamic_thresholding_ratio, sample_max_value, noise, generator, key, want_noise,
                 guidance=(None, 1.0, None)):
    _check_data(sample, "sample")
    _check_like(model_output, sample, "model_output", "sample")
    pred = code(prediction_type, PREDICTION, "prediction_type")
    abar = _alphas_cumprod(schedule, sample.device)
    T, n = abar.shape[0], sample.shape[0]
    tt = _timesteps(t, n, sample.device, T)
    if t_prev is None:
        tp = tt - 1
    else:
        tp = _timesteps(t_prev, n, sample.device, T, "t_prev", allow_final=True)
        if tp.device.type == "cpu" and tt.device.type == "cpu" and not _tracing() and bool((tp >= tt).any()):
            raise ValueError("t_prev must be smaller than t for every sample")
    clip = float(clip_sample_range) if clip_sample else 0.0
    if clip_sample and not clip > 0:
        raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
    thresh = None
    if thresholding:
        if not 0 < dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {dynamic_thresholding_ratio}")
        mo = model_output if guidance[0] is None else _guidance.guided(model_output, *guidance).to(sample.dtype)
        thresh = _threshold(mo, sample, tt, abar, pred, dynamic_thresholding_ratio, sample_max_value)
    k = None
    if noise is not None:
        if key is not None or generator is not None:
            raise ValueError("pass either noise or key/generator, not both")
        _check_like(noise, sample, "noise", "sample")
    elif want_noise:
        k = _key(key, generator, sample.device)
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
    vt = code(variance_type, VARIANCE, "variance_type")
    if uncond_output is not None and isinstance(model_output, torch.Tensor):
        _guidance.check_uncond(uncond_output, model_output)
    if vt >= 4 and model_var is None:
        if not isinstance(model_output, torch.Tensor) or model_output.dim() < 2 or sample.dim() < 2 or \
                model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"variance_type={variance_type!r} needs model_var, or model_output with twice "
                             f"sample's channels")
        model_output, model_var = model_output.split(sample.shape[1], dim=1)
        if uncond_output is not None:
            uncond_output = uncond_output.split(sample.shape[1], dim=1)[0]
    elif vt < 4 and model_var is not None:
        raise ValueError(f"model_var is only used with learned variance types, not {variance_type!r}")
    if model_var is not None:
        _check_like(model_var, sample, "model_var", "sample")
    _check_data(model_output, "model_output")
    g = _guidance.prepare(model_output, uncond_output, guidance_scale, guidance_rescale)
    pred, abar, tt, tp, clip, thresh, k = _step_common(
        model_output, t, sample, schedule, t_prev, prediction_type, clip_sample, clip_sample_range, thresholding,
        dynamic_thresholding_ratio, sample_max_value, noise, generator, key, want_noise=True, guidance=g)
    return op("ddpm_step")(model_output, sample, tt, tp, abar, model_var, noise, k, thresh, pred, vt, clip, *g)


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
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not 0 < final_alpha_cumprod <= 1:
        raise ValueError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod}")
    _check_data(model_output, "model_output")
    g = _guidance.prepare(model_output, uncond_output, guidance_scale, guidance_rescale)
    pred, abar, tt, tp, clip, thresh, k = _step_common(
        model_output, t, sample, schedule, t_prev, prediction_type, clip_sample, clip_sample_range, thresholding,
        dynamic_thresholding_ratio, sample_max_value, noise if eta > 0 else None, generator, key,
        want_noise=eta > 0, guidance=g)
    nz = noise if eta > 0 else None
    return op("ddim_step")(model_output, sample, tt, tp, abar, nz, k, thresh, pred, clip, float(eta),
                           float(final_alpha_cumprod), bool(use_clipped_model_output), *g)


__all__ = ["q_sample", "get_velocity", "diffusion_loss", "ddpm_step", "ddim_step", "draw_key"]
