"""The ``fastdiff`` command line.

    fastdiff info                       what this installation runs, and where
    fastdiff bench [options]            the operator benchmark table
    fastdiff bench train|sample         end-to-end training / sampling throughput
    fastdiff train --dataset digits     train a DDPM (checkpoints, sample grids, loss curve)
    fastdiff sample --checkpoint DIR    sample from a trained model (PNG grid or .npz)
    fastdiff eval --checkpoint DIR      bits/dim (the variational bound) on a dataset

Each subcommand is a small class-free pair: ``_add_<name>(subparsers)``
declares its options and sets ``func``; ``_cmd_<name>(args)`` runs it and
returns the exit status. A new subcommand adds one pair and one line in
:data:`SUBCOMMANDS`. Errors in the user's input print one line naming the
option and exit with status 2.
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
def _add_bench(sub) -> None:
    from .bench.cli import add_parser

    add_parser(sub)


# ----------------------------------------------------------------- train ----
_DEFAULT_PRESET = {"swissroll": "mlp", "digits": "digits-16", "folder": "ddpm-cifar10", "cifar10": "ddpm-cifar10"}


def _add_device(p) -> None:
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to run: cpu, cuda, or auto (cuda when a GPU is visible; default)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the C++ kernels (default: torch's choice)")


def _add_train(sub) -> None:
    from .nn.unet import PRESETS

    p = sub.add_parser(
        "train", help="train a DDPM on a built-in dataset, an image folder or CIFAR-10",
        description="Train a denoiser with the fused DDPM loss (q_sample + weighted MSE in one kernel each),\n"
                    "AdamW with warmup, global-norm gradient clipping and an EMA of the weights. Writes to\n"
                    "--out: checkpoint/ (safetensors weights + optimizer/RNG state, written atomically),\n"
                    "samples_*.png (a grid of EMA samples, or a scatter over the data for 2-D data),\n"
                    "loss.png, log.csv and log.json. Under torchrun it trains data-parallel (DDP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fastdiff train --dataset digits --steps 3000 --out runs/digits\n"
               "  fastdiff train --dataset swissroll --steps 4000 --batch 256 --out runs/roll\n"
               "  fastdiff train --dataset cifar10 --data-root ~/data/cifar-10-batches-py --preset ddpm-cifar10 \\\n"
               "      --batch 128 --precision bf16 --channels-last --out runs/cifar\n"
               "  fastdiff train --out runs/digits --resume          # continue from runs/digits/checkpoint\n"
               "  torchrun --nproc_per_node 8 -m fastdiff train --dataset cifar10 ...   # multi-GPU")
    p.add_argument("--dataset", choices=("swissroll", "digits", "folder", "cifar10"), default="digits",
                   help="swissroll: the 2-D roll of Sohl-Dickstein et al. 2015; digits: scikit-learn's bundled "
                        "8x8 handwritten digits upsampled to --image-size; folder: every image under --data-root; "
                        "cifar10: the python-pickle directory cifar-10-batches-py at --data-root (default: digits)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="directory of the folder/cifar10 datasets")
    p.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="image side length (digits: 16 or 32, default 16; folder: default 32)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"the model: a fastdiff.nn.UNet preset ({', '.join(PRESETS)}) or 'mlp' (MLPDenoiser, for "
                        f"2-D data). Default per dataset: {_DEFAULT_PRESET}; digits at --image-size 32 uses "
                        f"digits-32")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    p.add_argument("--batch", type=int, default=64, help="batch size per process (under torchrun the global batch is this times the number of "
                        "processes; default 64)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate (default: 2e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warmup steps (default: 100)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping; default 1.0)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the weights (default: 0.999)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32, or bf16/fp16 autocast (fp16 with a GradScaler); default fp32")
    p.add_argument("--channels-last", action="store_true", help="keep images and the model channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--schedule", choices=("linear", "cosine", "scaled_linear", "sigmoid"), default="linear",
                   help="beta schedule (default: linear, as in DDPM)")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T (default: 1000)")
    p.add_argument("--target", choices=("epsilon", "sample", "v_prediction"), default="epsilon",
                   help="what the model predicts (default: epsilon)")
    p.add_argument("--weighting", choices=("uniform", "min_snr"), default="uniform",
                   help="loss weighting over timesteps (default: uniform = L_simple)")
    p.add_argument("--out", default="runs/default", metavar="DIR", help="output directory (default: runs/default)")
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint (the same losses as an uninterrupted run)")
    p.add_argument("--log-every", type=int, default=50, help="log the loss every N steps (default: 50)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write a checkpoint every N steps (0: only at the end; default 500)")
    p.add_argument("--sample-every", type=int, default=0,
                   help="write a sample grid every N steps (default: 0 = only at the end)")
    p.add_argument("--num-samples", type=int, default=64, help="samples in each grid (0: no sampling; default 64)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="sampling steps for the grids (default: all T with ddpm)")
    p.add_argument("--sample-method", choices=("ddpm", "ddim"), default="ddpm",
                   help="sampler for the grids (default: ddpm)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, noise, init; default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=_cmd_train)


def _setup_device(args) -> str:
    """Apply --threads and resolve --device (auto: cuda when a GPU is visible)."""
    from ._args import setup_device

    return setup_device(args.device, args.threads)


def _build_model(preset: str, dataset, dataset_name: str):
    from .data import sample_shape
    from .nn import MLPDenoiser, UNet
    from .nn.unet import PRESETS

    shape = tuple(sample_shape(dataset))
    if preset == "mlp":
        if len(shape) != 1:
            raise ValueError(f"--preset mlp is for vector data; --dataset {dataset_name} has samples of shape {shape}")
        return MLPDenoiser(dim=shape[0], hidden=128, layers=3)
    if preset not in PRESETS:
        raise ValueError(f"--preset must be 'mlp' or one of {sorted(PRESETS)}, got {preset!r}")
    if len(shape) != 3:
        raise ValueError(f"--preset {preset} is an image U-Net; --dataset {dataset_name} has samples of shape {shape}")
    cfg = PRESETS[preset]
    if shape[0] != cfg["in_ch"] or shape[1:] != (cfg["image_size"], cfg["image_size"]):
        raise ValueError(f"--preset {preset} expects {cfg['in_ch']}x{cfg['image_size']}x{cfg['image_size']} images; "
                         f"--dataset {dataset_name} gives {'x'.join(map(str, shape))} (set --image-size or --preset)")
    return UNet.from_preset(preset)


def _cmd_train(args) -> int:
    import torch

    from ._extras import MissingExtra, require

    try:
        require("train", "fastdiff train")
    except MissingExtra as e:
        print(f"fastdiff train: error: {e}", file=sys.stderr)
        return 2
    from .data import load_dataset, sample_shape
    from .diffusion import GaussianDiffusion
    from .schedule import NoiseSchedule
    from .train import TrainConfig, Trainer

    try:
        device = _setup_device(args)
        for name in ("steps", "batch", "timesteps", "log_every"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        for name in ("num_samples", "checkpoint_every", "sample_every"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
        size = args.image_size
        if args.dataset == "digits" and size is None:
            size = 32 if args.preset == "digits-32" else 16
        if args.dataset in ("folder", "cifar10") and args.data_root is None:
            raise ValueError(f"--dataset {args.dataset} needs --data-root")
        dataset = load_dataset(args.dataset, root=args.data_root, image_size=size, seed=args.seed)
        preset = args.preset or ("digits-32" if args.dataset == "digits" and size == 32
                                 else _DEFAULT_PRESET[args.dataset])
        torch.manual_seed(args.seed)
        model = _build_model(preset, dataset, args.dataset)
        schedule = NoiseSchedule.make(args.schedule, args.timesteps)
        image = len(sample_shape(dataset)) == 3
        diffusion = GaussianDiffusion(model, schedule, sample_shape=tuple(sample_shape(dataset)), target=args.target,
                                      weighting=args.weighting, clip_sample=image).to(device)
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup, grad_clip=args.grad_clip, ema_decay=args.ema_decay, precision=args.precision,
            channels_last=args.channels_last, compile=args.compile, seed=args.seed, out_dir=args.out,
            log_every=args.log_every, checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
            num_samples=args.num_samples, sample_steps=args.sample_steps, sample_method=args.sample_method,
            progress=not args.no_progress, device=device)
        trainer = Trainer(diffusion, dataset, config, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdiff train: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    if trainer.rank == 0:
        summary.pop("history", None)
        print(json.dumps(summary, indent=1, default=str))
    return 0


# ---------------------------------------------------------------- sample ----
def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="draw samples from a trained checkpoint (PNG grid or .npz)",
        description="Load a checkpoint written by `fastdiff train` (the EMA weights by default) and sample\n"
                    "with a fused sampler step (DDPM, DDIM, DPM-Solver++, UniPC, Euler, Euler ancestral).\n"
                    "Images are written as a PNG grid (values mapped from\n"
                    "[-1, 1] to 0..255) or, with an .npz path, as a uint8 array 'images' (N, H, W, C); 2-D data\n"
                    "as a scatter plot (.png) or a float array 'samples' (.npz).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fastdiff sample --checkpoint runs/digits/checkpoint --n 64 --out samples.png\n"
               "  fastdiff sample --checkpoint runs/digits/checkpoint --method ddim --steps 50 --out s.npz\n"
               "  fastdiff sample --checkpoint runs/digits/checkpoint --method dpmsolver++ --order 2 --steps 20")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory (or the run directory that contains checkpoint/)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--batch", type=int, default=None, help="samples per model call (default: all n at once)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: T for ddpm, 50 for ddim, 20 for the multistep samplers)")
    p.add_argument("--method", choices=("ddpm", "ddim", "dpmsolver++", "unipc", "euler", "euler_ancestral"),
                   default="ddpm", help="sampler (default: ddpm)")
    p.add_argument("--order", type=int, default=None, choices=(1, 2, 3),
                   help="solver order of dpmsolver++ / unipc (default: 2)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic; default 0)")
    p.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default="leading",
                   help="timestep spacing of a respaced chain (default: leading)")
    p.add_argument("--out", default="samples.png", metavar="FILE",
                   help="output .png (grid / scatter) or .npz (arrays); default samples.png")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the sampling step as a CUDA graph (default: on, on a GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=_cmd_sample)


def save_samples(x, path: str) -> None:
    """Write samples: images (N, C, H, W) in [-1, 1] as a PNG grid or an .npz
    of uint8 'images' (N, H, W, C); vectors (N, D) as a scatter of the first
    two coordinates (.png) or an .npz of float32 'samples'."""
    import numpy as np
    import torch

    from .train.images import save_image_grid, save_scatter

    if path.endswith(".npz"):
        if x.dim() == 4:
            img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(dtype=torch.uint8).permute(0, 2, 3, 1)
            np.savez_compressed(path, images=img.numpy())
        else:
            np.savez_compressed(path, samples=x.float().numpy())
    elif x.dim() == 4:
        save_image_grid(x, path)
    elif x.dim() == 2 and x.shape[1] >= 2:
        save_scatter(x, None, path, f"{x.shape[0]} samples")
    else:
        raise ValueError(f"cannot draw samples of shape {tuple(x.shape[1:])} as a PNG; use an .npz --out")


def _cmd_sample(args) -> int:
    import os

    import torch

    from .train import build_from_checkpoint

    try:
        device = _setup_device(args)
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        if not args.out.endswith((".png", ".npz")):
            raise ValueError(f"--out must end in .png or .npz, got {args.out!r}")
        diffusion = build_from_checkpoint(args.checkpoint, ema=not args.no_ema, device=device)
        steps = args.steps if args.steps is not None else \
            {"ddpm": None, "ddim": 50}.get(args.method, 20)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        batch = args.batch or args.n
        parts = []
        for start in range(0, args.n, batch):
            parts.append(diffusion.sample(min(batch, args.n - start), steps=steps, method=args.method, eta=args.eta,
                                          order=args.order, spacing=args.spacing, generator=gen,
                                          cuda_graph=args.cuda_graph,
                                          compile_model=args.compile, progress=not args.no_progress).cpu())
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdiff sample: error: {e}", file=sys.stderr)
        return 2
    x = torch.cat(parts)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_samples(x, args.out)
    print(f"{x.shape[0]} samples written to {args.out}")
    return 0


# ------------------------------------------------------------------ eval ----
def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="bits/dim (the DDPM variational bound) of a checkpoint on a dataset",
        description="The negative log-likelihood bound in bits per dimension, as the DDPM paper reports it:\n"
                    "the prior term KL(q(x_T|x0) || N(0, I)), the T-1 KL terms and the discretised Gaussian\n"
                    "decoder -log p(x0|x1) for 8-bit data scaled to [-1, 1]. It costs T model evaluations per\n"
                    "image; the mean and its standard error over --n images are printed with the breakdown.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  fastdiff eval --checkpoint runs/digits --dataset digits --n 256")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint directory (or its run directory)")
    p.add_argument("--dataset", choices=("digits", "folder", "cifar10"), default="digits",
                   help="the evaluation data (image datasets; default: digits)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="directory of the folder/cifar10 datasets")
    p.add_argument("--image-size", type=int, default=None, help="image side length (default: the model's)")
    p.add_argument("--n", type=int, default=128, help="number of images to evaluate (default: 128)")
    p.add_argument("--batch", type=int, default=32, help="images per model call (default: 32)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    import torch

    from .data import load_dataset
    from .train import build_from_checkpoint

    try:
        device = _setup_device(args)
        if args.n < 1 or args.batch < 1:
            raise ValueError(f"--n and --batch must be >= 1, got {args.n} and {args.batch}")
        diffusion = build_from_checkpoint(args.checkpoint, ema=not args.no_ema, device=device)
        shape = tuple(diffusion.sample_shape)
        if len(shape) != 3:
            raise ValueError("fastdiff eval needs an image model (bits/dim assumes 8-bit image data)")
        size = args.image_size or shape[-1]
        if args.dataset in ("folder", "cifar10") and args.data_root is None:
            raise ValueError(f"--dataset {args.dataset} needs --data-root")
        data = load_dataset(args.dataset, root=args.data_root, image_size=size, seed=args.seed)
        n = min(args.n, len(data))
        x = torch.stack([data[i] for i in range(n)])
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"--dataset {args.dataset} gives images of shape {tuple(x.shape[1:])}, the checkpoint's "
                             f"model takes {shape}")
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdiff eval: error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=device).manual_seed(args.seed)
    parts: dict = {}
    for start in range(0, n, args.batch):
        r = diffusion.nll(x[start:start + args.batch].to(device), generator=gen, progress=not args.no_progress)
        for k, v in r.items():
            parts.setdefault(k, []).append(v.detach().double().cpu())
    res = {k: torch.cat(v) for k, v in parts.items()}
    bpd = res["bpd"]
    se = float(bpd.std() / max(n, 1) ** 0.5) if n > 1 else float("nan")
    vb = res["vb_bpd"]  # (n, T); column 0 is the decoder term
    report = {
        "n": n, "bpd": float(bpd.mean()), "bpd_stderr": se, "prior_bpd": float(res["prior_bpd"].mean()),
        "decoder_bpd": float(res["decoder_bpd"].mean()), "vb_terms_bpd": float(vb[:, 1:].sum(1).mean()),
        "vb_bpd_by_t": vb.mean(0).tolist(),
    }
    print(f"bits/dim over {n} images: {report['bpd']:.4f} +- {se:.4f}  "
          f"(prior {report['prior_bpd']:.4f}, KL terms {report['vb_terms_bpd']:.4f}, "
          f"decoder {report['decoder_bpd']:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


# -------------------------------------------------------------- assembly ----
# name -> function adding the subparser
SUBCOMMANDS: dict[str, Callable] = {
    "info": _add_info,
    "bench": _add_bench,
    "train": _add_train,
    "sample": _add_sample,
    "eval": _add_eval,
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
