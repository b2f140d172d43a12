"""FID / IS / KID (fastdiff.metrics, on torch-fidelity), offline.

The InceptionV3 here is randomly initialised (the standard architecture,
saved to a temp file and loaded through the weights-path route, as a user's
downloaded file would be): its scores mean nothing, but every step of the
pipeline runs. The metric maths is checked against closed forms. The
network's forward at 299x299 is heavy on a CPU, so only a few images go
through it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")
pytest.importorskip("torchvision")

from fastdiff import metrics as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return M.random_inception_weights(str(tmp_path_factory.mktemp("inc") / "random_inception.pth"), seed=0)


@pytest.fixture(scope="module")
def extractor(weights):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return M.InceptionExtractor(weights)


@pytest.fixture(scope="module")
def few_features(extractor):
    """Features of 3 small images (one channel, 16x16), the only forward pass in-process."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    return extractor(M.to_uint8_rgb(x))


# ------------------------------------------------------------ the network --
def test_random_weights_load_and_give_features(weights, extractor, few_features):
    pool, logits = few_features
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert pool.dtype == torch.float32 and torch.isfinite(pool).all() and torch.isfinite(logits).all()
    assert (pool >= 0).all()  # pool3 follows a ReLU
    assert not torch.allclose(pool[0], pool[1])  # different images, different features
    assert pool.std() > 1e-4  # the He-normal init keeps a usable scale
    d = extractor.describe()
    assert d["inception_weights_sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert d["standard_weights"] is False and not extractor.standard
    assert "inception-v3-compat" in d["extractor"]


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5]).reshape(1, 1, 2, 2)
    u = M.to_uint8_rgb(x)
    assert u.shape == (1, 3, 2, 2) and u.dtype == torch.uint8
    assert u[0, :, 0, 0].tolist() == [0] * 3 and u[0, 0].flatten().tolist() == [0, 128, 255, 191]
    with pytest.raises(ValueError, match="NaN"):
        M.to_uint8_rgb(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="N, 1 or 3, H, W"):
        M.to_uint8_rgb(torch.zeros(1, 2, 4, 4))


def test_extractor_rejects_bad_images(extractor):
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_missing_weights_say_which_file_where_and_how():
    for arg in (None, "/nonexistent/fastdiff/inception.pth"):
        with pytest.raises(FileNotFoundError) as e:
            M.InceptionExtractor(arg)
        msg = str(e.value)
        assert M.STANDARD_WEIGHTS["file"] in msg and M.STANDARD_WEIGHTS["urls"][0] in msg
        assert "--inception-weights" in msg and "never downloads" in msg
        if arg:
            assert arg in msg


def test_wrong_weight_files_give_clear_errors(tmp_path, weights):
    with pytest.raises(ValueError, match="not a file"):
        M.InceptionExtractor(str(tmp_path))
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="not a PyTorch tensor file"):
        M.InceptionExtractor(str(text))
    pickle_obj = tmp_path / "obj.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickle_obj)  # a pickled module: refused by weights_only
    with pytest.raises(ValueError, match="not a PyTorch tensor file"):
        M.InceptionExtractor(str(pickle_obj))
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), other)
    with pytest.raises(ValueError, match="does not hold the InceptionV3") as e:
        M.InceptionExtractor(str(other))
    assert "missing keys" in str(e.value) and "unexpected keys" in str(e.value) and str(other) in str(e.value)
    sd = torch.load(weights, weights_only=True)
    sd["fc.weight"] = torch.zeros(10, 2048)
    sd["fc.bias"] = torch.zeros(10)
    bad = tmp_path / "fc10.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"2 shape mismatches: fc\.weight: \(10, 2048\) instead of \(1008, 2048\)"):
        M.InceptionExtractor(str(bad))


# ---------------------------------------------------------------- the maths --
def _fd_closed(mu1, s1, mu2, s2):
    from scipy.linalg import sqrtm

    cov = sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cov))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # sigma2 = c^2 sigma1: tr((1 - c)^2 sigma1)
    A = rng.normal(size=(5, 5))
    s1 = A @ A.T + 0.1 * np.eye(5)
    assert M.frechet_distance(np.zeros(5), s1, np.zeros(5), 4 * s1) == pytest.approx(np.trace(s1), rel=1e-9)
    # general (non-commuting) covariances against scipy's matrix square root
    B = rng.normal(size=(5, 5))
    s2 = B @ B.T + 0.1 * np.eye(5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(_fd_closed(m1, s1, m2, s2), rel=1e-8)
    assert M.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)


