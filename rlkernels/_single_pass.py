"""``fused_grpo_loss``'s single pass under ``torch.compile``: a ``torch.library`` custom op that carries the objective
as data.

In eager mode the single pass (3 GEMMs: gradients formed in the forward pass, LOSSES.md / DESIGN.md) is an
``autograd.Function`` whose forward calls the objective, a Python closure, on each row chunk. A custom op's schema
carries no closure, so under ``torch.compile`` the objective travels as what builds it: the config
(:func:`rlkernels.config.config_to_op_args`) and the per-token tensors of the batch and the step constants
(:class:`~rlkernels.objective.TokenBatch`, :class:`~rlkernels.objective.Prepared`). The op rebuilds the closure and
runs the same ``engine.linear_fused``, opaque to the compiler; its fake implementation gives the output shapes. For
sequence-level ratios (GSPO, LUSPO) it plans row chunks of whole sequences itself: from the shape for a padded batch
(every row is computed under compile, so each sequence has T rows), from the data for a packed one (a host sync the
compiler does not see). That second form is a separate op tagged ``cudagraph_unsafe``, so that
``torch.compile(mode="reduce-overhead")`` leaves it out of its CUDA graphs instead of failing in their capture. On a
vocab-sharded LM head (``tp_group``) the op runs the engine wrapped as in eager mode
(:class:`rlkernels.distributed._TPFusedEngine`: each row chunk's statistics merged across the group), the group
passed by name.

Backward scales the gradients saved by the forward pass by ``grad_output``, written out of place as a compiled graph
wants it. Inductor then reuses the saved buffers (its generated backward multiplies in place: seen in its output code
on the CPU), as the eager single pass does by hand; the ``aot_eager`` backend holds grad_weight twice for a moment.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import fields
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .config import PolicyLossConfig, config_from_op_args, config_to_op_args
from .engines import load_engine
from .engines.autograd import _or_empty, _split_temperature, scale_by_upstream
from .engines.chunking import MIN_VOCAB_BLOCK, VOCAB_MULTIPLE, ChunkPlan, sequence_aligned
from .engines.torch_engine import compute_dtype
from .objective import ChunkObjective, Prepared, TokenBatch

# the per-token tensors of TokenBatch and Prepared that travel as the op's ``tokens`` list, in this order
# (TokenBatch.normalizer is left out: only ``prepare`` reads it, and the step constants are already made)
_BATCH_TENSORS = ("mask", "seq_ids", "advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs", "is_weights")
_PREP_TENSORS = tuple(f.name for f in fields(Prepared))


# the private dispatcher API _autograd_inside_op needs (torch >= 1.13 has it); without it, fused_grpo_loss takes the
# two-stage path under compile, as before this op existed
AVAILABLE = all(hasattr(torch._C, name) for name in (
    "_ForceDispatchKeyGuard", "_dispatch_tls_local_exclude_set", "_dispatch_tls_local_include_set")) and all(
    hasattr(torch._C.DispatchKey, key) for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"))


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd back on inside a custom op's implementation, which the dispatcher runs with the autograd keys
    excluded (every tensor made there would come out without a graph, and the engine's per-chunk
    ``torch.autograd.grad`` of the objective would see none): the objective's gradients w.r.t. a chunk's log-probs
    and entropies are taken as in eager mode."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch.enable_grad(), torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


def _linear_fused_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                       temperature: Optional[Tensor], temp_scalar: float, rows: int, vocab_block: int,
                       backend: str, need_h: bool, need_w: bool, need_b: bool, cfg_strs: str,
                       cfg_nums: List[float], cfg_nones: List[bool], tokens: List[Optional[Tensor]],
                       num_seqs: int, seq_rows: int, softcap: float, group_name: str, vocab_offset: int,
                       reduce_hidden_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, logp, entropy, grad_hidden, grad_weight, grad_bias) of ``engine.linear_fused``; a gradient that is
    not needed comes back empty. ``seq_rows``: 0, plain row chunks (a token-separable objective); else chunks that
    end at sequence boundaries, planned here: ``seq_rows`` > 0 rows in every sequence (a padded batch: nothing
    read), -1 the lengths read from the batch's ``seq_ids`` (one host sync: the tagged op only). ``group_name``: ""
    for a whole LM head; else the process group (by name: a schema carries no ProcessGroup) over which ``weight``
    is this rank's vocabulary shard from row ``vocab_offset`` on: each row chunk's statistics are merged across it
    (:class:`rlkernels.distributed._TPFusedEngine`, as in eager mode) and grad_hidden all-reduced unless
    ``reduce_hidden_grad`` is False."""
    cfg = config_from_op_args(cfg_strs, cfg_nums, cfg_nones)
    k = len(_BATCH_TENSORS)
    batch = TokenBatch(num_seqs=num_seqs, **dict(zip(_BATCH_TENSORS, tokens[:k])))
    prep = Prepared(**dict(zip(_PREP_TENSORS, tokens[k:])))

    chunk_loss = ChunkObjective(batch, prep, cfg)
    plan = ChunkPlan(rows, vocab_block, weight.shape[0])
    if seq_rows != 0:
        plan = _whole_sequence_plan(plan, batch.seq_ids, num_seqs, (seq_rows,) * num_seqs if seq_rows > 0 else None)
    t = temperature if temperature is not None else temp_scalar
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    engine = load_engine(backend)
    if group_name:
        from .distributed import _resolve, _TPFusedEngine

        engine = _TPFusedEngine(engine, _resolve(group_name), vocab_offset, reduce_hidden_grad, check_shards=True)
    with _autograd_inside_op():
        loss, logp, ent, gh, gw, gb = engine.linear_fused(
            hidden.detach(), weight.detach(), detach(bias), labels, t, plan, chunk_loss, need_h, need_w, need_b,
            softcap=softcap)
    return loss, logp, ent, _or_empty(gh, hidden), _or_empty(gw, weight), _or_empty(gb, weight)


