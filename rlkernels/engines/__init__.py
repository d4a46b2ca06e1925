"""Engines compute per-token log-probs and entropies (and their gradients) without materialising ``N x V`` logits.

Every engine offers the same three operations on flat inputs (see :class:`Engine`); the public functions choose one
per call: ``backend=`` argument, else ``RLKERNELS_BACKEND``, else the device default (``triton`` for CUDA tensors,
``native`` for CPU tensors when the C++ extension is available, else ``torch``).

Engines other than ``torch`` are loaded lazily by a loader in ``_LOADERS`` the first time they are asked for, so
``import rlkernels`` never imports Triton or builds the extension. A loader returns an :class:`Engine` or raises
:class:`BackendUnavailable` with the reason, which :func:`available_backends` and the error messages report.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..objective import metrics, policy_loss_flat, token_loss
from . import torch_engine
from .chunking import ChunkPlan, plan_chunks

BACKENDS = ("torch", "triton", "native")


class BackendUnavailable(RuntimeError):
    """An engine cannot run here; the message says why and how to fix it."""


AUTOCAST_DEVICES = ("cuda", "cpu")
# the primitives that compute: each engine's own runs with torch.autocast off (see Engine)
_PRIMITIVES = ("linear_forward", "linear_backward", "linear_fused", "logits_forward", "logits_backward")


def autocast_off(fn: Callable) -> Callable:
    """``fn`` run with ``torch.autocast`` off on every device type where it is on (none: called as it is, for the
    cost of two flag reads: 0.4 us per call on the 2-core CPU machine)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):  # AUTOCAST_DEVICES
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in AUTOCAST_DEVICES:
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)
    return run


