"""fastdiff.data: the built-in datasets, the image folder, CIFAR-10 pickles,
and the errors for missing or corrupt data."""
import math
import os
import pickle

import numpy as np
import pytest
import torch

from fastdiff.data import (DATASETS, ImageFolderDataset, InMemoryDataset, load_dataset, sample_shape,
                           swiss_roll)


# ------------------------------------------------------------ swiss roll ----
def test_swiss_roll_shape_seed_and_scale():
    a = swiss_roll(20_000, seed=1)
    assert a.shape == (20_000, 2) and a.dtype == torch.float32
    assert torch.equal(a, swiss_roll(20_000, seed=1))
    assert not torch.equal(a, swiss_roll(20_000, seed=2))
    # scaled so that each coordinate's second moment is ~1
    m2 = a.double().pow(2).mean(0)
    assert torch.all((m2 > 0.9) & (m2 < 1.1)), m2
    # it is the spiral r = theta: without noise, |p| * scale = theta and the angle is theta (mod 2 pi)
    p = swiss_roll(1000, noise=0.0, seed=3).double() * (math.pi * math.sqrt(39 / 8))
    r = p.norm(dim=1)
    assert r.min() >= 1.5 * math.pi - 1e-4 and r.max() <= 4.5 * math.pi + 1e-4
    ang = torch.atan2(p[:, 1], p[:, 0])
    assert torch.allclose(torch.remainder(ang - r + math.pi, 2 * math.pi) - math.pi, torch.zeros_like(r), atol=1e-4)


def test_swissroll_dataset():
    ds = load_dataset("swissroll", n=500, seed=4)
    assert isinstance(ds, InMemoryDataset) and len(ds) == 500
    assert sample_shape(ds) == (2,) and ds[3].shape == (2,)
    assert torch.equal(ds.data, swiss_roll(500, seed=4))
    assert len(load_dataset("swissroll")) == 10_000
    with pytest.raises(ValueError, match="n must be a positive int"):
        load_dataset("swissroll", n=0)
    with pytest.raises(ValueError, match="noise"):
        swiss_roll(10, noise=-1.0)


# ---------------------------------------------------------------- digits ----
def test_digits_default_and_sizes():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert len(ds) == 1797 and sample_shape(ds) == (1, 16, 16)
    assert ds.data.dtype == torch.float32 and ds.data.min() >= -1 and ds.data.max() <= 1
    assert ds.data.min() == -1 and ds.data.max() > 0.9  # the full range is used
    raw = torch.from_numpy(load_digits().images).float()
    native = load_dataset("digits", image_size=8)
    assert torch.allclose(native.data[:, 0], raw / 8 - 1)  # 0..16 -> [-1, 1], no resampling
    big = load_dataset("digits", image_size=32)
    assert sample_shape(big) == (1, 32, 32)
    # upsampling keeps the picture: block means of the 32x32 image follow the 8x8 one
    pooled = torch.nn.functional.avg_pool2d(big.data, 4)[:, 0]
    assert (pooled - native.data[:, 0]).abs().mean() < 0.15


def test_digits_subset():
    full = load_dataset("digits", image_size=8)
    sub = load_dataset("digits", image_size=8, n=100, seed=5)
    assert len(sub) == 100
    # a subset of the original rows, in the original order
    rows = [int((full.data == sub.data[i]).flatten(1).all(1).nonzero()[0]) for i in range(100)]
    assert rows == sorted(rows)
    assert torch.equal(sub.data, load_dataset("digits", image_size=8, n=100, seed=5).data)
    with pytest.raises(ValueError, match="n=5000 exceeds the 1797"):
        load_dataset("digits", n=5000)


