"""End-to-end throughput of DDPM training and sampling: diffusers against
fastdiff, measured side by side in one run (``fastdiff bench train`` /
``fastdiff bench sample``; method and results in benchmarks/README.md).

    from fastdiff.bench import e2e as E
    rows = E.run("train", "cpu", quick=True)         # tiny models, seconds
    print(E.format_table(rows))

Configurations (``impl``), each built from the same U-Net configuration
(the fastdiff preset, and a diffusers ``UNet2DModel`` of the same shape, see
:func:`diffusers_unet_config`; DDPM CIFAR-10 = 35,746,307 parameters both):

* ``diffusers``: ``UNet2DModel`` + ``DDPMScheduler`` (training: ``add_noise``
  + ``F.mse_loss`` as diffusers' training example; sampling: the
  ``DDPMPipeline`` / ``DDIMPipeline`` call itself), eager;
* ``diffusers-compile``: the same with ``torch.compile(unet)``;
* ``diffusers-patched``: the same after ``fastdiff.nn.patch(unet)``;
* ``fastdiff``: ``fastdiff.nn.UNet`` preset + ``GaussianDiffusion`` (loss:
  ``diffusion(x0)``, sampling: ``diffusion.sample``), eager;
* ``fastdiff-compile``: the model under ``torch.compile`` (training:
  ``torch.compile(unet)`` inside the diffusion; sampling: ``compile_model=True``);
* ``fastdiff-graph`` (sampling, GPU only): ``sample(cuda_graph=True)``.

What one timed unit is:

* **train**: one training step = forward (the noise and timestep draws, the
  noising, the model, the MSE loss) + backward + ``AdamW.step`` +
  ``zero_grad(set_to_none=True)``; images/s = batch / step time. The
  **model-only step** (the same model, optimizer and autocast; forward on a
  pre-noised batch, ``out.backward(fixed gradient)``, AdamW) gives the
  breakdown: ``overhead_ms`` = step - model-only step = what the noise,
  timesteps, noising and loss (forward and backward) cost.
* **sample**: one whole sampling call producing ``n`` images as a host
  numpy array in [0, 1], NHWC: the pipelines' ``output_type="np"`` (initial
  noise, ``set_timesteps``, the loop, ``(x / 2 + 0.5).clamp(0, 1)``, the copy
  to the host); fastdiff's ``sample`` followed by the same post-processing.
  images/s = n / run time. **model_ms** = the median time of one model call
  alone (same batch, autocast and layout; the diffusers call takes a 0-dim
  CPU timestep as the pipeline passes it; ``fastdiff-graph``: a CUDA-graph
  replay of the model), and ``non_model_us_per_step`` = (run time - steps x
  model_ms) / steps: the scheduler step, the Python loop and the launches
  around the model.

Timing: GPU, one configuration after the other (built, timed, freed): the
training steps with CUDA events with the queue kept full
(:func:`fastdiff.bench._timing.time_calls`), the sampling runs with CUDA events and
a synchronisation after each run. CPU: ``time.perf_counter``, the
configurations of a case interleaved (training: ~20 ms rounds,
:func:`fastdiff.bench._timing.time_interleaved`; sampling: one run of each in turn)
so that a drifting machine hits them alike. Median, p20 and p80 of the
per-step / per-run times; images/s p20 is the batch over the p80 time.

Peak memory, per configuration (``peak_mem_bytes``) = its parameters +
optimizer state + inputs (``base_bytes``) + the peak allocated above the
start of one training step or one sampling run (``step_mem_bytes``): GPU
``torch.cuda.max_memory_allocated``, CPU the PyTorch CPU allocator's events
recorded by ``torch.profiler`` (memory that libraries such as oneDNN
allocate themselves is not seen); sampling: a 2-step run at the same batch,
every step having the same peak.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from fastdiff.bench import _report as report
from fastdiff.bench import _timing as timing

SUITES = ("train", "sample")
METHODS = ("ddpm", "ddim")
LAYOUTS = ("NCHW", "NHWC")
IMPLS = {
    "diffusers": "diffusers UNet2DModel + DDPMScheduler (sampling: DDPMPipeline / DDIMPipeline), eager",
    "diffusers-compile": "the same, torch.compile(unet)",
    "diffusers-patched": "the same after fastdiff.nn.patch(unet), eager",
    "fastdiff": "fastdiff.nn.UNet preset + GaussianDiffusion, eager",
    "fastdiff-compile": "the same, the model under torch.compile",
    "fastdiff-graph": "the same, sample(cuda_graph=True) (sampling, GPU only)",
    # training only: the whole loop of a training step as users run it (see TRAIN_LOOPS)
    "diffusers-loop": "train_unconditional's step: add_noise, UNet2DModel, F.mse_loss, clip, AdamW, lr schedule, "
                      "EMAModel(foreach=False)",
    "diffusers-loop-foreach": "the same with EMAModel(foreach=True)",
    "diffusers-loop-compile": "the same (EMA foreach) with torch.compile(unet)",
    "fastdiff-step": "fastdiff.train.Trainer's step, step_mode='eager' (fused q_sample/loss, clip, AdamW, EMA)",
    "fastdiff-step-compile": "the same, step_mode='compile' (the whole step under torch.compile(fullgraph=True))",
    "fastdiff-step-graph": "the same, step_mode='graph' (the whole step one CUDA graph; GPU only)",
}
TRAIN_LOOPS = ("diffusers-loop", "diffusers-loop-foreach", "diffusers-loop-compile", "fastdiff-step",
               "fastdiff-step-compile", "fastdiff-step-graph")
# dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; matched by substring, first hit wins
BF16_PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0),
                    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
                    ("V100", 125.0))
BASELINES = ("diffusers", "diffusers-compile", "diffusers-loop", "diffusers-loop-compile")
T_TRAIN = 1000

# (preset, training batch, images per sampling run, DDPM steps, DDIM steps)
DEFAULTS = {
    # the issue's configuration: DDPM CIFAR-10, batch 128, 256 images, T = 1000 and DDIM-50
    "cuda": ("ddpm-cifar10", 128, 256, 1000, 50),
    # a small model that makes the same comparison in minutes on a laptop-class CPU
    "cpu": ("digits-16", 32, 32, 100, 20),
    # a smoke run (CI): seconds
    "quick": ("tiny", 4, 4, 10, 5),
}
SAMPLE_REPS = {"cuda": 3, "cpu": 3, "quick": 2}
MODEL_CALLS = {"cuda": 50, "cpu": 20, "quick": 5}   # model-only calls per timed loop (sampling breakdown)
COMPILE_BUDGET_S = {"cpu": 300.0, "cuda": 900.0}
MEM_SAMPLE_STEPS = 2  # the steps of the sampling run the peak memory is taken over


# ------------------------------------------------------------- configs ------
def diffusers_unet_config(cfg: dict) -> dict:
    """The ``diffusers.UNet2DModel`` keyword arguments of the same network as
    a ``fastdiff.nn.UNet`` with constructor settings ``cfg`` (``UNet.config``):
    same widths, blocks, attention levels (one head of the level's width when
    ``heads == 1``), GroupNorm groups and eps, dropout; DDPM's asymmetric
    stride-2 downsampling padding and [sin, cos] time embedding. The
    parameter counts are equal (35,746,307 for ``ddpm-cifar10``). Raises
    ValueError for settings diffusers' UNet2DModel cannot express."""
    if not cfg.get("resamp_with_conv", True):
        raise ValueError("cfg: resamp_with_conv=False has no UNet2DModel equivalent")
    size, mult = int(cfg["image_size"]), tuple(cfg["ch_mult"])
    attn = [size // 2 ** i in tuple(cfg["attn_resolutions"]) for i in range(len(mult))]
    heads, head_dim = cfg.get("heads", 1), cfg.get("head_dim")
    widths = tuple(int(cfg["ch"]) * m for m in mult)
    if head_dim is None and heads != 1:
        if len({w // heads for w in widths}) != 1:
            raise ValueError("cfg: heads > 1 with levels of different widths: UNet2DModel takes one head width")
        head_dim = widths[0] // heads
    out_ch = int(cfg["out_ch"]) * (2 if cfg.get("learn_sigma") else 1)
    kw = dict(sample_size=size, in_channels=int(cfg["in_ch"]), out_channels=out_ch, block_out_channels=widths,
              layers_per_block=int(cfg["num_res_blocks"]),
              down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
              up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
              norm_num_groups=int(cfg.get("groups", 32)), norm_eps=float(cfg.get("eps", 1e-5)),
              dropout=float(cfg.get("dropout", 0.0)), attention_head_dim=head_dim, downsample_padding=0,
              flip_sin_to_cos=False, freq_shift=1, act_fn="silu", time_embedding_type="positional",
              resnet_time_scale_shift="scale_shift" if cfg.get("scale_shift") else "default")
    if cfg.get("num_classes") is not None:
        kw["num_class_embeds"] = int(cfg["num_classes"]) + 1  # fastdiff's label table has the null label's row
    if cfg.get("context_dim") is not None:
        raise ValueError("cfg: context_dim (cross-attention) has no UNet2DModel equivalent")
    return kw


def build_pair(preset: str, device: str = "cpu", seed: int = 0):
    """(fastdiff ``UNet.from_preset(preset)``, the equivalent diffusers
    ``UNet2DModel``), both on ``device``, in train mode, seeded with ``seed``."""
    from fastdiff.nn import UNet
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    fd = UNet.from_preset(preset)
    torch.manual_seed(seed)
    df = UNet2DModel(**diffusers_unet_config(fd.config))
    return fd.to(device).train(), df.to(device).train()


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@dataclass
class Built:
    """One configuration, ready to time.

    run(i): one timed unit (a training step on input set i, or a whole
    sampling run); model_only(i): the model-only training step, or one model
    call of the sampler; mem(): what the peak memory is taken over;
    base_bytes: parameters + optimizer state + inputs; calls: model calls per
    run (sampling steps; 1 for training)."""
    run: Callable[[int], object]
    model_only: Optional[Callable[[int], object]]
    mem: Callable[[], object]
    base_bytes: int
    params: int
    calls: int = 1
    note: str = ""
    profile: Optional[Callable[[], object]] = None  # a short unit for torch.profiler
    first_call_s: float = 0.0  # building + the first unit (compilation, graph capture)


def _amp(device: str, dtype: torch.dtype):
    return (lambda: torch.autocast(device, dtype=dtype)) if dtype != torch.float32 else nullcontext


def _out(o):
    """The tensor of a model output (diffusers returns an output object)."""
    return o if isinstance(o, torch.Tensor) else (o.sample if hasattr(o, "sample") else o[0])


def _gaussian_diffusion():
    try:
        from fastdiff.diffusion import GaussianDiffusion
        return GaussianDiffusion
    except Exception as e:
        raise timing.Skip(f"skipped: fastdiff.diffusion.GaussianDiffusion is not importable "
                    f"({type(e).__name__}: {str(e)[:120]})")


def _diffusers():
    try:
        import diffusers
        return diffusers
    except Exception as e:
        raise timing.Skip(f"skipped: diffusers is not importable ({type(e).__name__}: {str(e)[:120]})")


@dataclass
class Case:
    """One comparison: a suite, a sampler (sampling) and its steps, a precision, a layout."""
    suite: str
    device: str
    preset: str
    batch: int
    dtype: torch.dtype
    layout: str
    method: str = ""
    steps: int = 1

    @property
    def fmt(self):
        return torch.channels_last if self.layout == "NHWC" else torch.contiguous_format


def _models(case: Case, impl: str):
    """(model, params) for ``impl``: the fastdiff UNet or the diffusers
    UNet2DModel of the case's preset, on the device, in the case's layout;
    patched with fastdiff.nn.patch for ``diffusers-patched``."""
    fd, df = build_pair(case.preset, case.device)
    model, note = (fd, "") if impl.startswith("fastdiff") else (df, "")
    del fd, df
    model = model.to(memory_format=case.fmt)
    params = n_params(model)
    if impl == "diffusers-patched":
        from fastdiff.nn import patch
        rep = patch(model)
        note = "patched: " + ", ".join(f"{v} {k}" for k, v in rep.counts.items())
    return model, params, note


# ----------------------------------------------------------- training -------
def _build_train(case: Case, impl: str) -> Built:
    if impl in TRAIN_LOOPS:
        return _build_train_loop(case, impl)
    dev, amp = case.device, _amp(case.device, case.dtype)
    model, params, note = _models(case, impl)
    img_shape = None
    gen = torch.Generator(device=dev).manual_seed(0)
    if impl.startswith("fastdiff"):
        GD = _gaussian_diffusion()
        img_shape = (model.in_ch, model.config["image_size"], model.config["image_size"])
        net = torch.compile(model) if impl == "fastdiff-compile" else model
        diffusion = GD(net, "linear", num_timesteps=T_TRAIN, sample_shape=img_shape).to(dev)

        def loss_fn(x0):
            return diffusion(x0)
    else:
        diffusers = _diffusers()
        cfg = model.config
        img_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        sched = diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear")
        net = torch.compile(model) if impl == "diffusers-compile" else model

        def loss_fn(x0):
            # as diffusers' train_unconditional example: noise, timesteps, add_noise, the model, MSE in fp32
            noise = torch.randn_like(x0)
            t = torch.randint(0, T_TRAIN, (x0.shape[0],), device=x0.device)
            xt = sched.add_noise(x0, noise, t)
            return F.mse_loss(_out(net(xt, t)).float(), noise.float())
    nsets = 2
    xs = [(torch.rand((case.batch, *img_shape), generator=gen, device=dev) * 2 - 1).contiguous(memory_format=case.fmt)
          for _ in range(nsets)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)

    def step(i):
        with amp():
            loss = loss_fn(xs[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # model-only step: a pre-noised batch, a fixed output gradient, the same optimizer
    ts = [torch.randint(0, T_TRAIN, (case.batch,), generator=gen, device=dev) for _ in range(nsets)]
    xts = [torch.randn(x.shape, generator=gen, device=dev).contiguous(memory_format=case.fmt) for x in xs]
    grads: dict = {}

    def model_step(i):
        with amp():
            out = _out(net(xts[i], ts[i]))
        if i not in grads:  # in the output's own dtype and layout, as the MSE backward would give it
            grads[i] = torch.randn_like(out) * 1e-3
        out.backward(grads[i])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    step(0)  # creates the AdamW state (and compiles), so base_bytes holds it
    base = timing.storage_bytes(list(model.parameters()) + [t for s in opt.state.values() for t in s.values()] + xs)
    return Built(run=step, model_only=model_step, mem=lambda: step(1), base_bytes=base, params=params, note=note,
                 profile=lambda: [step(i % nsets) for i in range(2)])


def _build_train_loop(case: Case, impl: str) -> Built:
    """The whole training step as users run it (``TRAIN_LOOPS``): for
    diffusers, the step of its ``train_unconditional`` example (noise,
    timesteps, ``add_noise``, the model, ``F.mse_loss`` in fp32, backward,
    ``clip_grad_norm_(1.0)``, AdamW, the cosine lr schedule, zero_grad,
    ``EMAModel.step`` with the example's warm-up EMA); for fastdiff, one
    :meth:`fastdiff.train.Trainer.train_step` (the same work, fused) in the
    case's step mode. Both take their batches from the same pre-made device
    tensors."""
    import tempfile

    dev, amp = case.device, _amp(case.device, case.dtype)
    if impl == "fastdiff-step-graph" and dev != "cuda":
        raise timing.Skip("skipped: CUDA graphs need a GPU (on a CPU step_mode='graph' runs 'compile')")
    model, params, note = _models(case, impl)
    gen = torch.Generator(device=dev).manual_seed(0)
    size = model.config["image_size"] if impl.startswith("fastdiff") else model.config.sample_size
    in_ch = model.in_ch if impl.startswith("fastdiff") else model.config.in_channels
    nsets = 2
    xs = [(torch.rand((case.batch, in_ch, size, size), generator=gen, device=dev) * 2 - 1)
          .contiguous(memory_format=case.fmt) for _ in range(nsets)]
    if impl.startswith("fastdiff"):
        from fastdiff.train import TrainConfig, Trainer
        GD = _gaussian_diffusion()
        diffusion = GD(model, "linear", num_timesteps=T_TRAIN, sample_shape=(in_ch, size, size))
        prec = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[case.dtype]
        mode = {"fastdiff-step": "eager", "fastdiff-step-compile": "compile", "fastdiff-step-graph": "graph"}[impl]
        cfg = TrainConfig(steps=10**6, batch_size=case.batch, lr=1e-4, warmup_steps=500, lr_schedule="cosine",
                          grad_clip=1.0, ema_decay=0.9999, precision=prec, channels_last=case.layout == "NHWC",
                          step_mode=mode, device=dev, out_dir=tempfile.mkdtemp(prefix="fastdiff-bench-"),
                          num_samples=0, progress=False)
        tr = Trainer(diffusion, xs[0][:1].float().cpu().contiguous(), cfg)

        def step(i):
            tr.train_step(xs[i])
        state = lambda: list(tr.optimizer.state.values()) + [{"": p} for p in tr.ema.model.parameters()]  # noqa
    else:
        diffusers = _diffusers()
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        sched = diffusers.DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="linear")
        net = torch.compile(model) if impl == "diffusers-loop-compile" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=10**6)
        ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                       foreach=impl != "diffusers-loop")

        def step(i):
            x0 = xs[i]
            noise = torch.randn_like(x0)
            t = torch.randint(0, T_TRAIN, (x0.shape[0],), device=x0.device)
            xt = sched.add_noise(x0, noise, t)
            with amp():
                out = _out(net(xt, t))
            loss = F.mse_loss(out.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            ema.step(model.parameters())
        state = lambda: list(opt.state.values()) + [{"": p} for p in ema.shadow_params]  # noqa: E731
    step(0)  # optimizer state, EMA, compilation / capture
    base = timing.storage_bytes(list(model.parameters()) + [t for s in state() for t in s.values()
                                                            if isinstance(t, torch.Tensor)] + xs)
    return Built(run=step, model_only=None, mem=lambda: step(1), base_bytes=base, params=params, note=note,
                 profile=lambda: [step(i % nsets) for i in range(2)])


def train_flops(case: Case) -> Optional[float]:
    """FLOPs of one training step's model forward + backward at the case's
    batch (torch.utils.flop_counter on the fastdiff U-Net with stock ops:
    convolutions, matmuls, attention; the elementwise work is not counted),
    or None if they cannot be counted."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        from fastdiff.nn import UNet, unfused
        m = UNet.from_preset(case.preset).to(case.device)
        size = m.config["image_size"]
        x = torch.randn(case.batch, m.in_ch, size, size, device=case.device)
        t = torch.randint(0, T_TRAIN, (case.batch,), device=case.device)
        with FlopCounterMode(display=False) as fc, unfused():
            m(x, t).float().square().mean().backward()
        return float(fc.get_total_flops())
    except Exception:
        return None


def bf16_peak_tflops(device: str) -> Optional[float]:
    """The dense bf16 peak of this GPU from :data:`BF16_PEAK_TFLOPS`, or None (CPU, unknown GPU)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS if k in name), None)


def _add_flops(rows: Sequence[dict], flops: Optional[float], peak: Optional[float]) -> None:
    for r in rows:
        ok = flops and r.get("median_ms")
        r["train_flops"] = flops
        r["tflops"] = flops / (r["median_ms"] * 1e-3) / 1e12 if ok else None
        r["pct_bf16_peak"] = 100.0 * r["tflops"] / peak if ok and peak else None


def ema_update_timing(preset: str = "ddpm-cifar10", device: str = "cpu", reps: int = 7) -> dict:
    """One EMA update of ``preset``'s parameters: fastdiff's :class:`EMA`
    (``_foreach_lerp_``) against diffusers' ``EMAModel.step`` with
    ``foreach=False`` (its default) and ``foreach=True``, interleaved, the
    median ms of each and the ratios."""
    from fastdiff.nn import UNet
    from fastdiff.train import EMA
    from diffusers.training_utils import EMAModel

    model = UNet.from_preset(preset).to(device)
    fd = EMA(model, 0.9999, warmup=True)
    slow = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, foreach=False)
    fast = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, foreach=True)
    fns = {"fastdiff EMA": fd.update, "diffusers EMAModel(foreach=False)": lambda: slow.step(model.parameters()),
           "diffusers EMAModel(foreach=True)": lambda: fast.step(model.parameters())}
    times: dict = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, fn in fns.items():
            timing.sync(device)
            t0 = time.perf_counter()
            fn()
            timing.sync(device)
            if r:  # the first round is the warm-up
                times[k].append((time.perf_counter() - t0) * 1e3)
    med = {k: timing.stats(v)["median_ms"] for k, v in times.items()}
    f = med["fastdiff EMA"]
    return {"preset": preset, "params": n_params(model), "device": device, "median_ms": med,
            "speedup_vs_foreach_false": med["diffusers EMAModel(foreach=False)"] / f,
            "speedup_vs_foreach_true": med["diffusers EMAModel(foreach=True)"] / f}


