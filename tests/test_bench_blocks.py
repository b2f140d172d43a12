"""Smoke and fairness tests of the U-Net block benchmarks (fastdiff/bench_blocks.py
and the block parts of fastdiff/bench.py and `fastdiff bench`): tiny shapes,
--quick timing, one thread (an oversubscribed 2-core box makes OpenMP regions
wait for scheduler slices). Numbers are not judged here; what is checked is
that every implementation of a case does the same work on the same inputs,
the byte/FLOP model, the memory measurement, and the rows/table/JSON."""
from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiff
from fastdiff import bench as B
from fastdiff.bench import blocks as BB
from fastdiff import ops as _ops
from fastdiff.reference import blocks as ref


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for the module


def _close(a, b, tol=2e-4):
    assert a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


# ------------------------------------------------------------- model --------
def test_byte_and_flop_model():
    N, C, H, W = 128, 128, 32, 32
    T = N * C * H * W * 4
    small = 2 * C * 4 + 2 * N * 32 * 4  # weight + bias, mean + rstd
    assert BB.gn_bytes((N, C, H, W), 4, "plain", "fwd") == 2 * T + small
    assert BB.gn_bytes((N, C, H, W), 4, "plain", "bwd") == 3 * T + small + 2 * C * 4
    nc = N * C * 4
    assert BB.gn_bytes((N, C, H, W), 2, "scale_shift", "full") == \
        BB.gn_bytes((N, C, H, W), 2, "scale_shift", "fwd") + BB.gn_bytes((N, C, H, W), 2, "scale_shift", "bwd")
    assert BB.gn_bytes((N, C, H, W), 4, "add", "fwd") - BB.gn_bytes((N, C, H, W), 4, "plain", "fwd") == nc
    c = BB.AttnCase("cross", 2, 8, 1024, 77, 64)
    q, kv, lse = 2 * 8 * 1024 * 64 * 2, 2 * 8 * 77 * 64 * 2, 2 * 8 * 1024 * 4
    assert BB.attn_bytes(c, 2, "fwd") == 2 * q + 2 * kv
    assert BB.attn_bytes(c, 2, "fwd+bwd") == (2 * q + 2 * kv) + lse + (3 * q + 2 * kv + lse) + (q + 2 * kv)
    assert BB.attn_flops(c, "fwd") == 4 * 2 * 8 * 1024 * 77 * 64
    assert BB.attn_flops(c, "fwd+bwd") == 3 * BB.attn_flops(c, "fwd")
    assert c.label == "2x8x1024x64/kv77" and BB.AttnCase("self", 1, 1, 4, 4, 8).label == "1x1x4x8"


