"""``fastdiff bench``: the whole subcommand, its options and what it runs.

    fastdiff bench [options]            the operator table (fastdiff.bench.run)
    fastdiff bench train|sample         end-to-end training / sampling (fastdiff.bench.e2e)
    fastdiff bench host                 host cost per call, tiny tensors, 1 thread (fastdiff.bench.host)

:func:`add_parser` declares it on the ``fastdiff`` subparsers; the
end-to-end options come from :func:`add_options`, and :func:`run_cli` runs
``bench train`` / ``bench sample`` from parsed arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from fastdiff import bench as B
from fastdiff._args import csv_list as _csv
from fastdiff.bench import _report as report
from fastdiff.bench import _timing as timing
from fastdiff.bench import e2e as E


def add_parser(sub) -> None:
    """Declare ``fastdiff bench`` (and its ``train`` / ``sample`` suites) on
    the ``fastdiff`` subparsers ``sub``."""
    ops_help = "; ".join(f"{k}: {v}" for k, v in B.ALL_OPS.items())
    p = sub.add_parser(
        "bench", help="time the fused operators against eager PyTorch, diffusers and torch.compile",
        description="Benchmark every fastdiff operator against the usual implementations (eager PyTorch,\n"
                    "diffusers schedulers, torch.compile of the eager code, SDPA, stock nn layers). Reports\n"
                    "median/p20/p80 ms per call, GB/s (inputs read once + outputs written once), % of this\n"
                    "device's copy bandwidth and the speedups; TFLOP/s for attention, peak memory for the\n"
                    "U-Net training step. On a GPU each fastdiff backend (CUDA C++, Triton) is timed\n"
                    "separately. Method and results: benchmarks/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fastdiff bench --device cpu\n  fastdiff bench train --dtype bf16 --layout NHWC   # DDPM CIFAR-10 step vs diffusers\n"
               "  fastdiff bench sample --methods ddpm,ddim --json out/sample.json\n  fastdiff bench --device cuda --ops ddpm_step,ddim_step "
               "--dtype fp32,bf16 --json out/bench.json\n"
               "  fastdiff bench --ops blocks --device cuda --dtype fp32,bf16 --plot out/blocks.png\n"
               "  fastdiff bench --ops group_norm_act --block-shape 128x256x16x16 --batch 32\n"
               "  fastdiff bench --ops unet_step --batch 64 --dtype bf16   # bf16: torch.autocast\n"
               "  fastdiff bench --quick   # seconds-long smoke run")
    p.add_argument("suite", nargs="?", choices=("ops", "train", "sample", "vae", "host"), default="ops",
                   help="ops: the fused operators (default); train: the end-to-end DDPM training step, "
                        "sample: DDPM/DDIM sampling, each against diffusers eager / compiled / patched "
                        "(see the end-to-end options below); vae: AutoencoderKL decode, stock vs patched; "
                        "host: the host cost of each call in µs (tiny tensors on the CPU, --threads, default 1) "
                        "next to torch.add, diffusers and eager baselines")
    p.add_argument("--ops", type=_csv, default=None, metavar="OP[,OP...]",
                   help=f"operators to time (default: all), or the families 'elementwise' and 'blocks'. "
                        f"{ops_help}")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to run: cpu, cuda, or auto (cuda when a GPU is visible; default)")
    p.add_argument("--dtype", type=_csv, default=["fp32"], metavar="DT[,DT...]",
                   help="data type(s): fp32, fp16, bf16, comma-separated (default: fp32)")
    p.add_argument("--shape", action="append", default=None, metavar="NxCxHxW",
                   help="tensor shape of the elementwise ops, e.g. 128x3x64x64; repeat or comma-separate for "
                        "several (default: 128x3x64x64 on CPU; 128x3x64x64, 256x4x128x128, 128x4x256x256 on GPU). "
                        "When only block ops are selected and --block-shape is not given, the shapes of the "
                        "block ops")
    p.add_argument("--block-shape", action="append", default=None, metavar="NxCxHxW",
                   help="feature-map shape(s) of group_norm_act (x, 32 groups) and of one-head self-attention "
                        "(B=N, L=H*W, D=C) (default: the DDPM CIFAR-10 U-Net's 128x128x32x32, 128x256x16x16, "
                        "128x256x8x8 on GPU, 8x128x32x32 on CPU; attention also at D=512 and as cross-attention "
                        "to 77 keys)")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="batch of the block ops' default shapes and of the U-Net step (default: 128 on GPU; "
                        "on CPU 8 for group_norm_act, 8/2/2 for the attention cases, 2 for the U-Net step)")
    p.add_argument("--full", action="store_true",
                   help="the larger block sets: group_norm_act also at 128x128x16x16; on CPU the GPU sizes "
                        "(batch 128) for every block op (tens of minutes on a small CPU)")
    p.add_argument("--unet-preset", default=None, metavar="NAME",
                   help="fastdiff.nn.UNet preset of the unet_step case (default: ddpm-cifar10; tiny with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repeats, no torch.compile: a smoke run of a few seconds (CI)")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time the torch.compile baseline (default: on, off with --quick); --no-compile skips it")
    p.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget of torch.compile, per family (elementwise, blocks); the compile rows "
                        "after it are skipped with a note (default: 120/45 s on CPU, 150/240 s on GPU)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the rows and the metadata (hardware, versions, commit, copy bandwidth) "
                        "as JSON to FILE")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw a bar chart of the speedups (needs matplotlib; skipped with a note otherwise)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the C++ kernels (default: torch's choice)")
    p.add_argument("--malloc-reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: make glibc malloc keep freed memory for reuse, as jemalloc/tcmalloc setups do "
                        "(default: on). Without it, whether a fresh multi-MB output costs page faults depends on "
                        "the heap layout of the process, and the timings of the allocation-heavy baselines "
                        "swing by up to 3x between runs. Recorded in the JSON metadata")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr, only the table")
    add_options(p)
    p.set_defaults(func=_cmd_bench)


def _header(device: str, malloc_note) -> str:
    if device == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
        where = f"CPU {B.cpu_model()}, {torch.get_num_threads()} threads{load}"
    return (f"fastdiff bench on {where}; torch {torch.__version__}"
            + (f"; {malloc_note}" if malloc_note else "") + "\n")


def _cmd_bench(args) -> int:
    if args.suite == "vae":  # fastdiff.bench.vae: AutoencoderKL decode, stock vs fastdiff.nn.patch
        from .vae import run_cli as vae_cli
        return vae_cli(args)
    if args.suite == "host":
        return _cmd_host(args)
    if args.suite != "ops":
        return run_cli(args.suite, args)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = B.resolve_device(args.device)
        shapes = block_shapes = None
        if args.shape:
            shapes = [B.parse_shape(s) for item in args.shape for s in _csv(item)]
        if args.block_shape:
            block_shapes = [B.parse_shape(s) for item in args.block_shape for s in _csv(item)]
        dtypes = [B.parse_dtype(d) for d in args.dtype]
        ops = B.expand_ops(args.ops)
        if shapes and block_shapes is None and not any(o in B.OPS for o in ops):
            block_shapes = shapes  # only block ops: --shape is theirs
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
    except (ValueError, RuntimeError) as e:
        print(f"fastdiff bench: error: {e}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    malloc_note = None
    if args.malloc_reuse and device == "cpu":
        malloc_note = B.keep_freed_memory()
        log(malloc_note)
    rows = B.run(device, ops, dtypes, shapes, args.quick, compile=args.compile, log=log, full=args.full,
                 block_shapes=block_shapes, batch=args.batch, compile_budget_s=args.compile_budget,
                 unet_preset=args.unet_preset)
    print(_header(device, malloc_note))
    print(B.format_table(rows))
    if args.json:
        meta = B.metadata(device, next((r["copy_gbps"] for r in rows if r.get("copy_gbps")), None),
                          quick=args.quick, full=args.full, malloc=malloc_note or "default", argv=sys.argv[1:])
        with open(args.json, "w") as f:
            json.dump(B.to_json(rows, meta), f, indent=1, default=str)
        log(f"results written to {args.json}")
    if args.plot:
        print(B.plot(rows, args.plot), file=sys.stderr)
    return 0


def _cmd_host(args) -> int:
    """``fastdiff bench host``: the host-cost rows (fastdiff.bench.host), --shape (one), --threads (default 1),
    --quick, --json."""
    from .host import format_host_table, run_host

    try:
        shape = B.parse_shape(args.shape[0]) if args.shape else None
    except ValueError as e:
        print(f"fastdiff bench host: error: {e}", file=sys.stderr)
        return 2
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    kw = {"shape": shape} if shape else {}
    rows = run_host(quick=args.quick, threads=args.threads or 1, log=log, **kw)
    print(f"fastdiff bench host on CPU {B.cpu_model()}; torch {torch.__version__}\n")
    print(format_host_table(rows))
    if args.json:
        meta = B.metadata("cpu", None, suite="host", quick=args.quick, argv=sys.argv[1:])
        with open(args.json, "w") as f:
            json.dump(B.to_json(rows, meta), f, indent=1, default=str)
        log(f"results written to {args.json}")
    return 0


# ---------------------------------------------- bench train / bench sample ----
def add_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fastdiff bench train`` / ``fastdiff bench sample``
    that the ``bench`` parser lacks (it has --device --dtype --batch --quick
    --compile --compile-budget --json --plot --threads --quiet --unet-preset):
    --layout, --methods, --impls, --sample-batch, --ddpm-steps, --ddim-steps,
    --reps, --no-breakdown, --no-memory, --profile."""
    g = parser.add_argument_group("end-to-end (bench train / bench sample)")
    g.add_argument("--layout", type=_csv, default=["NCHW"], metavar="L[,L...]",
                   help="memory layout(s): NCHW, NHWC (channels_last weights and inputs); default NCHW")
    g.add_argument("--methods", type=_csv, default=list(E.METHODS), metavar="M[,M...]",
                   help="samplers of `bench sample`: ddpm, ddim (default both); latent: the SD-1.5-shaped "
                        "latent-diffusion case (U-Net step + VAE decode: stock, patched, compiled, "
                        "patched+compiled; fastdiff.bench.latent)")
    g.add_argument("--impls", type=_csv, default=None, metavar="I[,I...]",
                   help="configurations to time (default all): " + "; ".join(f"{k}: {v}" for k, v in E.IMPLS.items()))
    g.add_argument("--sample-batch", type=int, default=None, metavar="N",
                   help="images per sampling run (default 256 on GPU, 32 on CPU, 4 with --quick); "
                        "for `bench sample`, --batch means the same")
    g.add_argument("--ddpm-steps", type=int, default=None, metavar="S",
                   help="DDPM sampling steps (default 1000 on GPU, 100 on CPU, 10 with --quick)")
    g.add_argument("--ddim-steps", type=int, default=None, metavar="S",
                   help="DDIM sampling steps (default 50 on GPU, 20 on CPU, 5 with --quick)")
    g.add_argument("--reps", type=int, default=None, metavar="N",
                   help="timed sampling runs per configuration (default 3, 2 with --quick)")
    g.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="time the model alone for the model/non-model breakdown (default on)")
    g.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the peak memory of each configuration (default on)")
    g.add_argument("--ema", nargs="?", const="ddpm-cifar10", default=None, metavar="PRESET",
                   help="bench train: also time one EMA update of PRESET's parameters (default ddpm-cifar10), "
                        "fastdiff's EMA vs diffusers' EMAModel(foreach=False / True)")
    g.add_argument("--profile", metavar="DIR", default=None,
                   help="torch.profiler each configuration (2 training steps / a 3-step sampling run): Chrome "
                        "traces in DIR, the top ops in the JSON rows")