def _whole_sequence_plan(plan: ChunkPlan, seq_ids: Tensor, num_seqs: int,
                         lengths: Optional[Tuple[int, ...]] = None) -> ChunkPlan:
    """Row chunks of whole sequences: as many as fit in ``plan.rows`` rows, or, when one sequence is longer than
    that, chunks of the longest sequence's rows over vocabulary blocks cut to keep the block within the same budget.
    Such a chunk computes its statistics, then recomputes each block for the gradients: 4 GEMMs, what the two-stage
    path costs, where eager mode takes that path. ``lengths``: each sequence's rows, when known without reading the
    device; else ``seq_ids`` is read (one host sync, inside the op where the compiler does not see it)."""
    aligned, longest = sequence_aligned(plan, seq_ids, num_seqs, lengths)
    if aligned is None and longest > plan.rows:
        vocab_block = plan.rows * plan.vocab_block // longest
        vocab_block = max(MIN_VOCAB_BLOCK, vocab_block - vocab_block % VOCAB_MULTIPLE)
        aligned, _ = sequence_aligned(ChunkPlan(longest, min(vocab_block, plan.vocab), plan.vocab), seq_ids,
                                      num_seqs, lengths)
    if aligned is None:
        raise RuntimeError("internal: the rows of each sequence are not contiguous")
    return aligned


def _fake(hidden, weight, bias, labels, temperature, temp_scalar, rows, vocab_block, backend, need_h, need_w, need_b,
          cfg_strs, cfg_nums, cfg_nones, tokens, num_seqs, seq_rows, softcap, group_name, vocab_offset,
          reduce_hidden_grad):
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty((), dtype=cdt), hidden.new_empty(n, dtype=cdt), hidden.new_empty(n, dtype=cdt),
            torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else weight.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])  # the gradients
    ctx.need = inputs[9:12]  # need_h, need_w, need_b
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, g_loss, *_unused):
    scale = lambda g, need: scale_by_upstream(g, g_loss, in_place=False) if need else None  # noqa: E731
    gh, gw, gb = (scale(g, need) for g, need in zip(ctx.saved_tensors, ctx.need))
    return (gh, gw, gb) + (None,) * 19


def _register(name: str, tags=()):
    op = torch.library.custom_op(name, mutates_args=(), **({"tags": tags} if tags else {}))(_linear_fused_loss)
    op.register_fake(_fake)
    op.register_autograd(_backward, setup_context=_setup)
    return op


# the op that reads a packed batch's sequence lengths syncs with the host: tagged so that inductor keeps it out of
# CUDA graphs (a capture would fail at the read); the tag and custom_op's tags argument are in torch >= 2.8
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_HAS_TAGS = "tags" in inspect.signature(torch.library.custom_op).parameters
linear_fused_loss_op = _register("rlkernels::linear_fused_loss")
linear_fused_loss_read_op = _register("rlkernels::linear_fused_loss_read_lengths",
                                      (_CUDAGRAPH_UNSAFE,) if _CUDAGRAPH_UNSAFE is not None and _HAS_TAGS else ())


def compiled_linear_fused_loss(engine_name: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                               labels: Tensor, temperature, plan: ChunkPlan, batch: TokenBatch, prep: Prepared,
                               cfg: PolicyLossConfig, softcap: float = 0.0, seq_rows: int = -1, tp_group=None,
                               vocab_offset: int = 0, reduce_hidden_grad: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, logp, entropy) of the single pass through the custom op: ``loss`` differentiable w.r.t. hidden, weight
    and bias; ``logp``/``entropy`` detached. ``batch``/``prep`` cover the rows of ``hidden``; ``cfg`` is
    sequence-separable (token-separable ones included), and the op cuts the row chunks at sequence boundaries
    where it is not token-separable: from ``seq_rows`` rows per sequence (a padded batch), or, with -1, from the
    batch's ``seq_ids`` (the op that reads them). ``tp_group``: ``weight`` is this rank's vocabulary shard from row
    ``vocab_offset`` on (every rank takes the same chunks: its inputs are the others', all but the LM head)."""
    if plan.bounds is not None or not cfg.sequence_separable:
        raise RuntimeError("internal: the compiled single pass takes sequence-separable objectives, plain chunks")
    t, t_scalar = _split_temperature(temperature)
    need_b = bias is not None and bias.requires_grad
    tokens = [getattr(batch, name) for name in _BATCH_TENSORS] + [getattr(prep, name) for name in _PREP_TENSORS]
    seq_rows = 0 if cfg.token_separable else seq_rows
    op = linear_fused_loss_read_op if seq_rows < 0 else linear_fused_loss_op
    out = op(hidden, weight, bias, labels, t, t_scalar, plan.rows, plan.vocab_block, engine_name,
             hidden.requires_grad, weight.requires_grad, need_b, *config_to_op_args(cfg), tokens,
             batch.num_seqs, seq_rows, float(softcap), "" if tp_group is None else tp_group.group_name, vocab_offset,
             reduce_hidden_grad)
    return out[0], out[1], out[2]
