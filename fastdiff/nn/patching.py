"""Drop-in fusion of existing models, in place: ``patch(model)`` / ``unpatch(model)``.

What is replaced (only where the result is provably the same computation;
everything else is left alone and, when it looked like a candidate, listed
in the report's ``skipped``):

* plain PyTorch: ``nn.GroupNorm`` directly followed by ``nn.SiLU`` inside an
  ``nn.Sequential`` (one that does not override forward) becomes one
  :class:`GroupNormAct` in the GroupNorm's slot and ``nn.Identity`` in the
  SiLU's slot; every other ``nn.GroupNorm`` becomes ``GroupNormAct(act=False)``.
  The fused modules hold the *same* Parameter objects under the same names,
  so ``state_dict()`` keys and values do not change, and optimisers holding
  the parameters keep working.
* diffusers ``ResnetBlock2D`` (``time_embedding_norm`` "default",
  "scale_shift" or "group", SiLU nonlinearity, GroupNorm norms): the
  instance's class is swapped for a subclass whose forward makes norm1+SiLU
  one fused call and norm2 with the time-embedding add (or scale/shift) + SiLU
  another. "group" is what the ``AutoencoderKL`` decoder's up blocks use: no
  time-embedding projection, and any ``temb`` passed is ignored, so norm2 is a
  plain GroupNorm+SiLU. Submodules are untouched. ``ResnetBlockCondNorm2D``
  (SpatialNorm / AdaGroupNorm conditioned norms: MoVQ-style ``VQModel``
  decoders with ``norm_type="spatial"``; never ``AutoencoderKL``) is listed in
  ``skipped``: its norm is followed by a per-pixel scale/shift from convolved
  latents, which the fused op (per-channel scale/shift) does not express.
* diffusers ``Attention`` running ``AttnProcessor2_0`` / ``AttnProcessor``:
  :class:`FastdiffAttnProcessor` (fused GroupNorm, ``fastdiff.attention``);
  it falls back to the original processor for attention masks or extra args.
* diffusers ``Upsample2D`` with its 3x3 conv (nearest x2 then conv, no
  norm, no transposed conv): the instance's class is swapped for a subclass
  computing the pair as :func:`fastdiff.nn.upsample_conv` (four 2x2 phase
  convs on the small input: 4/9 of the multiply-adds, and the upsampled
  tensor is never written). The conv submodule and its parameters stay; the
  folded kernels are derived from them at call time (kept between calls
  only while no gradient is recorded). An explicit ``output_size`` other than
  twice the input, a conv with hooks or of another type (LoRA), run the
  original forward.
* diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` and the VAE
  ``Encoder`` / ``Decoder`` (``AutoencoderKL``, ``VQModel``...): ``conv_norm_out``
  (a GroupNorm) + ``conv_act`` (SiLU) become one GroupNormAct (+ Identity).

Every resnet, attention, upsampler and output norm of a diffusers
``AutoencoderKL`` is thus fused, in the encoder and the decoder.

Modules with forward hooks, or whose ``forward`` is overridden on the
instance (e.g. offloading hooks), are skipped. ``unpatch`` restores the
original modules, classes and processors (where they were not changed since).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .. import ops as _ops
from .layers import GroupNormAct, cached_upsample_phase, upsample_conv

__all__ = ["patch", "unpatch", "PatchReport", "FastdiffAttnProcessor"]

logger = logging.getLogger("fastdiff.nn")

_RECORDS = "_fastdiff_patch_records"

KINDS = {
    "groupnorm_silu": "nn.GroupNorm + nn.SiLU in an nn.Sequential -> GroupNormAct",
    "groupnorm": "nn.GroupNorm -> GroupNormAct(act=False)",
    "resnet_block": "diffusers ResnetBlock2D -> fused norm1+SiLU, norm2(+temb)+SiLU",
    "attention": "diffusers Attention -> FastdiffAttnProcessor",
    "upsample": "diffusers Upsample2D (nearest x2 + 3x3 conv) -> four 2x2 phase convs",
    "norm_out_silu": "diffusers conv_norm_out + conv_act -> GroupNormAct",
}


@dataclass
class PatchReport:
    """What :func:`patch` replaced (or :func:`unpatch` restored).

    ``replaced``: kind -> qualified module names (kinds: see ``KINDS``);
    ``skipped``: module name -> why it was left alone; ``counts``: kind -> number.
    """
    replaced: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    action: str = "patched"

    def add(self, kind: str, name: str) -> None:
        self.replaced.setdefault(kind, []).append(name or "<root>")

    def skip(self, name: str, why: str) -> None:
        self.skipped[name or "<root>"] = why

    @property
    def counts(self) -> dict:
        return {k: len(v) for k, v in self.replaced.items()}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        lines = [f"fastdiff {self.action} {self.total} module(s)"]
        for kind, names in self.replaced.items():
            shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
            lines.append(f"  {len(names):4d} x {KINDS.get(kind, kind)}: {shown}")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)}:")
            lines.extend(f"    {n}: {why}" for n, why in self.skipped.items())
        return "\n".join(lines)


# ---------------------------------------------------------------- helpers ---
def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _forward_overridden(m: nn.Module) -> bool:
    return "forward" in m.__dict__


def _is_pipeline(obj) -> bool:
    """A diffusers ``DiffusionPipeline`` (duck-typed: a ``components`` dict), which patch/unpatch hand to
    :func:`fastdiff.nn.pipeline.patch_pipeline` / ``unpatch_pipeline``."""
    return isinstance(getattr(obj, "components", None), dict)


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _gn(norm: nn.GroupNorm, x, *, add=None, scale=None, shift=None, silu: bool):
    return _ops.group_norm_act(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, add=add, scale=scale,
                               shift=shift, silu=silu)


def _is_group_norm(m) -> bool:
    """An nn.GroupNorm computing plain GroupNorm (exact type, or our fused one without SiLU)."""
    return type(m) is nn.GroupNorm or (type(m) is GroupNormAct and not m.act)


def _records(model: nn.Module) -> list:
    recs = getattr(model, _RECORDS, None)
    if recs is None:
        recs = []
        setattr(model, _RECORDS, recs)  # a plain attribute: deepcopy/pickle carry it along consistently
    return recs


def _swap(parent: nn.Module, attr: str, new: nn.Module, recs: list, kind: str, name: str) -> None:
    old = parent._modules[attr]
    setattr(parent, attr, new)
    recs.append(("module", kind, name, parent, attr, old, new))


# --------------------------------------------------------------- diffusers --
def _diffusers_classes():
    """(ResnetBlock2D, Attention, (AttnProcessor2_0, AttnProcessor), (UNet2DModel, UNet2DConditionModel,
    vae Encoder, vae Decoder), (ResnetBlockCondNorm2D,), Upsample2D), or None when diffusers cannot be
    imported."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
        from diffusers.models.autoencoders.vae import Decoder, Encoder
        from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
        from diffusers.models.unets.unet_2d import UNet2DModel
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
        from diffusers.models.upsampling import Upsample2D
    except Exception:  # pragma: no cover - diffusers missing or reorganised
        return None
    return (ResnetBlock2D, Attention, (AttnProcessor2_0, AttnProcessor),
            (UNet2DModel, UNet2DConditionModel, Encoder, Decoder), (ResnetBlockCondNorm2D,), Upsample2D)


