"""Ahead-of-time compilation of fastdiff's Triton kernels for GPUs this
machine does not have (run by tests/test_gpu_compile.py in a subprocess:
the Triton interpreter must be off).

Each public launcher is called on CPU tensors with its kernels replaced by a
recorder, so the recorded arguments are exactly those the launcher passes
(its config choice included); the kernel is then compiled with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` the way
``JITFunction.run`` would compile it, and the PTX goes through Triton's
bundled ``ptxas -v`` for the registers and spills. Prints one JSON object:
{"results": [{kernel, case, arch, regs, spill_stores, spill_loads, shared, smem_limit, seconds}], ...}.

    python tests/_triton_compile.py [--lean | --full] [--attention-only] [--archs 80,90]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

# max dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

ft = importlib.import_module("fastdiff.triton")
MODS = {m: importlib.import_module(f"fastdiff.triton.{m}") for m in ("q_sample", "loss", "step", "group_norm",
                                                                       "attention")}
ATT = MODS["attention"]


class _Captured(Exception):
    pass


def capture(call):
    """The (kernel, args, kwargs) of every launch ``call()`` makes."""
    seen = []
    saved = {}

    class Rec:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append((self.k, a, kw))
            return launch

    for mod in MODS.values():
        for name, obj in list(vars(mod).items()):
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.JITFunction):
                saved[(mod, name)] = obj
                setattr(mod, name, Rec(obj))
    try:
        call()
    finally:
        for (mod, name), obj in saved.items():
            setattr(mod, name, obj)
    return seen


def ptxas_info(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas
    tool = get_ptxas(arch)
    ptxas = getattr(tool, "path", tool)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    out = r.stderr + r.stdout
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"regs": regs, "spill_stores": int(st.group(1)) if st else 0, "spill_loads": int(st.group(2)) if st else 0}


def compile_one(kernel, args, kwargs, arch):
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    info = ptxas_info(ck.asm["ptx"], arch)
    info.update(shared=int(ck.metadata.shared), smem_limit=SMEM_LIMIT[arch], num_warps=options.num_warps,
                seconds=round(time.perf_counter() - t0, 2))
    return info


def cases(full: bool):
    """(name, thunk) launcher calls on CPU tensors covering the kernels' configs."""
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    out = []
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64) if full else (torch.bfloat16,)
    shapes = ((2, 3, 40, 40), (3, 5, 7, 9), (2, 1, 2, 2)) if full else ((2, 3, 40, 40),)  # BLOCK 2048 / smaller
    for dt in dtypes:
        for shape in shapes:
            x = torch.randn(shape).to(dt)
            t = torch.tensor([5, 700] + [1] * (shape[0] - 2))[: shape[0]]
            key = torch.tensor([1, 2], dtype=torch.int64)
            w = torch.ones(shape[0])
            thr = torch.ones(shape[0])
            tag = f"{str(dt)[6:]} {'x'.join(map(str, shape))}"
            out += [
                (f"q_sample {tag}", lambda x=x, t=t: ft.q_sample(x, t, ab, x)),
                (f"q_sample_rng {tag}", lambda x=x, t=t, k=key: ft.q_sample_rng(x, t, ab, k, True)),
                (f"loss key {tag}", lambda x=x, t=t, k=key, w=w: ft.diffusion_loss(x, x, t, ab, None, k, w, 2, True)),
                (f"loss noise {tag}", lambda x=x, t=t, w=w: ft.diffusion_loss(x, x, t, ab, x, None, w, 0, True)),
                (f"loss bwd key {tag}", lambda x=x, t=t, k=key, w=w: ft.diffusion_loss_backward(w, x, x, t, ab, None,
                                                                                          k, w, 2)),
                (f"loss bwd noise {tag}", lambda x=x, t=t, w=w: ft.diffusion_loss_backward(w, x, x, t, ab, x, None, w,
                                                                                     0)),
                (f"ddpm key {tag}", lambda x=x, t=t, k=key: ft.ddpm_step(x, x, t, t - 1, ab, x, None, k, None, 0, 5,
                                                                         1.0)),
                (f"ddpm noise thresh {tag}", lambda x=x, t=t, th=thr: ft.ddpm_step(x, x, t, t - 1, ab, None, x, None,
                                                                                   th, 2, 0, 0.0)),
                (f"ddim key {tag}", lambda x=x, t=t, k=key: ft.ddim_step(x, x, t, t - 1, ab, None, k, None, 1, 1.0,
                                                                         0.5, 1.0, True)),
                # classifier-free guidance: both predictions read, with the rescale factor
                (f"ddpm guided {tag}", lambda x=x, t=t, k=key: ft.ddpm_step(
                    x, x, t, t - 1, ab, None, None, k, None, 0, 0, 0.0, x, 7.5,
                    torch.ones(x.shape[0], dtype=torch.float64))),
                (f"ddim guided {tag}", lambda x=x, t=t: ft.ddim_step(x, x, t, t - 1, ab, None, None, None, 2, 0.0,
                                                                     0.0, 1.0, False, x, 7.5, None)),
            ]
    # GroupNorm: single-tile and looping, both layouts, every optional input
    gn_shapes = ((2, 64, 8, 8), (2, 64, 64, 64)) if not full else ((2, 64, 8, 8), (2, 64, 64, 64), (1, 12, 5, 7),
                                                                      (2, 32, 128, 128))
    for dt in dtypes:
        for shape in gn_shapes:
            for cl in ((False, True) if full else ((shape[2] > 8),)):
                N, C = shape[:2]
                x = torch.randn(shape).to(dt)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                sd = torch.float64 if dt == torch.float64 else torch.float32
                vec = torch.ones(C, dtype=sd)
                nc = torch.ones(N, C, dtype=sd)
                stat = torch.ones(N, 32 if C % 32 == 0 else 3, dtype=sd)
                G = stat.shape[1]
                tag = f"{str(dt)[6:]} {'x'.join(map(str, shape))} {'NHWC' if cl else 'NCHW'}"
                out.append((f"gn fwd {tag}", lambda x=x, v=vec, nc=nc, G=G: ft.group_norm_act(x, v, v, nc, nc, nc, G,
                                                                                             1e-5, True)))
                out.append((f"gn bwd {tag}", lambda x=x, v=vec, nc=nc, st=stat, G=G: ft.group_norm_act_backward(
                    x, x, v, v, nc, nc, nc, st, st, G, True)))
    # GroupNorm split forward and backward (partials + apply kernels; the looping tiles), both layouts
    for dt in dtypes:
        for shape in ((2, 64, 64, 64), (1, 12, 5, 7)) if full else ((2, 64, 64, 64),):
            for cl in (False, True):
                N, C = shape[:2]
                x = torch.randn(shape).to(dt)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                sd = torch.float64 if dt == torch.float64 else torch.float32
                vec, nc, G = torch.ones(C, dtype=sd), torch.ones(N, C, dtype=sd), 32 if C % 32 == 0 else 3
                tag = f"{str(dt)[6:]} {'x'.join(map(str, shape))} {'NHWC' if cl else 'NCHW'}"
                out.append((f"gn fwd split {tag}", lambda x=x, v=vec, nc=nc, G=G: ft.group_norm_act(
                    x, v, v, nc, nc, nc, G, 1e-5, True, split=4)))
                stat = torch.ones(N, G, dtype=sd)
                out.append((f"gn bwd split {tag}", lambda x=x, v=vec, nc=nc, st=stat, G=G: ft.group_norm_act_backward(
                    x, x, v, v, nc, nc, nc, st, st, G, True, split=4)))
    return out


