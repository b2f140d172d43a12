"""The kernel backends a test can run here, each as (device, call(op, *args))."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fastdiff.ops import _backend
from fastdiff.ops._schemas import op

HAS_CUDA = torch.cuda.is_available()


def _triton_ok() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import fastdiff.triton as ft

        return hasattr(ft, "q_sample")
    except Exception:
        return False


class Backend:
    def __init__(self, name: str, device: str, small_only: bool = False):
        self.name, self.device, self.small_only = name, device, small_only

    def __call__(self, opname: str, *args):
        if self.name == "cpp":
            return op(opname)(*args)
        if self.name == "reference":
            return _backend.cuda_kernel(opname, "reference")(*args)
        return _backend.cuda_kernel(opname, self.name)(*args)

    def __repr__(self):
        return f"{self.name}@{self.device}"


def all_backends():
    out = []
    if _backend.has_cpu_extension():
        out.append(pytest.param(Backend("cpp", "cpu"), id="cpp"))
    out.append(pytest.param(Backend("reference", "cpu"), id="reference"))
    if HAS_CUDA and _backend.has_cuda_extension():
        out.append(pytest.param(Backend("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu))
    if _triton_ok():
        dev = "cuda" if HAS_CUDA else "cpu"
        out.append(pytest.param(Backend("triton", dev, small_only=not HAS_CUDA), id="triton"))
    return out


# ------------------------------------------------- helpers of the parity tests ----
def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x as "contiguous", "channels_last" (4-D only), "noncontig" (a strided view of a larger tensor) or
    "transposed" (dense but not batch-major)."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        big = torch.zeros((x.shape[0], 2 * x.shape[1]) + x.shape[2:], dtype=x.dtype)
        v = big[:, ::2]
        v.copy_(x)
        return v
    if layout == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() >= 2 else x
    return x


def check_vs_reference(out, ref64, ref_lowp, dtype, what=""):
    """out against the float64 reference: float32 within 2e-5 and float64 within 1e-10 of max(1, |ref|);
    float16/bfloat16 at most 2x the error of the same maths in plain PyTorch at that dtype (``ref_lowp``,
    the flash-attention rule) plus one eps."""
    out64 = out.detach().cpu().to(torch.float64)
    assert out64.shape == ref64.shape, what
    assert not torch.isnan(out64).any() or torch.isnan(ref64).any(), f"{what}: unexpected NaN"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    if dtype == torch.float32:
        assert err <= 2e-5 * scale, f"{what}: fp32 error {err:.3g} (scale {scale:.3g})"
    elif dtype == torch.float64:
        assert err <= 1e-10 * scale, f"{what}: fp64 error {err:.3g}"
    else:
        lowp = (ref_lowp.to(torch.float64) - ref64).abs().max().item() if ref64.numel() else 0.0
        floor = torch.finfo(dtype).eps * scale
        assert err <= 2 * lowp + floor, f"{what}: {dtype} error {err:.3g} vs plain-torch {lowp:.3g}"


def skip_big(backend, shape) -> None:
    """Interpreted Triton (no GPU) runs small shapes only."""
    if backend.small_only and torch.Size(shape).numel() > 2000:
        pytest.skip("interpreted Triton: small shapes only")
