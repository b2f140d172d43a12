"""DDPM/DDIM on top of the fused operators.

* :class:`GaussianDiffusion` (``gaussian.py``): training loss, samplers
  (ancestral DDPM, DDIM, respaced chains, CUDA-graph replay) and the
  variational bound in bits/dim.
* :class:`LatentDiffusion` (``latent.py``): the same in the latent space of
  a frozen diffusers ``AutoencoderKL`` (encode, train/sample, decode).
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
diffusers. :func:`fused_scheduler_class` maps a diffusers scheduler to its
fused equivalent (used by :func:`fastdiff.nn.patch_pipeline`).
"""
from __future__ import annotations

import importlib
from typing import Optional

_LAZY = {
    "GaussianDiffusion": ".gaussian",
    "LatentDiffusion": ".latent",
    "FusedDDPMScheduler": ".schedulers",
    "FusedDDIMScheduler": ".schedulers",
    "FusedDPMSolverMultistepScheduler": ".multistep",
    "FusedUniPCMultistepScheduler": ".multistep",
    "FusedEulerDiscreteScheduler": ".multistep",
    "FusedEulerAncestralDiscreteScheduler": ".multistep",
    "FusedFlowMatchEulerDiscreteScheduler": ".multistep",
}

__all__ = list(_LAZY) + ["fused_scheduler_class"]


def fused_scheduler_class(scheduler) -> Optional[type]:
    """The fastdiff scheduler class that replaces ``scheduler`` (a diffusers
    scheduler instance or class ``XScheduler``): ``FusedXScheduler`` when this
    package has it, else None. A fastdiff scheduler maps to None."""
    cls = scheduler if isinstance(scheduler, type) else type(scheduler)
    if cls.__module__.startswith("fastdiff."):
        return None
    name = "Fused" + cls.__name__  # by name: a scheduler added to this package is found with no change here
    fused = __getattr__(name) if name in _LAZY else globals().get(name)
    return fused if isinstance(fused, type) else None


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
