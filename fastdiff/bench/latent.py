"""``fastdiff bench sample --methods latent``: the latent-diffusion case. A
Stable-Diffusion-1.5-shaped diffusers ``UNet2DConditionModel`` and
``AutoencoderKL`` with random weights built from config (no download), timed
as four configurations:

* ``stock``: the diffusers modules, eager;
* ``patched``: after ``fastdiff.nn.patch`` of the U-Net and the VAE (fused
  GroupNorm(+temb)+SiLU in every resnet, fused attention);
* ``compiled``: ``torch.compile`` of the stock U-Net and of the VAE decoder;
* ``patched+compiled``: ``torch.compile`` of the patched modules.

What is timed, per configuration: one U-Net step as a guided pipeline makes
it (the conditional and unconditional halves in one batch of 2 x ``batch``
latents, a 77-token text context of width 768), one VAE decode of ``batch``
latents, and the peak memory of each (above what was allocated before).

Configurations (``CONFIGS``):

* GPU (``sd15``): SD-1.5's U-Net (block_out_channels 320/640/1280/1280, 2
  layers per block, cross-attention dim 768, 8 heads) on 64x64 latents, and
  SD's VAE (128/256/512/512) decoding them to 512x512; bf16.
* CPU (``cpu``): the same block structure (CrossAttnDownBlock2D x3 +
  DownBlock2D, the mirrored up path, the cross-attention mid block, the VAE's
  four encoder/decoder levels) scaled down in width (U-Net 32/64/128/128 with
  4 heads, VAE 32/64/128/128) with 16x16 latents (a 128x128 image), and the
  same 77 x 768 context; fp32.
* ``tiny`` (``--quick``, tests): smaller still, 8x8 latents.

Only ``_timing`` and ``_report`` of the bench package are imported (the
suites are independent); the VAE is built here as ``bench vae`` builds it.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable, Optional, Sequence

import torch

from fastdiff.nn import patch

from . import _timing as timing
from ._models import sd_vae

CONFIGS = {
    "sd15": dict(unet_channels=(320, 640, 1280, 1280), heads=8, unet_groups=32,
                 vae_channels=(128, 256, 512, 512), vae_groups=32, latent=64, context_dim=768, tokens=77),
    "cpu": dict(unet_channels=(32, 64, 128, 128), heads=4, unet_groups=8,
                vae_channels=(32, 64, 128, 128), vae_groups=8, latent=16, context_dim=768, tokens=77),
    "tiny": dict(unet_channels=(16, 16, 32, 32), heads=2, unet_groups=4,
                 vae_channels=(8, 16, 16, 16), vae_groups=4, latent=8, context_dim=64, tokens=77),
}
IMPLS = ("stock", "patched", "compiled", "patched+compiled")


def build_unet(cfg: dict, dtype: torch.dtype, device: str):
    """A randomly initialised ``UNet2DConditionModel`` with SD-1.5's block structure and cfg's widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=cfg["latent"], in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=cfg["unet_channels"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cfg["context_dim"], attention_head_dim=cfg["heads"],
        norm_num_groups=cfg["unet_groups"])
    if dtype != torch.float32 or device != "cpu":
        unet = unet.to(device=device, dtype=dtype)
    return unet.eval()


def build_vae(cfg: dict, dtype: torch.dtype, device: str):
    """A randomly initialised ``AutoencoderKL`` with SD's block structure and cfg's widths."""
    return sd_vae(cfg["vae_channels"], cfg["vae_groups"], dtype, device)


def _make(impl: str, unet, vae, compile_mode: Optional[str]):
    """(unet, vae decode fn, report) for one configuration; modules are deep copies of the stock ones."""
    u, v = copy.deepcopy(unet), copy.deepcopy(vae)
    counts = {}
    if "patched" in impl:
        counts = {"unet": patch(u).counts, "vae": patch(v).counts}
    decode = v.decode
    if "compiled" in impl:
        kw = {"mode": compile_mode} if compile_mode else {}
        u = torch.compile(u, **kw)
        decode = torch.compile(v.decode, **kw)
    return u, decode, counts


