"""The training step without the host: ``TrainConfig.step_mode``.

Three modes run the same step (loss, backward, clipping, AdamW, EMA,
bookkeeping):

* ``"eager"``: :meth:`Trainer._train_step`, op by op (the default; the only
  mode with fp16's GradScaler).
* ``"compile"``: :class:`StepRunner` with the whole step after the random
  draws -- forward, ``loss.backward()``, the global-norm clip, AdamW
  (``torch.optim.adam.adam``, the functional that ``AdamW.step`` calls, with
  ``capturable=True``), the EMA and the device-side accumulators -- traced by
  ``torch.compile(fullgraph=True)`` into one graph (``trace_autograd_ops``
  lets dynamo trace ``backward``). A graph break is an error, so a step that
  compiles has no host synchronisation in it.
* ``"graph"`` (CUDA): the same step, timestep and key draws included,
  captured once in a CUDA graph and replayed: fused capturable AdamW, static
  batch buffer (the batch is copied into it, non-blocking), grads zeroed in
  place instead of freed. The first :data:`GRAPH_WARMUP` steps run eagerly on
  a side stream (the warm-up that capture needs; they are real steps), the
  next one is captured and every later step is one replay.

What the modes share, so they match one another and resume exactly:

* **Random draws.** t (``torch.randint``) and the noise key
  (:func:`fastdiff.draw_key`) come from the trainer's private generator in the
  same order as the eager step, outside the compiled graph (so compile mode
  consumes the generator exactly as eager does) and inside the CUDA graph
  (the generator is registered with it, so each replay advances its offset as
  the eager calls would). Dropout uses the global RNG (under inductor:
  inductor's own draws from it; reproducible, but not eager's masks).
* **Learning rate** is a float32 device tensor, written in the step from the
  step counter by :func:`lr_factor` (the warm-up / cosine schedule, evaluated
  in float64 like the host's ``LambdaLR``); the host value for the log is the
  same function evaluated on the host.
* **EMA** weight ``1 - min(decay, (1 + k) / (10 + k))`` from a device update
  counter (:func:`ema_weight`); applied with multi-tensor ops
  (:meth:`fastdiff.train.EMA.update_with`).
* **Counters** (``step``, EMA updates) live on the device and are set from the
  host's at the start of every :meth:`Trainer.train`, so a resumed run
  continues them; checkpoints hold the optimizer and scheduler state as an
  eager run would write them (:meth:`StepRunner.optimizer_state`), so a run
  can be resumed in any mode.

Fallbacks (each with one warning): ``graph`` on a CPU -> ``compile``;
``graph`` or ``compile`` under DDP -> the eager step with the forward under
``torch.compile`` (dynamo's DDP support splits the graph at bucket
boundaries, so the step cannot be one graph; a captured step would also
need DDP's ``static_graph`` and the all-reduce inside the capture, which is
not exercised); fp16 -> eager (the GradScaler's skipped steps need the host).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
from torch.optim.adam import adam as _adam

from .. import ops as _ops

Tensor = torch.Tensor

STEP_MODES = ("eager", "compile", "graph")
GRAPH_WARMUP = 3  # eager steps on a side stream before the capture


def lr_factor(k: Tensor, warmup: int, total: int, cosine: bool) -> Tensor:
    """The learning-rate multiplier of 0-based step ``k`` (an int64 tensor),
    float64, computed on ``k``'s device: linear warm-up ``(k + 1) / warmup``
    for ``k < warmup``, then 1 (constant) or ``0.5 (1 + cos(pi min(1, (k -
    warmup) / (total - warmup))))`` (cosine). The device twin of
    ``Trainer._lr_lambda``."""
    kf = k.to(torch.float64)
    if cosine:
        span = max(1, total - warmup)
        rest = 0.5 * (1 + torch.cos(math.pi * ((kf - warmup) / span).clamp(max=1.0)))
    else:
        rest = torch.ones_like(kf)
    if warmup:
        return torch.where(kf < warmup, (kf + 1) / warmup, rest)
    return rest


def ema_weight(k: Tensor, decay: float, warmup: bool) -> Tensor:
    """The EMA interpolation weight ``1 - decay_k`` of update ``k`` (int64
    tensor), float64 on ``k``'s device: ``decay_k = min(decay, (1 + k) / (10 +
    k))`` with warm-up, else ``decay``."""
    if not warmup:
        return torch.full_like(k, 1.0 - decay, dtype=torch.float64)
    kf = k.to(torch.float64)
    return 1.0 - ((1 + kf) / (10 + kf)).clamp(max=decay)


def resolve_mode(trainer) -> tuple[str, Optional[str]]:
    """(the mode that will run, a warning or None) for ``trainer.config``."""
    cfg = trainer.config
    mode = cfg.step_mode
    if mode == "eager":
        return mode, None
    if cfg.precision == "fp16":
        return "eager", (f"step_mode={mode!r} with precision='fp16': the GradScaler skips steps on the host, "
                         f"so the eager step runs (use 'bf16' for a compiled or graphed step)")
    if getattr(trainer, "_labels", None) is not None or type(trainer.diffusion).__name__ != "GaussianDiffusion":
        return "eager", (f"step_mode={mode!r} with a conditional or latent diffusion: the compiled / graphed "
                         f"step takes neither labels nor an encoder yet, so the eager step runs")
    if trainer.world_size > 1:
        return "eager", (f"step_mode={mode!r} under DDP: the step cannot be one graph (DDP's all-reduce hooks "
                         f"split it); running the eager step with the forward under torch.compile")
    if mode == "graph" and trainer.device.type != "cuda":
        return "compile", f"step_mode='graph' needs a CUDA device (this run is on {trainer.device}): using 'compile'"
    return mode, None


class StepRunner:
    """The compiled or CUDA-graphed training step of a :class:`Trainer`
    (see the module docstring). ``runner(x0)`` takes one step on the batch
    ``x0`` (on the device, or pinned host memory) and updates the trainer's
    host-side counters; it never waits on the device."""

    def __init__(self, trainer, mode: str):
        if mode not in ("compile", "graph"):
            raise ValueError(f"mode must be 'compile' or 'graph', got {mode!r}")
        self.tr, self.mode = trainer, mode
        cfg, dev = trainer.config, trainer.device
        self.device = dev
        self.params = list(trainer.params)
        self.fused = dev.type == "cuda" and mode == "graph"
        # the optimizer: lr as a device tensor, capturable; its state made now (on the params' device)
        opt = trainer.optimizer
        self.lr_t = torch.zeros((), dtype=torch.float32, device=dev)
        for g in opt.param_groups:
            g["lr"] = self.lr_t
            g["capturable"] = True
            g["foreach"], g["fused"] = (None, True) if self.fused else (True, None)
        opt.defaults.update(capturable=True)
        for p in self.params:
            st = opt.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        g0 = opt.param_groups[0]
        self._adam_kw = dict(amsgrad=False, beta1=g0["betas"][0], beta2=g0["betas"][1], weight_decay=g0["weight_decay"],
                             eps=g0["eps"], maximize=False)
        self._state = [opt.state[p] for p in self.params]
        for p in self.params:  # grads live for the whole run (zeroed in place): fixed addresses
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
        # device counters and accumulators (static: a CUDA graph holds their addresses)
        z = dict(device=dev)
        self.k = torch.zeros((), dtype=torch.int64, **z)       # steps taken (= 0-based index of the next)
        self.ema_k = torch.zeros((), dtype=torch.int64, **z)   # EMA updates done
        self.loss_sum = torch.zeros((), **z)
        self.gn_sum = torch.zeros((), **z)
        self.bad = torch.zeros((), dtype=torch.int64, **z)
        self.no_bad = torch.zeros((), dtype=torch.int64, **z)
        self._bound = None
        self._warm = 0
        self._graph = None
        self._static_x: Optional[Tensor] = None
        self._compiled = None
        self._backend = "inductor" if cfg.compile in (True, False) else cfg.compile
        diff = trainer.diffusion
        self._T = int(diff.num_timesteps)
        self._host_lr = trainer._lr_lambda()

    # ------------------------------------------------------------ the step --
    def _autocast(self):
        p = self.tr.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        # no weight-cast cache: a captured graph must recompute the casts of the updated weights
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16,
                              cache_enabled=False)

    def _draw(self, n: int) -> tuple[Tensor, Tensor]:
        """t and the noise key, drawn as ``GaussianDiffusion.forward`` draws them."""
        g = self.tr.generator
        t = torch.randint(0, self._T, (n,), generator=g, device=g.device).to(self.device)
        key = _ops.draw_key(g, self.device).to(self.device)
        return t, key

    def _core(self, x0: Tensor, t: Tensor, key: Tensor) -> None:
        """Everything after the draws; no host synchronisation (compiled with fullgraph=True)."""
        cfg = self.tr.config
        params = self.params
        with self._autocast():
            loss = self.tr.diffusion(x0, t=t, key=key, check_finite=False)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in params]
            if cfg.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
            else:
                gn = torch.nn.utils.get_total_norm(grads, foreach=True)
            self.lr_t.copy_(cfg.lr * lr_factor(self.k, cfg.warmup_steps, cfg.steps, cfg.lr_schedule == "cosine"))
            st = self._state
            _adam(params, grads, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [],
                  [s["step"] for s in st], foreach=not self.fused, fused=self.fused, capturable=True,
                  differentiable=False, grad_scale=None, found_inf=None, has_complex=False,
                  decoupled_weight_decay=True, lr=self.lr_t, **self._adam_kw)
            torch._foreach_zero_(grads)
            ema = self.tr.ema
            ema.update_with(ema_weight(self.ema_k, ema.decay, True) if ema.warmup else 1.0 - ema.decay)
            self.k.add_(1)
            self.ema_k.add_(1)
            lf = loss.detach().float()
            self.bad.copy_(torch.minimum(self.bad, torch.where(torch.isfinite(lf), self.no_bad, self.k)))
            self.loss_sum.add_(lf)
            self.gn_sum.add_(gn.detach().float())

    def _full(self, x0: Tensor) -> None:
        t, key = self._draw(x0.shape[0])
        self._core(x0, t, key)

    # ----------------------------------------------------- trainer binding --
    def _bind(self) -> None:
        """Adopt the trainer's accumulators (made by each ``train()`` call):
        copy their values into the static tensors and point the trainer at
        these; set the device counters from the host's."""
        tr = self.tr
        if self._bound is tr._loss_sum:
            return
        self.loss_sum.copy_(tr._loss_sum)
        self.gn_sum.copy_(tr._gn_sum)
        self.bad.copy_(tr._bad)
        self.no_bad.copy_(tr._no_bad)
        tr._loss_sum, tr._gn_sum, tr._bad, tr._no_bad = self.loss_sum, self.gn_sum, self.bad, self.no_bad
        self.k.fill_(tr.step)
        self.ema_k.fill_(tr.ema.updates)
        self._bound = tr._loss_sum

    def __call__(self, x0: Tensor) -> None:
        tr = self.tr
        self._bind()
        tr._last_lr = tr.config.lr * self._host_lr(tr.step)
        if self.mode == "compile":
            self._compiled_step(x0)
        else:
            self._graph_step(x0)
        tr.ema.updates += 1
        tr._count += 1

    def _compiled_step(self, x0: Tensor) -> None:
        import torch._dynamo

        if self._compiled is None:
            self._compiled = torch.compile(self._core, backend=self._backend, fullgraph=True)
        t, key = self._draw(x0.shape[0])
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            self._compiled(x0, t, key)

    def _graph_step(self, x0: Tensor) -> None:
        if self._static_x is None:
            self._static_x = torch.empty_like(x0, device=self.device)
        if x0.shape != self._static_x.shape or x0.stride() != self._static_x.stride():
            raise ValueError(f"step_mode='graph' needs batches of one shape and layout: got {tuple(x0.shape)} "
                             f"after {tuple(self._static_x.shape)}")
        if x0.device.type == "cpu" and not x0.is_pinned():
            x0 = x0.pin_memory()
        self._static_x.copy_(x0, non_blocking=True)
        if self._graph is False:  # capture failed once: the same step, uncaptured
            self._full(self._static_x)
            return
        if self._graph is not None:
            self._graph.replay()
            return
        cur = torch.cuda.current_stream(self.device)
        if self._warm < GRAPH_WARMUP:
            # warm-up (real steps) on a side stream, as capture requires: lazy initialisation,
            # autotuning and the allocator's first blocks happen here, not in the capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                self._full(self._static_x)
            cur.wait_stream(side)
            self._warm += 1
            return
        g = torch.cuda.CUDAGraph()
        try:
            g.register_generator_state(self.tr.generator)
            with torch.cuda.graph(g):
                self._full(self._static_x)
        except Exception as e:  # nothing ran inside the capture: run this step (and the rest) uncaptured
            warnings.warn(f"CUDA-graph capture of the training step failed ({type(e).__name__}: "
                          f"{str(e).strip()[:300]}); the step runs uncaptured (same maths, host-bound)", stacklevel=3)
            self._graph = False
            torch.cuda.synchronize(self.device)
            self._full(self._static_x)
            return
        self._graph = g
        g.replay()  # the capture recorded the step without running it

    # ---------------------------------------------------------- checkpoints --
    def optimizer_state(self) -> dict:
        """The optimizer's state dict as the eager step leaves it (lr a float,
        not capturable), so the checkpoint resumes in any mode. Reads the
        step counters (one synchronisation; checkpoints only)."""
        tr = self.tr
        sd = tr.optimizer.state_dict()
        lr = tr.config.lr * self._host_lr(tr.step)
        eager_fused = self.device.type == "cuda"
        groups = []
        for g in sd["param_groups"]:
            g = dict(g, lr=lr, capturable=False)
            g["foreach"], g["fused"] = (None, True) if eager_fused else (True, None)
            groups.append(g)
        state = {i: {k: (v.detach().to("cpu" if not eager_fused else v.device).clone() if k == "step" else v)
                     for k, v in s.items()} for i, s in sd["state"].items()}
        return {"state": state, "param_groups": groups}

    def scheduler_state(self) -> dict:
        """The LambdaLR state an eager run would have after ``trainer.step`` steps."""
        tr = self.tr
        sd = tr.scheduler.state_dict()
        sd.update(last_epoch=tr.step, _step_count=tr.step + 1, _last_lr=[tr.config.lr * self._host_lr(tr.step)])
        return sd


def make_runner(trainer) -> Optional[StepRunner]:
    """The :class:`StepRunner` for ``trainer.config.step_mode``, or None for
    the eager step (after warning once when a requested mode falls back;
    under DDP the forward is compiled instead)."""
    mode, why = resolve_mode(trainer)
    if why:
        warnings.warn(why, stacklevel=3)
    if mode == "eager":
        if why and trainer.world_size > 1 and trainer._forward is trainer._wrapped:
            cfg = trainer.config
            trainer._forward = torch.compile(trainer._wrapped,
                                             backend="inductor" if cfg.compile in (True, False) else cfg.compile)
        return None
    return StepRunner(trainer, mode)
