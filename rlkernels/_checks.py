"""The value checks' machinery: when they run, how they are queued, and how their results come back to the host.

Value checks (label range, NaN at kept positions, ``cu_seqlens`` consistency: :mod:`rlkernels._inputs`) read data
back to the host; set ``RLKERNELS_CHECK_VALUES=0`` to skip them in production (they are also skipped while
``torch.compile`` traces and while a CUDA graph is captured: nothing may read the device then; the warm-up calls
before a capture check the data). Inside :func:`deferred_checks` (every public op's checking section) the
data-dependent ones are queued on the device and read back together: one host wait for all of them, raising the first
that failed, in the order they were made. It comes before any kernel of ours, except where the kernels are safe
whatever the values (:meth:`DeferredChecks.read_after_launch`: the Triton engine's forward, whose kernels never read
outside the logits for any label, and ``policy_loss``'s objective on CUDA, plain torch ops that index by no checked
value): there they are queued first and the host waits for the checks' copies, queued before them, while the GPU runs
them. The one check made after a kernel (the Triton logits path's NaN scan, which rides on its statistics kernel and
also finds its labels out of range) is read by the backward pass when a gradient is needed (:class:`LateCheck`), so
that the forward waits for no kernel of its own.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

def compiling() -> bool:
    """True while torch.compile traces: data-dependent checks and row gathers are skipped then."""
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def capturing() -> bool:
    """True while the current CUDA stream is captured into a CUDA graph (``torch.cuda.graph``, or the recording of
    ``torch.compile(mode="reduce-overhead")``): a read of device data would end the capture with an error, so the
    value checks and the gather of kept rows (whose size is read back) are skipped then, as under torch.compile."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def no_host_reads() -> bool:
    """torch.compile traces, or a CUDA graph is captured: nothing may wait for device data (:func:`compiling`,
    :func:`capturing`)."""
    return compiling() or capturing()


def value_checks_enabled() -> bool:
    """RLKERNELS_CHECK_VALUES is not 0/false/no, torch.compile is not tracing and no CUDA graph is captured. Inside
    :func:`deferred_checks`' block (entered only with the checks on) True without asking again: a call's checks
    asked it several times (each read of the environment 0.3-0.8 us on the 2-core CPU machine)."""
    if compiling():  # first: torch.compile traces no ContextVar
        return False
    if _PENDING.get() is not None:
        return True
    if capturing():
        return False
    return os.environ.get("RLKERNELS_CHECK_VALUES", "1") not in ("0", "false", "False", "no")


# a queued check: device tensors to read back, a test of their host copies (True: failed), the error's message
_Check = Tuple[Tuple[Tensor, ...], Callable[..., bool], Callable[[], str]]
_PENDING: contextvars.ContextVar[Optional[List[_Check]]] = contextvars.ContextVar("rlkernels_pending_checks",
                                                                                    default=None)


def fail_if(bad: Tensor, message: Callable[[], str]) -> None:
    """``ValueError(message())`` if any element of ``bad`` is True. Inside :func:`deferred_checks` the test is only
    queued (``bad.any()`` on the device, no sync); ``message`` runs only when it fails, so it may read data back."""
    fail_when((bad.any(),), bool, message)


def fail_when(values: Tuple[Tensor, ...], failed: Callable[..., bool], message: Callable[[], str]) -> None:
    """``ValueError(message())`` if ``failed(*the values of values)``: the general form of :func:`fail_if`, for a
    test whose reduction gives more than one flag (a range check reads back min and max: one kernel where the
    elementwise flags took five). Queued inside :func:`deferred_checks`."""
    pending = _PENDING.get()
    if pending is not None:
        pending.append((values, failed, message))
    elif failed(*read_back(values)):
        raise ValueError(message())


def read_back(values) -> list:
    """The values of small tensors (as ``tolist()`` gives them) after one wait: each CUDA tensor copied without
    blocking into this thread's pinned staging buffer (a DMA, no kernel: gathering the flags with
    ``torch.stack(...).tolist()`` launched a kernel for each and one to stack them), then one synchronisation of
    each device's current stream."""
    on_gpu = [v.is_cuda for v in values]
    if not any(on_gpu):
        return [v.tolist() for v in values]
    out, streams = _thread_staging().copy_in(values, on_gpu)
    for stream in streams:
        stream.synchronize()  # the one sync
    return [v.tolist() for v in out]  # read now: the next read-back of this thread reuses the buffer


