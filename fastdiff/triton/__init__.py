"""Triton kernels of the fastdiff operators (loaded lazily by fastdiff.ops._backend).

Each launcher takes exactly the arguments of its schema (fastdiff/ops/_schemas.py)
and returns the same outputs. They read t / t_prev / the key on the device and
never synchronise with the host, so they can be captured in CUDA graphs.
"""
from .attention import attention, attention_backward
from .group_norm import group_norm_act, group_norm_act_backward
from .loss import diffusion_loss, diffusion_loss_backward
from .multistep import multistep_step
from .q_sample import q_sample, q_sample_rng
from .step import ddim_step, ddpm_step

__all__ = ["q_sample", "q_sample_rng", "diffusion_loss", "diffusion_loss_backward", "ddpm_step", "ddim_step",
           "group_norm_act", "group_norm_act_backward", "attention", "attention_backward",
           "multistep_step"]
