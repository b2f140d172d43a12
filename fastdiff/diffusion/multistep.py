"""diffusers-compatible multistep schedulers whose ``step`` is one fused kernel.

:class:`FusedDPMSolverMultistepScheduler`, :class:`FusedUniPCMultistepScheduler`,
:class:`FusedEulerDiscreteScheduler`, :class:`FusedEulerAncestralDiscreteScheduler`
and :class:`FusedFlowMatchEulerDiscreteScheduler` take the constructor
arguments of the diffusers (0.42) schedulers of the same names (same
defaults, same config file, so ``from_config`` works both ways) and offer
their methods (``set_timesteps``, ``step``, ``scale_model_input``,
``add_noise``, ``set_begin_index``, ``step_index``, ...)::

    pipe.scheduler = fastdiff.FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

How a step works
----------------
``set_timesteps`` lays out the sigmas as diffusers does (Karras, exponential,
beta, flow, ... in float64) and builds the coefficient table of the sampler
(:mod:`fastdiff.diffusion.multistep_tables`): one float64 row of 16 numbers
per step, in which the warm-up orders, ``lower_order_final``,
``euler_at_final``, the final sigma, UniPC's corrector and the prediction
type are already decided. The table, an int64 step counter and the history
buffers (past data predictions, UniPC's last sample; zero-initialised, fixed
addresses) live on the device. ``step`` makes one call to
:func:`fastdiff.ops.multistep.multistep_step`, which applies row
``step_counter`` and increments the counter on the device: no ``.item()``,
no ``nonzero``, no host-to-device copy, no Python branch on the step, so a
sampling loop compiles with ``torch.compile(fullgraph=True)`` without
recompiling and can be captured in a CUDA graph. Dynamic thresholding adds
one pass (the per-sample quantile of x0).

The first ``step`` (or ``scale_model_input``) of a run finds the start index
as diffusers does (``begin_index`` if set, else the position of the timestep
in ``timesteps``: the second match if it appears twice); for a timestep on a
GPU that lookup runs on the device too. The warm-up rows are then gathered
for that start on the device (img2img starting mid-chain warms up as
diffusers does).

Noise
-----
By default noise is drawn exactly as diffusers draws it (``randn_tensor``
with the same shape, generator, dtype and device, at the same steps), so a
pipeline with a fixed generator gives diffusers' images up to float rounding.
``scheduler.kernel_noise = True`` makes the kernel draw it (counter-based
Philox from a key taken from the generator): no noise tensor, reproducible,
but different numbers from diffusers'.

Where these schedulers differ from diffusers (0.42), on purpose
---------------------------------------------------------------
* Coefficients are float64 (diffusers: float32 sigmas and float32 step
  arithmetic); results agree to float32 rounding.
* The timestep passed to ``step`` is only used to find the start index at
  the first step of a run, as in diffusers; afterwards the device counter
  drives the step. ``step_index`` reads that counter (a host sync, only when
  asked).
* ``algorithm_type="dpmsolver"`` / ``"sde-dpmsolver"`` (noise-prediction
  DPM-Solver, deprecated in diffusers) keep eps in the history slot; with
  thresholding they raise ``NotImplementedError`` (diffusers converts to x0,
  thresholds and back, which is not one linear form). UniPC's
  ``predict_x0=False`` and ``solver_p`` raise ``NotImplementedError``.
* A learned-variance model output (2C channels) is cut to the sample's C
  channels (diffusers cuts to 3 channels whatever C is).
* Degenerate steps take their exact limits where diffusers divides by zero
  or multiplies inf by 0 (NaN): a step into sigma = 0 is first order (UniPC
  bh1 at the default ``final_sigmas_type="zero"``, and UniPC order > 1 with
  ``lower_order_final=False``, are NaN in diffusers); a repeated timestep
  (e.g. as many steps as training timesteps with ``linspace`` spacing) is
  the identity and the step after it drops the orders that would need it;
  Euler ancestral adds no noise on a step to a larger sigma.
* Dynamic thresholding takes the quantile in float32 (float64 for float64
  data); ``dynamic_thresholding_ratio`` must be in [0, 1].
* ``trained_betas`` must have ``num_train_timesteps`` entries (diffusers runs
  whatever length it is given).
* Euler with ``s_churn > 0``: the churn noise is drawn at every step (diffusers
  draws it only where gamma > 0; the rows without churn add none), so the
  generator advances differently.
* Euler ancestral also accepts ``prediction_type="sample"`` (diffusers raises
  NotImplementedError).
* A timestep not in the schedule at the first step: DPM-Solver++/UniPC start
  at the last step (as diffusers); Euler/flow raise ``ValueError`` on the
  host (diffusers: IndexError) and start at the last step for a GPU timestep.
* ``prev_sample`` has the sample's dtype when model_output's differs
  (diffusers: model_output's dtype; the two agree in every pipeline).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import ops
from ..ops.multistep import multistep_step
from . import multistep_tables as tb
from .schedulers import build_noise_schedule, step_noise

__all__ = ["FusedDPMSolverMultistepScheduler", "FusedUniPCMultistepScheduler", "FusedEulerDiscreteScheduler",
           "FusedEulerAncestralDiscreteScheduler", "FusedFlowMatchEulerDiscreteScheduler"]

Generator = Union[torch.Generator, List[torch.Generator], None]
SPACINGS = ("linspace", "leading", "trailing")


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_steps(n, T: Optional[int] = None) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
    if T is not None and n > T:
        raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={T}")
    return int(n)


def _vp_alphas_cumprod(cfg) -> np.ndarray:
    """float64 abar_t of the config's beta schedule; with zero-terminal-SNR
    rescaling the last abar is 2^-24 (as diffusers), so the first sigma is finite."""
    sched = build_noise_schedule(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule,
                                 cfg.trained_betas, cfg.rescale_betas_zero_snr)
    abar = np.cumprod(1.0 - sched.betas.double().numpy())
    if cfg.rescale_betas_zero_snr:
        abar[-1] = 2.0 ** -24
    return abar


def _one_sigma_option(cfg):
    if sum(bool(getattr(cfg, k, False)) for k in ("use_beta_sigmas", "use_exponential_sigmas",
                                                   "use_karras_sigmas")) > 1:
        raise ValueError("Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used")


# ---------------------------------------------------------------- base ------
class _FusedMultistep(SchedulerMixin, ConfigMixin):
    """State and step machinery shared by the fused multistep schedulers."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _missing_start_is_last = True     # a first timestep not in the chain: start at the last step
    _reject_integer_timestep = False  # Euler/flow: integer indices are not timesteps

    @classmethod
    def _get_compatibles(cls):
        found = super()._get_compatibles()
        from .schedulers import FusedDDIMScheduler, FusedDDPMScheduler
        ours = [FusedDDPMScheduler, FusedDDIMScheduler, FusedDPMSolverMultistepScheduler,
                FusedUniPCMultistepScheduler, FusedEulerDiscreteScheduler, FusedEulerAncestralDiscreteScheduler]
        return found + [c for c in ours if c not in found]

    def _init_state(self) -> None:
        self.num_inference_steps = None
        self._levels = None      # (L, n, 16) float64 on the table device
        self._coeffs = None      # (n, 16) float64: the rows of this run
        self._counter = None     # int64 0-d: the step index, advanced by the kernel
        self._started = False
        self._begin_index = None
        self._history = None
        self._last = None
        self._K = 0
        self._keeps_last = False
        self._timesteps_on = {}
        #: draw the noise inside the kernel (Philox) instead of with randn_tensor
        self.kernel_noise = False

    # ---------------------------------------------------------- tables ----
    def _install(self, levels: np.ndarray, device, what: str) -> None:
        """Put a freshly built (L, n, 16) table on ``device`` and reset the run."""
        if not np.all(np.isfinite(levels)):
            raise ValueError(f"{what}: this configuration gives non-finite step coefficients; check the sigma "
                             f"options and num_train_timesteps")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._K = tb.history_depth(levels)
        self._keeps_last = bool(np.any(levels[..., tb.C["u_on"]] != 0))
        self._levels = torch.from_numpy(np.ascontiguousarray(levels)).to(dev)
        n = levels.shape[1]
        if self._coeffs is None or self._coeffs.shape[0] != n or self._coeffs.device != dev:
            self._coeffs = torch.empty((n, tb.NCOEF), dtype=torch.float64, device=dev)
        if self._counter is None or self._counter.device != dev:
            self._counter = torch.zeros((), dtype=torch.int64, device=dev)
        self._fill_rows(0)
        self._counter.zero_()
        self._started = False
        self._begin_index = None
        self._timesteps_on = {}
        if self._history is not None and (self._history.shape[0] != self._K or
                                          (self._last.numel() > 0) != self._keeps_last):
            self._history = self._last = None
        self._zero_buffers()
        self.num_inference_steps = n

    def _fill_rows(self, k) -> None:
        """Gather the rows of a run that starts at step k (an int or a 0-d
        device tensor) from the warm-up levels, on the device."""
        L, n = self._levels.shape[0], self._levels.shape[1]
        ar = torch.arange(n, device=self._levels.device)
        lvl = (ar - k).clamp(0, L - 1)
        self._coeffs.copy_(self._levels[lvl, ar])

    def _to_device(self, device: torch.device) -> None:
        """Move the tables to the sample's device (once; pass device= to
        set_timesteps to have them there from the start)."""
        if self._coeffs.device == device:
            return
        self._levels = self._levels.to(device)
        self._coeffs = self._coeffs.to(device)
        self._counter = self._counter.to(device)
        self._history = self._last = None

    def _zero_buffers(self) -> None:
        if self._history is not None:
            self._history.zero_()
            self._last.zero_()

    def _ensure_buffers(self, sample: torch.Tensor) -> None:
        hd = sample.dtype if sample.dtype in (torch.float32, torch.float64) else torch.float32
        shape = (self._K,) + tuple(sample.shape)
        h = self._history
        if h is None or tuple(h.shape) != shape or h.dtype != hd or h.device != sample.device:
            self._history = torch.zeros(shape, dtype=hd, device=sample.device)
            self._last = (torch.zeros(sample.shape, dtype=hd, device=sample.device) if self._keeps_last
                          else torch.empty(0, dtype=hd, device=sample.device))

    # ---------------------------------------------------------- indices ----
    @property
    def step_index(self) -> Optional[int]:
        """The index of the next step in ``timesteps`` (None before the first
        step of a run). Reading it syncs with the device; ``step`` never does."""
        if not self._started:
            return None
        return int(self._counter)

    @property
    def begin_index(self) -> Optional[int]:
        """The first step index of the run, set by pipelines with ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``begin_index`` (img2img pipelines call this)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def _timesteps_for(self, device) -> torch.Tensor:
        ts = self._timesteps_on.get(device)
        if ts is None:
            ts = self._timesteps_on[device] = self.timesteps.to(device)
        return ts

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None):
        """The position of ``timestep`` in the schedule (the second match when
        it appears twice). An int for a host timestep; a 0-d int64 tensor
        (computed on the device, no sync) for a GPU tensor."""
        sched = self.timesteps if schedule_timesteps is None else schedule_timesteps
        n = sched.shape[0]
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            s = self._timesteps_for(timestep.device) if schedule_timesteps is None else sched.to(timestep.device)
            eq = s == timestep.reshape(()).to(s.dtype)
            cnt = eq.sum()
            want = cnt.clamp(max=2)
            idx = ((eq.cumsum(0) == want) & eq).to(torch.int32).argmax()
            return torch.where(cnt == 0, torch.full_like(idx, n - 1), idx).to(torch.int64)
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a scalar, got shape {tuple(timestep.shape)}")
            value = timestep.reshape(()).item()
        else:
            value = timestep
        hits = np.nonzero(sched.detach().cpu().numpy() == np.asarray(value, dtype=np.float64))[0]
        if hits.size == 0:
            if self._missing_start_is_last:
                return n - 1
            raise ValueError(f"timestep {value!r} is not in the scheduler's timesteps {sched.tolist()}")
        return int(hits[1] if hits.size > 1 else hits[0])

    def _start(self, timestep) -> None:
        """Begin a run: find the start index, gather its rows, zero the history."""
        if self._begin_index is not None:
            k = self._begin_index
        else:
            k = self.index_for_timestep(timestep)
        self._fill_rows(k)
        if isinstance(k, torch.Tensor):
            self._counter.copy_(k)
        else:
            self._counter.fill_(k)
        self._zero_buffers()
        self._started = True

    def _ready(self, timestep, sample: torch.Tensor, from_step: bool = True) -> None:
        if self._coeffs is None:
            raise ValueError("num_inference_steps is None: call set_timesteps() before step()")
        if not isinstance(sample, torch.Tensor) or sample.dim() < 1:
            raise TypeError("sample must be a torch.Tensor of shape (N, ...)")
        if from_step and self._reject_integer_timestep and (isinstance(timestep, (int, np.integer)) and
                                              not isinstance(timestep, bool) or
                                              isinstance(timestep, torch.Tensor) and not
                                              (timestep.is_floating_point())):
            raise ValueError(f"Passing integer indices (e.g. from enumerate(timesteps)) as timesteps to "
                             f"{type(self).__name__}.step() is not supported: pass one of scheduler.timesteps")
        self._to_device(sample.device)
        if not self._started:
            self._start(timestep)

    # ------------------------------------------------------------- step ----
    def _draw(self, shape, generator, device, dtype, variance_noise, key, sample_dtype, needed: bool):
        """(noise, key) for the kernel."""
        if variance_noise is not None:
            if not isinstance(variance_noise, torch.Tensor):
                raise TypeError(f"variance_noise must be a torch.Tensor, got {type(variance_noise).__name__}")
            return variance_noise.to(device=device, dtype=sample_dtype), None
        if key is not None:
            return None, key
        if not needed:
            return None, None
        z, k = step_noise(self.kernel_noise, generator, shape, device, dtype)
        return (None, k.to(device)) if z is None else (z.to(sample_dtype), None)

    def _fused(self, model_output: torch.Tensor, sample: torch.Tensor, noise=None, key=None, want_x0=False,
               thresholding: bool = False, guidance=(None, 1.0, 0.0)):
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        uncond, w, phi = guidance
        if uncond is not None:
            if not isinstance(uncond, torch.Tensor):
                raise TypeError(f"uncond_output must be a torch.Tensor, got {type(uncond).__name__}")
            if uncond.shape != model_output.shape:
                raise ValueError(f"uncond_output must have the shape of model_output {tuple(model_output.shape)}, "
                                 f"got {tuple(uncond.shape)}")
        mo = model_output
        if mo.dim() == sample.dim() and mo.shape[0] == sample.shape[0] and mo.dim() >= 2 and \
                mo.shape[1] == 2 * sample.shape[1] and mo.shape[2:] == sample.shape[2:] and \
                getattr(self.config, "variance_type", None) in ("learned", "learned_range"):
            mo = mo[:, :sample.shape[1]]
            uncond = uncond[:, :sample.shape[1]] if uncond is not None else None
        if mo.shape != sample.shape:
            raise ValueError(f"model_output must have the shape of sample {tuple(sample.shape)}, got "
                             f"{tuple(model_output.shape)}")
        if mo.dtype != sample.dtype:
            mo = mo.to(sample.dtype)
        if uncond is not None and uncond.dtype != sample.dtype:
            uncond = uncond.to(sample.dtype)
        self._ensure_buffers(sample)
        thresh = None
        if thresholding:
            g = mo if uncond is None else ops.classifier_free_guidance(mo, uncond, w, phi)
            thresh = self._threshold(g, sample)
        prev, x0 = multistep_step(mo, sample, self._history, self._last, self._coeffs, self._counter, noise=noise,
                                  key=key, thresh=thresh, return_x0=want_x0, uncond_output=uncond,
                                  guidance_scale=w, guidance_rescale=phi)
        return prev, x0

    def _threshold(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Imagen's dynamic-thresholding bound per sample, as diffusers'
        ``_threshold_sample``: s = clamp(quantile(|x0|, ratio), min=1,
        max=sample_max_value) (torch's clamp: max wins when it is below 1),
        with x0 of the current row; device ops only (an extra pass)."""
        cfg = self.config
        acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
        row = self._coeffs.index_select(0, self._counter.reshape(1).clamp(0, self._coeffs.shape[0] - 1))[0]
        x0 = row[tb.C["c_x"]].to(acc) * sample.to(acc) + row[tb.C["c_m"]].to(acc) * model_output.to(acc)
        q = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), float(cfg.dynamic_thresholding_ratio), dim=1)
        return q.clamp(min=1.0, max=float(cfg.sample_max_value)).float().contiguous()

    def _check_thresholding(self, cfg) -> None:
        if cfg.thresholding:
            if not 0 <= cfg.dynamic_thresholding_ratio <= 1:
                raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1], got "
                                 f"{cfg.dynamic_thresholding_ratio}")
            if not cfg.sample_max_value > 0:
                raise ValueError(f"sample_max_value must be > 0, got {cfg.sample_max_value}")

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# ------------------------------------------------------- VP (DPM, UniPC) ----
class _FusedVP(_FusedMultistep):
    """DPM-Solver++ and UniPC: VP samples, sigma = sqrt((1 - abar) / abar)."""

    def _setup_vp(self, cfg) -> None:
        _one_sigma_option(cfg)
        _check_choice(cfg.prediction_type, ("epsilon", "sample", "v_prediction", "flow_prediction"),
                      "prediction_type")
        _check_choice(cfg.timestep_spacing, SPACINGS, "timestep_spacing")
        _check_choice(cfg.final_sigmas_type, ("zero", "sigma_min"), "final_sigmas_type")
        if isinstance(cfg.solver_order, bool) or cfg.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {cfg.solver_order!r}")
        self._check_thresholding(cfg)
        self._abar = _vp_alphas_cumprod(cfg)
        self._train_sigmas = np.sqrt((1.0 - self._abar) / self._abar)  # ascending in t
        abar32 = torch.from_numpy(self._abar).float()
        self.alphas_cumprod = abar32
        self.betas = torch.from_numpy(np.concatenate([[1 - self._abar[0]], 1 - self._abar[1:] / self._abar[:-1]])
                                      ).float()
        self.alphas = 1.0 - self.betas
        self.alpha_t = abar32.sqrt()
        self.sigma_t = (1 - abar32).sqrt()
        self.lambda_t = self.alpha_t.log() - self.sigma_t.log()
        self.sigmas = torch.from_numpy(self._train_sigmas).float()
        self.init_noise_sigma = 1.0
        T = cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self._sigmas64 = None
        self._flow = bool(cfg.use_flow_sigmas)

    def _spaced(self, n: int, last: int) -> np.ndarray:
        cfg = self.config
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if cfg.timestep_spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
        ratio = cfg.num_train_timesteps / n
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1

    def _finish(self, sigmas: np.ndarray, timesteps: np.ndarray, device) -> None:
        self._sigmas64 = np.asarray(sigmas, dtype=np.float64)
        self.sigmas = torch.from_numpy(self._sigmas64).float()
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.int64)
        self._install(self._build_levels(self._sigmas64), device, type(self).__name__)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Identity (these samplers do not scale the model input)."""
        return sample

    def _sigma_indices(self, timesteps: torch.Tensor, n: int) -> List[int]:
        if self._begin_index is None:
            return [int(self.index_for_timestep(t.reshape(()).cpu())) for t in timesteps.reshape(-1)]
        k = self.step_index if self._started else self._begin_index
        return [k] * n

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x = alpha_t x0 + sigma_t noise at the sampler sigma of each timestep
        (looked up in ``timesteps``, or ``begin_index`` / ``step_index`` when set,
        as diffusers). Coefficients in float64, applied in float32 (float64 for
        float64 data)."""
        if self._sigmas64 is None:
            raise ValueError("call set_timesteps() before add_noise()")
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        idx = self._sigma_indices(timesteps, original_samples.shape[0])
        a, s = tb.vp_alpha_sigma(self._sigmas64[idx], self._flow)
        acc = torch.float64 if original_samples.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = torch.as_tensor(a, dtype=acc).to(original_samples.device).reshape(shape)
        s = torch.as_tensor(s, dtype=acc).to(original_samples.device).reshape(shape)
        return (a * original_samples.to(acc) + s * noise.to(acc)).to(original_samples.dtype)


