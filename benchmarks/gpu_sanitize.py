"""Every CUDA C++ kernel once, at awkward shapes: the program that
benchmarks/gpu_check.sh runs under ``compute-sanitizer`` (memcheck for all,
racecheck for the kernels that use shared memory: ``--only group_norm``).

Awkward: per-sample sizes that are not multiples of 4 (the scalar head/tail
paths of the elementwise kernels), misaligned views (the scalar-access
paths), channels_last, a group size that is not a multiple of the tile, and
the GroupNorm split path (FASTDIFF_GN_CUDA_FORCE_SPLIT=1 in a second pass).
Results are sanity-checked (finite) only: correctness is the tests' job.

    python benchmarks/gpu_sanitize.py [--only elementwise|group_norm] [--device cuda|cpu]

``--device cpu`` runs the same calls on the CPU kernels (the rehearsal: the
script itself cannot rot).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def _misaligned(shape, device, dtype=torch.float32, g=None):
    """A dense tensor whose data pointer is 4 bytes past an aligned one."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.randn(n + 1, generator=g).to(device=device, dtype=dtype)
    return buf[1:].view(shape)


def elementwise(dev, g):
    import fastdiff

    s = fastdiff.NoiseSchedule.make("linear", 1000)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((3, 3, 5, 7), (2, 1, 1, 3)):  # M = 105 / 3: not multiples of 4
            x0 = torch.randn(shape, generator=g).to(dev, dtype)
            out = _misaligned(shape, dev, dtype, g)  # scalar-access path
            nz = torch.randn(shape, generator=g).to(dev, dtype)
            t = torch.tensor([999, 0, 500][:shape[0]], device=dev)
            key = fastdiff.draw_key(torch.Generator(dev).manual_seed(1), dev)
            results = [
                fastdiff.q_sample(x0, t, s, nz)[0],
                *fastdiff.q_sample(x0, t, s, key=key, return_noise=True),
                fastdiff.diffusion_loss(out, x0, t, s, noise=nz),
                fastdiff.diffusion_loss(out, x0, t, s, key=key, target="v_prediction"),
                *fastdiff.ddpm_step(out, t, x0, s, key=key, variance_type="learned_range",
                                    model_var=torch.rand(shape, generator=g).to(dev, dtype)),
                *fastdiff.ddpm_step(out, t, x0, s, noise=nz, thresholding=True),
                *fastdiff.ddim_step(out, t, x0.contiguous(memory_format=torch.channels_last), s,
                                    t_prev=torch.clamp(t - 7, min=-1), eta=1.0, key=key, clip_sample=True),
            ]
            for r in results:
                assert bool(torch.isfinite(r).all()), f"non-finite output ({dtype}, {shape})"


def group_norm(dev, g):
    import fastdiff

    for dtype in (torch.float32, torch.bfloat16):
        for shape, groups, cl in (((3, 12, 5, 7), 4, False), ((2, 40, 9, 11), 8, True), ((1, 6, 1, 1), 3, False),
                                  ((2, 64, 33, 17), 32, True)):
            N, C = shape[:2]
            x = _misaligned(shape, dev, dtype, g) if not cl else \
                torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            w, b = (torch.randn(C, generator=g).to(dev).requires_grad_(True) for _ in range(2))
            add, sc, sh = (torch.randn(N, C, generator=g).to(dev).requires_grad_(True) for _ in range(3))
            for kw in ({}, dict(add=add), dict(scale=sc, shift=sh), dict(add=add, scale=sc, shift=sh)):
                y = fastdiff.group_norm_act(x, groups, w, b, **kw)
                y.float().square().sum().backward()
                assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(x.grad).all())
                x.grad = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("elementwise", "group_norm"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    import fastdiff

    if a.device == "cuda":
        if not fastdiff.info(as_dict=True)["extension_cuda"]:
            print("the CUDA C++ kernels are not built: nothing to sanitize", file=sys.stderr)
            return 2
        fastdiff.set_backend("cuda")  # every op on its CUDA C++ kernel (attention has none)
    g = torch.Generator().manual_seed(0)
    for split in ("0", "1"):  # the GroupNorm CUDA kernel's normal and split / multi-tile paths
        os.environ["FASTDIFF_GN_CUDA_FORCE_SPLIT"] = split
        if a.only in (None, "elementwise") and split == "0":
            elementwise(a.device, g)
        if a.only in (None, "group_norm"):
            group_norm(a.device, g)
    if a.device == "cuda":
        torch.cuda.synchronize()
    print(f"gpu_sanitize: every {'CUDA C++' if a.device == 'cuda' else 'CPU'} kernel ran "
          f"({a.only or 'all'}); outputs finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
