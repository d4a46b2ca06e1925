"""GPU tuning sweep of the Triton engine, run by ``bench/device_check.sh`` (its ``tune`` step with ``--skip kernel``,
its ``kernels`` step with ``--only kernel``), each one in-process run.

    python bench/gpu_tune.py --json OUT.json [--shape qwen2.5-7b] [--tokens 16384] [--skip S,...] [--only S,...]

What it measures, all in one process on one GPU so that every ratio is against a baseline of the same run, in this
order:

1. ``gemm``: the three bf16 GEMMs of the op alone (``h W^T``, ``dz W``, ``dz^T h``) into preallocated outputs;
2. ``loss``: ``fused_grpo_loss`` (dapo) forward+backward on the Triton engine, the defaults and one change at a time:
   grad_weight accumulation (``RLKERNELS_GRAD_WEIGHT_ACCUM``), memory budget (``RLKERNELS_MEMORY_BUDGET_MB``, MiB
   of the input dtype), statistics loop (``RLKERNELS_STATS_KERNEL``), pipeline stages, tail split, register prefetch,
   ``RLKERNELS_AUTOTUNE=1`` (and what it picked), recompute mode, gspo single pass (sequence-aligned chunks), and
   the single pass's objective by autograd instead of its fused kernel (``RLKERNELS_FUSED_OBJECTIVE=off``)
   against gspo recompute: time, and the peak memory above the inputs (gradients included, as new tensors);
3. ``logits``: the logits op (``logprobs_from_logits``) forward and forward+backward, as GB/s by the byte model,
   each call timed alone (the GPU idle at its start) and back to back (``burst``: the host prepares the next call
   while the GPU runs this one, unless a value check's sync waits), with value checks on and off, both statistics loops, register prefetch and a completion mask (the last quarter of
   each sequence padding: the masked-rows launch), and for each one call's GPU timeline
   (torch.profiler: the kernels' summed time against the span, the difference being the GPU idle inside the call);
   then the logits op followed by ``policy_loss`` (dapo), forward+backward, with policy_loss's value checks read
   after its objective is queued and before it (``logits+policy_loss`` rows);
4. ``precision``: the relative error of grad_weight and grad_hidden against an fp32-input run of the same engine,
   for eager bf16 autograd and for each accumulation mode;
5. ``kernel``: PyTorch's own read (``amax``) and read + write (``copy_``) of one 4096-row block, the practical
   ceilings, then for seven tile x warp pairs the dL/dz kernel (split and all-masked tiles) and both statistics loops
   (split or all-masked; the split ones also at 2 and 3 pipeline stages, and the tile loop with register prefetch),
   as GB/s by the byte model (statistics read the block; dL/dz reads and writes it): about 80 kernel compiles.
   Each kernel is timed in bursts of back-to-back calls (:func:`timed_burst`), without its launch overhead.

Timings are CUDA-event medians. Nothing here is asserted: it prints a table and writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

import torch

MiB = 2.0 ** 20


CUDA = torch.cuda.is_available()


def timed(fn, warmup: int = 2, repeat: int = 5, clear=None):
    """(median ms, peak MiB above what is alive before each call); ``clear`` runs untimed before every call.
    On CPU (the interpreter smoke run) the times are wall-clock and the peak is 0."""
    for _ in range(warmup):
        if clear:
            clear()
        fn()
    times, peak = [], 0.0
    for _ in range(repeat):
        if clear:
            clear()
        if not CUDA:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
        peak = max(peak, (torch.cuda.max_memory_allocated() - base) / MiB)
    return statistics.median(times), peak


def timed_burst(fn, calls: int = 20, rounds: int = 5, warmup: int = 2) -> float:
    """Median ms per call over ``rounds`` bursts of ``calls`` back-to-back calls between one pair of CUDA events: the
    host queues the next launch while the GPU runs the last, so a sub-millisecond kernel is timed without its launch
    overhead. (Timed alone, as :func:`timed` does, each 0.3-0.5 ms kernel of the sweep also paid the host's work
    before its launch: in the H100 sweep of 2026-11-26 the same launch came out up to 8% apart between two runs.)
    On CPU (the interpreter smoke run): one call, wall-clock."""
    if not CUDA:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    per_call = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(stop) / calls)
    return statistics.median(per_call)


def gpu_timeline(fn, clear=None) -> dict:
    """One call of ``fn`` under torch.profiler: its GPU work (kernels and copies) as ``busy_ms`` (summed), ``span_ms``
    (first start to last end), ``idle_ms`` (span - busy: the GPU waiting on the host inside the call, e.g. after a
    host sync), the five longest as ``top`` (name, ms), and the five longest waits as ``gaps`` (us, at us from the
    first start, the GPU work before and after: where the host held it up). ``clear`` runs untimed before each call.
    On CPU: {}."""
    if not CUDA:
        return {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        if clear:
            clear()
        fn()
    if clear:
        clear()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not gpu:
        return {"error": "no GPU events recorded"}
    starts = [e.time_range.start for e in gpu]
    ends = [e.time_range.end for e in gpu]
    busy = sum(e.time_range.elapsed_us() for e in gpu) / 1e3
    span = (max(ends) - min(starts)) / 1e3
    top = sorted(gpu, key=lambda e: -e.time_range.elapsed_us())[:5]
    gaps = idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in gpu])
    return dict(busy_ms=busy, span_ms=span, idle_ms=span - busy, gpu_events=len(gpu),
                top=[(e.name[:60], e.time_range.elapsed_us() / 1e3) for e in top], gaps=gaps)


def idle_gaps(events, n: int = 5) -> list:
    """The ``n`` longest stretches with no GPU work among ``events`` [(start_us, end_us, name)]: [(gap_us, at_us from
    the first start, the name of the work that ended last before it, of the work after it)], longest first."""
    events = sorted(events)
    if not events:
        return []
    first, found = events[0][0], []
    end, before = events[0][1], events[0][2]
    for start, stop, name in events[1:]:
        if start > end:
            found.append((round(start - end, 1), round(end - first, 1), before[:50], name[:50]))
        if stop >= end:
            end, before = stop, name
    return sorted(found, key=lambda g: -g[0])[:n]


@contextlib.contextmanager
def kept_count(where: str):
    """"first": the library as it is (a masked call reads its kept rows' count before it queues its value checks'
    reductions); "after checks": the count read where _kept_rows gathers the rows, after those reductions are queued
    (the order before 2026-11-28), so that its host sync waits for them: the same-process baseline."""
    if where == "first":
        yield
        return
    import rlkernels.ops as ops

    real_index, real_rows = ops._kept_index, ops._kept_rows
    ops._kept_index = lambda keep, mask: ("later", keep, mask)
    ops._kept_rows = lambda x, y, t, keep, mask, index: real_rows(
        x, y, t, keep, mask, real_index(index[1], index[2]) if isinstance(index, tuple) else index)
    try:
        yield
    finally:
        ops._kept_index, ops._kept_rows = real_index, real_rows


def empty_cache() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--skip", default="", help="comma-separated sections to skip: gemm,loss,logits,precision,kernel")
    p.add_argument("--only", default="", help="comma-separated sections to run (the others are skipped)")
    args = p.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not CUDA and not interpret:
        print("gpu_tune.py needs CUDA (or TRITON_INTERPRET=1 and a tiny shape, as a smoke run)", file=sys.stderr)
        return 2
    dev = "cuda" if CUDA else "cpu"
    import rlkernels
    from rlkernels import reference
    from rlkernels.bench.shapes import resolve_shape
    from rlkernels.bench.workloads import Case, make_inputs
    from rlkernels.engines import triton_engine
    from rlkernels.triton_ops import autotune
    from rlkernels.triton_ops import logprobs as K

    sections = {"gemm", "loss", "logits", "precision", "kernel"}
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= sections - set(args.only.split(","))
    if skip - sections:
        p.error(f"unknown sections {sorted(skip - sections)}; choose from {sorted(sections)}")
    shape = resolve_shape(args.shape, tokens=args.tokens, hidden=args.hidden, vocab=args.vocab)
    case = Case(op="grpo", mode="full", shape=shape, dtype="bfloat16", device=dev, preset="dapo")
    inputs = make_inputs(case)
    h, w = inputs["hidden"], inputs["weight"]
    M, H, V = shape.tokens, shape.hidden, shape.vocab
    cfg = case.config
    kw = {k: inputs[k] for k in ("old_logprobs", "ref_logprobs", "rollout_logprobs") if k in inputs}
    rows = []
    t0 = time.time()

    def row(section, **fields):
        fields = {"section": section, **fields}
        rows.append(fields)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()),
              flush=True)
        if args.json:  # rewritten after every row: a step cut off by its time limit keeps what it measured
            with open(args.json + ".tmp", "w") as f:
                json.dump(rows, f, indent=1, default=str)
            os.replace(args.json + ".tmp", args.json)

    row("env", gpu=torch.cuda.get_device_name() if CUDA else "cpu (interpreter)", torch=torch.__version__,
        rlkernels=rlkernels.__version__,
        shape=shape.describe(), mixed_addmm=triton_engine._mixed_gemm_works(h.device),
        mixed_mm=triton_engine._mixed_gemm_works(h.device, add=False))

    gemm_total = None
    if "gemm" not in skip:
        hd, wd = h.detach().reshape(M, H), w.detach()
        z = torch.empty(M, V, dtype=h.dtype, device=dev)
        dz = torch.randn(M, V, device=dev, dtype=h.dtype)
        gh, gw = torch.empty_like(hd), torch.empty_like(wd)
        t_f, _ = timed(lambda: torch.mm(hd, wd.T, out=z))
        t_h, _ = timed(lambda: torch.mm(dz, wd, out=gh))
        t_w, _ = timed(lambda: torch.mm(dz.T, hd, out=gw))
        gemm_total = t_f + t_h + t_w
        tflops = 2.0 * M * H * V / 1e9
        for name, t in (("h@W^T", t_f), ("dz@W", t_h), ("dz^T@h", t_w)):
            row("gemm", gemm=name, ms=t, tflops=tflops / t)
        row("gemm", gemm="3 GEMMs", ms=gemm_total, tflops=3 * tflops / gemm_total)
        del z, dz, gh, gw
        empty_cache()

    def clear():
        h.grad = None
        w.grad = None

    def loss_step(config=cfg, **extra):
        def step():
            loss, _ = rlkernels.fused_grpo_loss(h, w, inputs["labels"], inputs["advantages"], inputs["mask"],
                                             config=config, backend="triton", **kw, **extra)
            loss.backward()
        return step

    grad_mb = (h.numel() + w.numel()) * h.element_size() / MiB
    if "loss" not in skip:
        # first = the defaults; each variant changes one thing. A 5 GiB budget holds the qwen fp32 accumulator
        # (2.2 GB, at most half the budget), so "auto" takes it there, with a ~3 GiB block. stages: software
        # pipelining of the statistics loop (K.STATS_STAGES); split: unmasked whole tiles (K.SPLIT_TAIL).
        # preset=gspo: the sequence-level ratio's single pass (row chunks of whole sequences) against its recompute
        # fused_objective=off: the single pass's per-chunk objective by autograd over torch ops (about 70 per chunk)
        # instead of triton_ops.objective's one kernel. kept_count="after checks": the kept rows' count (the gather's
        # host sync) read after the value checks' reductions are queued, as before 2026-11-28, not before them
        base = dict(preset=case.preset, accum="auto", budget_mb=1024, single_pass=True, stats="tile",
                    stages=K.STATS_STAGES, split=K.SPLIT_TAIL, prefetch=K.STATS_PREFETCH, autotune=False,
                    fused_objective="on", kept_count="first")
        changes = [{}, dict(fused_objective="off"), dict(kept_count="after checks"), dict(stats="lanes"),
                   dict(stages=3), dict(split=not K.SPLIT_TAIL), dict(prefetch=not K.STATS_PREFETCH), dict(autotune=True),
                   dict(accum="fp32"), dict(budget_mb=5120), dict(single_pass=False), dict(preset="gspo"),
                   dict(preset="gspo", single_pass=False)]
        for change in changes:
            what = {**base, **change}
            os.environ["RLKERNELS_GRAD_WEIGHT_ACCUM"] = what["accum"]
            os.environ["RLKERNELS_MEMORY_BUDGET_MB"] = str(what["budget_mb"])
            os.environ["RLKERNELS_STATS_KERNEL"] = what["stats"]
            os.environ["RLKERNELS_AUTOTUNE"] = "1" if what["autotune"] else "0"  # tunes during the warm-up calls
            os.environ["RLKERNELS_FUSED_OBJECTIVE"] = what["fused_objective"]
            try:
                with K.override_defaults(STATS_STAGES=what["stages"], SPLIT_TAIL=what["split"],
                                         STATS_PREFETCH=what["prefetch"]), kept_count(what["kept_count"]):
                    t, peak = timed(loss_step(config=what["preset"], single_pass=what["single_pass"]), clear=clear)
                    timeline = {}
                    if not change or "fused_objective" in change or "kept_count" in change:  # the time beyond GEMMs
                        try:
                            timeline = gpu_timeline(loss_step(config=what["preset"],
                                                              single_pass=what["single_pass"]), clear=clear)
                        except Exception as exc:  # a diagnosis only
                            timeline = {"error": repr(exc)[:200]}
                row("loss", **what, ms=t, peak_mb=peak, extra_beyond_grads_mb=peak - grad_mb,
                    vs_3gemm=(t / gemm_total) if gemm_total else None,
                    **{f"timeline_{k}": v for k, v in timeline.items()})
            except Exception as exc:  # report and go on: the sweep is for tuning
                row("loss", **what, error=repr(exc)[:300])
            if what["autotune"]:
                row("autotune", picks={str(k[0:1] + k[2:]): str(v) for k, v in autotune.tuned().items()})
            empty_cache()
        os.environ.pop("RLKERNELS_AUTOTUNE", None)
        os.environ.pop("RLKERNELS_STATS_KERNEL", None)
        os.environ.pop("RLKERNELS_GRAD_WEIGHT_ACCUM", None)
        os.environ.pop("RLKERNELS_MEMORY_BUDGET_MB", None)
        os.environ.pop("RLKERNELS_FUSED_OBJECTIVE", None)

    if "logits" not in skip:
        # the logits op end to end (logprobs_from_logits, fwd and fwd+bwd) against the byte model: forward reads the
        # N x V logits once, backward reads them again and writes the gradient (N x V)
        x = (torch.randn(M, V, device=dev) * 2.0).to(h.dtype).requires_grad_()
        y = inputs["labels"].reshape(-1)
        g_lp, g_en = torch.randn(M, device=dev), torch.randn(M, device=dev)
        row_bytes = V * x.element_size()
        # a completion mask as RL batches have (the last quarter of each sequence padding): the masked-rows launch,
        # whose loads wait for each row's label; its bytes: kept rows read twice, every gradient row written
        T = max(1, shape.seq_len)
        keep = (torch.arange(M, device=dev) % T) < (3 * T) // 4
        n_kept = int(keep.sum())
        # the value checks (RLKERNELS_CHECK_VALUES, on by default) ride on the statistics kernel's read: both ways
        # after: the value checks read once the statistics kernel is queued (the default), else before it (the order
        # before 2026-11-27: the GPU idled from the checks' sync to the launch), timed here as its baseline
        import rlkernels._checks as checks_module

        # (and the dL/dz kernel's streaming cache hints flipped, STREAM_BWD, in one row; and in two rows the checks'
        # copies to the host queued on the other side of the launch: checks_module.COPY_AFTER_LAUNCH, after it on a
        # side stream, or before it)
        pf, st, cp = K.STATS_PREFETCH, K.STREAM_BWD, checks_module.COPY_AFTER_LAUNCH
        for stats, checks, prefetch, masked, after, stream, copies in (
                ("tile", "1", pf, False, True, st, cp), ("tile", "0", pf, False, True, st, cp),
                ("tile", "1", pf, False, False, st, cp), ("tile", "1", pf, False, True, st, not cp),
                ("tile", "1", not pf, False, True, st, cp),
                ("tile", "1", pf, False, True, not st, cp), ("lanes", "1", pf, False, True, st, cp),
                ("tile", "1", pf, True, True, st, cp), ("tile", "1", pf, True, False, st, cp),
                ("tile", "1", pf, True, True, st, not cp)):
            os.environ["RLKERNELS_STATS_KERNEL"] = stats
            os.environ["RLKERNELS_CHECK_VALUES"] = checks
            checks_module.READ_AFTER_LAUNCH = after
            checks_module.COPY_AFTER_LAUNCH = copies
            mask = keep if masked else None
            read = (n_kept if masked else M) * row_bytes
            nbytes = read  # the forward's

            def fwd():
                return rlkernels.logprobs_from_logits(x, y, return_entropy=True, backend="triton", mask=mask)

            def full():
                lp, en = fwd()
                torch.autograd.grad((lp, en), x, (g_lp, g_en))

            try:
                with K.override_defaults(STATS_PREFETCH=prefetch, STREAM_BWD=stream):
                    t_f, _ = timed(fwd, repeat=10)
                    t_all, peak = timed(full, repeat=10)
                    # back to back, as a training loop calls it: the host prepares the next call while the GPU runs
                    # this one, except where a value check's sync makes it wait for the GPU first
                    t_burst = timed_burst(full, calls=5, rounds=3)
                    try:  # where the time goes: the GPU's own work against its idle waits inside one call
                        timeline = gpu_timeline(full)
                    except Exception as exc:  # the profiler is a diagnosis here, never a reason to lose the row
                        timeline = {"error": repr(exc)[:200]}
                t_b = max(t_all - t_f, 1e-9)
                bwd_bytes = read + M * row_bytes
                row("logits", stats=stats, prefetch=prefetch, stream=stream, value_checks=checks, masked=masked,
                    checks_after_launch=after, copies_after_launch=copies, fwd_ms=t_f,
                    fwd_gbs=nbytes / t_f / 1e6, bwd_ms=t_b, bwd_gbs=bwd_bytes / t_b / 1e6, full_ms=t_all,
                    full_gbs=(nbytes + bwd_bytes) / t_all / 1e6, burst_ms=t_burst,
                    burst_gbs=(nbytes + bwd_bytes) / t_burst / 1e6, peak_mb=peak,
                    **{f"timeline_{k}": v for k, v in timeline.items()})
            except Exception as exc:
                row("logits", stats=stats, prefetch=prefetch, stream=stream, value_checks=checks, masked=masked,
                    checks_after_launch=after, copies_after_launch=copies, error=repr(exc)[:300])
        # the logits op followed by policy_loss (a trainer that has logits: TRL-style), value checks on: policy_loss's
        # checks queue behind the statistics kernel; read after its objective is queued (the default since
        # 2026-11-27) or before it (the GPU then idles while the host queues the objective op by op); the objective
        # on its fused kernel (the default) or by autograd over torch ops (fused_objective=off)
        os.environ.pop("RLKERNELS_STATS_KERNEL", None)
        os.environ["RLKERNELS_CHECK_VALUES"] = "1"
        adv = torch.randn(M, device=dev)  # per token: flat (N,) inputs, one sequence
        old_lp = -torch.rand(M, device=dev) * 3
        checks_module.COPY_AFTER_LAUNCH = cp
        for after, fused in ((True, "on"), (False, "on"), (True, "off")):
            checks_module.READ_AFTER_LAUNCH = after
            os.environ["RLKERNELS_FUSED_OBJECTIVE"] = fused

            def loss_full():
                lp, en = rlkernels.logprobs_from_logits(x, y, return_entropy=True, backend="triton")
                out = rlkernels.policy_loss(lp, en, adv, None, old_logprobs=old_lp, config="dapo",
                                            entropy_coef=0.01)
                torch.autograd.grad(out.loss, x)

            try:
                t_all, peak = timed(loss_full, repeat=10)
                t_burst = timed_burst(loss_full, calls=5, rounds=3)
                row("logits+policy_loss", preset="dapo", checks_after_launch=after, fused_objective=fused,
                    full_ms=t_all, full_gbs=3 * M * row_bytes / t_all / 1e6, burst_ms=t_burst, peak_mb=peak)
            except Exception as exc:
                row("logits+policy_loss", preset="dapo", checks_after_launch=after, fused_objective=fused,
                    error=repr(exc)[:300])
        checks_module.READ_AFTER_LAUNCH = True
        os.environ.pop("RLKERNELS_FUSED_OBJECTIVE", None)
        os.environ.pop("RLKERNELS_CHECK_VALUES", None)
        del x
        empty_cache()

    if "precision" not in skip:
        def grads_of(fn):
            clear()
            fn()
            return h.grad.detach().float().clone(), w.grad.detach().float().clone()

        # truth: the same math on fp32 copies of the bf16 inputs (fp32 GEMMs)
        h32 = h.detach().float().requires_grad_()
        w32 = w.detach().float().requires_grad_()
        loss32, _ = rlkernels.fused_grpo_loss(h32, w32, inputs["labels"], inputs["advantages"], inputs["mask"],
                                           config=cfg, backend="triton", **kw)
        loss32.backward()
        th, tw = h32.grad.detach(), w32.grad.detach()
        del h32, w32, loss32
        empty_cache()

        def rel(a, b):
            return float((a - b).norm() / b.norm())

        for accum in ("fp32", "input"):
            os.environ["RLKERNELS_GRAD_WEIGHT_ACCUM"] = accum
            gh_, gw_ = grads_of(loss_step())
            row("precision", impl=f"triton accum={accum}", rel_err_grad_w=rel(gw_, tw), rel_err_grad_h=rel(gh_, th))
            del gh_, gw_
        os.environ.pop("RLKERNELS_GRAD_WEIGHT_ACCUM", None)
        try:
            def eager():
                loss, _ = reference.linear_policy_loss(h, w, inputs["labels"], inputs["advantages"], inputs["mask"],
                                                       config=cfg, **kw)
                loss.backward()
            gh_, gw_ = grads_of(eager)
            row("precision", impl="eager bf16 autograd", rel_err_grad_w=rel(gw_, tw), rel_err_grad_h=rel(gh_, th))
        except Exception as exc:
            row("precision", impl="eager bf16 autograd", error=repr(exc)[:300])

    if "kernel" not in skip:
        # 4096 rows: a launch that fills the GPU with one-warp programs too (2048 rows gave each SM 15 of them;
        # the hidden+W path's chunks hold ~3500 rows at the qwen shape, the logits op one launch of all 16384)
        R = min(4096, M)
        zb = (torch.randn(R, V, device=dev) * 2.0).to(h.dtype)
        out = torch.empty_like(zb)
        y = torch.randint(0, V, (R,), device=dev)
        g1, g2 = torch.randn(R, device=dev), torch.randn(R, device=dev)
        nbytes = zb.numel() * zb.element_size()
        # what this GPU's memory system gives plain PyTorch kernels over the same block: a read (row max) and a
        # read + write (copy), the practical ceilings for the statistics and dL/dz kernels
        t_amax = timed_burst(lambda: torch.amax(zb, dim=1))
        t_copy = timed_burst(lambda: out.copy_(zb))
        row("kernel", baseline="torch.amax (read)", ms=t_amax, gbs=nbytes / t_amax / 1e6)
        row("kernel", baseline="copy_ (read + write)", ms=t_copy, gbs=2 * nbytes / t_copy / 1e6)
        # the sweep below launches as the hidden+W path does (kept rows: no load waits for the label's); the logits
        # path's launch (masked rows skipped, so each tile's loads wait for its row's label) at the default tiles
        m, s, c, _ = K.logits_stats(zb, y, None, 1.0)
        log_s, cs = torch.log(s), c / s
        for masked_rows in (False, True):
            t_s = timed_burst(lambda: K.logits_stats(zb, y, None, 1.0, masked_rows=masked_rows))
            t_d = timed_burst(lambda: K.dlogits(zb, out, y, None, 1.0, 0, m, log_s, cs, g1, g2,
                                                masked_rows=masked_rows))
            row("kernel", baseline=f"default tiles, masked_rows={masked_rows}", stats_gbs=nbytes / t_s / 1e6,
                dlogits_gbs=2 * nbytes / t_d / 1e6)
        # per tile x warps: the dL/dz kernel (with and without streaming cache hints) and both statistics loops with
        # unmasked whole tiles (split) or every tile masked, the split ones also at 2 and 3 pipeline stages (12
        # compiles per tile). The default first, then
        # one- and two-warp programs: a one-warp tile loop synchronises no warps (the default's takes 6 barriers per
        # tile), and the sm_90 compile (rlkernels.triton_ops.aot, Triton 3.6, T = 1) gives 10.0 and 10.7
        # instructions per logit against the default's 10.8. In session 2's sweep the statistics kernel ran faster
        # with fewer warps at every tile.
        for block, warps in ((4096, 4), (1024, 1), (2048, 2), (2048, 1), (1024, 4), (4096, 8), (8192, 8)):
            fields = {}
            try:
                for split, stream in ((True, False), (False, False), (True, True), (False, True)):
                    launch = K.LaunchConfig(block, warps, 1, split, stream=stream)
                    t_d = timed_burst(lambda: K.dlogits(zb, out, y, None, 1.0, 0, m, log_s, cs, g1, g2,
                                                        masked_rows=False, launch=launch))
                    name = f"dlogits_{'split' if split else 'masked'}{'_stream' if stream else ''}_gbs"
                    fields[name] = 2 * nbytes / t_d / 1e6
                for split, stages, prefetch in ((True, 1, False), (False, 1, False), (True, 2, False),
                                                (True, 3, False), (True, 1, True)):
                    launch = K.LaunchConfig(block, warps, stages, split, prefetch)
                    for loop in ("tile",) if prefetch else ("tile", "lanes"):
                        os.environ["RLKERNELS_STATS_KERNEL"] = loop
                        m2, s2, c2, _ = K.logits_stats(zb, y, None, 1.0, masked_rows=False, launch=launch)
                        agree = float(max((m2 - m).abs().max(), ((s2 - s) / s).abs().max(),
                                          ((c2 - c) / s).abs().max()))
                        t_s = timed_burst(lambda: K.logits_stats(zb, y, None, 1.0, masked_rows=False, launch=launch))
                        key = f"{loop}_{'split' if split else 'masked'}{stages}{'p' if prefetch else ''}"
                        fields[f"{key}_gbs"] = nbytes / t_s / 1e6
                        fields[f"{key}_vs_ref"] = agree
                row("kernel", block_v=block, warps=warps, **fields)
            except Exception as exc:
                row("kernel", block_v=block, warps=warps, **fields, error=repr(exc)[:300])
            os.environ.pop("RLKERNELS_STATS_KERNEL", None)
        del zb, out
        empty_cache()

    row("done", seconds=time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