def _resnet_fusable(block) -> Optional[str]:
    """None when a ResnetBlock2D's forward can be fused, else the reason why not."""
    if block.time_embedding_norm not in ("default", "scale_shift", "group"):
        return f"time_embedding_norm={block.time_embedding_norm!r}"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"nonlinearity {type(block.nonlinearity).__name__} is not SiLU"
    if not (_is_group_norm(block.norm1) and _is_group_norm(block.norm2)):
        return "norm1/norm2 are not nn.GroupNorm"
    if block.time_embedding_norm == "group" and block.time_emb_proj is not None:
        return "time_embedding_norm='group' with a time_emb_proj"  # diffusers refuses to build this
    return None


class _FusedResnetMixin:
    """forward of diffusers' ResnetBlock2D with its two norms fused (mixed in
    front of the block's own class, so everything else is inherited)."""

    def forward(self, input_tensor, temb, *args, **kwargs):
        proj = self.time_emb_proj
        plain = not args and kwargs.get("scale", None) is None and _resnet_fusable(self) is None
        if self.time_embedding_norm == "group":  # diffusers ignores temb here: norm2 is plain GroupNorm
            temb = None
        if temb is not None:
            plain = plain and proj is not None and temb.dim() == 2  # else the original adds temb as given
        else:
            plain = plain and proj is None  # else the original raises its own error
        if not plain:
            return super().forward(input_tensor, temb, *args, **kwargs)

        h = _gn(self.norm1, input_tensor, silu=True)
        if self.upsample is not None:
            if h.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails on large batches
                input_tensor, h = input_tensor.contiguous(), h.contiguous()
            input_tensor, h = self.upsample(input_tensor), self.upsample(h)
        elif self.downsample is not None:
            input_tensor, h = self.downsample(input_tensor), self.downsample(h)
        h = self.conv1(h)

        add = scale = shift = None
        if temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            e = proj(temb)
            if e.shape[0] == 1 and h.shape[0] != 1:
                e = e.expand(h.shape[0], -1)
            if self.time_embedding_norm == "default":
                add = e
            else:
                scale, shift = e.chunk(2, dim=1)
        h = _gn(self.norm2, h, add=add, scale=scale, shift=shift, silu=True)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        # h is conv2's fresh output, which no backward needs: add (and scale) in place, one pass and no
        # allocation; a factor of 1 (every VAE and SD U-Net resnet) skips the division diffusers always runs
        if type(self.conv2) is not nn.Conv2d or h.shape != input_tensor.shape or h.dtype != input_tensor.dtype:
            return (input_tensor + h) / self.output_scale_factor
        h = h.add_(input_tensor)
        return h if self.output_scale_factor == 1 else h.div_(self.output_scale_factor)


