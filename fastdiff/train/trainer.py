"""Training DDPMs: :class:`Trainer` and its :class:`TrainConfig`, and the
checkpoint readers used by ``fastdiff sample`` / ``fastdiff eval``.

    from fastdiff.data import load_dataset
    from fastdiff.diffusion import GaussianDiffusion
    from fastdiff.nn import UNet
    from fastdiff.train import Trainer, TrainConfig

    diffusion = GaussianDiffusion(UNet.from_preset("digits-16"))
    trainer = Trainer(diffusion, load_dataset("digits"), TrainConfig(steps=2000, out_dir="runs/digits"))
    summary = trainer.train()                  # resume later with Trainer(..., resume=True)

What one step does: a batch from the seeded index stream; the loss
``diffusion(x0, generator=g)`` under autocast (bf16/fp16); backward (through
a GradScaler for fp16); gradients unscaled and clipped to a global norm;
AdamW step; learning-rate schedule step (linear warm-up, then constant or
cosine); EMA update. No host synchronisation happens in a step: losses,
gradient norms and the first step with a non-finite loss are accumulated on
the device and read every ``log_every`` steps.

Reproducibility and exact resume. The data order is a pure function of
(seed, step): the sample stream is the concatenation of per-epoch
permutations, permutation e drawn from a generator seeded with (seed, e), and
step s of rank r takes the positions ``[(s*W + r)*B, (s*W + r + 1)*B)`` of the
stream (W ranks, per-rank batch B). The timesteps and noise come from a
private generator (seeded from (seed, rank)); dropout uses the global RNG.
A checkpoint stores the model, the EMA model, the optimizer, scheduler,
GradScaler, every rank's RNG states and the step, so resuming at step k
replays exactly the steps an uninterrupted run would have taken (bitwise on
the CPU; on a GPU up to the nondeterminism of its kernels).

Checkpoints are written atomically: every file goes into
``out_dir/checkpoint.tmp/`` and is fsynced, then the previous
``out_dir/checkpoint/`` is renamed to ``checkpoint.old``, the new directory
renamed into place, and only then is the old one deleted. A crash at any
point leaves a complete checkpoint (``checkpoint`` or, between the two
renames, ``checkpoint.old``, which the loader falls back to).

Multi-GPU / multi-node: launch with ``torchrun --nproc_per_node N ...``. When
``WORLD_SIZE`` > 1 the trainer joins the process group (NCCL on CUDA, gloo on
CPU), wraps the diffusion module in DistributedDataParallel, shards the
seeded stream across ranks as above (the effective batch is
``batch_size * world_size``), writes files on rank 0 only, and every rank loads
the checkpoint on resume (multi-node needs ``out_dir`` on a shared filesystem).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import time
import warnings
from dataclasses import asdict
from typing import Iterator, Optional, Union

import torch

from ..data import InMemoryDataset, sample_shape as _dataset_sample_shape
from .checkpoint import (CHECKPOINT_DIR, atomic_write_dir, find_checkpoint, load_safetensors, load_state,
                         state_dict_tensors)
from .config import TrainConfig
from .device_data import DeviceData, apply_flips, fits_on_device, flip_mask
from .ema import EMA
from .images import save_image_grid, save_loss_plot, save_scatter

Tensor = torch.Tensor

_NO_BAD_STEP = 2**62  # "no non-finite loss seen yet"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or inf. ``step`` is the first (1-based)
    step whose loss was not finite; no checkpoint was written from that state."""

    def __init__(self, step: int, checkpoint: Optional[str]):
        self.step, self.checkpoint = step, checkpoint
        where = f"the last good checkpoint is {checkpoint!r}" if checkpoint else "no checkpoint had been written"
        super().__init__(f"training diverged: the loss at step {step} is NaN or inf; stopped without saving "
                         f"that state ({where}). Try a lower lr, grad_clip > 0, or precision='fp32'/'bf16'.")


