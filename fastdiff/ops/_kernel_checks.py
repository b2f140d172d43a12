"""Kernel-level argument checks of the Python kernels (Triton, reference).

A direct ``torch.ops.fastdiff.<op>`` call with bad arguments must fail the
same way whichever backend runs it, so these functions state, with the same
exception types and the same messages (C++ formatting: sizes ``[2, 3]``,
dtypes ``Float``), the checks of the C++ kernels:

* the step family (q_sample, q_sample_rng, diffusion_loss, ddpm_step,
  ddim_step): ``csrc/host.h`` and the entry points of ``csrc/cpu/ops.cpp``.
  A wrong dtype raises ``TypeError``, a wrong shape, device or code
  ``ValueError`` (``TORCH_CHECK_TYPE`` / ``TORCH_CHECK_VALUE``);
  the diffusion_loss-specific checks raise ``RuntimeError`` as that kernel does;
* the GroupNorm ops: ``csrc/blocks.h`` (``RuntimeError``).

The public functions (:mod:`fastdiff.ops._checks`) do not repeat these:
they check what the kernels cannot see (Python types, option strings, the
range of host timesteps) and let the kernel checks name the rest.
"""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CPP_DTYPE = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def cpp_dtype(dtype: torch.dtype) -> str:
    """A dtype as ATen prints a ScalarType (``Float``, ``Long``, ...)."""
    name = _CPP_DTYPE.get(dtype)
    if name is None:  # the rarer dtypes: torch.XTensor -> X
        try:
            name = torch.empty(0, dtype=dtype).type().split(".")[-1].removesuffix("Tensor")
        except Exception:
            name = str(dtype).removeprefix("torch.")
    return name


def cpp_sizes(x: torch.Tensor) -> str:
    """Sizes as ATen prints an IntArrayRef (``[2, 3]``)."""
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


