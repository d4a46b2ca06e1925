"""One measurement: one provider on one case, from correctness check to timing. Runs in a worker subprocess (see
:mod:`rlkernels.bench._worker`) or, with ``--in-process``, in the CLI's own process.

The order inside :func:`run_case`:

1. **check** at a small shape of the same ``H``/``V``/dtype (``--check-tokens`` tokens, with padding for ``grpo``):
   loss, outputs and gradients against the float64 reference, with the allowance set by eager in the same dtype
   (:func:`rlkernels.bench.workloads.compare`). A failing provider returns ``status="mismatch"`` untimed.
2. **first call** at the bench shape: warms up, allocates the gradient buffers, and yields the fingerprint (norms
   of outputs and gradients) that the CLI compares with eager's at the same shape.
3. further warm-up calls, then 4. the **timed** calls, each also probed for its transient memory peak outside
   the timed interval (:func:`rlkernels.bench.measure.time_calls`);
5. on CUDA, as many calls again timed **pipelined**, back to back with no sync between them
   (:func:`rlkernels.bench.measure.time_pipelined`): ``pipelined_ms`` and its percentiles.
"""
from __future__ import annotations

import gc
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import measure
from .providers import EagerProvider, Provider, Runner, drain_notes, get_provider
from .workloads import (FRESH_GRAD_OPS, OBJECTIVE_OPS, Case, compare, describe_failure, fingerprint, make_inputs,
                        upcast, work_model)


@dataclass(frozen=True)
class Settings:
    """How to measure (the same for every provider of a run)."""

    warmup: int = 1
    repeat: int = 3
    check: bool = True
    check_tokens: int = 64
    memory: bool = True
    pipelined: bool = True  # CUDA: also time the calls back to back (measure.time_pipelined)
    cache_dir: Optional[str] = None  # where workers share the inputs that cost a forward pass (one run's temp dir)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def steps(runner: Runner, mode: str, fresh_grads: bool = False
          ) -> Tuple[Optional[Callable[[], Any]], Callable[[Any], Any]]:
    """``(setup, step)`` for ``mode``: only ``step`` is timed; both return the runner state. ``fresh_grads``: the
    untimed setup drops the gradients first, so that the call's backward hands its gradient over instead of adding
    it into the last call's (see :data:`rlkernels.bench.workloads.FRESH_GRAD_OPS`)."""
    if mode == "fwd" or not runner.has_backward:
        return None, lambda _: runner.forward()
    if mode == "bwd":
        def forward():
            if fresh_grads:
                runner.zero_grad()
            return runner.forward()

        def backward(state):
            runner.backward(state)
            return state
        return forward, backward

    def full(_):
        state = runner.forward()
        runner.backward(state)
        return state
    return (runner.zero_grad if fresh_grads else None), full


def _run_once(provider: Provider, case: Case, inputs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    runner = provider.runner(case, inputs)
    runner.zero_grad()
    state = runner.forward()
    if runner.has_backward:
        runner.backward(state)
    return {k: v.detach() for k, v in runner.result(state).items()}


def check_inputs(case: Case, check_tokens: int) -> Dict[str, Any]:
    """Inputs of the correctness check: ``case``'s H, V and dtype at about ``check_tokens`` tokens (the advantages op
    is checked at its full, cheap, size). grpo and policy get 25% padding so that masking is part of what is
    checked."""
    if case.op == "advantages":
        return make_inputs(case, seed_offset=1)
    batch = min(case.shape.batch, 4)
    seq_len = max(1, min(case.shape.seq_len, check_tokens // batch))
    return make_inputs(case, batch=batch, seq_len=seq_len, seed_offset=1,
                       pad_frac=0.25 if case.op in OBJECTIVE_OPS else 0.0)


def check_provider(provider: Provider, case: Case, check_tokens: int) -> Tuple[bool, Dict[str, Any]]:
    """Correctness of ``provider`` on ``case`` at the check shape: ``(ok, details)``."""
    inputs = check_inputs(case, check_tokens)
    eager = EagerProvider()
    ref = _run_once(eager, case, upcast(inputs))
    base = _run_once(eager, case, inputs)
    got = base if provider.name == "eager" else _run_once(provider, case, inputs)
    return compare(got, base, ref, case.dtype)


def _error_row(exc: BaseException) -> Dict[str, Any]:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or any(
        s in msg.lower() for s in ("out of memory", "can't allocate memory"))  # CUDA / CPU allocator wording
    return {"status": "oom" if oom else "error", "reason": msg[:500], "traceback": traceback.format_exc()[-4000:]}


def run_case(case: Case, provider_name: str, settings: Settings) -> Dict[str, Any]:
    """Check, warm up, measure memory and time ``provider_name`` on ``case``. Returns the measurement fields of a
    result row (``status``, ``reason``, ``median_ms``, ``p20_ms``, ``p80_ms``, ``times_ms``, ``peak_mem_mb``,
    ``memory_method``, ``check``, ``fingerprint``, ``flops``, ``bytes``; on CUDA ``pipelined_ms``,
    ``pipelined_p20_ms``, ``pipelined_p80_ms`` and ``pipelined_times_ms``)."""
    row: Dict[str, Any] = {"status": "ok", "reason": None}
    try:
        provider = get_provider(provider_name)
        reason = provider.unavailable(case)
        if reason:
            return {"status": "skipped", "reason": reason}
        if settings.check and provider.checked:
            ok, details = check_provider(provider, case, settings.check_tokens)
            row["check"] = details
            if not ok:
                return {**row, "status": "mismatch", "reason": "check vs float64 reference failed: "
                        + describe_failure(details)}
        elif not provider.checked:
            row["check"] = "not applicable"
        else:
            row["check"] = "skipped (--no-check)"
        _release(case.device)

        # the roofline needs no old log-probs
        inputs = make_inputs(case, logprob_inputs=provider.checked, cache_dir=settings.cache_dir)
        row.update(work_model(case, inputs["kept"]))
        runner = provider.runner(case, inputs)
        setup, step = steps(runner, case.mode, fresh_grads=case.op in FRESH_GRAD_OPS)
        runner.zero_grad()
        state = step(setup() if setup else None)
        measure.sync(case.device)
        row["fingerprint"] = fingerprint(runner.result(state)) if provider.checked else {}
        del state
        for _ in range(max(settings.warmup - 1, 0)):
            step(setup() if setup else None)
        gc.collect()  # once, not per call: a full collection costs 50-150 ms with torch loaded
        times, row["peak_mem_mb"], row["memory_method"] = measure.time_calls(
            setup, step, settings.repeat, case.device, memory=settings.memory)
        row.update(measure.summarize(times))
        row["times_ms"] = times
        if case.device == "cuda" and settings.pipelined:
            times = measure.time_pipelined(setup, step, settings.repeat)
            spread = measure.summarize(times)
            row.update(pipelined_ms=spread["median_ms"], pipelined_p20_ms=spread["p20_ms"],
                       pipelined_p80_ms=spread["p80_ms"], pipelined_times_ms=times)
    except Exception as exc:  # a provider that crashes is a result to report, not a reason to stop the suite
        row.update(_error_row(exc))
    row["notes"] = drain_notes() or None
    return row


def _release(device: str) -> None:
    if device == "cuda":  # the check's float64 copies must not stay cached in the allocator's pool
        gc.collect()
        torch.cuda.empty_cache()
