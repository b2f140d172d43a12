"""fastdiff bench sample --methods latent: the latent-diffusion case (SD-1.5 block structure, tiny widths,
quick timing) runs, fuses the U-Net and the VAE, reports U-Net step / VAE decode times and peak memory, and
is reachable from the CLI."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from fastdiff import cli  # noqa: E402
from fastdiff.bench import latent as LT  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_latent_quick_rows():
    rows = LT.run("cpu", quick=True, impls=["stock", "patched", "compiled"])
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"stock", "patched", "compiled"}
    for impl in ("stock", "patched"):
        r = by[impl]
        assert r["unet_ms"] > 0 and r["decode_ms"] > 0 and r["unet_p20_ms"] <= r["unet_ms"] <= r["unet_p80_ms"]
        assert r["unet_peak_bytes"] > 0 and r["decode_peak_bytes"] > 0
        assert r["unet_speedup_vs_stock"] > 0 and r["decode_speedup_vs_stock"] > 0
        assert r["context"] == [77, 64] and r["latent"] == [1, 4, 8, 8] and r["image"] == 64
    assert by["stock"]["unet_speedup_vs_stock"] == 1.0
    f = by["patched"]["fused"]
    assert f["unet"].get("resnet_block", 0) > 0 and f["vae"].get("resnet_block", 0) > 0
    # --quick leaves compilation off: a row with a note, no time
    assert by["compiled"]["note"].startswith("skipped") and by["compiled"].get("unet_ms") is None
    assert "patched" in LT.format_table(rows)


def test_configs_keep_the_sd15_block_structure():
    sd, small = LT.CONFIGS["sd15"], LT.CONFIGS["cpu"]
    assert sd["unet_channels"] == (320, 640, 1280, 1280) and sd["latent"] == 64
    assert sd["tokens"] == small["tokens"] == 77 and sd["context_dim"] == small["context_dim"] == 768
    unet = LT.build_unet(LT.CONFIGS["tiny"], torch.float32, "cpu")
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"


def test_patched_outputs_equal_stock():
    cfg = LT.CONFIGS["tiny"]
    unet, vae = LT.build_unet(cfg, torch.float32, "cpu"), LT.build_vae(cfg, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg["context_dim"], generator=g)
    pu, pdec, counts = LT._make("patched", unet, vae, None)
    with torch.inference_mode():
        torch.testing.assert_close(pu(lat, 500, encoder_hidden_states=ctx).sample,
                                   unet(lat, 500, encoder_hidden_states=ctx).sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pdec(lat[:1]).sample, vae.decode(lat[:1]).sample, rtol=1e-4, atol=1e-4)


def test_cli_sample_latent(tmp_path, capsys):
    out = tmp_path / "latent.json"
    assert cli.main(["bench", "sample", "--methods", "latent", "--device", "cpu", "--quick", "--quiet",
                     "--impls", "stock,patched", "--no-memory", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "latent diffusion (tiny)" in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"stock", "patched"} and all(r["method"] == "latent" for r in rows)


def test_bad_configuration_names():
    with pytest.raises(ValueError, match="latent configuration"):
        LT.run("cpu", quick=True, impls=["nope"])
    with pytest.raises(ValueError, match="config"):
        LT.run("cpu", quick=True, config="sd3")
