"""Float64 reference maths of the U-Net block operators: GroupNorm(+add,
+scale/shift, +SiLU) forward and backward, and attention forward and
backward. Plain PyTorch, written for clarity; every backend is tested
against these.

GroupNorm family, for x of shape (N, C, *spatial) and G groups::

    h     = x + add[n, c]                      (add optional: time embedding)
    xhat  = (h - mean_g) * rstd_g              (statistics over C/G channels x spatial)
    a     = xhat * weight[c] + bias[c]         (affine optional)
    z     = a * (1 + scale[n, c]) + shift[n, c]  (scale/shift optional)
    y     = silu(z) if silu else z

Backward, with dz = dy * silu'(z) and per-(n, c) sums over the spatial
positions A = sum dz, B = sum dz * xhat::

    d shift[n,c] = A
    d scale[n,c] = weight[c] * B + bias[c] * A
    d bias[c]    = sum_n (1 + scale) A          d weight[c] = sum_n (1 + scale) B
    g            = weight[c] (1 + scale[n,c])   (d xhat = g dz)
    dx           = rstd (g dz - mean_g(g dz) - xhat mean_g(g dz xhat))
    d add[n,c]   = sum over spatial of dx

Attention, q (B, H, Lq, D), k and v (B, H, Lk, D)::

    s = scale * q k^T,  lse = logsumexp_j s,  p = exp(s - lse),  out = p v
    dv = p^T dout,  dp = dout v^T,  delta = rowsum(dout * out),
    ds = p (dp - delta),  dq = scale ds k,  dk = scale ds^T q
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def _pc(v: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A per-(sample, channel) vector (N, C) shaped to broadcast against x, in float64."""
    if v is None:
        return None
    return v.to(torch.float64).reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def _ch(v: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A per-channel vector (C,) shaped to broadcast against x, in float64."""
    if v is None:
        return None
    return v.to(torch.float64).reshape(1, x.shape[1], *([1] * (x.dim() - 2)))


def _group_size(x: Tensor, groups: int) -> int:
    """Elements per (sample, group): C/G channels x the spatial size."""
    spatial = 1
    for s in x.shape[2:]:
        spatial *= s
    return x.shape[1] // groups * spatial


def group_norm_stats(x: Tensor, groups: int, eps: float, add: Optional[Tensor] = None):
    """(mean, rstd), each (N, G) float64, of h = x + add (two-pass, exact)."""
    h = x.to(torch.float64)
    if add is not None:
        h = h + _pc(add, x)
    hg = h.reshape(x.shape[0], groups, _group_size(x, groups))
    mean = hg.mean(-1)
    var = (hg - mean[..., None]).square().mean(-1)
    return mean, (var + eps).rsqrt()


def _xhat(x, add, mean, rstd, groups):
    h = x.to(torch.float64)
    if add is not None:
        h = h + _pc(add, x)
    hg = h.reshape(x.shape[0], groups, _group_size(x, groups))
    return ((hg - mean.to(torch.float64)[..., None]) * rstd.to(torch.float64)[..., None]).reshape(x.shape)


def group_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], add: Optional[Tensor],
                   scale: Optional[Tensor], shift: Optional[Tensor], groups: int, eps: float, silu: bool):
    """Forward in float64: (y, mean, rstd), y float64 shaped like x, stats (N, G)."""
    mean, rstd = group_norm_stats(x, groups, eps, add)
    z = _xhat(x, add, mean, rstd, groups)
    if weight is not None:
        z = z * _ch(weight, x)
    if bias is not None:
        z = z + _ch(bias, x)
    if scale is not None:
        z = z * (1 + _pc(scale, x))
    if shift is not None:
        z = z + _pc(shift, x)
    y = z * torch.sigmoid(z) if silu else z
    return y, mean, rstd


def group_norm_act_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                            mean: Tensor, rstd: Tensor, groups: int, silu: bool):
    """Backward in float64 from saved (mean, rstd): (dx, dweight, dbias, dadd,
    dscale, dshift); the gradient of an absent optional input is None."""
    N, C = x.shape[:2]
    G = groups
    spatial = tuple(range(2, x.dim()))
    xhat = _xhat(x, add, mean, rstd, G)
    w = _ch(weight, x) if weight is not None else torch.ones((), dtype=torch.float64, device=x.device)
    b = _ch(bias, x) if bias is not None else torch.zeros((), dtype=torch.float64, device=x.device)
    sc1 = 1 + _pc(scale, x) if scale is not None else torch.ones((), dtype=torch.float64, device=x.device)
    a = xhat * w + b
    z = a * sc1 + (_pc(shift, x) if shift is not None else 0)
    dz = grad_y.to(torch.float64)
    if silu:
        s = torch.sigmoid(z)
        dz = dz * s * (1 + z * (1 - s))
    A = dz.sum(spatial) if spatial else dz  # (N, C)
    B = (dz * xhat).sum(spatial) if spatial else dz * xhat
    wv = weight.to(torch.float64) if weight is not None else torch.ones(C, dtype=torch.float64, device=x.device)
    bv = bias.to(torch.float64) if bias is not None else torch.zeros(C, dtype=torch.float64, device=x.device)
    sv = 1 + scale.to(torch.float64).reshape(N, C) if scale is not None else torch.ones(
        N, C, dtype=torch.float64, device=x.device)
    g = wv * sv  # (N, C): d xhat = g dz
    M = _group_size(x, G)
    s1 = (g * A).reshape(N, G, C // G).sum(-1) / M  # mean_g(g dz)
    s2 = (g * B).reshape(N, G, C // G).sum(-1) / M  # mean_g(g dz xhat)
    r = rstd.to(torch.float64)
    rep = C // G

    def per_c(v):  # (N, G) -> (N, C) broadcastable against x
        return v.repeat_interleave(rep, dim=1).reshape(N, C, *([1] * (x.dim() - 2)))

    gx = g.reshape(N, C, *([1] * (x.dim() - 2)))
    dx = per_c(r) * (gx * dz - per_c(s1) - xhat * per_c(s2))
    dweight = (sv * B).sum(0) if weight is not None else None
    dbias = (sv * A).sum(0) if bias is not None else None
    dadd = (dx.sum(spatial) if spatial else dx) if add is not None else None
    dscale = (wv * B + bv * A) if scale is not None else None
    dshift = A if shift is not None else None
    return dx, dweight, dbias, dadd, dscale, dshift


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float):
    """(out, lse) in float64: out (B, H, Lq, D), lse (B, H, Lq)."""
    s = torch.matmul(q.to(torch.float64), k.to(torch.float64).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v.to(torch.float64)), lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float):
    """(dq, dk, dv) in float64, recomputing the probabilities from lse."""
    qd, kd, vd, do = (t.to(torch.float64) for t in (q, k, v, grad_out))
    p = torch.exp(torch.matmul(qd, kd.transpose(-1, -2)) * scale - lse.to(torch.float64)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vd.transpose(-1, -2))
    delta = (do * out.to(torch.float64)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    return torch.matmul(ds, kd) * scale, torch.matmul(ds.transpose(-1, -2), qd) * scale, dv
