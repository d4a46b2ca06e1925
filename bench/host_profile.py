"""Where the host's time goes in one call of the logits op (``logprobs_from_logits``, Triton engine), on a GPU.

    python bench/host_profile.py --out DIR [--shape qwen2.5-7b] [--tokens 16384]

gpu_tune's logits rows time the op end to end with CUDA events; the kernels alone (its GPU timelines) came to 87% of
HBM while the call came to 75-80% (H100, 2026-11-27). The difference is the GPU waiting for the host: before the
first kernel of a call (the forward's Python, the label check's sync) and between the forward's kernel and the
backward's. This script measures it, value checks on and off:

* ``host_fwd_us`` / ``host_bwd_us``: wall-clock of the forward / the backward call on the host (median of 20, the GPU
  drained before each), against ``fwd_ms`` / ``full_ms`` timed with CUDA events as gpu_tune does;
* ``stages_us``: host microseconds in each step of the call (:func:`stages`), and from the call's start to each
  kernel's launch;
* ``event_split_ms``: an unprofiled call cut by CUDA events recorded around each kernel's launch (:func:`event_split`):
  the front before the first kernel, each kernel, the time between them, and the tail;
* ``first_kernel_us`` and ``gpu_gaps_us``: from one profiled call (torch.profiler, CPU and CUDA; its trace is written
  to DIR with ``--traces``), when the first kernel started and how long the GPU waited between kernels;
* cProfile of 10 calls: the Python functions by own time and by cumulative time (``host-profile.txt`` in DIR);

each for (N, V) logits and for the benchmark CLI's (B, T, V) layout, and, as same-process baselines, with Triton's own
launch path (``RLKERNELS_FAST_LAUNCH=0``) and with the value checks read before the statistics kernel is queued (the
order before 2026-11-27).
* the host cost of launching an empty Triton kernel, the floor of any launch.

Nothing is asserted. On CPU (``TRITON_INTERPRET=1``, a tiny ``--tokens``/``--vocab``): a smoke run of the same code,
wall-clock only.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from typing import Optional

import torch

from gpu_tune import timed  # CUDA-event medians (bench/ is on the path when this file is run)

CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def host_us(fn, before=None, repeat: int = 20) -> float:
    """Median host wall-clock of ``fn()`` in microseconds; ``before()`` runs untimed first, then the GPU drains."""
    times = []
    for _ in range(repeat):
        state = before() if before else None
        sync()
        start = time.perf_counter()
        fn(state)
        times.append((time.perf_counter() - start) * 1e6)
        sync()
    return statistics.median(times)


def event_split(fn, repeat: int = 10) -> dict:
    """Where one unprofiled call's GPU time goes, from CUDA events recorded on the stream around each launch of the
    two kernels (no profiler: its host overhead changes the gaps it measures): median ms of ``front`` (the call's
    start to the statistics kernel's start: the host's work before its launch), ``stats``, ``between`` (its end to
    the dL/dz kernel's start: the small ops between and any wait for the host), ``dlogits`` and ``tail`` (its end to
    the call's end), and ``total``. Each record is a little host work of its own, so ``total`` runs a little over
    the timed call. On CPU: {}."""
    if not CUDA:
        return {}
    import rlkernels.triton_ops.logprobs as KL

    names = {"_logits_stats_kernel": "stats", "_dlogits_kernel": "dlogits"}
    marks: dict = {}

    def record(name):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks[name] = event

    def wrapped(launch_fn, kernel):
        name = names.get(getattr(getattr(kernel, "fn", kernel), "__name__", ""))
        if name is None:
            return launch_fn

        def go(*a, **k):
            record(name + "_begin")
            out = launch_fn(*a, **k)
            record(name + "_end")
            return out
        return go

    real_prepare, real_fast = KL.prepare_launch, KL.fast_launch
    KL.prepare_launch = lambda kernel, *a, **k: wrapped(real_prepare(kernel, *a, **k), kernel)
    KL.fast_launch = lambda kernel, *a, **k: wrapped(real_fast, kernel)(kernel, *a, **k)
    parts: dict = {}
    try:
        for _ in range(repeat + 2):
            marks.clear()
            sync()
            record("start")
            fn()
            record("stop")
            sync()
            if len(marks) != 6:
                return {"error": f"events recorded: {sorted(marks)}"}
            order = ["start", "stats_begin", "stats_end", "dlogits_begin", "dlogits_end", "stop"]
            spans = dict(front=(0, 1), stats=(1, 2), between=(2, 3), dlogits=(3, 4), tail=(4, 5), total=(0, 5))
            for key, (a, b) in spans.items():
                parts.setdefault(key, []).append(marks[order[a]].elapsed_time(marks[order[b]]))
    finally:
        KL.prepare_launch, KL.fast_launch = real_prepare, real_fast
    return {k: round(statistics.median(v[2:]), 4) for k, v in parts.items()}


def timeline(fn, trace_path: Optional[str]) -> dict:
    """One profiled call: the GPU's events and the host's CUDA runtime calls in time order, offsets in us from the
    first host event of the call; ``first_kernel_us`` and the GPU's gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    if not events:
        return {}
    t0 = events[0].time_range.start
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    host = [e for e in events if e.device_type != DeviceType.CUDA and e.name.startswith(("cuda", "cu"))]
    rows = [("gpu" if e.device_type == DeviceType.CUDA else "host", e.name[:70], e.time_range.start - t0,
             e.time_range.elapsed_us()) for e in sorted(gpu + host, key=lambda e: e.time_range.start)]
    gaps = [(b.time_range.start - a.time_range.end) for a, b in zip(gpu, gpu[1:])]
    return dict(first_kernel_us=(gpu[0].time_range.start - t0) if gpu else None,
                gpu_busy_us=sum(e.time_range.elapsed_us() for e in gpu),
                gpu_gaps_us=[round(g, 1) for g in gaps], events=rows)


# (module, attribute) pairs timed by :func:`stages`, inclusive of what they call; a class attribute as "Class.name"
STAGES = (
    ("rlkernels._inputs", "check_backend_args"), ("rlkernels._inputs", "require_tensor"),
    ("rlkernels._inputs", "check_labels"), ("rlkernels._inputs", "check_temperature"),
    ("rlkernels.ops", "compute_dtype"), ("rlkernels._checks", "deferred_checks"),
    ("rlkernels._checks", "_raise_first_failed"), ("rlkernels._checks", "read_back"),
    ("rlkernels._checks", "_Staging.copy_in"), ("rlkernels._inputs", "check_scanned_rows"),
    ("rlkernels._checks", "LateCheck.arm_all"), ("rlkernels._checks", "LateCheck.raise_if_failed"),
    ("rlkernels._checks", "DeferredChecks.launched"),
    ("rlkernels.ops", "resolve_backend"), ("rlkernels.ops", "plan_chunks"), ("rlkernels.ops", "_scatter_rows"),
    ("rlkernels.engines.autograd", "logits_logprobs"), ("rlkernels.engines.autograd", "_engine"),
    ("rlkernels.engines.autograd", "_EagerTwin.forward"), ("rlkernels.engines.autograd", "_EagerTwin.backward"),
    ("rlkernels.engines.autograd", "_own"),
    ("rlkernels.engines.triton_engine", "logits_stats"), ("rlkernels.engines.triton_engine", "dlogits"),
    ("rlkernels.triton_ops.logprobs", "_launch_stats"), ("rlkernels.triton_ops.logprobs", "_launch_dlogits"),
    ("rlkernels.triton_ops.logprobs", "_stats_outputs"), ("rlkernels.triton_ops.logprobs", "stats_launch"),
    ("rlkernels.triton_ops.logprobs", "dlogits_launch"), ("rlkernels.triton_ops.logprobs", "_temperature_args"),
    ("rlkernels.triton_ops.logprobs", "_rows"), ("rlkernels.triton_ops.autotune", "enabled"),
    ("rlkernels.triton_ops.logprobs", "fast_launch"), ("rlkernels.triton_ops.logprobs", "prepare_launch"),
    ("rlkernels.triton_ops.logprobs", "_logits_stats_kernel.run"),  # Triton's own path (a first launch)
    ("rlkernels.triton_ops.logprobs", "_dlogits_kernel.run"),
)


def stages(fwd, bwd, repeat: int = 50) -> dict:
    """Median host microseconds per call of each of :data:`STAGES` (inclusive), over ``repeat`` calls of ``fwd``
    then ``bwd(fwd's outputs)``, the GPU drained between; plus ``fwd_total``, ``bwd_total`` and the time from each
    call's start to its kernel's launch (``fwd_to_stats_launch``, ``bwd_to_dlogits_launch``)."""
    import functools
    import importlib

    per_call, restore, clock = {}, [], {"t0": 0.0}

    def wrap(module_name, attr):
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part, None)
            if owner is None:
                return
        raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if raw is None:
            return
        static = isinstance(raw, staticmethod)
        fn = raw.__func__ if static else raw

        def mark_launch(kernel, at):  # a launch: when it began, from the call's start
            launch = {"_logits_stats_kernel": "fwd_to_stats_launch", "_dlogits_kernel": "bwd_to_dlogits_launch"
                      }.get(getattr(getattr(kernel, "fn", kernel), "__name__", ""))
            if launch:
                per_call[launch] = per_call.get(launch, 0.0) + (at - clock["t0"]) * 1e6

        @functools.wraps(fn)
        def timed_fn(*a, **k):
            start = time.perf_counter()
            if attr == "fast_launch":
                mark_launch(a[0], start)
            try:
                out = fn(*a, **k)
            finally:
                per_call[attr] = per_call.get(attr, 0.0) + (time.perf_counter() - start) * 1e6
            if attr == "prepare_launch":  # the launch happens when the returned function is called
                prepared = out

                def out():
                    mark_launch(a[0], time.perf_counter())
                    return prepared()
            return out

        setattr(owner, name, staticmethod(timed_fn) if static else timed_fn)
        restore.append((owner, name, raw))

    for module_name, attr in STAGES:
        wrap(module_name, attr)
    samples = {}
    try:
        for _ in range(repeat):
            per_call.clear()
            sync()
            clock["t0"] = start = time.perf_counter()
            outs = fwd()
            per_call["fwd_total"] = (time.perf_counter() - start) * 1e6
            sync()
            clock["t0"] = start = time.perf_counter()
            bwd(outs)
            per_call["bwd_total"] = (time.perf_counter() - start) * 1e6
            sync()
            for k, v in per_call.items():
                samples.setdefault(k, []).append(v)
    finally:
        for owner, name, raw in reversed(restore):
            setattr(owner, name, raw)
    return {k: round(statistics.median(v), 1) for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="host-profile")
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--traces", action="store_true", help="also write each profiled call's Chrome trace to DIR "
                   "(a device call brings back a limited number of files)")
    args = p.parse_args(argv)
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("host_profile.py needs CUDA (or TRITON_INTERPRET=1 and a tiny shape, as a smoke run)", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl

    import rlkernels
    from rlkernels.bench.shapes import resolve_shape

    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if CUDA else "cpu"
    shape = resolve_shape(args.shape, tokens=args.tokens, vocab=args.vocab)
    M, V = shape.tokens, shape.vocab
    gen = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(M, V, device=dev, generator=gen) * 2.0).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (M,), device=dev, generator=gen)
    g_lp, g_en = torch.randn(M, device=dev, generator=gen), torch.randn(M, device=dev, generator=gen)
    report = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (interpreter)", "torch": torch.__version__,
              "triton": triton.__version__, "shape": f"M={M} V={V} bf16", "rows": []}
    text = io.StringIO()

    # the benchmark CLI's layout too: (B, T, V) logits and (B, T) labels, the kernels' 3-D addressing
    T = max(1, min(shape.seq_len, M))
    layouts = {"2d": (x, y, g_lp, g_en)}
    if M % T == 0 and T < M:
        B = M // T
        layouts["3d"] = (x.detach().view(B, T, V).requires_grad_(), y.view(B, T), g_lp.view(B, T), g_en.view(B, T))
    import rlkernels._checks as checks_module
    from rlkernels.triton_ops import launch as fast_launch

    # (layout, value checks, fast launch, checks read after the statistics kernel is queued, their copies queued after
    # it: COPY_AFTER_LAUNCH)
    cp = checks_module.COPY_AFTER_LAUNCH
    configs = [(layout, checks, True, True, cp) for layout in layouts for checks in ("1", "0")]
    configs.append(("2d", "0", False, True, cp))  # Triton's own launch path: the fast launch's baseline
    configs.append(("2d", "1", True, False, cp))  # the checks read before the kernel is queued: the later read's baseline
    configs.append(("2d", "1", True, True, not cp))  # the copies queued on the other side of the launch
    for layout, checks, fast, after, copies in configs:
        xl, yl, gl, ge = layouts[layout]
        fast_launch.ENABLED, enabled = fast and fast_launch.ENABLED, fast_launch.ENABLED
        checks_module.READ_AFTER_LAUNCH = after
        checks_module.COPY_AFTER_LAUNCH = copies

        def fwd():
            return rlkernels.logprobs_from_logits(xl, yl, return_entropy=True, backend="triton")

        def bwd(outs):
            torch.autograd.grad(outs, xl, (gl, ge))

        def full():
            bwd(fwd())

        os.environ["RLKERNELS_CHECK_VALUES"] = checks
        for _ in range(3):
            full()
        sync()
        row = dict(layout=layout, value_checks=checks, fast_launch=fast_launch.ENABLED, checks_after_launch=after,
                   copies_after_launch=copies,
                   stages_us=stages(fwd, bwd),
                   host_fwd_us=host_us(lambda _: fwd()), host_bwd_us=host_us(bwd, before=fwd),
                   fwd_ms=timed(fwd, warmup=0, repeat=10)[0],
                   full_ms=timed(full, warmup=0, repeat=10)[0])
        try:  # a diagnosis: never lose the row for it
            row["event_split_ms"] = event_split(full)
        except Exception as exc:
            row["event_split_ms"] = {"error": repr(exc)[:200]}
        trace = f"trace-{layout}-checks{checks}{'' if fast else '-slow'}{'' if after else '-before'}.json"
        tl_ = timeline(full, os.path.join(args.out, trace) if args.traces else None)
        row.update({k: v for k, v in tl_.items() if k != "events"})
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        text.write(f"== {layout}, value checks {checks}, fast launch {fast_launch.ENABLED}, checks after launch "
                   f"{after}: one full() call, time order (us from its first host event)\n")
        for kind, name, at, dur in tl_.get("events", []):
            text.write(f"{kind:4s} {at:10.1f} {dur:9.1f}  {name}\n")
        fast_launch.ENABLED = enabled
        checks_module.READ_AFTER_LAUNCH = True
        checks_module.COPY_AFTER_LAUNCH = cp
        if layout != "2d" or checks != "1" or not after or copies != cp:
            continue
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            full()
            sync()
        prof.disable()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(30)
            text.write(f"== {layout}, value checks {checks}: cProfile of 10 full() calls (each followed by a "
                       f"sync), by {order}\n")
            text.write(out.getvalue())
    os.environ.pop("RLKERNELS_CHECK_VALUES", None)

    @triton.jit
    def _empty(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=offs < n)

    buf = torch.empty(16, device=dev)
    try:
        _empty[(1,)](buf, 0, BLOCK=16)
        report["empty_triton_launch_us"] = host_us(lambda _: _empty[(1,)](buf, 0, BLOCK=16), repeat=50)
    except Exception as exc:  # a diagnosis: never lose the rows above for it
        report["empty_triton_launch_us"] = repr(exc)[:200]
    report["torch_empty_like_us"] = host_us(lambda _: torch.empty(M, device=dev), repeat=50)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
    with open(os.path.join(args.out, "host-profile.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, "host-profile.txt"), "w") as f:
        f.write(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
