"""`fastdiff bench host`: the host-cost rows exist, pair each fastdiff call with
its baseline, and are sane (no timing asserts: speed targets live in the benchmark)."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")

from fastdiff.bench import host as H  # noqa: E402
from fastdiff.cli import main  # noqa: E402


def test_host_rows_exist_and_are_sane():
    rows = H.run_host(quick=True)
    by = {(r["op"], r["impl"]): r for r in rows}
    for name in H.ROWS:
        base, target = H.TARGETS[name]
        fd, b = by[(name, "fastdiff")], by[(name, base)]
        for r in (fd, b):
            assert r["median_us"] is not None and 0 < r["median_us"] < 1e6, r
            assert r["p20_us"] <= r["median_us"] <= r["p80_us"], r
            assert r["shape"] == "2x1x4x4" and r["threads"] == 1 and not r["note"], r
        assert fd["baseline"] == base and fd["target"] == target
        assert math.isclose(fd["ratio"], fd["median_us"] / b["median_us"])
    text = H.format_host_table(rows)
    for name in H.ROWS:
        assert name in text
    assert "<= 6.0x" in text and "<= 0.3x" in text


def test_host_unknown_row():
    with pytest.raises(ValueError, match="unknown host row"):
        H.run_host(quick=True, rows=["nope"])


def test_bench_host_cli_json(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert main(["bench", "host", "--quick", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["suite"] == "host"
    assert {r["op"] for r in doc["rows"]} == set(H.ROWS)
    assert "FusedDDPMScheduler.step" in capsys.readouterr().out
