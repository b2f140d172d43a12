"""Sample-quality metrics, offline: FID, Inception Score and KID beside bits/dim.

    from fastdiff.metrics import InceptionExtractor, reference_stats, sample_features, evaluate_samples
    ext = InceptionExtractor("pt_inception-2015-12-05-6726825d.pth")          # never downloads
    ref, path, cached = reference_stats("digits", ext, image_size=16, cache="digits16.npz")
    feats = sample_features(diffusion, ext, 50_000, batch_size=256, method="ddim", steps=50)
    report = evaluate_samples(feats, ref, fid=True, isc=True, kid=True)

The numbers are torch-fidelity's (the field's library, which reproduces the
TensorFlow FID/IS/KID code): its ``inception-v3-compat`` network (InceptionV3
with the 2015-12-05 TF weights, resizing any input to 299x299 with a
TF1-compatible bilinear interpolation), its Frechet distance, Inception Score
and polynomial-kernel KID. This module adds what fastdiff needs around them:

* the weights come only from a local file (:class:`InceptionExtractor`), which
  is checked before use (a readable tensor file, the InceptionV3 keys and
  shapes) and fingerprinted (SHA-256): results from any other file than the
  standard one are labelled as not comparable to published numbers;
* reference statistics (mu, Sigma and the features, for KID) of a fastdiff
  dataset (``digits``, ``cifar10``, ``folder``) are written to an ``.npz`` with
  their provenance and reused (:class:`RefStats`, :func:`reference_stats`);
  an ``.npz`` holding only ``mu``/``sigma`` (pytorch-fid's format) works for FID;
* samples are drawn from a :class:`~fastdiff.diffusion.GaussianDiffusion` in
  batches (any of its samplers) and turned into features batch by batch
  (:func:`sample_features`), so 50k samples never sit in memory as images.

Images enter the network as uint8 RGB: samples in [-1, 1] are quantised as a
saved PNG would be (``round((x + 1) * 127.5)``), one-channel images are
repeated to three channels, both for the samples and for the reference data.

torch-fidelity (and torchvision, which it imports) is an optional dependency:
``pip install 'fastdiff[metrics]'``. It is imported on first use.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

Tensor = torch.Tensor

__all__ = ["STANDARD_WEIGHTS", "STANDARD_FID_SAMPLES", "InceptionExtractor", "Features", "RefStats",
           "random_inception_weights", "to_uint8_rgb", "dataset_features", "sample_features", "reference_stats",
           "default_cache_dir", "frechet_distance", "inception_score", "kernel_inception_distance",
           "evaluate_samples", "format_report"]

#: The InceptionV3 weights every published FID/IS/KID uses: the TensorFlow
#: 2015-12-05 graph converted to PyTorch. ``sha256`` is the prefix of the
#: file's SHA-256 that both publishers put in the file name.
STANDARD_WEIGHTS = {
    "file": "pt_inception-2015-12-05-6726825d.pth",
    "sha256": "6726825d",
    "urls": (
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
    ),
}

#: Samples for a FID that can be compared with published numbers (against the
#: training set's statistics): FID is biased upward at smaller sample counts.
STANDARD_FID_SAMPLES = 50_000

_POOL, _LOGITS = "2048", "logits_unbiased"  # torch-fidelity's feature names: pool3 and the pre-softmax logits
_EXTRACTOR = "inception-v3-compat"
_INPUT_SIZE = 299


def _missing_weights_message(what: str) -> str:
    return (f"{what}. FID, IS and KID need the standard InceptionV3 weights file {STANDARD_WEIGHTS['file']} "
            f"(the TensorFlow 2015-12-05 weights converted to PyTorch, about 92 MB; fastdiff never downloads it). "
            f"It is published at {STANDARD_WEIGHTS['urls'][0]} (torch-fidelity publishes the same file as "
            f"{STANDARD_WEIGHTS['urls'][1]}). Download it once and pass it with --inception-weights PATH "
            f"(or the FASTDIFF_INCEPTION_WEIGHTS environment variable; in Python: InceptionExtractor(PATH))")


def _import_fidelity():
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("FID/IS/KID need torch-fidelity (and torchvision matching your torch): "
                          "pip install 'fastdiff[metrics]' (or pip install torch-fidelity torchvision)") from e
    return torch_fidelity, FeatureExtractorInceptionV3


def _expected_state_shapes() -> dict:
    """Key -> shape of the standard InceptionV3 state dict (1008 classes, no aux
    head), from torchvision's architecture built on the meta device (no memory)."""
    from torchvision.models import inception_v3

    with torch.device("meta"):
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _check_state_dict(sd, path: str) -> None:
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--inception-weights {path!r} is not an InceptionV3 state dict (expected a dict of "
                         f"tensors, got {type(sd).__name__})")
    want = _expected_state_shapes()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    wrong = [f"{k}: {tuple(sd[k].shape)} instead of {want[k]}" for k in want
             if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or extra or wrong:
        def few(xs):
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

        parts = ([f"{len(missing)} missing keys: {few(missing)}"] if missing else []) + \
                ([f"{len(extra)} unexpected keys: {few(extra)}"] if extra else []) + \
                ([f"{len(wrong)} shape mismatches: {few(wrong)}"] if wrong else [])
        raise ValueError(f"--inception-weights {path!r} does not hold the InceptionV3 FID network "
                         f"({'; '.join(parts)}). Expected {STANDARD_WEIGHTS['file']} ({STANDARD_WEIGHTS['urls'][0]})")


class InceptionExtractor:
    """torch-fidelity's ``inception-v3-compat`` network, loaded from a local file.

    Args:
        weights_path: an InceptionV3 state dict saved with ``torch.save`` (the
            standard file is :data:`STANDARD_WEIGHTS` ``["file"]``). Read with
            ``weights_only=True`` and checked key by key before use.
        device: where the network runs (default CPU).

    Raises:
        FileNotFoundError: ``weights_path`` is None or does not exist; the
            message says which file is expected, where it is published and
            how to pass it.
        ValueError: the file is not a tensor file, or not InceptionV3 weights.
        ImportError: torch-fidelity / torchvision are not installed.

    Attributes: ``path``, ``sha256`` (hex digest), ``standard`` (the digest
    matches the standard file: scores comparable to published ones),
    ``device``. Calling it on uint8 images (N, 3, H, W) returns float32 CPU
    tensors ``(pool (N, 2048), logits (N, 1008))``.
    """

    feature_dim = 2048
    num_logits = 1008

    def __init__(self, weights_path: Optional[str], device="cpu"):
        if weights_path is None or weights_path == "":
            raise FileNotFoundError(_missing_weights_message("no InceptionV3 weights were given"))
        path = os.fspath(weights_path)
        if not os.path.exists(path):
            raise FileNotFoundError(_missing_weights_message(f"--inception-weights {path!r} does not exist"))
        if not os.path.isfile(path):
            raise ValueError(f"--inception-weights {path!r} is not a file")
        _, Extractor = _import_fidelity()
        with open(path, "rb") as f:
            raw = f.read()
        try:
            sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, or a pickle with arbitrary objects
            raise ValueError(f"--inception-weights {path!r} is not a PyTorch tensor file (torch.load with "
                             f"weights_only=True failed: {str(e).splitlines()[0][:200]}). Expected "
                             f"{STANDARD_WEIGHTS['file']} ({STANDARD_WEIGHTS['urls'][0]})") from None
        _check_state_dict(sd, path)
        del sd
        self.path = os.path.abspath(path)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.standard = self.sha256.startswith(STANDARD_WEIGHTS["sha256"])
        self.device = torch.device(device)
        # torch-fidelity reads the weights with torch.load; give it the bytes checked above
        self.net = Extractor(_EXTRACTOR, [_POOL, _LOGITS], feature_extractor_weights_path=io.BytesIO(raw))
        self.net.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] != 3:
            got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                   else type(images).__name__)
            raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {got} (use to_uint8_rgb)")
        if images.shape[0] == 0:
            raise ValueError("images is empty")
        pool, logits = self.net(images.to(self.device))
        return pool.float().cpu(), logits.float().cpu()

    def describe(self) -> dict:
        import torch_fidelity

        return {
            "extractor": f"torch-fidelity {torch_fidelity.__version__} {_EXTRACTOR} (InceptionV3: pool3 2048-d "
                         f"features for FID/KID, 1008 logits for IS)",
            "inception_weights": self.path, "inception_weights_sha256": self.sha256,
            "standard_weights": self.standard,
        }


