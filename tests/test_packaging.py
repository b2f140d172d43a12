"""Packaging: the wheel holds every subpackage (setuptools discovery), and the
core install works without the ``train`` extra (pillow, matplotlib,
scikit-learn), with ``fastdiff train`` naming the extra to install."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subpackages() -> set:
    out = set()
    for d, _, files in os.walk(os.path.join(ROOT, "fastdiff")):
        if "__init__.py" in files:
            out.add(os.path.relpath(d, ROOT).replace(os.sep, "/"))
    return out


def test_wheel_contains_every_subpackage(tmp_path):
    env = {**os.environ, "FASTDIFF_NO_EXTENSION": "1"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not available")
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(tmp_path / wheels[0]).namelist())
    packages = _subpackages()
    assert {"fastdiff", "fastdiff/bench", "fastdiff/train", "fastdiff/ops", "fastdiff/triton"} <= packages
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, pkg
    # the modules of every package, not only its __init__
    for mod in ("fastdiff/bench/_timing.py", "fastdiff/train/trainer.py", "fastdiff/ops/diffusion.py"):
        assert mod in names, mod


# blocks the train extra's packages in a fresh interpreter, as if not installed
_BLOCK = ("import sys\n"
          "for m in ('PIL', 'matplotlib', 'sklearn'):\n"
          "    sys.modules[m] = None\n")


def _run(code: str):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", _BLOCK + code], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def test_core_works_without_the_train_extra():
    r = _run("import torch, fastdiff\n"
             "s = fastdiff.NoiseSchedule.make('linear', 10)\n"
             "x = fastdiff.q_sample(torch.ones(2, 3), [1, 9], s, torch.zeros(2, 3))\n"
             "x = x[0] if isinstance(x, tuple) else x  # (x_t, noise)\n"
             "assert x.shape == (2, 3) and torch.allclose(x[0], s.alphas_cumprod[1].sqrt().float().expand(3))\n"
             "print('ok')\n")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_train_names_the_missing_extra(tmp_path):
    r = _run("import sys\nfrom fastdiff.cli import main\n"
             f"sys.exit(main(['train', '--dataset', 'swissroll', '--steps', '1', '--out', {str(tmp_path)!r}]))\n")
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert "pip install 'fastdiff[train]'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.listdir(tmp_path)
