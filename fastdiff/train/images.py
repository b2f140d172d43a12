"""Image outputs of training and sampling: sample grids, 2-D scatter plots
and the loss curve (pillow / matplotlib: the ``train`` extra)."""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor


# ----------------------------------------------------------------- outputs --
def _upscale_nearest(grid: Tensor, min_side: int) -> Tensor:
    """Repeat every pixel of a (C, H, W) grid k x k times, the smallest integer
    k that makes the longer side at least ``min_side`` (k = 1 if it already is):
    a 16x16-pixel digit is a blur of a few pixels on a screen otherwise."""
    k = max(1, math.ceil(min_side / max(grid.shape[-2:]))) if min_side > 0 else 1
    return grid if k == 1 else grid.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def save_image_grid(images: Tensor, path: str, nrow: Optional[int] = None, pad: int = 2,
                    min_side: int = 512) -> str:
    """Save images (N, C, H, W) with values in [-1, 1] (C = 1 or 3) as one PNG
    grid, ``nrow`` images per row (default ceil(sqrt(N))), ``pad`` pixels apart,
    upscaled nearest-neighbour by an integer factor until its longer side is at
    least ``min_side`` pixels (0: the images' own resolution). Save an ``.npz``
    (``fastdiff sample --out x.npz``) for the raw values."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    grid = _upscale_nearest(grid, min_side)
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr, mode="L" if c == 1 else "RGB").save(path)
    return path


def save_scatter(samples: Tensor, data: Optional[Tensor], path: str, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    if data is not None:
        d = data[:5000].float().cpu()
        ax.scatter(d[:, 0], d[:, 1], s=2, c="0.75", label="data")
    s = samples.float().cpu()
    ax.scatter(s[:, 0], s[:, 1], s=3, c="tab:red", label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    ax.set_title(title)
    fig.savefig(path)
    return path


def save_loss_plot(history: list[dict], path: str) -> Optional[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(h["step"], h["loss"]) for h in history if math.isfinite(h["loss"]) and h["loss"] > 0]
    if not pts:
        return None
    steps, losses = zip(*pts)
    # exponential smoothing in log space over a window of ~5% of the points,
    # debiased like Adam's moments (so the curve does not start at 0)
    beta = 1.0 - 1.0 / max(1.0, len(losses) / 20.0)
    smooth, m = [], 0.0
    for k, v in enumerate(losses, 1):
        m = beta * m + (1 - beta) * math.log(v)
        smooth.append(math.exp(m / (1 - beta**k)))
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="loss (mean per log interval)")
    ax.plot(steps, smooth, color="tab:blue", lw=2, label="smoothed")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
