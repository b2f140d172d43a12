"""fastdiff: fused kernels for diffusion models, as PyTorch operators.

    import fastdiff
    s = fastdiff.NoiseSchedule.make("linear", 1000, device="cuda")
    x_t, eps = fastdiff.q_sample(x0, t, s)
    loss = fastdiff.diffusion_loss(model(x_t, t), x0, t, s, eps)
    x_prev, x0_hat = fastdiff.ddpm_step(model(x_t, t), t, x_t, s)

See docs/ARCHITECTURE.md for how the pieces fit.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .ops import _schemas  # noqa: F401  (defines the torch.library schemas first)
from .ops import _backend

_backend.init()

from .ops import (  # noqa: E402
    attention,
    available_backends,
    ddim_step,
    ddpm_step,
    diffusion_loss,
    draw_key,
    get_velocity,
    group_norm_act,
    multistep_step,
    q_sample,
    set_backend,
)
from .schedule import NoiseSchedule  # noqa: E402
from ._info import info  # noqa: E402

__all__ = ["NoiseSchedule", "q_sample", "get_velocity", "diffusion_loss", "ddpm_step", "ddim_step", "draw_key",
           "group_norm_act", "attention", "multistep_step", "set_backend", "available_backends", "info", "__version__"]

from . import nn  # noqa: E402  (fused U-Net modules, the DDPM U-Net, patch/unpatch)
from .nn import UNet, patch, patch_pipeline, unpatch, unpatch_pipeline  # noqa: E402

__all__ += ["nn", "UNet", "patch", "unpatch", "patch_pipeline", "unpatch_pipeline"]

from . import diffusion  # noqa: E402  (GaussianDiffusion and the diffusers-compatible schedulers, lazily)

_LAZY = {"GaussianDiffusion", "FusedDDPMScheduler", "FusedDDIMScheduler", "FusedDPMSolverMultistepScheduler",
         "FusedUniPCMultistepScheduler", "FusedEulerDiscreteScheduler", "FusedEulerAncestralDiscreteScheduler",
         "FusedFlowMatchEulerDiscreteScheduler"}
__all__ += ["diffusion", *sorted(_LAZY)]


def __getattr__(name: str):
    # fastdiff.GaussianDiffusion etc. without importing diffusers at `import fastdiff`
    if name in _LAZY:
        return getattr(diffusion, name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
