"""diffusers-compatible DDPM and DDIM schedulers whose ``step`` is one fused kernel.

:class:`FusedDDPMScheduler` and :class:`FusedDDIMScheduler` take the
constructor arguments of diffusers' ``DDPMScheduler`` / ``DDIMScheduler``
(same names, same defaults, same config file), and offer their methods
(``set_timesteps``, ``step``, ``add_noise``, ``get_velocity``,
``scale_model_input``, ``previous_timestep``, ``save_pretrained`` /
``from_pretrained`` / ``from_config``). Swap one into a pipeline and the
pipeline runs with fastdiff's fused step::

    pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
    pipe.scheduler = fastdiff.FusedDDPMScheduler.from_config(pipe.scheduler.config)
    images = pipe(generator=torch.Generator().manual_seed(0)).images

(``DDIMPipeline.__init__`` converts whatever scheduler it is given into a
diffusers ``DDIMScheduler``; assign ``pipe.scheduler`` after construction, as
above, to use :class:`FusedDDIMScheduler` there.)

How a step works
----------------
The schedule is a :class:`fastdiff.NoiseSchedule`: float64 tables, copied
once to each device a sample is seen on and cached there. ``step`` derives
``t_prev`` from the chain that ``set_timesteps`` laid out (a lookup table,
gathered on the device when the timestep already lives there, so a step never
waits for the GPU) and makes one call to :func:`fastdiff.ddpm_step` /
:func:`fastdiff.ddim_step`. Dynamic thresholding adds one extra pass (the
per-sample quantile).

Noise
-----
By default the step noise is drawn exactly as diffusers draws it: diffusers'
``randn_tensor`` with the same shape, generator, dtype and device, under the
same conditions (DDPM: when ``t > 0``; DDIM: when ``eta > 0``), and handed to
the kernel. A pipeline run with a fixed generator therefore gives the images
it gives with diffusers' scheduler (up to the float64-table rounding below).
(One exception: when a DDPM timestep is a GPU tensor, reading ``t > 0``
would sync, so the noise is drawn at every step; the kernel adds none at
t = 0, but the generator advances once more than diffusers' at the end.)
Set ``scheduler.kernel_noise = True`` (an attribute, not part of the config)
and the kernel draws the noise itself (counter-based Philox) from a key taken
from the generator (:func:`fastdiff.draw_key`): no noise tensor is written
or read, and a fixed generator still reproduces a run, but the images differ
from diffusers'. ``step(..., key=k)`` uses an explicit key for one step.

Where these schedulers differ from diffusers (0.42), on purpose
---------------------------------------------------------------
* Tables are float64 (diffusers': float32). Results differ from diffusers'
  by float32 rounding of the tables (~1e-6 relative; ~1e-4 relative just
  above t = 0, where diffusers' float32 ``1 - abar`` has few digits).
  ``betas`` / ``alphas`` / ``alphas_cumprod`` are float32 copies for code that
  reads them; the steps use ``schedule`` (float64).
* ``variance_type="fixed_large_log"``: diffusers returns NaN (it takes the
  square root of a log-variance); here it is the variance beta'_t, as
  ``fixed_large``.
* ``add_noise`` in float16/bfloat16: diffusers rounds abar_t to the sample
  dtype before forming sqrt(1 - abar_t), so at small t (abar_t rounds to 1)
  it adds no noise at all. Here the coefficients are float64 and applied in
  float32 (:func:`fastdiff.q_sample`); only the result is rounded.
* DDIM's previous timestep is the next entry of ``timesteps`` (-1 after the
  last), as in diffusers' DDPM scheduler. diffusers' DDIM uses
  ``t - num_train_timesteps // num_inference_steps``, which leaves the chain
  when the spacing is not uniform (``linspace`` spacing, or ``trailing``
  where num_train_timesteps / num_inference_steps is not an integer): it
  moves the sample to a noise level other than the one the model is given at
  the next step. The two agree wherever the spacing is uniform (every
  ``leading`` chain). :class:`FusedDDIMScheduler.set_timesteps` also takes
  custom ``timesteps``.
* A timestep that is not in the chain, or outside [0, num_train_timesteps),
  raises ``ValueError`` (diffusers' DDPM raises IndexError, its DDIM steps to
  t - ratio); for a timestep tensor already on a GPU the check would need a
  host sync, so there the kernel writes NaN instead.
* ``trained_betas`` are kept in float64 (diffusers rounds them to float32).
* ``step`` also takes per-sample timesteps, shape (N,).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .. import ops
from ..ops import direct as _direct
from ..schedule import NoiseSchedule, rescale_zero_terminal_snr

__all__ = ["FusedDDPMScheduler", "FusedDDIMScheduler"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

Generator = Union[torch.Generator, List[torch.Generator], None]


# -------------------------------------------------------------- tables ------
def _laplace_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """diffusers' "laplace" schedule: abar(u) = sqrt(snr / (1 + snr)) with
    log snr = -sign(1/2 - u) log(1 - 2|1/2 - u| + 1e-6) / 2, discretised as
    beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta); float64."""
    def abar(u: float) -> float:
        log_snr = -0.5 * math.copysign(1.0, 0.5 - u) * math.log(1 - 2 * abs(0.5 - u) + 1e-6)
        snr = math.exp(log_snr)
        return math.sqrt(snr / (1 + snr))

    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float64)


def step_noise(kernel_noise: bool, generator, shape, device, dtype):
    """(noise, key) of a fused scheduler step that needs noise: an in-kernel
    key (``kernel_noise``; from the generator, or the global RNG) or
    diffusers' ``randn_tensor`` draw (a generator list: one per sample)."""
    if kernel_noise:
        if isinstance(generator, list):
            raise ValueError("kernel_noise needs a single torch.Generator (or None), not a list of generators")
        return None, ops.draw_key(generator, device if generator is None else None)
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype), None


