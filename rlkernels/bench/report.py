"""Results: derived columns (ratios vs eager, TFLOP/s, GB/s, % of the GPU's memory bandwidth, % of the GEMM roofline,
the bench-shape consistency check), the terminal table, the JSON file and the plot. Every output is made from the same
list of row dicts.
"""
from __future__ import annotations

import json
import math
import textwrap
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .workloads import compare_fingerprints

SCHEMA_VERSION = 1
# Every row of the JSON file has these keys (None where a value does not apply or was not measured).
ROW_KEYS = (
    "op", "mode", "provider", "shape", "M", "H", "V", "batch", "seq_len", "dtype", "device", "device_name", "preset",
    "overrides", "on_policy", "pad_frac", "softcap", "status", "reason", "median_ms", "p20_ms", "p80_ms", "times_ms",
    "peak_mem_mb", "memory_method", "ratio_vs_eager", "mem_ratio_vs_eager", "flops", "bytes", "tflops", "gbps",
    "pct_hbm", "pct_roofline", "pipelined_ms", "pipelined_p20_ms", "pipelined_p80_ms", "pipelined_times_ms",
    "pipelined_ratio_vs_eager", "pipelined_tflops", "pipelined_gbps", "pipelined_pct_hbm", "pipelined_pct_roofline",
    "check",
    "fingerprint", "traceback", "warmup", "repeat", "python_version", "torch_version", "triton_version",
    "rlkernels_version", "liger_version", "cce_version", "trl_version", "timestamp", "notes",
)
GROUP_KEYS = ("op", "mode", "shape", "M", "H", "V", "dtype", "device", "preset", "softcap")


# columns finalize_case derives from the measured ones
_DERIVED = ("ratio_vs_eager", "mem_ratio_vs_eager", "tflops", "gbps", "pct_hbm", "pct_roofline",
            "pipelined_ratio_vs_eager", "pipelined_tflops", "pipelined_gbps", "pipelined_pct_hbm",
            "pipelined_pct_roofline")

# Peak memory bandwidth (GB/s, vendor specifications) by a piece of the name CUDA gives the GPU, most specific first:
# the logits op's GB/s as a share of it. A GPU not listed gets no share.
HBM_PEAK_GBPS = (
    ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),  # "NVIDIA H100 80GB HBM3": the SXM part
    ("H200", 4800.0), ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100-SXM4-40GB", 1555.0), ("A100-PCIE-40GB", 1555.0),
)


def hbm_peak_gbps(device_name: Optional[str]) -> Optional[float]:
    """The memory bandwidth of the GPU named ``device_name`` (``torch.cuda.get_device_name``), or None."""
    name = device_name or ""
    return next((gbps for key, gbps in HBM_PEAK_GBPS if key in name), None)


