"""The ``fastdiff`` command line.

    fastdiff info                       what this installation runs, and where
    fastdiff bench [options]            the operator benchmark table

Each subcommand is a small class-free pair: ``_add_<name>(subparsers)``
declares its options and sets ``func``; ``_cmd_<name>(args)`` runs it and
returns the exit status. New subcommands (train, sample, eval) add one pair
and one line in :data:`SUBCOMMANDS`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence


# ------------------------------------------------------------------ info ----
def _add_info(sub) -> None:
    p = sub.add_parser(
        "info", help="versions, the kernel backend of every operator, CUDA archs, GPU",
        description="Print what this fastdiff installation runs: versions, whether the C++/CUDA extension "
                    "loaded, the backend each operator uses on CPU and GPU, and the GPU if any.")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    import fastdiff

    if args.json:
        print(json.dumps(fastdiff.info(as_dict=True), indent=2, default=str))
    else:
        fastdiff.info()
    return 0


# ----------------------------------------------------------------- bench ----
def _csv(text: str) -> list:
    return [p.strip() for p in text.split(",") if p.strip()]


def _add_bench(sub) -> None:
    from . import bench as B

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
        epilog="examples:\n  fastdiff bench --device cpu\n  fastdiff bench --device cuda --ops ddpm_step,ddim_step "
               "--dtype fp32,bf16 --json out/bench.json\n"
               "  fastdiff bench --ops blocks --device cuda --dtype fp32,bf16 --plot out/blocks.png\n"
               "  fastdiff bench --ops group_norm_act --block-shape 128x256x16x16 --batch 32\n"
               "  fastdiff bench --ops unet_step --batch 64 --dtype bf16   # bf16: torch.autocast\n"
               "  fastdiff bench --quick   # seconds-long smoke run")
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
    p.set_defaults(func=_cmd_bench)


def _header(device: str, malloc_note) -> str:
    import os

    import torch

    from . import bench as B

    if device == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
        where = f"CPU {B._cpu_model()}, {torch.get_num_threads()} threads{load}"
    return (f"fastdiff bench on {where}; torch {torch.__version__}"
            + (f"; {malloc_note}" if malloc_note else "") + "\n")


def _cmd_bench(args) -> int:
    import torch

    from . import bench as B

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


# -------------------------------------------------------------- assembly ----
# name -> function adding the subparser (train / sample / eval join here)
SUBCOMMANDS: dict[str, Callable] = {
    "info": _add_info,
    "bench": _add_bench,
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastdiff", description="fastdiff: fused C++/CUDA/Triton kernels for DDPM/DDIM diffusion models.")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
