"""The end-to-end benchmark (fastdiff.bench_e2e) and its report script
(benchmarks/report.py): quick runs on CPU with the tiny preset, and the
report on synthetic JSON results."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

import pytest
import torch

from fastdiff.bench import cli as BC
from fastdiff.bench import e2e as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report_module():
    spec = importlib.util.spec_from_file_location("fastdiff_bench_report", os.path.join(ROOT, "benchmarks",
                                                                                         "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The tiny models gain nothing from threads; one thread keeps these timing runs fast when the CI
# machine's cores are shared (OpenMP threads spin). The fixture lives in conftest.
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------- model equivalence --
@pytest.mark.parametrize("preset", ["tiny", "digits-16", "ddpm-cifar10"])
def test_diffusers_pair_has_the_same_parameter_count(preset):
    fd, df = E.build_pair(preset)
    assert E.n_params(fd) == E.n_params(df)
    if preset == "ddpm-cifar10":
        assert E.n_params(fd) == 35_746_307
        cfg = E.diffusers_unet_config(fd.config)
        assert cfg["block_out_channels"] == (128, 256, 256, 256)
        assert cfg["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
        assert cfg["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
        assert cfg["attention_head_dim"] is None  # one head of the level's width (256)
        assert df.mid_block.attentions[0].heads == 1
    x = torch.randn(2, fd.in_ch, fd.config["image_size"], fd.config["image_size"])
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert df.eval()(x, t).sample.shape == fd.eval()(x, t).shape


def test_diffusers_config_rejects_what_unet2dmodel_cannot_express():
    from fastdiff.nn import PRESETS

    with pytest.raises(ValueError, match="resamp_with_conv"):
        E.diffusers_unet_config({**PRESETS["tiny"], "resamp_with_conv": False})


# ------------------------------------------------------------- quick runs --
@pytest.fixture(scope="module")
def train_rows():
    return E.run("train", "cpu", quick=True, impls=["diffusers", "diffusers-compile", "diffusers-patched", "fastdiff"])


@pytest.fixture(scope="module")
def sample_rows():
    return E.run("sample", "cpu", quick=True, methods=["ddim"], ddim_steps=2, reps=2,
                 impls=["diffusers", "diffusers-patched", "fastdiff", "fastdiff-graph"])


def _by_impl(rows):
    return {r["impl"]: r for r in rows}


def test_train_quick_rows(train_rows):
    rows = _by_impl(train_rows)
    assert list(rows) == ["diffusers", "diffusers-compile", "diffusers-patched", "fastdiff"]
    assert rows["diffusers-compile"]["median_ms"] is None and "quick" in rows["diffusers-compile"]["note"]
    assert "patched:" in rows["diffusers-patched"]["note"]
    params = {r["params"] for r in train_rows if r["params"]}
    assert params == {E.n_params(E.build_pair("tiny")[0])}
    for impl in ("diffusers", "diffusers-patched", "fastdiff"):
        r = rows[impl]
        assert r["suite"] == "train" and r["batch"] == 4 and r["shape"] == "4x3x16x16" and r["steps"] is None
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["reps"] >= 3
        assert math.isclose(r["images_per_s"], 4 / (r["median_ms"] * 1e-3))
        assert r["images_per_s_p20"] <= r["images_per_s"] <= r["images_per_s_p80"]
        assert r["model_ms"] > 0 and math.isclose(r["overhead_ms"], r["median_ms"] - r["model_ms"])
        # peak = parameters + AdamW state + inputs + what one step allocates above its start
        assert r["step_mem_bytes"] > 0 and r["peak_mem_bytes"] > 3 * 4 * r["params"]
    base = rows["diffusers"]["median_ms"]
    assert rows["diffusers"]["speedup_vs_diffusers"] is None
    assert math.isclose(rows["fastdiff"]["speedup_vs_diffusers"], base / rows["fastdiff"]["median_ms"])
    assert rows["fastdiff"]["speedup_vs_diffusers_compile"] is None  # the compiled baseline was not run


def test_sample_quick_rows(sample_rows):
    rows = _by_impl(sample_rows)
    assert rows["fastdiff-graph"]["median_ms"] is None and "GPU" in rows["fastdiff-graph"]["note"]
    for impl in ("diffusers", "diffusers-patched", "fastdiff"):
        r = rows[impl]
        assert r["method"] == "ddim" and r["steps"] == 2 and r["reps"] == 2
        assert r["median_ms"] > 0 and r["model_ms"] > 0
        assert math.isclose(r["step_ms"], r["median_ms"] / 2)
        assert math.isclose(r["non_model_us_per_step"], (r["median_ms"] - 2 * r["model_ms"]) / 2 * 1e3)
        assert r["peak_mem_bytes"] >= r["step_mem_bytes"] > 0
    assert rows["fastdiff"]["speedup_vs_diffusers"] == pytest.approx(
        rows["diffusers"]["median_ms"] / rows["fastdiff"]["median_ms"])


def test_table_json_and_plot(train_rows, sample_rows, tmp_path):
    text = E.format_table(train_rows + sample_rows)
    assert "== train: tiny 4x3x16x16" in text and "DDIM 2 steps" in text and "non-model us/step" in text
    assert "fastdiff-graph: skipped: CUDA graphs need a GPU" in text
    path = tmp_path / "e2e.json"
    E.write_json(str(path), train_rows, E.metadata("cpu", suite="train"))
    E.write_json(str(path), sample_rows, E.metadata("cpu", suite="sample"))  # a second suite is merged in
    data = json.loads(path.read_text())
    assert data["meta"]["kind"] == "e2e" and data["meta"]["suite"] == "sample,train"
    assert len(data["rows"]) == len(train_rows) + len(sample_rows)
    E.write_json(str(path), train_rows[:1], E.metadata("cpu", suite="train"))  # same suite: replaced
    assert len(json.loads(path.read_text())["rows"]) == 1 + len(sample_rows)
    msg = E.plot(train_rows + sample_rows, str(tmp_path / "e2e.png"))
    assert msg.startswith("plot written") and (tmp_path / "e2e.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kw,name", [
    (dict(suite="fit"), "suite"), (dict(preset="nope"), "preset"), (dict(batch=0), "batch"),
    (dict(layouts=["NWHC"]), "layouts"), (dict(methods=["euler"]), "methods"), (dict(impls=["mine"]), "impls"),
    (dict(reps=0), "reps"), (dict(ddpm_steps=1001), "ddpm_steps"), (dict(dtypes=["fp8"]), "dtype"),
])
def test_run_rejects_bad_arguments(kw, name):
    kw = {"suite": "sample", "device": "cpu", "quick": True, **kw}
    with pytest.raises(ValueError, match=name):
        E.run(kw.pop("suite"), kw.pop("device"), **kw)


def test_run_cli(tmp_path, capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    BC.add_options(p)
    out = tmp_path / "r.json"
    args = p.parse_args(["--quick", "--impls", "diffusers,fastdiff", "--methods", "ddpm", "--ddpm-steps", "2",
                         "--reps", "1", "--no-breakdown", "--no-memory", "--json", str(out)])
    assert BC.run_cli("sample", args) == 0
    assert "DDPM 2 steps" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["diffusers", "fastdiff"]
    assert rows[1]["model_ms"] is None and rows[1]["peak_mem_bytes"] is None and rows[1]["median_ms"] > 0
    bad = p.parse_args(["--quick", "--layout", "NHCW"])
    assert BC.run_cli("sample", bad) == 2
    assert "layouts" in capsys.readouterr().err


# ----------------------------------------------------------------- report ---
def _synthetic_e2e():
    def row(suite, impl, ms, method=None, steps=None, model_ms=None, **kw):
        r = {"suite": suite, "impl": impl, "device": "cuda", "preset": "ddpm-cifar10",
             "batch": 128 if suite == "train" else 256, "method": method, "steps": steps, "dtype": "bf16",
             "precision": "bf16 autocast", "layout": "NHWC", "shape": "128x3x32x32", "params": 35746307,
             "median_ms": ms, "p20_ms": ms and ms * 0.98, "p80_ms": ms and ms * 1.02, "reps": 10, "first_call_s": 1.0,
             "images_per_s": None, "images_per_s_p20": None, "images_per_s_p80": None, "model_ms": model_ms,
             "overhead_ms": None, "step_ms": None, "non_model_us_per_step": None, "peak_mem_bytes": 2 ** 30,
             "step_mem_bytes": 2 ** 29, "mem_method": "x", "note": ""}
        r.update(kw)
        if ms:
            r["images_per_s"] = r["batch"] / (ms * 1e-3)
        if suite == "sample" and ms and model_ms:
            r["non_model_us_per_step"] = (ms - steps * model_ms) / steps * 1e3
        return r
    rows = [row("train", "diffusers", 160.0), row("train", "diffusers-compile", 120.0),
            row("train", "diffusers-patched", 130.0), row("train", "fastdiff", 100.0),
            row("train", "fastdiff-compile", None, note="skipped: --no-compile"),
            row("sample", "diffusers", 30000.0, "ddpm", 1000, 20.0),
            row("sample", "fastdiff-graph", 18000.0, "ddpm", 1000, 17.99),
            row("train", "diffusers", 320.0, dtype="fp32", precision="fp32", layout="NCHW")]
    E.add_speedups(rows)
    meta = {"kind": "e2e", "device": "cuda", "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54"},
            "torch": "2.14.1", "triton": "3.8.0", "diffusers": "0.42.1", "fastdiff": "0.4.0",
            "git_commit": "0123456789abcdef", "date": "2025-01-01T00:00:00+00:00", "torch_cuda": "12.8"}
    return {"meta": meta, "rows": rows}


def test_report_targets_on_synthetic_results():
    R = _report_module()
    data = _synthetic_e2e()
    got = {t["target"]: t for t in R.evaluate_targets(data["rows"], data["meta"]) if "bf16" in t["case"]}
    assert got["train_vs_eager"]["value"] == pytest.approx(1.6) and got["train_vs_eager"]["met"]
    assert got["train_vs_compile"]["value"] == pytest.approx(1.2) and got["train_vs_compile"]["met"]
    assert got["patched_train"]["value"] == pytest.approx(160 / 130) and got["patched_train"]["met"] is False
    assert got["sample_ddpm"]["value"] == pytest.approx(30 / 18) and got["sample_ddpm"]["met"] is False
    assert got["sample_overhead"]["value"] == pytest.approx(10.0) and got["sample_overhead"]["met"] is False
    assert all(t["representative"] for t in got.values())
    assert got["train_vs_eager"]["vs_default"] == pytest.approx(3.2)  # against diffusers fp32 NCHW
    fp32 = [t for t in R.evaluate_targets(data["rows"], data["meta"]) if "fp32" in t["case"]]
    assert fp32 and all(t["met"] is None and t["value"] is None for t in fp32)  # no fastdiff row there


def test_report_writes_readme_and_charts(tmp_path):
    R = _report_module()
    res = tmp_path / "results"
    res.mkdir()
    (res / "h100-e2e.json").write_text(json.dumps(_synthetic_e2e()))
    ops = {"meta": {"device": "cpu", "cpu": "Some CPU", "cpu_threads": 2, "copy_gbps": 20.0, "torch": "2.14.1"},
           "rows": [{"op": "q_sample", "shape": "8x3x32x32", "dtype": "fp32", "impl": "fastdiff", "variant": "",
                     "pct_copy_bw": 90.0},
                    {"op": "q_sample", "shape": "8x3x32x32", "dtype": "fp32", "impl": "eager", "variant": "",
                     "pct_copy_bw": 40.0}]}
    (res / "cpu-ops.json").write_text(json.dumps(ops))
    (res / "not-a-result.json").write_text("[1, 2]")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nkept text\n\n{R.BEGIN}\nold\n{R.END}\n\ntail text\n")
    assert R.main(["--results", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nkept text\n") and text.endswith("tail text\n") and "\nold\n" not in text
    assert "NVIDIA H100 80GB HBM3" in text and "driver 550.54" in text and "`0123456789ab`" in text
    assert "| fastdiff | 1280.0 (" in text and "| 1.60x | 1.20x |" in text
    assert "missed by 17%" in text  # sampling 1.67x against 2x
    assert "missed by 5.0 us" in text
    assert "| q_sample | 8x3x32x32 | fp32 | 90% | 40% |" in text
    for png in ("h100-e2e.png", "cpu-ops-copybw.png"):
        assert (res / png).read_bytes()[:4] == b"\x89PNG"
    # idempotent: a second run changes nothing, and --check agrees
    assert R.update_readme(str(readme), R.render(R.load_results(str(res)), str(tmp_path))[0]) is False
    assert R.main(["--results", str(res), "--readme", str(readme), "--check"]) == 0
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="README.md"):
        R.main(["--results", str(res), "--readme", str(readme)])


# ---------------------------------------------- training loops, EMA, FLOPs --
def test_train_loop_rows_flops_and_speedups():
    rows = E.run("train", "cpu", quick=True, impls=["diffusers-loop", "diffusers-loop-foreach", "fastdiff-step",
                                                     "fastdiff-step-graph"], breakdown=False, memory=False)
    by = {r["impl"]: r for r in rows}
    assert "CUDA graphs need a GPU" in by["fastdiff-step-graph"]["note"]
    for k in ("diffusers-loop", "diffusers-loop-foreach", "fastdiff-step"):
        r = by[k]
        assert r["median_ms"] > 0 and r["train_flops"] > 0 and r["tflops"] > 0
        assert r["pct_bf16_peak"] is None  # no peak on a CPU
    assert by["diffusers-loop"]["speedup_vs_diffusers_loop"] is None  # not against itself
    assert by["fastdiff-step"]["speedup_vs_diffusers_loop"] == pytest.approx(
        by["diffusers-loop"]["median_ms"] / by["fastdiff-step"]["median_ms"])
    table = E.format_table(rows)
    assert "% bf16 peak" in table and "vs diff.loop" in table
    # the sampling suite does not run training loops by default
    assert not any(k in E.TRAIN_LOOPS for k in
                   [r["impl"] for r in E.run("sample", "cpu", quick=True, methods=["ddim"], impls=None,
                                             breakdown=False, memory=False, ddim_steps=1)
                    if r["median_ms"] is not None or "training configuration" in r["note"]])


def test_train_flops_counts_forward_and_backward():
    case = E.Case("train", "cpu", "tiny", 2, torch.float32, "NCHW")
    f2 = E.train_flops(case)
    f4 = E.train_flops(E.Case("train", "cpu", "tiny", 4, torch.float32, "NCHW"))
    assert f2 > 0 and f4 == pytest.approx(2 * f2, rel=1e-6)  # linear in the batch
    assert E.bf16_peak_tflops("cpu") is None
    names = [k for k, _ in E.BF16_PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100") and names.index("L40S") < names.index("L4")


def test_ema_update_timing_tiny():
    r = E.ema_update_timing("tiny", "cpu", reps=2)
    assert r["params"] == 177_427 and set(r["median_ms"]) == {
        "fastdiff EMA", "diffusers EMAModel(foreach=False)", "diffusers EMAModel(foreach=True)"}
    assert r["speedup_vs_foreach_false"] > 0 and r["speedup_vs_foreach_true"] > 0
