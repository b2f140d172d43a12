"""The fused multistep-sampler step: one kernel launch per sampler step.

DPM-Solver++ (1/2/3M, midpoint/heun, SDE), UniPC (bh1/bh2 with the corrector
fused into the next predictor), Euler (ancestral) and flow-matching Euler
are all one linear form over (sample, model_output, the current data
prediction x0, up to three past data predictions, UniPC's last sample and
noise), with per-step coefficients precomputed into a float64 table. The
schedulers (fastdiff/diffusion/multistep.py) build the table; this operator
applies row ``step_index`` of it and advances ``step_index`` on the device,
so a sampling loop is repeated calls with no host sync (CUDA-graph
capturable). The maths is stated in fastdiff/reference/multistep.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backend, _fakes  # noqa: F401  (fakes registered)
from . import _checks as _c
from . import _guidance
from . import _multistep_common as msc
from ._schemas import op
from ..reference.multistep import COL, COLUMNS, MAX_HISTORY, NCOEF

MULTISTEP_NCOEF = NCOEF
MULTISTEP_MAX_HISTORY = MAX_HISTORY
MULTISTEP_COLUMNS = COLUMNS


def _host_checkable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def multistep_step(model_output: torch.Tensor, sample: torch.Tensor, history: torch.Tensor,
                   last_sample: torch.Tensor, coeffs: torch.Tensor, step_index: torch.Tensor, *,
                   noise: Optional[torch.Tensor] = None, key: Optional[torch.Tensor] = None,
                   thresh: Optional[torch.Tensor] = None, clip_range: float = 0.0,
                   return_x0: bool = False, uncond_output: Optional[torch.Tensor] = None,
                   guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One multistep-sampler step, fused into one kernel; row ``i = step_index``
    of ``coeffs`` says what to compute, and ``step_index`` is then incremented.

    With ``r = coeffs[i]`` (columns in :data:`MULTISTEP_COLUMNS`) and
    ``H[j] = history[(i - j) mod K]`` (the data prediction of j steps ago)::

        x0   = c_x*sample + c_m*model_output, then threshold (thresh) or clip (clip_range)
        xc   = u_last*last_sample + u_x0*x0 + sum_j u_hj*H[j]   if u_on != 0, else sample
        prev = a_x*xc + a_m*model_output + a_x0*x0 + sum_j a_hj*H[j] + a_z*z
        if push: history[i mod K] = x0 (after H was read); last_sample = xc (if kept)

    Terms with a coefficient exactly 0 are not read. The coefficients are
    float64 and read once per call. Arithmetic: float64 for float64 data;
    float32 data is combined in float64 by the CPU kernel (the tables'
    coefficients can be large with opposite signs) and in float32 by the GPU
    kernels; float16/bfloat16 data in float32.

    Args:
        model_output: the model's output, converted by c_x/c_m (epsilon,
            sample, v or flow prediction all fit), (N, ...) float32, float16,
            bfloat16 or float64.
        sample: x at the current step, shape/dtype/device of model_output.
        history: (K, *sample.shape), K in 0..:data:`MULTISTEP_MAX_HISTORY`,
            dtype sample's or float32; a persistent ring buffer that is
            UPDATED IN PLACE. Zero-initialise it (stale slots are never read
            when their coefficients are 0, which the tables guarantee). It
            must be dense with batch-major slots (``torch.zeros((K, *shape))``).
        last_sample: UniPC's corrected sample, sample's shape and history's
            dtype and slot layout, UPDATED IN PLACE; or an empty tensor
            (numel 0) when the sampler does not keep it.
        coeffs: float64 (n_rows, :data:`MULTISTEP_NCOEF`) table on the
            device (built once per ``set_timesteps``). Rows must be finite;
            ``push`` is 0 or 1; coefficients for ages j > K and ``u_last``
            without last_sample must be 0; ``a_z`` must be 0 without noise/key.
        step_index: int64 0-dim tensor on the device: the row to apply;
            incremented by one in place after use.
        noise: z as a tensor like sample; or
        key: an int64 (2,) tensor ``[seed, offset]`` (:func:`fastdiff.draw_key`):
            step i's noise is drawn in the kernel from the stream of
            ``[seed, offset + i]``, so each step differs and the same key
            reproduces the run. Nothing is drawn when the row's a_z is 0.
        thresh: float32 (N,) per-sample bound s > 0 of dynamic thresholding,
            x0 -> clamp(x0, -s, s) / s (compute it with
            :func:`multistep_threshold`); takes precedence over clip_range.
        clip_range: > 0 clamps x0 to [-clip_range, clip_range].
        return_x0: also return x0 (after threshold/clip), else an empty tensor.
        uncond_output: the unconditional prediction for classifier-free
            guidance (model_output is the conditional one), model_output's
            shape, dtype and device: the kernel reads both and uses
            uncond + guidance_scale * (model_output - uncond) wherever the
            row reads model_output (no separate combine pass).
        guidance_scale: w, finite (1: no guidance, uncond_output not read
            unless guidance_rescale > 0).
        guidance_rescale: phi in [0, 1] (Lin et al. 2023), rescale of the
            guided prediction to the conditional one's per-sample std; costs a
            reduction pre-pass (the stds). With dynamic thresholding, compute
            ``thresh`` from the guided prediction
            (:func:`multistep_threshold` takes the same three arguments).

    Returns:
        ``(prev_sample, x0)``: new tensors with sample's shape and dtype.

    Layout: history and last_sample cannot be copied (they are updated in
    place), so one history slot (else last_sample) fixes the working layout;
    model_output, sample and noise in another layout (non-contiguous,
    channels_last with a contiguous history, ...) are first copied into it, and
    the outputs come back in it. The in-kernel noise follows its memory order.

    Errors: bad arguments raise TypeError/ValueError naming the argument.
    On the CPU a row that cannot be applied (step_index outside the table, a
    NaN/inf coefficient, ...) raises ValueError; on a GPU, where reading the
    index would synchronise, such a step instead writes NaN outputs, leaves
    history/last_sample untouched and still advances step_index.
    """
    msc.check(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh, clip_range)
    g = _guidance.prepare(model_output, uncond_output, guidance_scale, guidance_rescale)
    if _host_checkable(coeffs):
        bad = ~torch.isfinite(coeffs)
        if bool(bad.any()):
            r, c = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"coeffs must be finite; row {r} column {c} ({COLUMNS[c]}) is {coeffs[r, c].item()}")
    if _host_checkable(step_index):
        i = int(step_index)
        if not 0 <= i < coeffs.shape[0]:
            raise ValueError(f"step_index={i} is outside the coefficient table's rows [0, {coeffs.shape[0]})")
    if thresh is not None and _host_checkable(thresh) and thresh.numel() and not bool((thresh > 0).all()):
        raise ValueError("thresh must be > 0 for every sample")
    return op("multistep_step")(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh,
                                float(clip_range), bool(return_x0), *g)


