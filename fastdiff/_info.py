"""fastdiff.info(): what this installation can run."""
from __future__ import annotations

import platform
import sys

import torch

from .ops import _backend


def info(as_dict: bool = False):
    """Versions, the backend of every operator on each device, the CUDA
    archs compiled into the extension and the GPU if any. Prints a report
    (or returns it as a dict with ``as_dict=True``)."""
    from . import __version__

    try:
        import triton

        triton_ver = triton.__version__
    except Exception:
        triton_ver = None
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
               "memory_gib": round(p.total_memory / 2**30, 1)}
    st = _backend.status()
    d = {
        "fastdiff": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_ver,
        **st,
        "gpu": gpu,
        "backends": {
            name: {"cpu": _backend.current_backend(name, "cpu"),
                   "cuda": _backend.current_backend(name, "cuda") if (gpu or st["extension_cuda"]) else None,
                   "cuda_available": _backend.available_backends("cuda", name)}
            for name in _backend.OPS
        },
    }
    if as_dict:
        return d
    lines = [f"fastdiff {d['fastdiff']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda']})  "
             f"triton {d['triton']}",
             f"extension: {d['extension']}; CUDA kernels: {'yes' if d['extension_cuda'] else 'no'}"
             + (f" (archs {', '.join(d['cuda_archs'])})" if d['cuda_archs'] else "")
             + (f"; built with torch {d['built_with_torch']}" if d['built_with_torch'] else ""),
             f"triton kernels: {d['triton']}",
             f"GPU: {gpu['name'] + ' (sm_' + gpu['capability'].replace('.', '') + ')' if gpu else 'none'}",
             "", f"{'operator':<25}{'CPU':<12}{'GPU (active)':<14}GPU (available)"]
    for name, b in d["backends"].items():
        lines.append(f"{name:<25}{b['cpu']:<12}{str(b['cuda']):<14}{', '.join(b['cuda_available'])}")
    print("\n".join(lines))
    return None
