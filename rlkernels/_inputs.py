"""Input checking and the flattening of padded or packed batches into a :class:`~rlkernels.objective.TokenBatch`.

Every check runs before any result is returned and raises ``TypeError`` (wrong type or dtype) or ``ValueError``
(wrong shape, device or value) naming the argument and the shapes involved. Value checks (label range, NaN at kept
positions, ``cu_seqlens`` consistency) read data back to the host; set ``RLKERNELS_CHECK_VALUES=0`` to skip them in
production (they are also skipped while ``torch.compile`` traces and while a CUDA graph is captured: nothing may
read the device then; the warm-up calls before a capture check the data). Inside :func:`deferred_checks` (every public op's
checking section) the data-dependent ones are queued on the device and read back together: one host wait for all of
them, raising the first that failed, in the order they were made. It comes before any kernel of ours, except where
the kernels are safe whatever the values (:meth:`DeferredChecks.read_after_launch`: the Triton engine's forward,
whose kernels never read outside the logits for any label, and ``policy_loss``'s objective on CUDA, plain torch ops
that index by no checked value): there they are queued first and the host waits for the checks' copies, queued
before them, while the GPU runs them. The one check made after a kernel (the Triton logits path's
NaN scan, which rides on its statistics kernel) is read by the backward pass when a gradient is needed
(:class:`LateCheck`), so that the forward waits for no kernel of its own.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .config import PolicyLossConfig, as_number, is_finite_number
from .engines import AUTOCAST_DEVICES
from .engines.torch_engine import compute_dtype
from .objective import TokenBatch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def autocast_linear_inputs(hidden, weight, bias):
    """hidden, weight and bias as ``torch.nn.functional.linear`` sees them inside a ``torch.autocast`` region of
    hidden's device type: each floating tensor that is not float64 cast to the region's dtype (differentiably: its
    gradient comes back in the caller's dtype), so that the GEMMs run in that dtype as the eager code's would. Outside
    such a region (and for anything that is not a tensor, which the checks then reject) as they are."""
    if not isinstance(hidden, Tensor):
        return hidden, weight, bias
    device_type = hidden.device.type
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype)
        return t.to(dtype) if eligible else t
    return cast(hidden), cast(weight), cast(bias)


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

    def arm_all(self, checks: List[_Check]) -> None:
        """Queue the copies of several checks' values; :meth:`raise_if_failed` raises the first that failed, in
        this order."""
        values = [v for vs, _, _ in checks for v in vs]
        on_gpu = [v.is_cuda for v in values]
        self._staging = _pool_take() if any(on_gpu) else None
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


class DeferredChecks:
    """What :func:`deferred_checks` gives its block: by default nothing to do (the checks are read on leaving it).
    A caller whose next launch is safe whatever values the checks reject calls :meth:`read_after_launch` inside the
    block and queues that launch with :meth:`launched`."""

    def __init__(self):
        self._after_launch = False
        self._late: Optional[LateCheck] = None

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
        if self._late is None:
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
        if self._late is not None:
            self._late.raise_if_failed()

    def _close(self, pending: List[_Check]) -> None:
        """On leaving the block: read the checks now, or queue their copies for :meth:`launched` to read."""
        if self._after_launch and pending:
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


def env_choice(name: str, choices) -> str:
    """The value of environment variable ``name`` (read now), lower-cased, one of ``choices``; unset or empty gives
    ``choices[0]``. Anything else raises ValueError naming the variable."""
    mode = os.environ.get(name, "").strip().lower() or choices[0]
    if mode not in choices:
        raise ValueError(f"{name}={mode!r}: choose one of {tuple(choices)}")
    return mode


def _shape(x: Tensor) -> str:
    return str(tuple(x.shape))


def require_tensor(name: str, x, *, dtypes=None, dims=None, kind: str = "float") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if _is_dtensor(x):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(x.placements)}), as FSDP2 leaves a parameter outside its "
            f"module's forward; rlkernels takes plain tensors: the whole tensor ({name}.full_tensor(), or the "
            "parameter inside the module's forward, where FSDP has gathered it), or, for an LM head sharded over the "
            f"vocabulary across ranks that hold the same hidden states, this rank's rows ({name}.to_local()) with "
            "tp_group=")
    if hasattr(x, "ds_id") and x.numel() == 0:  # DeepSpeed ZeRO-3 leaves a partitioned parameter empty
        full = getattr(x, "ds_shape", None)
        raise ValueError(
            f"{name} is a DeepSpeed ZeRO-3 parameter whose data is partitioned across ranks: it holds shape "
            f"{_shape(x)} here" + (f" (its whole shape is {tuple(full)})" if full is not None else "") + "; "
            "rlkernels needs the whole tensor: call it where ZeRO-3 has gathered the parameter (inside the forward "
            "of the module that owns it, or inside deepspeed.zero.GatheredParameters)")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; expected {kind} ({', '.join(str(d) for d in dtypes)})")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{name} has shape {_shape(x)}; expected {' or '.join(f'{d}-D' for d in dims)}")
    return x


def _is_dtensor(x: Tensor) -> bool:
    # by name: no import of torch.distributed.tensor (nothing else makes one)
    cls = type(x)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def _require_int(name: str, x) -> Tensor:
    require_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {x.dtype}; expected an integer dtype (int64 or int32)")
    return x


def _same_device(name: str, x: Optional[Tensor], ref: Tensor, ref_name: str) -> None:
    if x is not None and x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def check_mask(mask, shape: torch.Size, ref: Tensor) -> Tensor:
    """mask of ``shape`` (bool, or 0/1 integers or floats) -> bool tensor; None -> all True."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=ref.device)
    require_tensor("mask", mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {_shape(mask)}; expected {tuple(shape)} (the shape of labels)")
    _same_device("mask", mask, ref, "labels")
    if mask.dtype == torch.bool:
        return mask
    if value_checks_enabled():
        fail_if((mask != 0) & (mask != 1), lambda: "mask must hold only 0/1 (or bool); found other values")
    return mask != 0


def check_labels(labels, shape: torch.Size, vocab: int, mask: Optional[Tensor], ref: Tensor) -> Tensor:
    """labels of ``shape`` (an integer dtype), in ``[0, vocab)`` where ``mask`` (None: everywhere) -> int64."""
    _require_int("labels", labels)
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels has shape {_shape(labels)}; expected {tuple(shape)}")
    _same_device("labels", labels, ref, "hidden" if ref is not labels else "labels")
    if value_checks_enabled() and labels.numel() > 0:
        # the range from one min/max reduction (masked-out positions read as 0): one kernel before the sync, where
        # the elementwise flags (< 0, >= V, or, and, any) took five; both into one tensor, so one copy reads it back
        kept = labels if mask is None else torch.where(mask, labels, 0)
        bounds = torch.empty(2, dtype=kept.dtype, device=kept.device)
        torch.aminmax(kept, out=(bounds[0], bounds[1]))

        def message() -> str:
            bad = (labels < 0) | (labels >= vocab)
            if mask is not None:
                bad &= mask
            where = tuple(bad.nonzero()[0].tolist())
            return f"labels must lie in [0, V={vocab}) at kept positions; found {int(labels[where])} at index {where}"

        fail_when((bounds,), lambda lo_hi: lo_hi[0] < 0 or lo_hi[1] >= vocab, message)
    return labels.long()


def check_linear(hidden, weight, bias) -> Tuple[int, int]:
    """hidden (B, T, H) or (N, H), weight (V, H), bias (V,) -> (H, V)."""
    require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, dims=(2, 3))
    require_tensor("weight", weight, dtypes=FLOAT_DTYPES, dims=(2,))
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match "
                        "(the GEMM runs in the input dtype)")
    _same_device("weight", weight, hidden, "hidden")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden has shape {_shape(hidden)} but weight has {_shape(weight)}: the last dimension of "
                         f"hidden must equal weight.shape[1] = {H}")
    if V == 0:
        raise ValueError("weight has shape (0, H): the vocabulary is empty")
    if bias is not None:
        require_tensor("bias", bias, dtypes=FLOAT_DTYPES, dims=(1,))
        if bias.shape[0] != V:
            raise ValueError(f"bias has shape {_shape(bias)}; expected ({V},) to match weight {_shape(weight)}")
        _same_device("bias", bias, hidden, "hidden")
    return H, V