def run_cli(suite: str, args: argparse.Namespace) -> int:
    """Run ``fastdiff bench train`` (``suite="train"``) or ``fastdiff bench
    sample`` (``suite="sample"``) from parsed arguments: the bench parser's
    --device --dtype --batch --quick --compile --compile-budget --json --plot
    --threads --quiet --unet-preset --malloc-reuse, plus those of
    :func:`add_options` (missing attributes take their defaults). Prints the
    table on stdout, progress on stderr; writes the JSON
    (``{"meta": metadata(...), "rows": [...]}``) and the chart when asked.
    Returns the exit status (2 for bad arguments)."""
    a = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if a("threads"):
        torch.set_num_threads(a("threads"))
    try:
        if suite not in E.SUITES:
            raise ValueError(f"suite must be one of {', '.join(E.SUITES)}, got {suite!r}")
        device = timing.resolve_device(a("device", "auto"))
        dtypes = a("dtype") or ["fp32"]
        dtypes = [dtypes] if isinstance(dtypes, str) else dtypes
        batch = a("batch")
        if suite == "sample" and a("sample_batch") is not None:
            batch = a("sample_batch")
        log = (lambda msg: None) if a("quiet") else (lambda msg: print(msg, file=sys.stderr, flush=True))
        malloc_note = None
        if device == "cpu" and a("malloc_reuse", True):
            malloc_note = timing.keep_freed_memory()
        methods = list(a("methods") or E.METHODS)
        latent_rows = None
        if suite == "sample" and "latent" in methods:  # fastdiff.bench.latent: SD-shaped latent diffusion
            from .latent import format_table as latent_table, run_cli as latent_cli
            methods = [m for m in methods if m != "latent"]
            latent_rows = latent_cli(args, log)
        rows = [] if not methods else E.run(
                   suite, device, preset=a("unet_preset"), batch=batch, dtypes=dtypes,
                   layouts=[x.upper() for x in (a("layout") or ["NCHW"])], methods=methods,
                   ddpm_steps=a("ddpm_steps"), ddim_steps=a("ddim_steps"), impls=a("impls"), quick=bool(a("quick")),
                   compile=a("compile"), compile_budget_s=a("compile_budget"), reps=a("reps"),
                   breakdown=a("breakdown", True), memory=a("memory", True), profile_dir=a("profile"), log=log)
    except (ValueError, RuntimeError) as e:
        print(f"fastdiff bench {suite}: error: {e}", file=sys.stderr)
        return 2
    where = f"GPU {torch.cuda.get_device_name()}" if device == "cuda" else \
        f"CPU {report.cpu_model()}, {torch.get_num_threads()} threads"
    print(f"fastdiff bench {suite} on {where}; torch {torch.__version__}\n")
    if rows:
        print(E.format_table(rows))
    e2e_rows = rows
    if latent_rows is not None:
        print(latent_table(latent_rows))
        rows = rows + latent_rows
    ema = None
    if suite == "train" and a("ema"):
        ema = E.ema_update_timing(a("ema"), device)
        med = ", ".join(f"{k} {v:.2f} ms" for k, v in ema["median_ms"].items())
        print(f"\nEMA update, {ema['preset']} ({ema['params']:,} params) on {device}: {med}; fastdiff is "
              f"{ema['speedup_vs_foreach_false']:.2f}x EMAModel(foreach=False), "
              f"{ema['speedup_vs_foreach_true']:.2f}x EMAModel(foreach=True)")
    if a("json"):
        meta = E.metadata(device, suite=suite, quick=bool(a("quick")), malloc=malloc_note or "default",
                        argv=sys.argv[1:], **({"ema_update": ema} if ema else {}))
        E.write_json(a("json"), rows, meta)
        log(f"results written to {a('json')}")
    if a("plot") and e2e_rows:
        print(E.plot(e2e_rows, a("plot")), file=sys.stderr)
    return 0
