"""Opt-in autotuning of the kernels' launch configurations: ``RLKERNELS_AUTOTUNE=1``.

The defaults (the module constants of :mod:`rlkernels.triton_ops.logprobs`) were measured on an H100. With autotune
on, the first call for each (kernel, feature flags, dtype, device, V rounded up to a power of two) times a few
candidate configurations on a slice of the real input and keeps the fastest for the rest of the process, unless
the default (always the first candidate) is within 3% of it. The candidates write only into scratch outputs, so tuning
never touches the caller's tensors or the engine's in-place block, and the first tuned call costs their compiles
(seconds) once.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

SAMPLE_ROWS = 1024  # rows of the input each candidate is timed on
REPEATS = 5
KEEP_DEFAULT_WITHIN = 0.03  # a candidate must beat the default by more than 3% to replace it

_CACHE: Dict[tuple, object] = {}


def enabled() -> bool:
    """RLKERNELS_AUTOTUNE set to 1/true/yes (read per call)."""
    return os.environ.get("RLKERNELS_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes")


def bucket(n: int) -> int:
    """Sizes that share a tuned configuration: the next power of two."""
    return 1 << max(int(n) - 1, 0).bit_length()


def stats_candidates(lanes: bool) -> List:
    from .logprobs import LaunchConfig, stats_launch

    default = stats_launch(lanes)
    if lanes:
        others = [LaunchConfig(1024, 4, 2), LaunchConfig(2048, 8, 1), LaunchConfig(2048, 4, 2),
                  LaunchConfig(4096, 4, 1)]
    else:
        others = [LaunchConfig(1024, 1), LaunchConfig(2048, 2), LaunchConfig(4096, 4, 2), LaunchConfig(4096, 4, 3),
                  LaunchConfig(2048, 4, 2), LaunchConfig(4096, 8, 1), LaunchConfig(8192, 8, 2),
                  LaunchConfig(4096, 4, 1, False), LaunchConfig(4096, 4, 1, True, True),
                  LaunchConfig(2048, 4, 1, True, True)]
    return [default] + [c for c in others if c != default]


def dlogits_candidates() -> List:
    from .logprobs import LaunchConfig, dlogits_launch

    default = dlogits_launch()
    others = [dataclasses.replace(default, stream=not default.stream),  # the streaming cache hints flipped
              LaunchConfig(1024, 4), LaunchConfig(2048, 4), LaunchConfig(4096, 4), LaunchConfig(8192, 8),
              LaunchConfig(4096, 8, 1, False)]
    return [default] + [c for c in others if c != default]


def _median_ms(fn: Callable[[], None], device: torch.device) -> float:
    fn()  # compiles (first time) and warms up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        stream = torch.cuda.current_stream(device)  # the launches' (launch.py runs them on their tensors' device)
        for _ in range(REPEATS):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            stop.record(stream)
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pick(key: tuple, candidates: List, run: Callable[[object], None]):
    """The fastest of ``candidates`` for ``key`` (tuned once per process): ``run(config)`` launches one."""
    if key not in _CACHE:
        device = key[1]
        timings: List[Tuple[float, int]] = []
        errors = []
        for i, cfg in enumerate(candidates):
            try:
                timings.append((_median_ms(lambda: run(cfg), device), i))
            except (OutOfResources, CompilationError) as exc:  # e.g. too much shared memory for the stages
                errors.append(f"{cfg}: {type(exc).__name__}")
        if not timings:
            raise RuntimeError(f"autotune {key[0]}: no candidate ran ({'; '.join(errors)})")
        best_ms, best = min(timings)
        if timings[0][1] == 0 and timings[0][0] <= best_ms * (1 + KEEP_DEFAULT_WITHIN):
            best = 0  # timing noise does not move us off the measured default
        _CACHE[key] = candidates[best]
    return _CACHE[key]


def tuned() -> Dict[tuple, object]:
    """What has been tuned in this process: key -> configuration (for reports)."""
    return dict(_CACHE)


def reset() -> None:
    _CACHE.clear()
