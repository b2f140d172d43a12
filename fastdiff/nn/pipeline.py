"""Fuse a whole diffusers pipeline: ``patch_pipeline(pipe)`` / ``unpatch_pipeline(pipe)``.

Every component of the pipeline that is a diffusers model (``ModelMixin``:
the U-Net or other denoiser, the VAE, a prior...) goes through
:func:`fastdiff.nn.patch`, which only replaces what it can prove computes the
same thing. Components from other libraries (the ``transformers`` text
encoders, the safety checker's CLIP, feature extractors, tokenizers) are left
alone and named in the report. With ``scheduler=True`` the pipeline's
scheduler ``XScheduler`` is replaced by ``fastdiff.diffusion.FusedXScheduler``
built from the same config, when fastdiff has one
(:func:`fastdiff.diffusion.fused_scheduler_class`) and it accepts that config.

State dicts do not change. ``unpatch_pipeline`` (or ``fastdiff.unpatch(pipe)``)
restores every component and the original scheduler object.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..diffusion import fused_scheduler_class
from .patching import PatchReport, _is_pipeline, patch, unpatch

__all__ = ["patch_pipeline", "unpatch_pipeline", "PipelineReport"]

logger = logging.getLogger("fastdiff.nn")

_RECORDS = "_fastdiff_pipeline_records"


@dataclass
class PipelineReport:
    """What :func:`patch_pipeline` did (or :func:`unpatch_pipeline` undid).

    ``components``: component name -> its :class:`PatchReport`;
    ``skipped``: component name -> why it was not patched (including the
    scheduler when it was asked for and could not be swapped);
    ``scheduler``: ``"OldClass -> NewClass"`` when the scheduler was swapped
    (or restored), else None.
    """
    components: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    scheduler: Optional[str] = None
    action: str = "patched"

    @property
    def total(self) -> int:
        return sum(r.total for r in self.components.values()) + (self.scheduler is not None)

    def __getitem__(self, name: str) -> PatchReport:
        return self.components[name]

    def __str__(self) -> str:
        lines = [f"fastdiff {self.action} pipeline: {self.total} change(s)"]
        for name, rep in self.components.items():
            body = str(rep).splitlines()
            lines.append(f"  [{name}] {body[0]}")
            lines.extend("  " + ln for ln in body[1:])
        if self.scheduler:
            lines.append(f"  [scheduler] {self.scheduler}")
        for name, why in self.skipped.items():
            lines.append(f"  [{name}] not patched: {why}")
        return "\n".join(lines)


def _is_diffusers_model(obj) -> bool:
    if not isinstance(obj, nn.Module):
        return False
    try:
        from diffusers.models.modeling_utils import ModelMixin
    except Exception:  # pragma: no cover - diffusers reorganised
        return type(obj).__module__.startswith("diffusers.")
    return isinstance(obj, ModelMixin)


def _records(pipe) -> dict:
    recs = getattr(pipe, _RECORDS, None)
    if recs is None:
        recs = {"models": [], "scheduler": None}
        object.__setattr__(pipe, _RECORDS, recs)  # not a pipeline component: bypass its config bookkeeping
    return recs


def _set_component(pipe, name: str, value) -> None:
    # DiffusionPipeline.__setattr__ keeps pipe.config's (library, class) entry in step, so that
    # save_pretrained writes the class that is actually there
    setattr(pipe, name, value)


def patch_pipeline(pipe, scheduler: bool = False, attention: bool = True, norms: bool = True,
                   upsample: bool = True) -> PipelineReport:
    """Fuse a diffusers pipeline in place.

    Args:
        pipe: a diffusers ``DiffusionPipeline`` (anything with a
            ``components`` dict).
        scheduler: also replace ``pipe.scheduler`` with its fused equivalent
            (``fastdiff.diffusion.Fused<Name>``, from the same config) when
            one exists; otherwise the scheduler is kept and the reason is in
            ``report.skipped["scheduler"]``.
        attention, norms, upsample: passed to :func:`fastdiff.nn.patch` for each model.

    Returns a :class:`PipelineReport` with one :class:`PatchReport` per
    patched component. Patching twice is harmless. Undo with
    :func:`unpatch_pipeline` or ``fastdiff.unpatch(pipe)``.
    """
    if not _is_pipeline(pipe):
        raise TypeError(f"pipe must be a diffusers pipeline (with a components dict), got {type(pipe).__name__}")
    if not isinstance(scheduler, bool):
        raise TypeError(f"scheduler must be a bool, got {type(scheduler).__name__}")
    report = PipelineReport()
    recs = _records(pipe)
    for name, comp in pipe.components.items():
        if comp is None or name == "scheduler":
            continue
        if _is_diffusers_model(comp):
            report.components[name] = patch(comp, attention=attention, norms=norms, upsample=upsample)
            if not any(c is comp for _, c in recs["models"]):
                recs["models"].append((name, comp))
        elif isinstance(comp, nn.Module):
            report.skipped[name] = f"{type(comp).__module__.split('.')[0]} {type(comp).__name__}, not a diffusers model"

    if scheduler:
        old = pipe.components.get("scheduler")
        fused = None if old is None else fused_scheduler_class(old)
        if old is None:
            report.skipped["scheduler"] = "the pipeline has no scheduler"
        elif type(old).__module__.startswith("fastdiff."):
            report.skipped["scheduler"] = f"already a fastdiff scheduler ({type(old).__name__})"
        elif fused is None:
            report.skipped["scheduler"] = f"fastdiff has no Fused{type(old).__name__}"
        else:
            try:
                # every value as the scheduler holds it: diffusers' from_config would otherwise replace the
                # keys listed in _use_default_values by the new class's defaults, even where a pipeline
                # updated them (StableDiffusionPipeline sets steps_offset=1 on old configs)
                cfg = {k: v for k, v in old.config.items() if not k.startswith("_")}
                new = fused.from_config(cfg)
            except (TypeError, ValueError) as e:  # an option the fused scheduler does not support
                report.skipped["scheduler"] = f"{fused.__name__} does not accept this config: {e}"
            else:
                _set_component(pipe, "scheduler", new)
                if recs["scheduler"] is None:  # keep the very first original
                    recs["scheduler"] = (old, new)
                else:
                    recs["scheduler"] = (recs["scheduler"][0], new)
                report.scheduler = f"{type(old).__name__} -> {fused.__name__}"
    logger.info("%s", report)
    return report


def unpatch_pipeline(pipe) -> PipelineReport:
    """Undo every :func:`patch_pipeline` (and ``patch``) of ``pipe``: each
    patched model is unpatched (see :func:`fastdiff.nn.unpatch`) and the
    original scheduler object is put back, unless ``pipe.scheduler`` was
    replaced by something else since. Returns what was restored."""
    if not _is_pipeline(pipe):
        raise TypeError(f"pipe must be a diffusers pipeline (with a components dict), got {type(pipe).__name__}")
    report = PipelineReport(action="restored")
    recs = getattr(pipe, _RECORDS, None) or {"models": [], "scheduler": None}
    for name, comp in recs["models"]:
        report.components[name] = unpatch(comp)
    if recs["scheduler"] is not None:
        old, new = recs["scheduler"]
        if pipe.components.get("scheduler") is new:
            _set_component(pipe, "scheduler", old)
            report.scheduler = f"{type(new).__name__} -> {type(old).__name__}"
        else:
            report.skipped["scheduler"] = "replaced since patching; left as it is"
    if hasattr(pipe, _RECORDS):
        object.__delattr__(pipe, _RECORDS)
    return report
