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
