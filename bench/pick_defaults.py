"""Read a GPU run's tuning rows and say which launch defaults of ``rlkernels/triton_ops/logprobs.py`` they support.

    python bench/pick_defaults.py bench/results/gpu-h100/kernels-<gpu>.json [bench/results/gpu-h100/tune-<gpu>.json]
        [--also bench/results/gpu-h100/run1-kernels-<gpu>.json ...]

The rows are ``bench/gpu_tune.py``'s (``device_check.sh`` writes them as ``kernels-<gpu>.json`` and
``tune-<gpu>.json``). For each kernel it ranks every measured launch by GB/s (the byte model: the statistics kernel
reads the block once, dL/dz reads and writes it), shows it beside PyTorch's own read (``amax``) and read + write
(``copy_``) of the same block and beside the HBM peak, and proposes a change to a module constant only where the best
launch beats today's default by more than ``--margin`` (default 5%: one sweep's spread between neighbouring launches;
a smaller lead is noise until a second run repeats it). With ``--also`` (other runs' kernel sweeps) each launch is
ranked by its mean over the runs, and a change is proposed only where the best leads the default by more than the
margin on the mean and leads it in every run. It edits nothing: the constants and their comments are set by
hand, with the numbers this prints. The loss rows of the tune file are summarised against the 3 GEMMs.

HBM peaks by the GPU's name: ``rlkernels.bench.report.HBM_PEAK_GBPS`` (H100 SXM 3350 GB/s, H200 4800, ...).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

from rlkernels.bench.report import hbm_peak_gbps

# a kernel row's measurement fields: {loop}_{split|masked}{stages}[p]_gbs for the statistics kernel (p: register
# prefetch), dlogits_{split|masked}[_stream]_gbs for dL/dz (_stream: with streaming cache hints; bench/gpu_tune.py,
# section "kernel")
_STATS_FIELD = re.compile(r"^(tile|lanes)_(split|masked)(\d)(p?)_gbs$")
_DLOGITS_FIELD = re.compile(r"^dlogits_(split|masked)(_stream)?_gbs$")


def load_rows(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


def hbm_peak(rows: List[Dict[str, Any]]) -> Optional[float]:
    return hbm_peak_gbps(next((str(r.get("gpu")) for r in rows if r.get("section") == "env"), ""))


def launches(rows: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Every measured launch as a dict: (statistics launches, dL/dz launches)."""
    stats, dlogits = [], []
    for r in rows:
        if r.get("section") != "kernel" or "block_v" not in r:
            continue
        for key, value in r.items():
            m = _STATS_FIELD.match(key)
            if m and value is not None:
                stats.append(dict(block_v=r["block_v"], warps=r["warps"], loop=m.group(1),
                                  split=m.group(2) == "split", stages=int(m.group(3)),
                                  prefetch=m.group(4) == "p", gbs=float(value),
                                  vs_ref=r.get(key.replace("_gbs", "_vs_ref"))))
            m = _DLOGITS_FIELD.match(key)
            if m and value is not None:
                dlogits.append(dict(block_v=r["block_v"], warps=r["warps"], split=m.group(1) == "split",
                                    stream=m.group(2) is not None, gbs=float(value)))
    return stats, dlogits


def _identity(launch: Dict[str, Any]) -> Tuple:
    return tuple(sorted((k, v) for k, v in launch.items() if k not in ("gbs", "vs_ref", "runs")))


