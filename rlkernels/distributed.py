"""Scale-out on ``torch.distributed``: a vocab-parallel (tensor-parallel) LM head, and the exact data-parallel
normaliser.

Tensor parallelism: rank ``r`` of a group of ``W`` holds rows ``[r*V/W, (r+1)*V/W)`` of the LM head (``weight`` and
``bias``); hidden states are replicated and labels are global token ids. Each rank runs its engine on its shard,
producing the online log-sum-exp state (M, S, C) of LOSSES.md B §1.2; the states merge with one MAX and one SUM
all-reduce, the label logit coming from the shard that owns it. Every rank gets the full ``logp`` and ``entropy``.
dL/dz for the local shard is formed from the merged statistics (in backward on the two-stage path; per row chunk,
right after that chunk's merge, in the single pass), so ``grad_weight``/``grad_bias`` are this rank's shard, and
``grad_hidden`` (a partial sum over shards) is all-reduced unless ``reduce_hidden_grad=False``. The single pass
merges once per row chunk, so every rank must take it over the same chunks: the call checks that the ranks agree on
the kept rows, and fused_grpo_loss on the single pass and its chunks (sequence-aligned ones included), before anything
is computed. Under torch.compile, which traces no host read, those agreements are skipped (the ranks, given the same
inputs, plan the same chunks), and the work runs in custom ops, the group passed by name and its collectives eager
calls inside them: ``rlkernels::tp_linear_logprobs`` for the log-probs (and the two-stage loss), the single pass's
``rlkernels::linear_fused_loss`` (:mod:`rlkernels._single_pass`) with :class:`_TPFusedEngine` inside. There the shard
sizes are checked inside the ops: each rank's row count rides on the first merge's MAX all-reduce (no collective of
its own) and is read back once the op's work is queued (a :class:`rlkernels._checks.LateCheck`), so that uneven
shards raise on every rank instead of giving wrong offsets; ``RLKERNELS_CHECK_VALUES=0`` skips that read.

Data parallelism: DDP/FSDP average gradients over ranks and gradient accumulation sums micro-batches, so the exact
gradient of the global token mean needs each micro-batch loss divided by (global token count / world size)
(LOSSES.md B §6). :func:`global_normalizer` returns that value for ``normalizer=``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks as C
from .config import LOSS_AGGS, PolicyLossConfig, resolve_config
from .engines import load_engine
from .engines.autograd import (_EagerTwin, _linear_grads, _linear_setup, _or_empty, _own, _split_temperature,
                               _temperature)
from .engines.chunking import ChunkPlan
from .engines.torch_engine import compute_dtype, finish_stats

__all__ = ["global_normalizer", "tp_linear_logprobs", "tp_linear_fused_loss", "shard_offset", "merge_shards"]


def _require_initialized(name: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{name} needs torch.distributed to be initialised (dist.init_process_group)")


def agree(group, error: Optional[BaseException], what: str, same: Optional[Dict[str, int]] = None) -> None:
    """Every rank learns whether any rank failed ``what``: the failing rank re-raises its error, the others raise a
    RuntimeError naming it, so that no rank is left waiting in a collective that will never come. ``same``: integers
    that must be equal on every rank (the same names on all of them; a failing rank's values are ignored), checked
    in the same all-reduce: if they differ, every rank raises a ValueError naming them."""
    names = list(same or {})
    values = [float((same or {})[k]) for k in names]
    flag = torch.tensor([0.0 if error is None else float(dist.get_rank(group) + 1), *values, *(-v for v in values)],
                        dtype=torch.float64)
    flag = flag.to(_collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    reduced = flag.tolist()
    if reduced[0] > 0:
        raise RuntimeError(f"rank {int(reduced[0]) - 1} of the process group rejected its inputs to {what}; see "
                           "that rank's error")
    n = len(names)
    differ = [f"{k} {int(-reduced[1 + n + i])}..{int(reduced[1 + i])}" for i, k in enumerate(names)
              if reduced[1 + i] != -reduced[1 + n + i]]
    if differ:
        raise ValueError(f"{what}: the ranks of the group disagree on {', '.join(differ)}; give every rank the same "
                         "inputs (mask, labels, hidden states), chunk_size and RLKERNELS_MEMORY_BUDGET_MB")


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def shard_offset(weight: Tensor, tp_group, check: bool = True) -> Tuple[int, int]:
    """(offset of this rank's first vocabulary row, full vocabulary size V), checking that every rank holds the
    same number of rows (V divisible by the group size). ``check=False`` (under torch.compile, which traces no
    host read): no collective here; the custom ops check the sizes in their first merge instead."""
    _require_initialized("tp_group")
    world, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if not check:
        return rank * weight.shape[0], weight.shape[0] * world
    local = torch.tensor([weight.shape[0]], dtype=torch.long, device=_collective_device(tp_group))
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=tp_group)
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(_uneven_shards(str(sizes), world))
    return rank * sizes[0], sizes[0] * world


def _uneven_shards(sizes: str, world: int) -> str:
    return (f"tp_group: the ranks hold LM-head shards of {sizes} rows; each rank must hold V/W rows (the vocabulary "
            f"must be divisible by the group size {world})")


def merge_shards(group, m: Tensor, s: Tensor, c: Tensor, zy: Tensor, owned: Tensor,
                 sizes_check: Optional[C.LateCheck] = None, shard_rows: int = 0):
    """The online log-sum-exp state (M, S, C) and label logit z~_y of rows over the whole vocabulary, from this
    shard's (``c`` relative to ``m``; ``zy`` counts only where ``owned``: the label lies in this shard): one MAX
    and one SUM all-reduce over ``group``. ``sizes_check``: a LateCheck armed here to fail unless every rank's
    ``shard_rows`` (its LM-head rows) is the same, the largest and the negated smallest riding on the MAX
    all-reduce."""
    if sizes_check is None:
        big_m = m.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    else:  # filled, not copied from the host (a stream sync on a GPU); exact in fp32 for shards below 2**24 rows
        n = m.shape[0]
        big_m = m.new_empty(n + 2)
        big_m[:n].copy_(m)
        big_m[n].fill_(shard_rows)
        big_m[n + 1].fill_(-shard_rows)
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
        big_m, extremes = big_m[:n], big_m[n:]

        def message() -> str:
            hi, neg_lo = extremes.tolist()
            return _uneven_shards(f"{int(-neg_lo)} to {int(hi)}", dist.get_world_size(group))

        sizes_check.arm((extremes,), lambda e: e[0] != -e[1], message)
    # rebase this shard's (S, C), taken relative to its own max m, onto the global max M (B §1.2)
    scale = torch.exp(m - big_m)
    parts = torch.stack([scale * s, scale * (c + (m - big_m) * s), torch.where(owned, zy, torch.zeros_like(zy))])
    dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=group)
    s, c, zy = parts.unbind(0)
    return big_m, s, c, zy


def _owned(labels: Tensor, offset: int, v_local: int) -> Tensor:
    return (labels >= offset) & (labels < offset + v_local)


# The vocab-sharded log-probs as a custom op (under torch.compile; opaque to the compiler, its collectives eager calls
# inside it) and, in eager mode, as that op's eager twin (rlkernels.engines.autograd._EagerTwin), with the context
# setup and gradients of the unsharded op. The group travels by name: an op schema carries no ProcessGroup.
def _resolve(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _tp_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                temperature: Optional[Tensor], temp_scalar: float, rows: int, vocab_block: int, backend: str,
                softcap: float, group_name: str, offset: int, reduce_hidden_grad: bool,
                check_shards: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logp, entropy, M, log S, C/S) over the full vocabulary: this shard's statistics, merged across the group.
    ``check_shards``: check in the merge that every rank holds as many rows (the op under torch.compile; the eager
    twin's call has checked them before)."""
    plan = ChunkPlan(rows, vocab_block, weight.shape[0])
    logp_l, _, m, log_s, cs = load_engine(backend).linear_forward(
        hidden, weight, bias, labels, _temperature(temperature, temp_scalar), plan, vocab_offset=offset,
        softcap=softcap)
    s_local = torch.exp(log_s)
    sizes = C.LateCheck() if check_shards and C.value_checks_enabled() else None
    big_m, s, c, zy = merge_shards(_resolve(group_name), m, s_local, cs * s_local, logp_l + (m + log_s),
                                   _owned(labels, offset, weight.shape[0]), sizes, weight.shape[0])
    log_s_g, cs_g, logp, ent = finish_stats(big_m, s, c, zy)
    if sizes is not None:
        sizes.raise_if_failed()
    return _own((logp, ent, big_m, log_s_g, cs_g))


def _tp_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                 temperature: Optional[Tensor], temp_scalar: float, rows: int, vocab_block: int, backend: str,
                 softcap: float, group_name: str, offset: int, reduce_hidden_grad: bool, check_shards: bool,
                 m: Tensor, log_s: Tensor,
                 cs: Tensor, g_logp: Optional[Tensor], g_ent: Optional[Tensor], need_h: bool, need_w: bool,
                 need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """This shard's (grad_hidden, grad_weight, grad_bias), empty where not needed: dL/dz of the local shard from the
    merged statistics (p_v = exp(z~_v - lse), z~ - mu = (z~ - M) - C/S); grad_hidden, a partial sum over the shards,
    all-reduced unless not asked."""
    plan = ChunkPlan(rows, vocab_block, weight.shape[0])
    gh, gw, gb = load_engine(backend).linear_backward(
        hidden, weight, bias, labels, _temperature(temperature, temp_scalar), plan, m, log_s, cs, g_logp, g_ent,
        need_h, need_w, need_b and bias is not None, vocab_offset=offset, softcap=softcap)
    if gh is not None and reduce_hidden_grad:
        dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=_resolve(group_name))
    return _or_empty(gh, hidden), _or_empty(gw, weight), _or_empty(gb, weight)


tp_linear_logprobs_op = torch.library.custom_op("rlkernels::tp_linear_logprobs", _tp_forward, mutates_args=())
tp_linear_logprobs_backward_op = torch.library.custom_op("rlkernels::tp_linear_logprobs_backward", _tp_backward,
                                                         mutates_args=())


@tp_linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, temp_scalar, rows, vocab_block, backend, softcap, group_name,
      offset, reduce_hidden_grad, check_shards):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=compute_dtype(hidden.dtype)) for _ in range(5))


