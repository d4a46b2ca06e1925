"""Timing, peak memory and the description of the machine.

Timing: each call is timed alone, after the untimed per-call setup (the forward, for ``bwd``). On the CPU with
``time.perf_counter``; on CUDA with a pair of CUDA events around the call, read after the end event completes.
Results are the median and the 20th/80th percentiles.

On CUDA each call is also timed *pipelined* (:func:`time_pipelined`): the calls follow one another with no
synchronisation between them, each between its own pair of events, as a training loop runs them. Timed alone, a call
starts on an idle GPU, which then waits for the host's work before the call's first kernel (its argument checks, the
allocations, the launch); pipelined, the host prepares a call while the GPU still runs the one before, so the time is
the GPU's from the call's first kernel to its last, plus any wait the call itself imposes (a host sync inside it
drains the GPU and the host's work after the sync is then exposed). ``triton.testing.do_bench`` times kernels in this
way. Both figures come from the same process, for every provider alike.

Peak memory is the largest transient peak of the timed calls, each above what is alive before it: the inputs and
the gradient buffers, which the first (warm-up) call allocates and later calls accumulate into. So a fresh gradient
a provider produces and autograd then adds into ``.grad`` counts as transient, for every provider alike. (The logits
op drops its gradient in the untimed setup, after the probe's baseline: the call's new gradient takes the place of the
one freed, and only what the call holds beyond it counts; see ``FRESH_GRAD_OPS``.) The probe
works outside the timed interval (a counter reset before the call, a read after), so it does not change the times.

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()``
  before the call.
- CPU (Linux): the kernel's resident-set high-water mark. Before the call we ask glibc to hand freed memory back
  (``malloc_trim``), read ``VmRSS``, and reset ``VmHWM`` to it by writing ``5`` to ``/proc/self/clear_refs``; after
  the call ``VmHWM - VmRSS_before`` is the transient peak, exact to the page, with no sampling (and with no thread
  competing for the 2 cores). glibc is told (once, with ``mallopt``) to serve every block of 1 MiB or more with
  ``mmap``, so a freed block leaves the resident set at once instead of lingering in a heap arena and hiding the
  next call's allocations. (``ru_maxrss`` cannot do this:
  it only ever grows, so after a warm-up call it would read zero for the call measured.) The benchmark runs each
  provider in a fresh subprocess so that no provider's leftovers sit in another's baseline. (With ``--in-process``
  the glibc setting is not applied, so as not to change the host process; memory numbers are then less exact.)
- CPU elsewhere: ``ru_maxrss`` growth during the call, a lower bound (zero when an earlier call peaked higher);
  the row's ``memory_method`` says so.
"""
from __future__ import annotations

import ctypes
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

MiB = 2.0**20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018  (glibc only)
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def set_malloc_policy() -> None:
    """Make glibc return freed blocks of >= 1 MiB to the OS at once (see the module docstring). Call once, early."""
    libc = _glibc()
    if libc is not None:
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)  # fixing it also turns off glibc's dynamic threshold growth
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)


def _proc_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class MemoryProbe:
    """Transient peak of one call above what was alive before its setup (see the module docstring).

    ``begin()`` before the setup, ``arm()`` between setup and the call, ``end()`` after it returns the peak in
    MiB. For ``bwd`` the setup is the forward: its saved tensors count (they are alive during the backward), its
    own transient peak does not.
    """

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            self.method = "cuda max_memory_allocated delta"
        elif os.path.exists("/proc/self/clear_refs") and _reset_hwm():
            self.method = "VmHWM above VmRSS (clear_refs), fresh process"
        else:
            self.method = "ru_maxrss growth (lower bound)"
        self.base = 0

    def begin(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            return
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
        self.base = _proc_status()["VmRSS"] if self.method.startswith("VmHWM") else _ru_maxrss_bytes()

    def arm(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("VmHWM"):
            _reset_hwm()

    def end(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("VmHWM"):
            peak = _proc_status()["VmHWM"]
        else:
            peak = _ru_maxrss_bytes()
        return max(peak - self.base, 0) / MiB


def time_calls(setup: Optional[Callable[[], Any]], step: Callable[[Any], Any], repeat: int, device: str,
               memory: bool = False) -> Tuple[List[float], Optional[float], Optional[str]]:
    """Milliseconds of ``repeat`` calls of ``step(setup())``, each timed alone (setup excluded); with ``memory``,
    also the largest transient peak (MiB) of those calls and the method. The probe works outside the timed
    interval (a counter reset before, a read after), so measuring memory does not change the times."""
    times: List[float] = []
    probe = MemoryProbe(device) if memory else None
    peak: Optional[float] = None
    for _ in range(repeat):
        if probe:
            probe.begin()
        state = setup() if setup else None
        if probe:
            probe.arm()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()  # the setup's kernels must not run inside the timed interval
            start.record()
            step(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(state)
            times.append((time.perf_counter() - t0) * 1e3)
        if probe:
            peak = max(peak or 0.0, probe.end())
        del state
    return times, peak, (probe.method if probe else None)


def _timing_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def time_pipelined(setup: Optional[Callable[[], Any]], step: Callable[[Any], Any], repeat: int,
                   event: Callable[[], Any] = _timing_event,
                   synchronize: Callable[[], None] = torch.cuda.synchronize) -> List[float]:
    """Milliseconds of ``repeat`` calls of ``step(setup())`` queued back to back on CUDA (see the module docstring):
    one sync before the first call and one after the last, none between. Each call is timed by a pair of events
    recorded around ``step`` only: the setup's GPU work (the forward, for ``bwd``) falls between one call's end event
    and the next call's start event, outside both. Each call's state is dropped before the next setup, as in
    :func:`time_calls`. ``event`` / ``synchronize``: a timing event factory and the device sync (default CUDA's)."""
    pairs = []
    synchronize()
    for _ in range(repeat):
        state = setup() if setup else None
        start, end = event(), event()
        start.record()
        step(state)
        end.record()
        pairs.append((start, end))
        del state
    synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def quantile(xs: List[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: List[float]) -> Dict[str, float]:
    return {"median_ms": statistics.median(times), "p20_ms": quantile(times, 0.2), "p80_ms": quantile(times, 0.8)}


# ------------------------------------------------------------------------------------------------------------------
# the machine
# ------------------------------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    """``torch.cuda.get_device_name()`` on CUDA; the CPU model and core count on the CPU."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _dist_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> Dict[str, Optional[str]]:
    """Versions of python, torch, triton, rlkernels and the peers (liger-kernel, cut-cross-entropy, trl), read without
    importing triton or the peers."""
    from .. import __version__

    return {"python_version": platform.python_version(), "torch_version": torch.__version__,
            "triton_version": _dist_version("triton"), "rlkernels_version": __version__,
            "liger_version": _dist_version("liger-kernel"), "cce_version": _dist_version("cut-cross-entropy"),
            "trl_version": _dist_version("trl")}