# ------------------------------------------------------- DPM-Solver++ -------
class _FlowShift:
    """The flow-sigma shifts of diffusers' flow schedulers (``time_shift``,
    ``stretch_shift_to_terminal``), for the schedulers whose config has
    ``time_shift_type`` and ``shift_terminal``."""

    def time_shift(self, mu: float, sigma: float, t):
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t):
        one_minus_z = 1 - t
        scale = one_minus_z[-1] / (1 - self.config.shift_terminal)
        return 1 - one_minus_z / scale


class FusedDPMSolverMultistepScheduler(_FusedVP):
    """DPM-Solver++ multistep (Lu et al. 2022), diffusers'
    ``DPMSolverMultistepScheduler`` with a fused step. Orders 1-3, midpoint or
    heun second-order terms, ODE (``dpmsolver++``) or SDE
    (``sde-dpmsolver++``); all of diffusers' sigma options. Arguments as
    diffusers' (see its docs); the module docstring lists the differences."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 solver_order: int = 2, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: Optional[str] = None,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential"):
        if algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type not in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
            raise NotImplementedError(f"{algorithm_type} is not implemented for {self.__class__}")
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            if final_sigmas_type == "zero":
                raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not supported for algorithm_type "
                                 f"{algorithm_type!r}. Please choose 'sigma_min' instead.")
            if thresholding:
                raise NotImplementedError(f"thresholding with algorithm_type={algorithm_type!r} (noise-prediction "
                                          f"DPM-Solver, deprecated in diffusers) is not supported by the fused "
                                          f"scheduler; use 'dpmsolver++'")
            if prediction_type == "flow_prediction":
                raise ValueError("prediction_type='flow_prediction' needs algorithm_type 'dpmsolver++' or "
                                 "'sde-dpmsolver++'")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        elif solver_type not in ("midpoint", "heun"):
            raise NotImplementedError(f"{solver_type} is not implemented for {self.__class__}")
        if variance_type not in (None, "learned", "learned_range"):
            raise ValueError(f"variance_type must be None, 'learned' or 'learned_range', got {variance_type!r}")
        self._init_state()
        self._setup_vp(self.config)
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      mu: Optional[float] = None, timesteps: Optional[Sequence[int]] = None) -> None:
        """Lay out the sampling chain and build the coefficient table (on
        ``device``). Give num_inference_steps or custom descending
        ``timesteps``; ``mu`` sets flow_shift = exp(mu) (dynamic shifting)."""
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type='exponential'")
            self.register_to_config(flow_shift=float(np.exp(mu)))
            cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Must pass exactly one of num_inference_steps or timesteps")
        for opt in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and getattr(cfg, opt):
                raise ValueError(f"Cannot use timesteps with config.{opt} = True")
        T = cfg.num_train_timesteps
        sig = self._train_sigmas
        log_sig = np.log(sig)
        if timesteps is not None:
            ts = np.array(timesteps).astype(np.int64)
            if ts.ndim != 1 or ts.size < 1 or ts.min() < 0 or ts.max() >= T:
                raise ValueError(f"timesteps must be a non-empty sequence of ints in [0, {T}), got {list(ts)}")
            n = ts.size
        else:
            n = _check_steps(num_inference_steps)
            lam = np.log(np.sqrt(self._abar)) - np.log(np.sqrt(1 - self._abar))
            clipped = int(np.searchsorted(lam[::-1], cfg.lambda_min_clipped, side="left"))
            ts = self._spaced(n, T - clipped)
        if cfg.use_karras_sigmas:
            s = tb.karras_sigmas(sig[0], sig[-1], n)
            ts = tb.sigma_to_t(s, log_sig)
            if cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif cfg.use_lu_lambdas:
            lambdas = np.linspace(log_sig[-1], log_sig[0], n)
            s = np.exp(lambdas)
            ts = tb.sigma_to_t(s, log_sig)
            if cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif cfg.use_exponential_sigmas:
            s = tb.exponential_sigmas(sig[0], sig[-1], n)
            ts = tb.sigma_to_t(s, log_sig)
        elif cfg.use_beta_sigmas:
            s = tb.beta_sigmas(sig[0], sig[-1], n)
            ts = tb.sigma_to_t(s, log_sig)
        elif cfg.use_flow_sigmas:
            u = 1.0 - np.linspace(1, 1 / T, n + 1)
            s = np.flip(cfg.flow_shift * u / (1 + (cfg.flow_shift - 1) * u))[:-1].copy()
            ts = s * T
        else:
            s = np.interp(ts, np.arange(T), sig)
        last = sig[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self._finish(np.concatenate([s, [last]]), np.asarray(ts).astype(np.int64), device)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0

    def _build_levels(self, sigmas: np.ndarray) -> np.ndarray:
        cfg = self.config
        return tb.dpmsolver_levels(sigmas, solver_order=cfg.solver_order, solver_type=cfg.solver_type,
                                   algorithm_type=cfg.algorithm_type, prediction_type=cfg.prediction_type,
                                   lower_order_final=cfg.lower_order_final, euler_at_final=cfg.euler_at_final,
                                   final_sigmas_type=cfg.final_sigmas_type, flow=bool(cfg.use_flow_sigmas))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: Generator = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True, *,
             key: Optional[torch.Tensor] = None, uncond_output: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0) -> Union[SchedulerOutput, tuple]:
        """One DPM-Solver++ step, one fused kernel launch.

        Args:
            model_output: the model's output at (sample, timestep), sample's
                shape (or 2C channels with a learned variance_type).
            timestep: the current timestep (used only at the first step of a
                run, to find the start index).
            sample: x_t, (N, ...) float32/float16/bfloat16/float64.
            generator: for the SDE variant's noise (drawn as diffusers does).
            variance_noise: the SDE noise itself, like sample.
            return_dict: return a ``SchedulerOutput`` (else a tuple).
            uncond_output, guidance_scale, guidance_rescale: classifier-free
                guidance (model_output is the conditional prediction),
                combined inside the fused step (see :func:`fastdiff.ddpm_step`).
            key: an in-kernel noise key (int64 (2,)) for this step.

        Returns: ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        self._ready(timestep, sample)
        sde = self.config.algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver")
        noise, k = self._draw(sample.shape, generator, sample.device, torch.float32,
                              variance_noise if sde else None, key if sde else None, sample.dtype, needed=sde)
        prev, _ = self._fused(model_output, sample, noise=noise, key=k, thresholding=bool(self.config.thresholding),
                              guidance=(uncond_output, guidance_scale, guidance_rescale))
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


