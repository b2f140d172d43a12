"""Training DDPMs: :class:`Trainer` and its :class:`TrainConfig`, and the
checkpoint readers used by ``fastdiff sample`` / ``fastdiff eval``.

    from fastdiff.train import Trainer, TrainConfig, build_from_checkpoint

The modules: :mod:`.config` (:class:`TrainConfig`), :mod:`.ema`
(:class:`EMA`), :mod:`.checkpoint` (atomic writes, readers),
:mod:`.images` (sample grids, scatter plots, the loss curve) and
:mod:`.trainer` (:class:`Trainer`: the step, the seeded data order,
resume, DDP), :mod:`.step` (the compiled / CUDA-graphed step of
``TrainConfig.step_mode``) and :mod:`.device_data` (datasets kept on the
device, random flips). How a step, exact resume and atomic checkpoints work is
described in :mod:`fastdiff.train.trainer`.
"""
from .checkpoint import CHECKPOINT_DIR, build_from_checkpoint, find_checkpoint, load_checkpoint, read_checkpoint_meta
from .config import TrainConfig
from .ema import EMA
from .images import save_image_grid
from .trainer import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "EMA", "load_checkpoint", "build_from_checkpoint",
           "read_checkpoint_meta", "find_checkpoint", "save_image_grid", "CHECKPOINT_DIR"]