def attention_cases(full: bool, arch: int):
    """Attention: every head-dim bucket x dtype x kernel with the config the
    launcher picks on this arch (its shared-memory budget), and the halved
    fallback config."""
    out = []
    dims = (16, 32, 64, 128, 256, 512) if full else (64, 512)
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if full else (torch.bfloat16,)
    budget = SMEM_LIMIT[arch]
    for D in dims:
        for dt in dtypes:
            q = torch.randn(1, 2, 64, D).to(dt)
            o = torch.empty(1, 64, 2, D).to(dt).transpose(1, 2)
            lse = torch.zeros(1, 2, 64)
            for name in ("fwd", "dq", "dkdv"):
                orig = ATT._smem_budget
                ATT._smem_budget = lambda dev, b=budget: b
                try:
                    cfg = ATT.config(name, D, dt, torch.device("cuda"))
                finally:
                    ATT._smem_budget = orig
                for c in ((cfg, ATT._halve(cfg)) if full else (cfg,)):
                    bm, bn = c[0], c[1]
                    if name == "fwd":
                        thunk = lambda q=q, bm=bm, bn=bn: ft.attention(q, q, q, 0.1, block_m=bm, block_n=bn)
                    else:
                        thunk = lambda q=q, o=o, l=lse, bm=bm, bn=bn: ft.attention_backward(
                            q, q, q, q, o, l, 0.1, block_m=bm, block_n=bn)
                    out.append((f"attention {name} D={D} {str(dt)[6:]} {bm}x{bn}", thunk, name))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true", help="every dtype, shape class, layout, head dim, fallback config")
    p.add_argument("--lean", action="store_true", help="the CI subset (the default)")
    p.add_argument("--attention-only", action="store_true")
    p.add_argument("--archs", default="80,90")
    a = p.parse_args()
    archs = [int(x) for x in a.archs.split(",")]
    results, seen_keys = [], set()
    t0 = time.perf_counter()
    for arch in archs:
        todo = [] if a.attention_only else [(n, th, None) for n, th in cases(a.full)]
        todo += attention_cases(a.full, arch)
        for case, thunk, only in todo:
            for kernel, args, kw in capture(thunk):
                kname = kernel.fn.__name__
                if only is not None and kname != {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel",
                                                   "dkdv": "_attn_bwd_dkdv_kernel"}[only]:
                    continue
                key = (arch, kname, repr([(type(v).__name__, getattr(v, "dtype", v)) for v in args]),
                       repr(sorted(kw.items())))
                if key in seen_keys:
                    continue
                seen_keys.add(key)
                info = compile_one(kernel, args, kw, arch)
                results.append(dict(kernel=kname, case=case, arch=arch, **info))
    print(json.dumps({"results": results, "seconds": round(time.perf_counter() - t0, 1),
                      "triton": triton.__version__}))


if __name__ == "__main__":
    main()
