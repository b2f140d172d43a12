"""Host cost of the fused calls: ``fastdiff bench host``.

Tiny tensors (2x1x4x4 float32 by default) on the CPU with one thread, so the
kernels do almost nothing and the time is the Python and dispatcher work
around them: argument checks, timestep handling, the key draw, allocation,
autograd bookkeeping. The same cost is paid on every GPU call, where it can
exceed the kernel itself. Each row is timed next to its baseline in the same
run (interleaved rounds, :func:`fastdiff.bench._timing.time_interleaved`)
and reported in µs per call with the ratio to that baseline and the target
of issue 12 (``ratio <= target``).

Rows (fastdiff call | baseline):

* ``ddpm_step``, ``ddim_step``, ``q_sample`` (key given) | ``torch.add`` of
  the same tensor (the cheapest op a user can call);
* ``q_sample`` | diffusers ``DDPMScheduler.add_noise``;
* ``FusedDDPMScheduler.add_noise`` | diffusers ``add_noise``;
* ``FusedDDPMScheduler.step`` / ``FusedDDIMScheduler.step`` (50-step chain,
  a 0-d timestep tensor as pipelines pass it) | diffusers' ``step``;
* ``diffusion_loss`` forward + backward (noise given, and key-driven) |
  eager ``mse_loss`` forward + backward.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

import fastdiff

from ._timing import T_TRAIN, shape_str, time_interleaved

DEFAULT_SHAPE = (2, 1, 4, 4)
# row -> (baseline impl, target ratio fastdiff/baseline or None)
TARGETS = {
    "ddpm_step": ("torch.add", 6.0),
    "ddim_step": ("torch.add", 6.0),
    "q_sample": ("torch.add", 6.0),
    "q_sample vs add_noise": ("diffusers", None),
    "scheduler.add_noise": ("diffusers", None),
    "FusedDDPMScheduler.step": ("diffusers", 0.3),
    "FusedDDIMScheduler.step": ("diffusers", 0.3),
    "diffusion_loss fwd+bwd": ("eager", 1.0),
    "diffusion_loss(key) fwd+bwd": ("eager", 1.0),
}
ROWS = tuple(TARGETS)


def _cases(shape, diffusers_mod) -> dict:
    """row -> {impl: fn()} (one call each)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    y = torch.randn(shape, generator=g)
    n = shape[0]
    s = fastdiff.NoiseSchedule.make("linear", T_TRAIN)
    t = torch.full((n,), 500, dtype=torch.int64)
    tp = torch.full((n,), 480, dtype=torch.int64)
    key = fastdiff.draw_key(torch.Generator().manual_seed(1))
    out = torch.randn(shape, generator=g).requires_grad_(True)

    def add():
        return torch.add(x, y)

    def fd_loss():
        out.grad = None
        fastdiff.diffusion_loss(out, x, t, s, eps).backward()

    def fd_loss_key():
        out.grad = None
        fastdiff.diffusion_loss(out, x, t, s, key=key).backward()

    def eager_loss():
        out.grad = None
        torch.nn.functional.mse_loss(out, eps).backward()

    c: dict = {
        "ddpm_step": {"fastdiff": lambda: fastdiff.ddpm_step(eps, t, x, s, key=key), "torch.add": add},
        "ddim_step": {"fastdiff": lambda: fastdiff.ddim_step(eps, t, x, s, t_prev=tp), "torch.add": add},
        "q_sample": {"fastdiff": lambda: fastdiff.q_sample(x, t, s, key=key), "torch.add": add},
        "diffusion_loss fwd+bwd": {"fastdiff": fd_loss, "eager": eager_loss},
        "diffusion_loss(key) fwd+bwd": {"fastdiff": fd_loss_key, "eager": eager_loss},
    }
    from fastdiff.diffusion import FusedDDIMScheduler, FusedDDPMScheduler

    fddpm, fddim = FusedDDPMScheduler(), FusedDDIMScheduler()
    for sch in (fddpm, fddim):
        sch.set_timesteps(50)
    ts = fddpm.timesteps[10]
    gen = torch.Generator().manual_seed(2)
    c["scheduler.add_noise"] = {"fastdiff": lambda: fddpm.add_noise(x, eps, t)}
    c["q_sample vs add_noise"] = {"fastdiff": c["q_sample"]["fastdiff"]}
    c["FusedDDPMScheduler.step"] = {"fastdiff": lambda: fddpm.step(eps, ts, x, generator=gen)}
    c["FusedDDIMScheduler.step"] = {"fastdiff": lambda: fddim.step(eps, ts, x)}
    if diffusers_mod is not None:
        dddpm, dddim = diffusers_mod.DDPMScheduler(), diffusers_mod.DDIMScheduler()
        for sch in (dddpm, dddim):
            sch.set_timesteps(50)
        c["scheduler.add_noise"]["diffusers"] = lambda: dddpm.add_noise(x, eps, t)
        c["q_sample vs add_noise"]["diffusers"] = c["scheduler.add_noise"]["diffusers"]
        c["FusedDDPMScheduler.step"]["diffusers"] = lambda: dddpm.step(eps, ts, x, generator=gen)
        c["FusedDDIMScheduler.step"]["diffusers"] = lambda: dddim.step(eps, ts, x)
    return c


