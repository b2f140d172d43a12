"""Regenerate the results part of benchmarks/README.md and its charts from the
committed JSON results, in one command:

    python benchmarks/report.py                       # reads benchmarks/results/*.json
    python benchmarks/report.py --check               # exit 1 if README.md or a chart is out of date

What it writes:

* for every end-to-end result (``fastdiff bench train|sample --json``, meta
  ``kind == "e2e"``): a chart ``results/<name>.png`` (speedup over diffusers
  eager per configuration) and, in the README, the machine (GPU, driver,
  torch/triton/diffusers versions, git commit), one table per case and the
  issue's targets, each with its measured value and by how much it is met
  or missed;
* for every operator result (``fastdiff bench --json``: rows with a ``% of
  copy bandwidth``): a chart ``results/<name>-copybw.png`` (% of the
  measured copy bandwidth per operator and implementation) and a summary
  table in the README.

The README text goes between the lines ``<!-- e2e-report:begin -->`` and
``<!-- e2e-report:end -->``; everything else in the README is left as is.
The output depends only on the JSON files (no dates of its own), so running
it twice changes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- e2e-report:begin -->", "<!-- e2e-report:end -->"

# (key, suite, description, threshold): the issue's end-to-end targets on a lent H100/H200
TARGETS = [
    ("train_vs_eager", "train", "training step, best fastdiff >= 1.5x diffusers eager", 1.5),
    ("train_vs_compile", "train", "training step, best fastdiff >= 1.15x diffusers under torch.compile", 1.15),
    ("patched_train", "train", "training step, diffusers patched by fastdiff.nn.patch >= 1.3x unpatched eager", 1.3),
    ("sample_ddpm", "sample", "DDPM sampling, best fastdiff >= 2x diffusers DDPMPipeline eager", 2.0),
    ("sample_overhead", "sample", "DDPM sampling, non-model time per step of that fastdiff row < 5 us", 5.0),
]
FASTDIFF_IMPLS = ("fastdiff", "fastdiff-compile", "fastdiff-graph")


# -------------------------------------------------------------- loading -----
def load_results(results_dir: str) -> list:
    """[(name, {"meta": ..., "rows": [...]})] of the JSON files in
    ``results_dir`` (sorted by name) that hold a results dict; other JSON
    files are ignored. A file that is not valid JSON raises ValueError
    naming it."""
    if not os.path.isdir(results_dir):
        raise FileNotFoundError(f"results_dir {results_dir!r} is not a directory")
    out = []
    for fn in sorted(os.listdir(results_dir)):
        if not fn.endswith(".json"):
            continue
        path = os.path.join(results_dir, fn)
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("meta"), dict):
            out.append((fn[:-5], data))
    return out


def is_e2e(data: dict) -> bool:
    return data["meta"].get("kind") == "e2e"


def is_ops(data: dict) -> bool:
    return not is_e2e(data) and any(r.get("pct_copy_bw") is not None for r in data["rows"])


# ------------------------------------------------------------ formatting ----
def _f(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def machine_line(meta: dict) -> str:
    """Where and with what a result was taken: GPU (name, driver) or CPU,
    torch, triton, diffusers, fastdiff, git commit, date, threads/load."""
    gpu = meta.get("gpu")
    if meta.get("device") == "cuda" and gpu:
        where = f"GPU **{gpu.get('name')}** (driver {gpu.get('driver') or 'unknown'}, CUDA {meta.get('torch_cuda')})"
    else:
        load = meta.get("loadavg_1m")
        where = (f"CPU {meta.get('cpu')}, {meta.get('cpu_threads')} threads"
                 + (f", load average {load:.1f}" if isinstance(load, (int, float)) else ""))
    return (f"{where}; torch {meta.get('torch')}, triton {meta.get('triton')}, diffusers {meta.get('diffusers')}, "
            f"fastdiff {meta.get('fastdiff')}; git commit `{(meta.get('git_commit') or 'unknown')[:12]}`; "
            f"{meta.get('date')}")


def _case_key(r: dict) -> tuple:
    return (r["suite"], r["preset"], r["batch"], r.get("method") or "", r.get("steps") or 0, r["dtype"], r["layout"])


def _cases(rows: list) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(_case_key(r), []).append(r)
    return out


def e2e_tables(rows: list) -> list:
    """Markdown lines: one table per case (suite, sampler, precision, layout)."""
    lines = []
    for key, rs in _cases(rows).items():
        r0 = rs[0]
        train = r0["suite"] == "train"
        params = " / ".join(sorted({f"{r['params']:,}" for r in rs if r.get("params")})) or "?"
        title = (f"**{r0['suite']}**, {r0['preset']} ({params} parameters), {r0['shape']}, "
                 f"{r0.get('precision', r0['dtype'])}, {r0['layout']}")
        if not train:
            title += f", {str(r0.get('method')).upper()} {r0.get('steps')} steps"
        lines += [title, ""]
        lines.append("| configuration | images/s (p20-p80) | ms per " + ("step" if train else "run") + " | "
                     + ("model-only step ms | loss/noise overhead ms" if train else
                        "model ms per call | non-model us per step")
                     + " | peak MiB | vs diffusers | vs diffusers compiled |")
        lines.append("|---|---|---|---|---|---|---|---|")
        notes = []
        for r in rs:
            if r.get("median_ms") is None:
                lines.append(f"| {r['impl']} | - | - | - | - | - | | |")
                notes.append(f"{r['impl']}: {r.get('note') or 'not run'}")
                continue
            over = _f(r.get("overhead_ms"), ".2f") if train else _f(r.get("non_model_us_per_step"), ".0f")
            lines.append(f"| {r['impl']} | {_f(r['images_per_s'], '.1f')} ({_f(r.get('images_per_s_p20'), '.1f')}-"
                         f"{_f(r.get('images_per_s_p80'), '.1f')}) | {_f(r['median_ms'], '.2f')} | "
                         f"{_f(r.get('model_ms'), '.3f')} | {over} | {_f(r.get('peak_mem_bytes'), '.0f', 2 ** -20)} | "
                         f"{_x(r.get('speedup_vs_diffusers'))} | {_x(r.get('speedup_vs_diffusers_compile'))} |")
            if r.get("note"):
                notes.append(f"{r['impl']}: {r['note']}")
        lines.append("")
        if notes:
            lines += [f"* {n}" for n in notes] + [""]
    return lines


def evaluate_targets(rows: list, meta: dict) -> list:
    """One dict per (target, case): target key, description, case label,
    measured value, threshold, met (bool or None when not measured), the
    configuration it was measured on, and ``representative`` (False unless
    the result is a GPU run of ddpm-cifar10 with 1000 DDPM steps)."""
    out = []
    gpu_cifar = meta.get("device") == "cuda"
    for key, rs in _cases(rows).items():
        suite, preset, batch, method, steps, dtype, layout = key
        by = {r["impl"]: r for r in rs}
        label = f"{preset} b{batch} {dtype} {layout}" + (f" {method}-{steps}" if method else "")
        rep = gpu_cifar and preset == "ddpm-cifar10" and (suite == "train" or steps == 1000)
        fd = [r for r in rs if r["impl"] in FASTDIFF_IMPLS and r.get("median_ms")]
        best = min(fd, key=lambda r: r["median_ms"]) if fd else None

        def add(tkey, value, which, lower_is_better=False):
            t = next(t for t in TARGETS if t[0] == tkey)
            met = None if value is None else (value < t[3] if lower_is_better else value >= t[3])
            if lower_is_better and value is not None and value < 0:
                met = None  # a difference of two noisy timings below zero: unresolved, not "met"
            row = by.get(which) or {}
            out.append({"target": tkey, "description": t[2], "case": label, "value": value, "threshold": t[3],
                        "met": met, "impl": which, "representative": rep,
                        "vs_default": None if lower_is_better else row.get("speedup_vs_diffusers_fp32_nchw")})
        if suite == "train":
            add("train_vs_eager", best and best.get("speedup_vs_diffusers"), best and best["impl"])
            add("train_vs_compile", best and best.get("speedup_vs_diffusers_compile"), best and best["impl"])
            p = by.get("diffusers-patched")
            add("patched_train", p and p.get("speedup_vs_diffusers"), "diffusers-patched")
        elif method == "ddpm":
            add("sample_ddpm", best and best.get("speedup_vs_diffusers"), best and best["impl"])
            add("sample_overhead", best and best.get("non_model_us_per_step"), best and best["impl"],
                lower_is_better=True)
    return out


def targets_table(results: list) -> list:
    lines = ["| target | result | case | configuration | measured (same precision and layout) | "
             "vs diffusers eager at fp32 NCHW | verdict |", "|---|---|---|---|---|---|---|"]
    n = 0
    for name, data in results:
        for t in evaluate_targets(data["rows"], data["meta"]):
            n += 1
            us = t["target"] == "sample_overhead"
            val = "-" if t["value"] is None else (f"{t['value']:.1f} us" if us else f"{t['value']:.2f}x")
            if t["met"] is None:
                verdict = "unresolved (negative: below the timing noise)" if t["value"] is not None \
                    else "not measured"
            elif us:
                verdict = "met" if t["met"] else f"missed by {t['value'] - t['threshold']:.1f} us"
            else:
                verdict = "met" if t["met"] else f"missed by {100 * (1 - t['value'] / t['threshold']):.0f}%"
            if not t["representative"]:
                verdict += " (not the target setting*)"
            vd = "" if t.get("vs_default") is None else f"{t['vs_default']:.2f}x"
            lines.append(f"| {t['description']} | {name} | {t['case']} | {t['impl'] or '-'} | {val} | {vd} | "
                         f"{verdict} |")
    if not n:
        return []
    return lines + ["", "\\* The targets are set for `ddpm-cifar10` on a lent H100/H200 (training at batch 128, "
                        "DDPM 1000 steps at 256 images); other results are checked against them only to show "
                        "where they stand. The verdict compares like with like (both sides in the same precision "
                        "and layout); the column before it compares with diffusers eager as it ships (fp32, NCHW), "
                        "when that case was run."]


def ops_table(rows: list) -> list:
    """Markdown lines: % of copy bandwidth per operator, shape and dtype, one
    column per implementation (the timed rows of an operator result)."""
    impls: list = []
    cells: dict = {}
    for r in rows:
        if r.get("pct_copy_bw") is None:
            continue
        impl = r["impl"] + (f" [{r['variant']}]" if r.get("variant") else "")
        if impl not in impls:
            impls.append(impl)
        cells.setdefault((r["op"], r["shape"], r["dtype"]), {})[impl] = r["pct_copy_bw"]
    if not cells:
        return []
    lines = ["| op | shape | dtype | " + " | ".join(impls) + " |", "|---" * (3 + len(impls)) + "|"]
    for (op, shape, dtype), v in cells.items():
        lines.append(f"| {op} | {shape} | {dtype} | " + " | ".join(_f(v.get(i), ".0f") + ("%" if i in v else "")
                                                                   for i in impls) + " |")
    return lines


# ---------------------------------------------------------------- charts ----
def _largest_shape_rows(rows: list) -> list:
    """The timed rows at the largest shape of each (op, dtype): the size
    where the % of copy bandwidth means the most (smaller tensors measure
    the per-call host cost)."""
    timed = [r for r in rows if r.get("pct_copy_bw") is not None]

    def numel(shape: str) -> int:
        n = 1
        for d in str(shape).split("/")[0].split("x"):
            n *= int(d) if d.isdigit() else 1
        return n
    best: dict = {}
    for r in timed:
        k = (r["op"], r["dtype"])
        best[k] = max(best.get(k, 0), numel(r["shape"]))
    return [r for r in timed if numel(r["shape"]) == best[(r["op"], r["dtype"])]]


_FAMILY_COLOURS = {"fastdiff": "C0", "diffusers": "C1", "eager": "C2", "compile": "C3", "sdpa": "C4", "stock": "C5"}


def plot_copy_bw(rows: list, path: str, title: str) -> Optional[str]:
    """Horizontal bars: % of the copy bandwidth of every implementation of
    each (op, dtype) at its largest shape, one bar per row (coloured by
    family: fastdiff, diffusers, eager, compile, ...). Returns the path, or
    None when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = _largest_shape_rows(rows)
    if not sel:
        return None
    sel.sort(key=lambda r: (r["op"], r["dtype"], r.get("variant") or "", not r["impl"].startswith("fastdiff"),
                            r["impl"]))
    ys, labels, vals, colours, y, prev = [], [], [], [], 0.0, None
    for r in sel:
        group = (r["op"], r["dtype"], r["shape"])
        if prev is not None and group != prev:
            y += 0.6  # a gap between operators
        prev = group
        var = f" [{r['variant']}]" if r.get("variant") else ""
        labels.append(f"{r['op']} {r['shape']} {r['dtype']}{var}: {r['impl']}")
        ys.append(y)
        vals.append(r["pct_copy_bw"])
        colours.append(_FAMILY_COLOURS.get(r["impl"].split("-")[0], "C7"))
        y += 1.0
    fig, ax = plt.subplots(figsize=(10, 0.19 * len(sel) + 1.6))
    ax.barh(ys, vals, 0.8, color=colours)
    for yy, v in zip(ys, vals):
        ax.annotate(f"{v:.0f}%", (v, yy), xytext=(2, 0), textcoords="offset points", va="center", fontsize=6)
    ax.axvline(100.0, color="k", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_ylim(y, -1)
    ax.set_xlabel("% of the measured copy bandwidth (minimum bytes moved / median time), largest shape per op")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_e2e(rows: list, path: str) -> Optional[str]:
    sys.path.insert(0, os.path.dirname(HERE))
    from fastdiff.bench import e2e as bench_e2e

    msg = bench_e2e.plot(rows, path)
    return path if msg.startswith("plot written") else None


# ---------------------------------------------------------------- render ----
def render(results: list, out_dir: str) -> tuple:
    """(markdown text, [chart paths written]) for ``results`` (from
    :func:`load_results`); the charts go to ``out_dir``."""
    md, charts = [], []
    e2e = [(n, d) for n, d in results if is_e2e(d)]
    ops = [(n, d) for n, d in results if is_ops(d)]
    md.append("_Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; edit those, not this._")
    md.append("")
    if e2e:
        md += ["### End-to-end results", ""]
        for name, data in e2e:
            md += [f"#### `results/{name}.json`", "", machine_line(data["meta"]), ""]
            png = _plot_e2e(data["rows"], os.path.join(out_dir, f"{name}.png"))
            if png:
                charts.append(png)
                md += [f"![speedups of {name}](results/{os.path.basename(png)})", ""]
            md += e2e_tables(data["rows"])
        tt = targets_table(e2e)
        if tt:
            md += ["### Targets", ""] + tt + [""]
    else:
        md += ["No end-to-end results yet (`fastdiff bench train --json ...`).", ""]
    if ops:
        md += ["### Operators: % of copy bandwidth", ""]
        for name, data in ops:
            md += [f"#### `results/{name}.json`", "", machine_line(data["meta"])
                   + (f"; copy bandwidth {data['meta']['copy_gbps']:.1f} GB/s" if data["meta"].get("copy_gbps")
                      else ""), ""]
            png = plot_copy_bw(data["rows"], os.path.join(out_dir, f"{name}-copybw.png"),
                               f"{name}: % of copy bandwidth per operator")
            if png:
                charts.append(png)
                md += [f"![% of copy bandwidth, {name}](results/{os.path.basename(png)})", ""]
            md += ops_table(data["rows"]) + [""]
    return "\n".join(md).rstrip() + "\n", charts


def update_readme(readme: str, markdown: str, check: bool = False) -> bool:
    """Put ``markdown`` between the report markers of ``readme``. Returns
    True when the file changed (with ``check``: would change; nothing is
    written). Raises ValueError naming the file when the markers are missing."""
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"readme {readme!r} has no '{BEGIN}' ... '{END}' section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + markdown + END + tail
    if new == text:
        return False
    if not check:
        with open(readme, "w") as f:
            f.write(new)
    return True


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate benchmarks/README.md's result tables and the PNG charts "
                                            "from benchmarks/results/*.json")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="directory of the JSON results")
    p.add_argument("--readme", default=os.path.join(HERE, "README.md"), help="the README to update")
    p.add_argument("--charts", default=None, help="where the PNG charts go (default: the results directory)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the README would change")
    args = p.parse_args(argv)
    results = load_results(args.results)
    out_dir = args.charts or args.results
    if args.check:
        import tempfile

        out_dir = tempfile.mkdtemp()
    md, charts = render(results, out_dir)
    changed = update_readme(args.readme, md, check=args.check)
    if args.check:
        print(f"{args.readme} is {'out of date' if changed else 'up to date'}")
        return 1 if changed else 0
    print(f"{args.readme}: {'updated' if changed else 'unchanged'}; charts: {', '.join(charts) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
