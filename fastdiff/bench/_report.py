"""Reports of the benchmark suites: the catalog of operator names, the
speedup columns, the text table, the JSON document with its metadata
(hardware, versions, commit) and the bar chart."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from typing import Optional, Sequence

import torch

import fastdiff
from fastdiff.ops import _backend

# op key -> what it times
OPS = {
    "q_sample_rng": "q_sample with the noise drawn (fastdiff: in the kernel; baselines: randn + formula)",
    "q_sample": "q_sample with the noise given",
    "diffusion_loss": "epsilon-target MSE loss, forward + backward (fastdiff: noise from the key, stored gradient "
                      "or recomputed, or a stored noise tensor; baselines: F.mse_loss on the stored noise)",
    "train_chain": "the training-side elementwise chain, forward + backward: fastdiff q_sample(key, "
                   "return_noise=False) + diffusion_loss(key) vs randn + add_noise (diffusers) / formula (eager) "
                   "+ F.mse_loss",
    "ddpm_step": "DDPM ancestral step with noise (fixed_small variance)",
    "ddim_step": "DDIM step, eta = 0 (50-step respaced chain)",
    "guided_step": "DDPM step with classifier-free guidance (w = 7.5): the guided fused step (reads both "
                   "predictions) vs the unguided fused step (variant unguided; target: guided <= 1.2x) and "
                   "diffusers' way (a torch combine, then DDPMScheduler.step)",
    "multistep_step": "DPM-Solver++(2M) step (midpoint, epsilon model, one history slot): fastdiff.multistep_step "
                      "vs the same update in eager PyTorch",
    "sampler_loop": "a whole 10-step sampling loop of the scheduler alone on a fixed model output "
                    "(set_timesteps, scale_model_input, step): fused schedulers vs diffusers' (DPM-Solver++ 2M, "
                    "UniPC bh2, Euler)",
}
# the U-Net block operators, timed by fastdiff.bench.blocks
BLOCK_OPS = {
    "group_norm_act": "GroupNorm+SiLU (plain, + time-embedding add, + scale/shift): forward, backward, both; "
                      "NCHW and channels_last",
    "attention": "attention core softmax(q k^T/sqrt(D)) v: forward, forward + backward (U-Net self-attention, "
                 "1 head; cross-attention to 77 keys)",
    "unet_step": "DDPM CIFAR-10 U-Net training step (forward + backward + Adam): time and peak memory, "
                 "fused modules vs stock PyTorch layers",
}
ALL_OPS = {**OPS, **BLOCK_OPS}
# what `fastdiff bench` (no --ops) runs
DEFAULT_OPS = tuple(ALL_OPS)
# --ops accepts these names for a whole family
FAMILIES = {"elementwise": tuple(OPS), "blocks": tuple(BLOCK_OPS)}
# speedup_vs_<baseline> of the fastdiff rows; sdpa: F.scaled_dot_product_attention (attention),
# stock: the U-Net built from stock PyTorch layers (unet_step)
BASELINES = ("diffusers", "eager", "compile", "sdpa", "stock")


def expand_ops(names: Optional[Sequence[str]]) -> list:
    """Op keys (or family names: elementwise, blocks) -> op keys, in order,
    without duplicates; None or empty -> :data:`DEFAULT_OPS`. Unknown names raise ValueError."""
    if not names:
        return list(DEFAULT_OPS)
    out = []
    for n in names:
        for o in FAMILIES.get(n, (n,)):
            if o not in ALL_OPS:
                raise ValueError(f"unknown op {o!r}; ops are {', '.join(ALL_OPS)} (families: "
                                 f"{', '.join(FAMILIES)})")
            if o not in out:
                out.append(o)
    return out



def add_speedups(rows: list) -> list:
    """speedup_vs_<baseline> = baseline median / this row's median, for
    every fastdiff row, against the baseline row of the same op/shape/dtype
    and the same variant (block ops: layout, mode, ...) or, failing that,
    the baseline row without a variant (the elementwise baselines)."""
    index = {(r["op"], r["shape"], r["dtype"], r["impl"], r.get("variant") or ""): r for r in rows
             if not r["impl"].startswith("fastdiff")}
    for r in rows:
        for b in BASELINES:
            r[f"speedup_vs_{b}"] = None
        if not r["impl"].startswith("fastdiff") or not r["median_ms"]:
            continue
        for b in BASELINES:
            key = (r["op"], r["shape"], r["dtype"], b)
            base = index.get(key + (r.get("variant") or "",)) or index.get(key + ("",))
            if base is not None and base["median_ms"]:
                r[f"speedup_vs_{b}"] = base["median_ms"] / r["median_ms"]
    return rows



def impl_label(r) -> str:
    """'impl [variant]' of a row (dict) or of a :class:`~fastdiff.bench._timing.Case`."""
    impl = r["impl"] if isinstance(r, dict) else r.impl
    var = r.get("variant") if isinstance(r, dict) else r.variant
    return f"{impl} [{var}]" if var else impl


# ------------------------------------------------------------- reports ------
def _sections(rows: list) -> list:
    """[(block op or None, rows)] in order of first appearance: the
    elementwise ops together (None), then one section per block op."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["op"] if r["op"] in BLOCK_OPS else None, []).append(r)
    return list(out.items())


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