def check_finite_rows(name: str, x: Tensor, row_mask: Optional[Tensor] = None, allow_neg_inf: bool = False) -> None:
    """No NaN / inf in ``x`` (only in rows where ``row_mask`` is True, when given).

    Per-row min/max reductions instead of elementwise masks: NaN propagates through max, so a row is bad iff its max
    is NaN or +inf, or (unless -inf is allowed) its min is -inf. Measured on 4096 x 32000 fp32 logits (2-core CPU):
    16 ms (-inf allowed: the maxima alone), against ~1 s for ``isfinite(x[row_mask])``, which copies the tensor and
    builds full-size masks.
    """
    if not value_checks_enabled() or x.numel() == 0:
        return
    # one mask entry per element (per-token inputs), or per row (hidden states, logits); no mask: whole rows
    n_rows = row_mask.numel() if row_mask is not None else (x.shape[0] if x.dim() == 2 else x.numel())
    rows = x.reshape(n_rows, -1)
    # NaN propagates through amax and amin. -inf allowed: the row maxima alone. Else both: aminmax in one read on a
    # GPU; on the CPU amin and amax, as aminmax along a dimension is 4x slower there than the two together (torch
    # 2.13, 4096 x 32000 fp32 on the 2-core machine: 145 ms against 16 + 17 ms)
    if allow_neg_inf:
        hi = rows.amax(dim=-1)
    elif rows.device.type == "cpu":
        lo, hi = rows.amin(dim=-1), rows.amax(dim=-1)
    else:
        lo, hi = torch.aminmax(rows, dim=-1)
    bad = torch.isnan(hi) | (hi == math.inf)
    if not allow_neg_inf:
        bad |= lo == -math.inf
    if row_mask is not None:
        bad &= row_mask.reshape(-1)
    what = "NaN or +inf" if allow_neg_inf else "NaN or inf"
    where = "kept position(s)" if rows.shape[1] == 1 else "row(s)"
    fail_if(bad, lambda: f"{name} holds {what} in {int(bad.sum())} {where}")