@tp_linear_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, temperature, temp_scalar, rows, vocab_block, backend, softcap, group_name,
      offset, reduce_hidden_grad, check_shards, m, log_s, cs, g_logp, g_ent, need_h, need_w, need_b):
    return (torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else weight.new_empty(0),
            torch.empty_like(bias) if (need_b and bias is not None) else weight.new_empty(0))


def _tp_op_backward(ctx, g_logp, g_ent, *_stats_grads):
    return _linear_grads(ctx, g_logp, g_ent, tp_linear_logprobs_backward_op)


tp_linear_logprobs_op.register_autograd(_tp_op_backward, setup_context=_linear_setup)
_TP_TWIN = (_tp_forward, _linear_setup, _linear_grads, _tp_backward)


def tp_linear_logprobs(engine, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature,
                       plan, group, offset: int, reduce_hidden_grad: bool = True,
                       softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    """(logp, entropy) over the full vocabulary from this rank's shard of the LM head (flat inputs); ``softcap`` caps
    each shard's logits (an elementwise map: the shards' statistics merge as without it). The custom op
    ``rlkernels::tp_linear_logprobs`` under torch.compile, its eager twin otherwise."""
    t, t_scalar = _split_temperature(temperature)
    args = (hidden, weight, bias, labels, t, t_scalar, plan.rows, plan.vocab_block, engine.name, float(softcap),
            group.group_name, offset, reduce_hidden_grad)
    if not torch.compiler.is_compiling():  # the eager call has checked the shard sizes
        return _EagerTwin.apply(*args, False, _TP_TWIN, None)
    out = tp_linear_logprobs_op(*args, True)
    return out[0], out[1]


class _TPFusedEngine:
    """The single pass on a vocab-sharded LM head, for :class:`rlkernels.engines.autograd.LinearFusedLoss`: each row
    chunk's statistics are merged across the group before the objective and dL/dz (two small all-reduces per
    chunk), so every rank forms the exact gradients of its shard; grad_hidden, a partial sum, is all-reduced once.
    ``check_shards``: the first merge checks that every rank holds as many rows, read back once all the chunks are
    queued (under torch.compile, whose traced call checked nothing)."""

    def __init__(self, engine, group, offset: int, reduce_hidden_grad: bool, check_shards: bool = False):
        self.engine, self.group, self.offset, self.reduce_hidden_grad = engine, group, offset, reduce_hidden_grad
        self.check_shards = check_shards

    def linear_fused(self, hidden, weight, bias, labels, temperature, plan, chunk_loss, need_h, need_w, need_b,
                     softcap: float = 0.0):
        v_local = weight.shape[0]
        sizes = C.LateCheck() if self.check_shards and C.value_checks_enabled() else None
        unarmed = [sizes]  # the first chunk's merge carries the check

        def merge(r0, r1, m, s, c, zy):
            check = unarmed.pop() if unarmed else None
            return merge_shards(self.group, m, s, c, zy, _owned(labels[r0:r1], self.offset, v_local), check, v_local)

        out = self.engine.linear_fused(hidden, weight, bias, labels, temperature, plan, chunk_loss, need_h, need_w,
                                       need_b, vocab_offset=self.offset, merge=merge, softcap=softcap)
        if sizes is not None:
            sizes.raise_if_failed()
        gh = out[3]
        if gh is not None and self.reduce_hidden_grad:
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=self.group)
        return out


