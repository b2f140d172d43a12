"""Datasets for training DDPMs: built-in ones that need no network, an image
folder, and the CIFAR-10 python-pickle directory.

    from fastdiff.data import load_dataset, sample_shape
    ds = load_dataset("digits", image_size=16)     # 1797 samples of shape (1, 16, 16) in [-1, 1]
    ds = load_dataset("swissroll", n=10_000)       # (2,) points, about unit variance
    ds = load_dataset("folder", root="faces/", image_size=64)
    ds = load_dataset("cifar10", root="data/cifar-10-batches-py")

Every item is one float32 tensor. Images are (C, S, S) with values in
[-1, 1]; 2-D data are (2,) points. Datasets that have class labels (digits,
CIFAR-10, an image folder with one subdirectory per class) carry them as
``ds.labels``, an int64 (N,) tensor aligned with the items, with
``ds.num_classes`` and ``ds.classes`` (names); the others have ``labels``
None. The items stay plain tensors, so unconditional code is unchanged; the
trainer reads ``labels`` for a class-conditional model.

The built-in datasets and CIFAR-10 are held in memory as one tensor
(:class:`InMemoryDataset`); the trainer gathers a batch with one indexing
operation (:meth:`InMemoryDataset.get_batch`) instead of collating items one
by one. The image folder is read lazily, one file per item.
"""
from __future__ import annotations

import math
import os
import pickle
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["DATASETS", "load_dataset", "sample_shape", "swiss_roll", "InMemoryDataset", "ImageFolderDataset",
           "IMAGE_EXTENSIONS"]

DATASETS = ("swissroll", "digits", "folder", "cifar10")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

Tensor = torch.Tensor


class InMemoryDataset(Dataset):
    """A dataset held as one float32 tensor ``data`` of shape (N, *sample_shape).

    ``ds[i]`` is ``data[i]``; :meth:`get_batch` gathers many items with one
    indexing operation (the trainer's fast path). ``name`` says where the data
    came from (used in messages).
    """

    def __init__(self, data: Tensor, name: str = "tensor", labels: Optional[Tensor] = None,
                 classes: Optional[list] = None):
        if not isinstance(data, torch.Tensor) or data.dim() < 2:
            raise ValueError(f"data must be a tensor of shape (N, *sample_shape), got "
                             f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
        if data.shape[0] == 0:
            raise ValueError(f"dataset {name!r} is empty")
        self.data = data.to(torch.float32).contiguous()
        self.name = name
        self.labels = self.classes = None
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (data.shape[0],) or labels.is_floating_point() or labels.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor of shape ({data.shape[0]},), got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError("labels must be >= 0")
            self.labels = labels.to(torch.int64).contiguous()
            n = int(labels.max()) + 1 if labels.numel() else 0
            self.classes = list(classes) if classes is not None else [str(i) for i in range(n)]
            if len(self.classes) < n:
                raise ValueError(f"{len(self.classes)} class names for labels up to {n - 1}")

    @property
    def num_classes(self) -> Optional[int]:
        """The number of classes (None without labels)."""
        return None if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i) -> Tensor:
        return self.data[i]

    def get_batch(self, indices: Tensor) -> Tensor:
        """indices: int64 (B,) tensor on ``data``'s device -> float32 (B, *sample_shape)."""
        return self.data.index_select(0, indices)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __repr__(self) -> str:
        lab = f", num_classes={self.num_classes}" if self.labels is not None else ""
        return f"InMemoryDataset({self.name!r}, n={len(self)}, sample_shape={self.sample_shape}{lab})"


# ------------------------------------------------------------ swiss roll ----
# The 2-D swiss roll of Sohl-Dickstein et al. 2015 ("Deep Unsupervised Learning
# using Nonequilibrium Thermodynamics", Fig. 1): a spiral in the plane,
#   theta = 1.5 pi (1 + 2 u),  u ~ U(0, 1)   (theta runs over 1.5 pi .. 4.5 pi: 1.5 turns)
#   (x, y) = theta (cos theta, sin theta) + noise * N(0, I)
# divided by _ROLL_SCALE = sqrt(E[theta^2] / 2) = pi sqrt(39/8) ~ 6.94, the
# root-mean-square coordinate of the noiseless roll, so each coordinate has a
# second moment of ~1 (the roll is not centred: its mean is ~(0.29, 0.03), and
# the coordinate variances are ~(0.91, 1.00)). It is not re-centred, to keep the
# paper's picture.
_ROLL_SCALE = math.pi * math.sqrt(39.0 / 8.0)


