"""Models the benchmark suites build from config (random weights, no download)."""
from __future__ import annotations

import torch


def sd_vae(block_out_channels, norm_num_groups: int, dtype: torch.dtype, device: str):
    """A randomly initialised diffusers ``AutoencoderKL`` with Stable Diffusion 1.5's block structure (2
    resnets per encoder block, 3 per decoder block, 4 latent channels) at the given widths, in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=tuple(block_out_channels),
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        layers_per_block=2, latent_channels=4, norm_num_groups=norm_num_groups)
    if dtype != torch.float32 or device != "cpu":  # (diffusers warns about any .to(dtype))
        vae = vae.to(device=device, dtype=dtype)
    return vae.eval()