def check_scanned_rows(name: str, values: Tensor, late: Optional[LateCheck] = None) -> None:
    """The engine scanned ``name`` for NaN / +inf in its own read of it (``Engine.scans_logits``), leaving NaN in
    ``values`` (one per row the engine computed; dropped rows hold 0) where it found one: the same error as
    :func:`check_finite_rows`, raised before anything is returned, or, given ``late`` (a gradient is needed), armed
    there and raised by the backward pass before it returns the gradient: the forward pass then waits for nothing."""
    if not value_checks_enabled() or values.numel() == 0:
        return

    def message() -> str:
        found = f"{name} holds NaN or +inf in {int(torch.isnan(values).sum())} row(s)"
        if late is None:
            return found
        return f"{found} (found in the forward pass; raised in backward, no gradient returned)"

    # one reduction: the largest value is NaN exactly when one is (torch's max propagates NaN; -inf is a value)
    flag = (values.amax(),)
    if late is None:
        fail_when(flag, math.isnan, message)
    else:
        late.arm(flag, math.isnan, message)


def check_softcap(softcap) -> float:
    """None (no cap) or a finite number > 0 -> the float the engines take, 0.0 for none."""
    if softcap is None:
        return 0.0
    softcap = as_number(softcap)
    if isinstance(softcap, Tensor):
        raise TypeError("softcap must be a Python number (a model config's final_logit_softcapping) or None, got a "
                        "tensor")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a number or None, got {type(softcap).__name__}")
    if not (is_finite_number(softcap) and softcap > 0):
        raise ValueError(f"softcap={softcap}: must be finite and > 0 (None turns the cap off)")
    return float(softcap)