def _upsample_conv_of(m) -> Optional[nn.Module]:
    """The conv of a diffusers Upsample2D (named ``conv`` or, for old checkpoints, ``Conv2d_0``)."""
    return getattr(m, "conv" if m.name == "conv" else "Conv2d_0", None)


def _upsample_fusable(m) -> Optional[str]:
    """None when an Upsample2D is nearest x2 followed by a plain 3x3 conv (padding 1), else why not."""
    if m.use_conv_transpose:
        return "use_conv_transpose (a transposed conv, no interpolation)"
    if not m.use_conv or not m.interpolate:
        return "no interpolation followed by a conv"
    if m.norm is not None:
        return f"a {type(m.norm).__name__} before the upsample"
    conv = _upsample_conv_of(m)
    if type(conv) is not nn.Conv2d:
        return f"conv is a {type(conv).__name__}, not nn.Conv2d"
    if _has_hooks(conv) or _forward_overridden(conv):
        return "conv has hooks or an overridden forward"
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) != \
            ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"):
        return "conv is not 3x3, stride 1, zero padding 1, dilation 1, groups 1"
    return None


class _FusedUpsampleMixin:
    """forward of diffusers' Upsample2D with nearest x2 + 3x3 conv computed as
    :func:`fastdiff.nn.upsample_conv` (mixed in front of the module's own class)."""

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        x = hidden_states
        plain = (not args and kwargs.get("scale", None) is None and x.dim() == 4 and x.shape[1] == self.channels
                 and _upsample_fusable(self) is None)
        if plain and output_size is not None:
            plain = tuple(output_size) == (2 * x.shape[2], 2 * x.shape[3])
        if not plain:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        conv = _upsample_conv_of(self)
        return upsample_conv(x, conv.weight, conv.bias, phase=cached_upsample_phase(self, conv.weight, conv.bias))


_FUSED_CLASSES: dict = {}


def _fused_class(base: type, mixin: type = _FusedResnetMixin) -> type:
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        cls = type(f"Fused{base.__name__}", (mixin, base), {"__module__": __name__})
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls  # importable by name, so patched models pickle
        _FUSED_CLASSES[base] = cls
    return cls


