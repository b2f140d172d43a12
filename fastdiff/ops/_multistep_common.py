"""Argument checks and the layout rule of the multistep operator, shared by
the public wrapper, the fake and the Python kernels (reference, Triton).
csrc/cpu/multistep.cpp states the same rules for the C++ kernels.

Layout: history and last_sample are persistent state updated in place, so
they cannot be copied; they fix the *working layout* of a call. The working
layout is that of one history slot (K > 0), else of last_sample (when kept),
else canonical(sample). model_output, sample and a given noise are read in
that layout (copied first if theirs differs), the outputs are returned in it,
and the in-kernel noise stream follows its memory order.
"""
from __future__ import annotations

import torch

from ..reference.multistep import MAX_HISTORY, NCOEF
from ._layout import is_batch_major_dense, is_non_overlapping_and_dense

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def working_layout(sample: torch.Tensor, history: torch.Tensor, last_sample: torch.Tensor) -> torch.Tensor:
    """A tensor with sample's shape whose strides are the working layout
    (a view of the state when there is one; never written)."""
    if history.shape[0] > 0:
        return history[0]
    if last_sample.numel() > 0:
        return last_sample
    return sample if is_batch_major_dense(sample) else torch.empty(sample.shape, dtype=sample.dtype,
                                                                   device=sample.device)


