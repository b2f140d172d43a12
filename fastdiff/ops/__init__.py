"""Public fused operators (re-exports only).

* :mod:`.diffusion`: the step family: ``q_sample``, ``get_velocity``,
  ``diffusion_loss``, ``ddpm_step``, ``ddim_step``, ``draw_key``;
* :mod:`.blocks`: the U-Net block family: ``group_norm_act``, ``attention``;
* :mod:`.multistep`: the multistep sampler update: ``multistep_step``, ``multistep_threshold``;
* :mod:`._backend`: ``set_backend``, ``available_backends``;
* :mod:`._guidance`: ``classifier_free_guidance`` (the unfused combine; the
  steps take ``uncond_output=`` / ``guidance_scale=`` / ``guidance_rescale=``).

Each function validates its arguments (raising ``ValueError``/``TypeError``
that name the argument), then calls one ``torch.ops.fastdiff`` operator
(schemas in :mod:`._schemas`, fakes and autograd in :mod:`._fakes`), which
dispatches to the C++ CPU, CUDA C++, Triton or reference kernel.
"""
from __future__ import annotations

from . import _backend, _fakes  # noqa: F401  (_fakes registers the fakes and autograd)
from .blocks import attention, fused_attention_supported, group_norm_act
from .diffusion import ddim_step, ddpm_step, diffusion_loss, draw_key, get_velocity, q_sample
from .multistep import multistep_step, multistep_threshold
from ._guidance import classifier_free_guidance

set_backend = _backend.set_backend
available_backends = _backend.available_backends

__all__ = ["q_sample", "get_velocity", "diffusion_loss", "ddpm_step", "ddim_step", "draw_key", "set_backend",
           "available_backends", "group_norm_act", "attention", "fused_attention_supported", "multistep_step",
           "multistep_threshold", "classifier_free_guidance"]
