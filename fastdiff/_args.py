"""Device and argument helpers shared by the command line (``fastdiff
train/sample/eval``) and the benchmarks (``fastdiff bench``). A neutral,
bottom-layer module: it imports only torch."""
from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """"cpu", "cuda", or "auto" (cuda when torch sees a GPU) -> "cpu"/"cuda".
    ValueError for another name, RuntimeError for cuda without a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA GPU")
    return device


def csv_list(text: str) -> list:
    """'a, b,,c' -> ['a', 'b', 'c'] (the comma-separated list options)."""
    return [p.strip() for p in text.split(",") if p.strip()]


def setup_device(device: str, threads=None) -> str:
    """Apply ``threads`` (torch intra-op threads, when given) and resolve
    ``device`` (:func:`resolve_device`); a cuda request without a GPU is a
    usage error here (ValueError)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        return resolve_device(device)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
