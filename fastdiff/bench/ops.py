"""The elementwise suite of ``fastdiff bench``: the fused step operators
(q_sample with and without the in-kernel noise draw, the fused loss, the
DDPM and DDIM steps, the guided DDPM step) against eager PyTorch, diffusers and ``torch.compile``.
The method is described in :mod:`fastdiff.bench`; :func:`run_ops` returns
the rows."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.ops import _backend

from ._report import OPS, impl_label
from ._timing import (DTYPE_NAMES, T_TRAIN, Case, Compiler, Skip, cache_bytes, copy_bandwidth, free, num_sets,
                      parse_dtype, parse_shape, resolve_device, shape_str, time_cases)


DEFAULT_SHAPES = {
    "cpu": [(128, 3, 64, 64)],
    # 6 MB, 64 MB and 128 MB per fp32 tensor
    "cuda": [(128, 3, 64, 64), (256, 4, 128, 128), (128, 4, 256, 256)],
}
QUICK_SHAPES = {"cpu": [(8, 3, 32, 32)], "cuda": [(128, 3, 64, 64)]}

STEP_T = 500            # timestep of the reverse-step cases
DDIM_STEPS = 50         # DDIM chain length: t_prev = STEP_T - T_TRAIN // DDIM_STEPS

# Wall-clock budget for torch.compile (all compilations of one run together)
COMPILE_BUDGET_S = {"cpu": 120.0, "cuda": 150.0}


@dataclass
class _Ctx:
    device: str
    dtype: torch.dtype
    shape: tuple
    nsets: int
    fastdiff_impls: list           # [(impl name, GPU backend or None)]
    compile_fn: Callable           # compile_fn(key, f) -> compiled f, or raises Skip
    diffusers: Optional[object]    # the diffusers module, or None
    diffusers_note: str = ""
    sched: fastdiff.NoiseSchedule = None
    tables: dict = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def randn(self, gen: torch.Generator) -> list:
        return [torch.randn(self.shape, generator=gen, device=self.device, dtype=torch.float32).to(self.dtype)
                for _ in range(self.nsets)]


def _tables(sched: fastdiff.NoiseSchedule, dtype: torch.dtype, device: str) -> dict:
    """The per-timestep coefficient tables of the textbook eager code, in the
    data dtype (as a user would precompute them)."""
    ab = sched.alphas_cumprod.to(device=device, dtype=torch.float64)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    c_x0 = ab_prev.sqrt() * beta / (1 - ab)
    c_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    var = (beta * (1 - ab_prev) / (1 - ab)).clamp(min=1e-20)
    sigma = var.sqrt()
    sigma[0] = 0.0  # no noise at the last step
    tab = {"sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt(), "c_x0": c_x0, "c_xt": c_xt, "sigma": sigma}
    return {k: v.to(dtype) for k, v in tab.items()}


# The textbook eager implementations (also what torch.compile gets).
def eager_q_sample_rng(x0, t, sqrt_ab, sqrt_1m_ab):
    noise = torch.randn_like(x0)
    shp = (-1,) + (1,) * (x0.dim() - 1)
    return sqrt_ab[t].view(shp) * x0 + sqrt_1m_ab[t].view(shp) * noise, noise


def eager_q_sample(x0, noise, t, sqrt_ab, sqrt_1m_ab):
    shp = (-1,) + (1,) * (x0.dim() - 1)
    return sqrt_ab[t].view(shp) * x0 + sqrt_1m_ab[t].view(shp) * noise


def eager_mse(model_output, noise):
    return F.mse_loss(model_output, noise)


def eager_ddpm_step(eps, x, t, sqrt_ab, sqrt_1m_ab, c_x0, c_xt, sigma):
    shp = (-1,) + (1,) * (x.dim() - 1)
    x0 = (x - sqrt_1m_ab[t].view(shp) * eps) / sqrt_ab[t].view(shp)
    mean = c_x0[t].view(shp) * x0 + c_xt[t].view(shp) * x
    noise = torch.randn_like(x)
    return mean + sigma[t].view(shp) * noise, x0


def eager_ddim_step(eps, x, t, t_prev, sqrt_ab, sqrt_1m_ab):
    shp = (-1,) + (1,) * (x.dim() - 1)
    x0 = (x - sqrt_1m_ab[t].view(shp) * eps) / sqrt_ab[t].view(shp)
    return sqrt_ab[t_prev].view(shp) * x0 + sqrt_1m_ab[t_prev].view(shp) * eps, x0


def _compile_case(ctx: _Ctx, op: str, eager_fn: Callable, nbytes: int, call: Callable) -> Case:
    """The torch.compile row of ``op``: ``call(compiled eager_fn, i)``, or a
    skipped row with the reason (compilation off, failed or over budget)."""
    try:
        cf = ctx.compile_fn(op, eager_fn)
    except Skip as e:
        return Case(op, "compile", None, nbytes, note=str(e))
    return Case(op, "compile", lambda i: call(cf, i), nbytes)


def _grad_of(o: torch.Tensor, loss: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Forward + backward of ``loss()`` with respect to ``o`` (grad cleared first)."""
    o.grad = None
    loss().backward()
    return o.grad


