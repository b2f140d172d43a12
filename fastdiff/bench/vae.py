"""``fastdiff bench vae``: the decode of a diffusers ``AutoencoderKL``, stock
vs ``fastdiff.nn.patch`` (every resnet, the mid-block attention, the
upsamplers and the output norm fused), time and peak memory.

Configurations (random weights, built from config, no download):

* GPU: the SD-1.5 VAE (block_out_channels 128/256/512/512, 2 resnets per
  encoder block and 3 per decoder block, 32 groups) decoding a 4x64x64
  latent to 512x512, bf16 by default;
* CPU: the same block structure scaled down 4x in width (32/64/128/128,
  8 groups, so the channels per group are SD's) decoding 4x16x16 to
  128x128, fp32.

Prediction (printed with the results), from two shares of the stock decode:

* ``f_na``, the profiler's share of eager GroupNorm + SiLU kernels. Eager
  makes 5 passes over each tensor there (GroupNorm: stats read, normalise
  read + write; SiLU: read + write), the fused op 3: that time drops by 2/5.
* ``f_up``, the share of the three upsamplers (nearest x2 + 3x3 conv),
  timed with module hooks. The patch computes each as four 2x2 phase convs
  on the small input (4/9 of the multiply-adds, no upsampled tensor): that
  time drops by about 5/9 when the convs are compute-bound.

``pred_speedup`` = 1 / (1 - 0.4 f_na - 5/9 f_up).
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Callable, Optional

import torch

from fastdiff.nn import patch

from . import _timing as timing
from ._models import sd_vae

SD15 = dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32, latent=64)
CPU_SMALL = dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=8, latent=16)
TINY = dict(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, latent=4)


def build_vae(cfg: dict, dtype: torch.dtype, device: str):
    """A randomly initialised AutoencoderKL with the SD-1.5 block structure and ``cfg``'s widths."""
    return sd_vae(cfg["block_out_channels"], cfg["norm_num_groups"], dtype, device)


