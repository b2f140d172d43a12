"""The ``fastdiff`` command line.

    fastdiff info                       what this installation runs, and where
    fastdiff bench [options]            the operator benchmark table
    fastdiff bench train|sample         end-to-end training / sampling throughput
    fastdiff train --dataset digits     train a DDPM (checkpoints, sample grids, loss curve)
    fastdiff sample --checkpoint DIR    sample from a trained model (PNG grid or .npz)
    fastdiff eval --checkpoint DIR      bits/dim on a dataset; FID / IS / KID of samples (offline)

Each subcommand is a small class-free pair: ``_add_<name>(subparsers)``
declares its options and sets ``func``; ``_cmd_<name>(args)`` runs it and
returns the exit status. A new subcommand adds one pair and one line in
:data:`SUBCOMMANDS`. Errors in the user's input print one line naming the
option and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--step-mode", choices=("eager", "compile", "graph"), default="eager",
                   help="the training step: eager (op by op; default), compile (the whole step, backward, AdamW "
                        "and EMA included, under torch.compile(fullgraph=True)) or graph (the whole step captured "
                        "in one CUDA graph and replayed; on a CPU: compile)")
    p.add_argument("--device-data", choices=("auto", "on", "off"), default="auto",
                   help="keep an in-memory dataset on the training device (8-bit images as uint8, converted there): "
                        "auto (when it fits in 1/4 of the GPU memory; default), on, off")
    p.add_argument("--random-flip", action="store_true",
                   help="flip images left-right with probability 1/2 (the DDPM CIFAR-10 augmentation)")
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
    p.add_argument("--class-conditional", action="store_true",
                   help="train a class-conditional UNet on the dataset's labels (digits, cifar10, folder with one "
                        "subdirectory per class), for classifier-free guidance (`fastdiff sample --class`)")
    p.add_argument("--cond-drop-prob", type=float, default=0.1, metavar="P",
                   help="with --class-conditional: the probability of replacing a sample's label by the null label "
                        "(the unconditional model that guidance needs; default 0.1)")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="latent diffusion: a diffusers AutoencoderKL directory (save_pretrained, or a pipeline with "
                        "vae/); the images are encoded once (cached when the latents fit in 2 GiB) and the --preset "
                        "UNet is built for the latents' channels and size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=_cmd_train)


def _setup_device(args) -> str:
    """Apply --threads and resolve --device (auto: cuda when a GPU is visible)."""
    from ._args import setup_device

    return setup_device(args.device, args.threads)


def _build_model(preset: str, dataset, dataset_name: str, **overrides):
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
    return UNet.from_preset(preset, **overrides)


def _latent_diffusion(args, preset, dataset, schedule, cond_kw, drop):
    """--vae: a LatentDiffusion whose UNet (--preset) is built for the latents."""
    from .data import sample_shape
    from .diffusion.latent import LatentDiffusion, load_vae
    from .nn import UNet
    from .nn.unet import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"--vae needs a UNet --preset ({', '.join(PRESETS)}), got {preset!r}")
    shape = tuple(sample_shape(dataset))
    vae = load_vae(args.vae)
    if len(shape) != 3 or shape[0] != vae.config.in_channels:
        raise ValueError(f"--vae takes {vae.config.in_channels}-channel images; --dataset {args.dataset} gives "
                         f"samples of shape {shape}")
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if shape[1] % f or shape[2] % f:
        raise ValueError(f"--image-size {shape[1]} is not a multiple of the VAE's downsampling factor {f}")
    lc, size = int(vae.config.latent_channels), shape[1] // f
    model = UNet.from_preset(preset, in_ch=lc, out_ch=lc, image_size=size, **cond_kw)
    return LatentDiffusion(args.vae, model, schedule, sample_shape=(lc, size, shape[2] // f), target=args.target,
                           weighting=args.weighting, cond_drop_prob=drop)


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
        cond_kw, drop = {}, 0.0
        if args.class_conditional:
            if getattr(dataset, "labels", None) is None:
                raise ValueError(f"--class-conditional needs labels: --dataset {args.dataset} has none here "
                                 f"(a folder needs one subdirectory per class)")
            if preset == "mlp":
                raise ValueError("--class-conditional needs a UNet preset, not 'mlp'")
            if not 0.0 <= args.cond_drop_prob <= 1.0:
                raise ValueError(f"--cond-drop-prob must be in [0, 1], got {args.cond_drop_prob}")
            cond_kw, drop = {"num_classes": int(dataset.num_classes)}, float(args.cond_drop_prob)
        schedule = NoiseSchedule.make(args.schedule, args.timesteps)
        image = len(sample_shape(dataset)) == 3
        if args.vae is not None:
            diffusion = _latent_diffusion(args, preset, dataset, schedule, cond_kw, drop).to(device)
        else:
            model = _build_model(preset, dataset, args.dataset, **cond_kw)
            diffusion = GaussianDiffusion(model, schedule, sample_shape=tuple(sample_shape(dataset)),
                                          target=args.target, weighting=args.weighting, clip_sample=image,
                                          cond_drop_prob=drop).to(device)
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup, grad_clip=args.grad_clip, ema_decay=args.ema_decay, precision=args.precision,
            channels_last=args.channels_last, compile=args.compile, seed=args.seed, out_dir=args.out,
            log_every=args.log_every, checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
            num_samples=args.num_samples, sample_steps=args.sample_steps, sample_method=args.sample_method,
            progress=not args.no_progress, device=device)
        config.step_mode, config.device_data, config.random_flip = args.step_mode, args.device_data, args.random_flip
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
    p.add_argument("--class", dest="classes", default=None, metavar="C[,C...]|all",
                   help="class-conditional checkpoints: sample these classes (indices or the names the checkpoint "
                        "recorded), --n samples each, one grid row per class; 'all': every class. Default: "
                        "unconditional (the null label)")
    p.add_argument("--guidance-scale", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance weight with --class: out_u + W (out_c - out_u), fused into the "
                        "sampler step (1: no guidance; default 1)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="R",
                   help="rescale the guided prediction toward the conditional one's std (0..1; default 0)")
    p.add_argument("--compare-unconditional", action="store_true",
                   help="with --class and a .png: put the unconditional samples (same noise, null label) next to "
                        "each class row")
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
        labels = _sample_labels(args, diffusion)
        total = args.n if labels is None else labels.shape[0]
        if args.compare_unconditional and (labels is None or not args.out.endswith(".png")):
            raise ValueError("--compare-unconditional needs --class and a .png --out")

        def draw(lab, guidance):
            gen = torch.Generator(device=device).manual_seed(args.seed)
            batch = args.batch or total
            parts = []
            for start in range(0, total, batch):
                kw = {}
                if lab is not None:
                    kw = dict(class_labels=lab[start:start + batch], guidance_scale=args.guidance_scale,
                              guidance_rescale=args.guidance_rescale) if guidance else \
                        dict(class_labels=lab[start:start + batch])
                parts.append(diffusion.sample(min(batch, total - start), steps=steps, method=args.method,
                                              eta=args.eta, order=args.order, spacing=args.spacing, generator=gen,
                                              cuda_graph=args.cuda_graph, compile_model=args.compile,
                                              progress=not args.no_progress, **kw).cpu())
            return torch.cat(parts)

        x = draw(labels, True)
        uncond = None
        if args.compare_unconditional:
            null = torch.full_like(labels, diffusion.model.num_classes)  # the null label, the same noise
            uncond = draw(null, False)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdiff sample: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if labels is not None and args.out.endswith(".png") and x.dim() == 4:
        from .train.images import save_image_grid

        if uncond is None:
            save_image_grid(x, args.out, nrow=args.n)  # one row per class
        else:
            save_image_grid(_side_by_side(x, uncond, args.n), args.out, nrow=2 * args.n + 1)
    elif labels is not None and args.out.endswith(".npz"):
        import numpy as np

        save_samples(x, args.out)
        with np.load(args.out) as f:
            arrays = dict(f)
        np.savez_compressed(args.out, labels=labels.cpu().numpy(), **arrays)
    else:
        save_samples(x, args.out)
    print(f"{x.shape[0]} samples written to {args.out}")
    return 0


def _sample_labels(args, diffusion):
    """int64 labels for --class (each class repeated --n times), or None."""
    import torch

    k = getattr(diffusion.model, "num_classes", None)
    for name in ("guidance_scale", "guidance_rescale"):
        if getattr(args, name) != (1.0 if name == "guidance_scale" else 0.0) and args.classes is None:
            raise ValueError(f"--{name.replace('_', '-')} needs --class")
    if args.classes is None:
        return None
    if k is None:
        raise ValueError("--class needs a class-conditional checkpoint (trained with --class-conditional)")
    from .train import read_checkpoint_meta

    names = read_checkpoint_meta(args.checkpoint).get("classes") or [str(i) for i in range(k)]
    if args.classes.strip() == "all":
        chosen = list(range(k))
    else:
        chosen = []
        for c in args.classes.split(","):
            c = c.strip()
            if c in names:
                chosen.append(names.index(c))
            elif c.isdigit() and int(c) < k:
                chosen.append(int(c))
            else:
                raise ValueError(f"--class: {c!r} is neither a class index in [0, {k}) nor one of {names}")
    return torch.tensor(chosen, dtype=torch.int64).repeat_interleave(args.n)


def _side_by_side(left, right, per_row: int):
    """Rows of ``per_row`` images from left, a blank, then the same row of right."""
    import torch

    rows = left.shape[0] // per_row
    gap = torch.zeros((1,) + tuple(left.shape[1:]), dtype=left.dtype)
    out = []
    for r in range(rows):
        out += [left[r * per_row:(r + 1) * per_row], gap, right[r * per_row:(r + 1) * per_row]]
    return torch.cat(out)


# ------------------------------------------------------------------ eval ----
def _add_eval(sub) -> None:
    from .diffusion.gaussian import METHODS
    from .metrics import STANDARD_FID_SAMPLES, STANDARD_WEIGHTS
    from .schedule import SPACINGS

    p = sub.add_parser(
        "eval", help="bits/dim of a checkpoint, and FID / IS / KID of its samples (offline)",
        description="Evaluate a checkpoint the way the DDPM papers do, in one table (and --json):\n\n"
                    "bits/dim  the variational bound on -log p(x) in bits per dimension: the prior term\n"
                    "          KL(q(x_T|x0) || N(0, I)), the T-1 KL terms and the discretised Gaussian decoder\n"
                    "          -log p(x0|x1) for 8-bit data in [-1, 1]; T model calls per image, over --n images\n"
                    "          of --dataset (mean +- standard error). On by default; --no-bpd skips it.\n"
                    "FID       (--fid) Frechet Inception Distance between Gaussians fitted to the InceptionV3\n"
                    "          pool3 features (2048-d) of --num-samples generated images and of the reference\n"
                    "          images (--dataset, or --ref-stats). Lower is better.\n"
                    "IS        (--is) Inception Score exp(E KL(p(y|x) || p(y))) of the samples' 1008-way\n"
                    "          InceptionV3 predictions, mean +- std over --is-splits splits. Higher is better.\n"
                    "KID       (--kid) Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial\n"
                    "          kernel between the sample and reference features, mean +- std over\n"
                    "          --kid-subsets random subsets of --kid-subset-size. Lower is better.\n\n"
                    "FID/IS/KID are computed by torch-fidelity (its TF-compatible 'inception-v3-compat'\n"
                    "network; images are quantised to uint8 RGB, one channel repeated to three, and resized\n"
                    "to 299x299 with a TF1-compatible bilinear interpolation). They need the InceptionV3\n"
                    f"weights file {STANDARD_WEIGHTS['file']}, which is never downloaded: get it once\n"
                    f"from {STANDARD_WEIGHTS['urls'][0]}\n"
                    "and pass --inception-weights. Other weights files are accepted (their scores are\n"
                    "labelled as not comparable to published ones). Reference statistics (mu, Sigma and\n"
                    "the features, as .npz) are computed from --dataset once and cached; --ref-stats FILE\n"
                    "names the file to reuse or create (pytorch-fid's mu/sigma .npz files work for FID).\n"
                    f"The convention for a FID comparable to papers is {STANDARD_FID_SAMPLES} samples against the\n"
                    "training set's statistics; with fewer samples the report says so.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fastdiff eval --checkpoint runs/digits --dataset digits --n 256     # bits/dim only\n"
               "  fastdiff eval --checkpoint runs/cifar --dataset cifar10 --data-root DIR --fid --is --kid \\\n"
               f"      --inception-weights {STANDARD_WEIGHTS['file']} --method ddim --steps 100 --no-bpd\n"
               "  fastdiff eval --checkpoint runs/digits --fid --num-samples 2000 --ref-stats digits16.npz \\\n"
               "      --inception-weights weights.pth --json eval.json")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint directory (or its run directory)")
    p.add_argument("--dataset", choices=("digits", "folder", "cifar10"), default="digits",
                   help="the data for bits/dim and for the reference statistics (default: digits)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="directory of the folder/cifar10 datasets")
    p.add_argument("--image-size", type=int, default=None, help="image side length (default: the model's)")
    p.add_argument("--n", type=int, default=128, help="bits/dim: number of data images to evaluate (default: 128)")
    p.add_argument("--batch", type=int, default=32, help="bits/dim: images per model call (default: 32)")
    p.add_argument("--bpd", action=argparse.BooleanOptionalAction, default=True,
                   help="compute bits/dim (default: on; --no-bpd to report only FID/IS/KID)")
    g = p.add_argument_group("sample quality (FID / IS / KID)")
    g.add_argument("--fid", action="store_true", help="Frechet Inception Distance of the samples to the reference")
    g.add_argument("--is", dest="isc", action="store_true", help="Inception Score of the samples")
    g.add_argument("--kid", action="store_true", help="Kernel Inception Distance of the samples to the reference")
    g.add_argument("--inception-weights", metavar="PATH", default=os.environ.get("FASTDIFF_INCEPTION_WEIGHTS"),
                   help=f"the InceptionV3 weights file ({STANDARD_WEIGHTS['file']}; default: the "
                        f"FASTDIFF_INCEPTION_WEIGHTS environment variable). Required by --fid/--is/--kid; never "
                        f"downloaded")
    g.add_argument("--ref-stats", metavar="FILE.npz", default=None,
                   help="reference statistics to reuse if FILE exists, else to compute from --dataset and write "
                        "there (default: a cache file under $FASTDIFF_CACHE or ~/.cache/fastdiff/ref_stats, "
                        "named after the dataset, size, --ref-n and the weights)")
    g.add_argument("--ref-n", type=int, default=None, metavar="N",
                   help="reference images: a seeded subset of N (default: the whole dataset, e.g. CIFAR-10's "
                        "50000 training images)")
    g.add_argument("--num-samples", type=int, default=STANDARD_FID_SAMPLES, metavar="N",
                   help=f"generated samples for FID/IS/KID (default: {STANDARD_FID_SAMPLES}, the convention; "
                        f"fewer give a FID biased upward, and the report says so)")
    g.add_argument("--sample-batch", type=int, default=256, metavar="B",
                   help="samples per sampler call and images per InceptionV3 call (default: 256)")
    g.add_argument("--method", choices=METHODS, default="ddpm", help="sampler (default: ddpm, all T steps)")
    g.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: T for ddpm, 50 for ddim, 20 for the multistep samplers)")
    g.add_argument("--order", type=int, default=None, choices=(1, 2, 3),
                   help="solver order of dpmsolver++ / unipc (default: 2)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    g.add_argument("--spacing", choices=SPACINGS, default="leading",
                   help="timestep spacing of a respaced chain (default: leading)")
    g.add_argument("--is-splits", type=int, default=10, help="IS: number of splits (default: 10)")
    g.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets (default: 100)")
    g.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID: rows per subset (default: 1000; lowered to the set sizes when they are smaller)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device(p)
    p.set_defaults(func=_cmd_eval)


def _eval_bpd(args, diffusion, device, shape) -> dict:
    import torch

    from .data import load_dataset

    size = args.image_size or shape[-1]
    data = load_dataset(args.dataset, root=args.data_root, image_size=size, seed=args.seed)
    n = min(args.n, len(data))
    x = torch.stack([data[i] for i in range(n)])
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"--dataset {args.dataset} gives images of shape {tuple(x.shape[1:])}, the checkpoint's "
                         f"model takes {shape}")
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
    return {
        "n": n, "bpd": float(bpd.mean()), "bpd_stderr": se, "prior_bpd": float(res["prior_bpd"].mean()),
        "decoder_bpd": float(res["decoder_bpd"].mean()), "vb_terms_bpd": float(vb[:, 1:].sum(1).mean()),
        "vb_bpd_by_t": vb.mean(0).tolist(),
    }


def _cmd_eval(args) -> int:
    from . import metrics as M
    from .train import build_from_checkpoint

    want = args.fid or args.isc or args.kid
    try:
        device = _setup_device(args)
        if args.n < 1 or args.batch < 1:
            raise ValueError(f"--n and --batch must be >= 1, got {args.n} and {args.batch}")
        for name in ("num_samples", "sample_batch", "is_splits", "kid_subsets", "kid_subset_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.ref_n is not None and args.ref_n < 2:
            raise ValueError(f"--ref-n must be >= 2, got {args.ref_n}")
        if not (args.bpd or want):
            raise ValueError("nothing to evaluate: --no-bpd without --fid, --is or --kid")
        if args.dataset in ("folder", "cifar10") and args.data_root is None and (args.bpd or (
                (args.fid or args.kid) and not (args.ref_stats and os.path.isfile(args.ref_stats)))):
            raise ValueError(f"--dataset {args.dataset} needs --data-root")
        diffusion = build_from_checkpoint(args.checkpoint, ema=not args.no_ema, device=device)
        shape = tuple(diffusion.sample_shape)
        if len(shape) != 3:
            raise ValueError("fastdiff eval needs an image model (bits/dim assumes 8-bit image data)")
        T = diffusion.num_timesteps
        if want and args.steps is not None and not 1 <= args.steps <= T:
            raise ValueError(f"--steps must be in [1, {T}] (the checkpoint's T), got {args.steps}")
        extractor = ref = None
        report: dict = {"checkpoint": os.path.abspath(args.checkpoint), "weights": "raw" if args.no_ema else "ema"}
        if want:
            extractor = M.InceptionExtractor(args.inception_weights, device=device)
            if args.fid or args.kid:
                size = args.image_size or shape[-1]
                if args.ref_stats and os.path.isfile(args.ref_stats):
                    ref = M.RefStats.load(args.ref_stats)
                    M.check_ref_stats(ref, extractor, args.ref_stats)
                    path, loaded = args.ref_stats, True
                else:
                    ref, path, loaded = M.reference_stats(
                        args.dataset, extractor, root=args.data_root, image_size=size, n=args.ref_n, seed=args.seed,
                        cache=args.ref_stats, batch_size=args.sample_batch, progress=not args.no_progress)
                report["ref_stats"] = {"path": os.path.abspath(path), "loaded": loaded, "n": ref.n,
                                       "dataset": ref.meta.get("dataset"), "image_size": ref.meta.get("image_size")}
                print(f"reference statistics: {'read from' if loaded else 'written to'} {path} ({ref.n} images)",
                      file=sys.stderr)
    except ImportError as e:
        print(f"fastdiff eval: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdiff eval: error: {e}", file=sys.stderr)
        return 2
    if args.bpd:
        try:
            report.update(_eval_bpd(args, diffusion, device, shape))
        except (ValueError, FileNotFoundError) as e:
            print(f"fastdiff eval: error: {e}", file=sys.stderr)
            return 2
        print(f"bits/dim over {report['n']} images: {report['bpd']:.4f} +- {report['bpd_stderr']:.4f}  "
              f"(prior {report['prior_bpd']:.4f}, KL terms {report['vb_terms_bpd']:.4f}, "
              f"decoder {report['decoder_bpd']:.4f})")
    if want:
        steps = args.steps if args.steps is not None else {"ddpm": None, "ddim": 50}.get(args.method, 20)
        try:
            report.update(M.evaluate_checkpoint(
                diffusion, extractor, ref, num_samples=args.num_samples, batch_size=args.sample_batch,
                method=args.method, steps=steps, eta=args.eta, spacing=args.spacing, order=args.order,
                seed=args.seed, fid=args.fid,
                isc=args.isc, kid=args.kid, is_splits=args.is_splits, kid_subsets=args.kid_subsets,
                kid_subset_size=args.kid_subset_size, progress=not args.no_progress))
        except ValueError as e:
            print(f"fastdiff eval: error: {e}", file=sys.stderr)
            return 2
        print()
        print(M.format_report(report))
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
