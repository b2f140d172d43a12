"""DDPM/DDIM on top of the fused operators.

* :class:`GaussianDiffusion` (``gaussian.py``): training loss, samplers
  (ancestral DDPM, DDIM, respaced chains, CUDA-graph replay) and the
  variational bound in bits/dim.
* :class:`FusedDDPMScheduler`, :class:`FusedDDIMScheduler`
  (``schedulers.py``): drop-in replacements for diffusers' schedulers whose
  ``step`` is one fused kernel launch. They need the ``diffusers`` package.
* :class:`FusedDPMSolverMultistepScheduler`, :class:`FusedUniPCMultistepScheduler`,
  :class:`FusedEulerDiscreteScheduler`, :class:`FusedEulerAncestralDiscreteScheduler`,
  :class:`FusedFlowMatchEulerDiscreteScheduler` (``multistep.py``, tables in
  ``multistep_tables.py``): the multistep samplers, each step one launch of
  :func:`fastdiff.ops.multistep.multistep_step` driven by a float64
  coefficient table and a device step counter.

The names are imported lazily, so ``import fastdiff`` does not import
diffusers.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "GaussianDiffusion": ".gaussian",
    "FusedDDPMScheduler": ".schedulers",
    "FusedDDIMScheduler": ".schedulers",
    "FusedDPMSolverMultistepScheduler": ".multistep",
    "FusedUniPCMultistepScheduler": ".multistep",
    "FusedEulerDiscreteScheduler": ".multistep",
    "FusedEulerAncestralDiscreteScheduler": ".multistep",
    "FusedFlowMatchEulerDiscreteScheduler": ".multistep",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
