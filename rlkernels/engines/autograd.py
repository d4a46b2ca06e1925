"""Autograd wiring shared by every engine, as ``torch.library`` custom ops so that ``torch.compile`` sees them.

* ``rlkernels::linear_logprobs`` -> (logp, entropy, M, log S, C/S) and its backward op, for the hidden+W path;
* ``rlkernels::logits_logprobs`` and its backward op, for the logits path.

The ops take the engine's name and the chunk plan as plain arguments and call the engine's primitives (see
:class:`rlkernels.engines.Engine`); fake implementations give ``torch.compile`` the output shapes. Outside a
``torch.compile`` trace the same code runs through :class:`_EagerTwin`, a plain ``autograd.Function`` made of each
op's implementation, context setup and gradients (with the backward implementation in place of the backward op): a
custom op's eager call goes through the dispatcher, its autograd wrapper and a dynamo-disabled frame, host time that
a GPU sees whenever it waits on the host (after a value check's sync, say). On the 2-core CPU at a tiny shape (torch
engine, both paths alternated in one process) the logits path's forward took 318 us through the op and 255 through
its twin, forward + backward 522 and 440.

The single-pass loss takes a Python callable (the objective of each chunk), which no op schema can carry, so in
eager mode it is an ordinary ``autograd.Function`` (:class:`LinearFusedLoss`, which scales its saved gradients in
place); under ``torch.compile`` it is the ``rlkernels::linear_fused_loss`` op of :mod:`rlkernels._single_pass`, which
carries the objective as its config and per-token tensors.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .chunking import ChunkPlan
from .torch_engine import compute_dtype


def _engine(name: str):
    from . import load_engine

    return load_engine(name)


def _temperature(temperature: Optional[Tensor], temp_scalar: float):
    return temperature if temperature is not None else temp_scalar


def _split_temperature(temperature) -> Tuple[Optional[Tensor], float]:
    return (temperature, 1.0) if isinstance(temperature, Tensor) else (None, float(temperature))


def _own(out) -> Tuple[Tensor, ...]:
    # op outputs may not alias each other or the inputs, and must match the contiguous fake outputs; primitives may
    # return views of one buffer
    return tuple(x.clone(memory_format=torch.contiguous_format)
                 if (x._base is not None or not x.is_contiguous()) else x for x in out)


def _or_empty(x: Optional[Tensor], like: Tensor) -> Tensor:
    # op outputs cannot be None: an unneeded gradient travels as an empty tensor
    return like.new_empty(0) if x is None else x


class _EagerTwin(torch.autograd.Function):
    """An op's eager twin: its implementation, setup_context and backward as a plain autograd.Function, called with
    the op's arguments, then a ``(forward, setup, grads, backward)`` tuple (the backward implementation, not the
    backward op) and a late check (a :class:`rlkernels._checks.LateCheck` or None) that backward raises from
    once its kernels are queued. Returns (logp, entropy), as the op's callers use it."""

    @staticmethod
    def forward(ctx, *args):
        *inputs, (forward, setup, grads, backward), late_check = args
        out = forward(*inputs)
        setup(ctx, inputs, out)
        ctx.twin = (grads, backward, late_check)
        return out[0], out[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        grads, backward, late_check = ctx.twin
        result = grads(ctx, g_logp, g_ent, backward)
        if late_check is not None:
            late_check.raise_if_failed()
        return result + (None, None)  # none for the tuple and the check


# ----------------------------------------------------------------------------------------------------------------
# hidden + weight -> log-probs
# ----------------------------------------------------------------------------------------------------------------
def _linear_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    temperature: Optional[Tensor], temp_scalar: float, rows: int, vocab_block: int,
                    backend: str, softcap: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    plan = ChunkPlan(rows, vocab_block, weight.shape[0])
    return _own(_engine(backend).linear_forward(hidden, weight, bias, labels, _temperature(temperature, temp_scalar),
                                                plan, softcap=softcap))


linear_logprobs_op = torch.library.custom_op("rlkernels::linear_logprobs", _linear_forward, mutates_args=())


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, temp_scalar, rows, vocab_block, backend, softcap):
    n, cdt = hidden.shape[0], compute_dtype(hidden.dtype)
    return tuple(hidden.new_empty(n, dtype=cdt) for _ in range(5))


def _linear_backward_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                          temperature: Optional[Tensor], temp_scalar: float, rows: int, vocab_block: int,
                          backend: str, softcap: float, m: Tensor, log_s: Tensor, cs: Tensor,
                          g_logp: Optional[Tensor], g_ent: Optional[Tensor], need_h: bool, need_w: bool,
                          need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    plan = ChunkPlan(rows, vocab_block, weight.shape[0])
    gh, gw, gb = _engine(backend).linear_backward(hidden, weight, bias, labels,
                                                  _temperature(temperature, temp_scalar), plan, m, log_s, cs,
                                                  g_logp, g_ent, need_h, need_w, need_b and bias is not None,
                                                  softcap=softcap)
    return _or_empty(gh, hidden), _or_empty(gw, weight), _or_empty(gb, weight)


