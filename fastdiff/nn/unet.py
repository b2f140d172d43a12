"""The DDPM U-Net (Ho et al. 2020), built from the fused blocks of
:mod:`fastdiff.nn.layers`, with named presets.

Architecture (the CIFAR-10 model of the paper's code, 35.7M parameters):
conv_in -> for each resolution level: ``num_res_blocks`` ResBlocks (each
followed by self-attention at the resolutions in ``attn_resolutions``) and a
stride-2 downsample (not after the last level) -> middle ResBlock, attention,
ResBlock -> the mirrored up path with ``num_res_blocks + 1`` ResBlocks per
level, each taking the matching skip activation concatenated on channels, and
a nearest-x2 + conv upsample -> fused GroupNorm+SiLU -> conv_out. The time
embedding is the sinusoid of t through Linear(ch, 4ch)-SiLU-Linear(4ch, 4ch).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .layers import AttentionBlock, Downsample, GroupNormAct, ResBlock, TimeEmbedding, Upsample, _batch_timesteps, \
    _zero_

Tensor = torch.Tensor

__all__ = ["UNet", "PRESETS"]

PRESETS: dict[str, dict] = {
    # Ho et al. 2020, CIFAR-10 32x32: 35.7M parameters.
    "ddpm-cifar10": dict(in_ch=3, out_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                         image_size=32, dropout=0.1),
    # Ho et al. 2020, CelebA-HQ / LSUN 256x256: 114M parameters.
    "ddpm-256": dict(in_ch=3, out_ch=3, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     attn_resolutions=(16,), image_size=256, dropout=0.0),
    # unit tests: 16x16 RGB, attention at 8x8
    "tiny": dict(in_ch=3, out_ch=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16,
                 dropout=0.0, groups=8),
    # small DDPMs on grayscale digits that train on a laptop CPU in minutes
    "digits-16": dict(in_ch=1, out_ch=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                      image_size=16, dropout=0.0, groups=8),
    "digits-32": dict(in_ch=1, out_ch=1, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                      image_size=32, dropout=0.0, groups=8),
}


class _Level(nn.Module):
    """One resolution level: ResBlocks, their attention (or None), and a resampler (or None)."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.xattn = nn.ModuleList()  # cross-attention after each attn (empty without context_dim)
        self.resample: Optional[nn.Module] = None