def _batched(fn: Callable[[], object], inner: int) -> Callable[[int], object]:
    def run(_i: int):
        for _ in range(inner):
            fn()
    return run


def run_host(shape=DEFAULT_SHAPE, quick: bool = False, rows=None, threads: int = 1,
             log: Optional[Callable[[str], None]] = None) -> list:
    """One dict per (row, impl): ``op`` (the row), ``impl``, ``shape``,
    ``median_us``/``p20_us``/``p80_us`` per call, and on the fastdiff rows
    ``baseline``, ``ratio`` (fastdiff / baseline, same run) and ``target``.
    Runs with ``threads`` CPU threads (restored afterwards)."""
    log = log or (lambda msg: None)
    try:
        import diffusers
        diff_note = ""
    except Exception as e:  # pragma: no cover - diffusers is a dev dependency
        diffusers, diff_note = None, f"diffusers not importable ({type(e).__name__})"
    names = list(rows or ROWS)
    for r in names:
        if r not in TARGETS:
            raise ValueError(f"unknown host row {r!r}; rows are {', '.join(ROWS)}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = _cases(tuple(shape), diffusers)
        out = []
        inner = 20 if quick else 200
        for name in names:
            impls = cases[name]
            base, target = TARGETS[name]
            order = ["fastdiff"] + [i for i in impls if i != "fastdiff"]
            res = time_interleaved([_batched(impls[i], inner) for i in order], 1, quick)
            got = {}
            for impl, st in zip(order, res):
                row = {"suite": "host", "op": name, "impl": impl, "shape": shape_str(shape), "dtype": "fp32",
                       "device": "cpu", "threads": threads, "median_us": None, "p20_us": None, "p80_us": None,
                       "note": ""}
                if isinstance(st, BaseException):
                    row["note"] = f"failed: {type(st).__name__}: {st}"[:200]
                else:
                    row.update(median_us=st["median_ms"] * 1e3 / inner, p20_us=st["p20_ms"] * 1e3 / inner,
                               p80_us=st["p80_ms"] * 1e3 / inner, calls=st["reps"] * inner)
                got[impl] = row
                out.append(row)
            fd, b = got["fastdiff"], got.get(base)
            fd["baseline"], fd["target"] = base, target
            fd["ratio"] = fd["median_us"] / b["median_us"] if b and b["median_us"] and fd["median_us"] else None
            if b is None:
                fd["note"] = fd["note"] or f"no {base} baseline: {diff_note}"
            log(f"  {name:<30}" + "  ".join(f"{i} {got[i]['median_us'] or math.nan:7.2f} us" for i in order))
        return out
    finally:
        torch.set_num_threads(old)


def format_host_table(rows: list) -> str:
    """The host-cost table: µs per call, fastdiff / baseline and the target."""
    head = ["call", "impl", "median us", "p20 us", "p80 us", "ratio", "target", "met"]
    body = []
    for r in rows:
        f = (lambda v: "-" if v is None else f"{v:.2f}")
        ratio, target = r.get("ratio"), r.get("target")
        met = "" if ratio is None or target is None else ("yes" if ratio <= target else "NO")
        body.append([r["op"], r["impl"], f(r["median_us"]), f(r["p20_us"]), f(r["p80_us"]),
                     "" if ratio is None else f"{ratio:.2f}x {r['baseline']}",
                     "" if target is None else f"<= {target}x", met])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and r["op"] != prev:
            lines.append("")
        prev = r["op"]
        lines.append(line(cells))
    notes = [f"  {r['op']} {r['impl']}: {r['note']}" for r in rows if r.get("note")]
    shape = rows[0]["shape"] if rows else "-"
    lines.append("")
    lines.append(f"host cost: {shape} float32 on the CPU, {rows[0]['threads'] if rows else 1} thread(s); "
                 "ratio = fastdiff / baseline in the same run")
    if notes:
        lines.append("notes:")
        lines += notes
    return "\n".join(lines)