def tp_linear_fused_loss(engine, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature,
                         plan, chunk_loss, group, offset: int, reduce_hidden_grad: bool = True, softcap: float = 0.0):
    """(loss, logp, entropy) of the single pass (3 GEMMs) from this rank's shard of the LM head (flat inputs):
    every rank gets the loss of the full vocabulary, its shard's grad_weight / grad_bias and the full grad_hidden
    (or its partial sum with ``reduce_hidden_grad=False``)."""
    from .engines.autograd import LinearFusedLoss

    return LinearFusedLoss.apply(_TPFusedEngine(engine, group, offset, reduce_hidden_grad), hidden, weight, bias,
                                 labels, temperature, plan, chunk_loss, softcap)


def _count(mask, mode, cu_seqlens) -> float:
    """This rank's kept tokens (token-mean) or sequences (other modes) for :func:`global_normalizer`, every argument
    checked: masks and cu_seqlens that do not pair up raise instead of counting part of the step."""
    from ._inputs import check_cu_seqlens

    if isinstance(mode, PolicyLossConfig):
        mode = mode.loss_agg
    elif mode not in LOSS_AGGS:
        mode = resolve_config(mode).loss_agg if isinstance(mode, str) else mode
    if mode not in LOSS_AGGS:
        raise ValueError(f"mode={mode!r}: a loss_agg ({LOSS_AGGS}), a preset name or a PolicyLossConfig")
    if not isinstance(mask, (Tensor, list, tuple)):
        raise TypeError(f"mask must be a torch.Tensor or a list of them, got {type(mask).__name__}")
    if cu_seqlens is not None and not isinstance(cu_seqlens, (Tensor, list, tuple)):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or a list of them, got {type(cu_seqlens).__name__}")
    masks = [mask] if isinstance(mask, Tensor) else list(mask)
    seqs = [None] * len(masks) if cu_seqlens is None else (
        [cu_seqlens] if isinstance(cu_seqlens, Tensor) else list(cu_seqlens))
    for i, m in enumerate(masks):
        if not isinstance(m, Tensor):
            raise TypeError(f"mask {i} must be a torch.Tensor, got {type(m).__name__}")
        if m.dim() not in (1, 2):
            raise ValueError(f"mask {i} has shape {tuple(m.shape)}; expected (B, T) or packed (N,)")
    for i, cu in enumerate(seqs):
        if cu is not None and not isinstance(cu, Tensor):
            raise TypeError(f"cu_seqlens {i} must be a torch.Tensor (one per mask), got {type(cu).__name__}")
    if len(seqs) != len(masks):
        raise ValueError(f"cu_seqlens: got {len(seqs)} for {len(masks)} mask(s); pass one per micro-batch mask")
    count = 0
    for i, (m, cu) in enumerate(zip(masks, seqs)):
        if cu is not None:
            if m.dim() != 1:
                raise ValueError(f"cu_seqlens {i} is for a packed (N,) mask; mask {i} has shape {tuple(m.shape)}")
            check_cu_seqlens(f"cu_seqlens {i}", cu, m.numel(), f"mask {i}'s length")
        if mode == "token-mean":
            count += int((m != 0).sum())
        elif m.dim() == 2:
            count += m.shape[0]
        elif cu is None:
            raise ValueError(f"global_normalizer: packed (1-D) mask {i} needs its cu_seqlens to count sequences")
        else:
            count += cu.numel() - 1
    return float(count)