def test_fid_from_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(1)
    d, n = 3, 40_000
    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = A @ A.T + 0.2 * np.eye(d), B @ B.T + 0.2 * np.eye(d)
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25])
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    ref = M.RefStats.from_features(torch.from_numpy(x2))
    feats = M.Features(torch.from_numpy(x1), torch.zeros(n, 4), (1, 1))
    got = M.evaluate_samples(feats, ref, fid=True, isc=False, kid=False)["fid"]
    want = _fd_closed(mu1, s1, mu2, s2)
    # the estimate's error is O(sqrt(d/n)) of the covariance scale here
    assert got == pytest.approx(want, rel=0.05, abs=0.05)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="sigma2"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_inception_score_one_hot():
    k, n = 10, 100
    same = torch.zeros(n, k)
    same[:, 3] = 100.0  # every sample predicts class 3 with certainty: p(y|x) = p(y), IS = 1
    mean, std = M.inception_score(same, splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    spread = torch.zeros(n, k)
    spread[torch.arange(n), torch.arange(n) % k] = 100.0  # certain and spread evenly over k classes: IS = k
    mean, _ = M.inception_score(spread, splits=1)
    assert mean == pytest.approx(k, rel=1e-9)
    with pytest.raises(ValueError, match="splits=5"):
        M.inception_score(same[:3], splits=5)


def test_kid_of_a_set_with_itself_is_about_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(400, 64, generator=g).abs()
    self_kid, self_std = M.kernel_inception_distance(f, f, subsets=20, subset_size=100)
    shifted, _ = M.kernel_inception_distance(f, f + 0.5, subsets=20, subset_size=100)
    assert shifted > 0.1
    assert abs(self_kid) < 0.02 * shifted and abs(self_kid) < 3 * self_std + 1e-6
    with pytest.raises(ValueError, match="same width"):
        M.kernel_inception_distance(f, f[:, :10])
    with pytest.raises(ValueError, match="subset_size=1000 exceeds"):
        M.kernel_inception_distance(f, f)


def test_fid_of_a_set_with_itself_is_about_zero(few_features):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(300, 32, generator=g, dtype=torch.float64) * 3 + 1
    ref = M.RefStats.from_features(f)
    r = M.evaluate_samples(M.Features(f, torch.zeros(300, 4), (8, 8)), ref, isc=False, kid=False)
    assert abs(r["fid"]) < 1e-8 * float(np.trace(ref.sigma))
    # small sets: IS splits and KID subsets are lowered to what the 3 samples allow, and the report says so
    # (the 2048-d FID of the network's features is exercised by the command-line test below: its eigenvalue
    # problem takes tens of seconds on a small CPU)
    pool, logits = few_features
    ref = M.RefStats.from_features(pool)
    r = M.evaluate_samples(M.Features(pool, logits, (16, 16)), ref, fid=False, isc=True, kid=True, is_splits=10)
    assert r["is_splits"] == 3 and r["kid_subset_size"] == 3 and r["num_samples"] == 3 and "fid" not in r
    assert any("IS over 3 splits" in s for s in r["notes"]) and any("KID subsets of 3" in s for s in r["notes"])
    assert r["is_mean"] >= 1 - 1e-9 and math.isfinite(r["kid_mean"])


def test_ref_stats_roundtrip_and_errors(tmp_path, extractor):
    g = torch.Generator().manual_seed(0)
    f = torch.rand(10, 2048, generator=g)
    big = M.RefStats.from_features(f, dict(dataset="x", inception_weights_sha256=extractor.sha256))
    p = big.save(str(tmp_path / "ref.npz"))
    back = M.RefStats.load(p)
    assert np.array_equal(back.mu, big.mu) and np.array_equal(back.sigma, big.sigma) and back.n == 10
    assert np.array_equal(back.features, f.numpy())
    assert back.meta["dataset"] == "x"
    M.check_ref_stats(back, extractor, p)
    # pytorch-fid's format: mu and sigma only -> FID works, KID says what is missing (64-d: a fast eig)
    f = torch.rand(100, 64, generator=g)
    st = M.RefStats.from_features(f)
    np.savez(tmp_path / "fid_only.npz", mu=st.mu, sigma=st.sigma)
    only = M.RefStats.load(str(tmp_path / "fid_only.npz"))
    assert only.features is None and only.meta == {}
    feats = M.Features(f, torch.zeros(100, 4), (8, 8))
    assert abs(M.evaluate_samples(feats, only, isc=False, kid=False)["fid"]) < 1e-8 * float(np.trace(st.sigma))
    with pytest.raises(ValueError, match="KID needs the reference features"):
        M.evaluate_samples(feats, only, fid=False, isc=False, kid=True)
    # wrong file, wrong keys, shape mismatch, other weights
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        M.RefStats.load(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        M.RefStats.load(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "keys.npz", mean=st.mu)
    with pytest.raises(ValueError, match="needs 'mu' and 'sigma'"):
        M.RefStats.load(str(tmp_path / "keys.npz"))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(5), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"mu \(D,\) and sigma \(D, D\)"):
        M.RefStats.load(str(tmp_path / "shape.npz"))
    small = M.RefStats(np.zeros(64), np.eye(64))
    with pytest.raises(ValueError, match="64-d statistics"):
        M.check_ref_stats(small, extractor, "small.npz")
    other = M.RefStats(big.mu, big.sigma, None, dict(inception_weights_sha256="0" * 64))
    with pytest.raises(ValueError, match="other InceptionV3 weights"):
        M.check_ref_stats(other, extractor, "other.npz")
    with pytest.raises(ValueError, match="FID and KID need reference statistics"):
        M.evaluate_samples(feats, None)


def test_format_report_labels_everything():
    r = dict(n=8, bpd=1.5, bpd_stderr=0.1, num_samples=4, fid=12.5, is_mean=1.2, is_std=0.1, is_splits=4,
             kid_mean=0.01, kid_std=0.002, kid_subsets=100, kid_subset_size=4, extractor="E", inception_weights="W",
             inception_weights_sha256="ab" * 32, standard_weights=False, resize="R", sampler="S",
             ref_stats=dict(path="P", loaded=True, n=9, dataset="digits"), notes=["hello"])
    t = M.format_report(r)
    for s in ("bits/dim", "1.5000", "FID", "12.5000", "vs 9 digits images", "IS", "KID", "0.010000", "resize:    R",
              "NOT the standard", "note: hello", "P (cached)"):
        assert s in t, s


# --------------------------------------------------------- the command line --
def _run(*args, env_extra=None, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fastdiff.data import load_dataset
    from fastdiff.diffusion import GaussianDiffusion
    from fastdiff.nn import UNet
    from fastdiff.train import TrainConfig, Trainer

    run = tmp_path_factory.mktemp("tiny") / "run"
    torch.manual_seed(0)
    diff = GaussianDiffusion(UNet.from_preset("tiny", in_ch=1, out_ch=1), num_timesteps=20, sample_shape=(1, 16, 16))
    tr = Trainer(diff, load_dataset("digits", image_size=16, n=8),
                 TrainConfig(steps=1, batch_size=2, out_dir=str(run), num_samples=0, progress=False))
    try:
        tr.train()
    finally:
        tr.close()
    return run


def test_cli_eval_fid_is_kid_end_to_end(tmp_path, weights, tiny_run, extractor):
    """`fastdiff eval --fid --is --kid` on a 1-step checkpoint with the random-weights file: 3 samples,
    3 reference digits (every image through InceptionV3 costs ~1 s on a small CPU, and one FID's
    2048-d eigenvalue problem tens of seconds)."""
    ref = tmp_path / "ref.npz"
    res = tmp_path / "ev.json"
    r = _run("eval", "--checkpoint", str(tiny_run), "--inception-weights", weights, "--ref-stats", str(ref),
             "--num-samples", "3", "--sample-batch", "3", "--method", "ddim", "--steps", "2", "--no-progress",
             "--threads", "2", "--fid", "--is", "--kid", "--ref-n", "3", "--n", "2", "--batch", "2",
             "--json", str(res))
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(res.read_text())
    assert d["num_samples"] == 3 and d["n"] == 2 and math.isfinite(d["bpd"])
    for k in ("fid", "is_mean", "is_std", "kid_mean", "kid_std"):
        assert math.isfinite(d[k]), k
    assert d["fid"] >= -1e-6 and d["is_mean"] >= 1 - 1e-9
    assert d["standard_weights"] is False and d["ref_stats"]["n"] == 3 and d["ref_stats"]["loaded"] is False
    assert "16x16 -> 299x299" in d["resize"] and "inception-v3-compat" in d["extractor"]
    assert "ddim, 2 of 20 steps" in d["sampler"]
    assert any("fewer than the standard 50000" in s for s in d["notes"])
    assert any("not comparable to published" in s for s in d["notes"])
    for s in ("bits/dim", "FID", "IS", "KID", "extractor:", "resize:", "note: FID from 3 samples"):
        assert s in r.stdout, s
    with np.load(ref) as z:
        assert z["features"].shape == (3, 2048) and z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
        meta = json.loads(str(z["meta"]))
    assert meta["dataset"] == "digits" and meta["inception_weights_sha256"] == extractor.sha256
    # the file is reused, not recomputed (reference_stats is what the command calls)
    st, path, loaded = M.reference_stats("digits", extractor, image_size=16, n=3, cache=str(ref))
    assert loaded and path == str(ref) and st.n == 3
    # ... and refused when it was made with other weights
    with np.load(ref) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.array(json.dumps(dict(meta, inception_weights_sha256="0" * 64)))
    np.savez(tmp_path / "other.npz", **arrays)
    from fastdiff import cli

    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--kid", "--inception-weights", weights,
                     "--ref-stats", str(tmp_path / "other.npz"), "--threads", "1"]) == 2


@pytest.mark.parametrize("args,word", [
    (["--no-bpd"], "nothing to evaluate"),
    (["--fid", "--num-samples", "0"], "--num-samples"),
    (["--fid", "--inception-weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
    (["--is", "--inception-weights", ""], "pt_inception-2015-12-05-6726825d.pth"),
    (["--fid", "--steps", "999", "--inception-weights", "x"], "--steps"),
    (["--kid", "--ref-n", "1", "--inception-weights", "x"], "--ref-n"),
], ids=["nothing", "num-samples", "weights-path", "no-weights", "steps", "ref-n"])
def test_cli_eval_bad_arguments(args, word, capsys, tiny_run):
    from fastdiff import cli

    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--threads", "1", *args]) == 2
    err = capsys.readouterr().err
    assert "error" in err and word in err, err