class UNet(nn.Module):
    """The DDPM U-Net with fused GroupNorm(+time embedding)+SiLU and attention.

    Args:
        in_ch, out_ch: image channels in and out (out is ``2 * out_ch`` with
            ``learn_sigma``: the prediction then the variance values, the layout
            ``fastdiff.ddpm_step(variance_type="learned_range")`` splits).
        ch: base width; level i has ``ch * ch_mult[i]`` channels.
        num_res_blocks: ResBlocks per level on the way down (+1 on the way up).
        attn_resolutions: feature-map sizes (for ``image_size`` inputs) that
            get self-attention after each ResBlock.
        image_size: the training resolution; places the attention levels.
            Other sizes divisible by ``2 ** (len(ch_mult) - 1)`` run too.
        dropout: in every ResBlock. groups, eps: the GroupNorms.
        heads / head_dim: attention heads (head_dim wins when given).
        scale_shift: improved-DDPM ResBlocks (time embedding as scale/shift
            after the norm) instead of DDPM's add before it.
        num_classes: class-conditional when set: ``forward(x, t,
            class_labels=y)`` adds a learned label embedding to the time
            embedding. The embedding has ``num_classes + 1`` rows: label
            ``num_classes`` is "no label", the unconditional model of
            classifier-free guidance (:meth:`null_condition`).
        context_dim: cross-attention when set: after every self-attention
            block (the ``cross_attn_resolutions`` levels and the middle), an
            :class:`~fastdiff.nn.AttentionBlock` whose queries come from the
            feature map and whose keys/values are projected from ``context``
            (N, Lc, context_dim) (the fused ``fastdiff.attention``, Lq != Lk).
            The all-zeros context is the "no context" of :meth:`null_condition`.
        cross_attn_resolutions: where the cross-attention blocks go (default:
            ``attn_resolutions``).
        resamp_with_conv: convs in the down/upsamplers (DDPM: True).
        zero_init: zero the last conv of every ResBlock, attention and the
            output (DDPM's ``init_scale=0``): the untrained model outputs 0.

    forward(x, t, class_labels=None, *, context=None): x (N, in_ch, H, W), any
    float dtype, NCHW or channels_last; t (N,) timesteps (int or float) or a
    scalar; class_labels int64 (N,) in [0, num_classes] (required when
    ``num_classes``; the third positional argument, also accepted as ``y=``);
    context (N, Lc, context_dim) (required when ``context_dim``). Returns
    (N, out_ch or 2*out_ch, H, W). Unconditional models (neither option) have
    the same parameters and state-dict keys as before these options existed.
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), image_size: int = 32,
                 dropout: float = 0.1, groups: int = 32, heads: int = 1, head_dim: Optional[int] = None,
                 scale_shift: bool = False, learn_sigma: bool = False, num_classes: Optional[int] = None,
                 eps: float = 1e-5, resamp_with_conv: bool = True, zero_init: bool = True,
                 context_dim: Optional[int] = None, cross_attn_resolutions: Optional[Sequence[int]] = None):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be None or an int >= 1, got {num_classes!r}")
        if context_dim is not None and (isinstance(context_dim, bool) or not isinstance(context_dim, int)
                                        or context_dim < 1):
            raise ValueError(f"context_dim must be None or an int >= 1, got {context_dim!r}")
        xattn_res = attn_resolutions if cross_attn_resolutions is None else \
            tuple(int(r) for r in cross_attn_resolutions)
        for c in {ch * m for m in ch_mult}:
            if c % groups:
                raise ValueError(f"groups={groups} must divide every level's channels (ch * ch_mult = {c})")
        self.config = dict(in_ch=in_ch, out_ch=out_ch, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           attn_resolutions=attn_resolutions, image_size=image_size, dropout=dropout, groups=groups,
                           heads=heads, head_dim=head_dim, scale_shift=scale_shift, learn_sigma=learn_sigma,
                           num_classes=num_classes, eps=eps, resamp_with_conv=resamp_with_conv, zero_init=zero_init)
        if context_dim is not None:  # only then: unconditional configs (and checkpoints' metadata) stay as they were
            self.config.update(context_dim=context_dim, cross_attn_resolutions=xattn_res)
        self.in_ch, self.out_ch, self.learn_sigma, self.num_classes = in_ch, out_ch, learn_sigma, num_classes
        self.context_dim = context_dim
        self.factor = 2 ** (len(ch_mult) - 1)  # H and W must be divisible by this
        tch = 4 * ch

        def res(i, o):
            return ResBlock(i, o, tch, dropout=dropout, groups=groups, scale_shift=scale_shift, eps=eps,
                            zero_init=zero_init)

        def attn(c):
            return AttentionBlock(c, heads=heads, head_dim=head_dim, groups=groups, eps=eps, zero_init=zero_init)

        self.temb = TimeEmbedding(ch, tch)
        def xattn(c):
            return AttentionBlock(c, heads=heads, head_dim=head_dim, groups=groups, eps=eps, context_dim=context_dim,
                                  zero_init=zero_init)

        # the last row is the null label ("no class") of classifier-free guidance
        self.label_emb = nn.Embedding(num_classes + 1, tch) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        skips, cur, size = [ch], ch, image_size
        self.down = nn.ModuleList()
        for i, m in enumerate(ch_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.res.append(res(cur, ch * m))
                cur = ch * m
                level.attn.append(attn(cur) if size in attn_resolutions else nn.Identity())
                if context_dim is not None:
                    level.xattn.append(xattn(cur) if size in xattn_res else nn.Identity())
                skips.append(cur)
            if i != len(ch_mult) - 1:
                level.resample = Downsample(cur, resamp_with_conv)
                skips.append(cur)
                size //= 2
            self.down.append(level)

        self.mid = nn.ModuleList([res(cur, cur), attn(cur), res(cur, cur)])
        # separate from ``mid`` so an unconditional model's state-dict keys are unchanged
        self.mid_xattn = xattn(cur) if context_dim is not None else None

        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.res.append(res(cur + skips.pop(), ch * m))
                cur = ch * m
                level.attn.append(attn(cur) if size in attn_resolutions else nn.Identity())
                if context_dim is not None:
                    level.xattn.append(xattn(cur) if size in xattn_res else nn.Identity())
            if i != 0:
                level.resample = Upsample(cur, resamp_with_conv)
                size *= 2
            self.up.append(level)

        self.norm_out = GroupNormAct(groups, cur, eps=eps)
        self.conv_out = nn.Conv2d(cur, out_ch * (2 if learn_sigma else 1), 3, padding=1)
        if zero_init:
            _zero_(self.conv_out)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "UNet":
        """A UNet from :data:`PRESETS` (``"ddpm-cifar10"``, ``"ddpm-256"``,
        ``"tiny"``, ``"digits-16"``, ``"digits-32"``), with any constructor
        argument overridden, e.g. ``UNet.from_preset("ddpm-cifar10", learn_sigma=True)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def null_condition(self, class_labels: Optional[Tensor] = None, context: Optional[Tensor] = None) -> dict:
        """The unconditional stand-ins for the given conditioning, as a dict
        with the same keys (only those given): ``class_labels`` -> the null
        label ``num_classes`` (int64, same shape and device), ``context`` ->
        zeros of context's shape and dtype. Classifier-free guidance trains on
        and samples with these (``GaussianDiffusion(cond_drop_prob=...)``)."""
        out = {}
        if class_labels is not None:
            if self.num_classes is None:
                raise ValueError("class_labels given, but this UNet is not class-conditional (num_classes=None)")
            if not isinstance(class_labels, torch.Tensor):
                raise TypeError(f"class_labels must be a tensor, got {type(class_labels).__name__}")
            out["class_labels"] = torch.full(class_labels.shape, self.num_classes, dtype=torch.int64,
                                             device=class_labels.device)
        if context is not None:
            if self.context_dim is None:
                raise ValueError("context given, but this UNet has no cross-attention (context_dim=None)")
            if not isinstance(context, torch.Tensor):
                raise TypeError(f"context must be a tensor, got {type(context).__name__}")
            out["context"] = torch.zeros_like(context)
        return out

    def _check(self, x, t, y, context=None):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4 or x.shape[1] != self.in_ch:
            raise ValueError(f"x must have shape (N, {self.in_ch}, H, W) (in_ch={self.in_ch}), got {tuple(x.shape)}")
        H, W = x.shape[2], x.shape[3]
        if H % self.factor or W % self.factor or H == 0 or W == 0:
            raise ValueError(f"x has spatial size {H}x{W}, but this UNet downsamples {len(self.down) - 1} times: "
                             f"H and W must be positive multiples of {self.factor}")
        t = _batch_timesteps(t, x.shape[0], x.device)
        if self.num_classes is not None:
            if y is None:
                raise ValueError("class_labels (y) are required: this UNet was built with num_classes "
                                 "(pass the null label num_classes for unconditional outputs)")
            if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
                raise ValueError(f"class_labels (y) must be an integer tensor of shape ({x.shape[0]},), got "
                                 f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"class_labels (y) must be an integer tensor, got {y.dtype}")
            if y.device != x.device:
                raise ValueError(f"class_labels (y) are on {y.device}, x on {x.device}")
            # checked on the host only for CPU tensors (a GPU check would synchronise every call)
            if y.device.type == "cpu" and not torch.compiler.is_compiling() and y.numel() and \
                    (int(y.min()) < 0 or int(y.max()) > self.num_classes):
                raise ValueError(f"class_labels (y) must lie in [0, {self.num_classes}] ({self.num_classes} = "
                                 f"no label), got values in [{int(y.min())}, {int(y.max())}]")
        elif y is not None:
            raise ValueError("class_labels (y) given, but this UNet is unconditional (num_classes=None)")
        if self.context_dim is not None:
            if not isinstance(context, torch.Tensor) or not context.is_floating_point() or context.dim() != 3 \
                    or context.shape[0] != x.shape[0] or context.shape[2] != self.context_dim or context.shape[1] < 1:
                got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
                raise ValueError(f"context must be a float tensor of shape ({x.shape[0]}, Lc >= 1, "
                                 f"{self.context_dim}) (this UNet has context_dim={self.context_dim}), got {got}")
            if context.device != x.device:
                raise ValueError(f"context is on {context.device}, x on {x.device}")
        elif context is not None:
            raise ValueError("context given, but this UNet has no cross-attention (context_dim=None)")
        return t

    def forward(self, x: Tensor, t, class_labels: Optional[Tensor] = None, *, context: Optional[Tensor] = None,
                y: Optional[Tensor] = None) -> Tensor:
        if y is not None:
            if class_labels is not None:
                raise ValueError("pass the labels once: class_labels or y, not both")
            class_labels = y
        t = self._check(x, t, class_labels, context)
        emb = self.temb(t)
        if self.label_emb is not None:
            emb = emb + self.label_emb(class_labels)
        if context is not None:
            ctx = context
            p = self.mid_xattn.kv.weight
            if torch.is_autocast_enabled(x.device.type) is False and ctx.dtype != p.dtype:
                ctx = ctx.to(p.dtype)

        def cross(block, h):
            return h if isinstance(block, nn.Identity) else block(h, ctx)

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, (res, attn) in enumerate(zip(level.res, level.attn)):
                h = attn(res(hs[-1], emb))
                hs.append(cross(level.xattn[j], h) if context is not None else h)
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self.mid[0](hs[-1], emb)
        h = self.mid[1](h)
        if context is not None:
            h = cross(self.mid_xattn, h)
        h = self.mid[2](h, emb)

        for level in self.up:
            for j, (res, attn) in enumerate(zip(level.res, level.attn)):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), emb))
                if context is not None:
                    h = cross(level.xattn[j], h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(self.norm_out(h))