def _cases_q_sample_rng(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    x0s = ctx.randn(gen)
    n = ctx.shape[0]
    ts = [torch.randint(0, T_TRAIN, (n,), generator=gen, device=dev) for _ in range(ctx.nsets)]
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        for rn in (False, True):
            def f(i, rn=rn):
                k = fastdiff.draw_key(device=dev)
                return fastdiff.q_sample(x0s[i], ts[i], s, key=k, return_noise=rn)
            cases.append(Case("q_sample_rng", impl, f, (3 if rn else 2) * B,
                              "noise out" if rn else "no noise out", backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False)

        def fd(i):
            noise = torch.randn(x0s[i].shape, device=dev, dtype=x0s[i].dtype)
            return sch.add_noise(x0s[i], noise, ts[i]), noise
        cases.append(Case("q_sample_rng", "diffusers", fd, 3 * B))
    else:
        cases.append(Case("q_sample_rng", "diffusers", None, 3 * B, note=ctx.diffusers_note))
    a, b = tab["sqrt_ab"], tab["sqrt_1m_ab"]
    cases.append(Case("q_sample_rng", "eager", lambda i: eager_q_sample_rng(x0s[i], ts[i], a, b), 3 * B))
    cases.append(_compile_case(ctx, "q_sample_rng", eager_q_sample_rng, 3 * B, lambda cf, i: cf(x0s[i], ts[i], a, b)))
    return cases


def _cases_q_sample(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    x0s, noises = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    ts = [torch.randint(0, T_TRAIN, (n,), generator=gen, device=dev) for _ in range(ctx.nsets)]
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        cases.append(Case("q_sample", impl, lambda i: fastdiff.q_sample(x0s[i], ts[i], s, noises[i]), 3 * B,
                          backend=backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False)
        cases.append(Case("q_sample", "diffusers", lambda i: sch.add_noise(x0s[i], noises[i], ts[i]), 3 * B))
    else:
        cases.append(Case("q_sample", "diffusers", None, 3 * B, note=ctx.diffusers_note))
    a, b = tab["sqrt_ab"], tab["sqrt_1m_ab"]
    cases.append(Case("q_sample", "eager", lambda i: eager_q_sample(x0s[i], noises[i], ts[i], a, b), 3 * B))
    cases.append(_compile_case(ctx, "q_sample", eager_q_sample, 3 * B,
                               lambda cf, i: cf(x0s[i], noises[i], ts[i], a, b)))
    return cases


def _cases_diffusion_loss(ctx: _Ctx, gen) -> list:
    """Forward + backward of the epsilon-target loss. fastdiff regenerates the
    noise from the key q_sample used (reads model_output and x0, writes the
    gradient); the baselines read model_output and the stored noise."""
    dev, B = ctx.device, ctx.tensor_bytes
    outs = [o.requires_grad_() for o in ctx.randn(gen)]
    x0s, noises = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    ts = [torch.randint(0, T_TRAIN, (n,), generator=gen, device=dev) for _ in range(ctx.nsets)]
    keys = [fastdiff.draw_key(gen) for _ in range(ctx.nsets)]
    s = ctx.sched
    cases = []
    def fd_key(i):
        return _grad_of(outs[i], lambda: fastdiff.diffusion_loss(outs[i], x0s[i], ts[i], s, key=keys[i]))

    def fd_noise(i):
        return _grad_of(outs[i], lambda: fastdiff.diffusion_loss(outs[i], x0s[i], ts[i], s, noises[i]))
    def fd_key_recompute(i):  # the gradient not stored: the backward regenerates the noise (GPU default)
        return _grad_of(outs[i], lambda: fastdiff.diffusion_loss(outs[i], x0s[i], ts[i], s, key=keys[i],
                                                                 store_grad=False))
    for impl, backend in ctx.fastdiff_impls:
        cases.append(Case("diffusion_loss", impl, fd_key, 3 * B, "key", backend))
        cases.append(Case("diffusion_loss", impl, fd_key_recompute, 3 * B, "key, recompute", backend))
        cases.append(Case("diffusion_loss", impl, fd_noise, 4 * B, "noise", backend))
    cases.append(Case("diffusion_loss", "diffusers", None, 3 * B,
                      note="diffusers has no loss function (its training scripts use F.mse_loss = eager)"))
    cases.append(Case("diffusion_loss", "eager", lambda i: _grad_of(outs[i], lambda: eager_mse(outs[i], noises[i])),
                      3 * B))
    cases.append(_compile_case(ctx, "diffusion_loss", eager_mse, 3 * B,
                               lambda cf, i: _grad_of(outs[i], lambda: cf(outs[i], noises[i]))))
    return cases


def _cases_train_chain(ctx: _Ctx, gen) -> list:
    """The training-side elementwise chain of one step, the model left out: draw the noise, make x_t, and
    the epsilon MSE forward + backward against a model output. fastdiff: ``q_sample(key, return_noise=False)``
    + the key-driven ``diffusion_loss`` (the noise is never stored: the loss regenerates it); diffusers:
    ``torch.randn`` + ``DDPMScheduler.add_noise`` + ``F.mse_loss``; eager: randn + the textbook formula +
    ``F.mse_loss``. Bytes: what the fused chain must move (read x0, write x_t, read the model output, write
    its gradient)."""
    dev, B = ctx.device, ctx.tensor_bytes
    outs = [o.requires_grad_() for o in ctx.randn(gen)]
    x0s = ctx.randn(gen)
    n = ctx.shape[0]
    ts = [torch.randint(0, T_TRAIN, (n,), generator=gen, device=dev) for _ in range(ctx.nsets)]
    s, tab = ctx.sched, ctx.tables
    cases = []

    def fd(i):
        k = fastdiff.draw_key(device=dev)
        xt, _ = fastdiff.q_sample(x0s[i], ts[i], s, key=k, return_noise=False)
        return xt, _grad_of(outs[i], lambda: fastdiff.diffusion_loss(outs[i], x0s[i], ts[i], s, key=k))
    for impl, backend in ctx.fastdiff_impls:
        cases.append(Case("train_chain", impl, fd, 4 * B, backend=backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False)

        def df(i):
            noise = torch.randn(x0s[i].shape, device=dev, dtype=x0s[i].dtype)
            xt = sch.add_noise(x0s[i], noise, ts[i])
            return xt, _grad_of(outs[i], lambda: F.mse_loss(outs[i], noise))
        cases.append(Case("train_chain", "diffusers", df, 4 * B))
    else:
        cases.append(Case("train_chain", "diffusers", None, 4 * B, note=ctx.diffusers_note))
    a, b = tab["sqrt_ab"], tab["sqrt_1m_ab"]

    def ef(i):
        xt, noise = eager_q_sample_rng(x0s[i], ts[i], a, b)
        return xt, _grad_of(outs[i], lambda: eager_mse(outs[i], noise))
    cases.append(Case("train_chain", "eager", ef, 4 * B))
    return cases


def _cases_ddpm_step(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    eps, xs = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    tt = torch.full((n,), STEP_T, dtype=torch.int64, device=dev)
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        def f(i):
            k = fastdiff.draw_key(device=dev)
            return fastdiff.ddpm_step(eps[i], tt, xs[i], s, key=k)
        cases.append(Case("ddpm_step", impl, f, 4 * B, backend=backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False,
                                          variance_type="fixed_small")
        g = torch.Generator(device=dev).manual_seed(0)
        cases.append(Case("ddpm_step", "diffusers",
                          lambda i: sch.step(eps[i], STEP_T, xs[i], generator=g, return_dict=False), 4 * B))
    else:
        cases.append(Case("ddpm_step", "diffusers", None, 4 * B, note=ctx.diffusers_note))
    args = (tab["sqrt_ab"], tab["sqrt_1m_ab"], tab["c_x0"], tab["c_xt"], tab["sigma"])
    cases.append(Case("ddpm_step", "eager", lambda i: eager_ddpm_step(eps[i], xs[i], tt, *args), 4 * B))
    cases.append(_compile_case(ctx, "ddpm_step", eager_ddpm_step, 4 * B, lambda cf, i: cf(eps[i], xs[i], tt, *args)))
    return cases


def _cases_ddim_step(ctx: _Ctx, gen) -> list:
    dev, B = ctx.device, ctx.tensor_bytes
    eps, xs = ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    prev_t = STEP_T - T_TRAIN // DDIM_STEPS
    tt = torch.full((n,), STEP_T, dtype=torch.int64, device=dev)
    tp = torch.full((n,), prev_t, dtype=torch.int64, device=dev)
    s, tab = ctx.sched, ctx.tables
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        cases.append(Case("ddim_step", impl,
                          lambda i: fastdiff.ddim_step(eps[i], tt, xs[i], s, t_prev=tp, eta=0.0),
                          4 * B, backend=backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDIMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False,
                                          set_alpha_to_one=True)
        sch.set_timesteps(DDIM_STEPS)
        cases.append(Case("ddim_step", "diffusers",
                          lambda i: sch.step(eps[i], STEP_T, xs[i], eta=0.0, return_dict=False), 4 * B))
    else:
        cases.append(Case("ddim_step", "diffusers", None, 4 * B, note=ctx.diffusers_note))
    a, b = tab["sqrt_ab"], tab["sqrt_1m_ab"]
    cases.append(Case("ddim_step", "eager", lambda i: eager_ddim_step(eps[i], xs[i], tt, tp, a, b), 4 * B))
    cases.append(_compile_case(ctx, "ddim_step", eager_ddim_step, 4 * B,
                               lambda cf, i: cf(eps[i], xs[i], tt, tp, a, b)))
    return cases


GUIDANCE_SCALE = 7.5


def eager_guided_ddpm_step(cond, uncond, x, t, w, sqrt_ab, sqrt_1m_ab, c_x0, c_xt, sigma):
    """Classifier-free guidance as pipelines write it (a separate combine), then the textbook step."""
    return eager_ddpm_step(uncond + w * (cond - uncond), x, t, sqrt_ab, sqrt_1m_ab, c_x0, c_xt, sigma)


def _cases_guided_step(ctx: _Ctx, gen) -> list:
    """Minimum traffic of a guided step: read both predictions and x, write prev and x0 (5 tensors);
    the unguided fused step moves 4."""
    dev, B = ctx.device, ctx.tensor_bytes
    conds, unconds, xs = ctx.randn(gen), ctx.randn(gen), ctx.randn(gen)
    n = ctx.shape[0]
    tt = torch.full((n,), STEP_T, dtype=torch.int64, device=dev)
    s, tab, w = ctx.sched, ctx.tables, GUIDANCE_SCALE
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        def guided(i):
            k = fastdiff.draw_key(device=dev)
            return fastdiff.ddpm_step(conds[i], tt, xs[i], s, key=k, uncond_output=unconds[i], guidance_scale=w)

        def rescaled(i):
            k = fastdiff.draw_key(device=dev)
            return fastdiff.ddpm_step(conds[i], tt, xs[i], s, key=k, uncond_output=unconds[i], guidance_scale=w,
                                      guidance_rescale=0.7)

        def unguided(i):
            k = fastdiff.draw_key(device=dev)
            return fastdiff.ddpm_step(conds[i], tt, xs[i], s, key=k)
        cases.append(Case("guided_step", impl, guided, 5 * B, backend=backend))
        cases.append(Case("guided_step", impl, rescaled, 5 * B, "rescale 0.7 (+ std pre-pass)", backend))
        cases.append(Case("guided_step", impl, unguided, 4 * B, "unguided", backend))
    if ctx.diffusers is not None:
        sch = ctx.diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear", clip_sample=False,
                                          variance_type="fixed_small")
        g = torch.Generator(device=dev).manual_seed(0)

        def fd(i):
            eps = unconds[i] + w * (conds[i] - unconds[i])
            return sch.step(eps, STEP_T, xs[i], generator=g, return_dict=False)
        cases.append(Case("guided_step", "diffusers", fd, 5 * B))
    else:
        cases.append(Case("guided_step", "diffusers", None, 5 * B, note=ctx.diffusers_note))
    args = (tab["sqrt_ab"], tab["sqrt_1m_ab"], tab["c_x0"], tab["c_xt"], tab["sigma"])
    cases.append(Case("guided_step", "eager",
                      lambda i: eager_guided_ddpm_step(conds[i], unconds[i], xs[i], tt, w, *args), 5 * B))
    cases.append(_compile_case(ctx, "guided_step", eager_guided_ddpm_step, 5 * B,
                               lambda cf, i: cf(conds[i], unconds[i], xs[i], tt, w, *args)))
    return cases


def _dpmpp_2m_scalars(sched: fastdiff.NoiseSchedule, t_prev_prev: int, t_cur: int, t_next: int) -> dict:
    """alpha/sigma/h/r0 of one DPM-Solver++(2M) step t_cur -> t_next after t_prev_prev (float64 host maths)."""
    ab = sched.alphas_cumprod.double().cpu()
    al = {t: math.sqrt(float(ab[t])) for t in (t_prev_prev, t_cur, t_next)}
    sg = {t: math.sqrt(1 - float(ab[t])) for t in (t_prev_prev, t_cur, t_next)}
    lam = {t: math.log(al[t] / sg[t]) for t in al}
    h, h0 = lam[t_next] - lam[t_cur], lam[t_cur] - lam[t_prev_prev]
    return dict(alpha_s=al[t_cur], sigma_s=sg[t_cur], alpha_t=al[t_next], sigma_t=sg[t_next], h=h, r0=h0 / h)


def eager_dpmpp_2m(eps, x, prev_x0, alpha_s, sigma_s, alpha_t, sigma_t, h, r0):
    """DPM-Solver++(2M), midpoint, epsilon model: the update diffusers' DPMSolverMultistepScheduler makes,
    written with Python-float coefficients."""
    x0 = (x - sigma_s * eps) / alpha_s
    d1 = (1.0 / r0) * (x0 - prev_x0)
    e = math.expm1(-h)
    return (sigma_t / sigma_s) * x - (alpha_t * e) * x0 - 0.5 * (alpha_t * e) * d1, x0


def _cases_multistep_step(ctx: _Ctx, gen) -> list:
    """Minimum traffic of a 2M step: read x, eps and the previous x0, write prev and the new x0 (5 tensors)."""
    dev, B = ctx.device, ctx.tensor_bytes
    eps, xs = ctx.randn(gen), ctx.randn(gen)
    stride = T_TRAIN // 20
    c = _dpmpp_2m_scalars(ctx.sched, STEP_T + stride, STEP_T, STEP_T - stride)
    e = math.expm1(-c["h"])
    A = c["alpha_t"] * e
    row = torch.zeros(fastdiff.ops.multistep.MULTISTEP_NCOEF, dtype=torch.float64)
    row[0], row[1] = 1 / c["alpha_s"], -c["sigma_s"] / c["alpha_s"]        # x0 = (x - sigma_s eps) / alpha_s
    row[8], row[10], row[11] = c["sigma_t"] / c["sigma_s"], -A - 0.5 * A / c["r0"], 0.5 * A / c["r0"]
    row[15] = 1.0                                                          # push x0 into the history
    coeffs = row.repeat(2, 1).to(dev)
    hist = torch.randn((1,) + ctx.shape, generator=gen, device=dev, dtype=torch.float32).to(ctx.dtype)
    empty = torch.empty(0, device=dev, dtype=ctx.dtype)
    si = torch.ones((), dtype=torch.int64, device=dev)
    cases = []
    for impl, backend in ctx.fastdiff_impls:
        def f(i):
            si.fill_(1)  # replay row 1 (the op advances step_index)
            return fastdiff.multistep_step(eps[i], xs[i], hist, empty, coeffs, si)
        cases.append(Case("multistep_step", impl, f, 5 * B, backend=backend))
    prev_x0 = hist[0]
    cases.append(Case("multistep_step", "eager", lambda i: eager_dpmpp_2m(eps[i], xs[i], prev_x0, **c), 5 * B))
    cases.append(_compile_case(ctx, "multistep_step", eager_dpmpp_2m, 5 * B,
                               lambda cf, i: cf(eps[i], xs[i], prev_x0, **c)))
    return cases


SAMPLER_STEPS = 10
# variant: (fused class in fastdiff.diffusion, diffusers class, config, full tensors one step moves)
SAMPLERS = {
    "dpmsolver++2m": ("FusedDPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {"solver_order": 2}, 5),
    "unipc-bh2": ("FusedUniPCMultistepScheduler", "UniPCMultistepScheduler",
                  {"solver_order": 2, "solver_type": "bh2"}, 7),
    "euler": ("FusedEulerDiscreteScheduler", "EulerDiscreteScheduler", {}, 3),
}


def sampler_loop(sched, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The scheduler's share of a sampling loop, as a pipeline runs it, with
    the model replaced by a fixed output."""
    sched.set_timesteps(SAMPLER_STEPS, device=x.device)
    for t in sched.timesteps:
        sched.scale_model_input(x, t)  # the model's input (a pass in Euler's loop; identity for the others)
        x = sched.step(eps, t, x, return_dict=False)[0]
    return x


def _cases_sampler_loop(ctx: _Ctx, gen) -> list:
    """Both sides run the same loop; bytes are the fused step's minimum
    traffic (the history read and written counted once) times the steps."""
    from fastdiff import diffusion

    B = ctx.tensor_bytes
    eps, xs = ctx.randn(gen), ctx.randn(gen)
    cases = []
    for variant, (ours, theirs, cfg, passes) in SAMPLERS.items():
        cfg = dict(num_train_timesteps=T_TRAIN, beta_schedule="linear", **cfg)
        nbytes = SAMPLER_STEPS * passes * B
        for impl, backend in ctx.fastdiff_impls:
            s = getattr(diffusion, ours)(**cfg)
            cases.append(Case("sampler_loop", impl, lambda i, s=s: sampler_loop(s, eps[i], xs[i]), nbytes,
                              variant=variant, backend=backend))
        if ctx.diffusers is not None:
            s = getattr(ctx.diffusers, theirs)(**cfg)
            cases.append(Case("sampler_loop", "diffusers", lambda i, s=s: sampler_loop(s, eps[i], xs[i]), nbytes,
                              variant=variant))
        else:
            cases.append(Case("sampler_loop", "diffusers", None, nbytes, variant=variant, note=ctx.diffusers_note))
    return cases


_BUILDERS = {
    "q_sample_rng": _cases_q_sample_rng,
    "q_sample": _cases_q_sample,
    "diffusion_loss": _cases_diffusion_loss,
    "train_chain": _cases_train_chain,
    "ddpm_step": _cases_ddpm_step,
    "ddim_step": _cases_ddim_step,
    "guided_step": _cases_guided_step,
    "multistep_step": _cases_multistep_step,
    "sampler_loop": _cases_sampler_loop,
}
# full-size tensors each input set holds (for the rotation count)
_INPUTS_PER_SET = {"q_sample_rng": 1, "q_sample": 2, "diffusion_loss": 3, "ddpm_step": 2, "ddim_step": 2,
                   "guided_step": 3, "multistep_step": 2, "sampler_loop": 2, "train_chain": 2}


def fastdiff_impls(device: str) -> list:
    """[(impl name, backend)]: on CPU the one CPU kernel; on a GPU every
    compiled backend available (CUDA C++, Triton), each timed separately."""
    if device == "cpu":
        return [("fastdiff", None)]
    avail = [b for b in _backend.available_backends("cuda") if b != "reference"] or ["reference"]
    return [(f"fastdiff-{b}", b) for b in avail]


def _import_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers import DDIMScheduler, DDPMScheduler  # noqa: F401
        return diffusers, ""
    except Exception as e:
        return None, f"diffusers not importable ({type(e).__name__}: {e})"


def _row(case: Case, ctx: _Ctx, copy_gbps: float, st: Optional[dict]) -> dict:
    r = {"op": case.op, "impl": case.impl, "variant": case.variant, "backend": case.backend,
         "shape": shape_str(ctx.shape), "dtype": DTYPE_NAMES.get(ctx.dtype, str(ctx.dtype)),
         "device": ctx.device, "bytes": case.nbytes, "input_sets": ctx.nsets,
         "pred_ms": case.nbytes / (copy_gbps * 1e9) * 1e3 if copy_gbps else None,
         "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0, "gbps": None, "pct_copy_bw": None,
         "first_call_s": None, "note": case.note}
    if case.impl == "fastdiff" and ctx.device == "cpu":
        r["backend"] = _backend.current_backend(_KERNEL_OF.get(case.op, case.op), "cpu")
    if st is not None:
        r.update(st)
        r["gbps"] = case.nbytes / (st["median_ms"] * 1e-3) / 1e9
        r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps if copy_gbps else None
    return r


_KERNEL_OF = {"q_sample_rng": "q_sample_rng", "q_sample": "q_sample", "diffusion_loss": "diffusion_loss",
              "ddpm_step": "ddpm_step", "ddim_step": "ddim_step", "guided_step": "ddpm_step",
              "multistep_step": "multistep_step", "sampler_loop": "multistep_step",
              "train_chain": "diffusion_loss"}  # the kernel each row times


def run_ops(device: str = "cpu", ops: Optional[Sequence[str]] = None, dtype="fp32", shapes=None,
            quick: bool = False, compile: Optional[bool] = None, log: Optional[Callable[[str], None]] = None,
            copy_gbps: Optional[float] = None, compile_budget_s: Optional[float] = None) -> list:
    """Rows of the elementwise ops ``ops`` (default: all of :data:`OPS`; block
    op names are ignored: :mod:`fastdiff.bench.blocks` times them). They run
    at each of ``shapes`` (default: :data:`DEFAULT_SHAPES`, or
    :data:`QUICK_SHAPES` with ``quick``). dtype(s): "fp32"/"fp16"/"bf16",
    one or a list. ``compile`` (default: on unless ``quick``) adds the
    torch.compile baseline; ``compile_budget_s`` caps its compilation time
    (default: :data:`COMPILE_BUDGET_S`). Speedups are added by
    :func:`fastdiff.bench.run` (:func:`add_speedups`)."""
    device = resolve_device(device)
    log = log or (lambda msg: None)
    ops = [o for o in (ops or OPS) if o in OPS]
    dtypes = [parse_dtype(d) for d in ([dtype] if isinstance(dtype, (str, torch.dtype)) else dtype)]
    if shapes is None:
        shapes = (QUICK_SHAPES if quick else DEFAULT_SHAPES)[device]
    shapes = [parse_shape(s) if isinstance(s, str) else tuple(s) for s in shapes]
    if compile is None:
        compile = not quick
    why_off = "skipped: --no-compile" if not quick else "skipped in --quick (use --compile to time it)"
    compiler = Compiler(bool(compile), why_off, COMPILE_BUDGET_S[device] if compile_budget_s is None
                        else compile_budget_s)
    diff_mod, diff_note = _import_diffusers() if ops else (None, "")
    if copy_gbps is None and ops:
        log(f"measuring the {device} copy bandwidth ...")
        copy_gbps = copy_bandwidth(device, quick)
        log(f"copy bandwidth: {copy_gbps:.1f} GB/s")
    cache = cache_bytes(device)
    sched = fastdiff.NoiseSchedule.make("linear", T_TRAIN, device=device)
    rows = []
    for shape in shapes if ops else ():
        for dt in dtypes:
            elem = torch.empty((), dtype=dt).element_size()
            for op_name in ops:
                set_bytes = _INPUTS_PER_SET[op_name] * math.prod(shape) * elem
                ctx = _Ctx(device, dt, shape, num_sets(set_bytes, cache), fastdiff_impls(device), compiler,
                           diff_mod, diff_note, sched, _tables(sched, dt, device))
                gen = torch.Generator(device=device).manual_seed(1234)
                try:
                    cases = _BUILDERS[op_name](ctx, gen)
                except torch.OutOfMemoryError as e:
                    log(f"{op_name} {shape_str(shape)}: out of memory building inputs ({e})")
                    rows.append(_row(Case(op_name, "*", None, 0, note="out of memory"), ctx, copy_gbps, None))
                    free(device)
                    continue
                results = time_cases(cases, device, ctx.nsets, quick)
                for case, res in zip(cases, results):
                    label = f"{op_name:<15}{shape_str(shape):<16}{DTYPE_NAMES[dt]:<6}{impl_label(case)}"
                    st = None
                    if isinstance(res, BaseException):  # a failing case must not end the run
                        msg = f"{type(res).__name__}: {str(res).strip().splitlines()[0] if str(res).strip() else ''}"
                        if case.impl == "compile":
                            compiler.failed[op_name] = f"skipped: torch.compile failed ({msg[:160]})"
                            case.note = compiler.failed[op_name]
                        else:
                            case.note = f"failed: {msg[:200]}"
                        free(device)
                    elif res is not None:
                        st = res
                        if case.impl == "compile":
                            compiler.spent_s += st["first_call_s"]
                            case.note = f"first call (compile) {st['first_call_s']:.1f} s"
                    row = _row(case, ctx, copy_gbps, st)
                    row["copy_gbps"] = copy_gbps
                    rows.append(row)
                    log(f"  {label:<70}" + (f"{row['median_ms']:9.3f} ms" if st else f"  {case.note}"))
                del cases, ctx
                free(device)
    return rows