def empty_working(layout: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor with ``layout``'s shape and strides."""
    return torch.empty_strided(layout.shape, layout.stride(), dtype=dtype, device=layout.device)


def in_layout(x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """x with exactly layout's strides (copied only if needed)."""
    if x.stride() == layout.stride() and is_non_overlapping_and_dense(x):
        return x
    out = empty_working(layout, x.dtype)
    out.copy_(x)
    return out


def check(model_output, sample, history, last_sample, coeffs, step_index, noise, key, thresh, clip_range,
          exc=None) -> None:
    """Raise TypeError / ValueError naming the first bad argument. Cheap:
    no value of a device tensor is read here."""
    def fail(kind, msg):
        raise (exc or kind)(msg)

    for name, x in (("model_output", model_output), ("sample", sample)):
        if not isinstance(x, torch.Tensor):
            fail(TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            fail(TypeError, f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
        if x.dim() < 1:
            fail(ValueError, f"{name} must have a batch dimension (shape (N, ...)), got a scalar")
    dev, shape = sample.device, tuple(sample.shape)
    if tuple(model_output.shape) != shape:
        fail(ValueError, f"model_output must have the shape of sample {shape}, got {tuple(model_output.shape)}")
    if model_output.dtype != sample.dtype:
        fail(TypeError, f"model_output must have the dtype of sample ({sample.dtype}), got {model_output.dtype}")
    if model_output.device != dev:
        fail(ValueError, f"model_output must be on sample's device {dev}, got {model_output.device}")
    # history
    if not isinstance(history, torch.Tensor):
        fail(TypeError, f"history must be a torch.Tensor of shape (K, *sample.shape), got {type(history).__name__}")
    if history.dim() != len(shape) + 1 or tuple(history.shape[1:]) != shape:
        fail(ValueError, f"history must have shape (K, *sample.shape) = (K, {', '.join(map(str, shape))}), got "
             f"{tuple(history.shape)}")
    K = history.shape[0]
    if not 0 <= K <= MAX_HISTORY:
        fail(ValueError, f"history must hold K in 0..{MAX_HISTORY} slots, got K={K}")
    state_dtypes = (sample.dtype, torch.float32)
    if history.dtype not in state_dtypes:
        fail(TypeError, f"history must be {sample.dtype} (sample's dtype) or float32, got {history.dtype}")
    if history.device != dev:
        fail(ValueError, f"history must be on sample's device {dev}, got {history.device}")
    if K > 0 and history.numel() > 0 and not (is_non_overlapping_and_dense(history)
                                              and is_batch_major_dense(history[0])):
        fail(ValueError, "history must be dense with batch-major slots (e.g. torch.zeros((K, *sample.shape))); "
             "it is updated in place, so it cannot be copied")
    # last_sample
    if not isinstance(last_sample, torch.Tensor):
        fail(TypeError, f"last_sample must be a torch.Tensor (sample's shape, or empty), got "
             f"{type(last_sample).__name__}")
    if last_sample.numel() > 0 and tuple(last_sample.shape) != shape:
        fail(ValueError, f"last_sample must have sample's shape {shape} or be empty (numel 0), got "
             f"{tuple(last_sample.shape)}")
    if last_sample.numel() > 0:
        want = history.dtype if K > 0 else None
        if want is not None and last_sample.dtype != want:
            fail(TypeError, f"last_sample must have history's dtype ({want}), got {last_sample.dtype}")
        if want is None and last_sample.dtype not in state_dtypes:
            fail(TypeError, f"last_sample must be {sample.dtype} (sample's dtype) or float32, got "
                 f"{last_sample.dtype}")
        if last_sample.device != dev:
            fail(ValueError, f"last_sample must be on sample's device {dev}, got {last_sample.device}")
        if not is_batch_major_dense(last_sample) or (K > 0 and last_sample.stride() != history[0].stride()):
            fail(ValueError, "last_sample must be dense, batch-major and laid out like one history slot; it is "
                 "updated in place, so it cannot be copied")
    # coeffs
    if not isinstance(coeffs, torch.Tensor):
        fail(TypeError, f"coeffs must be a float64 tensor of shape (n_rows, {NCOEF}), got {type(coeffs).__name__}")
    if coeffs.dtype != torch.float64:
        fail(TypeError, f"coeffs must be float64, got {coeffs.dtype}")
    if coeffs.dim() != 2 or coeffs.shape[1] != NCOEF or coeffs.shape[0] < 1:
        fail(ValueError, f"coeffs must have shape (n_rows >= 1, {NCOEF}), got {tuple(coeffs.shape)}")
    if coeffs.device != dev:
        fail(ValueError, f"coeffs must be on sample's device {dev}, got {coeffs.device}")
    # step_index
    if not isinstance(step_index, torch.Tensor):
        fail(TypeError, f"step_index must be an int64 0-dim tensor, got {type(step_index).__name__}")
    if step_index.dtype != torch.int64:
        fail(TypeError, f"step_index must be int64, got {step_index.dtype}")
    if step_index.dim() != 0:
        fail(ValueError, f"step_index must be a 0-dim tensor, got shape {tuple(step_index.shape)}")
    if step_index.device != dev:
        fail(ValueError, f"step_index must be on sample's device {dev}, got {step_index.device}")
    # noise / key / thresh / clip_range
    if noise is not None and key is not None:
        fail(ValueError, "pass noise or key, not both")
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            fail(TypeError, f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != shape:
            fail(ValueError, f"noise must have the shape of sample {shape}, got {tuple(noise.shape)}")
        if noise.dtype != sample.dtype:
            fail(TypeError, f"noise must have the dtype of sample ({sample.dtype}), got {noise.dtype}")
        if noise.device != dev:
            fail(ValueError, f"noise must be on sample's device {dev}, got {noise.device}")
    if key is not None:
        if not isinstance(key, torch.Tensor) or tuple(key.shape) != (2,) or key.dtype != torch.int64:
            fail(TypeError, "key must be an int64 tensor of shape (2,) ([seed, offset]); make one with "
                 "fastdiff.draw_key()")
        if key.device != dev:
            fail(ValueError, f"key must be on sample's device {dev}, got {key.device}")
    if thresh is not None:
        if not isinstance(thresh, torch.Tensor) or thresh.dtype != torch.float32 or \
                tuple(thresh.shape) != (shape[0],):
            fail(TypeError if not isinstance(thresh, torch.Tensor) or thresh.dtype != torch.float32 else ValueError,
                 f"thresh must be a float32 tensor of shape ({shape[0]},)")
        if thresh.device != dev:
            fail(ValueError, f"thresh must be on sample's device {dev}, got {thresh.device}")
    if not isinstance(clip_range, (int, float)) or isinstance(clip_range, bool):
        fail(TypeError, f"clip_range must be a float, got {type(clip_range).__name__}")
    if not (clip_range >= 0 and clip_range != float("inf")):
        fail(ValueError, f"clip_range must be a finite number >= 0, got {clip_range}")