# optional columns: (header, shown when any row has this key set, cell)
_EXTRA_COLS = [
    ("GB/s", "bytes", lambda r: _fmt(r.get("gbps"), ".1f")),
    ("% copy", "bytes", lambda r: _fmt(r.get("pct_copy_bw"), ".0f") + ("%" if r.get("pct_copy_bw") is not None
                                                                        else "")),
    ("TFLOP/s", "flops", lambda r: _fmt(r.get("tflops"), ".3g")),
    ("peak MiB", "peak_mem_bytes", lambda r: _fmt(r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None
                                                  else None, ".0f")),
    ("step MiB", "step_mem_bytes", lambda r: _fmt(r["step_mem_bytes"] / 2**20 if r.get("step_mem_bytes") is not None
                                                  else None, ".0f")),
    ("mem vs stock", "peak_mem_bytes", lambda r: "" if r.get("peak_mem_ratio_vs_stock") is None
     else f"{r['peak_mem_ratio_vs_stock']:.2f}"),
    ("step vs stock", "step_mem_bytes", lambda r: "" if r.get("step_mem_ratio_vs_stock") is None
     else f"{r['step_mem_ratio_vs_stock']:.2f}"),
]


def _section_table(rows: list, block: bool) -> tuple:
    """(lines, notes) of one section: only the columns its rows fill, and a
    'vs <baseline>' column for each baseline timed in it."""
    extra = [c for c in _EXTRA_COLS if any(r.get(c[1]) for r in rows)]
    bases = [b for b in BASELINES if any(r["impl"] == b for r in rows)]
    head = ["op", "shape", "dtype", "impl", "median ms", "p20 ms", "p80 ms"] + [c[0] for c in extra] + \
        [f"vs {b}" for b in bases]
    body, notes, merged = [], [], {}
    for r in rows:
        if r["median_ms"] is None:
            body.append([r["op"], r["shape"], r["dtype"], impl_label(r), "-", "-", "-"] + ["-"] * len(extra)
                        + [""] * len(bases))
            if not block:
                notes.append(f"{r['op']} {r['shape']} {r['dtype']} {impl_label(r)}: {r['note'] or 'not run'}")
        else:
            body.append([r["op"], r["shape"], r["dtype"], impl_label(r), _fmt(r["median_ms"], ".3f"),
                         _fmt(r["p20_ms"], ".3f"), _fmt(r["p80_ms"], ".3f")] + [c[2](r) for c in extra]
                        + [("" if r.get(f"speedup_vs_{b}") is None else f"{r[f'speedup_vs_{b}']:.2f}x")
                           for b in bases])
        note = r.get("note") or ("not run" if r["median_ms"] is None else "")
        if block and note and not note.startswith("first call"):
            # block sections have many cases: one line per (impl, note), with its count
            note = note.split("; first call")[0]
            merged.setdefault(note, []).append(r)
    for note, rs in merged.items():
        impls = ", ".join(dict.fromkeys(r["impl"] for r in rs))
        where = f"{rs[0]['shape']} {rs[0]['dtype']}" + (f" [{rs[0]['variant']}]" if rs[0].get("variant") else "") \
            if len(rs) == 1 else f"{len(rs)} rows"
        notes.append(f"{rows[0]['op']} {impls} ({where}): {note}")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    right = set(range(4, len(head)))

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body):
        key = (r["op"], r["shape"], r["dtype"]) + ((r.get("variant"),) if block else ())
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(cells))
    return out, notes


