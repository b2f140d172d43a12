"""The fused multistep update, stated plainly in float64.

One row ``r`` of a per-step coefficient table (16 float64 columns) describes
one step of DPM-Solver++ (1/2/3M, midpoint/heun, SDE), UniPC (bh1/bh2, with
the corrector of the step before fused in), Euler (ancestral) and
flow-matching Euler as one linear form over the step's inputs:

    x0   = c_x * sample + c_m * model_output            (then clip / threshold)
    xc   = u_last * last_sample + u_x0 * x0 + sum_j u_hj * H[j]   if u_on != 0
         = sample                                                 otherwise
    prev = a_x * xc + a_m * model_output + a_x0 * x0 + sum_j a_hj * H[j] + a_z * z
    if push: history[i mod K] = x0 (after H was read); last_sample = xc (when kept)

where ``H[j] = history[(i - j) mod K]`` is the data prediction of j steps
ago (j = 1..K, K = history.shape[0] <= 3) and i is the step index (the row).
A coefficient for an age j > K must be 0. Terms whose coefficient is exactly 0
are left out (so NaN or stale values in an unused buffer never leak in).

Key-driven noise: the noise of step i is the fastdiff stream
(:mod:`fastdiff.reference.noise`) of the key ``[seed, offset + i]`` (64-bit
wrap-around), laid out in the memory order of the op's working layout, so
every step draws different noise and the same key reproduces a whole run.
"""
from __future__ import annotations

from typing import Optional

import torch

from .noise import noise_like

NCOEF = 16
MAX_HISTORY = 3
# column names, in table order
COLUMNS = ("c_x", "c_m", "u_on", "u_last", "u_x0", "u_h1", "u_h2", "u_h3",
           "a_x", "a_m", "a_x0", "a_h1", "a_h2", "a_h3", "a_z", "push")
COL = {name: n for n, name in enumerate(COLUMNS)}


def step_key(key: torch.Tensor, i: int) -> torch.Tensor:
    """The key whose stream is step ``i``'s noise: ``[seed, offset + i]``
    (int64 arithmetic wraps around like the kernels' uint64)."""
    seed, offset = (int(v) for v in key.detach().cpu().to(torch.int64).tolist())
    off = (offset + int(i)) & 0xFFFFFFFFFFFFFFFF
    if off >= 2**63:
        off -= 2**64
    return torch.tensor([seed, off], dtype=torch.int64)


def step_noise(like: torch.Tensor, key: torch.Tensor, i: int, dtype=torch.float64) -> torch.Tensor:
    """The in-kernel noise of step ``i`` for a working-layout tensor ``like``
    (dense, batch-major), in ``dtype`` on like's device."""
    return noise_like(like, step_key(key, i), dtype=dtype)


def row_problem(row, K: int, has_last: bool, has_noise: bool) -> Optional[str]:
    """Why coefficient row ``row`` (16 floats) cannot be applied with K history
    slots, or None when it can."""
    vals = [float(v) for v in row]
    if len(vals) != NCOEF:
        return f"a coefficient row has {NCOEF} columns, got {len(vals)}"
    for n, v in enumerate(vals):
        if v != v or v in (float("inf"), float("-inf")):
            return f"column {n} ({COLUMNS[n]}) is {v}"
    for j in range(K + 1, MAX_HISTORY + 1):
        for name in (f"u_h{j}", f"a_h{j}"):
            if vals[COL[name]] != 0.0:
                return f"{name} = {vals[COL[name]]} uses history age {j} but history has K={K} slots"
    if vals[COL["u_on"]] != 0.0 and vals[COL["u_last"]] != 0.0 and not has_last:
        return f"u_last = {vals[COL['u_last']]} needs last_sample, which is empty"
    if vals[COL["a_z"]] != 0.0 and not has_noise:
        return f"a_z = {vals[COL['a_z']]} needs noise or key"
    if vals[COL["push"]] not in (0.0, 1.0):
        return f"push must be 0 or 1, got {vals[COL['push']]}"
    return None


def _clip(x0, clip_range, thresh):
    if thresh is not None:
        s = thresh.to(x0.dtype).reshape((-1,) + (1,) * (x0.dim() - 1))
        return torch.minimum(torch.maximum(x0, -s), s) / s
    if clip_range is not None and clip_range > 0:
        return x0.clamp(-clip_range, clip_range)
    return x0


def multistep_step(model_output: torch.Tensor, sample: torch.Tensor, history: torch.Tensor,
                   last_sample: Optional[torch.Tensor], row, i: int, noise: Optional[torch.Tensor] = None,
                   thresh: Optional[torch.Tensor] = None, clip_range: float = 0.0,
                   compute_dtype=torch.float64):
    """Row ``row`` applied at step ``i``, without side effects.

    Args:
        model_output, sample: (N, ...) tensors.
        history: (K, N, ...), K in 0..3; slot ``(i - j) mod K`` holds H[j].
        last_sample: like sample, or None / an empty tensor when not kept.
        row: the 16 coefficients (a sequence or a 1-D tensor).
        i: the step index (only its residue mod K matters here).
        noise: z, like sample (needed when a_z != 0).
        thresh: per-sample s (N,) for dynamic thresholding, or None.
        clip_range: > 0 clamps x0 to [-clip_range, clip_range] (when no thresh).

    Returns:
        ``(prev, x0, history_new, last_new)`` in ``compute_dtype``;
        last_new is None when last_sample is not kept.
    """
    r = [float(v) for v in (row.tolist() if isinstance(row, torch.Tensor) else row)]
    c = {name: r[n] for n, name in enumerate(COLUMNS)}
    K = history.shape[0]
    cd = compute_dtype
    x = sample.to(cd)
    m = model_output.to(cd)
    hist = history.to(cd)
    kept = last_sample is not None and last_sample.numel() > 0
    H = {j: hist[(i - j) % K] for j in range(1, K + 1)}

    def lin(terms):
        acc = torch.zeros_like(x)
        for coef, val in terms:
            if coef != 0.0:
                acc = acc + coef * val()
        return acc

    x0 = _clip(lin([(c["c_x"], lambda: x), (c["c_m"], lambda: m)]), clip_range, thresh)
    if c["u_on"] != 0.0:
        xc = lin([(c["u_last"], lambda: last_sample.to(cd)), (c["u_x0"], lambda: x0)]
                 + [(c[f"u_h{j}"], (lambda j=j: H[j])) for j in range(1, K + 1)])
    else:
        xc = x
    prev = lin([(c["a_x"], lambda: xc), (c["a_m"], lambda: m), (c["a_x0"], lambda: x0)]
               + [(c[f"a_h{j}"], (lambda j=j: H[j])) for j in range(1, K + 1)]
               + [(c["a_z"], lambda: noise.to(cd))])
    hist_new = hist.clone()
    last_new = last_sample.to(cd).clone() if kept else None
    if c["push"] != 0.0:
        if K > 0:
            hist_new[i % K] = x0
        if kept:
            last_new = xc.clone()
    return prev, x0, hist_new, last_new


__all__ = ["NCOEF", "MAX_HISTORY", "COLUMNS", "COL", "step_key", "step_noise", "row_problem", "multistep_step"]