def merge_runs(runs: List[List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One launch list from several runs' lists: each launch measured in every run, with ``gbs`` its mean and
    ``runs`` the per-run values (a launch missing from a run is left out: it cannot be compared there)."""
    by_run = [{_identity(x): x for x in launches_of_run} for launches_of_run in runs]
    merged = []
    for key, first in by_run[0].items():
        if all(key in run for run in by_run):
            values = [run[key]["gbs"] for run in by_run]
            worst = max((run[key].get("vs_ref") for run in by_run if run[key].get("vs_ref") is not None),
                        default=first.get("vs_ref"))
            merged.append({**first, "gbs": sum(values) / len(values), "runs": values, "vs_ref": worst})
    return merged


def baselines(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    return {str(r["baseline"]): float(r["gbs"]) for r in rows
            if r.get("section") == "kernel" and "baseline" in r and r.get("gbs") is not None}


def _is(launch: Dict[str, Any], default: Dict[str, Any]) -> bool:
    return all(launch.get(k) == v for k, v in default.items())


def propose(ranked: List[Dict[str, Any]], default: Dict[str, Any], margin: float
            ) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(the default's row, the best row if it leads the default by more than ``margin``, else None)."""
    current = next((x for x in ranked if _is(x, default)), None)
    best = ranked[0] if ranked else None
    if best is None or current is None or best is current or best["gbs"] <= current["gbs"] * (1 + margin):
        return current, None
    if any(b <= c for b, c in zip(best.get("runs", []), current.get("runs", []))):
        return current, None  # the mean lead is one run's: another run has the default ahead
    return current, best


def _keep(current: Optional[Dict[str, Any]], ranked: List[Dict[str, Any]], margin: float) -> str:
    if current is None:
        return "  the default was not measured: nothing to compare (the best is listed first above)" if ranked else \
            "  no launch was measured"
    return f"  keep the default (nothing leads it by more than {100 * margin:.0f}%)"


def _table(ranked: List[Dict[str, Any]], keys: List[str], peak: Optional[float], ceiling: Optional[float],
           top: int) -> List[str]:
    out = []
    for x in ranked[:top]:
        cols = " ".join(f"{k}={x[k]}" for k in keys)
        pct = f"  {100 * x['gbs'] / peak:5.1f}% of HBM" if peak else ""
        vs = f"  {100 * x['gbs'] / ceiling:5.1f}% of torch's" if ceiling else ""
        runs = ("  runs " + ", ".join(f"{v:.0f}" for v in x["runs"])) if len(x.get("runs", [])) > 1 else ""
        out.append(f"  {x['gbs']:8.1f} GB/s{pct}{vs}  {cols}{runs}")
    return out


def report(kernel_rows: List[Dict[str, Any]], tune_rows: Optional[List[Dict[str, Any]]], defaults: Dict[str, Any],
           margin: float = 0.05, top: int = 8, other_runs: Optional[List[List[Dict[str, Any]]]] = None) -> str:
    """The text this script prints (a function, so that tests can read it). ``other_runs``: more kernel sweeps of
    the same GPU, merged launch by launch (:func:`merge_runs`); the baselines printed are the first run's."""
    peak = hbm_peak(kernel_rows) or (hbm_peak(tune_rows) if tune_rows else None)
    base = baselines(kernel_rows)
    read = next((v for k, v in base.items() if k.startswith("torch.amax")), None)
    copy = next((v for k, v in base.items() if k.startswith("copy_")), None)
    stats, dlogits = launches(kernel_rows)
    if other_runs:
        more = [launches(rows) for rows in other_runs]
        stats = merge_runs([stats] + [m[0] for m in more])
        dlogits = merge_runs([dlogits] + [m[1] for m in more])
    stats.sort(key=lambda x: -x["gbs"])
    dlogits.sort(key=lambda x: -x["gbs"])
    lines = [f"HBM peak: {peak or 'unknown'} GB/s; torch.amax read: {read} GB/s; copy_ read + write: {copy} GB/s"]
    if other_runs:
        lines.append(f"{1 + len(other_runs)} runs merged: GB/s is each launch's mean, then the runs' values")

    lines.append("statistics kernel (reads the block), best first:")
    lines += _table(stats, ["loop", "block_v", "warps", "split", "stages", "prefetch"], peak, read, top)
    bad = [x for x in stats if x["vs_ref"] is not None and x["vs_ref"] > 1e-4]
    if bad:
        lines.append(f"  WARNING: {len(bad)} launches disagree with the default's statistics by > 1e-4: "
                     + ", ".join(f"{x['loop']} {x['block_v']}x{x['warps']}" for x in bad[:5]))
    want = {"loop": defaults["stats_loop"], "block_v": defaults["BLOCK_V_FWD"], "warps": defaults["NUM_WARPS_FWD"],
            "split": defaults["SPLIT_TAIL"], "stages": defaults["STATS_STAGES"],
            "prefetch": defaults["STATS_PREFETCH"]}
    current, better = propose(stats, want, margin)
    lines.append(f"  default {want}: " + (f"{current['gbs']:.1f} GB/s" if current else "not measured"))
    if better:
        lead = 100 * (better["gbs"] / current["gbs"] - 1)
        lines.append(f"  PROPOSE (+{lead:.1f}%): BLOCK_V_{'LANES' if better['loop'] == 'lanes' else 'FWD'} = "
                     f"{better['block_v']}, NUM_WARPS_{'LANES' if better['loop'] == 'lanes' else 'FWD'} = "
                     f"{better['warps']}, SPLIT_TAIL = {better['split']}, STATS_STAGES = {better['stages']}, "
                     f"STATS_PREFETCH = {better['prefetch']}"
                     + (", stats loop 'lanes' by default" if better["loop"] != defaults["stats_loop"] else ""))
    else:
        lines.append(_keep(current, stats, margin))

    lines.append("dL/dz kernel (reads and writes the block), best first:")
    lines += _table(dlogits, ["block_v", "warps", "split", "stream"], peak, copy, top)
    want = {"block_v": defaults["BLOCK_V_BWD"], "warps": defaults["NUM_WARPS_BWD"], "split": defaults["SPLIT_TAIL_BWD"],
            "stream": defaults.get("STREAM_BWD", False)}
    current, better = propose(dlogits, want, margin)
    lines.append(f"  default {want}: " + (f"{current['gbs']:.1f} GB/s" if current else "not measured"))
    if better:
        lead = 100 * (better["gbs"] / current["gbs"] - 1)
        lines.append(f"  PROPOSE (+{lead:.1f}%): BLOCK_V_BWD = {better['block_v']}, NUM_WARPS_BWD = "
                     f"{better['warps']}, SPLIT_TAIL_BWD = {better['split']}, STREAM_BWD = {better['stream']}")
    else:
        lines.append(_keep(current, dlogits, margin))

    masked = {r["baseline"]: r for r in kernel_rows if str(r.get("baseline", "")).startswith("default tiles")}
    if masked:
        lines.append("the logits path's launch with masked rows (loads wait for the label) against kept rows only:")
        for name, r in masked.items():
            lines.append(f"  {name}: statistics {r.get('stats_gbs', 0):.1f} GB/s, dL/dz {r.get('dlogits_gbs', 0):.1f}"
                         " GB/s")

    if tune_rows:
        loss = [r for r in tune_rows if r.get("section") == "loss" and r.get("ms") is not None]
        logits = [r for r in tune_rows if r.get("section") == "logits" and r.get("full_gbs") is not None]
        if loss:
            lines.append("fused_grpo_loss, fastest first (vs the 3 GEMMs; extra MiB beyond inputs and gradients):")
            for r in sorted(loss, key=lambda r: r["ms"])[:top]:
                what = {k: r[k] for k in ("preset", "accum", "budget_mb", "single_pass", "stats", "stages", "split",
                                          "prefetch", "autotune") if k in r}
                vs = f"{r['vs_3gemm']:.3f}x" if r.get("vs_3gemm") else "-"
                lines.append(f"  {r['ms']:8.2f} ms  {vs}  {r.get('extra_beyond_grads_mb', 0):7.0f} MiB  {what}")
            for r in loss:
                if r.get("timeline_busy_ms") is not None:
                    top = ", ".join(f"{name} {ms:.2f}" for name, ms in r.get("timeline_top", []))
                    lines.append(f"  one call of the defaults' loss: GPU busy {r['timeline_busy_ms']:.2f} ms, idle "
                                 f"{r['timeline_idle_ms']:.2f} ms; longest: {top}")
                    for gap_us, at_us, before, after in r.get("timeline_gaps", []):
                        lines.append(f"    idle {gap_us:.0f} us at {at_us / 1e3:.2f} ms, after {before}, before {after}")
        for r in logits:
            pct = f" ({100 * r['full_gbs'] / peak:.1f}% of HBM)" if peak else ""
            idle = (f"; GPU busy {r['timeline_busy_ms']:.2f} ms, idle {r['timeline_idle_ms']:.2f} ms inside one call"
                    if r.get("timeline_busy_ms") is not None else "")
            if r.get("burst_gbs") is not None:
                idle += f"; back to back {r['burst_gbs']:.0f} GB/s" + (
                    f" ({100 * r['burst_gbs'] / peak:.1f}%)" if peak else "")
            lines.append(f"logits op, stats={r.get('stats')} prefetch={r.get('prefetch', False)} "
                         f"stream={r.get('stream', False)} "
                         f"checks={r.get('value_checks')}{' masked' if r.get('masked') else ''}"
                         f"{' read before launch' if r.get('checks_after_launch') is False else ''}"
                         f"{' copies after launch' if r.get('copies_after_launch') else ''}: "
                         f"fwd {r['fwd_gbs']:.0f}, "
                         f"bwd {r['bwd_gbs']:.0f}, fwd+bwd {r['full_gbs']:.0f} GB/s{pct}{idle}")
    return "\n".join(lines)


def current_defaults() -> Dict[str, Any]:
    """Today's constants, read from the module (never edited here)."""
    from rlkernels.triton_ops import logprobs as K

    return dict(BLOCK_V_FWD=K.BLOCK_V_FWD, NUM_WARPS_FWD=K.NUM_WARPS_FWD, BLOCK_V_BWD=K.BLOCK_V_BWD,
                NUM_WARPS_BWD=K.NUM_WARPS_BWD, SPLIT_TAIL=K.SPLIT_TAIL, SPLIT_TAIL_BWD=K.SPLIT_TAIL_BWD,
                STATS_STAGES=K.STATS_STAGES, STATS_PREFETCH=K.STATS_PREFETCH, STREAM_BWD=K.STREAM_BWD,
                stats_loop=K.STATS_KERNELS[0])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", help="kernels-<gpu>.json (gpu_tune --only kernel)")
    p.add_argument("tune", nargs="?", help="tune-<gpu>.json (gpu_tune --skip kernel), optional")
    p.add_argument("--also", action="append", default=[], metavar="KERNELS_JSON",
                   help="another run's kernels JSON (repeatable): launches ranked by their mean over the runs")
    p.add_argument("--margin", type=float, default=0.05, help="lead over the default needed to propose a change")
    p.add_argument("--top", type=int, default=8, help="launches listed per kernel")
    args = p.parse_args(argv)
    print(report(load_rows(args.kernels), load_rows(args.tune) if args.tune else None, current_defaults(),
                 args.margin, args.top, [load_rows(path) for path in args.also]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