def random_inception_weights(path: str, seed: int = 0) -> str:
    """Write a randomly initialised InceptionV3 of the standard architecture to
    ``path`` (the state-dict layout of the standard file, He-normal convolution
    weights so features have a usable scale). For testing pipelines offline
    only: scores computed with it mean nothing and are reported as
    ``standard_weights: false``. Returns ``path``."""
    from torchvision.models import inception_v3

    g = torch.Generator().manual_seed(int(seed))
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=g)
            torch.nn.init.zeros_(m.bias)
    torch.save(net.state_dict(), path)
    return path


def to_uint8_rgb(x: Tensor) -> Tensor:
    """Images (N, 1 or 3, H, W) with values in [-1, 1] -> uint8 (N, 3, H, W),
    quantised as a saved PNG is (``round((x + 1) * 127.5)``); one channel is
    repeated to three."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype == torch.uint8:
        u = x
    else:
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        u = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u


@dataclass
class Features:
    """Inception features of a set of images: ``pool`` (N, 2048) and ``logits``
    (N, 1008), float32 on the CPU, and the images' side ``image_size``."""

    pool: Tensor
    logits: Tensor
    image_size: tuple

    def __len__(self) -> int:
        return self.pool.shape[0]


def _tqdm(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


def _collect(batches: Iterable[Tensor], extractor: InceptionExtractor, total: int, desc: str,
             progress: bool) -> Features:
    pools, logits, size = [], [], None
    with _tqdm(total, desc, progress) as bar:
        for x in batches:
            u = to_uint8_rgb(x)
            size = tuple(u.shape[-2:])
            p, lg = extractor(u)
            pools.append(p)
            logits.append(lg)
            bar.update(u.shape[0])
    if not pools:
        raise ValueError("no images to extract features from")
    return Features(torch.cat(pools), torch.cat(logits), size)


def dataset_features(dataset, extractor: InceptionExtractor, *, batch_size: int = 256,
                     progress: bool = False) -> Features:
    """Features of every image of a fastdiff image dataset (items (C, S, S) in [-1, 1])."""
    batch_size = _positive(batch_size, "batch_size")
    n = len(dataset)
    get = getattr(dataset, "get_batch", None)

    def batches():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            yield get(idx) if get is not None else torch.stack([dataset[int(i)] for i in idx])

    return _collect(batches(), extractor, n, "reference features", progress)


def sample_features(diffusion, extractor: InceptionExtractor, n: int, *, batch_size: int = 256,
                    method: str = "ddpm", steps: Optional[int] = None, eta: float = 0.0, spacing: str = "leading",
                    order: Optional[int] = None, generator: Optional[torch.Generator] = None,
                    cuda_graph: Optional[bool] = None, progress: bool = False, keep_samples: bool = False):
    """Draw ``n`` samples from ``diffusion`` (a GaussianDiffusion of images in
    [-1, 1]) ``batch_size`` at a time with ``diffusion.sample`` (``method``,
    ``steps``, ``eta``, ``spacing``, ``order`` as there: ddpm, ddim or a
    multistep solver) and return their :class:`Features`; with ``keep_samples`` also the uint8 samples (n, 3, H, W)."""
    n = _positive(n, "n")
    batch_size = _positive(batch_size, "batch_size")
    shape = tuple(diffusion.sample_shape or ())
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"sample metrics need a model of 1- or 3-channel images, this one makes samples of "
                         f"shape {shape}")
    kept = []

    def batches():
        for s in range(0, n, batch_size):
            x = diffusion.sample(min(batch_size, n - s), steps=steps, method=method, eta=eta, spacing=spacing,
                                 order=order, generator=generator, cuda_graph=cuda_graph)
            if keep_samples:
                kept.append(to_uint8_rgb(x).cpu())
            yield x

    feats = _collect(batches(), extractor, n, f"sampling ({method}) + features", progress)
    return (feats, torch.cat(kept)) if keep_samples else feats


