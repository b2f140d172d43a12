"""Smoke tests of the command line: `fastdiff info`, `fastdiff bench --quick`,
`train` / `sample` / `eval` on tiny runs, bad arguments, and `--help` of every
subcommand (run as `python -m fastdiff`)."""
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


@pytest.mark.parametrize("sub", [[], ["info"], ["bench"], ["train"], ["sample"], ["eval"]],
                         ids=["top", "info", "bench", "train", "sample", "eval"])
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
    if sub == ["train"]:
        for opt in ("--dataset", "--data-root", "--image-size", "--preset", "--steps", "--batch", "--precision",
                    "--out", "--resume", "--channels-last", "--compile", "--ema-decay", "--grad-clip", "--warmup"):
            assert opt in out, opt
    if sub == ["sample"]:
        for opt in ("--checkpoint", "--n", "--steps", "--method", "--eta", "--out", "--cuda-graph", "--no-ema"):
            assert opt in out, opt
    if sub == ["eval"]:
        for opt in ("--checkpoint", "--dataset", "--n", "--batch", "--json", "--fid", "--is", "--kid", "--no-bpd",
                    "--inception-weights", "--ref-stats", "--ref-n", "--num-samples", "--sample-batch", "--method",
                    "--kid-subset-size", "--is-splits", "pt_inception-2015-12-05-6726825d.pth", "50000"):
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
    elementwise = {"q_sample_rng", "q_sample", "diffusion_loss", "ddpm_step", "ddim_step", "guided_step",
                   "multistep_step", "sampler_loop", "train_chain"}
    assert ops == elementwise | {"group_norm_act", "attention", "unet_step"}
    assert "== group_norm_act" in r.stdout and "== attention" in r.stdout and "== unet_step" in r.stdout
    for op in ops - {"attention"}:  # fused attention has no CPU kernel (SDPA): its rows carry a note, no time
        fd = [r for r in rows if r["op"] == op and r["impl"] == "fastdiff"]
        assert fd and all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in fd)
        if op == "sampler_loop":  # whole scheduler loops: diffusers is the baseline
            assert all(r["speedup_vs_diffusers"] > 0 for r in fd)
        elif op in elementwise:
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