def test_bad_arguments():
    assert DATASETS == ("swissroll", "digits", "folder", "cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("digits", root="/tmp")
    with pytest.raises(ValueError, match="needs root="):
        load_dataset("folder")
    with pytest.raises(ValueError, match="needs root="):
        load_dataset("cifar10")


def test_in_memory_dataset():
    data = torch.arange(24.0).reshape(6, 4)
    ds = InMemoryDataset(data, "t")
    assert torch.equal(ds.get_batch(torch.tensor([4, 1])), data[[4, 1]])
    assert torch.equal(ds[2], data[2]) and sample_shape(ds) == (4,)
    with pytest.raises(ValueError, match="empty"):
        InMemoryDataset(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="shape"):
        InMemoryDataset(torch.zeros(5))


def test_sample_shape_of_plain_datasets():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(3, 4, 4), i

    assert sample_shape(Pairs()) == (3, 4, 4)


# ---------------------------------------------------------------- folder ----
def _save(path, arr):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder(tmp_path):
    # 32 wide, 16 high: red | green | blue bands of 8, 16, 8 columns
    bands = np.zeros((16, 32, 3), np.uint8)
    bands[:, :8, 0] = 255
    bands[:, 8:24, 1] = 255
    bands[:, 24:, 2] = 255
    _save(str(tmp_path / "a.png"), bands)
    _save(str(tmp_path / "sub" / "b.jpg"), np.full((40, 30, 3), 128, np.uint8))
    _save(str(tmp_path / "sub" / "c.png"), np.full((12, 12), 255, np.uint8))  # grayscale
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_dataset("folder", root=str(tmp_path), image_size=16)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 3
    assert [os.path.basename(f) for f in ds.files] == ["a.png", "b.jpg", "c.png"]
    assert sample_shape(ds) == (3, 16, 16)
    a = ds[0]
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    # no resize (shorter side is 16); the centre crop is the green band exactly
    assert torch.equal(a[1], torch.ones(16, 16)) and torch.equal(a[0], -torch.ones(16, 16))
    assert ds[1].shape == (3, 16, 16) and (ds[1] - (128 / 127.5 - 1)).abs().max() < 0.05
    assert torch.allclose(ds[2], torch.ones(3, 16, 16))  # grayscale -> RGB, upsampled
    assert load_dataset("folder", root=str(tmp_path)).sample_shape == (3, 32, 32)
    assert len(load_dataset("folder", root=str(tmp_path), image_size=8, n=2)) == 2


def test_image_folder_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("folder", root=missing, image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files.*empty"):
        load_dataset("folder", root=str(empty), image_size=8)
    afile = tmp_path / "file.png"
    afile.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="file.png"):
        load_dataset("folder", root=str(afile), image_size=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = load_dataset("folder", root=str(bad), image_size=8)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds[0]


# --------------------------------------------------------------- cifar10 ----
def _fake_cifar(root, per_batch=4, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batches.append(data)
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": [0] * per_batch, b"data": data}, f, protocol=2)
    return np.concatenate(batches).reshape(-1, 3, 32, 32)


def test_cifar10(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    raw = _fake_cifar(root)
    ds = load_dataset("cifar10", root=str(root))
    assert len(ds) == 20 and sample_shape(ds) == (3, 32, 32)
    assert torch.allclose(ds.data, torch.from_numpy(raw).float() / 127.5 - 1)
    assert torch.equal(load_dataset("cifar10", root=str(tmp_path)).data, ds.data)  # the parent works too
    small = load_dataset("cifar10", root=str(root), image_size=16, n=5)
    assert small.data.shape == (5, 3, 16, 16) and small.data.abs().max() <= 1


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_dataset("cifar10", root=str(tmp_path / "does_not_exist"))
    root = tmp_path / "c"
    _fake_cifar(root)
    os.remove(root / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=str(root))
    (root / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="corrupt CIFAR-10 batch file .*data_batch_3"):
        load_dataset("cifar10", root=str(root))
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8)}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_3.*3072"):
        load_dataset("cifar10", root=str(root))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    root = tmp_path / "c"
    _fake_cifar(root)
    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_1.*not allowed"):
        load_dataset("cifar10", root=str(root))
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- labels ----
def test_labels_digits_cifar_and_folder_per_class(tmp_path):
    from sklearn.datasets import load_digits

    d = load_dataset("digits")
    assert d.num_classes == 10 and d.classes == [str(i) for i in range(10)]
    assert torch.equal(d.labels, torch.from_numpy(load_digits().target).long())
    assert isinstance(d[0], torch.Tensor)  # items stay plain tensors
    sub = load_dataset("digits", n=40, seed=3)
    # the subset's labels follow its images
    full = d.data.flatten(1)
    for i in range(40):
        j = int((full - sub.data[i].flatten()).abs().sum(1).argmin())
        assert sub.labels[i] == d.labels[j]
    # CIFAR-10: labels read with the images
    root = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    want = []
    for i in range(1, 6):
        lab = rng.integers(0, 10, 3).tolist()
        want += lab
        with open(_mk(root) / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"labels": lab, b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}, f, protocol=2)
    c = load_dataset("cifar10", root=str(root))
    assert c.labels.tolist() == want and c.num_classes == 10 and c.classes[0] == "airplane"
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({b"labels": [0, 11, 2], b"data": np.zeros((3, 3072), np.uint8)}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_2.*labels"):
        load_dataset("cifar10", root=str(root))
    # folder per class: the first-level subdirectory is the class
    for cls, k in (("cat", 2), ("dog", 1), ("emu", 3)):
        for j in range(k):
            _save(str(tmp_path / "pets" / cls / f"{j}.png"), np.full((8, 8, 3), 40 * j, np.uint8))
    f = load_dataset("folder", root=str(tmp_path / "pets"), image_size=8)
    assert f.classes == ["cat", "dog", "emu"] and f.labels.tolist() == [0, 0, 1, 2, 2, 2]
    part = load_dataset("folder", root=str(tmp_path / "pets"), image_size=8, n=2, seed=1)
    assert part.classes == ["cat", "dog", "emu"]  # indices fixed by the whole folder
    assert part.labels.tolist() == [f.classes.index(p.split(os.sep)[-2]) for p in part.files]
    _save(str(tmp_path / "pets" / "stray.png"), np.zeros((8, 8, 3), np.uint8))
    assert load_dataset("folder", root=str(tmp_path / "pets"), image_size=8).labels is None
    assert load_dataset("swissroll", n=10).labels is None
    with pytest.raises(ValueError, match="labels"):
        InMemoryDataset(torch.zeros(3, 2), labels=torch.tensor([0, 1]))


def _mk(p):
    p.mkdir(parents=True, exist_ok=True)
    return p
