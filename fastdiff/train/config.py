"""The training configuration: :class:`TrainConfig`."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch


# ------------------------------------------------------------------ config --
@dataclass
class TrainConfig:
    """Training settings. Every field is validated by :meth:`validate`
    (called by :class:`Trainer`), which raises a ValueError naming the field.

    Attributes:
        steps: total optimizer steps (>= 1); on resume, training continues up to this.
        batch_size: samples per step per process (the global batch is
            ``batch_size * world_size`` under torchrun).
        lr: peak AdamW learning rate. weight_decay: AdamW's decoupled decay.
        adam_betas: AdamW's (beta1, beta2).
        warmup_steps: linear warm-up of the lr over this many steps
            (lr * min(1, (k + 1) / warmup_steps) at 0-based step k; 0: none).
        lr_schedule: ``"constant"`` after warm-up (DDPM) or ``"cosine"``
            (decays to 0 at ``steps``).
        grad_clip: clip gradients to this global L2 norm (0: no clipping;
            the norm is still measured and logged).
        ema_decay: EMA decay in [0, 1) of the shadow weights used for sampling.
        ema_warmup: use ``min(ema_decay, (1 + k) / (10 + k))`` at the k-th
            update, so the EMA forgets its random initialisation quickly.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 also
            scales the loss with a GradScaler). Weights and optimizer stay fp32.
        channels_last: image models and batches in channels_last memory format.
        compile: ``torch.compile`` the training forward: True (inductor) or a
            backend name such as ``"aot_eager"``; False: eager.
        seed: seeds the data order, the timesteps/noise and dropout (the
            Trainer reseeds the global torch RNG, which dropout uses).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... None: CUDA when
            available (``cuda:LOCAL_RANK`` under torchrun), else the CPU.
        out_dir: where checkpoints, logs, plots and samples go.
        log_every: log (loss, lr, grad norm, time) averaged over this many steps;
            also how often a non-finite loss is detected.
        checkpoint_every: checkpoint every this many steps (0: only at the end).
        sample_every: write a sample grid every this many steps (0: only at the end).
        num_samples: samples per grid (0: no sampling).
        sample_steps: sampler steps (None: all num_timesteps). sample_method:
            ``"ddpm"`` or ``"ddim"``.
        num_workers: DataLoader worker processes for datasets read from disk
            (in-memory datasets are indexed directly, without a DataLoader).
        progress: show a tqdm progress bar (rank 0 only).
        cache_latents: latent diffusion only: encode the dataset once and
            train on the cached latents. None (auto): when they fit in
            ``fastdiff.diffusion.latent.LATENT_CACHE_BYTES`` (2 GiB of
            float32); True: always; False: encode every batch in the step.
        step_mode: ``"eager"`` (op by op), ``"compile"`` (the whole step after
            the random draws under ``torch.compile(fullgraph=True)``, backend
            from ``compile`` if it is a name, else inductor) or ``"graph"``
            (the whole step captured in one CUDA graph and replayed; on a CPU
            it falls back to "compile"); see :mod:`fastdiff.train.step`.
        device_data: where an in-memory dataset's samples live: ``"auto"``
            (on the training device when they fit: up to 1/4 of the GPU's
            memory; always on a CPU), ``"on"`` or ``"off"`` (gathered on the
            host and copied per batch). Image data whose values are exactly
            k/127.5 - 1 (8-bit images: CIFAR-10, folders) are kept as uint8
            and converted on the device.
        random_flip: flip each image horizontally with probability 1/2 (the
            DDPM CIFAR-10 augmentation); the flips are a function of (seed,
            step, rank), so resume stays exact; applied on the device with
            device-resident data.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    precision: str = "fp32"
    channels_last: bool = False
    compile: Union[bool, str] = False
    seed: int = 0
    device: Optional[str] = None
    out_dir: str = "runs/default"
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 0
    num_samples: int = 64
    sample_steps: Optional[int] = None
    sample_method: str = "ddpm"
    num_workers: int = 0
    progress: bool = True
    cache_latents: Optional[bool] = None
    step_mode: str = "eager"
    device_data: str = "auto"
    random_flip: bool = False

    def validate(self) -> "TrainConfig":
        def bad(name, want):
            raise ValueError(f"TrainConfig.{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("steps", "batch_size", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an int >= 1")
        for name in ("warmup_steps", "checkpoint_every", "sample_every", "num_samples", "num_workers", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an int >= 0")
        if not is_num(self.lr) or self.lr <= 0:
            bad("lr", "a finite number > 0")
        for name in ("weight_decay", "grad_clip"):
            if not is_num(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "a finite number >= 0")
        if not is_num(self.ema_decay) or not 0 <= self.ema_decay < 1:
            bad("ema_decay", "a number in [0, 1)")
        b = self.adam_betas
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(is_num(v) and 0 <= v < 1 for v in b)):
            bad("adam_betas", "a pair of numbers in [0, 1)")
        self.adam_betas = tuple(float(v) for v in b)
        if self.precision not in ("fp32", "bf16", "fp16"):
            bad("precision", "one of 'fp32', 'bf16', 'fp16'")
        if self.lr_schedule not in ("constant", "cosine"):
            bad("lr_schedule", "'constant' or 'cosine'")
        if self.step_mode not in ("eager", "compile", "graph"):
            bad("step_mode", "one of 'eager', 'compile', 'graph'")
        if self.device_data not in ("auto", "on", "off"):
            bad("device_data", "one of 'auto', 'on', 'off'")
        if not isinstance(self.random_flip, bool):
            bad("random_flip", "a bool")
        if self.sample_method not in ("ddpm", "ddim"):
            bad("sample_method", "'ddpm' or 'ddim'")
        if self.sample_steps is not None and (not is_int(self.sample_steps) or self.sample_steps < 1):
            bad("sample_steps", "None or an int >= 1")
        if not isinstance(self.compile, (bool, str)) or (isinstance(self.compile, str) and not self.compile):
            bad("compile", "a bool or a torch.compile backend name")
        if not isinstance(self.out_dir, (str, os.PathLike)) or not os.fspath(self.out_dir):
            bad("out_dir", "a non-empty path")
        if self.cache_latents is not None and not isinstance(self.cache_latents, bool):
            bad("cache_latents", "None or a bool")
        for name in ("channels_last", "progress", "ema_warmup"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                bad("device", "None or a torch device string such as 'cpu' or 'cuda:0'")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from a dict (e.g. a checkpoint's), ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "adam_betas" else v) for k, v in d.items() if k in names})