def group_rows(rows: Iterable[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """Rows grouped by case (op, mode, shape, dtype, ...), in first-seen order."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in GROUP_KEYS), []).append(row)
    return list(groups.values())


def _ok(row: Optional[Dict[str, Any]]) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("median_ms") is not None


def finalize_case(rows: List[Dict[str, Any]]) -> None:
    """Fill the derived columns of one case's rows in place, and demote to ``mismatch`` any provider whose
    bench-shape fingerprint disagrees with eager's (its timing is then dropped: never report a wrong fast number)."""
    by = {r["provider"]: r for r in rows}
    eager, roof = by.get("eager"), by.get("gemm-roofline")
    for row in rows:
        if _ok(row) and _ok(eager) and row is not eager and eager.get("fingerprint") and row.get("fingerprint"):
            bad = compare_fingerprints(row["fingerprint"], eager["fingerprint"], row["dtype"])
            if bad:
                row.update(status="mismatch", reason=bad)
                for key in ("median_ms", "p20_ms", "p80_ms", "times_ms", "peak_mem_mb", "pipelined_ms",
                            "pipelined_p20_ms", "pipelined_p80_ms", "pipelined_times_ms"):
                    row[key] = None
    for row in rows:
        for key in _DERIVED:
            row[key] = None
        if not _ok(row):
            continue
        peak = hbm_peak_gbps(row.get("device_name")) if row.get("device") == "cuda" else None
        if _ok(eager) and row.get("peak_mem_mb") is not None and eager.get("peak_mem_mb"):
            row["mem_ratio_vs_eager"] = row["peak_mem_mb"] / eager["peak_mem_mb"]
        for prefix, key in (("", "median_ms"), ("pipelined_", "pipelined_ms")):  # each timing (measure's docstring)
            ms = row.get(key)
            if ms is None:
                continue
            if _ok(eager) and eager.get(key):
                row[prefix + "ratio_vs_eager"] = ms / eager[key]
            if row.get("flops"):
                row[prefix + "tflops"] = row["flops"] / (ms / 1e3) / 1e12
            if row.get("bytes"):
                row[prefix + "gbps"] = row["bytes"] / (ms / 1e3) / 1e9
                if peak:
                    row[prefix + "pct_hbm"] = 100.0 * row[prefix + "gbps"] / peak
            if _ok(roof) and roof.get(key):
                row[prefix + "pct_roofline"] = 100.0 * roof[key] / ms


# ------------------------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------------------------
def _fmt(x: Optional[float], spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _pct(x: Optional[float]) -> str:
    return _fmt(x, '.0f') + ("%" if x else "")


def _status(row: Dict[str, Any]) -> str:
    status = row.get("status", "?")
    if status == "ok":
        return "ok" if row.get("check") not in (None, "skipped (--no-check)") else "ok (unchecked)"
    reason = row.get("reason") or ""
    return f"{status.upper() if status == 'mismatch' else status}: {reason}"


def case_title(row: Dict[str, Any]) -> str:
    preset = f" ({row['preset']})" if row.get("preset") else ""
    if row.get("softcap") is not None:
        preset += f" softcap={row['softcap']:g}"
    return (f"{row['op']}{preset} {row['mode']} | {row['shape']}: M={row['M']} ({row['batch']}x{row['seq_len']}), "
            f"H={row['H']}, V={row['V']} | {row['dtype']} | {row['device_name']}")


def format_table(rows: Sequence[Dict[str, Any]], width: int = 120) -> str:
    """The comparison table: one block per case, one line per provider."""
    out: List[str] = []
    w = max([16] + [len(str(r["provider"])) for r in rows])  # rlkernels-native-compile: 24
    pipelined = any(r.get("pipelined_ms") is not None for r in rows)  # CUDA rows (measure.time_pipelined)
    hbm = any(r.get("pct_hbm") is not None for r in rows)  # the logits op on a GPU of known bandwidth
    header = (f"{'provider':<{w}} {'median ms':>10} {'p20-p80 ms':>17} {'vs eager':>9} {'peak MB':>9} "
              f"{'TFLOP/s':>8} {'GB/s':>7} " + (f"{'HBM':>4} " if hbm else "") + f"{'roofline':>8}  "
              + (f"{'pipelined':>9}  " if pipelined else "") + (f"{'HBM':>4}  " if hbm and pipelined else "")
              + "status")
    indent = len(header) - len("status")
    for group in group_rows(rows):
        out.append(case_title(group[0]))
        out.append(header)
        out.append("-" * min(len(header) + 30, width))
        for r in group:
            spread = f"{_ms(r.get('p20_ms'))}-{_ms(r.get('p80_ms'))}" if r.get("p20_ms") is not None else "-"
            line = (f"{r['provider']:<{w}} {_ms(r.get('median_ms')):>10} {spread:>17} "
                    f"{_fmt(r.get('ratio_vs_eager'), '.2f') + ('x' if r.get('ratio_vs_eager') else ''):>9} "
                    f"{_fmt(r.get('peak_mem_mb'), '.0f'):>9} {_fmt(r.get('tflops'), '.3f'):>8} "
                    f"{_fmt(r.get('gbps'), '.1f'):>7} " + (f"{_pct(r.get('pct_hbm')):>4} " if hbm else "")
                    + f"{_pct(r.get('pct_roofline')):>8}  "
                    + (f"{_ms(r.get('pipelined_ms')):>9}  " if pipelined else "")
                    + (f"{_pct(r.get('pipelined_pct_hbm')):>4}  " if hbm and pipelined else ""))
            status = textwrap.wrap(_status(r), max(width - indent, 40)) or [""]
            out.append(line + status[0])
            out.extend(" " * indent + s for s in status[1:])
            for n in r.get("notes") or ():
                out.extend(textwrap.wrap(f"note: {n}", width, initial_indent="  ", subsequent_indent="    "))
        out.append("")
    first = rows[0] if rows else {}
    out.append(f"torch {first.get('torch_version')}, triton {first.get('triton_version')}, rlkernels "
               f"{first.get('rlkernels_version')}, liger-kernel {first.get('liger_version')}, cut-cross-entropy "
               f"{first.get('cce_version')}, trl {first.get('trl_version')}; "
               f"{first.get('warmup')} warm-up + {first.get('repeat')} timed calls per provider")
    out.append("vs eager: median time / eager's (lower is faster). peak MB: transient peak of one call above inputs "
               "and gradient buffers.")
    out.append("roofline: gemm-roofline time / this time (the bare matmuls = 100%). TFLOP/s count 2*M*H*V per GEMM "
               "(1 fwd, 2 bwd, 3 full).")
    if pipelined:
        out.append("pipelined: median ms of as many calls again, queued back to back with no sync between them (the "
                   "host prepares each while the GPU runs the last); the other columns time each call alone.")
    if hbm:
        name = next(r.get("device_name") for r in rows if r.get("pct_hbm") is not None)
        out.append(f"HBM: GB/s (the logits read once forward, read and written once backward) / the GPU's peak memory "
                   f"bandwidth ({name}: {hbm_peak_gbps(name):.0f} GB/s)"
                   + (", per call alone and pipelined." if pipelined else "."))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------------
# JSON and plot
# ------------------------------------------------------------------------------------------------------------------
def write_json(path: str, rows: Sequence[Dict[str, Any]], command: Sequence[str]) -> None:
    """``{"schema_version", "command", "rows": [...]}``; every row carries all of :data:`ROW_KEYS`."""
    payload = {"schema_version": SCHEMA_VERSION, "command": list(command),
               "rows": [{k: r.get(k) for k in ROW_KEYS} for r in rows]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")


def _short(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def write_plot(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    """Time and peak-memory bars per provider (value and ratio to eager on each bar), one row of two panels per
    case, log scales (the providers span orders of magnitude). Skipped providers are left out; failed ones keep an
    empty slot labelled with their status. The roofline has no memory bar: it writes into preallocated outputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[r for r in g if r.get("status") != "skipped"] for g in group_rows(rows)]
    groups = [g for g in groups if g] or [list(rows[:1])]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.8 * len(groups)), squeeze=False)
    for (ax_t, ax_m), group in zip(axes, groups):
        names = [r["provider"] if _ok(r) else f"{r['provider']}\n({r.get('status')})" for r in group]
        colors = ["#888888" if r["provider"] == "gemm-roofline" else
                  "#1f77b4" if r["provider"].startswith("rlkernels") else "#ff7f0e" for r in group]
        for ax, key, ratio_key, unit in ((ax_t, "median_ms", "ratio_vs_eager", "ms"),
                                         (ax_m, "peak_mem_mb", "mem_ratio_vs_eager", "MB")):
            values = [r.get(key) if _ok(r) and r.get(key) is not None else 0.0 for r in group]
            if key == "peak_mem_mb":
                values = [0.0 if r["provider"] == "gemm-roofline" else v for r, v in zip(group, values)]
            bars = ax.bar(range(len(group)), values, color=colors)
            positive = [v for v in values if v > 0]
            if positive:
                ax.set_yscale("log")
                ax.set_ylim(min(positive) / 2, max(positive) * 4)
            for bar, v, r in zip(bars, values, group):
                if v > 0:
                    ratio = r.get(ratio_key)
                    text = f"{_short(v)} {unit}" + (f"\n{ratio:.2f}x eager" if ratio is not None else "")
                    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(group)))
            ax.set_xticklabels(names, fontsize=8, rotation=15)
            ax.set_ylabel(f"{'median time' if key == 'median_ms' else 'transient peak memory'} ({unit})")
            ax.grid(axis="y", alpha=0.3, which="both")
        r0 = group[0]
        preset = f" ({r0['preset']})" if r0.get("preset") else ""
        ax_t.set_title(f"{r0['op']}{preset} {r0['mode']}: {r0['shape']} M={r0['M']} "
                       f"H={r0['H']} V={r0['V']} {r0['dtype']}", fontsize=9, loc="left")
        ax_m.set_title(f"{r0.get('device_name') or ''}, torch {r0.get('torch_version')}, "
                       f"{(r0.get('timestamp') or '')[:10]}", fontsize=8, loc="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
