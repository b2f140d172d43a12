"""``GaussianDiffusion``: a denoiser plus a noise schedule, trained and sampled
through the fused fastdiff operators.

    model = fastdiff.nn.MLPDenoiser(dim=2)
    diffusion = GaussianDiffusion(model, "linear", num_timesteps=1000)
    loss = diffusion(x0)                         # fused q_sample + fused loss
    loss.backward()
    x = diffusion.sample(64, steps=50, method="ddim")
    bpd = diffusion.nll(x0_test)["bpd"]          # variational bound, bits/dim

Conventions (see DESIGN.md section 1): timesteps are 0-based, t in [0, T);
code timestep t is the paper's t+1, so q(x_t | x0) at t = 0 already carries
noise of variance beta_1 and the decoder p(x0 | x_{t=0}) is the paper's
L_0 term.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .. import ops as _ops
from ..ops.multistep import multistep_step as _multistep_step
from . import multistep_tables as _tb
from ..ops import direct as _direct
from ..ops._codes import PREDICTION, VARIANCE
from ..schedule import SCHEDULES, SPACINGS, WEIGHTINGS, NoiseSchedule

Tensor = torch.Tensor

MULTISTEP_METHODS = ("dpmsolver++", "unipc", "euler", "euler_ancestral")
METHODS = ("ddpm", "ddim") + MULTISTEP_METHODS
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
_LN2 = math.log(2.0)
_VARIANCE_CODES = {v: VARIANCE.index(v) for v in VARIANCE_TYPES}

# Float64 tables held as buffers; _apply keeps them float64 under .to(dtype) / .half().
_TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
           "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "log_betas_clipped")


class GaussianDiffusion(nn.Module):
    """A Gaussian diffusion model around any denoiser ``model(x_t, t) -> output``.

    Args:
        model: the denoiser. Called as ``model(x_t, t)`` with x_t of shape
            (N, *sample_shape) and t an int64 (N,) tensor on x_t's device. It
            returns a tensor of x_t's shape (for ``variance_type=
            "learned_range"``: twice the channels of dim 1, prediction first,
            then the variance interpolation values v in [-1, 1]). An output
            object with a ``.sample`` attribute (diffusers' models) or a tuple
            is unwrapped.
        schedule: a :class:`~fastdiff.NoiseSchedule`, or the name of one
            (``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``) built with
            ``num_timesteps`` steps and the DDPM defaults.
        num_timesteps: T for a named schedule (with a NoiseSchedule it must be
            left at 1000 or equal the schedule's T).
        sample_shape: per-sample shape, e.g. (3, 32, 32) or (2,). None: taken
            from the first batch given to :meth:`forward`.
        target: what the model predicts: ``epsilon``, ``sample`` (x0) or
            ``v_prediction``.
        weighting: loss weighting, ``uniform`` or ``min_snr`` (gamma =
            ``snr_gamma``; Hang et al. 2023).
        variance_type: reverse-process variance: ``fixed_small`` (posterior
            beta~_t), ``fixed_large`` (beta_t) or ``learned_range`` (the model
            interpolates the log-variance; trained with the hybrid loss of
            Nichol & Dhariwal 2021, see :meth:`forward`).
        clip_sample, clip_sample_range: clamp the predicted x0 to
            +-clip_sample_range while sampling and in :meth:`nll`.
        cond_drop_prob: classifier-free guidance training: in :meth:`forward`
            (training mode), each sample's conditioning is replaced by the
            model's ``null_condition`` with this probability (0: never).

    Conditioning: ``class_labels`` (int64 (N,)) and/or ``context`` (float
    (N, L, D)) given to :meth:`forward`, :meth:`sample` or :meth:`nll` reach
    the model as keywords, ``model(x_t, t, class_labels=..., context=...)``
    (only those given; unconditional calls are ``model(x_t, t)``). A model
    with a ``num_classes`` attribute that is not None and a
    ``null_condition(class_labels=..., context=...)`` method (such as
    :class:`fastdiff.nn.UNet`) gets its null label when no labels are given.

    The schedule tables (``betas``, ``alphas_cumprod``, posterior
    coefficients) are float64 non-persistent buffers: ``.to(device)`` moves
    them, ``.to(dtype)`` casts only the model and leaves them float64, and
    they are rebuilt from :attr:`config` rather than stored in state dicts.
    """

    def __init__(self, model: nn.Module, schedule: Union[NoiseSchedule, str] = "linear", *,
                 num_timesteps: int = 1000, sample_shape: Optional[tuple] = None, target: str = "epsilon",
                 weighting: str = "uniform", snr_gamma: float = 5.0, variance_type: str = "fixed_small",
                 clip_sample: bool = True, clip_sample_range: float = 1.0, cond_drop_prob: float = 0.0):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
        if isinstance(schedule, str):
            schedule = NoiseSchedule.make(schedule, num_timesteps)
        elif isinstance(schedule, NoiseSchedule):
            if num_timesteps not in (1000, schedule.num_timesteps):
                raise ValueError(f"num_timesteps={num_timesteps} disagrees with the schedule's "
                                 f"{schedule.num_timesteps} steps")
        else:
            raise TypeError(f"schedule must be a NoiseSchedule or a schedule name, got {type(schedule).__name__}")
        if target not in PREDICTION:
            raise ValueError(f"target must be one of {PREDICTION}, got {target!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range}")
        if isinstance(cond_drop_prob, bool) or not isinstance(cond_drop_prob, (int, float)) or \
                not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be a number in [0, 1], got {cond_drop_prob!r}")
        self.cond_drop_prob = float(cond_drop_prob)
        self.model = model
        self.num_timesteps = schedule.num_timesteps
        self.sample_shape = _check_shape(sample_shape) if sample_shape is not None else None
        self.target = target
        self.weighting = weighting
        self.snr_gamma = float(snr_gamma)
        self.variance_type = variance_type
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self._schedule_name = schedule.name
        self._schedule_config = dict(schedule.config)
        self._compiled = None  # torch.compile(model), built on first use
        self._graph_warned = False
        self._register_tables(schedule.betas.detach().cpu())

    def _register_tables(self, betas: Tensor) -> None:
        f64 = torch.float64
        betas = betas.to(f64)
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=f64), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)  # beta~_t; 0 at t = 0
        # beta~_0 = 0: the log is taken of beta~_1 there (DDPM / improved DDPM convention)
        post_var_clipped = torch.cat([post_var[1:2], post_var[1:]]) if len(betas) > 1 else betas.clone()
        tables = dict(
            betas=betas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev, posterior_variance=post_var,
            posterior_log_variance_clipped=post_var_clipped.log(),
            posterior_mean_coef1=abar_prev.sqrt() * betas / (1 - abar),
            posterior_mean_coef2=(1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            # log of fixed_large's variance: beta_t, with beta~_1 at t = 0 (as the DDPM code)
            log_betas_clipped=torch.cat([post_var_clipped[:1], betas[1:]]).log(),
        )
        for name in _TABLES:
            self.register_buffer(name, tables[name], persistent=False)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) would cast the float64 tables: keep them float64,
        # moved (not re-rounded) to wherever fn sent them.
        old = {name: self._buffers[name] for name in _TABLES}
        super()._apply(fn, recurse)
        for name, t in old.items():
            new = self._buffers[name]
            if new.dtype != torch.float64:
                self._buffers[name] = t.to(new.device)
        return self

    # ------------------------------------------------------------ schedule --
    @property
    def schedule(self) -> NoiseSchedule:
        """The :class:`NoiseSchedule`, sharing this module's float64 tables
        (so it lives on the module's device)."""
        return NoiseSchedule.from_alphas_cumprod(self.alphas_cumprod, betas=self.betas, name=self._schedule_name,
                                                 config=self._schedule_config)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def config(self) -> dict:
        """A JSON-able dict of the constructor settings; the schedule is its
        ``NoiseSchedule.config`` (named schedules) or ``{"betas": [...]}``."""
        if self._schedule_config.get("name") in SCHEDULES:
            sched = dict(self._schedule_config)
        else:
            sched = {"betas": self.betas.detach().cpu().tolist()}
        return dict(schedule=sched, num_timesteps=self.num_timesteps,
                    sample_shape=list(self.sample_shape) if self.sample_shape is not None else None,
                    target=self.target, weighting=self.weighting, snr_gamma=self.snr_gamma,
                    variance_type=self.variance_type, clip_sample=self.clip_sample,
                    clip_sample_range=self.clip_sample_range,
                    # only when set, so unconditional configs are unchanged
                    **({"cond_drop_prob": self.cond_drop_prob} if self.cond_drop_prob else {}))

    @classmethod
    def from_config(cls, model: nn.Module, config: dict) -> "GaussianDiffusion":
        """Rebuild a GaussianDiffusion around ``model`` from :attr:`config`."""
        cfg = dict(config)
        sched = dict(cfg.pop("schedule"))
        if "betas" in sched:
            schedule = NoiseSchedule.from_betas(sched["betas"])
        else:
            schedule = NoiseSchedule.make(sched.pop("name"), sched.pop("num_timesteps"), **sched)
        cfg.pop("num_timesteps", None)
        shape = cfg.pop("sample_shape", None)
        return cls(model, schedule, sample_shape=tuple(shape) if shape is not None else None, **cfg)

    def extra_repr(self) -> str:
        return (f"schedule={self._schedule_name}, num_timesteps={self.num_timesteps}, sample_shape="
                f"{self.sample_shape}, target={self.target}, weighting={self.weighting}, "
                f"variance_type={self.variance_type}, clip_sample={self.clip_sample}")

    # -------------------------------------------------------------- checks --
    def _check_x0(self, x0, name: str = "x0", infer: bool = False, check_finite: bool = True) -> Tensor:
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x0).__name__}")
        if not x0.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x0.dtype}")
        if x0.dim() < 2 or x0.shape[0] < 1:
            raise ValueError(f"{name} must have shape (N, *sample_shape) with N >= 1, got {tuple(x0.shape)}")
        if self.sample_shape is None:
            if not infer:
                raise ValueError("sample_shape is unknown: pass sample_shape= to GaussianDiffusion or call it "
                                 "on a training batch first")
            self.sample_shape = tuple(x0.shape[1:])
        elif tuple(x0.shape[1:]) != self.sample_shape:
            raise ValueError(f"{name} must have shape (N, *{self.sample_shape}), got {tuple(x0.shape)}")
        if x0.device != self.device:
            raise ValueError(f"{name} is on {x0.device} but the diffusion's tables are on {self.device}; "
                             f"move one with .to()")
        if check_finite and not bool(torch.isfinite(x0).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return x0

    def _timesteps(self, t, n: int, device) -> Tensor:
        T = self.num_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor, list, tuple)):
            raise TypeError(f"t must be an int or an integer tensor of shape ({n},), got {type(t).__name__}")
        if isinstance(t, int):
            if not 0 <= t < T:
                raise ValueError(f"t={t} is out of range [0, {T})")
            return torch.full((n,), t, dtype=torch.int64, device=device)
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor, got {t.dtype}")
        if t.dim() == 0:
            t = t.reshape(1).expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},), got {tuple(t.shape)}")
        if t.device.type == "cpu" and not torch.compiler.is_compiling() and (int(t.min()) < 0 or int(t.max()) >= T):
            raise ValueError(f"t has values outside [0, {T})")
        return t.to(device=device, dtype=torch.int64).contiguous()

    def _model_fn(self, compile_model: bool):
        if not compile_model:
            return self.model
        if self._compiled is None:
            # kept out of the module tree (it shares the model's parameters)
            self.__dict__["_compiled"] = torch.compile(self.model)
        return self._compiled

    def _model_dtype(self):
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    # ------------------------------------------------------- conditioning --
    def _condition(self, n: int, device, class_labels=None, context=None, default_null: bool = False) -> dict:
        """The conditioning keywords for a batch of n, checked and moved to
        ``device``: {} when none is given (with ``default_null``: the null label
        for a class-conditional model, whose forward requires labels)."""
        cond = {}
        if class_labels is not None:
            if isinstance(class_labels, int) and not isinstance(class_labels, bool):
                class_labels = torch.full((n,), class_labels, dtype=torch.int64)
            y = torch.as_tensor(class_labels)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"class_labels must be integers, got {y.dtype}")
            if y.shape != (n,):
                raise ValueError(f"class_labels must have shape ({n},), got {tuple(y.shape)}")
            cond["class_labels"] = y.to(device=device, dtype=torch.int64)
        if context is not None:
            if not isinstance(context, torch.Tensor) or not context.is_floating_point() or context.dim() != 3 \
                    or context.shape[0] != n:
                got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
                raise ValueError(f"context must be a float tensor of shape ({n}, L, D), got {got}")
            cond["context"] = context.to(device)
        if not cond and default_null and getattr(self.model, "num_classes", None) is not None and \
                hasattr(self.model, "null_condition"):
            cond = self.model.null_condition(class_labels=torch.zeros(n, dtype=torch.int64, device=device))
        return cond

    def _null(self, cond: dict) -> dict:
        """The unconditional stand-in of ``cond`` (the model's null_condition;
        zeros for a context when the model has none)."""
        fn = getattr(self.model, "null_condition", None)
        if fn is not None:
            return fn(**cond)
        if "class_labels" in cond:
            raise ValueError(f"classifier-free guidance with class_labels needs the model's null label: "
                             f"{type(self.model).__name__} has no null_condition(class_labels=...) method")
        return {"context": torch.zeros_like(cond["context"])}

    def _call(self, model_fn, x: Tensor, t: Tensor, in_dtype=None, cond: Optional[dict] = None) -> Tensor:
        """model(x, t, **cond), unwrapped, shape-checked and cast to x's dtype."""
        xin = x if in_dtype is None or in_dtype == x.dtype else x.to(in_dtype)
        out = model_fn(xin, t, **cond) if cond else model_fn(xin, t)
        if not isinstance(out, torch.Tensor):
            if hasattr(out, "sample"):
                out = out.sample
            elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
                out = out[0]
            else:
                raise TypeError(f"the model must return a tensor, got {type(out).__name__}")
        want = tuple(x.shape)
        if self.variance_type == "learned_range":
            want = (x.shape[0], 2 * x.shape[1]) + tuple(x.shape[2:])
        if tuple(out.shape) != want:
            extra = " (learned_range: twice the channels of dim 1)" if self.variance_type == "learned_range" else ""
            raise ValueError(f"the model's output must have shape {want}{extra}, got {tuple(out.shape)}")
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _split(self, out: Tensor, c: int) -> tuple[Tensor, Optional[Tensor]]:
        if self.variance_type == "learned_range":
            return out[:, :c], out[:, c:]
        return out, None

    # ---------------------------------------------------------------- loss --
    def forward(self, x0: Tensor, *, t=None, generator: Optional[torch.Generator] = None,
                reduction: str = "mean", check_finite: Optional[bool] = None, class_labels=None,
                context: Optional[Tensor] = None,
                key: Optional[Tensor] = None) -> Tensor:
        """The training loss on a batch of clean data.

        x_t is made by the fused ``q_sample`` with in-kernel noise drawn from a
        key; the fused ``diffusion_loss`` regenerates the same noise from that
        key, so the noise tensor is never written. loss_n = w_t ||target -
        model(x_t, t)||^2 / D with ``target``/``weighting`` as configured.
        With ``learned_range`` the hybrid loss is used: the above on the first C
        output channels plus (T/1000) times the variational-bound term L_t
        (bits/dim, with the model's mean detached so it trains only the
        variance channels; Nichol & Dhariwal 2021).

        Args:
            x0: clean data (N, *sample_shape), any float dtype, on the module's
                device (the first batch fixes sample_shape if it was None).
            t: timesteps (N,) int tensor or int; default uniform in [0, T).
            generator: draws t and the noise key (default: global generator).
            reduction: ``"mean"`` (a scalar) or ``"none"`` (per-sample (N,)).
            check_finite: raise on NaN/inf in x0. Default: checked when x0 is
                on the CPU only (on a GPU the check would synchronise every
                training step).
            class_labels, context: the conditioning (see the class docstring).
                In training mode with ``cond_drop_prob`` > 0 each sample's is
                replaced by the null condition with that probability, decided
                by uniforms drawn from ``generator`` after t and the noise key
                (so a seeded run, and a resumed one, drops the same samples).
            key: the noise key (int64 [seed, offset] on x0's device, see
                :func:`fastdiff.draw_key`); default: drawn from ``generator``
                after t. The trainer's compiled/graphed step draws t and the
                key outside and passes them in.

        Returns: the loss, float32 scalar (or (N,) with reduction="none").
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if check_finite is None:
            check_finite = x0.device.type == "cpu" if isinstance(x0, torch.Tensor) else True
        x0 = self._check_x0(x0, infer=True, check_finite=check_finite)
        n, dev = x0.shape[0], x0.device
        if t is None:
            gdev = generator.device if generator is not None else dev
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gdev).to(dev)
        else:
            t = self._timesteps(t, n, dev)
        # x0 and t are checked above, once: the rest runs on the checked-once path (fastdiff.ops.direct)
        abar = self.alphas_cumprod
        if key is None:
            key = _ops.draw_key(generator, dev).to(dev)
        cond = self._condition(n, dev, class_labels, context, default_null=True)
        if cond and self.training and self.cond_drop_prob > 0 and (class_labels is not None or context is not None):
            gdev = generator.device if generator is not None else dev
            drop = torch.rand(n, generator=generator, device=gdev).to(dev) < self.cond_drop_prob
            null = self._null(cond)
            cond = {k: torch.where(drop.reshape((n,) + (1,) * (v.dim() - 1)), null[k], v) for k, v in cond.items()}
        x_t, _ = _direct.q_sample_key(x0, t, abar, key, False)
        out = self._call(self.model, x_t, t, cond=cond)
        pred, var = self._split(out, x0.shape[1])
        w = _direct.loss_weights(abar, t, self.weighting, self.target, self.snr_gamma)
        # the gradient stored by the forward on a CPU, recomputed in the backward on a GPU (as diffusion_loss)
        loss = _direct.diffusion_loss(pred, x0, t, abar, w, PREDICTION.index(self.target), key=key,
                                      store_grad=dev.type == "cpu")
        if var is not None:
            vb = self._vb_terms(x0, x_t, t, torch.cat([pred.detach(), var], 1))
            loss = loss + (self.num_timesteps / 1000.0) * vb.to(loss.dtype)
        return loss.mean() if reduction == "mean" else loss

    # ------------------------------------------------------ likelihood maths --
    def _gather(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table ``name`` at t, float64, shaped (N, 1, ...) to broadcast with like."""
        return getattr(self, name)[t].reshape((-1,) + (1,) * (like.dim() - 1))

    def _pred_x0(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x0_hat from the model's prediction, float64, clipped if clip_sample."""
        ab = self._gather("alphas_cumprod", t, x_t)
        if self.target == "epsilon":
            x0 = (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
        elif self.target == "sample":
            x0 = out
        else:
            x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0

    def _p_log_variance(self, var_out: Optional[Tensor], t: Tensor, like: Tensor) -> Tensor:
        """log of p(x_{t-1} | x_t)'s variance, float64, broadcastable with like."""
        small = self._gather("posterior_log_variance_clipped", t, like)
        if self.variance_type == "fixed_small":
            return small
        large = self._gather("log_betas_clipped", t, like)
        if self.variance_type == "fixed_large":
            return large
        frac = (var_out.to(torch.float64) + 1) / 2
        return frac * self._gather("betas", t, like).log() + (1 - frac) * small

    def _vb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, out: Tensor, decoder_rows: Optional[slice] = None
                  ) -> Tensor:
        """Per-sample term L_t of the bound in bits/dim, float64 (N,):
        KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t >= 1 and the
        discretised-Gaussian decoder NLL -log p(x0 | x_t) for t = 0.
        ``decoder_rows``: the rows known (on the host) to have t = 0, so the
        decoder is evaluated only there; None: selected from t on the device."""
        f64 = torch.float64
        x0d, xtd = x0.to(f64), x_t.to(f64)
        pred, var = self._split(out.to(f64), x0.shape[1])
        x0_hat = self._pred_x0(pred, xtd, t)
        c1, c2 = self._gather("posterior_mean_coef1", t, xtd), self._gather("posterior_mean_coef2", t, xtd)
        mean_p = c1 * x0_hat + c2 * xtd
        logvar_p = self._p_log_variance(var, t, xtd)
        # KL between Gaussians, per element, in nats
        mean_q = c1 * x0d + c2 * xtd
        logvar_q = self._gather("posterior_log_variance_clipped", t, xtd)
        kl = 0.5 * (logvar_p - logvar_q + torch.exp(logvar_q - logvar_p)
                    + (mean_q - mean_p) ** 2 * torch.exp(-logvar_p) - 1)
        if decoder_rows is None:
            nll0 = -discretized_gaussian_log_likelihood(x0d, mean_p, logvar_p)
            term = torch.where((t == 0).reshape((-1,) + (1,) * (kl.dim() - 1)), nll0, kl)
        else:
            r = decoder_rows
            nll0 = -discretized_gaussian_log_likelihood(x0d[r], mean_p[r], logvar_p[r])
            term = torch.cat([kl[:r.start], nll0, kl[r.stop:]]) if nll0.numel() else kl
        return term.flatten(1).mean(1) / _LN2

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x0) || N(0, I)) per sample in bits/dim, float64 (N,)."""
        x = x0.to(torch.float64)
        ab = self.alphas_cumprod[-1]
        kl = 0.5 * (-torch.log1p(-ab) + (1 - ab) + ab * x * x - 1)
        return kl.flatten(1).mean(1) / _LN2

    @torch.no_grad()
    def nll(self, x0: Tensor, *, generator: Optional[torch.Generator] = None, progress: bool = False,
            batch_timesteps: Optional[int] = None, class_labels=None, context: Optional[Tensor] = None) -> dict:
        """The variational bound on -log p(x0) in bits/dim (DDPM paper, eq. 5).

        bpd = L_prior + sum_{t=0}^{T-1} L_t with L_prior = KL(q(x_T|x0) || N(0,I)),
        L_t = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t >= 1 (the model's
        posterior mean, the fixed or learned variance), and L_0 = -log p(x0 | x_t)
        at t = 0 under the discretised Gaussian decoder for 8-bit data in [-1, 1]
        (256 bins of width 2/255; the edge bins extend to -inf / +inf).
        Each L_t is a one-sample Monte-Carlo estimate (one x_t per sample and
        t). x0_hat is clipped when ``clip_sample``.

        Args:
            x0: data (N, *sample_shape) scaled to [-1, 1]; NaN/inf raise.
            generator: draws the noise keys (default: the global generator).
            progress: show a tqdm progress bar over the timesteps.
            batch_timesteps: how many timesteps share one model call (the
                model sees N * batch_timesteps rows). Default: as many as keep
                that near 256 rows (at least 1).
            class_labels, context: the conditioning of each x0 (a conditional
                bound); none given to a class-conditional model: its null label.

        Returns: a dict of float64 per-sample tensors: ``bpd`` (N,),
        ``prior_bpd`` (N,), ``decoder_bpd`` (N,) (= L_0, also
        ``vb_bpd[:, 0]``) and ``vb_bpd`` (N, T), the terms L_t.
        """
        x0 = self._check_x0(x0)
        n, T, dev = x0.shape[0], self.num_timesteps, x0.device
        if batch_timesteps is None:
            batch_timesteps = max(1, 256 // n)
        if isinstance(batch_timesteps, bool) or not isinstance(batch_timesteps, int) or batch_timesteps < 1:
            raise ValueError(f"batch_timesteps must be a positive int, got {batch_timesteps!r}")
        k = min(batch_timesteps, T)
        in_dtype = self._model_dtype()
        cond = self._condition(n, dev, class_labels, context, default_null=True)
        vb = torch.empty(n, T, dtype=torch.float64, device=dev)
        starts = range(0, T, k)
        for s in _progress(starts, progress, "nll"):
            ts = torch.arange(s, min(s + k, T), device=dev)
            m = ts.shape[0]
            xb = x0.repeat((m,) + (1,) * (x0.dim() - 1))  # timestep-major: rows j*n .. j*n+n-1 have ts[j]
            tb = ts.repeat_interleave(n)
            key = _ops.draw_key(generator, dev).to(dev)
            x_t, _ = _ops.q_sample(xb, tb, self.alphas_cumprod, key=key, return_noise=False)
            cm = {k: v.repeat((m,) + (1,) * (v.dim() - 1)) for k, v in cond.items()}
            out = self._call(self.model, x_t, tb, in_dtype, cond=cm)
            rows = slice(0, n) if s == 0 else slice(0, 0)  # t = 0 only in the first n rows of the first chunk
            vb[:, s:s + m] = self._vb_terms(xb, x_t, tb, out, rows).reshape(m, n).T
        prior = self.prior_bpd(x0)
        return dict(bpd=prior + vb.sum(1), prior_bpd=prior, decoder_bpd=vb[:, 0].clone(), vb_bpd=vb)

    # ------------------------------------------------------------ sampling --
    @torch.no_grad()
    def sample(self, n: int, *, steps: Optional[int] = None, method: str = "ddpm", eta: float = 0.0,
               spacing: str = "leading", generator: Optional[torch.Generator] = None, x_T: Optional[Tensor] = None,
               cuda_graph: Optional[bool] = None, compile_model: bool = False, progress: bool = False,
               return_trajectory: bool = False, device=None, dtype=None, order: Optional[int] = None,
               class_labels=None, context: Optional[Tensor] = None, guidance_scale: float = 1.0,
               guidance_rescale: float = 0.0):
        """Draw samples with a fused sampler step (DDPM, DDIM, DPM-Solver++,
        UniPC, Euler, Euler ancestral).

        Args:
            n: number of samples (>= 1).
            steps: number of reverse steps, in [1, T]; default T. With fewer
                steps the chain runs on respaced timesteps
                (``NoiseSchedule.timesteps(steps, spacing)``) with beta'_t =
                1 - abar_t / abar_prev.
            method: ``"ddpm"`` (ancestral, this module's variance_type),
                ``"ddim"`` (Song et al. 2021; ``eta`` 0 is deterministic), or
                a multistep sampler, one :func:`fastdiff.ops.multistep.multistep_step`
                launch per step driven by a float64 coefficient table and a
                device step counter: ``"dpmsolver++"`` (DPM-Solver++ multistep,
                midpoint, ``order`` 1-3, default 2), ``"unipc"`` (UniPC bh2 with
                the corrector fused into the next step, ``order`` 1-3, default
                2), ``"euler"`` or ``"euler_ancestral"`` (on the VE scale
                x * sqrt(sigma^2 + 1), noise drawn in the kernel). The
                multistep samplers end at sigma = 0, use lower-order final
                steps below 15 steps (as diffusers' defaults) and clip x0 when
                ``clip_sample`` (Euler: rewritten in x0 form for that).
            eta: DDIM's noise scale (>= 0); must be 0 for ddpm.
            spacing: ``leading``, ``trailing`` or ``linspace`` (diffusers' names).
            generator: draws x_T and the (steps, 2) table of per-step noise
                keys up front; the same generator state gives the same samples
                (eager or CUDA graph). Default: the device's global generator.
            x_T: the starting noise (n, *sample_shape) instead of drawing it.
            cuda_graph: capture one step (model + fused update) in a CUDA graph
                and replay it for every timestep. None: on for CUDA unless
                ``compile_model`` or the model has ``supports_cuda_graphs =
                False``; if capture fails it warns once and runs eagerly.
                True on a non-CUDA device raises.
            compile_model: run the model through ``torch.compile``.
            progress: tqdm progress bar over the steps.
            return_trajectory: also return every intermediate x.
            device: where to sample (default: the module's device).
            dtype: the samples' dtype (default float32); the model gets its
                parameters' dtype.
            order: the solver order of ``dpmsolver++`` / ``unipc`` (1, 2 or 3;
                default 2); must be None for the other methods.
            class_labels: int64 (n,) labels (or one int for all), context:
                (n, L, D); passed to the model as keywords. A class-conditional
                model given neither samples with its null label (unconditional).
            guidance_scale: classifier-free guidance weight w. With a condition
                and w != 1 every step runs the model once on the concatenated
                [conditional; unconditional] batch (2n rows; the unconditional
                half gets the model's ``null_condition``) and the fused step
                combines the two predictions, out_u + w (out_c - out_u), inside
                its launch (``uncond_output=``/``guidance_scale=`` of the step
                ops; every method). w == 1 (or no condition): the plain
                conditional step.
            guidance_rescale: rescale the guided prediction towards the
                conditional one's per-sample standard deviation (Lin et al.
                2023, as diffusers' ``guidance_rescale``), in [0, 1]; done in
                the same fused step. Needs guidance.

        The model runs in whatever mode it is in (call ``.eval()`` first if it
        has dropout). The whole loop runs without host synchronisation: the timestep table,
        noise keys and all schedule coefficients live on the device. The last
        step returns the model's x0 prediction (no noise is added there).

        Returns: samples (n, *sample_shape) in the data's scale; with
        ``return_trajectory`` a tuple (samples, trajectory) where trajectory is
        (steps + 1, n, *sample_shape): x_T then x after each step.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if self.sample_shape is None:
            raise ValueError("sample_shape is unknown: pass sample_shape= to GaussianDiffusion or train first")
        T = self.num_timesteps
        steps = T if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps must be an int in [1, {T}], got {steps!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if not (isinstance(eta, (int, float)) and eta >= 0):
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        if method != "ddim" and eta != 0:
            raise ValueError("eta is a DDIM parameter: use method='ddim' or eta=0")
        if method in ("dpmsolver++", "unipc"):
            order = 2 if order is None else order
            if isinstance(order, bool) or order not in (1, 2, 3):
                raise ValueError(f"order must be 1, 2 or 3 for method={method!r}, got {order!r}")
        elif order is not None:
            raise ValueError(f"order is a dpmsolver++/unipc parameter, got order={order!r} with method={method!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or \
                not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)) or \
                not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        device = torch.device(device) if device is not None else self.device
        cond = self._condition(n, device, class_labels, context)
        guided = bool(cond) and guidance_scale != 1.0
        if guidance_rescale and not guided:
            raise ValueError("guidance_rescale needs guidance: pass class_labels/context and guidance_scale != 1")
        if guided:
            null = self._null(cond)
            cond = {k: torch.cat([v, null[k]]) for k, v in cond.items()}  # [cond; uncond], one 2n model call
            guide = dict(guidance_scale=float(guidance_scale), guidance_rescale=float(guidance_rescale))
        elif not cond:
            cond = self._condition(n, device, default_null=True)
        dtype = dtype or torch.float32
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        shape = (n,) + self.sample_shape
        gdev = generator.device if generator is not None else device
        if x_T is None:
            x = torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)
        else:
            if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != shape:
                raise ValueError(f"x_T must be a tensor of shape {shape}, got "
                                 f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
            x = x_T.to(device=device, dtype=dtype).clone()
        # (steps,) timestep table and per-step noise keys, laid out once on the device
        ts = self.schedule.timesteps(steps, spacing)
        tps = torch.cat([ts[1:], ts.new_full((1,), -1)])
        t_rows = ts[:, None].expand(steps, n).contiguous().to(device)
        tp_rows = tps[:, None].expand(steps, n).contiguous().to(device)
        keys = torch.randint(-(2**63), 2**63 - 1, (steps, 2), dtype=torch.int64, device=gdev,
                             generator=generator).to(device)
        abar = self.alphas_cumprod.to(device)
        model_fn = self._model_fn(compile_model)
        in_dtype = self._model_dtype()
        clip = float(self.clip_sample_range) if self.clip_sample else 0.0

        if cuda_graph is None:
            cuda_graph = (device.type == "cuda" and not compile_model
                          and getattr(self.model, "supports_cuda_graphs", True))
        elif cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
        final_x0, view, reset = True, None, None
        if method in MULTISTEP_METHODS:
            step, x, view, reset = self._multistep(method, order, steps, spacing, x, device, model_fn, in_dtype,
                                                   cond, guide if guided else None)
            final_x0 = False
        else:
            common = dict(prediction=PREDICTION.index(self.target), clip=clip)
            w, phi = (guide["guidance_scale"], guide["guidance_rescale"]) if guided else (1.0, 0.0)
            unguided = _direct.guidance(None, None, 1.0, 0.0)  # the plain step's tuple, built once

            def step(x, t, tp, key):
                # t/tp/key/abar were laid out (and checked) once before the loop, the guidance scales above:
                # the checked-once path. Guided: the conditional and unconditional halves of one model
                # call, combined inside the step kernel (the prediction channels only, with learned variances)
                if guided:
                    out, out_u = self._call_guided(model_fn, x, t, in_dtype, cond)
                    pred, var = self._split(out, x.shape[1])
                    g = _direct.guidance(pred, self._split(out_u, x.shape[1])[0], w, phi)
                else:
                    pred, var = self._split(self._call(model_fn, x, t, in_dtype, cond), x.shape[1])
                    g = unguided
                if method == "ddpm":
                    return _direct.ddpm_step(pred, x, t, tp, abar, model_var=var, key=key,
                                             variance=_VARIANCE_CODES[self.variance_type], guidance=g, **common)
                return _direct.ddim_step(pred, x, t, tp, abar, eta=float(eta), final_alpha_cumprod=1.0, key=key,
                                         guidance=g, **common)

        traj = [(x if view is None else view(-1, x)).clone()] if return_trajectory else None
        result = None
        if cuda_graph:
            result = self._sample_graphed(step, x, t_rows, tp_rows, keys, progress, traj, final_x0, view, reset)
        if result is None:
            if reset is not None:
                reset()  # a failed capture may have run (warm-up) steps
            result = self._sample_eager(step, x, t_rows, tp_rows, keys, progress, traj, final_x0, view)
        return (result, torch.stack(traj)) if return_trajectory else result

    def _sample_eager(self, step, x, t_rows, tp_rows, keys, progress, traj, final_x0=True, view=None):
        steps = t_rows.shape[0]
        for i in _progress(range(steps), progress, "sampling"):
            prev, x0 = step(x, t_rows[i], tp_rows[i], keys[i])
            x = x0 if final_x0 and i == steps - 1 else prev  # DDPM/DDIM: the final step is the x0 prediction
            if traj is not None:
                traj.append((x if view is None else view(i, x)).clone())
        return x

    def _call_guided(self, model_fn, x: Tensor, t: Tensor, in_dtype, cond: dict) -> tuple[Tensor, Tensor]:
        """(conditional, unconditional) outputs from one model call on the
        concatenated 2n batch (``cond`` already holds [cond; null])."""
        n = x.shape[0]
        out = self._call(model_fn, torch.cat([x, x]), torch.cat([t, t]), in_dtype, cond)
        return out[:n], out[n:]

    def _multistep(self, method, order, steps, spacing, x, device, model_fn, in_dtype, cond=None, guide=None):
        """(step, x on the sampler's scale, view, reset) for a multistep
        sampler: the float64 coefficient table, the step counter and the
        zero-initialised history live on ``device``; ``step`` is the model
        call plus one fused launch, the same code at every step (so one CUDA
        graph replays it: the counter advances on the device)."""
        abar = self.alphas_cumprod.detach().to("cpu", torch.float64).numpy()
        ts = self.schedule.timesteps(steps, spacing).numpy()
        sig = np.sqrt((1.0 - abar[ts]) / abar[ts])
        sigmas = np.concatenate([sig, [0.0]])
        ve = method in ("euler", "euler_ancestral")
        if method == "dpmsolver++":
            levels = _tb.dpmsolver_levels(sigmas, solver_order=order, solver_type="midpoint",
                                          algorithm_type="dpmsolver++", prediction_type=self.target,
                                          lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                                          flow=False)
        elif method == "unipc":
            levels = _tb.unipc_levels(sigmas, solver_order=order, solver_type="bh2", prediction_type=self.target,
                                      lower_order_final=True, disable_corrector=(), flow=False)
        elif method == "euler":
            levels = _tb.euler_rows(sigmas, self.target)
        else:
            levels = _tb.euler_ancestral_rows(sigmas, self.target)
        ar = np.arange(steps)
        rows = levels[np.minimum(ar, levels.shape[0] - 1), ar].copy()  # a run from step 0
        C = _tb.C
        if ve and self.clip_sample:
            # clipping acts on x0: move the a_m * model_output term into x0 form (m = (x0 - c_x x) / c_m)
            am, cx, cm = rows[:, C["a_m"]].copy(), rows[:, C["c_x"]], rows[:, C["c_m"]]
            rows[:, C["a_x0"]] += am / cm
            rows[:, C["a_x"]] -= am * cx / cm
            rows[:, C["a_m"]] = 0.0
        K = _tb.history_depth(rows[None])
        keeps_last = bool(np.any(rows[:, C["u_on"]] != 0))
        noisy = bool(np.any(rows[:, C["a_z"]] != 0))
        coeffs = torch.from_numpy(rows).to(device)
        counter = torch.zeros((), dtype=torch.int64, device=device)
        hd = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        hist = torch.zeros((K,) + tuple(x.shape), dtype=hd, device=device)
        last = torch.zeros(x.shape, dtype=hd, device=device) if keeps_last else torch.empty(0, dtype=hd, device=device)
        clip = float(self.clip_sample_range) if self.clip_sample else 0.0
        scale = torch.from_numpy(1.0 / np.sqrt(sigmas ** 2 + 1.0)).to(device) if ve else None
        if ve:
            x = x * float(np.sqrt(sig[0] ** 2 + 1.0))

        def step(x, t, tp, key):
            xin = x
            if scale is not None:
                xin = (x.to(torch.float32 if x.dtype != torch.float64 else x.dtype)
                       * scale.index_select(0, counter.reshape(1)).to(torch.float32 if x.dtype != torch.float64
                                                                       else x.dtype)).to(x.dtype)
            if guide is not None:
                out, out_u = self._call_guided(model_fn, xin, t, in_dtype, cond)
                return _multistep_step(self._split(out, x.shape[1])[0], x, hist, last, coeffs, counter,
                                       key=key if noisy else None, clip_range=clip,
                                       uncond_output=self._split(out_u, x.shape[1])[0], **guide)
            out = self._call(model_fn, xin, t, in_dtype, cond)
            pred, _ = self._split(out, x.shape[1])
            return _multistep_step(pred, x, hist, last, coeffs, counter, key=key if noisy else None,
                                   clip_range=clip)

        def view(i, x):  # x after step i on the data scale (VE: divide by sqrt(sigma_{i+1}^2 + 1))
            return x if not ve else x / float(np.sqrt(sigmas[i + 1] ** 2 + 1.0))

        def reset():
            counter.zero_()
            hist.zero_()
            last.zero_()

        return step, x, view, reset

    def _sample_graphed(self, step, x, t_rows, tp_rows, keys, progress, traj, final_x0=True, view=None,
                        reset=None):
        """Capture one step in a CUDA graph and replay it; None if capture fails.
        ``reset`` restores a multistep sampler's device state after the
        warm-up runs (the captured step advances its counter on replay)."""
        steps = t_rows.shape[0]
        sx, st, stp, skey = x.clone(), t_rows[0].clone(), tp_rows[0].clone(), keys[0].clone()
        try:
            # warm up on a side stream: lazy initialisation (cuBLAS handles,
            # autotuning) must not happen inside the capture
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step(sx, st, stp, skey)
            torch.cuda.current_stream(x.device).wait_stream(side)
            if reset is not None:
                reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                prev, sx0 = step(sx, st, stp, skey)
                sx.copy_(prev)
        except Exception as e:  # a model that syncs, allocates on the host, ... : run eagerly
            if not self._graph_warned:
                warnings.warn(f"CUDA graph capture of the sampling step failed ({type(e).__name__}: {e}); "
                              f"sampling eagerly. Pass cuda_graph=False to skip the attempt.", RuntimeWarning)
                self._graph_warned = True
            return None
        for i in _progress(range(steps), progress, "sampling"):
            st.copy_(t_rows[i], non_blocking=True)
            stp.copy_(tp_rows[i], non_blocking=True)
            skey.copy_(keys[i], non_blocking=True)
            graph.replay()
            if traj is not None:
                cur = sx0 if final_x0 and i == steps - 1 else sx
                traj.append((cur if view is None else view(i, cur)).clone())
        out = sx0.clone() if final_x0 else sx.clone()
        del graph
        return out


# ------------------------------------------------------------------ helpers --
def _check_shape(shape) -> tuple:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as e:
        raise TypeError(f"sample_shape must be a tuple of ints, got {shape!r}") from e
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of positive ints, got {shape!r}")
    return shape


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc)


def _log_sub_exp_ndtr(hi: Tensor, lo: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for hi > lo, stable in both tails (float64)."""
    # in the upper tail use Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    upper = lo > 0
    a = torch.where(upper, -lo, hi)
    b = torch.where(upper, -hi, lo)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return la + torch.log1p(-torch.exp(lb - la).clamp(max=1.0 - 1e-16))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor, bins: int = 256) -> Tensor:
    """Elementwise log-probability of data ``x`` in [-1, 1] quantised to
    ``bins`` levels under N(mean, exp(log_var)) integrated over x's bin
    (width 2/(bins-1)); the first and last bins extend to -inf / +inf.
    Float64, natural log; shapes broadcast."""
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-0.5 * log_var)
    hi = (x + half - mean) * inv_std
    lo = (x - half - mean) * inv_std
    edge = 1.0 - half  # values nearer to +-1 than to the next grid point are in an edge bin
    mid = _log_sub_exp_ndtr(hi, lo)
    left = torch.special.log_ndtr(hi)
    right = torch.special.log_ndtr(-lo)
    return torch.where(x < -edge, left, torch.where(x > edge, right, mid))


__all__ = ["GaussianDiffusion", "discretized_gaussian_log_likelihood", "METHODS", "VARIANCE_TYPES"]
