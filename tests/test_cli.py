"""Smoke tests of the command line: `fastdiff info`, `fastdiff bench --quick`,
and `--help` of every subcommand (run as `python -m fastdiff`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_info():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert "fastdiff" in r.stdout and "operator" in r.stdout
    for op in ("q_sample", "diffusion_loss", "ddpm_step", "ddim_step"):
        assert op in r.stdout


def test_info_json():
    r = _run("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["fastdiff"] and "backends" in d and "ddpm_step" in d["backends"]


def test_help_subprocess():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert "usage: fastdiff" in r.stdout and "bench" in r.stdout and "info" in r.stdout


@pytest.mark.parametrize("sub", [[], ["info"], ["bench"]], ids=["top", "info", "bench"])
def test_help(sub, capsys):
    from fastdiff import cli

    with pytest.raises(SystemExit) as e:
        cli.main([*sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastdiff" in out
    if sub == ["bench"]:
        for opt in ("--ops", "--device", "--dtype", "--shape", "--quick", "--json", "--no-compile", "--plot"):
            assert opt in out, opt


def test_no_subcommand_prints_help(capsys):
    from fastdiff import cli

    assert cli.main([]) == 2
    assert "usage: fastdiff" in capsys.readouterr().out


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("bench", "--quick", "--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "median ms" in r.stdout and "vs diffusers" in r.stdout
    d = json.loads(out.read_text())
    assert set(d) == {"meta", "rows"}
    meta = d["meta"]
    for k in ("date", "device", "cpu", "torch", "triton", "diffusers", "fastdiff", "git_commit", "copy_gbps",
              "gpu", "quick"):
        assert k in meta, k
    assert meta["device"] == "cpu" and meta["quick"] is True and meta["copy_gbps"] > 0
    rows = d["rows"]
    for k in ("op", "shape", "dtype", "impl", "variant", "median_ms", "p20_ms", "p80_ms", "bytes", "gbps",
              "pct_copy_bw", "pred_ms", "speedup_vs_diffusers", "speedup_vs_eager", "speedup_vs_compile", "note"):
        assert k in rows[0], k
    ops = {r["op"] for r in rows}
    elementwise = {"q_sample_rng", "q_sample", "diffusion_loss", "ddpm_step", "ddim_step"}
    assert ops == elementwise | {"group_norm_act", "attention", "unet_step"}
    assert "== group_norm_act" in r.stdout and "== attention" in r.stdout and "== unet_step" in r.stdout
    for op in ops - {"attention"}:  # fused attention has no CPU kernel (SDPA): its rows carry a note, no time
        fd = [r for r in rows if r["op"] == op and r["impl"] == "fastdiff"]
        assert fd and all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in fd)
        if op in elementwise:
            assert all(r["speedup_vs_eager"] > 0 for r in fd)
    # --quick skips torch.compile, with a note
    comp = [r for r in rows if r["impl"] == "compile"]
    assert comp and all(r["median_ms"] is None and r["note"] for r in comp)


def test_bench_one_op_no_json(tmp_path):
    r = _run("bench", "--quick", "--device", "cpu", "--ops", "q_sample", "--shape", "4x2x8x8", "--dtype",
             "bf16", "--quiet", "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4x2x8x8" in r.stdout and "bf16" in r.stdout and "ddpm_step" not in r.stdout
    assert "plot" in r.stderr  # written, or skipped with a note when matplotlib is missing


@pytest.mark.parametrize("args", [["--shape", "12x"], ["--ops", "nope"], ["--dtype", "fp8"]])
def test_bench_bad_arguments(args, capsys):
    from fastdiff import cli

    assert cli.main(["bench", "--quick", "--device", "cpu", *args]) == 2
    assert "error" in capsys.readouterr().err


def test_table_and_parsers():
    from fastdiff import bench as B

    assert B.parse_shape("128x3x64x64") == (128, 3, 64, 64)
    with pytest.raises(ValueError):
        B.parse_shape("128")
    rows = [
        {"op": "q_sample", "shape": "2x3", "dtype": "fp32", "impl": "fastdiff", "variant": "", "median_ms": 1.0,
         "p20_ms": 0.9, "p80_ms": 1.1, "gbps": 10.0, "pct_copy_bw": 50.0, "note": "", "copy_gbps": 20.0},
        {"op": "q_sample", "shape": "2x3", "dtype": "fp32", "impl": "eager", "variant": "", "median_ms": 3.0,
         "p20_ms": 2.9, "p80_ms": 3.1, "gbps": 3.3, "pct_copy_bw": 16.0, "note": "", "copy_gbps": 20.0},
        {"op": "q_sample", "shape": "2x3", "dtype": "fp32", "impl": "compile", "variant": "", "median_ms": None,
         "p20_ms": None, "p80_ms": None, "gbps": None, "pct_copy_bw": None, "note": "skipped: test",
         "copy_gbps": 20.0},
    ]
    B.add_speedups(rows)
    assert rows[0]["speedup_vs_eager"] == pytest.approx(3.0)
    assert rows[0]["speedup_vs_compile"] is None
    table = B.format_table(rows)
    assert "3.00x" in table and "skipped: test" in table
