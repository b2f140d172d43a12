"""Fused U-Net building blocks on top of ``fastdiff.group_norm_act`` and
``fastdiff.attention``.

Every GroupNorm here is one fused call: the ResBlock's second norm takes the
time embedding as the op's ``add`` (DDPM) or ``scale``/``shift`` (improved
DDPM), so ``h + temb`` and ``norm(h) * (1 + s) + b`` are never materialised.
Parameter names follow ``torch.nn`` (``weight``/``bias`` for the norms,
Conv2d/Linear weights elsewhere), so state dicts of equivalent unfused
modules load unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as _ops

Tensor = torch.Tensor

__all__ = ["unfused", "GroupNormAct", "timestep_embedding", "TimeEmbedding", "ResBlock", "AttentionBlock", "Downsample",
           "Upsample", "upsample_conv", "upsample_phase_weights", "cached_upsample_phase", "MLPDenoiser"]


_STOCK = False  # set by unfused(): compute with stock PyTorch ops instead of the fused kernels


def _group_norm_act(x, num_groups, weight, bias, *, eps, add=None, scale=None, shift=None, silu=True):
    if _STOCK:
        ex = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        h = F.group_norm(x + add.reshape(ex) if add is not None else x, num_groups, weight, bias, eps)
        if scale is not None:
            h = h * (1 + scale.reshape(ex))
        if shift is not None:
            h = h + shift.reshape(ex)
        return F.silu(h) if silu else h
    # looked up at call time so a backend that rebinds the public function is picked up
    return _ops.group_norm_act(x, num_groups, weight, bias, eps=eps, add=add, scale=scale, shift=shift, silu=silu)


def _attention(q, k, v, scale=None, *, fused=None):
    return _ops.attention(q, k, v, scale, fused=False if _STOCK else fused)


@contextlib.contextmanager
def unfused():
    """Within this block every fastdiff.nn module computes with stock PyTorch
    ops (F.group_norm, elementwise add/scale/shift, F.silu, SDPA) instead of the
    fused kernels: the same model and parameters, for baselines and debugging."""
    global _STOCK
    prev, _STOCK = _STOCK, True
    try:
        yield
    finally:
        _STOCK = prev


# ----------------------------------------------------------------- norm -----
class GroupNormAct(nn.GroupNorm):
    """``silu(GroupNorm(x + add) * (1 + scale) + shift)`` as one fused op.

    A subclass of :class:`torch.nn.GroupNorm` with the same attributes and
    parameters (``weight``, ``bias``), so it loads nn.GroupNorm state dicts and
    passes ``isinstance(m, nn.GroupNorm)`` checks; ``act=False`` makes it a
    plain (fused-kernel) GroupNorm.

    forward(x, add=None, scale=None, shift=None): x (N, C, *spatial); add,
    scale, shift optional (N, C) (trailing size-1 dims allowed) per-(sample,
    channel) vectors: ``add`` before normalising, ``scale``/``shift`` after
    the affine. Output has x's shape, dtype and layout (NCHW or channels_last).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: bool = True, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.act = bool(act)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm, act: bool = True) -> "GroupNormAct":
        """A GroupNormAct sharing ``gn``'s Parameter objects (no copy: training
        either one trains both)."""
        if not isinstance(gn, nn.GroupNorm):
            raise TypeError(f"gn must be an nn.GroupNorm, got {type(gn).__name__}")
        m = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine, act=act, device="meta")
        if gn.affine:
            m.weight, m.bias = gn.weight, gn.bias
        m.train(gn.training)
        return m

    def forward(self, x: Tensor, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"x must have shape (N, {self.num_channels}, ...), got {tuple(x.shape)}")
        return _group_norm_act(x, self.num_groups, self.weight, self.bias, eps=self.eps, add=add, scale=scale,
                               shift=shift, silu=self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


# ------------------------------------------------------------ timesteps -----
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding of the DDPM code (Ho et al. 2020).

    ``emb[n] = [sin(t_n f_0), ..., sin(t_n f_{h-1}), cos(t_n f_0), ..., cos(t_n f_{h-1})]``
    with ``h = dim // 2`` and ``f_i = max_period ** (-i / (h - 1))`` (so the
    frequencies run from 1 down to exactly 1/max_period); sin half first, then
    cos; an odd ``dim`` gets one zero column at the end. This equals diffusers'
    ``get_timestep_embedding(t, dim, flip_sin_to_cos=False,
    downscale_freq_shift=1)``. (ADM puts cos first and divides by h.)

    Args:
        t: (N,) timesteps, integer or float (continuous times work).
        dim: embedding width, >= 1.
    Returns (N, dim) float32 (float64 when t is float64).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"t must have shape (N,), got {tuple(t.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=t.device) * (-math.log(max_period) / max(half - 1, 1)))
    args = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """``Linear(dim, hidden) -> SiLU -> Linear(hidden, out_dim)`` of the sinusoidal
    embedding of t (the DDPM U-Net's ``temb``).

    forward(t): t (N,) -> (N, out_dim). ``out_dim`` defaults to ``hidden``.
    """

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.max_period = dim, max_period
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or hidden)

    def forward(self, t: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(timestep_embedding(t, self.dim, self.max_period))))


