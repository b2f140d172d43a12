"""Which kernel runs each operator on each device.

* CPU: the C++ kernels of ``fastdiff._C`` (registered by the extension
  itself); without the extension, the plain-PyTorch reference.
* CUDA: the CUDA C++ kernels of ``fastdiff._C`` when it was built with CUDA,
  else the Triton kernels, else the reference. ``set_backend`` switches an
  operator's CUDA kernel at run time (the benchmark decides the defaults in
  ``DEFAULT_GPU_BACKEND``).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import _reference_kernels as refk
from ._schemas import NAMESPACE, SCHEMAS

OPS = tuple(SCHEMAS)
GPU_BACKENDS = ("cuda", "triton", "reference")

# Per-op default on a GPU when both compiled backends exist; set from the
# committed benchmark results (benchmarks/results/), see docs/ARCHITECTURE.md.
# The U-Net block ops default to Triton: their CUDA C++ GroupNorm kernels were
# compiled but have not yet been run on a GPU (no GPU was lent when they were
# written), and attention has Triton kernels only.
DEFAULT_GPU_BACKEND = {name: "cuda" for name in OPS}
DEFAULT_GPU_BACKEND.update({
    "group_norm_act": "triton",
    "group_norm_act_backward": "triton",
    "attention": "triton",
    "attention_backward": "triton",
})

_C = None
_C_ERROR: str | None = None
_TRITON_ERROR: str | None = None
_triton_mod = None
_fallback_libs: list = []
_fallback_ops: set = set()
_override_lib = None
_current: dict[str, str] = {}


def _load_extension():
    global _C, _C_ERROR
    if os.environ.get("FASTDIFF_DISABLE_EXTENSION") == "1":
        _C_ERROR = "disabled by FASTDIFF_DISABLE_EXTENSION=1"
    else:
        try:
            _C = importlib.import_module("fastdiff._C")
        except Exception as e:  # ImportError, or an undefined symbol from an ABI mismatch
            _C_ERROR = f"{type(e).__name__}: {e}"
    if _C is None:
        warnings.warn(
            "fastdiff: the compiled extension fastdiff._C could not be loaded "
            f"({_C_ERROR}); using the Triton kernels on GPU and the reference "
            "kernels on CPU. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def triton_module():
    """The fastdiff.triton module, or None when Triton cannot be used."""
    global _triton_mod, _TRITON_ERROR
    if _triton_mod is None and _TRITON_ERROR is None:
        try:
            _triton_mod = importlib.import_module("fastdiff.triton")
        except Exception as e:
            _TRITON_ERROR = f"{type(e).__name__}: {e}"
    return _triton_mod


def has_cpu_extension() -> bool:
    return _C is not None


def has_cuda_extension() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def cuda_kernel(name: str, backend: str):
    """The Python-callable implementation of op ``name`` for ``backend``
    (with the op's schema arguments, positional)."""
    if backend == "cuda":
        if not has_cuda_extension():
            raise RuntimeError("fastdiff: the CUDA extension is not built")
        return _with_schema_defaults(name, getattr(_C, f"{name}_cuda"))
    if backend == "triton":
        mod = triton_module()
        if mod is None:
            raise RuntimeError(f"fastdiff: Triton kernels unavailable ({_TRITON_ERROR})")
        return getattr(mod, name)
    if backend == "reference":
        return getattr(refk, name)
    raise ValueError(f"backend must be one of {GPU_BACKENDS}, got {backend!r}")


def _with_schema_defaults(name: str, fn):
    """``fn`` (a pybind entry point, which has no default arguments) accepting the trailing arguments the
    op's schema gives defaults (e.g. the steps' guidance inputs) as optional, like the dispatcher does."""
    args = getattr(torch.ops, NAMESPACE).__getattr__(name).default._schema.arguments
    defaults = [a.default_value if a.has_default_value() else None for a in args]
    first = next((i for i, a in enumerate(args) if a.has_default_value()), len(args))
    if first == len(args):
        return fn

    def call(*a):
        if len(a) < len(defaults):
            a = a + tuple(defaults[len(a):])
        return fn(*a)

    call.__name__ = getattr(fn, "__name__", name)
    return call


def _has_native_cpu(name: str) -> bool:
    return has_cpu_extension() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU") \
        and name not in _fallback_ops


def available_backends(device: str = "cuda", op: str | None = None) -> list[str]:
    """The backends that can run ``op`` on ``device``; with ``op=None``, those
    that run at least one op ("reference" runs them all)."""
    names = OPS if op is None else (op,)
    if device == "cpu":
        return (["cpp"] if any(_has_native_cpu(n) for n in names) else []) + ["reference"]
    out = []
    if has_cuda_extension() and any(hasattr(_C, f"{n}_cuda") for n in names):
        out.append("cuda")
    if _triton_usable():
        mod = triton_module()
        if mod is not None and any(hasattr(mod, n) for n in names):
            out.append("triton")
    return out + ["reference"]


def set_backend(backend: str = "auto", ops=None) -> None:
    """Choose the kernel that runs ``ops`` (default: all) on CUDA tensors:
    ``"cuda"`` (compiled C++), ``"triton"``, ``"reference"`` or ``"auto"``
    (the benchmark-chosen default among those available). With ``ops=None``,
    ops that lack the named backend keep their current kernel."""
    global _override_lib
    names = OPS if ops is None else tuple([ops] if isinstance(ops, str) else ops)
    for n in names:
        if n not in OPS:
            raise ValueError(f"unknown fastdiff op {n!r}; ops are {OPS}")
    wanted = dict(_current)
    for n in names:
        avail = available_backends("cuda", n)
        if backend == "auto":
            pref = DEFAULT_GPU_BACKEND.get(n, "cuda")
            wanted[n] = pref if pref in avail else avail[0]
        elif backend in avail:
            wanted[n] = backend
        elif ops is None and n in wanted:
            pass  # e.g. set_backend("cuda") for all ops: attention has no CUDA C++ kernel, keep its choice
        else:
            raise ValueError(f"backend {backend!r} is not available here for {n} (available: {avail})")
    # Rebuild the override library: ops whose choice differs from what the
    # extension registered natively get a Python kernel on the CUDA key.
    if _override_lib is not None:
        _override_lib._destroy()
        _override_lib = None
    lib = None
    for n, b in wanted.items():
        native = "cuda" if has_cuda_extension() and hasattr(_C, f"{n}_cuda") else None
        if b != native:
            if lib is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lib = torch.library.Library(NAMESPACE, "IMPL")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
                lib.impl(n, cuda_kernel(n, b), "CUDA")
    _override_lib = lib
    _current.clear()
    _current.update(wanted)


def current_backend(name: str, device: str = "cuda") -> str:
    if device == "cpu":
        return "cpp" if _has_native_cpu(name) else "reference"
    return _current.get(name, "reference")


def _register_fallbacks():
    """Reference kernels on CPU for the ops the extension does not implement
    there (all of them when it is missing)."""
    lib = None
    for n in OPS:
        if has_cpu_extension() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{n}", "CPU"):
            continue
        if lib is None:
            lib = torch.library.Library(NAMESPACE, "IMPL")
        lib.impl(n, getattr(refk, n), "CPU")
        _fallback_ops.add(n)
    if lib is not None:
        _fallback_libs.append(lib)


def init():
    _load_extension()
    _register_fallbacks()
    set_backend("auto")


def status() -> dict:
    return {
        "extension": "loaded" if _C is not None else f"missing ({_C_ERROR})",
        "extension_cuda": has_cuda_extension(),
        "cuda_archs": list(getattr(_C, "cuda_archs", [])) if _C is not None else [],
        "built_with_torch": getattr(_C, "built_with_torch", None) if _C is not None else None,
        "triton": "importable" if triton_module() is not None else f"unavailable ({_TRITON_ERROR})",
    }