# ------------------------------------------------------ reference statistics --
@dataclass
class RefStats:
    """Reference statistics of a dataset's Inception features: ``mu`` (D,) and
    ``sigma`` (D, D) in float64, optionally the ``features`` (N, D) float32
    (KID needs them), and ``meta`` (where they came from).

    ``save(path)`` writes an ``.npz`` with keys ``mu``, ``sigma``, ``features``
    and ``meta`` (a JSON string); :meth:`load` also reads pytorch-fid's
    ``mu``/``sigma`` files."""

    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0],) * 2:
            raise ValueError(f"reference statistics need mu (D,) and sigma (D, D), got mu {self.mu.shape} and "
                             f"sigma {self.sigma.shape}")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[1] != self.mu.shape[0]:
                raise ValueError(f"reference features must be (N, {self.mu.shape[0]}), got {self.features.shape}")

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @property
    def n(self) -> Optional[int]:
        if self.features is not None:
            return int(self.features.shape[0])
        return self.meta.get("n")

    @classmethod
    def from_features(cls, pool: Tensor, meta: Optional[dict] = None) -> "RefStats":
        f = _features_2d(pool, "pool")
        if f.shape[0] < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {f.shape[0]}")
        _, fidelity_fid = _fid_fns()
        st = fidelity_fid(f.double())
        return cls(st["mu"], st["sigma"], f.float().numpy(), dict(meta or {}, n=int(f.shape[0])))

    def save(self, path: str) -> str:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp.npz"
        arrays = dict(mu=self.mu, sigma=self.sigma, meta=np.array(json.dumps(self.meta)))
        if self.features is not None:
            arrays["features"] = self.features
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "RefStats":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ref-stats {path!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        except Exception as e:  # not a zip, pickled objects, truncated, bad JSON
            raise ValueError(f"--ref-stats {path!r} is not a readable .npz file ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        if not {"mu", "sigma"} <= set(arrays):
            raise ValueError(f"--ref-stats {path!r} has keys {sorted(arrays)}; it needs 'mu' and 'sigma'")
        mu, sigma, feats = arrays["mu"], arrays["sigma"], arrays.get("features")
        try:
            return cls(mu, sigma, feats, meta)
        except ValueError as e:
            raise ValueError(f"--ref-stats {path!r}: {e}") from None


def default_cache_dir() -> str:
    """Where reference statistics are cached: $FASTDIFF_CACHE/ref_stats, else
    $XDG_CACHE_HOME/fastdiff/ref_stats, else ~/.cache/fastdiff/ref_stats."""
    base = os.environ.get("FASTDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastdiff")
    return os.path.join(base, "ref_stats")


def reference_stats(dataset: str, extractor: InceptionExtractor, *, root: Optional[str] = None,
                    image_size: Optional[int] = None, n: Optional[int] = None, seed: int = 0,
                    cache: Optional[str] = None, batch_size: int = 256, progress: bool = False):
    """Reference statistics of a fastdiff dataset (``digits``, ``cifar10``,
    ``folder``; see :func:`fastdiff.data.load_dataset`), computed once and
    cached.

    Args:
        cache: the ``.npz`` to read if it exists, else to write. Default: a
            file in :func:`default_cache_dir` named after the dataset, the
            image size, ``n`` and a hash of the data root and the weights.
        n: use a seeded subset of n images (default: all, e.g. CIFAR-10's
            50000 training images, the usual FID reference).

    Returns: ``(stats, path, loaded)``: the :class:`RefStats`, the cache file
    and whether it was read from there. A cached file computed with other
    weights raises ValueError.
    """
    from .data import load_dataset

    if dataset not in ("digits", "cifar10", "folder"):
        raise ValueError(f"--dataset must be digits, cifar10 or folder for reference statistics, got {dataset!r}")
    root_abs = os.path.abspath(root) if root is not None else None
    if cache is None:
        key = hashlib.sha256(f"{root_abs}|{extractor.sha256}|{seed}".encode()).hexdigest()[:10]
        cache = os.path.join(default_cache_dir(),
                             f"{dataset}-{image_size or 'native'}px-{n or 'all'}-{key}.npz")
    if os.path.isfile(cache):
        st = RefStats.load(cache)
        check_ref_stats(st, extractor, cache)
        return st, cache, True
    ds = load_dataset(dataset, root=root, image_size=image_size, n=n, seed=seed)
    feats = dataset_features(ds, extractor, batch_size=batch_size, progress=progress)
    meta = dict(dataset=dataset, root=root_abs, image_size=list(feats.image_size), seed=seed,
                subset=n is not None, **extractor.describe())
    st = RefStats.from_features(feats.pool, meta)
    st.save(cache)
    return st, cache, False


def check_ref_stats(st: RefStats, extractor: InceptionExtractor, path: str) -> None:
    """Raise ValueError if ``st`` cannot be compared with ``extractor``'s features."""
    if st.dim != extractor.feature_dim:
        raise ValueError(f"--ref-stats {path!r} holds {st.dim}-d statistics; the InceptionV3 pool features are "
                         f"{extractor.feature_dim}-d")
    sha = st.meta.get("inception_weights_sha256")
    if sha is not None and sha != extractor.sha256:
        raise ValueError(f"--ref-stats {path!r} was computed with other InceptionV3 weights (sha256 {sha[:12]}..., "
                         f"these are {extractor.sha256[:12]}...): recompute it (delete the file) or pass the "
                         f"weights it was made with")


# ------------------------------------------------------------------ metrics --
def _positive(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _features_2d(x, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2 or t.shape[0] == 0 or not t.is_floating_point():
        raise ValueError(f"{name} must be a non-empty floating-point (N, D) array, got shape {tuple(t.shape)} "
                         f"dtype {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t.detach().cpu()


def _fid_fns():
    _import_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    return fid_statistics_to_metric, fid_features_to_statistics


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed by
    torch-fidelity (eigenvalues of sigma1 sigma2). FID is this distance between
    the Gaussians fitted to two sets of Inception pool features."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of the same length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be ({d}, {d}) to match the means, got {s.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    to_metric, _ = _fid_fns()
    from torch_fidelity.metric_fid import KEY_METRIC_FID

    return float(to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)[KEY_METRIC_FID])


def inception_score(logits, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of classifier ``logits``
    (N, K), its mean and standard deviation over ``splits`` equal parts of a
    seeded shuffle (torch-fidelity's ``isc_features_to_metric``). N >= splits."""
    lg = _features_2d(logits, "logits")
    splits = _positive(splits, "splits")
    if lg.shape[0] < splits:
        raise ValueError(f"inception_score needs at least splits={splits} samples, got {lg.shape[0]}")
    _import_fidelity()
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    r = isc_features_to_metric(lg, splits=splits, shuffle=True, rng_seed=seed)
    return r[KEY_METRIC_ISC_MEAN], r[KEY_METRIC_ISC_STD]


def kernel_inception_distance(features1, features2, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD^2 with the cubic polynomial
    kernel (x.y / D + 1)^3, mean and standard deviation over ``subsets`` random
    subsets of ``subset_size`` rows of each set (torch-fidelity's
    ``kid_features_to_metric``). Both sets need at least ``subset_size`` rows."""
    f1, f2 = _features_2d(features1, "features1"), _features_2d(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features1 and features2 must have the same width, got {f1.shape[1]} and {f2.shape[1]}")
    subsets, subset_size = _positive(subsets, "subsets"), _positive(subset_size, "subset_size")
    if subset_size < 2:
        raise ValueError("subset_size must be >= 2 (the unbiased estimator)")
    if min(f1.shape[0], f2.shape[0]) < subset_size:
        raise ValueError(f"subset_size={subset_size} exceeds the sets' sizes ({f1.shape[0]}, {f2.shape[0]})")
    _import_fidelity()
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    r = kid_features_to_metric(f1.float(), f2.float(), kid_subsets=subsets, kid_subset_size=subset_size,
                               rng_seed=seed, verbose=False)
    return r[KEY_METRIC_KID_MEAN], r[KEY_METRIC_KID_STD]


def evaluate_samples(feats: Features, ref: Optional[RefStats] = None, *, fid: bool = True, isc: bool = True,
                     kid: bool = True, is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     seed: int = 2020) -> dict:
    """FID / IS / KID of sample features against reference statistics.

    FID and KID need ``ref`` (KID its ``features``). IS needs only the
    samples. Smaller sets than the defaults ask for are handled by lowering
    ``is_splits`` / ``kid_subset_size`` to what the sets allow, with a note.
    Returns a dict with ``fid``, ``is_mean``/``is_std``, ``kid_mean``/``kid_std``
    (those requested), the sample count and ``notes`` (a list of strings).
    """
    n = len(feats)
    out: dict = {"num_samples": n, "notes": []}
    notes = out["notes"]
    if (fid or kid) and ref is None:
        raise ValueError("FID and KID need reference statistics (ref)")
    if fid:
        if n < 2:
            raise ValueError("FID needs at least 2 samples")
        _, to_stats = _fid_fns()
        st = to_stats(feats.pool.double())
        out["fid"] = frechet_distance(st["mu"], st["sigma"], ref.mu, ref.sigma)
        if n < STANDARD_FID_SAMPLES:
            notes.append(f"FID from {n} samples, fewer than the standard {STANDARD_FID_SAMPLES}: it is biased "
                         f"upward at small sample counts; compare only FIDs with the same count and reference")
    if isc:
        splits = min(is_splits, n)
        if splits < is_splits:
            notes.append(f"IS over {splits} splits instead of {is_splits} ({n} samples)")
        out["is_mean"], out["is_std"] = inception_score(feats.logits, splits, seed)
        out["is_splits"] = splits
    if kid:
        if ref.features is None:
            raise ValueError("KID needs the reference features; these reference statistics hold only mu/sigma "
                             "(recompute them from the dataset, or drop --kid)")
        size = min(kid_subset_size, n, ref.features.shape[0])
        if size < 2:
            raise ValueError("KID needs at least 2 samples and 2 reference images")
        if size < kid_subset_size:
            notes.append(f"KID subsets of {size} instead of {kid_subset_size} (the sets are smaller)")
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(feats.pool, torch.from_numpy(ref.features),
                                                                    kid_subsets, size, seed)
        out["kid_subsets"], out["kid_subset_size"] = kid_subsets, size
    return out


def format_report(report: dict) -> str:
    """One table of the metrics in ``report`` (keys as :func:`evaluate_samples`
    and ``fastdiff eval`` write them), then the provenance lines and notes."""
    rows = []
    if "bpd" in report:
        rows.append(("bits/dim", f"{report['bpd']:.4f}", f"{report['bpd_stderr']:.4f}",
                     f"{report['n']} data images (variational bound)"))
    ns = report.get("num_samples")
    ref = report.get("ref_stats") or {}
    ref_desc = f"vs {ref.get('n', '?')} {ref.get('dataset') or 'reference'} images" if ref else ""
    if "fid" in report:
        rows.append(("FID", f"{report['fid']:.4f}", "", f"{ns} samples {ref_desc}"))
    if "is_mean" in report:
        rows.append(("IS", f"{report['is_mean']:.4f}", f"{report['is_std']:.4f}",
                     f"{ns} samples, {report['is_splits']} splits (+- std over splits)"))
    if "kid_mean" in report:
        rows.append(("KID", f"{report['kid_mean']:.6f}", f"{report['kid_std']:.6f}",
                     f"{report['kid_subsets']} subsets of {report['kid_subset_size']} (+- std over subsets)"))
    head = ("metric", "value", "+-", "on")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = "  ".join("{:<%d}" % w for w in widths)
    lines = [line.format(*head), line.format(*("-" * w for w in widths))] + [line.format(*r) for r in rows]
    if "extractor" in report:
        std = ("standard weights" if report.get("standard_weights") else
               f"NOT the standard {STANDARD_WEIGHTS['file']}: these FID/IS/KID values are not comparable to "
               f"published ones")
        lines.append(f"extractor: {report['extractor']}")
        lines.append(f"weights:   {report['inception_weights']} (sha256 {report['inception_weights_sha256'][:12]}..., "
                     f"{std})")
        lines.append(f"resize:    {report['resize']}")
    if "sampler" in report:
        lines.append(f"sampler:   {report['sampler']}")
    if ref.get("path"):
        lines.append(f"reference: {ref['path']} ({'cached' if ref.get('loaded') else 'computed now'})")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def resize_description(image_size) -> str:
    h, w = image_size
    return (f"{h}x{w} -> {_INPUT_SIZE}x{_INPUT_SIZE}, bilinear (TF1-compatible, inside torch-fidelity), from uint8 "
            f"RGB (one-channel images repeated to 3 channels)")


def evaluate_checkpoint(diffusion, extractor: InceptionExtractor, ref: Optional[RefStats], *, num_samples: int,
                        batch_size: int = 256, method: str = "ddpm", steps: Optional[int] = None, eta: float = 0.0,
                        spacing: str = "leading", order: Optional[int] = None, seed: int = 0, fid: bool = True,
                        isc: bool = True,
                        kid: bool = True, is_splits: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                        progress: bool = False) -> dict:
    """Sample ``num_samples`` images from ``diffusion`` in batches, extract
    their features and compute the requested metrics against ``ref``: the
    :func:`evaluate_samples` dict plus the extractor, weights, resize and
    sampler used."""
    device = diffusion.device if hasattr(diffusion, "device") else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    feats = sample_features(diffusion, extractor, num_samples, batch_size=batch_size, method=method, steps=steps,
                            eta=eta, spacing=spacing, order=order, generator=gen, progress=progress)
    out = evaluate_samples(feats, ref, fid=fid, isc=isc, kid=kid, is_splits=is_splits, kid_subsets=kid_subsets,
                           kid_subset_size=kid_subset_size)
    T = diffusion.num_timesteps
    out.update(extractor.describe())
    out["resize"] = resize_description(feats.image_size)
    out["sampler"] = (f"{method}, {steps or T} of {T} steps" + (f", eta {eta}" if method == "ddim" else "")
                      + (f", order {order}" if order else "") + f", {spacing} spacing, seed {seed}")
    if not extractor.standard:
        out["notes"].insert(0, f"the InceptionV3 weights are not the standard {STANDARD_WEIGHTS['file']} "
                               f"(sha256 {extractor.sha256[:8]}... != {STANDARD_WEIGHTS['sha256']}...): the "
                               f"scores are not comparable to published ones")
    return out


__all__ += ["check_ref_stats", "resize_description", "evaluate_checkpoint"]