linear_logprobs_backward_op = torch.library.custom_op("rlkernels::linear_logprobs_backward", _linear_backward_impl,
                                                      mutates_args=())


@linear_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, temperature, temp_scalar, rows, vocab_block, backend, softcap, m, log_s, cs,
      g_logp, g_ent, need_h, need_w, need_b):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else weight.new_empty(0))


def _linear_setup(ctx, inputs, output):
    """Saves what the backward needs. ``inputs``: (hidden, weight, bias, labels, temperature, *the rest), the rest
    plain arguments that the backward takes again after them (also the tensor-parallel op's, which has more)."""
    hidden, weight, bias, labels, temperature = inputs[:5]
    _, _, m, log_s, cs = output
    ctx.save_for_backward(hidden, weight, bias, labels, temperature, m, log_s, cs)
    ctx.args = tuple(inputs[5:])
    ctx.set_materialize_grads(False)


def _linear_grads(ctx, g_logp, g_ent, backward):
    """The input gradients from ``backward``: the backward op (under torch.compile) or its implementation."""
    hidden, weight, bias, labels, temperature, m, log_s, cs = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    n_inputs = 5 + len(ctx.args)
    if (g_logp is None and g_ent is None) or not (need_h or need_w or need_b):
        return (None,) * n_inputs
    gh, gw, gb = backward(hidden, weight, bias, labels, temperature, *ctx.args, m, log_s, cs, g_logp, g_ent,
                          need_h, need_w, need_b)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None) + (None,) * (n_inputs - 3)


def _linear_backward(ctx, g_logp, g_ent, *_stats_grads):
    return _linear_grads(ctx, g_logp, g_ent, linear_logprobs_backward_op)


linear_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup)
_LINEAR_TWIN = (_linear_forward, _linear_setup, _linear_grads, _linear_backward_impl)


def linear_logprobs(engine_name: str, hidden, weight, bias, labels, temperature, plan: ChunkPlan,
                    softcap: float = 0.0):
    """(logp, entropy), differentiable w.r.t. hidden, weight and bias: the custom op under ``torch.compile``, its
    eager twin otherwise. ``softcap``: s > 0 caps the logits to s tanh(logits / s); 0 leaves them."""
    t, t_scalar = _split_temperature(temperature)
    args = (hidden, weight, bias, labels, t, t_scalar, plan.rows, plan.vocab_block, engine_name, float(softcap))
    if not torch.compiler.is_compiling():
        return _EagerTwin.apply(*args, _LINEAR_TWIN, None)
    out = linear_logprobs_op(*args)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------------