def _zero_(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


# ------------------------------------------------------------- ResBlock -----
class ResBlock(nn.Module):
    """The DDPM residual block with both GroupNorms fused.

    ``h = conv1(silu(norm1(x)))``; ``e = temb_proj(silu(temb))``;
    DDPM (``scale_shift=False``): ``h = silu(norm2(h + e))``;
    improved DDPM (``scale_shift=True``, e split into scale, shift):
    ``h = silu(norm2(h) * (1 + scale) + shift)`` -- each norm one fused call;
    then ``out = skip(x) + conv2(dropout(h))`` with ``skip`` a 1x1 conv when
    the channel count changes (identity otherwise).

    forward(x, temb): x (N, in_ch, H, W); temb (N, temb_ch), or None when the
    block was built with ``temb_ch=None``.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: Optional[int], dropout: float = 0.0, groups: int = 32,
                 scale_shift: bool = False, eps: float = 1e-5, zero_init: bool = False):
        super().__init__()
        self.in_ch, self.out_ch, self.scale_shift = in_ch, out_ch, bool(scale_shift)
        self.norm1 = GroupNormAct(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = None if temb_ch is None else nn.Linear(temb_ch, out_ch * (2 if scale_shift else 1))
        self.norm2 = GroupNormAct(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if zero_init:  # DDPM/ADM: each block starts as the identity
            _zero_(self.conv2)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        h = self.conv1(self.norm1(x))
        if self.temb_proj is None:
            h = self.norm2(h)
        else:
            if temb is None:
                raise ValueError("temb is required: this ResBlock was built with temb_ch")
            e = self.temb_proj(F.silu(temb))
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h, scale=scale, shift=shift)
            else:
                h = self.norm2(h, add=e)
        return self.skip(x) + self.conv2(self.dropout(h))


# ------------------------------------------------------------ attention -----
def _heads(ch: int, heads: Optional[int], head_dim: Optional[int]) -> int:
    if head_dim is not None:
        if head_dim < 1 or ch % head_dim:
            raise ValueError(f"head_dim={head_dim} must divide ch={ch}")
        return ch // head_dim
    if heads is None or heads < 1 or ch % heads:
        raise ValueError(f"heads={heads} must be a positive divisor of ch={ch}")
    return heads


class AttentionBlock(nn.Module):
    """Spatial self-attention (or cross-attention) block of the DDPM U-Net:
    ``x + proj(attention(q, k, v))`` with q, k, v from the GroupNorm'd x.

    Self-attention: one 1x1 conv ``qkv`` (ch -> 3 ch); its (N, 3ch, H, W)
    output is read as (N, 3, heads, head_dim, L) and q, k, v are strided
    *views* of it (no permute copies; the fused kernel reads strides). The
    attention output (stored (N, L, heads, head_dim) by the fused kernel) goes
    through ``proj`` (a 1x1 conv, applied as a matmul on that layout) and is
    added to x.

    Cross-attention (``context_dim`` given): q from the 1x1 conv ``q``; k, v
    from the linear ``kv`` (context_dim -> 2 ch) of ``context`` (N, Lc,
    context_dim), again as views.

    Args:
        ch: channels; heads or head_dim (head_dim wins): the head split.
        groups, eps: the GroupNorm (no SiLU). zero_init: start ``proj`` at zero
            (DDPM), so the block starts as the identity.
        fused: passed to :func:`fastdiff.attention` (None: the fused kernel
            where supported, SDPA elsewhere).
    """

    def __init__(self, ch: int, heads: int = 1, head_dim: Optional[int] = None, groups: int = 32,
                 eps: float = 1e-5, context_dim: Optional[int] = None, zero_init: bool = False,
                 fused: Optional[bool] = None):
        super().__init__()
        self.ch, self.heads = ch, _heads(ch, heads, head_dim)
        self.head_dim = ch // self.heads
        self.context_dim, self.fused = context_dim, fused
        self.norm = GroupNormAct(groups, ch, eps=eps, act=False)
        if context_dim is None:
            self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        else:
            self.q = nn.Conv2d(ch, ch, 1)
            self.kv = nn.Linear(context_dim, 2 * ch)
        self.proj = nn.Conv2d(ch, ch, 1)
        if zero_init:
            _zero_(self.proj)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.ch:
            raise ValueError(f"x must have shape (N, {self.ch}, H, W), got {tuple(x.shape)}")
        N, C, H, W = x.shape
        L, nh, hd = H * W, self.heads, self.head_dim
        h = self.norm(x)
        if self.context_dim is None:
            if context is not None:
                raise ValueError("context given to a self-attention AttentionBlock (built without context_dim)")
            # (N, 3C, H, W) -> (N, 3, heads, hd, L): a view for NCHW and for channels_last
            qkv = self.qkv(h).reshape(N, 3, nh, hd, L)
            q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (N, heads, L, hd) views
        else:
            if context is None or context.dim() != 3 or context.shape[0] != N or \
                    context.shape[2] != self.context_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"context must have shape ({N}, Lc, {self.context_dim}), got {got}")
            q = self.q(h).reshape(N, nh, hd, L).transpose(-1, -2)
            kv = self.kv(context).view(N, context.shape[1], 2, nh, hd)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (N, heads, Lc, hd) views
        o = _attention(q, k, v, fused=self.fused)  # (N, heads, L, hd)
        # (N, L, C) is a view of the fused kernel's output; proj as a matmul on it
        # lands in (N, L, C), viewed back as a channels-last (N, C, H, W).
        o = F.linear(o.transpose(1, 2).reshape(N, L, C), self.proj.weight.flatten(1), self.proj.bias)
        return x + o.transpose(1, 2).view(N, C, H, W)


# ----------------------------------------------------------- resampling -----
class Downsample(nn.Module):
    """Halve H and W: a 3x3 stride-2 conv (``with_conv``) or 2x2 average pool.

    The conv pads one row/column at the bottom/right only, as the DDPM
    TensorFlow code ("SAME" padding at stride 2); ``padding="symmetric"``
    pads one on every side (ADM / diffusers' default). Same output size for
    even H, W; the parameters are the same either way.
    """

    def __init__(self, ch: int, with_conv: bool = True, padding: str = "same"):
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1 if padding == "symmetric" else 0) if with_conv \
            else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        if self.padding == "same":
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def upsample_phase_weights(weight: Tensor, bias: Optional[Tensor] = None) -> tuple:
    """The 2x2 kernels of :func:`upsample_conv`: a (Cout, Cin, 3, 3) ``weight``
    becomes (4 Cout, Cin, 2, 2), phase (a, b) in channels (2a + b) Cout ...;
    ``bias`` (Cout) becomes (4 Cout) or stays None.

    After a nearest x2 upsample, output row 2i + a of a 3x3 conv (padding 1)
    reads input rows {i-1, i, i} (a = 0) or {i, i, i+1} (a = 1): two distinct
    rows, so the kernel's rows fold to two, (w0, w1 + w2) or (w0 + w1, w2),
    and likewise its columns. Differentiable (autograd reaches ``weight``).
    """
    if weight.dim() != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"weight must be a (Cout, Cin, 3, 3) conv kernel, got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")

    def fold(w: Tensor, dim: int) -> tuple:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack((w0, w1 + w2), dim), torch.stack((w0 + w1, w2), dim)

    k = torch.stack([kc for kr in fold(weight, 2) for kc in fold(kr, 3)])  # (a, b) order: (0,0) (0,1) (1,0) (1,1)
    return k.flatten(0, 1), None if bias is None else bias.repeat(4)


def upsample_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, phase: Optional[tuple] = None) -> Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``
    for a 3x3 ``weight``, without the upsampled tensor and with 4/9 of the
    multiply-adds.

    Each of the four output phases (even/odd row x even/odd column) is a 2x2
    conv of ``x`` (see :func:`upsample_phase_weights`); the four run as one
    conv with 4 Cout outputs and padding 1, whose (H+1) x (W+1) output holds
    phase (a, b) at offset (a, b). One strided copy interleaves them into
    the (N, Cout, 2H, 2W) result (channels-last when ``x`` is). ``phase``:
    precomputed ``upsample_phase_weights(weight, bias)``. Differentiable in
    ``x``, ``weight`` and ``bias``.

    The folded kernel sums up to four weights before the conv: at fp32 and
    above this is a rounding of the order of the conv's own; in fp16/bf16
    the folded weights are rounded to that format, an extra error of the
    size of rounding the output once.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (Cout, {x.shape[1]}, 3, 3) for x with {x.shape[1]} channels, "
                         f"got shape {tuple(weight.shape)}")
    k, kb = phase if phase is not None else upsample_phase_weights(weight, bias)
    N, _, H, W = x.shape
    Co = weight.shape[0]
    y = F.conv2d(x, k, kb, padding=1)  # (N, 4 Co, H + 1, W + 1)
    sn, sc, sh, sw = y.stride()
    # out[n, c, 2i + a, 2j + b] = y[n, (2a + b) Co + c, i + a, j + b]: a view of y with the phase folded into
    # the row/column strides, so one copy interleaves all four phases
    phases = y.as_strided((N, Co, H, 2, W, 2), (sn, sc, sh, 2 * Co * sc + sh, sw, Co * sc + sw))
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty((N, Co, 2 * H, 2 * W), dtype=y.dtype, device=y.device,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    out.view(N, Co, H, 2, W, 2).copy_(phases)
    return out


def cached_upsample_phase(owner: nn.Module, weight: Tensor, bias: Optional[Tensor]) -> tuple:
    """``upsample_phase_weights(weight, bias)``, kept on ``owner`` while no
    gradient is recorded (sampling, decoding) and recomputed when the
    parameters change (their version counters) or autograd needs the graph;
    never cached inside a ``torch.compile`` trace (the graph computes it)."""
    needs_graph = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_graph or torch.compiler.is_compiling():
        return upsample_phase_weights(weight, bias)
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device,
           None if bias is None else (bias.data_ptr(), bias._version, bias.dtype))
    hit = owner.__dict__.get("_fastdiff_upsample_phase")
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, upsample_phase_weights(weight, bias))
        owner.__dict__["_fastdiff_upsample_phase"] = hit
    return hit[1]


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv (``with_conv``),
    the pair computed by :func:`upsample_conv` (4/9 of the conv's work)."""

    def __init__(self, ch: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None and not _STOCK:
            return upsample_conv(x, self.conv.weight, self.conv.bias,
                                 phase=cached_upsample_phase(self, self.conv.weight, self.conv.bias))
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


# ------------------------------------------------------------ 2-D data ------
class MLPDenoiser(nn.Module):
    """A residual MLP denoiser for low-dimensional data (e.g. the 2-D swiss roll).

    ``e = TimeEmbedding(t)``; ``h = inp(x)``; ``layers`` times
    ``h = h + fc(silu(h + e))``; ``out(silu(h))``.

    forward(x, t): x (N, dim) float, t (N,) -> (N, out_dim or dim).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, temb_dim: int = 32,
                 out_dim: Optional[int] = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.dim = dim
        self.config = dict(dim=dim, hidden=hidden, layers=layers, temb_dim=temb_dim, out_dim=out_dim)
        self.temb = TimeEmbedding(temb_dim, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        t = _batch_timesteps(t, x.shape[0], x.device)
        e = self.temb(t)
        h = self.inp(x)
        for fc in self.blocks:
            h = h + fc(F.silu(h + e))
        return self.out(F.silu(h))


def _batch_timesteps(t, n: int, device) -> Tensor:
    """t as an (n,) tensor: a Python number or 0-d tensor is broadcast; an
    (n,) tensor is used as is; anything else raises a ValueError naming t."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return torch.full((n,), t, device=device, dtype=torch.float32 if isinstance(t, float) else torch.int64)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a number or a tensor of shape ({n},), got {type(t).__name__}")
    if t.dim() == 0:
        return t.reshape(1).expand(n)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"t must have shape ({n},) (one timestep per sample) or be a scalar, got "
                         f"{tuple(t.shape)}")
    return t