# ----------------------------------------------------------- sampling -------
def _to_host(x: torch.Tensor):
    """The pipelines' output_type="np": [0, 1], NHWC, float32 numpy on the host."""
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """A CUDA-graph replay of ``fn()`` (static inputs captured in the closure)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _build_sample(case: Case, impl: str) -> Built:
    dev, amp, n = case.device, _amp(case.device, case.dtype), case.batch
    if impl == "fastdiff-graph" and dev != "cuda":
        raise timing.Skip("skipped: CUDA graphs need a GPU")
    if impl in TRAIN_LOOPS:
        raise timing.Skip("skipped: a training configuration")
    model, params, note = _models(case, impl)
    model.eval()
    if impl.startswith("fastdiff"):
        GD = _gaussian_diffusion()
        size = model.config["image_size"]
        shape = (n, model.in_ch, size, size)
        diffusion = GD(model, "linear", num_timesteps=T_TRAIN, sample_shape=shape[1:]).to(dev)
        graph, comp = impl == "fastdiff-graph", impl == "fastdiff-compile"

        def sample(steps):
            with amp():
                x = diffusion.sample(n, steps=steps, method=case.method, cuda_graph=graph, compile_model=comp)
            return _to_host(x)
        x1 = torch.randn(shape, device=dev).contiguous(memory_format=case.fmt)
        t1 = torch.full((n,), T_TRAIN // 2, dtype=torch.int64, device=dev)
        # the model the sampler calls (with compile_model: its own compiled wrapper, reused, not recompiled)
        net = diffusion._model_fn(comp) if hasattr(diffusion, "_model_fn") else \
            (torch.compile(model) if comp else model)

        def call():
            with amp(), torch.no_grad():
                return net(x1, t1)
    else:
        diffusers = _diffusers()
        cfg = model.config
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        net = torch.compile(model) if impl == "diffusers-compile" else model
        if case.method == "ddpm":
            pipe = diffusers.DDPMPipeline(unet=net, scheduler=diffusers.DDPMScheduler(
                num_train_timesteps=T_TRAIN, beta_schedule="linear"))
            kw = {}
        else:
            pipe = diffusers.DDIMPipeline(unet=net, scheduler=diffusers.DDIMScheduler(
                num_train_timesteps=T_TRAIN, beta_schedule="linear"))
            kw = {"eta": 0.0}
        pipe.set_progress_bar_config(disable=True)

        def sample(steps):
            with amp():
                return pipe(batch_size=n, num_inference_steps=steps, output_type="np", **kw).images
        x1 = torch.randn(shape, device=dev)  # the pipeline's image is NCHW; the model's layout converts it
        t1 = torch.tensor(T_TRAIN // 2)  # a 0-dim CPU tensor, as the pipeline passes scheduler.timesteps[i]

        def call():
            with amp(), torch.no_grad():
                return net(x1, t1).sample
    sample(case.steps)  # first call: compilation, graph capture, lazy initialisation
    if impl == "fastdiff-graph" and getattr(diffusion, "_graph_warned", False):
        note = "; ".join(x for x in (note, "CUDA graph capture failed: sample() ran eagerly") if x)
    model_call = _graphed(call) if impl == "fastdiff-graph" else call
    mem_steps = min(MEM_SAMPLE_STEPS, case.steps)  # every step has the same peak: a short run suffices
    base = timing.storage_bytes(list(model.parameters()))
    return Built(run=lambda i: sample(case.steps), model_only=lambda i: model_call(), mem=lambda: sample(mem_steps),
                 base_bytes=base, params=params, calls=case.steps, note=note,
                 profile=lambda: sample(min(3, case.steps)))


# ------------------------------------------------------------- timing -------
def _time_runs(fn: Callable[[int], object], device: str, reps: int) -> list:
    """Times in ms of ``reps`` calls of ``fn`` (long units: one sampling run),
    synchronised after each: CUDA events on a GPU, perf_counter on CPU."""
    times = []
    for i in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn(i)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _time_model_calls(fn: Callable[[int], object], device: str, calls: int, reps: int) -> dict:
    """Per-call time of back-to-back model calls: ``reps`` loops of ``calls``
    calls each (after a warm-up loop), each loop timed as a whole (GPU: CUDA
    events, the queue kept full, one synchronisation per loop); the stats of
    loop time / calls."""
    def loop(i):
        for k in range(calls):
            fn(k)
    loop(0)
    return timing.stats([t / calls for t in _time_runs(loop, device, reps)])


def _stats_row(st: Optional[dict]) -> dict:
    if not st:
        return {"median_ms": None, "p20_ms": None, "p80_ms": None, "reps": 0}
    return {k: st[k] for k in ("median_ms", "p20_ms", "p80_ms", "reps")}


# -------------------------------------------------------------- run ---------
def _row(case: Case, impl: str, built: Optional[Built], note: str) -> dict:
    return {"suite": case.suite, "impl": impl, "device": case.device, "preset": case.preset, "batch": case.batch,
            "method": case.method or None, "steps": case.steps if case.suite == "sample" else None,
            "dtype": timing.DTYPE_NAMES[case.dtype], "precision": "fp32" if case.dtype == torch.float32 else
            f"{timing.DTYPE_NAMES[case.dtype]} autocast", "layout": case.layout, "shape": _shape_label(case),
            "params": built.params if built else None, "median_ms": None, "p20_ms": None, "p80_ms": None,
            "reps": 0, "first_call_s": None, "images_per_s": None, "images_per_s_p20": None,
            "images_per_s_p80": None, "model_ms": None, "overhead_ms": None, "step_ms": None,
            "non_model_us_per_step": None, "peak_mem_bytes": None, "step_mem_bytes": None, "mem_method": None,
            "note": note}


def _fill(row: dict, built: Built, st: dict, model_st: Optional[dict], mem: Optional[dict]) -> None:
    row.update(_stats_row(st))
    n, med = row["batch"], st["median_ms"]
    row["images_per_s"] = n / (med * 1e-3)
    row["images_per_s_p20"] = n / (st["p80_ms"] * 1e-3)  # the slow end of the throughput is the p80 time
    row["images_per_s_p80"] = n / (st["p20_ms"] * 1e-3)
    if model_st:
        row["model_ms"] = model_st["median_ms"]
        if row["suite"] == "train":
            row["overhead_ms"] = med - model_st["median_ms"]
        else:
            row["step_ms"] = med / built.calls
            row["non_model_us_per_step"] = (med - built.calls * model_st["median_ms"]) / built.calls * 1e3
    if mem:
        row.update({k: mem[k] for k in ("peak_mem_bytes", "step_mem_bytes", "mem_method")})


def _peak(built: Built, device: str) -> dict:

    return timing.step_peak_memory(built.mem, device, built.base_bytes)


def _profile(built: Built, device: str, path: str, units: int) -> list:
    """torch.profiler over ``built.profile()``; writes a Chrome trace to
    ``path`` and returns the 12 ops with the most self device time (CPU: self
    CPU time) as [name, ms per unit, % of the total]."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        built.profile()
        timing.sync(device)
    prof.export_chrome_trace(path)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    evs = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in evs) or 1.0
    evs.sort(key=lambda e: -getattr(e, key))
    return [[e.key, getattr(e, key) / 1e3 / units, 100.0 * getattr(e, key) / total] for e in evs[:12]]