def multistep_threshold(model_output: torch.Tensor, sample: torch.Tensor, coeffs: torch.Tensor,
                        step_index: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0, *,
                        uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
                        guidance_rescale: float = 0.0) -> torch.Tensor:
    """The per-sample dynamic-thresholding bound ``thresh`` for the step at
    ``step_index`` (Imagen; diffusers' ``_threshold_sample``): the ``ratio``
    quantile of |x0| over each sample, clamped to [1, max_value], where
    x0 = c_x*sample + c_m*model_output of row ``step_index``.

    Device ops only (the row is gathered on the device, nothing is read on the
    host), so it is capturable like the step itself; it is an extra pass over
    the data because the quantile needs a whole sample's x0 first. Returns a
    float32 (N,) tensor. Call it before :func:`multistep_step` (which
    increments step_index). With guidance arguments, x0 is computed from the
    guided prediction (as the step will).
    """
    _c.data(model_output, "model_output")
    _c.data(sample, "sample")
    msc.check(model_output, sample, sample.new_zeros((0,) + tuple(sample.shape)), sample.new_empty(0), coeffs,
              step_index, None, None, None, 0.0)
    ratio, max_value = _c.number(ratio, "ratio"), _c.number(max_value, "max_value")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if not max_value >= 1:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    u, w, f = _guidance.prepare(model_output, uncond_output, guidance_scale, guidance_rescale)
    acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
    row = coeffs.index_select(0, step_index.reshape(1).clamp(0, coeffs.shape[0] - 1))[0].to(acc)
    x0 = row[COL["c_x"]] * sample.to(acc) + row[COL["c_m"]] * _guidance.guided(model_output, u, w, f).to(acc)
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    # (max_value beyond float32's range means no upper bound, not an overflow error)
    hi = min(max_value, torch.finfo(torch.float32).max)
    return torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=hi).contiguous()


__all__ = ["multistep_step", "multistep_threshold", "MULTISTEP_NCOEF", "MULTISTEP_MAX_HISTORY", "MULTISTEP_COLUMNS"]