def check_temperature(temperature, shape: torch.Size, mask: Optional[Tensor], ref: Tensor, cdt: torch.dtype):
    """A float > 0, or a tensor of ``shape`` (per token) > 0 at kept positions (``mask``; None: everywhere) -> float
    or flat tensor in ``cdt``."""
    if isinstance(temperature, Tensor):
        if temperature.dim() == 0:
            temperature = float(temperature)
        else:
            require_tensor("temperature", temperature, dtypes=FLOAT_DTYPES)
            if tuple(temperature.shape) != tuple(shape):
                raise ValueError(f"temperature has shape {_shape(temperature)}; expected a float or a per-token "
                                 f"tensor of shape {tuple(shape)}")
            _same_device("temperature", temperature, ref, "hidden")
            t = temperature.to(cdt)
            if value_checks_enabled():
                bad = ~(torch.isfinite(t) & (t > 0))
                if mask is not None:
                    bad &= mask
                fail_if(bad, lambda: f"temperature must be finite and > 0 at kept positions; found "
                                     f"{float(t[bad][0])} at {int(bad.sum())} position(s)")
            return (t if mask is None else torch.where(mask, t, torch.ones_like(t))).reshape(-1)
    temperature = as_number(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a per-token tensor, got {type(temperature).__name__}")
    if not (is_finite_number(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature}: must be finite and > 0 (T = 0, greedy decoding, has no "
                         "log-probs; see LOSSES.md B §10.7)")
    return float(temperature)


def _per_token(name: str, x, shape, mask: Tensor, cdt, ref: Tensor, logprob: bool) -> Optional[Tensor]:
    if x is None:
        return None
    if logprob:
        require_tensor(name, x, dtypes=(torch.float32, torch.float64), kind="fp32/fp64 log-probs (bf16 log-probs are "
                       "too coarse for ratios, LOSSES.md B §10.4)")
    else:
        require_tensor(name, x, dtypes=FLOAT_DTYPES)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {_shape(x)}; expected {tuple(shape)} (one value per token, like labels)")
    _same_device(name, x, ref, "labels")
    check_finite_rows(name, x, mask)
    return torch.where(mask, x.to(cdt), torch.zeros((), dtype=cdt, device=x.device)).reshape(-1)


def check_cu_seqlens(name: str, cu_seqlens, n: int, what: str) -> Tensor:
    """Sequence boundaries (S+1,) of ``n`` packed rows (flash-attn varlen convention) -> int64 tensor: an integer
    tensor, 1-D with S >= 1, and (value checks, read at once: later indexing relies on them) starting at 0, ending at
    ``n`` (``what`` names it) and non-decreasing."""
    _require_int(name, cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} has shape {_shape(cu_seqlens)}; expected (S+1,) with S >= 1 sequences "
                         "(flash-attn varlen convention)")
    cu = cu_seqlens.long()
    if value_checks_enabled():
        # one read of the ends and the order flag together (three syncs when each was read alone)
        first, last, unordered = read_back((cu[0], cu[-1], (cu[1:] < cu[:-1]).any()))
        if first != 0 or last != n:
            raise ValueError(f"{name} must start at 0 and end at N={n} ({what}); got {first} ... {last}")
        if unordered:
            raise ValueError(f"{name} must be non-decreasing")
    return cu


def sequence_layout(shape: torch.Size, cu_seqlens, ref: Tensor) -> Tuple[Tensor, int]:
    """seq_ids (N,) and the number of sequences, from a padded (B, T) shape or packed (N,) + cu_seqlens."""
    if len(shape) == 2:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is for packed (N, H) inputs; got padded inputs with labels shape "
                             f"{tuple(shape)}. Pass mask= for padded batches instead")
        B, T = shape
        return torch.arange(B, device=ref.device).repeat_interleave(T), B
    N = shape[0]
    if cu_seqlens is None:
        return torch.zeros(N, dtype=torch.long, device=ref.device), 1
    cu = check_cu_seqlens("cu_seqlens", cu_seqlens, N, "the number of tokens").to(ref.device)
    S = cu.numel() - 1
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(S, device=ref.device), lengths, output_size=N), S


def check_advantages(advantages, shape: torch.Size, num_seqs: int, seq_ids: Tensor, mask: Tensor, cdt,
                     ref: Tensor) -> Tensor:
    """Per-sequence (S,) / (B,) or per-token advantages -> flat (N,) in ``cdt``, 0 at masked positions."""
    require_tensor("advantages", advantages, dtypes=FLOAT_DTYPES)
    _same_device("advantages", advantages, ref, "labels")
    if tuple(advantages.shape) == tuple(shape):
        return _per_token("advantages", advantages, shape, mask, cdt, ref, logprob=False)
    if tuple(advantages.shape) == (num_seqs,):
        flat = advantages.to(cdt)[seq_ids]
        flat_mask = mask.reshape(-1)
        check_finite_rows("advantages", flat, flat_mask)
        return torch.where(flat_mask, flat, torch.zeros((), dtype=cdt, device=flat.device))
    raise ValueError(f"advantages has shape {_shape(advantages)}; expected ({num_seqs},) (one per sequence) or "
                     f"{tuple(shape)} (one per token)")