# ------------------------------------------------------------- UniPC --------
class FusedUniPCMultistepScheduler(_FlowShift, _FusedVP):
    """UniPC (Zhao et al. 2023), diffusers' ``UniPCMultistepScheduler`` with a
    fused step: the corrector UniC of step i runs inside the kernel of step
    i + 1, before its predictor UniP. bh1/bh2, orders 1-3, all sigma options.
    ``predict_x0=False`` and ``solver_p`` are not supported."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 solver_order: int = 2, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 predict_x0: bool = True, solver_type: str = "bh2", lower_order_final: bool = True,
                 disable_corrector: List[int] = [], solver_p: SchedulerMixin = None,  # noqa: B006 (diffusers' default)
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero",
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential", sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None, shift_terminal: Optional[float] = None):
        if solver_type in ("midpoint", "heun", "logrho"):
            self.register_to_config(solver_type="bh2")
        elif solver_type not in ("bh1", "bh2"):
            raise NotImplementedError(f"{solver_type} is not implemented for {self.__class__}")
        if not predict_x0:
            raise NotImplementedError("predict_x0=False (UniPC on noise predictions) is not supported by the fused "
                                      "scheduler: its history holds data predictions")
        if solver_p is not None:
            raise NotImplementedError("solver_p is not supported by the fused scheduler")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal is only supported when use_flow_sigmas=True")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        self._init_state()
        self._setup_vp(self.config)
        self.predict_x0 = True
        self.disable_corrector = list(disable_corrector)
        self.solver_p = None
        self.last_sample = None
        self.model_outputs = [None] * solver_order
        self.timestep_list = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None) -> None:
        """Lay out the sampling chain and build the coefficient table (on
        ``device``). ``sigmas`` (flow sigmas only) and ``mu`` (dynamic
        shifting) as diffusers."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is set to True")
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError("Passing sigmas is only supported when use_flow_sigmas=True")
            num_inference_steps = len(sigmas)
        n = _check_steps(num_inference_steps)
        T = cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        else:
            ts = self._spaced(n, T)
        train = self._train_sigmas
        log_sig = np.log(train)
        opt_min = cfg.sigma_min
        opt_max = cfg.sigma_max

        def ends(arr):
            return (opt_min if opt_min is not None else arr[-1]), (opt_max if opt_max is not None else arr[0])

        custom = None if sigmas is None else np.asarray(sigmas, dtype=np.float64)
        base = custom if custom is not None else train
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            desc = np.flip(base).copy()
            lo, hi = ends(desc)
            log_base = np.log(base)
            if cfg.use_karras_sigmas:
                s = tb.karras_sigmas(lo, hi, n)
                if cfg.use_flow_sigmas:
                    s = s / (s + 1)
                    ts = s * T
                else:
                    ts = tb.sigma_to_t(s, log_base).round()
            elif cfg.use_exponential_sigmas:
                s = tb.exponential_sigmas(lo, hi, n)
                ts = tb.sigma_to_t(s, log_base)
            else:
                s = tb.beta_sigmas(lo, hi, n)
                ts = tb.sigma_to_t(s, log_base)
            last = s[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
        elif cfg.use_flow_sigmas:
            s = custom if custom is not None else np.linspace(1, 1 / T, n + 1)[:-1]
            if cfg.use_dynamic_shifting:
                s = self.time_shift(mu, 1.0, s)
            else:
                s = cfg.flow_shift * s / (1 + (cfg.flow_shift - 1) * s)
            if cfg.shift_terminal:
                s = self.stretch_shift_to_terminal(s)
            s = np.array(s, dtype=np.float64)
            if abs(s[0] - 1) < 1e-6:
                s[0] -= 1e-6  # as diffusers: keeps log(alpha) finite at the first step
            ts = s * T
            last = s[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
        else:
            s = np.interp(ts, np.arange(T), base)
            last = train[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self._finish(np.concatenate([s, [last]]), np.asarray(ts).astype(np.int64), device)
        self.model_outputs = [None] * cfg.solver_order
        self.timestep_list = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self.last_sample = None

    def _build_levels(self, sigmas: np.ndarray) -> np.ndarray:
        cfg = self.config
        return tb.unipc_levels(sigmas, solver_order=cfg.solver_order, solver_type=cfg.solver_type,
                               prediction_type=cfg.prediction_type, lower_order_final=cfg.lower_order_final,
                               disable_corrector=self.disable_corrector if hasattr(self, "disable_corrector")
                               else cfg.disable_corrector, flow=bool(cfg.use_flow_sigmas))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0) -> Union[SchedulerOutput, tuple]:
        """One UniPC step (the previous step's corrector, then this step's
        predictor), one fused kernel launch.

        Args:
            model_output: the model's output at (sample, timestep), sample's shape.
            timestep: the current timestep (used at the first step of a run only).
            sample: x_t, (N, ...) float32/float16/bfloat16/float64.
            return_dict: return a ``SchedulerOutput`` (else a tuple).
            uncond_output, guidance_scale, guidance_rescale: classifier-free
                guidance (model_output is the conditional prediction),
                combined inside the fused step (see :func:`fastdiff.ddpm_step`).

        Returns: ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``.
        """
        self._ready(timestep, sample)
        prev, _ = self._fused(model_output, sample, thresholding=bool(self.config.thresholding),
                              guidance=(uncond_output, guidance_scale, guidance_rescale))
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


# ------------------------------------------------------- Euler (VE) ---------
class _FusedVE(_FusedMultistep):
    """Euler / Euler ancestral: VE samples x = x_vp * sqrt(sigma^2 + 1)."""

    _missing_start_is_last = False
    _reject_integer_timestep = True

    def _setup_ve(self, cfg) -> None:
        _check_choice(cfg.timestep_spacing, SPACINGS, "timestep_spacing")
        self._abar = _vp_alphas_cumprod(cfg)
        self._train_sigmas = np.sqrt((1.0 - self._abar) / self._abar)
        abar32 = torch.from_numpy(self._abar).float()
        self.alphas_cumprod = abar32
        self.betas = torch.from_numpy(np.concatenate([[1 - self._abar[0]], 1 - self._abar[1:] / self._abar[:-1]])
                                      ).float()
        self.alphas = 1.0 - self.betas
        T = cfg.num_train_timesteps
        self._sigmas64 = np.concatenate([self._train_sigmas[::-1], [0.0]])
        self.sigmas = torch.from_numpy(self._sigmas64).float()
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).float()
        self._scales = None
        self.is_scale_input_called = False

    def _default_chain(self) -> None:
        """Before set_timesteps diffusers' Euler schedulers run the full
        training chain; so do these (num_inference_steps stays None)."""
        self._finish_ve(self._sigmas64, self.timesteps.numpy(), None)
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The std of the initial noise: max sigma (linspace/trailing) or
        sqrt(max^2 + 1), a float32 0-d tensor as in diffusers."""
        m = float(np.max(self._sigmas64))
        if self.config.timestep_spacing not in ("linspace", "trailing"):
            m = (m * m + 1) ** 0.5
        return torch.tensor(m, dtype=torch.float32)

    def _float_timesteps(self, n: int) -> np.ndarray:
        cfg = self.config
        T = cfg.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        if cfg.timestep_spacing == "leading":
            ratio = T // n
            return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32) + cfg.steps_offset
        ratio = T / n
        return np.arange(T, 0, -ratio).round().copy().astype(np.float32) - 1

    def _finish_ve(self, sigmas: np.ndarray, timesteps, device) -> None:
        self._sigmas64 = np.asarray(sigmas, dtype=np.float64)
        self.sigmas = torch.from_numpy(self._sigmas64).float()
        self.timesteps = torch.as_tensor(np.asarray(timesteps, dtype=np.float32)).to(device)
        n = self.timesteps.shape[0]
        self._install(self._build_levels(self._sigmas64[:n + 1]), device, type(self).__name__)
        s = self._sigmas64[:n]
        self._scales = torch.from_numpy(1.0 / np.sqrt(s * s + 1.0)).to(self._coeffs.device)
        self.is_scale_input_called = False

    def _to_device(self, device: torch.device) -> None:
        moved = self._coeffs is not None and self._coeffs.device != device
        super()._to_device(device)
        if moved:
            self._scales = self._scales.to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """sample / sqrt(sigma^2 + 1) at the current step (gathered on the
        device by the step counter: no sync)."""
        self._ready(timestep, sample, from_step=False)
        acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
        scale = self._scales.index_select(0, self._counter.reshape(1).clamp(0, self._scales.shape[0] - 1))
        self.is_scale_input_called = True
        return (sample.to(acc) * scale.to(acc)).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x = x0 + sigma * noise at the sigma of each timestep (VE), as diffusers."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            idx = [int(self.index_for_timestep(t.reshape(()).cpu())) for t in timesteps]
        else:
            k = self.step_index if self._started else self._begin_index
            idx = [k] * timesteps.shape[0]
        acc = torch.float64 if original_samples.dtype == torch.float64 else torch.float32
        s = torch.as_tensor(self._sigmas64[idx], dtype=acc).to(original_samples.device)
        s = s.reshape((-1,) + (1,) * (original_samples.dim() - 1))
        return (original_samples.to(acc) + noise.to(acc) * s).to(original_samples.dtype)


class FusedEulerDiscreteScheduler(_FusedVE):
    """Euler (Karras et al. 2022), diffusers' ``EulerDiscreteScheduler`` with a
    fused step; churn (``s_churn``) supported. Arguments as diffusers'."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 prediction_type: str = "epsilon", interpolation_type: str = "linear",
                 use_karras_sigmas: Optional[bool] = False, use_exponential_sigmas: Optional[bool] = False,
                 use_beta_sigmas: Optional[bool] = False, sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        _one_sigma_option(self.config)
        _check_choice(prediction_type, ("epsilon", "v_prediction", "sample", "original_sample"), "prediction_type")
        _check_choice(interpolation_type, ("linear", "log_linear"), "interpolation_type")
        _check_choice(timestep_type, ("discrete", "continuous"), "timestep_type")
        _check_choice(final_sigmas_type, ("zero", "sigma_min"), "final_sigmas_type")
        self._init_state()
        self._setup_ve(self.config)
        if timestep_type == "continuous" and prediction_type == "v_prediction":
            self.timesteps = torch.from_numpy(0.25 * np.log(self._train_sigmas[::-1].copy())).float()
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._churn_key = None
        self._default_chain()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      timesteps: Optional[Sequence[float]] = None, sigmas: Optional[Sequence[float]] = None
                      ) -> None:
        """Lay out the chain (num_inference_steps, or custom ``timesteps``, or
        custom ``sigmas`` ending with the final one) and build the table."""
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of timesteps or sigmas should be set")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of num_inference_steps or timesteps or sigmas")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of num_inference_steps or timesteps or sigmas")
        for opt in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and getattr(cfg, opt):
                raise ValueError(f"Cannot set timesteps with config.{opt} = True")
        continuous_v = cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction"
        if timesteps is not None and continuous_v:
            raise ValueError("Cannot set timesteps with timestep_type='continuous' and prediction_type='v_prediction'")
        train = self._train_sigmas
        log_sig = np.log(train)
        if sigmas is not None:
            s = np.asarray(sigmas, dtype=np.float64)
            if s.ndim != 1 or s.size < 2:
                raise ValueError("sigmas must hold at least two values (the last is the final sigma)")
            ts = tb.sigma_to_t(s[:-1], log_sig)
            n = s.size - 1
        else:
            if timesteps is not None:
                ts = np.asarray(timesteps, dtype=np.float32)
                n = ts.size
            else:
                n = _check_steps(num_inference_steps)
                ts = self._float_timesteps(n)
            if cfg.interpolation_type == "linear":
                s = np.interp(ts.astype(np.float64), np.arange(train.size), train)
            else:
                s = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), n + 1))
            lo = cfg.sigma_min if cfg.sigma_min is not None else s[-1]
            hi = cfg.sigma_max if cfg.sigma_max is not None else s[0]
            if cfg.use_karras_sigmas:
                s = tb.karras_sigmas(lo, hi, n)
                ts = tb.sigma_to_t(s, log_sig)
            elif cfg.use_exponential_sigmas:
                s = tb.exponential_sigmas(lo, hi, n)
                ts = tb.sigma_to_t(s, log_sig)
            elif cfg.use_beta_sigmas:
                s = tb.beta_sigmas(lo, hi, n)
                ts = tb.sigma_to_t(s, log_sig)
            last = train[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
            s = np.concatenate([s, [last]])
        self.num_inference_steps = n
        if continuous_v:
            ts = 0.25 * np.log(s[:-1])
        self._churn_key = None
        self._finish_ve(s, ts, device)

    def _build_levels(self, sigmas: np.ndarray) -> np.ndarray:
        return tb.euler_rows(sigmas, self.config.prediction_type)

    def _churn(self, s_churn, s_tmin, s_tmax, s_noise):
        """(table, per-step noise scale) for churn parameters (cached)."""
        key = (float(s_churn), float(s_tmin), float(s_tmax), float(s_noise))
        if self._churn_key != key:
            n = self.num_inference_steps
            s = self._sigmas64[:n + 1]
            gamma = np.array([min(s_churn / (len(self._sigmas64) - 1), 2 ** 0.5 - 1)
                              if s_tmin <= float(np.float32(si)) <= s_tmax else 0.0 for si in s[:n]])
            s_hat = s[:n] * (gamma + 1)
            rows = tb.euler_rows(s, self.config.prediction_type, sigma_hat=s_hat)[0]
            scale = np.where(gamma > 0, s_noise * np.sqrt(np.maximum(s_hat ** 2 - s[:n] ** 2, 0.0)), 0.0)
            dev = self._coeffs.device
            self._churn_key = key
            self._churn_rows = torch.from_numpy(rows).to(dev)
            self._churn_scale = torch.from_numpy(scale).to(dev)
            self._churn_any = bool(np.any(gamma > 0))
        return self._churn_rows, self._churn_scale, self._churn_any

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Generator = None, return_dict: bool = True, *,
             uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0) -> Union[EulerDiscreteSchedulerOutput, tuple]:
        """One Euler step, one fused kernel launch (plus one pass for the churn
        noise when s_churn > 0).

        Args:
            model_output: the model's output at the scaled input, sample's shape.
            timestep: one of ``timesteps`` (float; integer indices are rejected
                as diffusers does); used at the first step of a run only.
            sample: x (VE scale), (N, ...) float tensor.
            s_churn, s_tmin, s_tmax, s_noise: Karras' stochastic churn.
            generator: for the churn noise.
            return_dict: return an ``EulerDiscreteSchedulerOutput`` (else a tuple).
            uncond_output, guidance_scale, guidance_rescale: classifier-free
                guidance (model_output is the conditional prediction),
                combined inside the fused step (see :func:`fastdiff.ddpm_step`).

        Returns: ``(prev_sample, pred_original_sample)``.
        """
        self._ready(timestep, sample)
        if s_churn != 0:
            rows, scale, any_churn = self._churn(s_churn, s_tmin, s_tmax, s_noise)
            if any_churn:
                z = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
                c = scale.index_select(0, self._counter.reshape(1)).to(torch.float32 if sample.dtype != torch.float64
                                                                          else torch.float64)
                sample = (sample.to(c.dtype) + c * z.to(c.dtype)).to(sample.dtype)
            base = self._coeffs
            self._coeffs = rows
            try:
                prev, x0 = self._fused(model_output, sample, want_x0=True,
                                       guidance=(uncond_output, guidance_scale, guidance_rescale))
            finally:
                self._coeffs = base
        else:
            prev, x0 = self._fused(model_output, sample, want_x0=True,
                                   guidance=(uncond_output, guidance_scale, guidance_rescale))
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class FusedEulerAncestralDiscreteScheduler(_FusedVE):
    """Euler ancestral, diffusers' ``EulerAncestralDiscreteScheduler`` with a
    fused step (the ancestral noise is one more term of the same kernel)."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        _check_choice(prediction_type, ("epsilon", "v_prediction", "sample"), "prediction_type")
        self._init_state()
        self._setup_ve(self.config)
        self._default_chain()

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device] = None) -> None:
        """Lay out the chain and build the table (on ``device``)."""
        n = _check_steps(num_inference_steps)
        ts = self._float_timesteps(n)
        s = np.interp(ts.astype(np.float64), np.arange(self._train_sigmas.size), self._train_sigmas)
        self.num_inference_steps = n
        self._finish_ve(np.concatenate([s, [0.0]]), ts, device)

    def _build_levels(self, sigmas: np.ndarray) -> np.ndarray:
        return tb.euler_ancestral_rows(sigmas, self.config.prediction_type)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: Generator = None,
             return_dict: bool = True, *, key: Optional[torch.Tensor] = None,
             uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0) -> Union[EulerAncestralDiscreteSchedulerOutput, tuple]:
        """One Euler-ancestral step, one fused kernel launch (noise drawn as
        diffusers draws it, or in the kernel with ``kernel_noise`` / ``key``).

        Returns: ``(prev_sample, pred_original_sample)``.
        """
        self._ready(timestep, sample)
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        noise, k = self._draw(model_output.shape, generator, sample.device, model_output.dtype, None, key,
                              sample.dtype, needed=True)
        prev, x0 = self._fused(model_output, sample, noise=noise, key=k, want_x0=True,
                               guidance=(uncond_output, guidance_scale, guidance_rescale))
        if not return_dict:
            return prev, x0
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ------------------------------------------------------ flow matching -------
class FusedFlowMatchEulerDiscreteScheduler(_FlowShift, _FusedMultistep):
    """Flow-matching Euler, diffusers' ``FlowMatchEulerDiscreteScheduler``
    with a fused step: x_s = (1 - s) x0 + s eps, prev = x + (s_next - s) v
    (or, with ``stochastic_sampling``, prev = (1 - s_next) x0 + s_next z)."""

    _compatibles = []
    _missing_start_is_last = False
    _reject_integer_timestep = True

    @classmethod
    def _get_compatibles(cls):
        return SchedulerMixin._get_compatibles.__func__(cls)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: Optional[float] = 0.5, max_shift: Optional[float] = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, invert_sigmas: bool = False,
                 shift_terminal: Optional[float] = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False):
        _one_sigma_option(self.config)
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError("time_shift_type must either be 'exponential' or 'linear'")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) or \
                num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        self._init_state()
        T = num_train_timesteps
        s = np.linspace(1, T, T, dtype=np.float64)[::-1].copy() / T
        if not use_dynamic_shifting:
            s = shift * s / (1 + (shift - 1) * s)
        self._shift = shift
        self._sigmas64 = s
        self.sigmas = torch.from_numpy(s).float()
        self.timesteps = self.sigmas * T
        self.sigma_min = float(s[-1])
        self.sigma_max = float(s[0])
        self.init_noise_sigma = 1.0

    @property
    def shift(self) -> float:
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[float]] = None) -> None:
        """Lay out the flow sigmas (shifted, dynamic shift ``mu``, terminal
        stretch, Karras/exponential/beta, inverted) and build the table."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is set to True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas and timesteps should have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or \
                    (timesteps is not None and len(timesteps) != num_inference_steps):
                raise ValueError("sigmas and timesteps should have the same length as num_inference_steps")
            n = _check_steps(num_inference_steps)
        else:
            if sigmas is None and timesteps is None:
                raise ValueError("Must pass num_inference_steps, sigmas or timesteps")
            n = len(sigmas) if sigmas is not None else len(timesteps)
        T = cfg.num_train_timesteps
        given_ts = np.asarray(timesteps, dtype=np.float32) if timesteps is not None else None
        if sigmas is None:
            t = given_ts if given_ts is not None else np.linspace(self.sigma_max * T, self.sigma_min * T, n)
            s = np.asarray(t, dtype=np.float64) / T
        else:
            s = np.asarray(sigmas, dtype=np.float64)
            n = s.size
        if cfg.use_dynamic_shifting:
            s = self.time_shift(mu, 1.0, s)
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        if cfg.shift_terminal:
            s = self.stretch_shift_to_terminal(s)
        lo, hi = float(s[-1]), float(s[0])
        if cfg.use_karras_sigmas:
            s = tb.karras_sigmas(lo, hi, n)
        elif cfg.use_exponential_sigmas:
            s = tb.exponential_sigmas(lo, hi, n)
        elif cfg.use_beta_sigmas:
            s = tb.beta_sigmas(lo, hi, n)
        s = np.asarray(s, dtype=np.float64)
        ts = given_ts.astype(np.float64) if given_ts is not None else s * T
        if cfg.invert_sigmas:
            s = 1.0 - s
            ts = s * T
            s = np.concatenate([s, [1.0]])
        else:
            s = np.concatenate([s, [0.0]])
        self.num_inference_steps = n
        self._sigmas64 = s
        self.sigmas = torch.from_numpy(s).float().to(device)
        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.float32)).to(device)
        self._install(tb.flow_euler_rows(s, bool(cfg.stochastic_sampling)), device, type(self).__name__)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The forward process x_s = s * noise + (1 - s) * sample at the sigma of
        ``timestep`` (looked up as diffusers does)."""
        timestep = torch.as_tensor(timestep).reshape(-1)
        if self._begin_index is None:
            idx = [int(self.index_for_timestep(t.reshape(()).cpu())) for t in timestep]
        else:
            k = self.step_index if self._started else self._begin_index
            idx = [k] * timestep.shape[0]
        acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
        s = torch.as_tensor(self._sigmas64[idx], dtype=acc).to(sample.device)
        s = s.reshape((-1,) + (1,) * (sample.dim() - 1))
        return (s * noise.to(acc) + (1.0 - s) * sample.to(acc)).to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: Generator = None, per_token_timesteps: Optional[torch.Tensor] = None,
             return_dict: bool = True, *, key: Optional[torch.Tensor] = None,
             uncond_output: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0) -> Union[FlowMatchEulerDiscreteSchedulerOutput, tuple]:
        """One flow-matching Euler step, one fused kernel launch.

        Args:
            model_output: the velocity prediction, sample's shape.
            timestep: one of ``timesteps`` (used at the first step of a run only).
            sample: x_s, (N, ...) float tensor.
            s_churn, s_tmin, s_tmax, s_noise: accepted and unused, as in diffusers.
            generator: for stochastic_sampling's noise.
            per_token_timesteps: not supported by the fused step (ValueError).
            return_dict: return a ``FlowMatchEulerDiscreteSchedulerOutput``.
            uncond_output, guidance_scale, guidance_rescale: classifier-free
                guidance (model_output is the conditional prediction),
                combined inside the fused step (see :func:`fastdiff.ddpm_step`).
            key: an in-kernel noise key for this step (stochastic_sampling).

        Returns: ``(prev_sample,)``.
        """
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported by the fused flow-matching scheduler")
        self._ready(timestep, sample)
        stochastic = bool(self.config.stochastic_sampling)
        noise, k = self._draw(sample.shape, generator, sample.device, torch.float32, None, key if stochastic else None,
                              sample.dtype, needed=stochastic)
        prev, _ = self._fused(model_output, sample, noise=noise, key=k,
                              guidance=(uncond_output, guidance_scale, guidance_rescale))
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
