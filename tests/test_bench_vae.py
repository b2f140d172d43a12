"""fastdiff bench vae: the AutoencoderKL decode case runs (tiny config, quick timing), reports every block
fused, and is reachable from the CLI."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from fastdiff import cli  # noqa: E402
from fastdiff.bench import vae as V  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_vae_quick(tmp_path, capsys):
    out = tmp_path / "vae.json"
    assert cli.main(["bench", "vae", "--device", "cpu", "--quick", "--quiet", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "VAE decode" in text and "predicted" in text and "upsamplers" in text
    r = json.loads(out.read_text())["rows"][0]
    assert r["skipped"] == 0 and r["fused"]["resnet_block"] == 4 * 2 + 2 + 4 * 3 + 2
    assert r["fused"]["attention"] == 2 and r["fused"]["norm_out_silu"] == 2 and r["fused"]["upsample"] == 3
    assert r["stock_ms"] > 0 and r["patched_ms"] > 0 and r["speedup"] > 0
    assert 0 < r["norm_act_fraction"] < 1 and 0 < r["upsample_fraction"] < 1 and r["pred_speedup"] >= 1
    assert r["stock_peak_bytes"] > 0 and r["patched_peak_bytes"] > 0
    assert "SD-1.5" in V.__doc__ and V.SD15["block_out_channels"] == (128, 256, 512, 512)


def test_bench_vae_bad_dtype(capsys):
    assert cli.main(["bench", "vae", "--device", "cpu", "--dtype", "fp64"]) == 2
    assert "fp64" in capsys.readouterr().err
