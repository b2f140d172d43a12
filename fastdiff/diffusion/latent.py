"""``LatentDiffusion``: a :class:`GaussianDiffusion` that runs in the latent
space of a frozen VAE (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models").

    vae = "path/to/vae"                            # a diffusers AutoencoderKL directory (from_pretrained)
    ld = LatentDiffusion(vae, UNet(in_ch=4, out_ch=4, ...), "scaled_linear")
    loss = ld(images)                              # encode (no grad) -> the fused DDPM loss on latents
    images = ld.sample(16, steps=50, method="ddim", class_labels=y, guidance_scale=4.0)   # decoded

Latents are ``z = (mean(q(z | x)) - shift_factor) * scaling_factor`` with the
VAE's ``config.scaling_factor`` and ``config.shift_factor`` (None: 0): the
posterior *mean*, not a draw, so the encoding of a dataset is deterministic
and can be computed once and cached (:meth:`LatentDiffusion.cache_latents`,
which the :class:`~fastdiff.train.Trainer` uses for datasets whose latents
fit in ``LATENT_CACHE_BYTES``). Decoding inverts the scaling:
``x = vae.decode(z / scaling_factor + shift_factor)``.

The VAE is frozen (``requires_grad_(False)``, always in eval mode) and is not
part of the trained model: checkpoints hold the denoiser; the VAE is found
again from ``config["vae"]`` (its path, or its config, whose weights the
trainer then saves next to the model as ``vae.safetensors``).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from .gaussian import GaussianDiffusion

Tensor = torch.Tensor

__all__ = ["LatentDiffusion", "load_vae", "LATENT_CACHE_BYTES"]

LATENT_CACHE_BYTES = 2 * 2**30
"""The trainer caches a dataset's latents when they take at most this many
bytes (float32): N * latent elements * 4 <= 2 GiB, e.g. 128k SD latents of
4x32x32 (256x256 images). Larger sets are encoded batch by batch every step."""


def load_vae(vae) -> nn.Module:
    """A diffusers ``AutoencoderKL`` from an instance, a local directory
    (``from_pretrained``, no download: ``local_files_only``) or a config dict
    (randomly initialised, ``AutoencoderKL.from_config``)."""
    if isinstance(vae, nn.Module):
        if not (hasattr(vae, "encode") and hasattr(vae, "decode") and hasattr(vae, "config")):
            raise TypeError(f"vae must be a diffusers AutoencoderKL (encode/decode/config), got {type(vae).__name__}")
        return vae
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("LatentDiffusion needs diffusers (pip install 'fastdiff[diffusers]')") from e
    if isinstance(vae, (str, os.PathLike)):
        path = os.fspath(vae)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"VAE directory {path!r} does not exist (a diffusers AutoencoderKL saved with "
                                    f"save_pretrained: config.json + weights)")
        sub = os.path.join(path, "vae")  # a whole pipeline directory: its vae/ subfolder
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(sub):
            path = sub
        try:
            return AutoencoderKL.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ValueError(f"cannot load an AutoencoderKL from {path!r}: {e}") from e
    if isinstance(vae, dict):
        cfg = {k: v for k, v in vae.items() if not k.startswith("_")}
        return AutoencoderKL.from_config(cfg)
    raise TypeError(f"vae must be an AutoencoderKL, a directory or a config dict, got {type(vae).__name__}")


class LatentDiffusion(GaussianDiffusion):
    """A Gaussian diffusion on the latents of a frozen VAE (module docstring).

    Args:
        vae: a diffusers ``AutoencoderKL``, a local directory it was saved to
            (or a pipeline directory with a ``vae/`` subfolder), or its config
            dict (random weights; tests and benchmarks).
        model: the denoiser on latents (``in_ch = out_ch =
            vae.config.latent_channels``), called as in GaussianDiffusion,
            conditioning keywords included.
        schedule, and every keyword of :class:`GaussianDiffusion`;
            ``clip_sample`` defaults to False (latents are not in [-1, 1]).
        scaling_factor, shift_factor: override the VAE config's values.

    ``forward(images, ...)`` encodes (no grad) then returns the loss on the
    latents; after :meth:`cache_latents` (``latent_inputs`` True) it takes
    latents directly. ``sample(n, ...)`` samples latents and decodes them
    (``decode=False`` returns the latents); ``encode`` / ``decode`` convert.
    """

    def __init__(self, vae, model: nn.Module, schedule="linear", *, scaling_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None, clip_sample: bool = False, **kwargs):
        vae_spec = vae
        vae = load_vae(vae)
        super().__init__(model, schedule, clip_sample=clip_sample, **kwargs)
        self.vae = vae.eval().requires_grad_(False)
        vcfg = vae.config
        sf = scaling_factor if scaling_factor is not None else getattr(vcfg, "scaling_factor", None)
        if sf is None:
            sf = vcfg.get("scaling_factor", 1.0) if hasattr(vcfg, "get") else 1.0
        sh = shift_factor if shift_factor is not None else getattr(vcfg, "shift_factor", None)
        self.scaling_factor = float(sf)
        self.shift_factor = float(sh) if sh is not None else 0.0
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        self.latent_inputs = False
        self._vae_path = os.path.abspath(os.fspath(vae_spec)) if isinstance(vae_spec, (str, os.PathLike)) else None

    # ------------------------------------------------------------ config --
    @property
    def vae_spec(self) -> dict:
        """How to find the VAE again: {"path": dir} or {"config": dict}."""
        if self._vae_path is not None:
            return {"path": self._vae_path}
        return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(self.vae.config).items()
                           if not k.startswith("_")}}

    @property
    def config(self) -> dict:
        cfg = super().config
        cfg.update(vae=self.vae_spec, scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)
        return cfg

    @classmethod
    def from_config(cls, model: nn.Module, config: dict, vae=None) -> "LatentDiffusion":
        """Rebuild around ``model`` from :attr:`config`; ``vae`` overrides the
        recorded one (e.g. an AutoencoderKL whose weights were loaded)."""
        cfg = dict(config)
        spec = cfg.pop("vae")
        if vae is None:
            vae = spec.get("path") or spec.get("config")
        scaling, shift = cfg.pop("scaling_factor", None), cfg.pop("shift_factor", None)
        base = GaussianDiffusion.from_config(model, cfg)  # parses the schedule and the rest
        kw = dict(num_timesteps=base.num_timesteps, sample_shape=base.sample_shape, target=base.target,
                  weighting=base.weighting, snr_gamma=base.snr_gamma, variance_type=base.variance_type,
                  clip_sample=base.clip_sample, clip_sample_range=base.clip_sample_range,
                  cond_drop_prob=base.cond_drop_prob)
        return cls(vae, model, base.schedule, scaling_factor=scaling, shift_factor=shift, **kw)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in eval mode
        return self

    # ------------------------------------------------------ encode/decode --
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (N, C, H, W) in the VAE's range ([-1, 1]) -> float32 latents
        ``(posterior mean - shift_factor) * scaling_factor``."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
            raise ValueError(f"images must be a float tensor (N, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        p = next(self.vae.parameters())
        dist = self.vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
        z = dist.mode() if hasattr(dist, "mode") else dist.mean
        return ((z.float() - self.shift_factor) * self.scaling_factor).contiguous()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (N, c, h, w) -> float32 images in the VAE's range."""
        p = next(self.vae.parameters())
        z = latents.to(device=p.device, dtype=p.dtype) / self.scaling_factor + self.shift_factor
        out = self.vae.decode(z)
        return (out.sample if hasattr(out, "sample") else out[0]).float()

    def cache_latents(self, dataset, *, batch_size: int = 64, device=None, progress: bool = False):
        """Encode every item of ``dataset`` once (images, or (image, label)
        items) and return an :class:`~fastdiff.data.InMemoryDataset` of the
        float32 latents, on the CPU, with the dataset's labels/classes. Sets
        ``latent_inputs`` so :meth:`forward` takes latents from then on."""
        from ..data import InMemoryDataset

        dev = torch.device(device) if device is not None else self.device
        get = getattr(dataset, "get_batch", None)
        parts = []
        n = len(dataset)
        it = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="encoding latents")
        for s in it:
            idx = torch.arange(s, min(s + batch_size, n))
            if get is not None:
                x = get(idx)
            else:
                x = torch.stack([(lambda it_: it_[0] if isinstance(it_, (tuple, list)) else it_)(dataset[int(i)])
                                 for i in idx])
            parts.append(self.encode(x.to(dev)).cpu())
        labels = getattr(dataset, "labels", None)
        out = InMemoryDataset(torch.cat(parts), f"latents of {getattr(dataset, 'name', type(dataset).__name__)}",
                              labels=labels, classes=getattr(dataset, "classes", None) if labels is not None
                              else None)
        self.latent_inputs = True
        if self.sample_shape is None:
            self.sample_shape = tuple(out.sample_shape)
        return out

    def latent_bytes(self, dataset) -> int:
        """float32 bytes the dataset's latents would take (encodes item 0)."""
        item = dataset[0]
        item = item[0] if isinstance(item, (tuple, list)) else item
        z = self.encode(item.unsqueeze(0).to(self.device))
        return len(dataset) * z[0].numel() * 4

    # ----------------------------------------------------------- training --
    def forward(self, x: Tensor, **kwargs) -> Tensor:
        """The loss: images are encoded first (no grad) unless
        ``latent_inputs`` (after :meth:`cache_latents`); keywords as
        :meth:`GaussianDiffusion.forward`."""
        z = x if self.latent_inputs else self.encode(x)
        return super().forward(z, **kwargs)

    @torch.no_grad()
    def sample(self, n: int, *, decode: bool = True, **kwargs):
        """:meth:`GaussianDiffusion.sample` in latent space, then decoded to
        images (``decode=False``: the latents). With ``return_trajectory`` the
        trajectory stays in latent space."""
        out = super().sample(n, **kwargs)
        if not decode:
            return out
        if isinstance(out, tuple):
            return (self.decode(out[0]),) + tuple(out[1:])
        return self.decode(out)