# ------------------------------------------------------------ step family ----
def check_same_like(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """host.h check_same_like."""
    if x.shape != ref.shape:
        raise ValueError(f"fastdiff: {name} must have the shape of {ref_name} {cpp_sizes(ref)}, got {cpp_sizes(x)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"fastdiff: {name} must have the dtype of {ref_name} ({cpp_dtype(ref.dtype)}), got "
                        f"{cpp_dtype(x.dtype)}")
    if x.device != ref.device:
        raise ValueError(f"fastdiff: {name} must be on {ref.device}, got {x.device}")


def check_common(x: torch.Tensor, name: str, t: torch.Tensor, abar: torch.Tensor) -> None:
    """host.h check_common: the primary tensor, t and the abar table."""
    if x.dim() < 1:
        raise ValueError(f"fastdiff: {name} must have a batch dimension")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fastdiff: {name} must be float32, float16, bfloat16 or float64, got {cpp_dtype(x.dtype)}")
    if t.dim() != 1 or t.size(0) != x.size(0):
        raise ValueError(f"fastdiff: t must have shape ({x.size(0)},), got {cpp_sizes(t)}")
    if t.dtype != torch.int64:
        raise TypeError(f"fastdiff: t must be int64, got {cpp_dtype(t.dtype)}")
    if t.device != x.device:
        raise ValueError(f"fastdiff: t must be on {x.device}, got {t.device}")
    if abar.dim() != 1 or abar.size(0) < 1:
        raise ValueError("fastdiff: alphas_cumprod must be a non-empty 1-D table")
    if abar.dtype != torch.float64:
        raise TypeError(f"fastdiff: alphas_cumprod must be float64, got {cpp_dtype(abar.dtype)}")
    if abar.device != x.device:
        raise ValueError(f"fastdiff: alphas_cumprod must be on {x.device}, got {abar.device}")


def check_key(key: torch.Tensor, x: torch.Tensor) -> None:
    """host.h check_key."""
    if key.dim() != 1 or key.size(0) != 2 or key.dtype != torch.int64:
        raise TypeError(f"fastdiff: key must be an int64 tensor of shape (2,) ([seed, offset]), got "
                        f"{cpp_dtype(key.dtype)} {cpp_sizes(key)}")
    if key.device != x.device:
        raise ValueError(f"fastdiff: key must be on {x.device}, got {key.device}")


def check_per_sample_f32(v: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """host.h check_per_sample_f32."""
    if v.dim() != 1 or v.size(0) != x.size(0) or v.dtype != torch.float32:
        raise ValueError(f"fastdiff: {name} must be a float32 tensor of shape ({x.size(0)},), got "
                         f"{cpp_dtype(v.dtype)} {cpp_sizes(v)}")
    if v.device != x.device:
        raise ValueError(f"fastdiff: {name} must be on {x.device}, got {v.device}")


def check_q_sample(x0, t, abar, noise=None, key=None) -> None:
    """ops.cpp q_sample_impl."""
    check_common(x0, "x0", t, abar)
    if noise is not None:
        check_same_like(noise, x0, "noise", "x0")
    if key is not None:
        check_key(key, x0)


def check_loss(model_output, x0, t, abar, noise, key, weight, target) -> None:
    """loss.cpp diffusion_loss_cpu."""
    check_common(x0, "x0", t, abar)
    check_same_like(model_output, x0, "model_output", "x0")
    check_per_sample_f32(weight, x0, "weight")
    if (noise is None) == (key is None):
        raise ValueError("fastdiff: diffusion_loss needs exactly one of noise, key")
    if not 0 <= int(target) <= 2:
        raise ValueError(f"fastdiff: target code must be 0, 1 or 2, got {int(target)}")
    if noise is not None:
        check_same_like(noise, x0, "noise", "x0")
    else:
        check_key(key, x0)


def check_loss_grad(grad_loss: torch.Tensor, x: torch.Tensor) -> None:
    """host.h check_loss_grad (the recomputing loss backward's incoming gradient)."""
    if not grad_loss.is_floating_point():
        raise TypeError(f"fastdiff: grad_loss must be a floating tensor, got {cpp_dtype(grad_loss.dtype)}")
    if grad_loss.dim() != 1 or grad_loss.shape[0] != x.shape[0]:
        raise ValueError(f"fastdiff: grad_loss must have shape ({x.shape[0]},), got {cpp_sizes(grad_loss)}")
    if grad_loss.device != x.device:
        raise ValueError(f"fastdiff: grad_loss must be on {x.device}, got {grad_loss.device}")


def check_step(model_output, sample, t, t_prev, abar, model_var, noise, key, thresh, prediction_type) -> None:
    """host.h prepare_step (both reverse steps)."""
    check_common(sample, "sample", t, abar)
    check_same_like(model_output, sample, "model_output", "sample")
    if t_prev.shape != t.shape or t_prev.dtype != torch.int64 or t_prev.device != t.device:
        raise ValueError("fastdiff: t_prev must be an int64 tensor like t")
    if not 0 <= int(prediction_type) <= 2:
        raise ValueError(f"fastdiff: prediction_type code must be 0, 1 or 2, got {int(prediction_type)}")
    if noise is not None and key is not None:
        raise ValueError("fastdiff: pass noise or key, not both")
    if model_var is not None:
        check_same_like(model_var, sample, "model_var", "sample")
    if noise is not None:
        check_same_like(noise, sample, "noise", "sample")
    if key is not None:
        check_key(key, sample)
    if thresh is not None:
        check_per_sample_f32(thresh, sample, "thresh")


def check_ddpm(model_output, sample, t, t_prev, abar, model_var, noise, key, thresh, prediction_type,
               variance_type) -> None:
    """ops.cpp ddpm_step_cpu."""
    vt = int(variance_type)
    if not 0 <= vt <= 5:
        raise ValueError(f"fastdiff: variance_type code must be in 0..5, got {vt}")
    if vt >= 4 and model_var is None:
        raise ValueError("fastdiff: learned variance types need model_var")
    check_step(model_output, sample, t, t_prev, abar, model_var, noise, key, thresh, prediction_type)


def check_ddim(model_output, sample, t, t_prev, abar, noise, key, thresh, prediction_type, eta) -> None:
    """ops.cpp ddim_step_cpu."""
    if not float(eta) >= 0.0:
        raise ValueError(f"fastdiff: eta must be >= 0, got {cpp_float(eta)}")
    check_step(model_output, sample, t, t_prev, abar, None, noise, key, thresh, prediction_type)


def cpp_float(v) -> str:
    # std::ostream << double: 6 significant digits, no trailing zeros ("-1", "0.5", "nan")
    return f"{float(v):g}"


# -------------------------------------------------------- GroupNorm ops ------
def gn_stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gn_vector(v, x, name: str, per_sample: bool) -> None:
    """blocks.h gn_vector."""
    if v is None:
        return
    sd = gn_stat_dtype(x)
    if v.dtype != sd:
        raise RuntimeError(f"fastdiff: {name} must be {cpp_dtype(sd)} (for {cpp_dtype(x.dtype)} x), got "
                           f"{cpp_dtype(v.dtype)}")
    if v.device != x.device:
        raise RuntimeError(f"fastdiff: {name} must be on {x.device}, got {v.device}")
    if per_sample:
        if v.dim() != 2 or v.size(0) != x.size(0) or v.size(1) != x.size(1):
            raise RuntimeError(f"fastdiff: {name} must have shape ({x.size(0)}, {x.size(1)}), got {cpp_sizes(v)}")
    elif v.dim() != 1 or v.size(0) != x.size(1):
        raise RuntimeError(f"fastdiff: {name} must have shape ({x.size(1)},), got {cpp_sizes(v)}")


def gn_check(x, weight, bias, add, scale, shift, groups, grad_y=None, mean=None, rstd=None) -> None:
    """blocks.h prepare_gn (+ the backward's grad_y / mean / rstd checks)."""
    if x.dim() < 2:
        raise RuntimeError(f"fastdiff: x must have shape (N, C, *spatial), got {cpp_sizes(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"fastdiff: x must be float32, float16, bfloat16 or float64, got {cpp_dtype(x.dtype)}")
    groups = int(groups)
    N, C = x.size(0), x.size(1)
    if groups < 1 or C % groups:
        raise RuntimeError(f"fastdiff: groups={groups} must be positive and divide the number of channels C={C}")
    S = 0 if N == 0 or C == 0 else x.numel() // (N * C)
    if N != 0 and S * (C // groups) == 0:
        raise RuntimeError(f"fastdiff: x has no elements per group (shape {cpp_sizes(x)})")
    for name, v, per in (("weight", weight, False), ("bias", bias, False), ("add", add, True),
                         ("scale", scale, True), ("shift", shift, True)):
        _gn_vector(v, x, name, per)
    if grad_y is not None and (grad_y.shape != x.shape or grad_y.dtype != x.dtype or grad_y.device != x.device):
        raise RuntimeError(f"fastdiff: grad_y must match x ({cpp_dtype(x.dtype)} {cpp_sizes(x)}), got "
                           f"{cpp_dtype(grad_y.dtype)} {cpp_sizes(grad_y)}")
    sd = gn_stat_dtype(x)
    for s in (mean, rstd):
        if s is not None and (s.dim() != 2 or s.size(0) != N or s.size(1) != groups or s.dtype != sd
                              or s.device != x.device):
            raise RuntimeError(f"fastdiff: mean and rstd must be {cpp_dtype(sd)} tensors of shape ({N}, {groups}) "
                               f"on {x.device}")