def __getattr__(name: str):
    # Unpickling a patched model in a fresh process looks the fused class up
    # by name before anything has been patched: build it on demand.
    if name in ("FusedResnetBlock2D", "FusedUpsample2D"):
        dc = _diffusers_classes()
        if dc is not None:
            return _fused_class(dc[0]) if name == "FusedResnetBlock2D" else _fused_class(dc[5], _FusedUpsampleMixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FastdiffAttnProcessor:
    """A diffusers attention processor running the fused GroupNorm and
    :func:`fastdiff.attention`; a drop-in for ``AttnProcessor2_0`` (scale
    1/sqrt(head_dim)) or ``AttnProcessor`` (``attn.scale``), whichever it
    replaces (``original``), which it calls for attention masks and
    anything else it does not handle.

    Handles 4-D (B, C, H, W) and 3-D (B, L, C) hidden states, self- and
    cross-attention (``encoder_hidden_states``, with ``attn.norm_cross``),
    ``spatial_norm``, q/k norms, ``residual_connection`` and
    ``rescale_output_factor``.
    """

    def __init__(self, original, scale_from_attn: bool = False):
        self.original = original
        self.scale_from_attn = scale_from_attn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attention_mask is not None or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.dim()
        if ndim == 4:
            B, C, H, W = hidden_states.shape
            if attn.group_norm is not None:  # statistics over (C/G, H, W) = those over (C/G, H*W)
                hidden_states = _gn(attn.group_norm, hidden_states, silu=False)
            hidden_states = hidden_states.reshape(B, C, H * W).transpose(1, 2)
        else:
            B = hidden_states.shape[0]
            if attn.group_norm is not None:  # (B, C, L) view of (B, L, C): read channels-last, no copy
                hidden_states = _gn(attn.group_norm, hidden_states.transpose(1, 2), silu=False).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, L, heads * hd) -> (B, heads, L, hd): strided views
        query = query.view(B, -1, heads, head_dim).transpose(1, 2)
        key = key.view(B, -1, heads, head_dim).transpose(1, 2)
        value = value.view(B, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = _ops.attention(query, key, value, attn.scale if self.scale_from_attn else None)
        out = out.transpose(1, 2).reshape(B, -1, heads * head_dim).to(query.dtype)  # a view of the fused output
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _attention_fusable(attn, proc_types) -> Optional[str]:
    if type(attn.processor) not in proc_types:
        return f"processor {type(attn.processor).__name__} is not AttnProcessor2_0/AttnProcessor"
    if attn.to_k is None or attn.to_v is None or attn.to_out is None:
        return "no to_k/to_v/to_out projections"
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return "added_kv_proj_dim (added key/value projections)"
    if getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim:
        return "kv_heads differs from heads"
    if attn.group_norm is not None and not _is_group_norm(attn.group_norm):
        return f"group_norm is a {type(attn.group_norm).__name__}"
    return None


# ------------------------------------------------------------------ patch ---
def patch(model: nn.Module, attention: bool = True, norms: bool = True, upsample: bool = True) -> PatchReport:
    """Fuse ``model`` in place (see the module docstring for what is replaced).

    Args:
        model: any ``nn.Module`` (plain PyTorch, diffusers UNet2DModel /
            UNet2DConditionModel, AutoencoderKL, ...), or a diffusers pipeline
            (then this is :func:`fastdiff.nn.patch_pipeline` with
            ``scheduler=False``, returning its ``PipelineReport``).
        attention: install :class:`FastdiffAttnProcessor` on diffusers
            ``Attention`` modules.
        norms: fuse GroupNorm(+SiLU) modules and diffusers ``ResnetBlock2D``.
        upsample: compute diffusers ``Upsample2D`` (nearest x2 + 3x3 conv) as
            four 2x2 phase convs.

    Returns a :class:`PatchReport` (also logged at INFO on ``fastdiff.nn``).
    Patching twice is harmless (the second call finds nothing new). The
    ``state_dict`` is unchanged. Undo with :func:`unpatch`.
    """
    if not isinstance(model, nn.Module):
        if _is_pipeline(model):
            from .pipeline import patch_pipeline
            return patch_pipeline(model, attention=attention, norms=norms, upsample=upsample)
        raise TypeError(f"model must be an nn.Module or a diffusers pipeline, got {type(model).__name__}")
    report = PatchReport()
    recs = _records(model)
    owned: set = set()  # ids of norms a fused block now computes itself

    uses_diffusers = any(type(m).__module__.startswith("diffusers.") for m in model.modules())
    dc = _diffusers_classes() if uses_diffusers else None
    if dc is not None:
        ResnetBlock2D, Attention, proc_types, unet_types, cond_resnet_types, Upsample2D = dc
        for name, m in list(model.named_modules()):
            if upsample and type(m) is Upsample2D and m.use_conv and not m.use_conv_transpose:
                why = _upsample_fusable(m) or ("forward overridden on the instance" if _forward_overridden(m) else
                                               "has forward hooks" if _has_hooks(m) else None)
                if why:
                    report.skip(name, f"Upsample2D: {why}")
                    continue
                new_cls = _fused_class(Upsample2D, _FusedUpsampleMixin)
                recs.append(("class", "upsample", name, m, Upsample2D, new_cls))
                m.__class__ = new_cls
                report.add("upsample", name)
                continue
            if norms and type(m) is ResnetBlock2D:
                why = _resnet_fusable(m) or ("forward overridden on the instance" if _forward_overridden(m) else
                                             "has forward hooks" if _has_hooks(m) else None)
                if why:
                    report.skip(name, f"ResnetBlock2D: {why}")
                    continue
                recs.append(("class", "resnet_block", name, m, type(m), _fused_class(type(m))))
                m.__class__ = _fused_class(type(m))
                owned.update((id(m.norm1), id(m.norm2)))
                report.add("resnet_block", name)
            elif norms and type(m) in cond_resnet_types:
                report.skip(name, f"{type(m).__name__}: its {type(m.norm1).__name__} norms add a per-pixel "
                                  "(SpatialNorm) or learned (AdaGroupNorm) scale/shift that the fused op does not "
                                  "express")
            elif norms and isinstance(m, _FusedResnetMixin):
                owned.update((id(m.norm1), id(m.norm2)))
            elif attention and isinstance(m, Attention):
                if isinstance(m.processor, FastdiffAttnProcessor):
                    owned.add(id(m.group_norm))
                    continue
                why = _attention_fusable(m, proc_types)
                if why:
                    report.skip(name, f"Attention: {why}")
                    continue
                proc = FastdiffAttnProcessor(m.processor, scale_from_attn=type(m.processor) is not proc_types[0])
                recs.append(("processor", "attention", name, m, m.processor, proc))
                m.set_processor(proc)
                if m.group_norm is not None:
                    owned.add(id(m.group_norm))
                report.add("attention", name)
            elif norms and type(m) in unet_types:
                gn, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
                if type(gn) is nn.GroupNorm and type(act) is nn.SiLU and not _has_hooks(gn) and not _has_hooks(act):
                    full = f"{name}.conv_norm_out" if name else "conv_norm_out"
                    _swap(m, "conv_norm_out", GroupNormAct.from_group_norm(gn, act=True), recs, "norm_out_silu", full)
                    _swap(m, "conv_act", nn.Identity(), recs, "norm_out_silu", full)
                    report.add("norm_out_silu", full)

    if norms:
        fused_plain: dict = {}  # id(GroupNorm) -> its act=False replacement (shared norms stay shared)
        for name, parent in list(model.named_modules()):
            keys = list(parent._modules)
            i = 0
            while i < len(keys):
                k = keys[i]
                child = parent._modules[k]
                full = f"{name}.{k}" if name else k
                if type(child) is not nn.GroupNorm or id(child) in owned:
                    i += 1
                    continue
                if _has_hooks(child):
                    report.skip(full, "GroupNorm with hooks")
                    i += 1
                    continue
                nxt = parent._modules[keys[i + 1]] if i + 1 < len(keys) else None
                if _plain_sequential(parent) and type(nxt) is nn.SiLU and not _has_hooks(nxt):
                    _swap(parent, k, GroupNormAct.from_group_norm(child, act=True), recs, "groupnorm_silu", full)
                    _swap(parent, keys[i + 1], nn.Identity(), recs, "groupnorm_silu", full)
                    report.add("groupnorm_silu", full)
                    i += 2
                    continue
                new = fused_plain.get(id(child))
                if new is None:
                    new = fused_plain[id(child)] = GroupNormAct.from_group_norm(child, act=False)
                _swap(parent, k, new, recs, "groupnorm", full)
                report.add("groupnorm", full)
                i += 1

    logger.info("%s", report)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo every :func:`patch` of ``model``: original modules (holding the
    current parameters), classes and processors come back, except where the
    user has replaced the patched piece since. Returns what was restored."""
    if not isinstance(model, nn.Module):
        if _is_pipeline(model):
            from .pipeline import unpatch_pipeline
            return unpatch_pipeline(model)
        raise TypeError(f"model must be an nn.Module or a diffusers pipeline, got {type(model).__name__}")
    report = PatchReport(action="restored")
    recs = getattr(model, _RECORDS, None) or []
    for rec in reversed(recs):
        kind, name = rec[1], rec[2]
        if rec[0] == "module":
            _, _, _, parent, attr, old, new = rec
            if parent._modules.get(attr) is not new:
                continue
            if isinstance(old, nn.GroupNorm) and old.affine:  # pick up parameters swapped in since
                old.weight, old.bias = new.weight, new.bias
            old.train(new.training)
            setattr(parent, attr, old)
            if isinstance(old, nn.GroupNorm):  # a fused pair is reported once
                report.add(kind, name)
        elif rec[0] == "class":
            _, _, _, m, old_cls, new_cls = rec
            if type(m) is new_cls:
                m.__class__ = old_cls
                report.add(kind, name)
        elif rec[0] == "processor":
            _, _, _, m, old_proc, new_proc = rec
            if m.processor is new_proc:
                m.set_processor(old_proc)
                report.add(kind, name)
    if hasattr(model, _RECORDS):
        delattr(model, _RECORDS)
    return report