def format_table(rows: list) -> str:
    """An aligned text table: op, shape, dtype, impl, median/p20/p80 ms,
    GB/s, % of the copy bandwidth and the fastdiff speedups ('x' = baseline
    time / fastdiff time); notes for skipped cases follow. The block ops
    get a section each, with the columns they fill (TFLOP/s for attention,
    peak memory for the U-Net step)."""
    out, notes = [], []
    for block, sec in _sections(rows):
        if block is not None:
            if out:
                out.append("")
            out.append(f"== {block}: {BLOCK_OPS[block]}")
        lines, n = _section_table(sec, block is not None)
        out += lines
        notes += n
    cbw = next((r.get("copy_gbps") for r in rows if r.get("copy_gbps")), None)
    if cbw:
        out.append("")
        out.append(f"copy bandwidth (dst.copy_(src), read + write): {cbw:.1f} GB/s; "
                   "bytes = inputs read once + outputs written once")
    if notes:
        out.append("notes:")
        out.extend(f"  {n}" for n in notes)
    return "\n".join(out)


def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.lower().startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> Optional[dict]:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    d = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
         "memory_gib": round(p.total_memory / 2**30, 1), "l2_mib": round(_cache_bytes("cuda") / 2**20, 1),
         "driver": None}
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if res.returncode == 0:
            d["driver"] = res.stdout.strip().splitlines()[0]
    except Exception:
        pass
    return d


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", None)
    except Exception:
        return None


def metadata(device: str, copy_gbps: Optional[float] = None, **extra) -> dict:
    """The context a result needs to be read later: hardware, versions,
    commit, date, copy bandwidth."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "gpu": _gpu_info() if device == "cuda" else None,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "fastdiff": fastdiff.__version__,
        "fastdiff_extension": _backend.status()["extension"],
        "git_commit": _git_commit(),
        "copy_gbps": copy_gbps,
        "timing": ("CUDA events per call, queue kept full, one case after the other" if device == "cuda" else
                   "time.perf_counter per call, the implementations of a case interleaved in ~20 ms rounds")
        + "; median/p20/p80 of the per-call times after warm-up; inputs rotated over several sets",
        **extra,
    }


def to_json(rows: list, meta: dict) -> dict:
    return {"meta": meta, "rows": rows}


def plot(rows: list, path: str) -> str:
    """A bar chart of the fastdiff speedups (one group per op/shape/dtype,
    and per variant for the block ops; one bar per fastdiff impl x
    baseline; for the U-Net step also stock/fastdiff peak memory), one
    panel per section of :func:`format_table`. Returns a message; needs
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib is not importable ({type(e).__name__})"
    panels = [(block, [r for r in sec if r["impl"].startswith("fastdiff") and r["median_ms"]])
              for block, sec in _sections(rows)]
    panels = [(b, sec) for b, sec in panels if sec]
    if not panels:
        return "plot skipped: no fastdiff rows were timed"
    sizes = []
    for block, sec in panels:
        vals: dict = {}  # (group, series) -> value
        groups, series = [], []
        for r in sec:
            g = f"{r['shape']} {r['dtype']}\n{r.get('variant') or ''}" if block else \
                f"{r['op']}\n{r['shape']} {r['dtype']}"
            label = r["impl"] if block else impl_label(r)
            pairs = [(f"{label} vs {b}", r.get(f"speedup_vs_{b}")) for b in BASELINES]
            if r.get("peak_mem_ratio_vs_stock"):
                pairs.append((f"{label}: stock / fastdiff peak memory", 1.0 / r["peak_mem_ratio_vs_stock"]))
            for name, v in pairs:
                if v:
                    groups += [g] if g not in groups else []
                    series += [name] if name not in series else []
                    vals[(g, name)] = v
        sizes.append((groups, series, vals))
    # the elementwise panel keeps its old width; block panels (many variants) get room for their bars
    width = max(8.0, min(40.0, max(1.6 * len(g) if b is None else 0.35 * len(g) * max(len(s), 1) + 2
                                   for (b, _), (g, s, _) in zip(panels, sizes))))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 5 * len(panels)), squeeze=False)
    for ax, (block, _), (groups, series, vals) in zip(axes[:, 0], panels, sizes):
        w = 0.8 / max(len(series), 1)
        for k, name in enumerate(series):
            v = [vals.get((g, name), 0.0) for g in groups]
            bars = ax.bar([i + k * w for i in range(len(groups))], [x or float("nan") for x in v], w, label=name)
            for bar, x in zip(bars, v):
                if x:
                    ax.annotate(f"{x:.2g}x", (bar.get_x() + bar.get_width() / 2, x), ha="center", va="bottom",
                                fontsize=6)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=8 if len(groups) <= 12 else 6, rotation=0 if len(groups) <= 12 else 90)
        ax.set_ylabel("speedup (baseline time / fastdiff time)")
        what = f"{block}: " if block else ("elementwise ops: " if len(panels) > 1 else "")
        ax.set_title(f"{what}fastdiff speedups on {rows[0]['device']}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
