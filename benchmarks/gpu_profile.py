"""Kernel-only throughput and host overhead of the fastdiff operators on a GPU.

`fastdiff bench` times one public call per CUDA-event pair: for tensors that
the GPU processes in ~50 us that measures Python/launch overhead as much as
the kernel. This script separates the two:

1. kernel time: each op captured K times in a CUDA graph and replayed
   (no host work in the timed region), bytes = inputs read once + outputs
   written once, compared with a captured copy of the same tensor;
2. host overhead: wall time per call of the public function on a tiny tensor
   with the GPU queue never starving (what a sampling loop pays per step
   without CUDA graphs);
3. a torch.profiler table of the fused loss, forward + backward.

    python benchmarks/gpu_profile.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fastdiff
from fastdiff.ops._schemas import op

K = 10  # calls per captured graph


def graph_time_ms(fn, reps=20) -> float:
    """Median per-call time of fn() replayed from a CUDA graph of K calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(K):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / K)
    times.sort()
    return times[len(times) // 2]


def host_us(fn, n=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    a = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - a) / n * 1e6


def _inputs(shape, dtype):
    """x0, a noise tensor, a model output, per-sample t in [1, 1000) and the bytes of one tensor."""
    x0, nz, out = (torch.randn(shape, device="cuda").to(dtype) for _ in range(3))
    t = torch.randint(1, 1000, (shape[0],), device="cuda")
    return x0, nz, out, t, x0.numel() * x0.element_size()


def kernels(shape, dtype, backend, sched):
    x0, nz, out, t, B = _inputs(shape, dtype)
    tp = t - 1
    a = sched.alphas_cumprod
    k = fastdiff.draw_key(device="cuda")
    w = torch.ones(shape[0], device="cuda")
    fastdiff.set_backend(backend)
    cases = {
        "q_sample (noise given)": (lambda: op("q_sample")(x0, t, a, nz), 3 * B),
        "q_sample_rng (no noise out)": (lambda: op("q_sample_rng")(x0, t, a, k, False), 2 * B),
        "q_sample_rng (noise out)": (lambda: op("q_sample_rng")(x0, t, a, k, True), 3 * B),
        "loss fwd+grad (key, eps)": (lambda: op("diffusion_loss")(out, x0, t, a, None, k, w, 0, True), 3 * B),
        "loss fwd+grad (noise, v)": (lambda: op("diffusion_loss")(out, x0, t, a, nz, None, w, 2, True), 4 * B),
        "ddpm_step (key)": (lambda: op("ddpm_step")(out, x0, t, tp, a, None, None, k, None, 0, 0, 1.0), 4 * B),
        "ddpm_step (noise given)": (lambda: op("ddpm_step")(out, x0, t, tp, a, None, nz, None, None, 0, 0, 1.0), 5 * B),
        "ddim_step (eta 0)": (lambda: op("ddim_step")(out, x0, t, tp, a, None, None, None, 0, 0.0, 0.0, 1.0, False),
                              4 * B),
    }
    rows = []
    for name, (fn, nbytes) in cases.items():
        ms = graph_time_ms(fn)
        rows.append({"op": name, "backend": backend, "ms": ms, "bytes": nbytes})
    fastdiff.set_backend("auto")
    return rows


def eager_kernels(shape, dtype, sched):
    x0, nz, _, t, B = _inputs(shape, dtype)
    ab = sched.alphas_cumprod.float()
    sa, sb = ab.sqrt(), (1 - ab).sqrt()
    v = (-1,) + (1,) * (x0.dim() - 1)

    def q():
        return sa[t].view(v).to(dtype) * x0 + sb[t].view(v).to(dtype) * nz

    def q_rng():
        e = torch.randn_like(x0)
        return sa[t].view(v).to(dtype) * x0 + sb[t].view(v).to(dtype) * e

    return [{"op": "q_sample (noise given)", "backend": "eager", "ms": graph_time_ms(q), "bytes": 3 * B},
            {"op": "q_sample_rng (no noise out)", "backend": "eager", "ms": graph_time_ms(q_rng), "bytes": 2 * B}]


def copy_row(shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    y = torch.empty_like(x)
    B = x.numel() * x.element_size()
    ms = graph_time_ms(lambda: y.copy_(x))
    return {"op": "copy", "backend": "torch", "ms": ms, "bytes": 2 * B, "gbps": 2 * B / ms / 1e6}


def host_overheads(sched):
    dev = "cuda"
    x = torch.randn(2, 3, 8, 8, device=dev)
    o = torch.randn(2, 3, 8, 8, device=dev, requires_grad=True)
    t = torch.tensor([5, 7], device=dev)
    k = fastdiff.draw_key(device=dev)
    ab = sched.alphas_cumprod.float()
    sa, sb = ab.sqrt(), (1 - ab).sqrt()
    a = sched.alphas_cumprod
    w = torch.ones(2, device=dev)

    def loss():
        o.grad = None
        fastdiff.diffusion_loss(o, x, t, sched, key=k).backward()

    def eager_loss():
        o.grad = None
        torch.nn.functional.mse_loss(o, x).backward()

    res = {
        "fastdiff.q_sample(key=)": host_us(lambda: fastdiff.q_sample(x, t, sched, key=k, return_noise=False)),
        "fastdiff.q_sample(generator)": host_us(lambda: fastdiff.q_sample(x, t, sched, return_noise=False)),
        "torch.ops.fastdiff.q_sample_rng": host_us(lambda: op("q_sample_rng")(x, t, a, k, False)),
        "fastdiff.ddpm_step(key=)": host_us(lambda: fastdiff.ddpm_step(x, t, x, sched, key=k)),
        "torch.ops.fastdiff.ddpm_step": host_us(lambda: op("ddpm_step")(x, x, t, t - 1, a, None, None, k, None, 0, 0,
                                                                        0.0)),
        "fastdiff.diffusion_loss fwd+bwd": host_us(loss, 500),
        "torch.ops.fastdiff.diffusion_loss": host_us(lambda: op("diffusion_loss")(x, x, t, a, None, k, w, 0, True)),
        "eager q_sample (randn + formula)": host_us(
            lambda: sa[t].view(-1, 1, 1, 1) * x + sb[t].view(-1, 1, 1, 1) * torch.randn_like(x)),
        "eager mse fwd+bwd": host_us(eager_loss, 500),
    }
    return res


def loss_profile(sched, shape=(256, 4, 128, 128)):
    dev = "cuda"
    x0 = torch.randn(shape, device=dev)
    o = torch.randn(shape, device=dev, requires_grad=True)
    t = torch.randint(0, 1000, (shape[0],), device=dev)
    k = fastdiff.draw_key(device=dev)

    def step():
        o.grad = None
        fastdiff.diffusion_loss(o, x0, t, sched, key=k).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    sched = fastdiff.NoiseSchedule.make("linear", 1000, device="cuda")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": [], "host_us": {}}
    for shape, dtype in [((256, 4, 128, 128), torch.float32), ((256, 4, 128, 128), torch.bfloat16),
                         ((512, 4, 128, 128), torch.float32)]:
        cp = copy_row(shape, dtype)
        rows = [cp]
        for b in fastdiff.available_backends("cuda"):
            if b != "reference":
                rows += kernels(shape, dtype, b, sched)
        rows += eager_kernels(shape, dtype, sched)
        print(f"\n== {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}: "
              f"{rows[0]['bytes'] / 2 / 2**20:.0f} MiB per tensor, copy {cp['gbps']:.0f} GB/s")
        print(f"{'op':<30}{'backend':<9}{'us':>9}{'GB/s':>8}{'% copy':>8}")
        for r in rows:
            r["gbps"] = r["bytes"] / r["ms"] / 1e6
            r["pct_copy"] = 100 * r["gbps"] / cp["gbps"]
            r["shape"], r["dtype"] = list(shape), str(dtype)
            print(f"{r['op']:<30}{r['backend']:<9}{r['ms'] * 1e3:>9.1f}{r['gbps']:>8.0f}{r['pct_copy']:>7.0f}%")
        result["kernels"] += rows
    print("\n== host overhead per call (tiny tensors, us)")
    result["host_us"] = host_overheads(sched)
    for k_, v in result["host_us"].items():
        print(f"{k_:<40}{v:>8.1f}")
    if not args.no_profile:
        table = loss_profile(sched)
        result["loss_profile"] = table
        print("\n== fused loss fwd+bwd, 256x4x128x128 fp32, 5 iterations")
        print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
