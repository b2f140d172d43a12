"""Build of fastdiff and its extension fastdiff._C.

One extension: the C++ CPU kernels always, the CUDA kernels when a CUDA
toolchain is found. Switches (environment):

  FASTDIFF_BUILD_CUDA = auto (default) | 0 | 1   build the CUDA kernels?
  FASTDIFF_CUDA_ARCH  = "8.0;8.6;8.9;9.0+PTX"    arch list (TORCH_CUDA_ARCH_LIST too)
  FASTDIFF_NO_EXTENSION = 1                       pure-Python install (reference + Triton)
  MAX_JOBS                                        parallel compile jobs (ninja)
  CUDA_HOME                                       toolkit root; found from nvcc otherwise
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def find_cuda_home() -> str | None:
    """The real toolkit root. ``nvcc`` on PATH may be a wrapper script
    (``exec /usr/local/cuda-X/bin/nvcc "$@"``); follow it instead of
    guessing from the script's own location, as torch would."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        try:
            head = real.read_bytes()[:4096]
        except OSError:
            head = b""
        if head.startswith(b"#!"):  # a wrapper script: find the nvcc it execs
            for m in re.finditer(rb"(/[^\s\"']+/bin/nvcc)\b", head):
                candidates.append(Path(m.group(1).decode()))
        candidates.append(real)
    candidates += [Path("/usr/local/cuda/bin/nvcc")]
    for c in candidates:
        if c.is_file() and c.parent.name == "bin" and (c.parent.parent / "include" / "cuda_runtime.h").is_file():
            return str(c.parent.parent)
    return None


def want_cuda(cuda_home: str | None) -> bool:
    mode = os.environ.get("FASTDIFF_BUILD_CUDA", "auto").lower()
    import torch

    if mode in ("0", "false", "no", "off"):
        return False
    ok = cuda_home is not None and torch.version.cuda is not None
    if mode in ("1", "true", "yes", "on"):
        if not ok:
            sys.exit(f"FASTDIFF_BUILD_CUDA=1 but no usable CUDA toolchain (CUDA_HOME={cuda_home}, "
                     f"torch.version.cuda={torch.version.cuda})")
        return True
    return ok


def extensions():
    if os.environ.get("FASTDIFF_NO_EXTENSION") == "1":
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = want_cuda(cuda_home)
    sources = ["csrc/module.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    torch_ver = torch.__version__.split("+")[0]
    cxx = ["-O3", "-fno-math-errno", "-fopenmp", f'-DFASTDIFF_TORCH_VERSION="{torch_ver}"']
    link = ["-fopenmp"]
    if with_cuda:
        archs = os.environ.get("FASTDIFF_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        arch_macro = f'-DFASTDIFF_CUDA_ARCHS="{archs}"'
        ext = CUDAExtension(
            "fastdiff._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={
                "cxx": cxx + ["-DFASTDIFF_WITH_CUDA", arch_macro],
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DFASTDIFF_WITH_CUDA",
                         arch_macro],
            },
            extra_link_args=link,
        )
    else:
        ext = CppExtension("fastdiff._C", sources, include_dirs=[str(ROOT / "csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"fastdiff: building fastdiff._C with CUDA={'yes (' + cuda_home + ')' if with_cuda else 'no'}",
          file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