def check_normalizer(normalizer):
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer has shape {_shape(normalizer)}; expected a scalar")
        if value_checks_enabled():  # queued with the other value checks (NaN fails too)
            fail_if(~(normalizer > 0), lambda: f"normalizer must be > 0, got {float(normalizer)}")
        return normalizer.reshape(())
    normalizer = as_number(normalizer)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"normalizer must be a number or a scalar tensor, got {type(normalizer).__name__}")
    if not (is_finite_number(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer={normalizer}: must be finite and > 0")
    return float(normalizer)


def check_config_inputs(cfg: PolicyLossConfig, ref_logprobs, rollout_logprobs, is_weights, have_entropy=True) -> None:
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logprobs (the reference policy's per-token log-probs)")
    if cfg.rollout_correction != "none":
        if is_weights is not None:
            raise ValueError(f"is_weights are given and rollout_correction={cfg.rollout_correction!r}: use one; "
                             "is_weights are applied as they are (already truncated or masked)")
        if rollout_logprobs is None:
            raise ValueError(f"rollout_correction={cfg.rollout_correction!r} needs rollout_logprobs (the rollout "
                             "engine's per-token log-probs)")
    if not have_entropy:
        for field in ("entropy_coef", "entropy_shaping_alpha"):
            if getattr(cfg, field) != 0:
                raise ValueError(f"{field}={getattr(cfg, field)} needs the entropy; pass entropy=")
        if cfg.top_entropy_quantile < 1.0:
            raise ValueError("top_entropy_quantile < 1 needs the entropy; pass entropy=")


def build_token_batch(shape: torch.Size, mask: Tensor, advantages, *, old_logprobs=None, ref_logprobs=None,
                      rollout_logprobs=None, is_weights=None, cu_seqlens=None, normalizer=None,
                      cdt: torch.dtype, ref: Tensor) -> TokenBatch:
    """Checks every per-token input against the labels' ``shape`` and flattens them into a TokenBatch."""
    seq_ids, num_seqs = sequence_layout(shape, cu_seqlens, ref)
    flat_mask = mask.reshape(-1)
    return TokenBatch(
        mask=flat_mask,
        seq_ids=seq_ids,
        num_seqs=num_seqs,
        advantages=check_advantages(advantages, shape, num_seqs, seq_ids, mask, cdt, ref),
        old_logprobs=_per_token("old_logprobs", old_logprobs, shape, mask, cdt, ref, logprob=True),
        ref_logprobs=_per_token("ref_logprobs", ref_logprobs, shape, mask, cdt, ref, logprob=True),
        rollout_logprobs=_per_token("rollout_logprobs", rollout_logprobs, shape, mask, cdt, ref, logprob=True),
        is_weights=_per_token("is_weights", is_weights, shape, mask, cdt, ref, logprob=False),
        normalizer=check_normalizer(normalizer),
    )


def check_backend_args(backend, chunk_size) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size={chunk_size!r}: must be a positive int (rows per chunk) or None")


def kept_index(mask: Tensor) -> Optional[Tensor]:
    """Indices of kept rows, or None when every row is kept. One host sync: the count is data, so it is not asked
    under torch.compile or in a CUDA graph capture (:func:`no_host_reads`), where :func:`neutralise_rows` makes
    dropped rows harmless instead."""
    flat = mask.reshape(-1)
    if flat.numel() == 0:
        return None
    index = flat.nonzero().squeeze(1)  # one sync: the size of the result
    return None if index.numel() == flat.numel() else index



def neutralise_rows(hidden2d: Tensor, labels: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Masked rows computed anyway (no gather): zero their hidden states and labels so garbage there (NaN, -100)
    cannot reach the shared weight gradient; their upstream gradients are exactly zero."""
    flat = mask.reshape(-1)
    return (torch.where(flat[:, None], hidden2d, torch.zeros((), dtype=hidden2d.dtype, device=hidden2d.device)),
            torch.where(flat, labels, torch.zeros((), dtype=labels.dtype, device=labels.device)))