class Engine:
    """The interface of an engine: five primitives on flat inputs, implemented by each engine, and the autograd
    entry points that :mod:`rlkernels.ops` calls, shared by all (see :mod:`rlkernels.engines.autograd`).

    Inputs: hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64, temperature a float or an (N,) tensor
    in the compute dtype (fp32, fp64 for fp64 inputs); per-row statistics are (N,) in the compute dtype.

    The primitives run with ``torch.autocast`` off (:func:`autocast_off`, applied to each subclass's own): their
    GEMMs take the dtype of the inputs they are given and their math the compute dtype, called inside an autocast
    region or not, forward and backward alike (a region would otherwise turn some of an engine's matmuls to bf16
    and not others). The public functions apply autocast's cast to hidden, weight and bias before (as
    ``torch.nn.functional.linear`` would see them: :func:`rlkernels._inputs.autocast_linear_inputs`).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in _PRIMITIVES:
            attr = cls.__dict__.get(name)
            if isinstance(attr, staticmethod):
                setattr(cls, name, staticmethod(autocast_off(attr.__func__)))
            elif callable(attr):
                setattr(cls, name, autocast_off(attr))

    name = "abstract"
    default_budget_mb = 64.0
    # True: logits_forward turns every row holding a NaN or +inf logit into NaN logp in the same read that computes
    # it, so the caller (with value checks on) checks the (N,) result instead of scanning N x V logits first
    scans_logits = False
    # True: logits_forward / logits_backward take the caller's logits as they are, (N, V) or (B, T, V) with any row
    # strides (a view such as logits[:, :-1]), rows b T + t, and a negative label as a masked-out row (never read;
    # logp, entropy and gradient 0): nothing is gathered, flattened or copied. False: (N, V) of kept rows only.
    logits_in_place = False
    # True: the forward's kernels (logits and hidden+W paths) stay in bounds whatever the labels, temperatures, mask
    # or other checked values hold (a label outside [0, V) gives a wrong row, never a read outside the logits; no
    # torch op indexes by a label) and write only fresh outputs, so the caller may queue them before its value checks
    # are read back (DeferredChecks.read_after_launch)
    safe_for_any_values = False
    # True (with logits_in_place): logits_forward gives NaN logp in each row it computes whose label lies outside
    # [0, V), so that the caller's NaN scan of logp (scans_logits) checks the labels' range too, and the logits op
    # makes no reduction over them before its launch. A kept negative label must then reach the engine as an
    # out-of-range positive one (a negative label marks a masked-out row)
    flags_bad_labels = False

    def supports(self, device: torch.device) -> Optional[str]:
        """None if this engine can run on ``device``, else the reason it cannot."""
        return None

    def block_elem_bytes(self, dtype: torch.dtype) -> int:
        """Bytes per logit that the memory budget counts (see :mod:`rlkernels.engines.chunking`): 4 by default."""
        return 4

    def budget_reserve(self, weight: Tensor, need_weight_grad: bool) -> int:
        """Bytes of the memory budget this engine keeps for buffers other than the logits block (the Triton engine's
        fp32 grad_weight accumulator); the block is sized from the rest. 0 by default."""
        return 0

    # -- primitives ------------------------------------------------------------------------------------------------
    def linear_forward(self, hidden, weight, bias, labels, temperature, plan: ChunkPlan,
                       vocab_offset: Optional[int] = None, softcap: float = 0.0):
        """-> (logp, entropy, M, log S, C/S), each (N,). ``vocab_offset``: None for the whole vocabulary, else the
        global id of weight row 0 of a tensor-parallel shard (labels outside the shard then give logp = -inf).
        ``softcap``: s > 0 computes on the capped logits s tanh((hidden @ weight.T + bias) / s), then / T (Gemma 2
        and Gemma 4's final_logit_softcapping); 0 leaves them. The linear primitives all take it."""
        raise NotImplementedError

    def linear_backward(self, hidden, weight, bias, labels, temperature, plan: ChunkPlan, m, log_s, cs,
                        g_logp: Optional[Tensor], g_ent: Optional[Tensor], need_h: bool, need_w: bool, need_b: bool,
                        vocab_offset: Optional[int] = None, softcap: float = 0.0):
        """-> (grad_hidden, grad_weight, grad_bias), None where not needed; a None upstream skips its term."""
        raise NotImplementedError

    def linear_fused(self, hidden, weight, bias, labels, temperature, plan: ChunkPlan, chunk_loss, need_h: bool,
                     need_w: bool, need_b: bool, vocab_offset=None, merge=None, softcap: float = 0.0):
        """Single pass for losses whose chunk gradients need only the chunk (token-separable, or sequence-separable
        over ``plan.bounds`` chunks of whole sequences) -> (loss, logp, entropy, grad_hidden, grad_weight, grad_bias).
        A tensor-parallel shard passes ``vocab_offset`` (the global id of weight row 0) and ``merge(r0, r1, M, S, C,
        z~_y) -> (M, S, C, z~_y)`` (the chunk's state over the whole vocabulary, see :mod:`rlkernels.distributed`);
        the gradients are then this shard's, grad_hidden a partial sum."""
        raise NotImplementedError

    def logits_forward(self, logits, labels, temperature, plan: ChunkPlan, masked_rows: bool):
        """-> (logp, entropy, M, log S, C/S) from logits (N, V) (or see ``logits_in_place``). ``masked_rows``: labels
        may be negative (masked-out rows of a ``logits_in_place`` engine); False when none is."""
        raise NotImplementedError

    def prepare_logits_forward(self, logits, labels, temperature, plan: ChunkPlan, masked_rows: bool):
        """:meth:`logits_forward` in two steps: what can be done before the labels are known to be valid (no kernel
        that reads them) now, the rest when the returned function is called; it returns the outputs. By default
        everything waits for that call."""
        return lambda: self.logits_forward(logits, labels, temperature, plan, masked_rows)

    def logits_backward(self, logits, labels, temperature, plan: ChunkPlan, masked_rows: bool, m, log_s, cs, g_logp,
                        g_ent) -> Tensor:
        """-> dL/dlogits, a new tensor in the logits' dtype."""
        raise NotImplementedError

    # -- autograd entry points -------------------------------------------------------------------------------------
    def linear_logprobs(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                        temperature, plan: ChunkPlan, softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
        """(logp, entropy), each (N,) in the compute dtype, differentiable w.r.t. hidden, weight and bias."""
        return autograd.linear_logprobs(self.name, hidden, weight, bias, labels, temperature, plan, softcap)

    def logits_logprobs(self, logits: Tensor, labels: Tensor, temperature, plan: ChunkPlan, masked_rows: bool,
                        late_check=None) -> Tuple[Tensor, Tensor]:
        """(logp, entropy) from logits (N, V), differentiable w.r.t. logits (the gradient is a new tensor).
        ``late_check``: a :class:`rlkernels._checks.LateCheck` that backward raises from once its kernel is
        queued, before it returns the gradient."""
        return autograd.logits_logprobs(self.name, logits, labels, temperature, plan, masked_rows, late_check)

    def prepare_logits_logprobs(self, logits: Tensor, labels: Tensor, temperature, plan: ChunkPlan,
                                masked_rows: bool, late_check=None) -> Callable[[], Tuple[Tensor, Tensor]]:
        """:meth:`logits_logprobs` in two steps (see :meth:`prepare_logits_forward`): the returned function queues
        the work and returns (logp, entropy)."""
        return autograd.prepare_logits_logprobs(self.name, logits, labels, temperature, plan, masked_rows,
                                                late_check, engine=self)

    def policy_loss_flat(self, logp: Tensor, entropy: Tensor, batch, cfg):
        """The objective on the step's (N,) ``logp``/``entropy`` (differentiable) -> :class:`LossOutput`
        (:func:`rlkernels.objective.policy_loss_flat`, the two-stage path's): torch ops here; an engine may fuse
        them."""
        return policy_loss_flat(logp, entropy, batch, cfg)

    def objective_metrics(self, logp: Tensor, entropy: Tensor, batch, prep, cfg) -> Dict[str, Tensor]:
        """The single pass's metrics of the step (:func:`rlkernels.objective.metrics` of ``token_loss``) from its
        detached (N,) ``logp``/``entropy``, :class:`~rlkernels.objective.TokenBatch` ``batch`` and
        :class:`~rlkernels.objective.Prepared` ``prep``: torch ops here; an engine may fuse them."""
        return metrics(token_loss(logp, entropy, batch, prep, cfg), logp, entropy, batch, prep, cfg)

    def linear_fused_loss(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature,
                          plan: ChunkPlan, chunk_loss, softcap: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
        """Single pass (token-separable losses, or sequence-separable ones over chunks of whole sequences):
        (loss, logp, entropy); gradients formed in forward."""
        return autograd.LinearFusedLoss.apply(self, hidden, weight, bias, labels, temperature, plan, chunk_loss,
                                              softcap)


class TorchEngine(Engine):
    name = "torch"
    default_budget_mb = 64.0
    linear_forward = staticmethod(torch_engine.linear_forward)
    linear_backward = staticmethod(torch_engine.linear_backward)
    linear_fused = staticmethod(torch_engine.linear_fused)
    logits_forward = staticmethod(torch_engine.logits_forward)
    logits_backward = staticmethod(torch_engine.logits_backward)


def _load_triton() -> Engine:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"triton is not importable ({exc}); `pip install triton` on Linux x86_64") from None
    from .triton_engine import TritonEngine

    return TritonEngine()


def _load_native() -> Engine:
    from .. import native  # builds the extension on first use (rlkernels/native/__init__.py)

    try:
        module = native.load()
    except native.NativeUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None
    from .native_engine import NativeEngine

    return NativeEngine(module)


_LOADERS: Dict[str, Callable[[], Engine]] = {
    "torch": TorchEngine,
    "triton": _load_triton,
    "native": _load_native,
}
_CACHE: Dict[str, object] = {}  # name -> Engine, or the BackendUnavailable it raised


def _load_outside_trace(name: str) -> bool:
    """Loads engine ``name`` for a first call made under torch.compile, which cannot trace an import of Triton or a
    build of the native extension (a lock, a subprocess): dynamo runs this function eagerly and keeps its result,
    a constant. True when the engine loaded."""
    return not isinstance(_load(name), BackendUnavailable)


# what torch.compiler.assume_constant_result sets, set here: calling it imports torch._dynamo and with it Triton,
# which `import rlkernels` must not (tests/test_bench.py::test_import_is_light)
_load_outside_trace._dynamo_marked_constant = True


def _load(name: str):
    if name not in _CACHE:
        try:
            _CACHE[name] = _LOADERS[name]()
        except BackendUnavailable as exc:
            _CACHE[name] = exc
    return _CACHE[name]


def load_engine(name: str) -> Engine:
    """The engine ``name`` (loaded once), or :class:`BackendUnavailable` with the reason."""
    if torch.compiler.is_compiling():  # before _CACHE is read: dynamo snapshots it at the first read
        _load_outside_trace(name)
    found = _load(name)
    if isinstance(found, BackendUnavailable):
        raise found
    return found


def available_backends(device: Optional[torch.device] = None) -> Dict[str, str]:
    """Every backend name -> ``"available"`` or the reason it is not (on ``device``, when given).

    Loads the engines that are not loaded yet (this may import Triton or build the native extension).
    """
    out = {}
    for name in BACKENDS:
        try:
            engine = load_engine(name)
            reason = engine.supports(torch.device(device)) if device is not None else None
            out[name] = reason or "available"
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


def resolve_backend(backend: Optional[str], device: torch.device) -> Engine:
    """The engine for this call: ``backend`` if not "auto", else ``RLKERNELS_BACKEND``, else the device default."""
    explicit = backend not in (None, "auto")
    requested = backend if explicit else (os.environ.get("RLKERNELS_BACKEND") or "auto")
    source = "backend" if explicit else "RLKERNELS_BACKEND"
    if requested == "auto":
        for name in (("triton", "torch") if device.type == "cuda" else ("native", "torch")):
            try:
                engine = load_engine(name)
            except BackendUnavailable:
                continue
            if engine.supports(device) is None:
                return engine
        return load_engine("torch")
    if requested not in BACKENDS:
        raise ValueError(f"{source}={requested!r} is not a backend; choose 'auto' or one of {BACKENDS}")
    try:
        engine = load_engine(requested)
    except BackendUnavailable as exc:
        raise ValueError(f"{source}={requested!r} is not available: {exc}") from None
    reason = engine.supports(device)
    if reason is not None:
        raise ValueError(f"{source}={requested!r} cannot run on {device}: {reason}")
    return engine


from . import autograd  # noqa: E402  (the custom ops need load_engine, defined above)

__all__ = ["Engine", "BackendUnavailable", "ChunkPlan", "plan_chunks", "available_backends", "load_engine",
           "resolve_backend", "BACKENDS"]