# ------------------------------------------------------ train/sample/eval ----
@pytest.fixture(scope="module")
def roll_run(tmp_path_factory):
    """A 40-step swiss-roll run through the CLI, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "roll"
    r = _run("train", "--dataset", "swissroll", "--steps", "40", "--batch", "64", "--log-every", "10",
             "--checkpoint-every", "20", "--num-samples", "64", "--sample-steps", "10", "--timesteps", "100",
             "--out", str(out), "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout)


def test_train_writes_run(roll_run):
    out, summary = roll_run
    assert summary["steps"] == 40 and summary["final_loss"] > 0
    for name in ("loss.png", "log.csv", "log.json", "checkpoint/model.safetensors", "checkpoint/ema.safetensors",
                 "checkpoint/state.pt"):
        assert (out / name).is_file(), name
    assert Path(summary["samples"]).is_file()
    log = json.loads((out / "log.json").read_text())["history"]
    assert [row["step"] for row in log] == [10, 20, 30, 40]


def test_train_resume_continues(roll_run, tmp_path):
    import shutil

    out, _ = roll_run
    run = tmp_path / "roll"
    shutil.copytree(out, run)
    r = _run("train", "--dataset", "swissroll", "--steps", "50", "--batch", "64", "--log-every", "10",
             "--checkpoint-every", "20", "--num-samples", "0", "--timesteps", "100", "--out", str(run), "--resume",
             "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((run / "log.json").read_text())["history"]
    assert [row["step"] for row in log] == [10, 20, 30, 40, 50]


def test_train_step_mode_flags(tmp_path):
    """--step-mode / --device-data / --random-flip reach TrainConfig (the compiled modes themselves are
    tested in tests/test_train_step.py: here fp16 makes graph fall back to the eager step, with one warning)."""
    common = ("train", "--dataset", "swissroll", "--steps", "3", "--batch", "16", "--timesteps", "20",
              "--num-samples", "0", "--no-progress", "--threads", "1")
    r = _run(*common, "--step-mode", "graph", "--precision", "fp16", "--device-data", "off", "--out",
             str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("step_mode='graph' with precision='fp16'") == 1
    cfg = json.loads((tmp_path / "a" / "log.json").read_text())["config"]
    assert cfg["step_mode"] == "graph" and cfg["device_data"] == "off" and not cfg["random_flip"]
    r = _run(*common, "--random-flip", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "random_flip needs image data" in r.stderr


@pytest.mark.parametrize("method,ext", [("ddpm", "png"), ("ddim", "npz")])
def test_sample(roll_run, tmp_path, method, ext):
    import numpy as np

    out, _ = roll_run
    dest = tmp_path / f"s.{ext}"
    r = _run("sample", "--checkpoint", str(out), "--n", "30", "--batch", "16", "--method", method, "--steps", "10",
             "--out", str(dest), "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert dest.is_file() and "30 samples" in r.stdout
    if ext == "npz":
        s = np.load(dest)["samples"]
        assert s.shape == (30, 2) and np.isfinite(s).all()
        # the trained roll model's samples land near the data's scale (unit second moment)
        assert 0.05 < float((s**2).mean()) < 20


def test_eval_digits(tmp_path):
    run = tmp_path / "dig"
    r = _run("train", "--dataset", "digits", "--preset", "tiny", "--steps", "2", "--batch", "4", "--timesteps", "20",
             "--num-samples", "4", "--sample-steps", "2", "--out", str(run), "--no-progress", "--threads", "1")
    assert r.returncode != 0 and "error" in r.stderr and "tiny" in r.stderr  # tiny is a 3-channel preset
    r = _run("train", "--dataset", "digits", "--steps", "2", "--batch", "4", "--timesteps", "20", "--num-samples", "4",
             "--sample-steps", "2", "--out", str(run), "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "samples_step000002.png").is_file()
    res = tmp_path / "ev.json"
    r = _run("eval", "--checkpoint", str(run), "--n", "3", "--batch", "2", "--json", str(res), "--no-progress",
             "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(res.read_text())
    assert d["n"] == 3 and len(d["vb_bpd_by_t"]) == 20
    assert d["bpd"] == pytest.approx(d["prior_bpd"] + d["vb_terms_bpd"] + d["decoder_bpd"], rel=1e-9)
    assert "bits/dim over 3 images" in r.stdout


@pytest.mark.parametrize("args,word", [
    (["train", "--dataset", "cifar10"], "--data-root"),
    (["train", "--dataset", "folder", "--data-root", "/nonexistent/fastdiff"], "/nonexistent/fastdiff"),
    (["train", "--dataset", "swissroll", "--preset", "ddpm-cifar10"], "--preset"),
    (["train", "--dataset", "digits", "--preset", "nope"], "--preset"),
    (["train", "--steps", "0"], "--steps"),
    (["sample", "--checkpoint", "/nonexistent/fastdiff"], "/nonexistent/fastdiff"),
    (["eval", "--checkpoint", "/nonexistent/fastdiff"], "/nonexistent/fastdiff"),
], ids=["no-root", "bad-root", "preset-shape", "preset-name", "steps", "sample-path", "eval-path"])
def test_bad_arguments_name_the_option(args, word, capsys):
    from fastdiff import cli

    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error" in err and word in err, err


def test_bench_sample_quick(tmp_path):
    out = tmp_path / "e2e.json"
    r = _run("bench", "sample", "--quick", "--device", "cpu", "--threads", "1", "--methods", "ddim",
             "--impls", "diffusers,fastdiff", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== sample" in r.stdout and "fastdiff" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {row["impl"] for row in rows} == {"diffusers", "fastdiff"}
    assert all(row["median_ms"] > 0 for row in rows)