# logits -> log-probs
# ----------------------------------------------------------------------------------------------------------------
def _logits_forward(logits: Tensor, labels: Tensor, temperature: Optional[Tensor], temp_scalar: float, rows: int,
                    masked_rows: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    plan = ChunkPlan(rows, logits.shape[-1], logits.shape[-1])
    return _own(_engine(backend).logits_forward(logits, labels, _temperature(temperature, temp_scalar), plan,
                                                masked_rows))


logits_logprobs_op = torch.library.custom_op("rlkernels::logits_logprobs", _logits_forward, mutates_args=())


@logits_logprobs_op.register_fake
def _(logits, labels, temperature, temp_scalar, rows, masked_rows, backend):
    n, cdt = labels.shape[0], compute_dtype(logits.dtype)
    return tuple(logits.new_empty(n, dtype=cdt) for _ in range(5))


def _logits_backward_impl(logits: Tensor, labels: Tensor, temperature: Optional[Tensor], temp_scalar: float,
                          rows: int, masked_rows: bool, backend: str, m: Tensor, log_s: Tensor, cs: Tensor,
                          g_logp: Optional[Tensor], g_ent: Optional[Tensor]) -> Tensor:
    plan = ChunkPlan(rows, logits.shape[-1], logits.shape[-1])
    return _engine(backend).logits_backward(logits, labels, _temperature(temperature, temp_scalar), plan,
                                            masked_rows, m, log_s, cs, g_logp, g_ent)


logits_logprobs_backward_op = torch.library.custom_op("rlkernels::logits_logprobs_backward", _logits_backward_impl,
                                                      mutates_args=())


@logits_logprobs_backward_op.register_fake
def _(logits, labels, temperature, temp_scalar, rows, masked_rows, backend, m, log_s, cs, g_logp, g_ent):
    return logits.new_empty(logits.shape)  # row-major, as every engine returns it


def _logits_setup(ctx, inputs, output):
    logits, labels, temperature, temp_scalar, rows, masked_rows, backend = inputs
    _, _, m, log_s, cs = output
    ctx.save_for_backward(logits, labels, temperature, m, log_s, cs)
    ctx.args = (temp_scalar, rows, masked_rows, backend)
    ctx.set_materialize_grads(False)


def _logits_grads(ctx, g_logp, g_ent, backward):
    """The logits' gradient from ``backward``: the backward op (under torch.compile) or its implementation."""
    logits, labels, temperature, m, log_s, cs = ctx.saved_tensors
    if (g_logp is None and g_ent is None) or not ctx.needs_input_grad[0]:
        return (None,) * 7
    grad = backward(logits, labels, temperature, *ctx.args, m, log_s, cs, g_logp, g_ent)
    return (grad,) + (None,) * 6


def _logits_backward(ctx, g_logp, g_ent, *_stats_grads):
    return _logits_grads(ctx, g_logp, g_ent, logits_logprobs_backward_op)


logits_logprobs_op.register_autograd(_logits_backward, setup_context=_logits_setup)
_LOGITS_TWIN = (_logits_forward, _logits_setup, _logits_grads, _logits_backward_impl)


def logits_logprobs(engine_name: str, logits, labels, temperature, plan: ChunkPlan, masked_rows: bool,
                    late_check=None):
    """(logp, entropy), differentiable w.r.t. logits: the custom op under ``torch.compile`` (no value checks run
    there), its eager twin otherwise, whose backward raises from ``late_check`` once its kernel is queued."""
    return prepare_logits_logprobs(engine_name, logits, labels, temperature, plan, masked_rows, late_check)()


def prepare_logits_logprobs(engine_name: str, logits, labels, temperature, plan: ChunkPlan, masked_rows: bool,
                            late_check=None, engine=None) -> Callable[[], Tuple[Tensor, Tensor]]:
    """:func:`logits_logprobs` in two steps: the engine's preparation now (:meth:`Engine.prepare_logits_forward`),
    and a function that queues its kernel and makes the autograd node around the outputs. ``engine``: the engine
    named ``engine_name``, when the caller has it."""
    t, t_scalar = _split_temperature(temperature)
    args = (logits, labels, t, t_scalar, plan.rows, masked_rows, engine_name)
    if torch.compiler.is_compiling():
        def traced():
            out = logits_logprobs_op(*args)
            return out[0], out[1]

        return traced
    # eager: the engine's kernel is queued before the autograd node is made around its outputs, so that the
    # autograd.Function's host work runs while the GPU computes instead of before it starts (the logits op's forward
    # is one kernel: the GPU idles until its launch)
    with torch.no_grad():
        forward = (engine or _engine(engine_name)).prepare_logits_forward(logits, labels, temperature, plan,
                                                                          masked_rows)

    def start():
        with torch.no_grad():
            out = forward()
        out = _own(out[:2]) + tuple(out[2:])  # the saved statistics are never returned: they may share a buffer
        return _EagerTwin.apply(*args, (lambda *_: out,) + _LOGITS_TWIN[1:], late_check)

    return start


# ----------------------------------------------------------------------------------------------------------------
# single pass (eager mode; under torch.compile: rlkernels._single_pass)
# ----------------------------------------------------------------------------------------------------------------
def scale_by_upstream(g: Tensor, g_loss: Tensor, in_place: bool) -> Tensor:
    """``g * g_loss`` in ``g``'s dtype, the product formed in ``g_loss``'s precision: the single pass's saved gradient
    ``g`` times the loss's upstream gradient ``g_loss`` (0-dim), in place (eager) or out of place (a compiled graph).

    ``g_loss`` is never rounded to ``g``'s dtype first: an fp16 gradient and GradScaler's default scale 65536 would
    give inf, and a bf16 one and a scale of 1/3 every gradient 0.2% too large (0.333984). A 0-dim tensor takes no part
    in type promotion, and a CUDA kernel reads it in the result's dtype (the rounding, seen on an H100); only a CPU
    kernel reads it as a scalar in its compute precision. So on other devices, for fp16/bf16 ``g``, it enters as a
    1-element tensor: the product's dtype is ``g_loss``'s, and the in-place form stores it in ``g``'s dtype from the
    kernel's loop (a CUDA kernel casts as it goes: no copy of ``g``)."""
    if g.device.type == "cpu" or g.dtype not in (torch.float16, torch.bfloat16):
        return g.mul_(g_loss) if in_place else g * g_loss
    factor = g_loss.reshape(1)
    return g.mul_(factor) if in_place else (g * factor).to(g.dtype)


class LinearFusedLoss(torch.autograd.Function):
    """(hidden, weight, bias, labels, temperature) -> (loss, logp, entropy) with the gradients formed in the forward
    pass by ``engine.linear_fused``; backward scales them by ``grad_output``. ``logp``/``entropy`` are detached."""

    @staticmethod
    def forward(ctx, engine, hidden, weight, bias, labels, temperature, plan: ChunkPlan, chunk_loss, softcap):
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        loss, logp, ent, gh, gw, gb = engine.linear_fused(hidden, weight, bias, labels, temperature, plan,
                                                          chunk_loss, need_h, need_w, need_b, softcap=softcap)
        ctx.grads = (gh, gw, gb)
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        if ctx.grads is None:
            raise RuntimeError("the single-pass loss keeps its gradients for one backward only; call "
                               "fused_grpo_loss(..., single_pass=False) to backward through it twice")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        # in place: a copy of grad_weight costs a pass over V x H (43 ms at V=32000, H=1024 on the 2-core CPU)
        scale = lambda g: None if g is None else scale_by_upstream(g, g_loss, in_place=True)  # noqa: E731
        return None, scale(gh), scale(gw), scale(gb), None, None, None, None, None
