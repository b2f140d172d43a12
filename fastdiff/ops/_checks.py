"""The public argument checks: what the Python wrappers (ops/diffusion.py,
ops/blocks.py, ops/multistep.py) check before calling an operator.

They check only what the kernels cannot: that an argument is a tensor at
all (a ``TypeError`` naming it, instead of a dispatcher error), option
strings, Python numbers, the conversion of timesteps to an int64 (N,)
tensor and their range on the host, and the schedule table. Dtypes, shapes
and devices of the tensors that reach an operator are checked once, by the
operator itself (csrc/host.h for the C++ kernels, :mod:`._kernel_checks` for
the Python ones and the fakes), which raises ``TypeError`` / ``ValueError``
naming the argument. Paths that compute on the tensors before the operator
runs (thresholding, ``get_velocity``) check them in full here first
(:func:`like`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..schedule import NoiseSchedule

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SMALL_N = 64  # up to this many host timesteps are range-checked in Python (tolist), beyond with one aminmax


def tensor(x, name: str):
    """x, which must be a torch.Tensor (TypeError naming it otherwise)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def batch(x, name: str):
    """A tensor with a batch dimension (its shape[0] is read on the host)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (shape (N, ...)), got a scalar")
    return x


def data(x, name: str, min_dim: int = 1, what: str = "shape (N, ...)"):
    """A float32/float16/bfloat16/float64 tensor with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have {what}, got {tuple(x.shape)}")
    return x


def like(x, ref: torch.Tensor, name: str, ref_name: str):
    """x is a tensor with ref's shape, dtype and device (for paths that compute before the kernel checks)."""
    data(x, name)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")
    return x


def flag(v, name: str) -> bool:
    """A bool option (Python bool, or a numpy/torch bool scalar)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, torch.Tensor) or not hasattr(v, "__bool__") or isinstance(v, (str, bytes, list, tuple, dict)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    if isinstance(v, (int, float)) and v not in (0, 1):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return bool(v)


def number(v, name: str) -> float:
    """A real Python number (int or float, not bool) as a float; NaN is left to the caller's range check."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            import numpy as np
            if isinstance(v, (np.integer, np.floating)):
                return float(v)
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    return float(v)


def positive(v, name: str) -> float:
    f = number(v, name)
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return f


def choice(value, choices: tuple, name: str) -> int:
    """The index of ``value`` in ``choices`` (the integer code of an option string)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return choices.index(value)


def alphas_cumprod(schedule, device: torch.device, name: str = "schedule") -> torch.Tensor:
    """The float64 abar table of ``schedule`` on ``device``: a NoiseSchedule's
    (cached copy per device, see :meth:`NoiseSchedule.alphas_cumprod_on`) or a
    given 1-D float tensor (used as is when already float64 on ``device``)."""
    if isinstance(schedule, NoiseSchedule):
        return schedule.alphas_cumprod_on(device)
    if not isinstance(schedule, torch.Tensor):
        raise TypeError(f"{name} must be a fastdiff.NoiseSchedule or an alphas_cumprod tensor, got "
                        f"{type(schedule).__name__}")
    table = schedule
    if table.dtype == torch.float64 and table.device == device and table.dim() == 1 and table.shape[0] > 0:
        return table
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError(f"{name}: alphas_cumprod must be a non-empty 1-D table, got shape {tuple(table.shape)}")
    if not table.is_floating_point():
        raise TypeError(f"{name}: alphas_cumprod must be floating point, got {table.dtype}")
    if table.device != device:
        if table.device.type != "cpu":
            raise ValueError(f"{name} is on {table.device} but the data is on {device}; move it with "
                             f"schedule.to({str(device)!r})")
        table = table.to(device)  # a CPU table used with GPU data: copied (pass a NoiseSchedule to cache it)
    return table.to(torch.float64)


def tracing() -> bool:
    """Under torch.compile tracing no value can be read on the host; the
    kernels' own guard (NaN for an out-of-range t) covers that case."""
    return torch.compiler.is_compiling()


def host_range(t: torch.Tensor, name: str, lo: int, hi: int) -> Optional[list]:
    """Raise ValueError unless every value of the CPU int tensor t lies in
    [lo, hi); returns the values as a list when it read them (small t)."""
    n = t.numel()
    if n == 0:
        return []
    if n <= _SMALL_N:
        vals = (t if t.dim() == 1 else t.reshape(-1)).tolist()
        mn, mx = min(vals), max(vals)
    else:
        vals = None
        mn, mx = (int(v) for v in torch.aminmax(t))
    if mn < lo or mx >= hi:
        raise ValueError(f"{name} has values in [{mn}, {mx}], outside [{lo}, {hi})")
    return vals


def timesteps(t, n: int, device: torch.device, T: int, name: str = "t", allow_final: bool = False):
    """(t as an int64 (n,) tensor on ``device``, its values as a list or None).
    Host timesteps (ints, sequences, CPU tensors) are range-checked against
    [0, T) ([-1, T) with ``allow_final``); timesteps already on a GPU, or
    seen while torch.compile traces, are not (that would synchronise)."""
    lo = -1 if allow_final else 0
    if isinstance(t, torch.Tensor):
        if t.dtype == torch.int64 and t.dim() == 1 and t.shape[0] == n:  # the common case, cheaply
            vals = None
            if t.device.type == "cpu" and not tracing():
                vals = host_range(t, name, lo, T)
            if t.device != device:
                if t.device.type != "cpu":
                    raise ValueError(f"{name} is on {t.device} but the data is on {device}")
                t = t.to(device, non_blocking=True)
            return (t if t.is_contiguous() else t.contiguous()), vals
    elif isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    elif isinstance(t, int):
        if not lo <= t < T:
            raise ValueError(f"{name}={t} is out of range [{lo}, {T})")
        return torch.full((n,), t, dtype=torch.int64, device=device), [t] * n
    else:
        try:
            import numpy as np
            if isinstance(t, np.integer):
                return timesteps(int(t), n, device, T, name, allow_final)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(t, (list, tuple)) and type(t).__name__ != "ndarray":
            raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got "
                            f"{type(t).__name__}")
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
    vals = None
    if t.device.type == "cpu" and not tracing():
        vals = host_range(t, name, lo, T)
    elif t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device} but the data is on {device}")
    return t.to(device=device, dtype=torch.int64, non_blocking=True).contiguous(), vals


def key(k, device: torch.device, name: str = "key") -> torch.Tensor:
    """A given noise key: an int64 (2,) tensor, moved to ``device`` if on the CPU."""
    if not isinstance(k, torch.Tensor) or k.shape != (2,) or k.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of shape (2,) ([seed, offset]); make one with "
                        "fastdiff.draw_key()")
    return k if k.device == device else k.to(device)


def generator(g, name: str = "generator"):
    if g is not None and not isinstance(g, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(g).__name__}")
    return g
