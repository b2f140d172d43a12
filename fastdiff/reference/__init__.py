"""Plain-PyTorch reference maths: the parity oracle for every backend."""
from .diffusion import *  # noqa: F401,F403
from .diffusion import __all__ as _d_all
from . import blocks  # noqa: F401  (U-Net block maths: group_norm_act, attention)
from . import guidance  # noqa: F401  (classifier-free guidance + rescale)
from .guidance import classifier_free_guidance, guidance_factor, guided_output  # noqa: F401
from .noise import philox4x32, philox_normal, noise_like  # noqa: F401

__all__ = list(_d_all) + ["philox4x32", "philox_normal", "classifier_free_guidance", "guidance_factor",
                          "guided_output"]