# --------------------------------------------------------------- data order --
class _IndexStream:
    """The seeded sample order: permutation e of range(N) is drawn from a
    generator seeded with (seed, e); the stream is their concatenation."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def indices(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """int64 (batch_size,) dataset indices of 0-based ``step`` for ``rank``."""
        start = (step * world_size + rank) * batch_size
        e0, e1 = start // self.n, (start + batch_size - 1) // self.n
        if e0 == e1:
            o = start - e0 * self.n
            return self._perm(e0)[o:o + batch_size]
        pos = torch.arange(start, start + batch_size)
        return torch.cat([self._perm(e)[pos[pos // self.n == e] - e * self.n] for e in range(e0, e1 + 1)])


class _StepBatchSampler(torch.utils.data.Sampler):
    """Batches of the index stream for steps [start, stop) (DataLoader path)."""

    def __init__(self, stream: _IndexStream, start: int, stop: int, batch_size: int, rank: int, world_size: int):
        self.stream, self.start, self.stop = stream, start, stop
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for s in range(self.start, self.stop):
            yield self.stream.indices(s, self.batch_size, self.rank, self.world_size).tolist()


def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate(items) -> Tensor:
    return torch.stack([_first(it) for it in items])


# ----------------------------------------------------------------- trainer --
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Trainer:
    """Trains a GaussianDiffusion on a dataset; see the module docstring.

    Args:
        diffusion: a :class:`~fastdiff.diffusion.GaussianDiffusion` (anything
            with ``.model`` whose call ``diffusion(x0, generator=g)`` returns
            the scalar loss works). It is moved to the training device.
        dataset: a Dataset whose items are float tensors of one shape (or
            (tensor, label) tuples), or a float tensor (N, *sample_shape).
        config: a :class:`TrainConfig` (default: all defaults).
        resume: False: start at step 0; True: continue from
            ``out_dir/checkpoint`` (FileNotFoundError if there is none); a
            path: continue from that checkpoint (or run) directory.

    Raises ValueError before training when the config is invalid (naming the
    field) or when the model cannot take the dataset's samples (naming the
    shape and, for a UNet, its in_ch / image_size).

    After construction: ``step`` (steps done), ``history`` (log rows),
    ``ema`` (:class:`EMA`; ``ema.model`` is the EMA copy of the model),
    ``ema_diffusion`` (the diffusion around it, used for samples),
    ``rank``/``world_size``, ``device``.
    """

    def __init__(self, diffusion, dataset, config: Optional[TrainConfig] = None, *,
                 resume: Union[bool, str] = False):
        self.config = cfg = copy.deepcopy(config if config is not None else TrainConfig()).validate()
        if isinstance(dataset, torch.Tensor):
            dataset = InMemoryDataset(dataset)
        if len(dataset) == 0:
            raise ValueError("dataset is empty")
        self.dataset = dataset
        self.out_dir = os.fspath(cfg.out_dir)

        self._init_distributed()
        self.device = self._resolve_device()
        self.is_main = self.rank == 0

        self.diffusion = diffusion.to(self.device)
        self.model = diffusion.model
        self.dataset = dataset = self._maybe_cache_latents(dataset)
        self._image_model = any(p.dim() == 4 for p in self.model.parameters())
        if cfg.channels_last and self._image_model:
            self.model.to(memory_format=torch.channels_last)
        self._labels = self._class_labels()
        self.sample_shape = self._check_model_fits()
        self._warn_if_clipped()

        self.diffusion.train()
        wrapped = diffusion
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # parameters (and buffers) are broadcast from rank 0 here, so the ranks start identical
            wrapped = DistributedDataParallel(diffusion, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None, broadcast_buffers=False)
        self._wrapped = wrapped
        if cfg.compile:
            self._forward = torch.compile(wrapped, backend="inductor" if cfg.compile is True else cfg.compile)
        else:
            self._forward = wrapped

        # the EMA copy of the whole diffusion (schedule tables included); its model is the shadow
        self.ema_diffusion = copy.deepcopy(diffusion).eval().requires_grad_(False)
        if getattr(self.ema_diffusion, "sample_shape", None) is None:
            self.ema_diffusion.sample_shape = self.sample_shape
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup, shadow=self.ema_diffusion.model)

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        opt_kwargs = dict(lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
        # fused (one kernel) on CUDA, multi-tensor foreach elsewhere; both are deterministic
        opt_kwargs["fused" if self.device.type == "cuda" else "foreach"] = True
        self.optimizer = torch.optim.AdamW(self.params, **opt_kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

        self.stream = _IndexStream(len(dataset), cfg.seed)
        self.generator = torch.Generator(self.device)
        self._seed_rngs(0)
        self.step = 0
        self.history: list[dict] = []
        self._elapsed_before = 0.0
        self.last_checkpoint: Optional[str] = None
        if resume:
            self._resume(self.out_dir if resume is True else os.fspath(resume))

        self._data = None
        if isinstance(dataset, InMemoryDataset):
            # index a preloaded tensor: on a GPU the whole (small) dataset is kept in device memory
            self._data = dataset.data
            if self.device.type == "cuda" and dataset.data.numel() * 4 <= 2**31:
                self._data = dataset.data.to(self.device)
        self._device_data = self._make_device_data()
        from .step import make_runner  # the compiled / CUDA-graphed step (None: the eager one)

        self._step_runner = make_runner(self)

    def _make_device_data(self) -> Optional[DeviceData]:
        """config.device_data: the dataset on the device (uint8 when it is 8-bit images), or None."""
        mode = self.config.device_data
        if self.config.random_flip and len(self.sample_shape) != 3:
            raise ValueError(f"TrainConfig.random_flip needs image data (C, H, W), the samples have shape "
                             f"{self.sample_shape}")
        if not isinstance(self.dataset, InMemoryDataset):
            if mode == "on":
                raise ValueError(f"TrainConfig.device_data='on' needs an in-memory dataset (a tensor or "
                                 f"fastdiff.data.InMemoryDataset), got {type(self.dataset).__name__}")
            return None
        host = self.dataset.data
        if mode == "off" or (mode == "auto" and not fits_on_device(host.numel() * host.element_size(), self.device)):
            self._data = host  # gathered on the host, copied per batch
            return None
        dd = DeviceData(host, self.device, channels_last=self.config.channels_last and self._image_model)
        self._data = host if self.device.type == "cuda" else self._data  # no second copy on the GPU
        return dd

    # ------------------------------------------------------------ set-up --
    def _init_distributed(self):
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        self._owns_group = False
        if ws > 1 and _dist() is None:
            import torch.distributed as dist

            want_cuda = torch.cuda.is_available() and (self.config.device is None or
                                                       torch.device(self.config.device).type == "cuda")
            if want_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if want_cuda else "gloo")
            self._owns_group = True
        d = _dist()
        self.rank = d.get_rank() if d else 0
        self.world_size = d.get_world_size() if d else 1

    def _resolve_device(self) -> torch.device:
        dev = self.config.device
        if dev is None:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(dev)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"TrainConfig.device={self.config.device!r} but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if self.world_size > 1
                                   else torch.cuda.current_device())
        return dev

    def _check_model_fits(self) -> tuple:
        """One no-grad forward of the loss on a single sample (with a private
        generator, so no training RNG is consumed); errors become a ValueError
        that names the data shape and the model's expectations."""
        item = _first(self.dataset[0])
        if not isinstance(item, torch.Tensor) or not item.is_floating_point():
            raise TypeError(f"dataset items must be float tensors (or (tensor, label) tuples), got "
                            f"{getattr(item, 'dtype', type(item).__name__)}")
        shape = tuple(_dataset_sample_shape(self.dataset)) if hasattr(self.dataset, "sample_shape") \
            else tuple(item.shape)
        want = getattr(self.diffusion, "sample_shape", None)
        if want is not None and tuple(want) != shape and getattr(self.diffusion, "latent_inputs", True):
            raise ValueError(f"the dataset's samples have shape {shape} but the diffusion's sample_shape is "
                             f"{tuple(want)}")
        hint = ""
        cfg = getattr(self.model, "config", None)
        if type(self.model).__name__ == "UNet" and isinstance(cfg, dict):
            f = 2 ** (len(cfg["ch_mult"]) - 1)
            hint = (f"; this UNet takes {cfg['in_ch']}-channel images whose sides are multiples of {f} "
                    f"(built for image_size={cfg['image_size']})")
            if len(shape) == 3 and shape[1] % f == 0 and shape[1] != cfg["image_size"] and \
                    getattr(self.diffusion, "latent_inputs", True):  # (uncached latent diffusion: images in)
                warnings.warn(f"training on {shape[1]}x{shape[2]} images with a UNet built for image_size="
                              f"{cfg['image_size']}: its attention sits at other resolutions than intended",
                              stacklevel=3)
        elif type(self.model).__name__ == "MLPDenoiser" and isinstance(cfg, dict):
            hint = f"; this MLPDenoiser takes vectors of shape ({cfg['dim']},)"
        x = item.unsqueeze(0).to(self.device, torch.float32)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        was_training = self.diffusion.training
        self.diffusion.eval()
        try:
            with torch.no_grad(), self._autocast():
                loss = self.diffusion(x, generator=torch.Generator(self.device).manual_seed(0))
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            raise ValueError(f"the model cannot take the dataset's samples of shape {shape}: {e}{hint}") from e
        finally:
            self.diffusion.train(was_training)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("diffusion(x0, generator=g) must return a scalar loss tensor")
        return shape

    def _maybe_cache_latents(self, dataset):
        """Latent diffusion (a diffusion with ``cache_latents``): encode the
        dataset once and train on its latents when ``config.cache_latents``
        is True, or None (auto) and they fit in
        ``fastdiff.diffusion.latent.LATENT_CACHE_BYTES`` (2 GiB of float32);
        otherwise every batch is encoded in the step."""
        cache = getattr(self.diffusion, "cache_latents", None)
        if cache is None or getattr(self.diffusion, "latent_inputs", False):
            return dataset
        want = getattr(self.config, "cache_latents", None)
        if want is False:
            return dataset
        if want is None:
            from ..diffusion.latent import LATENT_CACHE_BYTES

            if self.diffusion.latent_bytes(dataset) > LATENT_CACHE_BYTES:
                return dataset
        return cache(dataset, device=self.device)

    def _class_labels(self) -> Optional[Tensor]:
        """The dataset's labels (int64 (N,) on the training device) when the
        model is class-conditional (``model.num_classes`` set), else None.
        Step s's labels are ``labels[stream.indices(s)]``: a pure function of
        the step, like its images, so exact resume is unaffected."""
        k = getattr(self.model, "num_classes", None)
        if k is None:
            return None
        labels = getattr(self.dataset, "labels", None)
        if labels is None:
            raise ValueError(f"the model is class-conditional (num_classes={k}) but the dataset has no labels "
                             f"(digits, cifar10 and folder-per-class datasets have them)")
        labels = torch.as_tensor(labels).to(torch.int64)
        if labels.shape != (len(self.dataset),):
            raise ValueError(f"dataset.labels must have shape ({len(self.dataset)},), got {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) >= k:
            raise ValueError(f"the dataset's labels lie in [{int(labels.min())}, {int(labels.max())}] but the "
                             f"model has num_classes={k}")
        return labels.to(self.device)

    def _cond(self, step: int) -> dict:
        """The conditioning keywords of 0-based step ``step`` ({} for an unconditional model)."""
        if self._labels is None:
            return {}
        idx = self.stream.indices(step, self.config.batch_size, self.rank, self.world_size)
        return {"class_labels": self._labels.index_select(0, idx.to(self._labels.device))}

    def _warn_if_clipped(self):
        # the sampler clips x0_hat to [-r, r]: data outside that range cannot be reproduced
        if not (isinstance(self.dataset, InMemoryDataset) and getattr(self.diffusion, "clip_sample", False)):
            return
        r = float(getattr(self.diffusion, "clip_sample_range", 1.0))
        peak = float(self.dataset.data.abs().max())
        if peak > 1.01 * r:
            warnings.warn(f"the data reach |x| = {peak:.3g} but the diffusion clips predicted samples to "
                          f"[-{r:g}, {r:g}] (clip_sample=True): build GaussianDiffusion with clip_sample=False "
                          f"(e.g. for the swiss roll) or rescale the data", stacklevel=3)

    def _autocast(self):
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _lr_lambda(self):
        warmup, total, cosine = self.config.warmup_steps, self.config.steps, self.config.lr_schedule == "cosine"

        def lr_lambda(k: int) -> float:  # k: 0-based index of the step about to be taken
            if warmup and k < warmup:
                return (k + 1) / warmup
            if cosine:
                span = max(1, total - warmup)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / span)))
            return 1.0

        return lr_lambda

    def _seed_rngs(self, step: int):
        # distinct streams per rank; at step 0 this is the run's seed
        base = (self.config.seed * 1_000_003 + self.rank * 7919 + step * 104_729) % (2**63 - 1)
        self.generator.manual_seed(base)
        torch.manual_seed(base + 1)

    def _rng_state(self) -> dict:
        st = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def _set_rng_state(self, st: dict):
        torch.set_rng_state(st["torch"])
        self.generator.set_state(st["generator"])
        if self.device.type == "cuda" and "cuda" in st:
            torch.cuda.set_rng_state(st["cuda"], self.device)

    def _meta(self) -> dict:
        cfg = getattr(self.model, "config", None)
        dcfg = getattr(self.diffusion, "config", None)
        meta = {"model_class": type(self.model).__name__,
                "model_config": cfg if isinstance(cfg, dict) else None,
                "diffusion_config": dcfg if isinstance(dcfg, dict) else None,
                "sample_shape": list(self.sample_shape), "step": self.step}
        if getattr(self.diffusion, "vae", None) is not None:
            meta["latent"] = True  # diffusion_config["vae"] says where the VAE comes from
        if self._labels is not None and getattr(self.dataset, "classes", None) is not None:
            meta["classes"] = list(self.dataset.classes)  # class names, for `fastdiff sample --class NAME`
        return meta

    # -------------------------------------------------------- checkpoints --
    def save_checkpoint(self) -> Optional[str]:
        """Write ``out_dir/checkpoint`` atomically (rank 0; every rank must
        call it, as it gathers the ranks' RNG states). Returns its path."""
        from safetensors.torch import save

        rng = self._rng_state()
        d = _dist()
        if d is not None:
            rngs = [None] * self.world_size
            d.all_gather_object(rngs, {k: v.cpu() for k, v in rng.items()})
        else:
            rngs = [rng]
        path = None
        if self.is_main:
            meta = {"fastdiff": json.dumps(self._meta())}
            run = self._step_runner  # compiled / graphed step: the state as the eager step leaves it
            state = {"format": 1, "step": self.step,
                     "optimizer": run.optimizer_state() if run else self.optimizer.state_dict(),
                     "scheduler": run.scheduler_state() if run else self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(),
                     "ema_updates": self.ema.updates, "rng": rngs, "world_size": self.world_size,
                     "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
                     "meta": self._meta(), "history": self.history, "elapsed": self._elapsed()}
            buf = io.BytesIO()
            torch.save(state, buf)
            os.makedirs(self.out_dir, exist_ok=True)
            files = {"model.safetensors": save(state_dict_tensors(self.model), metadata=meta),
                     "ema.safetensors": save(state_dict_tensors(self.ema.model), metadata=meta),
                     "state.pt": buf.getvalue()}
            vae = getattr(self.diffusion, "vae", None)
            if vae is not None and "path" not in getattr(self.diffusion, "vae_spec", {}):
                files["vae.safetensors"] = save(state_dict_tensors(vae))  # a VAE built from a config: its weights
            path = atomic_write_dir(self.out_dir, CHECKPOINT_DIR, files)
        if d is not None:
            d.barrier()
        self.last_checkpoint = os.path.join(self.out_dir, CHECKPOINT_DIR)
        return path

    def _resume(self, path: str):
        ckpt = find_checkpoint(path)
        state = load_state(os.path.join(ckpt, "state.pt"))
        model_t, info = load_safetensors(os.path.join(ckpt, "model.safetensors"))
        ema_t, _ = load_safetensors(os.path.join(ckpt, "ema.safetensors"))
        saved_class = info.get("model_class")
        if saved_class is not None and saved_class != type(self.model).__name__:
            raise ValueError(f"checkpoint {ckpt!r} holds a {saved_class} model, not a {type(self.model).__name__}")
        try:
            self.model.load_state_dict(model_t)
            self.ema.model.load_state_dict(ema_t)
        except RuntimeError as e:
            raise ValueError(f"the weights in checkpoint {ckpt!r} do not fit this model: {e}") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.ema.updates = int(state["ema_updates"])
        self.step = int(state["step"])
        self.history = [h for h in state.get("history", []) if h["step"] <= self.step]
        self._elapsed_before = float(state.get("elapsed", 0.0))
        old = state.get("config", {})
        for k in ("seed", "batch_size"):
            if k in old and old[k] != getattr(self.config, k):
                warnings.warn(f"resuming with {k}={getattr(self.config, k)} but the checkpoint was trained with "
                              f"{k}={old[k]}: the run will not match an uninterrupted one", stacklevel=3)
        rngs = state.get("rng", [])
        if int(state.get("world_size", 1)) == self.world_size and len(rngs) == self.world_size:
            self._set_rng_state(rngs[self.rank])
        else:
            warnings.warn(f"checkpoint {ckpt!r} was written by {state.get('world_size')} processes, this run has "
                          f"{self.world_size}: the random streams are reseeded from (seed, rank, step)",
                          stacklevel=3)
            self._seed_rngs(self.step)
        self.last_checkpoint = ckpt

    # ----------------------------------------------------------- training --
    def _batches(self, start: int) -> Iterator[Tensor]:
        cfg = self.config
        B, r, W = cfg.batch_size, self.rank, self.world_size
        if self._device_data is not None:
            for s in range(start, cfg.steps):
                yield self._device_data.batch(self.stream.indices(s, B, r, W))
        elif self._data is not None:
            for s in range(start, cfg.steps):
                idx = self.stream.indices(s, B, r, W)
                yield self._data.index_select(0, idx.to(self._data.device, non_blocking=True))
        elif cfg.num_workers == 0:
            for s in range(start, cfg.steps):
                x = _collate([self.dataset[i] for i in self.stream.indices(s, B, r, W).tolist()])
                yield x.pin_memory() if self.device.type == "cuda" else x
        else:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_StepBatchSampler(self.stream, start, cfg.steps, B, r, W),
                num_workers=cfg.num_workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
                # the loader draws its workers' base seed from this generator, not from the
                # global RNG (whose state a resume restores and must not see consumed here)
                generator=torch.Generator().manual_seed(cfg.seed + start))
            yield from loader

    def _elapsed(self) -> float:
        t0 = getattr(self, "_t0", None)
        return self._elapsed_before + (time.perf_counter() - t0 if t0 is not None else 0.0)

    def _first_bad_step(self) -> Optional[int]:
        """Synchronises: the first step (over all ranks) whose loss was not finite."""
        bad = self._bad.clone()
        d = _dist()
        if d is not None:
            d.all_reduce(bad, op=d.ReduceOp.MIN)
        v = int(bad)
        return None if v == _NO_BAD_STEP else v

    def _check_finite(self):
        bad = self._first_bad_step()
        if bad is not None:
            raise TrainingDiverged(bad, self.last_checkpoint)

    def _log(self, pbar):
        cfg = self.config
        self._check_finite()
        vals = torch.stack([self._loss_sum, self._gn_sum]) / max(1, self._count)
        d = _dist()
        if d is not None:
            d.all_reduce(vals)
            vals /= self.world_size
        loss, gn = vals.tolist()
        row = {"step": self.step, "loss": loss, "lr": self._last_lr, "grad_norm": gn,
               "time": round(self._elapsed(), 3)}
        self.history.append(row)
        self._loss_sum.zero_()
        self._gn_sum.zero_()
        self._count = 0
        if pbar is not None:
            pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._last_lr:.2e}", gnorm=f"{gn:.3f}", refresh=False)
        if self.is_main:
            self._write_logs()

    def _write_logs(self):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "log.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "grad_norm", "time"])
            w.writeheader()
            w.writerows(self.history)
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()}
        with open(os.path.join(self.out_dir, "log.json"), "w") as f:
            json.dump({"config": cfg, "meta": self._meta(), "world_size": self.world_size,
                       "history": self.history}, f, indent=1)

    @torch.no_grad()
    def sample(self, n: Optional[int] = None, path: Optional[str] = None) -> Tensor:
        """Draw ``n`` (default ``num_samples``) samples from the EMA model with
        a generator seeded by ``seed`` (the same noise every time, so grids from
        different steps are comparable) and, with ``path``, save them: a PNG
        grid for (1 or 3, H, W) images, a scatter over the data for (2,)
        points, else a ``.pt`` file. Consumes no training randomness."""
        cfg = self.config
        n = cfg.num_samples if n is None else n
        g = torch.Generator(self.device).manual_seed(cfg.seed)
        with self._autocast():
            x = self.ema_diffusion.sample(n, steps=cfg.sample_steps, method=cfg.sample_method, generator=g)
        x = x.float()
        if path is not None:
            if x.dim() == 4 and x.shape[1] in (1, 3):
                save_image_grid(x, path)
            elif x.dim() == 2 and x.shape[1] == 2:
                data = self._data if self._data is not None else None
                save_scatter(x, data, path, f"EMA samples at step {self.step}")
            else:
                torch.save(x.cpu(), os.path.splitext(path)[0] + ".pt")
        return x

    def _sample_file(self) -> str:
        return os.path.join(self.out_dir, f"samples_step{self.step:06d}.png")

    def _train_step(self, x0: Tensor) -> None:
        cfg = self.config
        if cfg.random_flip:
            x0 = apply_flips(x0, flip_mask(cfg.seed, self.step, self.rank, x0.shape[0]))
        if self._step_runner is not None:
            return self._step_runner(x0)
        with self._autocast():
            loss = self._forward(x0, generator=self.generator, **self._cond(self.step))
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        else:
            gn = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler.is_enabled():
            # fp16: the GradScaler skips steps whose gradients overflowed (it synchronises
            # anyway); the lr schedule then waits too, so it counts optimizer steps taken
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() >= scale:
                self.scheduler.step()
        else:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        # bookkeeping on the device: no host synchronisation here
        lf = loss.detach().float()
        self._dev_step += 1
        self._bad = torch.minimum(self._bad, torch.where(torch.isfinite(lf), self._no_bad, self._dev_step))
        self._loss_sum += lf
        self._gn_sum += gn.detach().float()
        self._count += 1

    def train(self) -> dict:
        """Train up to ``config.steps``; returns a summary dict: ``steps``,
        ``final_loss`` (the last logged mean loss), ``time_s`` (cumulative
        over resumes), ``steps_per_s`` (this call's training loop, periodic
        checkpoints and samples included; None if no step was taken),
        ``out_dir``, ``checkpoint``, ``samples`` (the last sample file or
        None), ``loss_plot``, ``log_csv``, ``log_json``, ``history``.

        Raises :class:`TrainingDiverged` if a loss becomes NaN/inf (no
        checkpoint is written from that state; the last good one stays)."""
        from tqdm.auto import tqdm

        cfg = self.config
        dev = self.device
        self._reset_device_counters()
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        self._t0 = time.perf_counter()
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            self._write_logs()  # after a resume: drops rows logged after the checkpoint
        start = self.step
        samples_path = None
        pbar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and self.is_main),
                    dynamic_ncols=True, desc="train")
        try:
            for x0 in self._batches(start):
                x0 = x0.to(dev, non_blocking=True)
                if cfg.channels_last and x0.dim() == 4:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                self._train_step(x0)
                self.step += 1
                pbar.update(1)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or (last and self._count):
                    self._log(pbar)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                    self._check_finite()
                    self.save_checkpoint()
                    if self.is_main:
                        save_loss_plot(self.history, os.path.join(self.out_dir, "loss.png"))
                if cfg.sample_every and cfg.num_samples and self.step % cfg.sample_every == 0 and not last:
                    self._check_finite()
                    if self.is_main:
                        samples_path = self._sample_file()
                        self.sample(path=samples_path)
        finally:
            pbar.close()
        loop_time = time.perf_counter() - self._t0
        self._check_finite()
        if self.step > start or self.last_checkpoint is None:
            self.save_checkpoint()
        loss_plot = None
        if self.is_main:
            if cfg.num_samples:
                samples_path = self._sample_file()
                self.sample(path=samples_path)
            self._write_logs()
            loss_plot = save_loss_plot(self.history, os.path.join(self.out_dir, "loss.png"))
        self._elapsed_before = self._elapsed()
        self._t0 = None
        d = _dist()
        if d is not None:
            d.barrier()
        return {"steps": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
                "time_s": self._elapsed_before,
                "steps_per_s": (self.step - start) / loop_time if self.step > start else None,
                "out_dir": self.out_dir, "checkpoint": self.last_checkpoint, "samples": samples_path,
                "loss_plot": loss_plot, "log_csv": os.path.join(self.out_dir, "log.csv"),
                "log_json": os.path.join(self.out_dir, "log.json"), "history": list(self.history)}

    def _reset_device_counters(self) -> None:
        """The device-side accumulators read at log intervals only (loss and grad-norm sums, the first
        non-finite step) and the device step counter of the compiled/graphed step."""
        dev = self.device
        self._loss_sum = torch.zeros((), device=dev)
        self._gn_sum = torch.zeros((), device=dev)
        self._count = 0
        self._bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=dev)
        self._no_bad = self._bad.clone()
        self._dev_step = torch.full((), self.step, dtype=torch.int64, device=dev)

    def train_step(self, x0: Tensor) -> None:
        """One training step on the batch ``x0`` (on the device) outside
        :meth:`train` -- for benchmarks and custom loops: the step of
        ``config.step_mode`` (random flips included), then ``step`` += 1.
        Nothing is logged, checkpointed or checked for divergence; the
        device-side loss/grad-norm sums keep accumulating."""
        if getattr(self, "_loss_sum", None) is None:
            self._reset_device_counters()
        self._train_step(x0)
        self.step += 1

    def close(self):
        """Leave the process group if this trainer created it."""
        if self._owns_group and _dist() is not None:
            _dist().destroy_process_group()
            self._owns_group = False