def global_normalizer(mask: Union[Tensor, Sequence[Tensor]], group=None,
                      mode: Union[str, PolicyLossConfig] = "token-mean",
                      cu_seqlens: Optional[Union[Tensor, Sequence[Tensor]]] = None) -> float:
    """The ``normalizer=`` that makes DDP/FSDP gradient averaging plus gradient accumulation give exactly the
    gradient of the global loss (LOSSES.md B §6).

    Args:
        mask: this rank's loss masks for the whole optimiser step: one ``(B, T)``/``(N,)`` tensor, or a list with one
            per micro-batch.
        group: the data-parallel process group (None: the default group; 1 rank when not initialised).
        mode: ``"token-mean"`` (divide by the global kept-token count) or a sequence mode (divide by the global number
            of sequences, empty ones included); a PolicyLossConfig or preset name gives its ``loss_agg``.
        cu_seqlens: for packed masks, the sequence boundaries, one per mask (a list as long as ``mask``'s), each
            starting at 0 and ending at its mask's length; needed to count sequences of packed masks.

    Raises: ValueError / TypeError naming the mask or cu_seqlens that does not fit (on every rank of ``group``:
    the others raise RuntimeError naming the failing rank, none is left waiting in the all-reduce).

    Returns: ``global count / world size`` as a float: pass it as ``normalizer=`` to every micro-batch's loss.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return max(_count(mask, mode, cu_seqlens), 1.0)
    error, local = None, 0.0
    try:
        local = _count(mask, mode, cu_seqlens)
    except (ValueError, TypeError) as exc:
        error = exc
    agree(group, error, "global_normalizer")  # a rank with bad input must not leave the others in the all-reduce
    total = torch.tensor([local], dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    world = dist.get_world_size(group)
    # an all-empty step: keep the loss 0 (not 0/0); the normaliser only has to be positive
    return max(float(total.item()), 1.0) / world