def _norm_act_ms(vae, z) -> tuple:
    """(ms in eager GroupNorm + SiLU kernels, total ms) of one stock decode, from the profiler (CPU or CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if z.is_cuda else [])
    with timing._without_kineto_log(), torch.inference_mode(), profile(activities=acts) as prof:
        vae.decode(z)
        timing.sync(z.device.type)
    norm = total = 0.0
    for e in prof.key_averages():
        t = (e.self_device_time_total if z.is_cuda else e.self_cpu_time_total) / 1e3
        total += t
        if e.key in ("aten::native_group_norm", "aten::silu", "aten::silu_"):
            norm += t
    return norm, total


def _upsample_share(vae, z) -> float:
    """Share of one stock decode spent in the decoder's Upsample2D modules (wall clock, synchronised)."""
    spent, marks = [0.0], {}

    def pre(m, args):
        timing.sync(z.device.type)
        marks[id(m)] = time.perf_counter()

    def post(m, args, out):
        timing.sync(z.device.type)
        spent[0] += time.perf_counter() - marks.pop(id(m))

    ups = [m for m in vae.modules() if type(m).__name__ == "Upsample2D"]
    handles = [h for m in ups for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.inference_mode():
            vae.decode(z)  # warm
            spent[0] = 0.0
            timing.sync(z.device.type)
            t0 = time.perf_counter()
            vae.decode(z)
            timing.sync(z.device.type)
            total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return spent[0] / total if total > 0 else 0.0


def run(device: str = "cpu", dtype: Optional[torch.dtype] = None, quick: bool = False, memory: bool = True,
        log: Callable[[str], None] = lambda m: None) -> dict:
    """Time stock and patched decode (interleaved on CPU); returns one result dict."""
    cfg = TINY if quick else (SD15 if device == "cuda" else CPU_SMALL)
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    stock = build_vae(cfg, dtype, device)
    patched = copy.deepcopy(stock)
    report = patch(patched)
    z = torch.randn(1, 4, cfg["latent"], cfg["latent"], device=device, dtype=dtype)

    def fn(model):
        def call(i):
            with torch.inference_mode():
                return model.decode(z).sample
        return call

    log(f"bench vae: decode {tuple(z.shape)} -> {cfg['latent'] * 8}x{cfg['latent'] * 8}, {dtype}, {device}")
    if device == "cpu":
        t_stock, t_patched = timing.time_interleaved([fn(stock), fn(patched)], 1, quick)
    else:
        t_stock, t_patched = (timing.time_calls(fn(m), device, 1, quick) for m in (stock, patched))
    norm_ms, prof_ms = _norm_act_ms(stock, z)
    frac = norm_ms / prof_ms if prof_ms else 0.0
    f_up = _upsample_share(stock, z)
    out = {"device": device, "dtype": str(dtype).replace("torch.", ""), "latent": list(z.shape),
           "image": cfg["latent"] * 8, "block_out_channels": list(cfg["block_out_channels"]),
           "fused": report.counts, "skipped": len(report.skipped),
           "stock_ms": t_stock["median_ms"], "patched_ms": t_patched["median_ms"],
           "stock_p20_p80": [t_stock["p20_ms"], t_stock["p80_ms"]],
           "patched_p20_p80": [t_patched["p20_ms"], t_patched["p80_ms"]],
           "speedup": t_stock["median_ms"] / t_patched["median_ms"],
           "norm_act_fraction": frac, "upsample_fraction": f_up,
           "pred_speedup": 1.0 / (1.0 - 0.4 * frac - 5.0 / 9.0 * f_up)}
    if memory:
        for name, m in (("stock", stock), ("patched", patched)):
            timing.free(device)
            out[f"{name}_peak_bytes"] = timing.step_peak_memory(lambda m=m: fn(m)(0), device, 0)["step_mem_bytes"]
        out["peak_ratio"] = out["patched_peak_bytes"] / max(out["stock_peak_bytes"], 1)
    return out


def format_result(r: dict) -> str:
    lines = [f"VAE decode {r['latent']} -> {r['image']}x{r['image']} ({r['dtype']}, {r['device']}, "
             f"widths {r['block_out_channels']}); fused {r['fused']}, skipped {r['skipped']}",
             f"  stock   {r['stock_ms']:9.2f} ms (p20-p80 {r['stock_p20_p80'][0]:.2f}-{r['stock_p20_p80'][1]:.2f})",
             f"  patched {r['patched_ms']:9.2f} ms (p20-p80 {r['patched_p20_p80'][0]:.2f}-"
             f"{r['patched_p20_p80'][1]:.2f})",
             f"  speedup {r['speedup']:.2f}x; predicted {r['pred_speedup']:.2f}x (of the stock decode: eager "
             f"GroupNorm+SiLU {100 * r['norm_act_fraction']:.0f}%, upsamplers {100 * r['upsample_fraction']:.0f}%)"]
    if "peak_ratio" in r:
        lines.append(f"  peak memory: stock {r['stock_peak_bytes'] / 2**20:.1f} MiB, patched "
                     f"{r['patched_peak_bytes'] / 2**20:.1f} MiB ({r['peak_ratio']:.2f}x)")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``fastdiff bench vae`` from the bench parser's arguments (--device --dtype --quick --threads --json
    --quiet --memory)."""
    import json
    a = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if a("threads"):
        torch.set_num_threads(a("threads"))
    try:
        device = timing.resolve_device(a("device", "auto"))
        dts = a("dtype")
        dtype = timing.parse_dtype(dts[0]) if dts and dts != ["fp32"] else (None if device == "cuda" else torch.float32)
    except (ValueError, RuntimeError) as e:
        print(f"fastdiff bench vae: error: {e}", file=sys.stderr)
        return 2
    if device == "cpu" and a("malloc_reuse", True):
        timing.keep_freed_memory()
    log = (lambda m: None) if a("quiet") else (lambda m: print(m, file=sys.stderr, flush=True))
    r = run(device, dtype, bool(a("quick")), bool(a("memory", True)), log)
    print(format_result(r))
    if a("json"):
        with open(a("json"), "w") as f:
            json.dump({"meta": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                "argv": sys.argv[1:]}, "rows": [r]}, f, indent=1)
    return 0