def staging_slots(values, chosen, buffer_of: Callable[[int], Tensor]) -> List[Optional[Tensor]]:
    """For each chosen value, a tensor of its dtype and shape in one byte buffer (``buffer_of(nbytes)``), each at an
    offset aligned for any element type; None for the others."""
    sizes = [-(-v.numel() * v.element_size() // _ALIGN) * _ALIGN if c else 0 for v, c in zip(values, chosen)]
    buf, at, slots = buffer_of(sum(sizes)), 0, []
    for v, c, size in zip(values, chosen, sizes):
        slots.append(buf[at:at + v.numel() * v.element_size()].view(v.dtype).view(v.shape) if c else None)
        at += size
    return slots


_ALIGN = 16  # bytes: each value's place in the staging buffer is aligned for any element type


class _Staging:
    """A pinned host byte buffer that small device values are copied into, kept between calls, and the places of
    each layout of values (their dtypes and shapes) in it, so that a read-back of a layout seen before makes no view
    of the buffer. A fresh pinned tensor per read-back cost about 100 us of host time on an H100 machine
    (2026-11-27, bench/host_profile.py: the caching host allocator polls the events of the blocks earlier copies
    used), and each view op a few more: host time the GPU spends idle before the first kernel of a checked call."""
    _MAX_LAYOUTS = 64

    def __init__(self, pin: bool = True):
        self.buf: Optional[Tensor] = None
        self._slots: dict = {}
        self._pin = pin  # False: ordinary host memory (the layout tests on a machine without a GPU)

    def slots(self, values, chosen) -> List[Optional[Tensor]]:
        key = tuple((v.dtype, v.shape) if c else None for v, c in zip(values, chosen))
        found = self._slots.get(key)
        if found is None:
            found = staging_slots(values, chosen, self._buffer)
            if len(self._slots) >= self._MAX_LAYOUTS:
                self._slots.clear()
            self._slots[key] = found
        return found

    def copy_in(self, values, on_gpu) -> Tuple[List[Tensor], List]:
        """(each value's host copy: its place here for the CUDA ones, queued without blocking on the current stream of
        its device; the others as they are), and those streams."""
        out, streams = [], {}
        for v, slot in zip(values, self.slots(values, on_gpu)):
            if slot is not None:
                slot.copy_(v, non_blocking=True)
                streams.setdefault(v.device, torch.cuda.current_stream(v.device))
                v = slot
            out.append(v)
        return out, list(streams.values())

    def _buffer(self, nbytes: int) -> Tensor:
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = torch.empty(max(256, 2 * nbytes), dtype=torch.uint8, pin_memory=self._pin)
            self._slots.clear()  # places in the old buffer: the layouts are placed again in this one
        return self.buf


_THREAD = threading.local()


def _thread_staging() -> _Staging:
    """This thread's staging buffer for :func:`read_back`. Reusing it is safe because read_back waits for its copies
    and reads them before it returns; a thread of its own gets a buffer of its own."""
    staging = getattr(_THREAD, "staging", None)
    if staging is None:
        staging = _THREAD.staging = _Staging()
    return staging


class LateCheck:
    """Value checks whose device results are copied now and read later: their copies are queued without blocking
    into pinned memory behind an event, and :meth:`raise_if_failed` waits for that event only, never for the work
    queued after it. Two uses:

    * the logits op's NaN scan rides on its statistics kernel, so its flag exists only after that kernel; when a
      gradient is needed the backward pass reads it, once its own kernel is queued (the forward then holds no host
      sync after its kernel);
    * :meth:`DeferredChecks.read_after_launch`: the checks made before a kernel that is safe whatever values they
      reject are read once that kernel is queued, so that the GPU works while the host waits for the checks.

    Until :meth:`arm` is called it checks nothing. A second read raises again (the values are read once).

    The pinned buffers (:class:`_Staging`) come from a pool shared by all threads (the backward pass runs on
    autograd's device thread). A buffer goes back to the pool once its copy has been read; a check that is never
    read (its graph freed without a backward pass) leaves its buffer to PyTorch's allocator."""

    def __init__(self):
        self._checks: List[_Check] = []
        self._events: Optional[List] = []
        self._staging: Optional[_Staging] = None
        self._host: list = []

    def arm(self, values: Tuple[Tensor, ...], failed: Callable[..., bool], message: Callable[[], str]) -> None:
        """Queue the copy of one check's values (as :func:`fail_when` takes them)."""
        self.arm_all([(values, failed, message)])

    def arm_all(self, checks: List[_Check], after: Optional[dict] = None) -> None:
        """Queue the copies of several checks' values; :meth:`raise_if_failed` raises the first that failed, in
        this order. ``after``: {device: event} (:func:`_mark_streams`): the copies go on each device's side stream,
        behind that event, instead of its current stream (they then need not wait for work queued since the event;
        the values stay referenced here until they are read, so their memory is not reused before the copies)."""
        values = [v for vs, _, _ in checks for v in vs]
        on_gpu = [v.is_cuda for v in values]
        self._staging = _pool_take() if any(on_gpu) else None
        with contextlib.ExitStack() as on_side:
            for device, event in (after or {}).items():
                side = _side_stream(device)
                side.wait_event(event)
                on_side.enter_context(torch.cuda.stream(side))
            copies, streams = (self._staging.copy_in(values, on_gpu) if self._staging is not None
                               else (list(values), []))
        self._events = []
        for stream in streams:
            self._events.append(torch.cuda.Event())
            self._events[-1].record(stream)
        self._host = copies
        self._checks = list(checks)

    def raise_if_failed(self) -> None:
        if not self._checks:
            return
        if self._events is not None:  # first call: wait for the copies and read them (later calls reuse the values)
            for event in self._events:
                event.synchronize()
            self._host = [v.tolist() for v in self._host]
            self._events = None
            if self._staging is not None:  # its copies are read: another check may use its buffer
                _pool_give(self._staging)
                self._staging = None
        _raise_first(self._checks, self._host)


_POOL: List[_Staging] = []  # LateCheck's staging buffers free for the next check (list.pop/append are atomic)
_POOL_MAX = 64


def _pool_take() -> _Staging:
    try:
        return _POOL.pop()
    except IndexError:
        return _Staging()


def _pool_give(staging: _Staging) -> None:
    if len(_POOL) < _POOL_MAX:
        _POOL.append(staging)


def runs_async(t: Tensor) -> bool:
    """Whether work on ``t``'s device is queued, not done at once (CUDA): only there can reading the checks after
    the next work is queued keep the device busy while the host waits."""
    return t.device.type == "cuda"


# False: read_after_launch is ignored (the checks are read on leaving the block, before any kernel): the earlier
# order, for bench/gpu_tune.py and bench/host_profile.py to time both in one process
READ_AFTER_LAUNCH = True
# With read_after_launch: True queues the checks' copies to the host after the launch (on a side stream, behind an
# event recorded where the checks' reductions end, so that they still run ahead of the kernel), False before it. The
# copies' host work (LateCheck.arm_all, 210 us of the 580 us the GPU idled before a checked logits call's first kernel
# on an H100, bench/host_profile.py, session 18) then overlaps the kernel. Built without a GPU (session 18), so off
# until bench/gpu_tune.py's logits rows ("copies after launch") show it wins.
COPY_AFTER_LAUNCH = False


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One stream per CUDA device for the checks' copies queued after a launch (made once: creating a stream costs
    host time)."""
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def _mark_streams(checks: List[_Check]) -> dict:
    """{device: an event recorded now on its current stream} for the CUDA devices of the checks' values: where
    their reductions end in each stream's order."""
    marks = {}
    for values, _, _ in checks:
        for v in values:
            if v.is_cuda and v.device not in marks:
                marks[v.device] = torch.cuda.Event()
                marks[v.device].record(torch.cuda.current_stream(v.device))
    return marks


class DeferredChecks:
    """What :func:`deferred_checks` gives its block: by default nothing to do (the checks are read on leaving it).
    A caller whose next launch is safe whatever values the checks reject calls :meth:`read_after_launch` inside the
    block and queues that launch with :meth:`launched`."""

    def __init__(self):
        self._after_launch = False
        self._late: Optional[LateCheck] = None
        self._queued: Optional[Tuple[List[_Check], dict]] = None  # COPY_AFTER_LAUNCH: copies not yet queued

    def read_after_launch(self) -> None:
        """Read the checks queued in this block after the launch given to :meth:`launched`, not on leaving the block.
        Only for kernels that stay in bounds whatever values the checks reject (a label outside ``[0, V)`` gives a
        wrong row, never a read outside the tensor) and write only fresh outputs: the error is the same and comes
        before anything is returned, but the GPU is already working when the host waits for the checks, where it
        idled from the host sync until the launch (the logits op took 6.01 ms with its checks read before the
        launch, 5.64 ms without checks: gpu_tune on an H100, 2026-11-27)."""
        self._after_launch = READ_AFTER_LAUNCH

    def launched(self, start: Callable[[], Any]) -> Any:
        """``start()`` (which queues the kernels), then the checks armed on leaving the block are read: the first
        that failed raises (also in place of an error that ``start`` raised), else ``start``'s result is returned."""
        if self._late is None and self._queued is None:
            return start()
        try:
            out = start()
        except Exception as exc:
            try:
                self.read()  # a failed check wins, as it would have before the launch
            except ValueError as first:
                raise first from exc
            raise
        self.read()
        return out

    def read(self) -> None:
        """Raise the first failed check, where they are read after the launch (no-op otherwise): for a caller about
        to raise an error of its own before its launch."""
        if self._queued is not None:  # COPY_AFTER_LAUNCH: the copies, queued now (after the launch, on the host)
            pending, marks = self._queued
            self._queued = None
            self._late = LateCheck()
            self._late.arm_all(pending, after=marks)
        if self._late is not None:
            self._late.raise_if_failed()

    def _close(self, pending: List[_Check]) -> None:
        """On leaving the block: read the checks now, or queue their copies (or with COPY_AFTER_LAUNCH, mark where
        their reductions end) for :meth:`launched` to read."""
        if self._after_launch and pending:
            if COPY_AFTER_LAUNCH:
                self._queued = (pending, _mark_streams(pending))
            else:
                self._late = LateCheck()
                self._late.arm_all(pending)
        else:
            _raise_first_failed(pending)


def deferred_checks():
    """Queue the value checks made inside (:func:`fail_if`, :func:`fail_when`) and read their results back once, on
    leaving (or, after :meth:`DeferredChecks.read_after_launch`, once the caller's kernel is queued): the first that
    failed, in the order they were made, raises. An error raised at once inside (a wrong type or shape, and the
    ``cu_seqlens`` checks that later code relies on for safe indexing) gives way to a queued check made before it
    that failed, so the error is the one the checks meet first, as when every check raised at once. A nested use
    reads its own checks back on leaving. With value checks off (or while torch.compile traces) nothing is checked.
    The block gets a :class:`DeferredChecks`."""
    if not value_checks_enabled():
        return contextlib.nullcontext(DeferredChecks())
    return _deferred()


def _raise_first(checks: List[_Check], host: list) -> None:
    """Raise the first of ``checks`` that failed, given the host values of all their tensors in order."""
    at = 0
    for values, failed, message in checks:
        if failed(*host[at:at + len(values)]):
            raise ValueError(message())
        at += len(values)


def _raise_first_failed(pending: List[_Check]) -> None:
    if pending:
        _raise_first(pending, read_back([v for values, _, _ in pending for v in values]))  # the one sync


@contextlib.contextmanager
def _deferred():
    pending: List[_Check] = []
    handle = DeferredChecks()
    token = _PENDING.set(pending)
    try:
        yield handle
    except Exception as exc:
        _PENDING.reset(token)
        token = None
        try:
            _raise_first_failed(pending)  # an earlier queued check wins
        except ValueError as first:
            raise first from exc
        raise
    finally:
        if token is not None:
            _PENDING.reset(token)
    handle._close(pending)