def build_noise_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                    rescale_betas_zero_snr) -> NoiseSchedule:
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
    T = int(T)
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        if betas.dim() != 1 or betas.shape[0] != T:
            raise ValueError(f"trained_betas must be a 1-D sequence of num_train_timesteps={T} values, got shape "
                             f"{tuple(betas.shape)}")
    elif beta_schedule in ("linear", "scaled_linear", "sigmoid"):
        betas = NoiseSchedule.make(beta_schedule, T, beta_start, beta_end).betas
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal cosine, s = 0.008, capped at 0.999
        betas = NoiseSchedule.make("cosine", T, cosine_s=0.008, max_beta=0.999).betas
    elif beta_schedule == "laplace":
        betas = _laplace_betas(T)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or give trained_betas), got "
                         f"{beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    try:
        return NoiseSchedule.from_betas(betas)
    except ValueError as e:
        raise ValueError(f"invalid betas ({'trained_betas' if trained_betas is not None else beta_schedule}): "
                         f"{e}") from e


def _flag(value, name: str) -> bool:
    """A bool argument (a Python/numpy bool, or 0/1). Pipelines pass None for "not set": call it as
    ``False if v is None else _flag(v, name)`` where that is allowed."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------- base ------
class _FusedScheduler(SchedulerMixin, ConfigMixin):
    """What the DDPM and DDIM schedulers share: tables, the timestep chain,
    timestep checks, noise, ``add_noise`` / ``get_velocity``."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _needs_set_timesteps = False  # DDIM: step() before set_timesteps() is an error

    @classmethod
    def _get_compatibles(cls):
        # diffusers looks the names in _compatibles up in the diffusers package only; add ours
        found = super()._get_compatibles()
        return found + [c for c in (FusedDDPMScheduler, FusedDDIMScheduler) if c not in found]

    def _setup(self, cfg) -> None:
        _check_choice(cfg.prediction_type, PREDICTION_TYPES, "prediction_type")
        _check_choice(cfg.timestep_spacing, TIMESTEP_SPACINGS, "timestep_spacing")
        if cfg.clip_sample and not cfg.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {cfg.clip_sample_range}")
        if cfg.thresholding and not 0 < cfg.dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {cfg.dynamic_thresholding_ratio}")
        if isinstance(cfg.steps_offset, bool) or not isinstance(cfg.steps_offset, (int, np.integer)) \
                or cfg.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {cfg.steps_offset!r}")
        #: the float64 schedule the kernels read (a CPU copy; device copies are cached)
        self.schedule = build_noise_schedule(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                                             cfg.beta_schedule, cfg.trained_betas, cfg.rescale_betas_zero_snr)
        # float32 copies for code written against diffusers' attributes
        self.betas = self.schedule.betas.float()
        self.alphas = self.schedule.alphas.float()
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        #: draw the step noise inside the kernel (Philox) instead of with randn_tensor
        self.kernel_noise = False
        self._schedules = {}
        self._zero_keys = {}
        # what step() passes to the kernel, worked out once
        self._pred_code = PREDICTION_TYPES.index(cfg.prediction_type)
        self._var_code = 0
        self._clip = float(cfg.clip_sample_range) if cfg.clip_sample and not cfg.thresholding else 0.0
        self._set_chain(None)

    # ------------------------------------------------------------ chain -----
    def _set_chain(self, timesteps: Optional[torch.Tensor]) -> None:
        """Build the t -> t_prev lookup: the full chain t -> t - 1, or the
        given descending timesteps (each to the next, the last to -1).
        Timesteps outside the chain map to T, which the kernels treat as
        invalid (NaN) and the host-side check reports."""
        T = self.config.num_train_timesteps
        if timesteps is None:
            prev = torch.arange(-1, T - 1, dtype=torch.int64)
        else:
            ts = timesteps.to("cpu", torch.int64)
            prev = torch.full((T,), T, dtype=torch.int64)
            prev[ts] = torch.cat([ts[1:], ts.new_tensor([-1])])
        self._prev = prev
        self._prev_on = {}
        self._prev_list = prev.tolist()  # host lookups without tensor ops
        self._step_t = {}  # (t, n, device) -> (t, t_prev) int64 (n,) tensors, made once per chain

    def _abar_on(self, device: torch.device) -> torch.Tensor:
        """The float64 abar table on ``device`` (cached by the schedule)."""
        return self.schedule.alphas_cumprod_on(device)

    def _step_timesteps(self, timestep, sample: torch.Tensor):
        """(t, t_prev, t values or None) for a step: int64 (N,) tensors on
        sample's device. A host timestep (an int, or a 0-d / one-element CPU
        tensor, as pipelines pass) is looked up in the chain once and the
        tensors are cached for the chain (set_timesteps resets the cache);
        other forms are checked and converted each call; a GPU timestep is
        gathered on the device (no host sync)."""
        n, dev = sample.shape[0], sample.device
        v = None
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type == "cpu" and timestep.numel() == 1 and timestep.dim() <= 1 and \
                    not timestep.is_floating_point() and not timestep.is_complex() and \
                    timestep.dtype != torch.bool and not torch.compiler.is_compiling():
                v = int(timestep.item())
        elif isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            v = int(timestep)
        if v is not None:
            hit = self._step_t.get((v, n, dev))
            if hit is not None:
                return hit[0], hit[1], [v] * n
            T = self.config.num_train_timesteps
            if not 0 <= v < T:
                raise ValueError(f"timestep={v} is out of range [0, {T})")
            prev = self._prev_list[v]
            if prev == T:
                raise ValueError(f"timestep {[v]} is not in the scheduler's chain (scheduler.timesteps, set by "
                                 f"set_timesteps): {self.timesteps.tolist()}")
            t = torch.full((n,), v, dtype=torch.int64, device=dev)
            tp = torch.full((n,), prev, dtype=torch.int64, device=dev)
            if len(self._step_t) > 4096:
                self._step_t.clear()
            self._step_t[(v, n, dev)] = (t, tp)
            return t, tp, [v] * n
        t = self._timestep_tensor(timestep, n)
        t_prev = self._prev_timestep(t)
        T = self.config.num_train_timesteps
        tt, vals = _direct.timesteps(t, n, dev, T)
        tp, _ = _direct.timesteps(t_prev, n, dev, T + 1, "t_prev", allow_final=True)
        return tt, tp, vals

    def _schedule_on(self, device: torch.device) -> NoiseSchedule:
        s = self._schedules.get(device)
        if s is None:
            s = self.schedule if device.type == "cpu" else self.schedule.to(device)
            self._schedules[device] = s
        return s

    def _timestep_tensor(self, timestep, n: int, name: str = "timestep") -> torch.Tensor:
        """timestep as an int64 tensor, 0-d or (n,), on its own device."""
        if isinstance(timestep, bool):
            raise TypeError(f"{name} must be an int or an integer tensor, got bool")
        if isinstance(timestep, (int, np.integer)):
            return torch.tensor(int(timestep), dtype=torch.int64)
        if not isinstance(timestep, torch.Tensor):
            try:
                timestep = torch.as_tensor(timestep)
            except Exception as e:
                raise TypeError(f"{name} must be an int or an integer tensor, got {type(timestep).__name__}") from e
        if timestep.is_floating_point() or timestep.is_complex() or timestep.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {timestep.dtype}")
        if timestep.dim() == 1 and timestep.shape[0] == 1:
            timestep = timestep.reshape(())
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] != n):
            raise ValueError(f"{name} must be a scalar or have shape ({n},) (one per sample), got "
                             f"{tuple(timestep.shape)}")
        return timestep.to(torch.int64)

    def _prev_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """t_prev for an int64 timestep tensor (0-d or (N,)); checked on the
        host for CPU timesteps, gathered on the device otherwise."""
        T = self.config.num_train_timesteps
        if t.device.type == "cpu":
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= T:
                raise ValueError(f"timestep={t.tolist()} is out of range [0, {T})")
            prev = self._prev[t]
            if bool((prev == T).any()):
                bad = t[prev == T].unique().tolist()
                raise ValueError(f"timestep {bad} is not in the scheduler's chain (scheduler.timesteps, set by "
                                 f"set_timesteps): {self.timesteps.tolist()}")
            return prev
        table = self._prev_on.get(t.device)
        if table is None:
            table = self._prev_on[t.device] = self._prev.to(t.device)
        # a device-side gather (no host sync); out-of-range t is clamped for the gather only: the kernel
        # sees the bad t itself and writes NaN
        return table.index_select(0, t.reshape(-1).clamp(0, T - 1)).reshape(t.shape)

    def previous_timestep(self, timestep):
        """The timestep the chain steps to from ``timestep`` (-1 after the
        last step): an int for an int, a tensor for a tensor."""
        t = self._timestep_tensor(timestep, 1 if not isinstance(timestep, torch.Tensor) or timestep.dim() == 0
                                  else timestep.shape[0])
        prev = self._prev_timestep(t)
        return int(prev) if isinstance(timestep, (int, np.integer)) else prev

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        """Lay out the sampling chain (call before sampling).

        Args:
            num_inference_steps: number of steps; the timesteps follow
                ``timestep_spacing`` (``leading`` adds ``steps_offset``).
                At most ``num_train_timesteps``.
            device: where ``self.timesteps`` is put (default: CPU). Timesteps
                on a GPU make ``step`` entirely free of host syncs.
            timesteps: custom timesteps instead: strictly descending ints in
                [0, num_train_timesteps). Give one of the two.
        """
        cfg = self.config
        T = cfg.num_train_timesteps
        if device is not None:
            if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
                raise TypeError(f"device must be a torch.device, a str or an int, got {type(device).__name__}")
            try:
                device = torch.device(device)
            except RuntimeError as e:
                raise ValueError(f"device: {e}") from e
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {device} is not available (no CUDA device)")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps needs exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
            if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer):
                raise ValueError(f"timesteps must be a non-empty 1-D sequence of ints, got {timesteps!r}")
            if np.any(np.diff(ts) >= 0):
                raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()}")
            if ts[0] >= T or ts[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps={T}), got {ts.tolist()}")
            ts = torch.from_numpy(ts.astype(np.int64))
            self.custom_timesteps = True
        else:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
            if n > T:
                raise ValueError(f"num_inference_steps={n} cannot be larger than num_train_timesteps={T}")
            ts = self.schedule.timesteps(int(n), cfg.timestep_spacing, int(cfg.steps_offset))
            if int(ts.max()) >= T:
                raise ValueError(f"steps_offset={cfg.steps_offset} puts timestep {int(ts.max())} outside "
                                 f"[0, num_train_timesteps={T}) with num_inference_steps={n}")
            self.custom_timesteps = False
        self.num_inference_steps = int(ts.shape[0])
        self._set_chain(ts)
        self.timesteps = ts.to(device) if device is not None else ts

    # ------------------------------------------------------------ noise -----
    def _check_step_args(self, model_output, sample, generator, variance_noise, key) -> None:
        """The edge checks of step(); the fused kernel checks the tensors' dtypes, shapes and devices."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor of shape (N, ...), got {type(sample).__name__}")
        if sample.dim() < 1:
            raise ValueError("sample must have a batch dimension (shape (N, ...)), got a scalar")
        if not sample.is_floating_point():
            raise TypeError(f"sample must be float32, float16, bfloat16 or float64, got {sample.dtype}")
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        if variance_noise is not None:
            if not isinstance(variance_noise, torch.Tensor):
                raise TypeError(f"variance_noise must be a torch.Tensor, got {type(variance_noise).__name__}")
            if variance_noise.shape != sample.shape or variance_noise.dtype != sample.dtype or \
                    variance_noise.device != sample.device:
                raise ValueError(f"variance_noise must have sample's shape, dtype and device "
                                 f"({tuple(sample.shape)}, {sample.dtype}, {sample.device}), got "
                                 f"({tuple(variance_noise.shape)}, {variance_noise.dtype}, {variance_noise.device})")
        if key is not None and (not isinstance(key, torch.Tensor) or key.shape != (2,) or key.dtype != torch.int64):
            raise TypeError("key must be an int64 tensor of shape (2,) ([seed, offset]); make one with "
                            "fastdiff.draw_key()")
        if generator is not None and not isinstance(generator, torch.Generator):
            if not isinstance(generator, list) or not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError(f"generator must be a torch.Generator or a list of them, got {generator!r}")
            if len(generator) != sample.shape[0]:
                raise ValueError(f"generator: a list needs one torch.Generator per sample ({sample.shape[0]}), got "
                                 f"{len(generator)}")
        if variance_noise is not None and (generator is not None or key is not None):
            raise ValueError("pass either variance_noise or generator/key, not both")
        if key is not None and generator is not None:
            raise ValueError("pass either key or generator, not both")
        if self._needs_set_timesteps and self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps() before step()")

    def _noise(self, sample: torch.Tensor, generator: Generator, variance_noise, key, needed: bool):
        """(noise, key) for the fused step: the given variance_noise or key;
        an in-kernel key (kernel_noise); diffusers' randn_tensor draw when
        ``needed``; else nothing."""
        if variance_noise is not None:
            return variance_noise, None
        if key is not None:
            return None, key if key.device == sample.device else key.to(sample.device)
        if not needed:
            return None, None
        return step_noise(self.kernel_noise, generator, sample.shape, sample.device, sample.dtype)

    def _guidance_args(self, model_output, uncond_output, guidance_scale, guidance_rescale, sample):
        """The checked (uncond, w, factor) of classifier-free guidance for the step op; with a learned
        variance (2C channels) only uncond_output's first C channels are read, like model_output's."""
        if uncond_output is not None and self._var_code >= 4 and isinstance(uncond_output, torch.Tensor):
            uncond_output = self._split_variance(uncond_output, sample)[0]
        return _direct.guidance(model_output, uncond_output, guidance_scale, guidance_rescale)

    def _thresh(self, model_output: torch.Tensor, sample: torch.Tensor, t: torch.Tensor):
        """The per-sample dynamic-thresholding bound when thresholding is on (an extra pass), else None."""
        cfg = self.config
        if not cfg.thresholding:
            return None
        for name, x in (("model_output", model_output), ("sample", sample)):
            if x.shape != sample.shape or x.dtype != sample.dtype or x.device != sample.device or \
                    not x.is_floating_point():
                raise ValueError(f"{name} must be a float tensor of sample's shape, dtype and device "
                                 f"({tuple(sample.shape)}, {sample.dtype}, {sample.device})")
        return _direct.threshold(model_output, sample, t, self._abar_on(sample.device), self._pred_code,
                                 float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value))

    # -------------------------------------------------- forward process -----
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (the forward process).

        Args:
            original_samples: x0, (N, ...) float32/float16/bfloat16/float64.
            noise: eps, same shape/dtype/device as original_samples.
            timesteps: int, 0-d tensor or (N,) integer tensor in
                [0, num_train_timesteps).

        Returns: x_t like original_samples. The coefficients are float64 and
        applied in float32 (float64 for float64 data), so float16/bfloat16
        samples get their noise at small t (diffusers' add_noise drops it).
        """
        x0 = original_samples
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 1:
            raise TypeError("original_samples must be a floating-point torch.Tensor of shape (N, ...), got "
                            + (f"{x0.dtype} {tuple(x0.shape)}" if isinstance(x0, torch.Tensor) else type(x0).__name__))
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        n, dev = x0.shape[0], x0.device
        t = self._timestep_tensor(timesteps, n, "timesteps")
        t, _ = _direct.timesteps(t, n, dev, self.config.num_train_timesteps, "timesteps")
        return _direct.q_sample_noise(x0, t, self._abar_on(dev), noise)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) sample.

        Args:
            sample: the clean data x0 (diffusers' name), (N, ...) float tensor.
            noise: eps, same shape/dtype/device as sample.
            timesteps: int, 0-d tensor or (N,) integer tensor.

        Returns: v like sample (coefficients in float64, applied in float32).
        """
        t = self._timestep_tensor(timesteps, sample.shape[0] if sample.dim() else 1, "timesteps")
        return ops.get_velocity(sample, noise, t, self._schedule_on(sample.device))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity (DDPM/DDIM do not scale the model input); for pipelines."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# ---------------------------------------------------------------- DDPM ------
class FusedDDPMScheduler(_FusedScheduler):
    """Ancestral DDPM sampling (Ho et al. 2020), diffusers' ``DDPMScheduler``
    with a fused step. See the module docstring for the noise options and the
    deliberate differences from diffusers.

    Args:
        num_train_timesteps: T, the number of training timesteps.
        beta_start, beta_end: the end points of the named beta schedules.
        beta_schedule: ``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"``
            (cosine, capped at 0.999), ``"sigmoid"`` or ``"laplace"``.
        trained_betas: explicit betas, a sequence of T floats in (0, 1]
            (overrides beta_schedule); kept in float64.
        variance_type: ``"fixed_small"`` / ``"fixed_small_log"`` (posterior
            variance), ``"fixed_large"`` / ``"fixed_large_log"`` (beta'_t),
            ``"learned"`` (the model's second C channels are the variance),
            ``"learned_range"`` (they are v in [-1, 1], interpolating the
            log-variance between the two fixed ones). None means fixed_small.
        clip_sample, clip_sample_range: clamp x0_hat to +-clip_sample_range.
        prediction_type: what the model predicts: ``"epsilon"``, ``"sample"``
            (x0) or ``"v_prediction"``.
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's
            dynamic thresholding of x0_hat (takes precedence over clip_sample).
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``
            layout of ``set_timesteps`` (Lin et al. 2024, table 2).
        steps_offset: added to ``leading`` timesteps.
        rescale_betas_zero_snr: rescale the schedule to zero terminal SNR.

    Attributes: ``schedule`` (the float64 :class:`fastdiff.NoiseSchedule`),
    ``timesteps`` (int64, descending), ``num_inference_steps``,
    ``kernel_noise`` (bool, default False), ``betas`` / ``alphas`` /
    ``alphas_cumprod`` (float32 copies), ``variance_type``.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 variance_type: str = "fixed_small", clip_sample: bool = True, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        # DPMSolver-style configs carry variance_type=None ("not learned")
        self.variance_type = "fixed_small" if variance_type is None else variance_type
        _check_choice(self.variance_type, VARIANCE_TYPES, "variance_type")
        self._setup(self.config)
        self._var_code = VARIANCE_TYPES.index(self.variance_type)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: Generator = None,
             return_dict: bool = True, *, variance_noise: Optional[torch.Tensor] = None,
             key: Optional[torch.Tensor] = None, uncond_output: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> Union[DDPMSchedulerOutput, tuple]:
        """One ancestral step x_t -> x_{t_prev}, one fused kernel launch.

        Args:
            model_output: the model's output for (sample, timestep), shape of
                sample, or 2C channels (prediction, variance values) for the
                learned variance types.
            timestep: t: an int, a 0-d integer tensor (as pipelines pass) or
                an (N,) integer tensor (one per sample); must be in the chain
                (``timesteps``; every t in [0, T) before set_timesteps).
                t_prev is the next timestep of the chain (-1 after the last).
            sample: x_t, (N, C, ...) float32/float16/bfloat16/float64.
            generator: a torch.Generator (or a list, one per sample) for the
                noise, drawn as diffusers draws it (or the in-kernel key when
                ``kernel_noise``).
            return_dict: return a ``DDPMSchedulerOutput`` (else a tuple).
            variance_noise: the noise z itself, shape/dtype/device of sample
                (instead of generator).
            key: an int64 (2,) in-kernel noise key (:func:`fastdiff.draw_key`)
                for this step (instead of generator).
            uncond_output: the unconditional model output for classifier-free
                guidance (model_output is then the conditional one), like
                model_output; combined inside the fused step.
            guidance_scale: w (1: no guidance).
            guidance_rescale: phi in [0, 1] (Lin et al. 2023; a per-sample std
                pre-pass).

        Returns:
            ``DDPMSchedulerOutput(prev_sample, pred_original_sample)`` or the
            tuple ``(prev_sample, pred_original_sample)``, both like sample.
            Samples at t = 0 get no noise.
        """
        self._check_step_args(model_output, sample, generator, variance_noise, key)
        t, t_prev, tv = self._step_timesteps(timestep, sample)
        # diffusers draws noise only when t > 0; reading a GPU timestep would sync, so there we always draw
        # (the kernel adds none where t = 0)
        needed = tv is None or any(v > 0 for v in tv)
        noise, k = self._noise(sample, generator, variance_noise, key, needed)
        if noise is None and k is None:
            k = self._zero_key(sample.device)  # t = 0 everywhere: the kernel adds no noise; keep the RNG untouched
        model_output, model_var = self._split_variance(model_output, sample)
        g = self._guidance_args(model_output, uncond_output, guidance_scale, guidance_rescale, sample)
        prev, x0 = _direct.ddpm_step(model_output, sample, t, t_prev, self._abar_on(sample.device),
                                     prediction=self._pred_code, variance=self._var_code, clip=self._clip,
                                     model_var=model_var, noise=noise, key=k,
                                     thresh=self._thresh(_direct.guided_like(model_output, g), sample, t),
                                     guidance=g)
        if not _flag(return_dict, "return_dict"):
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _zero_key(self, device):
        k = self._zero_keys.get(device)
        if k is None:
            k = self._zero_keys[device] = torch.zeros(2, dtype=torch.int64, device=device)
        return k

    def _split_variance(self, model_output: torch.Tensor, sample: torch.Tensor):
        """(prediction, variance values or None): the learned variance types read 2C channels."""
        if self._var_code < 4:
            return model_output, None
        if model_output.dim() < 2 or sample.dim() < 2 or model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"variance_type={self.variance_type!r} needs model_output with twice sample's "
                             f"channels, got {tuple(model_output.shape)} for sample {tuple(sample.shape)}")
        mo, mv = model_output.split(sample.shape[1], dim=1)
        return mo, mv

    def _get_variance(self, t, predicted_variance: Optional[torch.Tensor] = None,
                      variance_type: Optional[str] = None) -> torch.Tensor:
        """The reverse-step variance at timestep ``t`` (diffusers' private
        helper, for code that calls it; ``step`` computes it in the kernel).
        From the float64 tables, returned as float32 like diffusers':
        fixed_small: the posterior variance (clamped at 1e-20); fixed_large and
        fixed_large_log: beta'_t (diffusers' fixed_large_log is NaN, see the
        module docstring); fixed_small_log: its square root, as diffusers
        returns it; learned: ``predicted_variance``; learned_range: the
        interpolated log-variance."""
        vt = self.variance_type if variance_type is None else variance_type
        _check_choice(vt, VARIANCE_TYPES, "variance_type")
        t_int = int(t)
        T = self.config.num_train_timesteps
        if not 0 <= t_int < T:
            raise ValueError(f"t={t_int} is out of range [0, {T})")
        prev = int(self._prev[t_int])
        ab = self.schedule.alphas_cumprod
        a_t = float(ab[t_int])
        a_prev = float(ab[prev]) if 0 <= prev < T else 1.0
        beta = 1 - a_t / a_prev
        var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
        if vt == "fixed_small":
            out = var
        elif vt == "fixed_small_log":
            out = math.exp(0.5 * math.log(var))
        elif vt in ("fixed_large", "fixed_large_log"):
            out = beta
        elif vt == "learned":
            return predicted_variance
        else:
            frac = (predicted_variance + 1) / 2
            return frac * math.log(beta) + (1 - frac) * math.log(var)
        return torch.tensor(out, dtype=torch.float32)


# ---------------------------------------------------------------- DDIM ------
class FusedDDIMScheduler(_FusedScheduler):
    """DDIM sampling (Song et al. 2021), diffusers' ``DDIMScheduler`` with a
    fused step. See the module docstring for the noise options and the
    deliberate differences from diffusers (notably: t_prev follows the chain).

    Args: those of :class:`FusedDDPMScheduler` except ``variance_type``, plus
        set_alpha_to_one: at the last step (t_prev = -1) use abar = 1 (True)
            or abar_0 (False).

    ``set_timesteps`` must be called before ``step``.
    """

    _needs_set_timesteps = True

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._setup(self.config)
        #: abar used where t_prev = -1 (a Python float from the float64 table)
        self._final_abar = 1.0 if set_alpha_to_one else float(self.schedule.alphas_cumprod[0])
        self.final_alpha_cumprod = torch.tensor(self._final_abar, dtype=torch.float32)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Optional[torch.Tensor] = None, return_dict: bool = True, *,
             key: Optional[torch.Tensor] = None, uncond_output: Optional[torch.Tensor] = None,
             guidance_scale: float = 1.0, guidance_rescale: float = 0.0) -> Union[DDIMSchedulerOutput, tuple]:
        """One DDIM step x_t -> x_{t_prev}, one fused kernel launch.

        Args:
            model_output: the model's output for (sample, timestep), shape of sample.
            timestep: t: an int, a 0-d integer tensor or an (N,) integer
                tensor, in the chain set by ``set_timesteps``; t_prev is the
                next timestep of the chain (-1 after the last).
            sample: x_t, (N, C, ...) float32/float16/bfloat16/float64.
            eta: the noise weight, >= 0 (0: deterministic DDIM, 1: DDPM-like).
            use_clipped_model_output: re-derive eps from the clipped x0_hat.
            generator: a torch.Generator (or list) for the noise (eta > 0).
            variance_noise: the noise z itself, shape/dtype/device of sample.
            return_dict: return a ``DDIMSchedulerOutput`` (else a tuple).
            key: an int64 (2,) in-kernel noise key for this step.
            uncond_output: the unconditional model output for classifier-free
                guidance (model_output is then the conditional one), like
                model_output; combined inside the fused step.
            guidance_scale: w (1: no guidance).
            guidance_rescale: phi in [0, 1] (Lin et al. 2023; a per-sample std
                pre-pass).

        Returns:
            ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` or the
            tuple ``(prev_sample, pred_original_sample)``, both like sample.
        """
        self._check_step_args(model_output, sample, generator, variance_noise, key)
        if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
            raise TypeError(f"eta must be a float, got {type(eta).__name__}")
        eta = float(eta)
        if not (eta >= 0 and math.isfinite(eta)):
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        t, t_prev, _ = self._step_timesteps(timestep, sample)
        noise, k = self._noise(sample, generator, variance_noise, key, needed=eta > 0)
        # pipelines pass None for "not set"
        clipped = False if use_clipped_model_output is None else _flag(use_clipped_model_output,
                                                                         "use_clipped_model_output")
        g = self._guidance_args(model_output, uncond_output, guidance_scale, guidance_rescale, sample)
        prev, x0 = _direct.ddim_step(model_output, sample, t, t_prev, self._abar_on(sample.device),
                                     prediction=self._pred_code, clip=self._clip, eta=eta,
                                     final_alpha_cumprod=self._final_abar,
                                     use_clipped_model_output=clipped,
                                     noise=noise if eta > 0 else None, key=k if eta > 0 else None,
                                     thresh=self._thresh(_direct.guided_like(model_output, g), sample, t),
                                     guidance=g)
        if not _flag(return_dict, "return_dict"):
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        """DDIM's sigma_t^2 / eta^2 = (1 - abar_prev)/(1 - abar_t) (1 - abar_t /
        abar_prev) between any two timesteps (diffusers' private helper; abar_prev
        is the final abar for prev_timestep < 0). float64 tables, float32 result."""
        T = self.config.num_train_timesteps
        t, tp = int(timestep), int(prev_timestep)
        if not 0 <= t < T or tp >= T:
            raise ValueError(f"timestep={t} / prev_timestep={tp} out of range [0, {T})")
        ab = self.schedule.alphas_cumprod
        a_t = float(ab[t])
        a_prev = float(ab[tp]) if tp >= 0 else self._final_abar
        return torch.tensor((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), dtype=torch.float32)