@pytest.mark.parametrize("variant", BB.GN_VARIANTS)
def test_eager_baseline_is_the_reference_maths(variant):
    """The eager baseline computes exactly the function fastdiff fuses."""
    g = torch.Generator().manual_seed(0)
    N, C = 3, 64
    x = torch.randn(N, C, 5, 7, generator=g, dtype=torch.float64) + 3.0
    w, b = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    add = torch.randn(N, C, generator=g, dtype=torch.float64) if variant == "add" else None
    sc = torch.randn(N, C, generator=g, dtype=torch.float64) if variant == "scale_shift" else None
    sh = torch.randn(N, C, generator=g, dtype=torch.float64) if variant == "scale_shift" else None
    y_ref, _, _ = ref.group_norm_act(x, w, b, add, sc, sh, BB.GROUPS, BB.EPS, True)
    _close(BB.eager_group_norm_act(x, w, b, add, sc, sh), y_ref, 1e-10)
    q, k, v = (torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    _close(BB.eager_attention(q, k, v), ref.attention(q, k, v, 1 / math.sqrt(5))[0], 1e-10)


def _grads(res):
    return res if isinstance(res, tuple) else (res,)


@pytest.mark.parametrize("layout", BB.LAYOUTS)
@pytest.mark.parametrize("variant", BB.GN_VARIANTS)
def test_group_norm_cases_do_the_same_work(variant, layout):
    """fastdiff and eager get the same inputs and dy and return the same
    outputs / gradients in every mode (the timed calls are comparable), and
    each input set is distinct (the rotation really rotates)."""
    gen = torch.Generator().manual_seed(0)
    sets = BB._gn_inputs((2, 64, 3, 5), torch.float32, "cpu", layout, variant, 2, gen)
    assert not torch.equal(sets[0]["x"], sets[1]["x"])
    if layout == "NHWC":
        assert sets[0]["x"].is_contiguous(memory_format=torch.channels_last) and not sets[0]["x"].is_contiguous()
    for mode in BB.GN_MODES:
        cases = BB._gn_cases(mode, sets, [("fastdiff", None)], None, "off", 123)
        assert [c.impl for c in cases] == ["fastdiff", "eager", "compile"]
        assert cases[2].fn is None and cases[2].note == "off"
        for i in range(2):
            fd, eg = _grads(cases[0].fn(i)), _grads(cases[1].fn(i))
            assert len(fd) == len(eg) == (1 if mode == "fwd" else 3 + {"plain": 0, "add": 1, "scale_shift": 2}[
                variant])
            for a, b in zip(fd, eg):
                _close(a, b)
        if mode == "bwd":  # the kept graph can be run again (retain_graph)
            _close(_grads(cases[0].fn(0))[0], _grads(cases[1].fn(0))[0])


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_attention_cases_do_the_same_work(kind):
    c = BB.AttnCase(kind, 2, 2, 12, 12 if kind == "self" else 5, 8)
    inp = BB._attn_inputs(c, torch.float32, "cpu", 2, torch.Generator().manual_seed(0))
    for mode in BB.ATTN_MODES:
        cases = BB._attn_cases(c, mode, inp, [], "cpu", 1)
        assert [x.impl for x in cases] == ["fastdiff", "sdpa", "eager"]
        assert cases[0].fn is None and "n/a on CPU" in cases[0].note
        assert cases[1].note.startswith("PyTorch picks ")
        for i in range(2):
            for a, b in zip(_grads(cases[1].fn(i)), _grads(cases[2].fn(i))):
                _close(a, b)
        assert all(x.variant == f"{kind} {mode}" for x in cases)


# ------------------------------------------------------------ memory --------
def test_cpu_peak_bytes_is_exact():
    def work():
        a = torch.empty(1 << 20)             # 4 MiB
        b = torch.empty(1 << 20)             # 8 MiB live
        del a                                # 4 MiB
        c = torch.empty(1 << 21)             # 12 MiB
        d = (b + 1).sum()                    # + 4 MiB temporary: 16 MiB peak (+ a few scalar bytes)
        return c, d

    assert 0 <= B.cpu_peak_bytes(work) - (16 << 20) <= 64
    keep = torch.ones(1 << 20)  # allocated before: not counted
    assert B.cpu_peak_bytes(lambda: keep.mul_(2)) <= 64  # in place: only the wrapped scalar


class _TinyFused(nn.Module):
    """conv -> GroupNorm+SiLU with a time-embedding add -> self-attention,
    calling the fastdiff functions at call time (as fastdiff.nn does)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.emb = nn.Embedding(1000, 32)
        self.norm = nn.GroupNorm(BB.GROUPS, 32)
        self.qkv = nn.Conv2d(32, 96, 1)
        self.out = nn.Conv2d(32, 3, 1)

    def forward(self, x, t):
        h = _ops.group_norm_act(self.conv(x), BB.GROUPS, self.norm.weight, self.norm.bias, add=self.emb(t))
        N, C, H, W = h.shape
        q, k, v = self.qkv(h).reshape(N, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        a = _ops.attention(q, k, v).transpose(-1, -2).reshape(N, C, H, W)
        return self.out(h + a)


@contextlib.contextmanager
def _stock_ops(model):
    """Test stand-in for fastdiff.nn.unfused: stock ops for every fused call."""
    gn, attn = _ops.group_norm_act, _ops.attention

    def stock_gn(x, g, w, b, *, eps=1e-5, add=None, scale=None, shift=None, silu=True):
        pc = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        h = F.group_norm(x if add is None else x + add.view(pc), g, w, b, eps)
        h = h if scale is None else h * (1 + scale.view(pc))
        h = h if shift is None else h + shift.view(pc)
        return F.silu(h) if silu else h

    _ops.group_norm_act = stock_gn
    _ops.attention = lambda q, k, v, scale=None, fused=None: F.scaled_dot_product_attention(q, k, v, scale=scale)
    try:
        yield model
    finally:
        _ops.group_norm_act, _ops.attention = gn, attn


def test_unet_rows_time_and_memory():
    logs = []
    rows = BB.unet_rows("cpu", 2, ["fp32"], True, logs.append, preset="test-tiny", model_factory=_TinyFused,
                        unfused=_stock_ops)
    rows = B.add_speedups(rows)
    assert [r["impl"] for r in rows] == ["fastdiff", "stock"]
    fd, st = rows
    for r in rows:
        assert r["op"] == "unet_step" and r["shape"] == "2x3x32x32" and r["variant"] == "test-tiny"
        assert r["median_ms"] > 0 and r["reps"] >= 3
        assert r["step_mem_bytes"] > 0 and r["peak_mem_bytes"] > r["step_mem_bytes"]
        assert r["mem_method"].startswith("torch.profiler")
    # the two steps share one model and optimizer (context-manager unfused): the same base
    assert fd["peak_mem_bytes"] - fd["step_mem_bytes"] == st["peak_mem_bytes"] - st["step_mem_bytes"]
    assert fd["peak_mem_ratio_vs_stock"] == pytest.approx(fd["peak_mem_bytes"] / st["peak_mem_bytes"])
    assert fd["step_mem_ratio_vs_stock"] == pytest.approx(fd["step_mem_bytes"] / st["step_mem_bytes"])
    assert fd["speedup_vs_stock"] == pytest.approx(st["median_ms"] / fd["median_ms"])
    assert any("peak memory" in m for m in logs)
    table = B.format_table(rows)
    assert "== unet_step" in table and "peak MiB" in table and "mem vs stock" in table


def test_unet_rows_with_a_global_unfused_switch():
    """fastdiff.nn.unfused() may be a context manager that takes no model."""
    @contextlib.contextmanager
    def unfused():
        with _stock_ops(None):
            yield

    rows = BB.unet_rows("cpu", 1, ["fp32"], True, lambda m: None, model_factory=_TinyFused, unfused=unfused)
    assert all(r["median_ms"] > 0 and r["step_mem_bytes"] > 0 for r in rows), [r["note"] for r in rows]
    assert rows[0]["peak_mem_ratio_vs_stock"] == pytest.approx(rows[0]["peak_mem_bytes"] / rows[1]["peak_mem_bytes"])


def test_unet_stock_step_runs_no_fused_op(monkeypatch):
    calls = []
    fused = _ops.group_norm_act
    monkeypatch.setattr(_ops, "group_norm_act", lambda *a, **k: calls.append(1) or fused(*a, **k))
    st = BB.unet_steps("cpu", 1, "fp32", model_factory=_TinyFused, unfused=_stock_ops)
    n = len(calls)
    st["stock"](1)
    assert len(calls) == n
    st["fastdiff"](1)
    assert len(calls) == n + 1


def test_unet_stock_model_from_a_function():
    """unfused may also return a stock model: it is applied to a copy."""
    calls = []

    def unfused_fn(model):
        calls.append(model)
        return model

    st = BB.unet_steps("cpu", 1, "fp32", model_factory=_TinyFused, unfused=unfused_fn)
    assert st["shape"] == (1, 3, 32, 32) and callable(st["fastdiff"]) and callable(st["stock"])
    assert float(st["stock"](1).detach()) >= 0


def test_unet_rows_skip_without_fastdiff_nn(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastdiff.nn", None)  # import fails
    rows = BB.unet_rows("cpu", 1, ["fp32"], True, lambda m: None)
    assert [r["impl"] for r in rows] == ["fastdiff", "stock"]
    assert all(r["median_ms"] is None and "fastdiff.nn.UNet is not importable" in r["note"] for r in rows)


# --------------------------------------------------- rows, table, CLI -------
def test_expand_ops():
    assert B.expand_ops(None) == list(B.OPS) + list(B.BLOCK_OPS)
    assert B.expand_ops(["blocks"]) == ["group_norm_act", "attention", "unet_step"]
    assert B.expand_ops(["attention", "elementwise", "attention"]) == ["attention"] + list(B.OPS)
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        B.expand_ops(["nope"])


def _row(op, impl, variant, ms, **kw):
    r = {"op": op, "impl": impl, "variant": variant, "shape": "2x64x4x4", "dtype": "fp32", "device": "cpu",
         "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "bytes": 100, "gbps": 1.0, "pct_copy_bw": 5.0, "note": "",
         "copy_gbps": 20.0}
    r.update(kw)
    return r


def test_speedups_match_the_variant_and_sections():
    rows = [_row("q_sample", "fastdiff", "", 1.0), _row("q_sample", "eager", "", 3.0),
            _row("q_sample", "diffusers", "", 4.0), _row("q_sample", "compile", "", None, note="skipped: x"),
            _row("group_norm_act", "fastdiff", "plain NCHW fwd", 1.0),
            _row("group_norm_act", "eager", "plain NCHW fwd", 2.0),
            _row("group_norm_act", "eager", "plain NHWC fwd", 8.0),
            _row("group_norm_act", "compile", "plain NCHW fwd", 4.0)]
    B.add_speedups(rows)
    assert rows[0]["speedup_vs_eager"] == 3.0 and rows[0]["speedup_vs_diffusers"] == 4.0
    assert rows[4]["speedup_vs_eager"] == 2.0 and rows[4]["speedup_vs_compile"] == 4.0
    assert rows[4]["speedup_vs_diffusers"] is None and rows[4]["speedup_vs_sdpa"] is None
    table = B.format_table(rows)
    head = table.splitlines()[0]
    # the elementwise section keeps its columns; the block section gets its own
    assert head.split()[-6:] == ["vs", "diffusers", "vs", "eager", "vs", "compile"]
    assert "== group_norm_act" in table
    block_head = table.splitlines()[table.splitlines().index(next(ln for ln in table.splitlines()
                                                                  if ln.startswith("== group_norm_act"))) + 1]
    assert "vs eager" in block_head and "vs compile" in block_head and "vs diffusers" not in block_head
    assert "q_sample 2x64x4x4 fp32 compile: skipped: x" in table


def test_plot_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert B.plot([_row("attention", "fastdiff", "self fwd", 1.0)], "x.png").startswith("plot skipped")


def test_cli_blocks_quick_json(tmp_path):
    """`fastdiff bench --quick --ops group_norm_act,attention --shape ...`:
    with only block ops selected, --shape gives their feature maps."""
    from fastdiff import cli

    out = tmp_path / "blocks.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--ops", "group_norm_act,attention", "--shape",
                   "2x64x4x3", "--no-malloc-reuse", "--quiet", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["meta"]["quick"] is True and d["meta"]["full"] is False and d["meta"]["copy_gbps"] > 0
    gn = [r for r in d["rows"] if r["op"] == "group_norm_act"]
    at = [r for r in d["rows"] if r["op"] == "attention"]
    assert len(gn) == 3 * 2 * 3 * 3  # variants x layouts x modes x (fastdiff, eager, compile)
    assert {r["shape"] for r in gn} == {"2x64x4x3"}
    assert {r["variant"] for r in gn} == {f"{v} {lay} {m}" for v in BB.GN_VARIANTS for lay in BB.LAYOUTS
                                          for m in BB.GN_MODES}
    for r in gn:
        if r["impl"] == "compile":
            assert r["median_ms"] is None and "--quick" in r["note"]
        else:
            assert r["median_ms"] > 0 and r["gbps"] > 0 and r["bytes"] > 0
        if r["impl"] == "fastdiff":
            assert r["backend"] in ("cpp", "reference") and r["speedup_vs_eager"] > 0
    # one-head self-attention over the feature map: B=2, L=4*3, D=64
    assert {r["shape"] for r in at} == {"2x1x12x64"}
    assert {r["impl"] for r in at} == {"fastdiff", "sdpa", "eager"}
    for r in at:
        assert (r["median_ms"] is None) == (r["impl"] == "fastdiff")
        if r["median_ms"]:
            assert r["tflops"] > 0 and r["flops"] == BB.attn_flops(BB.AttnCase("self", 2, 1, 12, 12, 64),
                                                                   r["variant"].split()[1])


def test_cli_rejects_unknown_ops_and_bad_batch(capsys):
    from fastdiff import cli

    assert cli.main(["bench", "--ops", "group_norm_act,nope", "--device", "cpu"]) == 2
    assert "unknown op 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "--ops", "blocks", "--batch", "0", "--device", "cpu"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for opt in ("--block-shape", "--batch", "--full", "--compile-budget", "--unet-preset", "group_norm_act",
                "unet_step", "blocks"):
        assert opt in out, opt


def test_fastdiff_rows_name_their_backend():
    assert BB._impls("cpu", "group_norm_act", "group_norm_act_backward") == [("fastdiff", None)]
    note = BB._cpu_backend_note("group_norm_act", "cpu")
    assert (note != "") == (fastdiff.ops._backend.current_backend("group_norm_act", "cpu") == "reference")
