"""Checkpoints: atomic writes (every file fsynced into ``checkpoint.tmp/``, then
renamed into place) and the readers used by ``fastdiff sample`` / ``fastdiff
eval`` (:func:`find_checkpoint`, :func:`read_checkpoint_meta`,
:func:`build_from_checkpoint`, :func:`load_checkpoint`)."""
from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

Tensor = torch.Tensor


CHECKPOINT_DIR = "checkpoint"
_FILES = ("model.safetensors", "ema.safetensors", "state.pt")


# ---------------------------------------------------------------- file I/O --
def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_dict_tensors(module: nn.Module) -> dict[str, Tensor]:
    # safetensors wants contiguous, unshared CPU tensors (channels_last weights are not contiguous)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def atomic_write_dir(out_dir: str, name: str, files: dict[str, bytes]) -> str:
    """Write ``files`` (name -> bytes) as the directory ``out_dir/name``, atomically."""
    final = os.path.join(out_dir, name)
    tmp, old = final + ".tmp", final + ".old"
    if os.path.exists(tmp):  # left by a crash during an earlier write
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        for fname, data in files.items():
            _write_file(os.path.join(tmp, fname), data)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str) -> str:
    """The checkpoint directory for ``path``: ``path`` itself if it holds
    ``state.pt``, else ``path/checkpoint``, else (after a crash between the
    two renames of a checkpoint write) ``path/checkpoint.old`` or
    ``path.old``. Raises FileNotFoundError naming ``path`` if none exists."""
    path = os.fspath(path)
    candidates = [path, os.path.join(path, CHECKPOINT_DIR), os.path.join(path, CHECKPOINT_DIR + ".old"),
                  path + ".old"]
    for c in candidates:
        if all(os.path.isfile(os.path.join(c, f)) for f in _FILES):
            return c
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in _FILES):
        missing = [f for f in _FILES if not os.path.isfile(os.path.join(path, f))]
        raise FileNotFoundError(f"checkpoint {path!r} is incomplete: missing {missing}")
    raise FileNotFoundError(f"no checkpoint found at {path!r} (expected {', '.join(_FILES)} in it or in "
                            f"{os.path.join(path, CHECKPOINT_DIR)!r})")


def load_safetensors(path: str) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt checkpoint file {path!r}: {e}") from e
    info = json.loads(meta["fastdiff"]) if "fastdiff" in meta else {}
    return tensors, info


def load_state(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise ValueError(f"corrupt checkpoint file {path!r}: {e}") from e
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"corrupt checkpoint file {path!r}: not a fastdiff training state")
    return state


def read_checkpoint_meta(path: str) -> dict:
    """The metadata of a checkpoint (directory or run directory): a dict with
    ``model_class``, ``model_config``, ``diffusion_config`` and ``step``."""
    ckpt = find_checkpoint(path)
    from safetensors import safe_open

    fpath = os.path.join(ckpt, "model.safetensors")
    try:
        with safe_open(fpath, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"corrupt checkpoint file {fpath!r}: {e}") from e
    if "fastdiff" not in meta:
        raise ValueError(f"checkpoint file {fpath!r} has no fastdiff metadata")
    return json.loads(meta["fastdiff"])


def _model_classes() -> dict[str, type]:
    from ..nn import MLPDenoiser, UNet

    return {"UNet": UNet, "MLPDenoiser": MLPDenoiser}


def build_from_checkpoint(path: str, ema: bool = True, *, device=None):
    """Rebuild the :class:`~fastdiff.diffusion.GaussianDiffusion` (model and
    diffusion settings) saved in a checkpoint, in eval mode.

    Args:
        path: the checkpoint directory or the run's ``out_dir``.
        ema: load the EMA weights (True) or the raw trained weights.
        device: where to put it (default: the CPU).

    Works for :class:`~fastdiff.nn.UNet` and :class:`~fastdiff.nn.MLPDenoiser`
    models; for other models build the diffusion yourself and use
    :func:`load_checkpoint` with ``diffusion=``.
    """
    from ..diffusion.gaussian import GaussianDiffusion

    meta = read_checkpoint_meta(path)
    classes = _model_classes()
    cls = classes.get(meta.get("model_class"))
    if cls is None or meta.get("model_config") is None:
        raise ValueError(f"checkpoint {path!r} holds a {meta.get('model_class')!r} model, which cannot be rebuilt "
                         f"from metadata (known: {sorted(classes)}); build the model and GaussianDiffusion "
                         f"yourself and call load_checkpoint(path, diffusion)")
    if meta.get("diffusion_config") is None:
        raise ValueError(f"checkpoint {path!r} has no diffusion_config")
    model = cls(**meta["model_config"])
    dcfg = meta["diffusion_config"]
    if "vae" in dcfg:  # latent diffusion: the VAE from its path, or its config + the saved vae.safetensors
        from ..diffusion.latent import LatentDiffusion, load_vae

        vae = None
        vfile = os.path.join(find_checkpoint(path), "vae.safetensors")
        if "path" not in dcfg["vae"] and os.path.isfile(vfile):
            vae = load_vae(dcfg["vae"]["config"])
            tensors, _ = load_safetensors(vfile)
            vae.load_state_dict(tensors)
        diffusion = LatentDiffusion.from_config(model, dcfg, vae=vae)
    else:
        diffusion = GaussianDiffusion.from_config(model, dcfg)
    return load_checkpoint(path, diffusion, ema=ema, device=device)


def load_checkpoint(path: str, diffusion=None, *, ema: bool = True, device=None):
    """Load a checkpoint's weights for sampling or evaluation.

    Args:
        path: the checkpoint directory or the run's ``out_dir``.
        diffusion: a GaussianDiffusion whose ``.model`` receives the weights
            (strictly); None: rebuilt from the checkpoint metadata
            (:func:`build_from_checkpoint`).
        ema: the EMA weights (True) or the raw trained weights (False).
        device: move the result there (default: leave it where it is; a
            rebuilt one lives on the CPU).

    Returns: the GaussianDiffusion, in eval mode.
    """
    if diffusion is None:
        return build_from_checkpoint(path, ema=ema, device=device)
    ckpt = find_checkpoint(path)
    fpath = os.path.join(ckpt, "ema.safetensors" if ema else "model.safetensors")
    tensors, _ = load_safetensors(fpath)
    try:
        diffusion.model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"the weights in {fpath!r} do not fit this model: {e}") from e
    if device is not None:
        diffusion.to(device)
    return diffusion.eval()
