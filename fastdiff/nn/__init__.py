"""Fused U-Net modules, the DDPM U-Net with presets, and drop-in patching of
existing PyTorch / diffusers models.

    from fastdiff.nn import UNet, patch
    model = UNet.from_preset("ddpm-cifar10")
    report = patch(diffusers_unet)          # fuse GroupNorm+SiLU and attention in place
    report = patch_pipeline(pipe, scheduler=True)   # U-Net, VAE and scheduler of a diffusers pipeline
"""
from .layers import (AttentionBlock, Downsample, GroupNormAct, MLPDenoiser, ResBlock, TimeEmbedding, Upsample,
                     timestep_embedding, unfused, upsample_conv)
from .patching import FastdiffAttnProcessor, PatchReport, patch, unpatch
from .pipeline import PipelineReport, patch_pipeline, unpatch_pipeline
from .unet import PRESETS, UNet

__all__ = ["GroupNormAct", "timestep_embedding", "TimeEmbedding", "ResBlock", "AttentionBlock", "Downsample",
           "Upsample", "upsample_conv", "MLPDenoiser", "UNet", "PRESETS", "patch", "unpatch", "PatchReport", "FastdiffAttnProcessor", "unfused",
           "patch_pipeline", "unpatch_pipeline", "PipelineReport"]