def run(device: str = "cpu", dtype: Optional[torch.dtype] = None, *, quick: bool = False, batch: int = 1,
        impls: Optional[Sequence[str]] = None, compile: Optional[bool] = None, memory: bool = True,
        config: Optional[str] = None, log: Callable[[str], None] = lambda m: None) -> list:
    """Rows, one per configuration: ``unet_ms`` (one guided U-Net step, batch 2 x ``batch``), ``decode_ms``
    (a VAE decode of ``batch`` latents), their p20/p80, first-call seconds (compilation), and with
    ``memory`` the peak bytes of each. ``compile`` defaults to off with ``quick`` and on otherwise; a
    compiled configuration that fails is a row with a note, not an error."""
    device = timing.resolve_device(device)
    name = config or ("tiny" if quick else ("sd15" if device == "cuda" else "cpu"))
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {', '.join(CONFIGS)}, got {name!r}")
    cfg = CONFIGS[name]
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    impls = list(impls or IMPLS)
    for i in impls:
        if i not in IMPLS:
            raise ValueError(f"unknown latent configuration {i!r}; choose from {', '.join(IMPLS)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if compile is None:
        compile = not quick
    unet, vae = build_unet(cfg, dtype, device), build_vae(cfg, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    L = cfg["latent"]
    lat = torch.randn(2 * batch, 4, L, L, generator=gen).to(device=device, dtype=dtype)
    ctx = torch.randn(2 * batch, cfg["tokens"], cfg["context_dim"], generator=gen).to(device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    z = lat[:batch]
    log(f"bench sample latent ({name}): U-Net {tuple(lat.shape)} + context {tuple(ctx.shape)}, VAE decode "
        f"{tuple(z.shape)} -> {8 * L}x{8 * L}, {dtype}, {device}")
    rows = []
    built = {}
    for impl in impls:
        row = {"suite": "sample", "method": "latent", "impl": impl, "config": name, "device": device,
               "dtype": str(dtype).replace("torch.", ""), "latent": [batch, 4, L, L], "image": 8 * L,
               "context": [cfg["tokens"], cfg["context_dim"]], "unet_channels": list(cfg["unet_channels"]),
               "vae_channels": list(cfg["vae_channels"]), "note": ""}
        if "compiled" in impl and not compile:
            row["note"] = "skipped: compile off (--no-compile; --quick turns it off unless --compile)"
            rows.append(row)
            continue
        try:
            u, dec, counts = _make(impl, unet, vae, None)
        except Exception as e:  # noqa: BLE001  (a configuration that cannot be built is a row with a note)
            row["note"] = f"failed: {type(e).__name__}: {e}"[:200]
            rows.append(row)
            continue
        row["fused"] = counts
        built[impl] = (u, dec)
        rows.append(row)

    def unet_fn(u):
        def call(i):
            with torch.inference_mode():
                return u(lat, t, encoder_hidden_states=ctx).sample
        return call

    def decode_fn(dec):
        def call(i):
            with torch.inference_mode():
                return dec(z).sample
        return call

    live = [r for r in rows if r["impl"] in built]
    for what, make in (("unet", unet_fn), ("decode", decode_fn)):
        fns = [make(built[r["impl"]][0 if what == "unet" else 1]) for r in live]
        if device == "cpu":
            res = timing.time_interleaved(fns, 1, quick)
        else:
            res = []
            for f in fns:
                try:
                    res.append(timing.time_calls(f, device, 1, quick))
                except Exception as e:  # noqa: BLE001
                    res.append(e)
        for r, st in zip(live, res):
            if isinstance(st, BaseException):
                r["note"] = (r["note"] + "; " if r["note"] else "") + f"{what} failed: {type(st).__name__}"
                r[f"{what}_ms"] = None
                continue
            r[f"{what}_ms"] = st["median_ms"]
            r[f"{what}_p20_ms"], r[f"{what}_p80_ms"] = st["p20_ms"], st["p80_ms"]
            r[f"{what}_first_call_s"] = st.get("first_call_s")
            log(f"  {r['impl']:<18}{what:<8}{st['median_ms']:10.2f} ms")
    if memory:
        for r in live:
            for what, make in (("unet", unet_fn), ("decode", decode_fn)):
                if r.get(f"{what}_ms") is None:
                    continue
                timing.free(device)
                fn = make(built[r["impl"]][0 if what == "unet" else 1])
                r[f"{what}_peak_bytes"] = timing.step_peak_memory(lambda fn=fn: fn(0), device, 0)["step_mem_bytes"]
    base = {r["impl"]: r for r in rows}
    for r in rows:
        for what in ("unet", "decode"):
            s, m = base.get("stock", {}).get(f"{what}_ms"), r.get(f"{what}_ms")
            r[f"{what}_speedup_vs_stock"] = s / m if s and m else None
            c, m2 = base.get("compiled", {}).get(f"{what}_ms"), r.get(f"{what}_ms")
            r[f"{what}_speedup_vs_compiled"] = c / m2 if c and m2 else None
    return rows


def format_table(rows: list) -> str:
    if not rows:
        return "(no latent rows)"
    r0 = rows[0]
    lines = [f"latent diffusion ({r0['config']}): U-Net {r0['unet_channels']} on 2x{r0['latent']} + context "
             f"{r0['context']}, VAE {r0['vae_channels']} decode -> {r0['image']}x{r0['image']}, {r0['dtype']}, "
             f"{r0['device']}",
             f"  {'impl':<18}{'U-Net step ms':>14}{'vs stock':>9}{'decode ms':>11}{'vs stock':>9}"
             f"{'U-Net peak MiB':>15}{'decode peak MiB':>16}  note"]

    def f(v, spec, scale=1.0, suffix=""):
        width = int(spec.split(".")[0]) + len(suffix)
        return format(v / scale, spec) + suffix if isinstance(v, (int, float)) else "-".rjust(width)
    for r in rows:
        lines.append(f"  {r['impl']:<18}{f(r.get('unet_ms'), '14.2f')}"
                     f"{f(r.get('unet_speedup_vs_stock'), '8.2f', 1, 'x')}"
                     f"{f(r.get('decode_ms'), '11.2f')}{f(r.get('decode_speedup_vs_stock'), '8.2f', 1, 'x')}"
                     f"{f(r.get('unet_peak_bytes'), '15.1f', 2**20)}{f(r.get('decode_peak_bytes'), '16.1f', 2**20)}"
                     f"  {r.get('note') or ''}")
    return "\n".join(lines)


def run_cli(args, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list:
    """The latent case of ``fastdiff bench sample`` from the bench parser's arguments (--device --dtype
    --batch/--sample-batch --quick --compile --impls --memory); returns the rows."""
    a = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    device = timing.resolve_device(a("device", "auto") or "auto")
    dts = a("dtype")
    dtype = timing.parse_dtype(dts[0]) if dts and dts != ["fp32"] else (None if device == "cuda" else torch.float32)
    impls = [i for i in (a("impls") or []) if i in IMPLS] or None
    batch = a("sample_batch") or a("batch") or 1
    return run(device, dtype, quick=bool(a("quick")), batch=batch, impls=impls, compile=a("compile"),
               memory=a("memory", True), log=log)