def swiss_roll(n: int = 10_000, *, noise: float = 0.25, seed: int = 0) -> Tensor:
    """n points of the 2-D swiss roll, float32 (n, 2), about unit variance per coordinate.

    The points span about [-1.5, 1.9] x [-1.7, 2.1]: train on them with
    ``GaussianDiffusion(..., clip_sample=False)`` (clipping the predicted
    sample to [-1, 1] would cut the roll off).

    Args:
        n: number of points (>= 1).
        noise: standard deviation of the Gaussian jitter added to each point,
            in the roll's raw units (before the division by ~6.94).
        seed: seeds a private generator; the same (n, noise, seed) gives the same points.
    """
    n = _positive_int(n, "n")
    if not (isinstance(noise, (int, float)) and noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    g = torch.Generator().manual_seed(int(seed))
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    pts = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1)
    pts = pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return (pts / _ROLL_SCALE).to(torch.float32)


# ---------------------------------------------------------------- digits ----
def _digits(image_size: int, with_labels: bool = False):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the 'digits' dataset needs scikit-learn (pip install scikit-learn)") from e
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32))  # (1797, 8, 8), values 0..16
    x = (images / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        # bilinear interpolation with antialiasing (which matters only when shrinking);
        # bilinear never overshoots, so the values stay in [0, 1]
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    return (x, torch.from_numpy(bunch.target.astype(np.int64))) if with_labels else x


# ---------------------------------------------------------------- folder ----
def _to_unit_range(arr: np.ndarray) -> Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32).div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (recursively, sorted by path), as RGB
    float32 (3, S, S) in [-1, 1]: the shorter side is resized to S (bicubic,
    antialiased) and the centre S x S square is cropped.

    Files are read lazily, one per item; an unreadable file raises a
    ValueError naming it.

    Folder-per-class: when every image sits in a subdirectory of ``root``
    (none directly in it), the first-level subdirectory is the class:
    ``classes`` (sorted names), ``num_classes`` and ``labels`` (int64 (N,),
    following ``files``). Otherwise those are None.

    Args:
        root: directory to scan; files whose names end in one of
            :data:`IMAGE_EXTENSIONS` (case-insensitive) are used.
        image_size: S, the output side length (>= 1).
    """

    def __init__(self, root: str, image_size: int):
        self.root = os.fspath(root)
        self.image_size = _positive_int(image_size, "image_size")
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist")
        if not os.path.isdir(self.root):
            raise NotADirectoryError(f"image folder {self.root!r} is not a directory")
        files = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root!r}")
        self.files = files
        # classes are fixed by the whole folder, so a subset (load_dataset's n) keeps the same indices
        names = [self._class_of(f) for f in files]
        self._classes = None if any(c is None for c in names) else sorted(set(names))

    def _class_of(self, path: str) -> Optional[str]:
        rel = os.path.relpath(path, self.root)
        parts = rel.split(os.sep)
        return parts[0] if len(parts) > 1 else None

    @property
    def classes(self) -> Optional[list]:
        """Sorted first-level subdirectory names, or None (images directly in root)."""
        return None if self._classes is None else list(self._classes)

    @property
    def num_classes(self) -> Optional[int]:
        c = self.classes
        return None if c is None else len(c)

    @property
    def labels(self) -> Optional[Tensor]:
        """int64 (N,) class indices of ``files`` (into ``classes``), or None."""
        classes = self.classes
        if classes is None:
            return None
        index = {c: i for i, c in enumerate(classes)}
        return torch.tensor([index[self._class_of(f)] for f in self.files], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = self.image_size / min(w, h)
                nw, nh = max(self.image_size, round(w * s)), max(self.image_size, round(h * s))
                im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
                left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot read image {path!r}: {e}") from e
        return _to_unit_range(arr)

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.root!r}, n={len(self)}, image_size={self.image_size})"


# --------------------------------------------------------------- cifar10 ----
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batch dicts but refuses any global other than
    the numpy array constructors: a pickle can otherwise run arbitrary code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_batch(path: str, with_labels: bool = False):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 batch file {path!r} is missing")
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        data = d[b"data"] if b"data" in d else d["data"]
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        if with_labels:
            labels = np.asarray(d[b"labels"] if b"labels" in d else d["labels"], dtype=np.int64)
            if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
                raise ValueError(f"'labels' must be {data.shape[0]} values in 0..9, got shape {labels.shape}")
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise ValueError(f"corrupt CIFAR-10 batch file {path!r}: {e}") from e
    images = data.reshape(-1, 3, 32, 32)
    return (images, labels) if with_labels else images


def _cifar10(root: str, with_labels: bool = False):
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"CIFAR-10 directory {root!r} does not exist (expected the python-pickle "
                                f"directory 'cifar-10-batches-py' with data_batch_1 .. data_batch_5)")
    if not os.path.isfile(os.path.join(root, "data_batch_1")) and \
            os.path.isfile(os.path.join(root, "cifar-10-batches-py", "data_batch_1")):
        root = os.path.join(root, "cifar-10-batches-py")  # the parent directory was given
    batches = [_cifar_batch(os.path.join(root, f"data_batch_{i}"), with_labels) for i in range(1, 6)]
    arrays = [b[0] for b in batches] if with_labels else batches
    x = torch.from_numpy(np.concatenate(arrays))  # (50000, 3, 32, 32) uint8
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    if with_labels:
        return x, torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return x


# ----------------------------------------------------------------- public ----
def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _subset(data: Tensor, n: Optional[int], seed: int, name: str, labels: Optional[Tensor] = None):
    if n is None:
        return data if labels is None else (data, labels)
    n = _positive_int(n, "n")
    if n > data.shape[0]:
        raise ValueError(f"n={n} exceeds the {data.shape[0]} samples of dataset {name!r}")
    idx = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
    if labels is not None:
        return data[idx].contiguous(), labels[idx].contiguous()
    return data[idx].contiguous()


def _resize(x: Tensor, image_size: Optional[int]) -> Tensor:
    if image_size is None or image_size == x.shape[-1]:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                         antialias=True).clamp_(-1, 1)


def load_dataset(name: str, *, root: Optional[str] = None, image_size: Optional[int] = None, n: Optional[int] = None,
                 seed: int = 0) -> Dataset:
    """A dataset by name; items are float32 tensors, with the class labels (where
    the data have them) as ``ds.labels`` (int64 (N,)), ``ds.num_classes``,
    ``ds.classes``: digits (0-9), CIFAR-10 (its 10 classes) and a
    folder-per-class image directory.

    Args:
        name: one of :data:`DATASETS`:

            * ``"swissroll"``: the 2-D swiss roll of Sohl-Dickstein et al. 2015
              (see :func:`swiss_roll`), (2,) points with about unit variance;
              ``n`` points (default 10000) drawn with ``seed``.
            * ``"digits"``: scikit-learn's bundled 8x8 handwritten digits
              (1797 images, no network), upsampled bilinearly to
              ``image_size`` (default 16): (1, S, S) in [-1, 1].
            * ``"folder"``: every image under ``root`` (recursively), RGB,
              shorter side resized to ``image_size`` (default 32) and centre
              cropped: (3, S, S) in [-1, 1]; read lazily.
            * ``"cifar10"``: the 50000 training images of CIFAR-10 from the
              python-pickle directory ``root`` (``cifar-10-batches-py``, or its
              parent): (3, 32, 32) in [-1, 1], resized (bicubic) if
              ``image_size`` differs from 32.
        root: the data directory (``folder`` and ``cifar10`` only).
        image_size: side length S of image samples (ignored for ``swissroll``).
        n: use only n samples: for swissroll the number drawn; for the others a
            subset chosen with ``seed`` (kept in the original order). Default: all.
        seed: seeds the swiss roll and the subset choice.

    Raises:
        ValueError: an unknown name, a bad argument (naming it), or corrupt data
            (naming the file).
        FileNotFoundError: ``root`` missing or holding no data (naming the path).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; datasets are {DATASETS}")
    if image_size is not None:
        image_size = _positive_int(image_size, "image_size")
    if name in ("folder", "cifar10"):
        if root is None:
            raise ValueError(f"dataset {name!r} needs root= (the data directory)")
    elif root is not None:
        raise ValueError(f"dataset {name!r} is built in and takes no root (got root={root!r})")

    if name == "swissroll":
        return InMemoryDataset(swiss_roll(10_000 if n is None else n, seed=seed), "swissroll")
    if name == "digits":
        images, labels = _digits(image_size or 16, with_labels=True)
        data, labels = _subset(images, n, seed, name, labels)
        return InMemoryDataset(data, f"digits-{data.shape[-1]}", labels, [str(i) for i in range(10)])
    if name == "cifar10":
        images, labels = _cifar10(root, with_labels=True)
        data, labels = _subset(images, n, seed, name, labels)
        return InMemoryDataset(_resize(data, image_size), f"cifar10:{root}", labels, CIFAR10_CLASSES)
    ds = ImageFolderDataset(root, image_size or 32)
    if n is not None:
        n = _positive_int(n, "n")
        if n > len(ds):
            raise ValueError(f"n={n} exceeds the {len(ds)} images under {ds.root!r}")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
        ds.files = [ds.files[i] for i in idx.tolist()]
    return ds


def sample_shape(dataset: Dataset) -> tuple[int, ...]:
    """The per-sample shape of ``dataset``, e.g. (1, 16, 16) or (2,): its
    ``sample_shape`` attribute when it has one, else the shape of item 0
    (the first element when items are (data, label) tuples)."""
    shape = getattr(dataset, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    item = dataset[0]
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"dataset items must be tensors (or tuples whose first element is one), got "
                        f"{type(item).__name__}")
    return tuple(item.shape)
