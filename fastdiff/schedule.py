"""Noise schedules: beta_t, alpha_t, abar_t tables built in float64.

A :class:`NoiseSchedule` holds its tables as float64 tensors on one device
(``.to(device)`` moves them); the fused kernels read ``alphas_cumprod``
straight from device memory and derive every coefficient per sample in
float64, so a sampling step needs no host synchronisation and keeps full
precision at small t (where 1 - abar_t is ~1e-4 and float32 would lose three
digits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")
WEIGHTINGS = ("uniform", "min_snr")


def _betas(name: str, T: int, beta_start: float, beta_end: float, cosine_s: float, max_beta: float) -> torch.Tensor:
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=f64)
    if name == "scaled_linear":  # latent-diffusion schedule: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=f64) ** 2
    if name == "cosine":  # Nichol & Dhariwal 2021, betas capped at max_beta
        def abar(u: float) -> float:
            return math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=f64)
    if name == "sigmoid":  # GeoDiff
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=f64)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that abar_T = 0 while abar_1 is kept
    (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed", Algorithm 1). Computed in float64."""
    sab = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = sab[0].clone(), sab[-1].clone()
    sab = (sab - last) * (first / (first - last))
    abar = sab**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """The diffusion schedule and its float64 device tables.

    Build one with :meth:`make` (named schedules) or :meth:`from_betas`.
    Attributes (all float64, shape (T,)): ``betas``, ``alphas``,
    ``alphas_cumprod``; ``num_timesteps`` = T.
    """

    betas: torch.Tensor
    name: str = "custom"
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        b = torch.as_tensor(self.betas)
        if b.dim() != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
        self.betas = b.to(torch.float64)
        bad = (self.betas.detach().cpu() <= 0) | (self.betas.detach().cpu() > 1) | ~torch.isfinite(self.betas.cpu())
        if bool(bad.any()):
            raise ValueError("betas must lie in (0, 1]")
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)

    # ------------------------------------------------------------ builders --
    @classmethod
    def make(cls, name: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
             beta_end: float = 0.02, *, cosine_s: float = 0.008, max_beta: float = 0.999,
             zero_terminal_snr: bool = False, device=None) -> "NoiseSchedule":
        """A named schedule: ``linear`` (DDPM), ``scaled_linear`` (latent
        diffusion), ``cosine`` (improved DDPM, capped at ``max_beta``) or
        ``sigmoid`` (GeoDiff). ``zero_terminal_snr`` rescales it so abar_T = 0
        (use v-prediction with it: epsilon-prediction is undefined at SNR 0)."""
        if not isinstance(name, str):
            raise TypeError(f"name must be one of {SCHEDULES}, got {type(name).__name__}")
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        for arg, v in (("beta_start", beta_start), ("beta_end", beta_end), ("cosine_s", cosine_s),
                       ("max_beta", max_beta)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"{arg} must be a float, got {type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"{arg} must be finite, got {v!r}")
        if not isinstance(zero_terminal_snr, (bool, np.bool_)):
            raise TypeError(f"zero_terminal_snr must be a bool, got {type(zero_terminal_snr).__name__}")
        betas = _betas(name, num_timesteps, beta_start, beta_end, cosine_s, max_beta)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        cfg = dict(name=name, num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end,
                   cosine_s=cosine_s, max_beta=max_beta, zero_terminal_snr=zero_terminal_snr)
        s = cls(betas, name=name, config=cfg)
        return s.to(device) if device is not None else s

    @classmethod
    def from_betas(cls, betas, device=None) -> "NoiseSchedule":
        """A schedule from explicit betas (e.g. a diffusers scheduler's ``betas``)."""
        s = cls(torch.as_tensor(betas, dtype=torch.float64))
        return s.to(device) if device is not None else s

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, *, betas=None, name: str = "custom",
                            config: dict | None = None) -> "NoiseSchedule":
        """A schedule from its abar table, float64 (T,), kept as given: a
        float64 tensor is shared, not copied (a module's buffer stays the
        schedule's table). ``betas`` (same device) are derived as
        1 - abar_t / abar_{t-1} unless given exactly. No range check here, so
        building one from a device table never synchronises with the host."""
        abar = torch.as_tensor(alphas_cumprod)
        if abar.dim() != 1 or abar.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(abar.shape)}")
        abar = abar.to(torch.float64)
        if betas is None:
            betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
        else:
            betas = torch.as_tensor(betas).to(device=abar.device, dtype=torch.float64)
            if betas.shape != abar.shape:
                raise ValueError(f"betas must have shape {tuple(abar.shape)}, got {tuple(betas.shape)}")
        s = object.__new__(cls)
        s.name, s.config = name, dict(config or {})
        s.betas, s.alphas, s.alphas_cumprod = betas, 1 - betas, abar
        return s

    # ----------------------------------------------------------- utilities --
    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def to(self, device) -> "NoiseSchedule":
        """This schedule with its tables on ``device`` (a new object; tables
        stay float64)."""
        return NoiseSchedule.from_alphas_cumprod(self.alphas_cumprod.to(device), betas=self.betas.to(device),
                                                 name=self.name, config=self.config)

    def alphas_cumprod_on(self, device) -> torch.Tensor:
        """``alphas_cumprod`` (float64) on ``device``: the table itself when it
        is there, else a copy made once and cached (re-made if the table is
        replaced or modified in place), so a call per step costs no copy."""
        abar = self.alphas_cumprod
        if abar.device == device:
            return abar
        cache = self.__dict__.setdefault("_device_tables", {})
        hit = cache.get(device)
        if hit is not None and hit[0] is abar and hit[1] == abar._version:
            return hit[2]
        copy = abar.to(device=device, dtype=torch.float64)
        cache[device] = (abar, abar._version, copy)
        return copy

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar), float64 (T,)."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    def loss_weight(self, t: torch.Tensor, weighting: str = "uniform", target: str = "epsilon",
                    snr_gamma: float = 5.0) -> torch.Tensor:
        """Per-sample loss weights w_t for timesteps ``t``: see :func:`loss_weight`."""
        return loss_weight(self.alphas_cumprod, t, weighting, target, snr_gamma)

    def timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """The descending int64 timesteps of a respaced chain of ``num_steps``
        steps, as diffusers' ``set_timesteps`` lays them out (``leading``,
        ``trailing`` or ``linspace``)."""
        T = self.num_timesteps
        if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
        # numpy, as diffusers computes them, so the float rounding agrees exactly
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
        else:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        return torch.from_numpy(np.ascontiguousarray(ts).astype(np.int64))

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_timesteps={self.num_timesteps}, device={self.device})"


def loss_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str = "uniform",
                target: str = "epsilon", snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights w_t, float32 (N,), gathered on t's device
    with no host synchronisation, from the float64 abar table.

    ``uniform``: 1. ``min_snr`` (Hang et al. 2023) for the loss measured
    on ``target``: min(SNR, gamma)/SNR for epsilon, min(SNR, gamma) for
    sample (x0), min(SNR, gamma)/(SNR + 1) for v_prediction.
    """
    if weighting == "uniform":
        return torch.ones(t.shape[0], dtype=torch.float32, device=t.device)
    if weighting != "min_snr":
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a tensor, got {weighting!r}")
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
    abar = alphas_cumprod.to(t.device)
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=snr_gamma)
    if target == "epsilon":
        table = torch.where(snr <= snr_gamma, torch.ones_like(snr), snr_gamma / snr)
    elif target == "sample":
        table = clipped
    elif target == "v_prediction":
        table = clipped / (snr + 1)
    else:
        raise ValueError(f"target must be epsilon, sample or v_prediction, got {target!r}")
    return table.to(torch.float32)[t.long().clamp(0, abar.shape[0] - 1)]
