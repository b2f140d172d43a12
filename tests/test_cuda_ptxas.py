"""Registers and spills of the CUDA C++ kernels, from ``nvcc -Xptxas -v``
for sm_90 (no GPU needed). Opt-in: ``FASTDIFF_PTXAS_CHECK=1`` (it compiles
every csrc/cuda/*.cu again, which on the 2-core CI VM costs about as much as
the CUDA build itself: measured on a heavily loaded 2-core VM, sm_90 only:
ops.cu 16 min, noise_check.cu 6 min, group_norm.cu longer; so CI does not run
it by default; run it when a .cu file changes).

Budget: at most SPILL_BUDGET bytes of spill stores per kernel. Measured on
sm_90 with CUDA 13.0: the elementwise kernels (64/80-register launch bounds)
spill at most 68 bytes (ops.cu); GroupNorm's bwd_nchw_onchip<double> 190
bytes and fwd_nhwc_tile<bf16, 8, 4> 144 bytes (group_norm.cu; the bf16 one
is worth a look with a GPU profile). The budget holds those and catches a
kernel that starts spilling its working set.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPILL_BUDGET = 256  # bytes of spill stores per kernel
ARCH = os.environ.get("FASTDIFF_PTXAS_ARCH", "90")

pytestmark = pytest.mark.skipif(os.environ.get("FASTDIFF_PTXAS_CHECK") != "1" or shutil.which("nvcc") is None,
                                reason="opt-in (FASTDIFF_PTXAS_CHECK=1) and needs nvcc")


def _ptxas_report(cu: str) -> list:
    import sysconfig

    import torch.utils.cpp_extension as ext

    inc = [f"-I{p}" for p in ext.include_paths("cuda")] + [f"-I{sysconfig.get_paths()['include']}",
                                                            f"-I{os.path.join(REPO, 'csrc')}"]
    cmd = ["nvcc", "-cubin", "-o", os.devnull, cu, "-O3", "--expt-relaxed-constexpr", "-std=c++20",
           f"-arch=sm_{ARCH}", "-Xptxas", "-v", "-DFASTDIFF_WITH_CUDA", "-D_GLIBCXX_USE_CXX11_ABI=1",
           "-DTORCH_EXTENSION_NAME=_C", *inc]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-4000:]
    out, kern = [], None
    for line in (r.stdout + r.stderr).splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            kern = {"kernel": m.group(1), "file": os.path.basename(cu)}
            out.append(kern)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and kern is not None:
            kern["spill_stores"], kern["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and kern is not None:
            kern["regs"] = int(m.group(1))
    return out


@pytest.mark.parametrize("cu", sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "csrc/cuda/*.cu"))))
def test_cuda_kernels_spills_within_budget(cu):
    rep = _ptxas_report(os.path.join(REPO, "csrc", "cuda", cu))
    assert rep, "no kernels found in the ptxas report"
    worst = max(rep, key=lambda k: k.get("spill_stores", 0))
    print(f"\n{cu}: {len(rep)} kernels, max {max(k.get('regs', 0) for k in rep)} registers, "
          f"max spill stores {worst.get('spill_stores', 0)} B")
    bad = [(k["kernel"][:80], k.get("regs"), k.get("spill_stores")) for k in rep
           if k.get("spill_stores", 0) > SPILL_BUDGET]
    assert not bad, bad
