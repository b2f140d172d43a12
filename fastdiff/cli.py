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

    ops_help = "; ".join(f"{k}: {v}" for k, v in B.OPS.items())
    p = sub.add_parser(
        "bench", help="time the fused operators against eager PyTorch, diffusers and torch.compile",
        description="Benchmark every fastdiff operator against the usual implementations (eager PyTorch,\n"
                    "diffusers schedulers, torch.compile of the eager code). Reports median/p20/p80 ms per\n"
                    "call, GB/s (inputs read once + outputs written once), % of this device's copy\n"
                    "bandwidth and the speedups. On a GPU each fastdiff backend (CUDA C++, Triton) is\n"
                    "timed separately. Method and results: benchmarks/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fastdiff bench --device cpu\n  fastdiff bench --device cuda --ops ddpm_step,ddim_step "
               "--dtype fp32,bf16 --json out/bench.json\n  fastdiff bench --quick   # seconds-long smoke run")
    p.add_argument("--ops", type=_csv, default=None, metavar="OP[,OP...]",
                   help=f"operators to time (default: all). {ops_help}")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to run: cpu, cuda, or auto (cuda when a GPU is visible; default)")
    p.add_argument("--dtype", type=_csv, default=["fp32"], metavar="DT[,DT...]",
                   help="data type(s): fp32, fp16, bf16, comma-separated (default: fp32)")
    p.add_argument("--shape", action="append", default=None, metavar="NxCxHxW",
                   help="tensor shape, e.g. 128x3x64x64; repeat or comma-separate for several (default: "
                        "128x3x64x64 on CPU; 128x3x64x64, 256x4x128x128, 128x4x256x256 on GPU)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repeats, no torch.compile: a smoke run of a few seconds (CI)")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time the torch.compile baseline (default: on, off with --quick); --no-compile skips it")
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
        shapes = None
        if args.shape:
            shapes = [B.parse_shape(s) for item in args.shape for s in _csv(item)]
        dtypes = [B.parse_dtype(d) for d in args.dtype]
        if args.ops:
            bad = [o for o in args.ops if o not in B.OPS]
            if bad:
                raise ValueError(f"unknown op(s) {', '.join(bad)}; ops are {', '.join(B.OPS)}")
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
    rows = B.run(device, args.ops, dtypes, shapes, args.quick, compile=args.compile, log=log)
    print(_header(device, malloc_note))
    print(B.format_table(rows))
    if args.json:
        meta = B.metadata(device, rows[0]["copy_gbps"] if rows else None, quick=args.quick,
                          malloc=malloc_note or "default", argv=sys.argv[1:])
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