def run(suite: str = "train", device: str = "auto", *, preset: Optional[str] = None, batch: Optional[int] = None,
        dtypes: Sequence = ("fp32",), layouts: Sequence[str] = ("NCHW",), methods: Sequence[str] = METHODS,
        ddpm_steps: Optional[int] = None, ddim_steps: Optional[int] = None, impls: Optional[Sequence[str]] = None,
        quick: bool = False, compile: Optional[bool] = None, compile_budget_s: Optional[float] = None,
        reps: Optional[int] = None, breakdown: bool = True, memory: bool = True, profile_dir: Optional[str] = None,
        log: Optional[Callable[[str], None]] = None) -> list:
    """Time every configuration of ``suite`` ("train" or "sample") side by side.

    Args:
        suite: "train" (one training step per unit) or "sample" (one sampling run).
        device: "cpu", "cuda" or "auto".
        preset: ``fastdiff.nn.PRESETS`` name; the diffusers model is its equivalent
            (default: ``ddpm-cifar10`` on GPU, ``digits-16`` on CPU, ``tiny`` with ``quick``).
        batch: training batch, or images per sampling run (default: 128 / 256 on GPU,
            32 / 32 on CPU, 4 / 4 with ``quick``).
        dtypes: precisions, "fp32" and/or "bf16"/"fp16" (run under ``torch.autocast``; the weights stay fp32).
        layouts: "NCHW" and/or "NHWC" (channels_last weights and training inputs).
        methods: samplers, "ddpm" and/or "ddim" (suite "sample").
        ddpm_steps, ddim_steps: sampling steps (default 1000 / 50 on GPU, 100 / 20 on CPU, 10 / 5 with
            ``quick``); fewer than 1000 DDPM steps is the respaced chain of both libraries.
        impls: configurations to run (keys of :data:`IMPLS`; default all).
        quick: the smoke sizes, few repetitions, no torch.compile unless ``compile=True``.
        compile: time the torch.compile configurations (default: on unless ``quick``).
        compile_budget_s: wall-clock budget of all compilations; the compiled configurations after it are
            skipped with a note (default 300 s CPU, 900 s GPU).
        reps: sampling runs per configuration (default 3; 2 with ``quick``).
        breakdown: also time the model alone (train: model-only step; sample: one model call).
        memory: also measure the peak memory.
        profile_dir: when set, write a torch.profiler Chrome trace per configuration there and put the top
            ops (self device time) in the row's ``profile_top``.
        log: progress lines (default: none).

    Returns one dict per (case, configuration): see :func:`format_table` and
    benchmarks/README.md for the keys; ``speedup_vs_<baseline>`` compares
    with the diffusers rows of the same case."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    device = timing.resolve_device(device)
    log = log or (lambda msg: None)
    d_preset, d_tb, d_sb, d_ddpm, d_ddim = DEFAULTS["quick" if quick else device]
    preset = preset or d_preset
    from fastdiff.nn import PRESETS
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    batch = batch if batch is not None else (d_tb if suite == "train" else d_sb)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    dts = [timing.parse_dtype(d) for d in ([dtypes] if isinstance(dtypes, (str, torch.dtype)) else dtypes)]
    for lay in layouts:
        if lay not in LAYOUTS:
            raise ValueError(f"layouts must be among {', '.join(LAYOUTS)}, got {lay!r}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {', '.join(METHODS)}, got {m!r}")
    steps = {"ddpm": d_ddpm if ddpm_steps is None else ddpm_steps, "ddim": d_ddim if ddim_steps is None else ddim_steps}
    for m, s in steps.items():
        if not 1 <= s <= T_TRAIN:
            raise ValueError(f"{m}_steps must be in [1, {T_TRAIN}], got {s}")
    impls = list(impls) if impls else [k for k in IMPLS if (k not in TRAIN_LOOPS if suite == "sample" else
                                                            k != "fastdiff-graph")]
    for k in impls:
        if k not in IMPLS:
            raise ValueError(f"impls must be among {', '.join(IMPLS)}, got {k!r}")
    reps = SAMPLE_REPS["quick" if quick else device] if reps is None else reps
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    compile = (not quick) if compile is None else compile
    budget = COMPILE_BUDGET_S[device] if compile_budget_s is None else compile_budget_s
    spent = [0.0]
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)

    cases = []
    for dt in dts:
        for lay in layouts:
            if suite == "train":
                cases.append(Case("train", device, preset, batch, dt, lay))
            else:
                cases += [Case("sample", device, preset, batch, dt, lay, m, steps[m]) for m in methods]
    rows = []
    for case in cases:
        what = f"{case.suite} {case.preset} b{case.batch} {timing.DTYPE_NAMES[case.dtype]} {case.layout}" + \
            (f" {case.method}-{case.steps}" if case.method else "")
        log(f"{what}:")
        build = _build_train if suite == "train" else _build_sample
        built: dict = {}
        case_rows = {}

        def make(impl):
            """Build one configuration, or return the reason it is skipped."""
            if "compile" in impl and not compile:
                return "skipped in --quick (use --compile to time it)" if quick else "skipped: --no-compile"
            if "compile" in impl and spent[0] > budget:
                return f"skipped: torch.compile budget ({budget:.0f} s) used up"
            t0 = time.perf_counter()
            try:
                b = build(case, impl)
            except timing.Skip as e:
                return str(e)
            except Exception as e:
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                timing.free(device)
                return f"failed: {type(e).__name__}: {msg}"
            finally:
                if "compile" in impl:
                    spent[0] += time.perf_counter() - t0
            b.first_call_s = time.perf_counter() - t0
            return b

        def measure(impl, b, st, model_st=None):
            """Fill the row of ``impl`` from its timing ``st``; the model-only
            timing (``model_st``: given on CPU, where it was interleaved; timed
            here on a GPU), the peak memory and the profile."""
            row = case_rows[impl]
            row["params"], row["first_call_s"] = b.params, b.first_call_s
            row["note"] = "; ".join(x for x in (b.note, row["note"]) if x)
            mem = None
            try:
                if isinstance(model_st, BaseException):
                    raise model_st
                if breakdown and b.model_only is not None and model_st is None:
                    if suite == "train":
                        model_st = timing.time_calls(b.model_only, device, 2, quick)
                    else:
                        calls = min(case.steps, MODEL_CALLS["quick" if quick else device])
                        model_st = _time_model_calls(b.model_only, device, calls, reps)
                if memory:
                    mem = _peak(b, device)
                if profile_dir:
                    name = f"{suite}-{case.method or 'step'}-{timing.DTYPE_NAMES[case.dtype]}-{case.layout}-{impl}.json"
                    row["profile_top"] = _profile(b, device, os.path.join(profile_dir, name),
                                                  2 if suite == "train" else min(3, case.steps))
                    row["profile_trace"] = name
            except Exception as e:
                row["note"] = "; ".join(x for x in (row["note"], f"breakdown/memory failed: {type(e).__name__}: "
                                                    f"{str(e)[:120]}") if x)
            _fill(row, b, st, model_st, mem)
            log(f"  {impl:<19} {row['median_ms']:10.3f} ms  {row['images_per_s']:9.1f} img/s")

        for impl in impls:
            case_rows[impl] = _row(case, impl, None, "")
        if device == "cuda":
            # one configuration at a time: built, timed, freed
            for impl in impls:
                b = make(impl)
                if isinstance(b, str):
                    case_rows[impl]["note"] = b
                    log(f"  {impl:<19} {b}")
                    continue
                try:
                    if suite == "train":
                        st = timing.time_calls(b.run, device, 2, quick)
                    else:
                        st = timing.stats(_time_runs(b.run, device, reps))
                except Exception as e:
                    case_rows[impl]["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                    del b
                    timing.free(device)
                    continue
                measure(impl, b, st)
                del b
                timing.free(device)
        else:
            # CPU: all configurations built, then timed interleaved
            for impl in impls:
                b = make(impl)
                if isinstance(b, str):
                    case_rows[impl]["note"] = b
                    log(f"  {impl:<19} {b}")
                else:
                    built[impl] = b
            live = list(built)
            with_model = [k for k in live if breakdown and built[k].model_only is not None]
            model_res: dict = {}
            if suite == "train":
                # the model-only steps are interleaved with the full steps: a drift hits both alike
                res = timing.time_interleaved([built[k].run for k in live] + [built[k].model_only for k in with_model],
                                         2, quick)
                model_res = dict(zip(with_model, res[len(live):]))
                res = res[:len(live)]
            else:
                calls = min(case.steps, MODEL_CALLS["quick"] if quick else MODEL_CALLS[device])
                times: dict = {k: [] for k in live}
                mtimes: dict = {k: [] for k in with_model}

                def loop(fn):
                    return lambda i: [fn(j) for j in range(calls)]
                for k in with_model:  # warm-up of the model-only loop
                    loop(built[k].model_only)(0)
                for r in range(reps):  # rounds: one run of each configuration, then its model-only loop
                    for k in live:
                        try:
                            if not isinstance(times[k], BaseException):
                                times[k] += _time_runs(built[k].run, device, 1)
                            if k in mtimes and not isinstance(mtimes[k], BaseException):
                                mtimes[k] += [t / calls for t in _time_runs(loop(built[k].model_only), device, 1)]
                        except Exception as e:
                            if isinstance(times[k], list) and len(times[k]) == r:
                                times[k] = e
                            else:
                                mtimes[k] = e
                res = [times[k] if isinstance(times[k], BaseException) else timing.stats(times[k]) for k in live]
                model_res = {k: v if isinstance(v, BaseException) else timing.stats(v) for k, v in mtimes.items()}
            for k, st in zip(live, res):
                if isinstance(st, BaseException):
                    case_rows[k]["note"] = f"failed: {type(st).__name__}: {str(st)[:200]}"
                    continue
                measure(k, built[k], st, model_res.get(k))
            built.clear()
            timing.free(device)
        if suite == "train":
            _add_flops(list(case_rows.values()), train_flops(case), bf16_peak_tflops(device))
        rows += [case_rows[impl] for impl in impls]
    return add_speedups(rows)


def _shape_label(case: Case) -> str:
    from fastdiff.nn import PRESETS

    p = PRESETS[case.preset]
    return f"{case.batch}x{p['in_ch']}x{p['image_size']}x{p['image_size']}"


def _case_key(r: dict) -> tuple:
    return (r["suite"], r["device"], r["preset"], r["batch"], r.get("method"), r.get("steps"), r["dtype"], r["layout"])


def add_speedups(rows: list) -> list:
    """``speedup_vs_diffusers`` and ``speedup_vs_diffusers_compile`` (baseline
    median / this row's median) for every timed row, against the diffusers
    rows of the same case (suite, preset, batch, sampler, steps, dtype,
    layout); ``speedup_vs_diffusers_fp32_nchw`` against diffusers eager as
    it ships (fp32, NCHW) in the same suite/preset/batch/sampler/steps, when
    that row was run too."""
    index = {(_case_key(r), r["impl"]): r for r in rows}
    for r in rows:
        default_key = _case_key(r)[:6] + ("fp32", "NCHW")
        for name, key in [(b.replace("-", "_"), (_case_key(r), b)) for b in BASELINES] + \
                [("diffusers_fp32_nchw", (default_key, "diffusers"))]:
            base = index.get(key)
            ok = base is not None and base["median_ms"] and r["median_ms"] and base is not r
            r["speedup_vs_" + name] = base["median_ms"] / r["median_ms"] if ok else None
    return rows


# ------------------------------------------------------------- reports ------
def _f(v, spec, scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def format_table(rows: list) -> str:
    """An aligned text table, one block per case: impl, median/p20/p80 ms,
    images/s (median, p20-p80), the breakdown (train: model-only step ms and
    the loss/noise overhead ms; sample: model ms per call and the non-model
    time per step in us), peak memory (MiB), and the speedups vs diffusers
    eager and vs diffusers under torch.compile. Notes of skipped rows follow."""
    out, notes = [], []
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(_case_key(r), []).append(r)
    for key, rs in by_case.items():
        r0 = rs[0]
        train = r0["suite"] == "train"
        params = sorted({f"{r['params']:,}" for r in rs if r.get("params")}) or ["?"]
        title = (f"== {r0['suite']}: {r0['preset']} {r0['shape']} ({' / '.join(params)} params), "
                 f"{r0['precision']}, {r0['layout']}")
        if not train:
            title += f", {r0['method'].upper()} {r0['steps']} steps"
        head = ["impl", "median ms", "p20 ms", "p80 ms", "img/s", "img/s p20-p80",
                "model ms" if train else "model ms/call", "overhead ms" if train else "non-model us/step",
                "peak MiB", "vs diffusers", "vs diff.compile"]
        loops = train and any(r["impl"] in TRAIN_LOOPS for r in rs)
        if train:
            head += ["TFLOP/s", "% bf16 peak"] + (["vs diff.loop", "vs loop.compile"] if loops else [])
        body = []
        for r in rs:
            if r["median_ms"] is None:
                body.append([r["impl"]] + ["-"] * 8 + ["", ""] + ["-"] * (len(head) - 11))
                notes.append(f"{r['suite']} {r.get('method') or ''} {r['dtype']} {r['layout']} {r['impl']}: "
                             f"{r['note'] or 'not run'}".replace("  ", " "))
                continue
            body.append([r["impl"], _f(r["median_ms"], ".2f"), _f(r["p20_ms"], ".2f"), _f(r["p80_ms"], ".2f"),
                         _f(r["images_per_s"], ".1f"),
                         f"{_f(r['images_per_s_p20'], '.1f')}-{_f(r['images_per_s_p80'], '.1f')}",
                         _f(r["model_ms"], ".3f"),
                         _f(r["overhead_ms"], ".2f") if train else _f(r["non_model_us_per_step"], ".0f"),
                         _f(r["peak_mem_bytes"], ".0f", 2 ** -20),
                         "" if r["speedup_vs_diffusers"] is None else f"{r['speedup_vs_diffusers']:.2f}x",
                         "" if r["speedup_vs_diffusers_compile"] is None else
                         f"{r['speedup_vs_diffusers_compile']:.2f}x"])
            if train:
                body[-1] += [_f(r.get("tflops"), ".3g"), _f(r.get("pct_bf16_peak"), ".1f")]
                if loops:
                    body[-1] += ["" if r.get(k) is None else f"{r[k]:.2f}x"
                                 for k in ("speedup_vs_diffusers_loop", "speedup_vs_diffusers_loop_compile")]
            if r.get("note") and not r["note"].startswith("patched"):
                notes.append(f"{r['suite']} {r.get('method') or ''} {r['dtype']} {r['layout']} {r['impl']}: "
                             f"{r['note']}".replace("  ", " "))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

        def line(cells):
            return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        if out:
            out.append("")
        out += [title, line(head), line(["-" * w for w in widths])] + [line(c) for c in body]
    if notes:
        out += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(out)


def metadata(device: str, **extra) -> dict:
    """:func:`fastdiff.bench._report.metadata` (GPU name and driver, torch, triton,
    diffusers versions, git commit, ...) with ``kind = "e2e"`` and this
    module's timing method."""
    meta = report.metadata(device, None, kind="e2e", **extra)
    meta["timing"] = ("train: CUDA events per step, queue kept full; sample: CUDA events around each run, "
                      "synchronised" if device == "cuda" else
                      "time.perf_counter; train: configurations interleaved in ~20 ms rounds; sample: one run of "
                      "each configuration in turn") + "; median/p20/p80"
    meta["memory"] = ("torch.cuda.max_memory_allocated above the start + parameters/optimizer state/inputs"
                      if device == "cuda" else
                      "torch.profiler CPU allocator events above the start + parameters/optimizer state/inputs")
    return meta


def plot(rows: list, path: str) -> str:
    """Bar chart of the speedups vs diffusers eager (and vs diffusers under
    torch.compile, hatched), one group per case and one bar per
    configuration. Returns a message; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib is not importable ({type(e).__name__})"
    groups: dict = {}
    for r in rows:
        if r["median_ms"] and r["impl"] != "diffusers":
            g = f"{r['suite']}" + (f" {r['method']}-{r['steps']}" if r.get("method") else "") + \
                f"\n{r['dtype']} {r['layout']}"
            groups.setdefault(g, {})[r["impl"]] = r
    if not groups:
        return "plot skipped: nothing to compare with diffusers eager"
    impls = [k for k in IMPLS if k != "diffusers" and any(k in v for v in groups.values())]
    names = list(groups)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(names) + 2), 4.8))
    w = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs = [i + j * w for i in range(len(names))]
        vals = [(groups[g].get(impl) or {}).get("speedup_vs_diffusers") for g in names]
        bars = ax.bar(xs, [v or float("nan") for v in vals], w, label=f"{impl} vs diffusers eager")
        for bar, v in zip(bars, vals):
            if v:
                ax.annotate(f"{v:.2f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))])
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("speedup over diffusers eager (time ratio)")
    r0 = rows[0]
    ax.set_title(f"end-to-end throughput, {r0['preset']} on {r0['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def write_json(path: str, rows: list, meta: dict) -> None:
    """Write ``{"meta": meta, "rows": rows}`` to ``path``; when the file
    already holds e2e rows of another suite (train then sample into one
    file), they are kept: rows of the same suite are replaced."""
    old = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                prev = json.load(f)
            if prev.get("meta", {}).get("kind") == "e2e":
                suites = {r["suite"] for r in rows}
                old = [r for r in prev.get("rows", []) if r.get("suite") not in suites]
                meta = {**prev["meta"], **meta, "suite": ",".join(sorted(suites | {r["suite"] for r in old}))}
        except (OSError, ValueError, KeyError):
            old = []
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report.to_json(old + rows, meta), f, indent=1, default=str)
