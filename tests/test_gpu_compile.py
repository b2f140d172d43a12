"""GPU compile checks that need no GPU: fastdiff's Triton kernels, with the
configs their launchers choose, compiled for sm_80 and sm_90 with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` and Triton's
bundled ptxas (tests/_triton_compile.py, in a subprocess: the interpreter
must be off). Out-of-resource failures are caught before a GPU is lent.

Checked per compiled kernel:
* it compiles;
* its shared memory fits the device's per-block limit (A100 163 KiB, H100 227 KiB);
* its register spills stay within budget: none for the elementwise, GroupNorm
  and fp16/bf16 attention kernels; at most SPILL_BUDGET_FP32_ATTENTION bytes
  of spill stores for the float32 attention kernels (exact-fp32 dots without
  tensor cores, not the default for float32, which goes to SDPA; measured on
  sm_90 with Triton 3.8: dkdv D=64 784 B, dq D=512 4088 B, dkdv D=512 168 B).

CI time (measured here, loaded 2-core VM, cold Triton cache): the lean subset
below compiles 23 kernels for sm_90 and the 6 attention kernels again for
sm_80. ``FASTDIFF_COMPILE_CHECK_FULL=1`` sweeps every dtype, head dim,
layout, fallback config and both archs (~150 compiles, ~20 min CPU time: run
it when a kernel or its config table changes). Triton's cache
(~/.triton/cache) makes a repeated run take seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = os.environ.get("FASTDIFF_COMPILE_CHECK_FULL") == "1"
SPILL_BUDGET_FP32_ATTENTION = 4096  # bytes of spill stores


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_triton_compile.py"), *args], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 and "GPUTarget" in r.stderr and "ImportError" in r.stderr:
        pytest.skip("this Triton cannot compile ahead of time")
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    if FULL:
        return _run(["--full", "--archs", "80,90"])["results"]
    lean = _run(["--lean", "--archs", "90"])["results"]
    return lean + _run(["--lean", "--attention-only", "--archs", "80"])["results"]


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels >= {"_q_sample_kernel", "_loss_kernel", "_ddpm_kernel", "_ddim_kernel", "_gn_fwd_kernel",
                       "_gn_bwd_kernel", "_gn_split_stats_kernel", "_gn_split_apply_kernel",
                       "_gn_split_bwd_sums_kernel", "_gn_split_bwd_dx_kernel", "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"}, kernels
    assert {r["arch"] for r in compiled} == {80, 90}
    print("\n".join(f"sm_{r['arch']} {r['case']:<42} regs {r['regs']:>3} spill {r['spill_stores']:>5} B "
                    f"smem {r['shared']:>6} B  {r['seconds']:.1f} s" for r in compiled))


def test_shared_memory_fits(compiled):
    over = [r for r in compiled if r["shared"] > r["smem_limit"]]
    assert not over, [(r["case"], r["arch"], r["shared"], r["smem_limit"]) for r in over]


def test_register_spills_within_budget(compiled):
    bad = []
    for r in compiled:
        fp32_attention = r["kernel"].startswith("_attn") and " float32 " in f" {r['case']} "
        budget = SPILL_BUDGET_FP32_ATTENTION if fp32_attention else 0
        if r["spill_stores"] > budget:
            bad.append((r["case"], r["arch"], r["regs"], r["spill_stores"], budget))
    assert not bad, f"(case, arch, registers, spill bytes, budget): {bad}"
