"""The public functions: per-token log-probs from hidden states or logits, and the fused policy loss.

Each checks its inputs (:mod:`rlkernels._inputs`), picks an engine (:mod:`rlkernels.engines`), gathers the rows the
mask keeps so that padding costs nothing, and hands the engine's per-token ``logp``/``entropy`` to the objective
(:mod:`rlkernels.objective`).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _checks as C
from . import _inputs as I
from ._single_pass import AVAILABLE as _COMPILED_SINGLE_PASS
from ._single_pass import compiled_linear_fused_loss
from .config import PolicyLossConfig, resolve_config
from .engines import plan_chunks, resolve_backend
from .engines.chunking import ChunkPlan, sequence_aligned
from .engines.torch_engine import compute_dtype
from .objective import (ChunkObjective, LossOutput, is_sequence_separable, is_token_separable, policy_loss_flat,
                        prepare)

Temperature = Union[float, Tensor]


def _scatter_rows(values: Tensor, index: Optional[Tensor], n: int, computed: Optional[Tensor] = None) -> Tensor:
    """values for the kept rows -> (n,) with zeros at dropped rows (differentiable). ``computed``: the dropped rows
    were computed anyway (neutralised, under torch.compile or a CUDA graph capture); this (n,) keep mask zeroes them,
    as eager does."""
    if computed is not None:
        return torch.where(computed, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if index is None:
        return values
    return values.new_zeros(n).index_copy(0, index, values)


def _kept_index(keep: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """The indices of the kept rows for :func:`_kept_rows`, or None: no ``mask``, every row kept, or nothing may be
    read back (torch.compile, a CUDA graph capture). One host sync (the count is data): it waits for every kernel
    queued before it, so a call asks it before it queues its value checks' reductions."""
    if mask is None or C.no_host_reads():
        return None
    return I.kept_index(keep)


def _kept_rows(x2d: Tensor, y: Tensor, temperature, keep: Tensor, mask: Optional[Tensor], index: Optional[Tensor]):
    """The rows an engine computes: the kept ones (``index``, from :func:`_kept_index`) gathered with their
    per-token temperatures, or, under torch.compile or a CUDA graph capture (no data-dependent gather), all of them
    with the dropped ones neutralised. -> (x2d, y, temperature, index of the kept rows or None, keep mask of
    neutralised rows or None). Without a ``mask`` every row is kept: nothing to gather, and no host sync to find
    that out."""
    if mask is None:
        return x2d, y, temperature, None, None
    if C.no_host_reads():  # the kept rows' count cannot be read back
        x2d, y = I.neutralise_rows(x2d, y, keep)
        return x2d, y, temperature, None, keep.reshape(-1)
    if index is None:
        return x2d, y, temperature, None, None
    if isinstance(temperature, Tensor):
        temperature = temperature[index]
    return x2d.index_select(0, index), y[index], temperature, index, None


class _LinearCall:
    """A checked hidden+W call, flattened: the kept rows only (padding never reaches the engine), the engine, the
    chunk plan, and the tensor-parallel group and shard offset when the LM head is vocab-sharded."""

    def __init__(self, hidden, weight, labels, mask, bias, temperature, backend, chunk_size, tp_group,
                 extra_checks=None, softcap=None):
        self.softcap = I.check_softcap(softcap)  # a Python number: checked before anything else, on every rank
        hidden, weight, bias = I.autocast_linear_inputs(hidden, weight, bias)  # inside torch.autocast: its dtype
        self.tp_group, self.offset = tp_group, 0
        V = None
        if tp_group is not None and C.capturing():
            raise ValueError("tp_group: a vocab-sharded LM head cannot run in a CUDA graph capture (its shard checks "
                             "and merges are collectives, some with host reads); call this function outside it")
        # under torch.compile no collective with a host read runs: the shard sizes are taken as equal, and a rank's
        # error is raised there alone (value checks, which could differ between ranks, are skipped there anyway)
        self.agreed = tp_group is not None and not C.compiling()
        if tp_group is not None:  # a collective first, before anything that could fail on one rank only
            from .distributed import shard_offset

            self.offset, V = shard_offset(weight, tp_group, check=self.agreed)
        error = None
        try:
            self._check(hidden, weight, labels, mask, bias, temperature, backend, chunk_size, V, extra_checks)
        except (ValueError, TypeError) as exc:
            if not self.agreed:
                raise
            error = exc
        if self.agreed:
            from .distributed import agree

            # the shards' statistics are merged row by row: every rank must keep the same rows (a rank that failed
            # sends 0, ignored); fused_grpo_loss's single pass also agrees on its chunks
            agree(tp_group, error, "a tensor-parallel rlkernels call",
                  same={"kept rows": self.hidden.shape[0] if error is None else 0})

    def _check(self, hidden, weight, labels, mask, bias, temperature, backend, chunk_size, V, extra_checks):
        I.check_backend_args(backend, chunk_size)
        H, V_local = I.check_linear(hidden, weight, bias)
        self.V = V if V is not None else V_local
        self.shape = hidden.shape[:-1]
        # the value checks below: one host wait for all of them, on leaving the block, or, on an engine whose kernels
        # are safe whatever values they reject (not tensor-parallel: its ranks agree on errors first), once the
        # forward's kernels are queued (self.checks.launched): the GPU then works while the host waits
        with C.deferred_checks() as self.checks:
            self.keep = I.check_mask(mask, self.shape, hidden)
            # the kept rows' count is read back first: its sync then waits for none of the checks' reductions (the
            # weight's scan reads V x H), which the GPU runs while the host prepares the rest of the call
            index = _kept_index(self.keep, mask)
            given = None if mask is None else self.keep  # None: every position kept, nothing to mask in the checks
            labels = I.check_labels(labels, self.shape, self.V, given, hidden)
            cdt = compute_dtype(hidden.dtype)
            temperature = I.check_temperature(temperature, self.shape, given, hidden, cdt)
            self.extra = extra_checks(self.shape, self.keep, cdt) if extra_checks is not None else None
            I.check_finite_rows("hidden", hidden.reshape(-1, H), self.keep.reshape(-1))
            I.check_finite_rows("weight", weight)
            if bias is not None:
                I.check_finite_rows("bias", bias, allow_neg_inf=True)
            self.engine = resolve_backend(backend, hidden.device)
            if self.engine.safe_for_any_values and self.tp_group is None:
                self.checks.read_after_launch()
        self.weight, self.bias = weight, bias
        h2, y = hidden.reshape(-1, H), labels.reshape(-1)
        self.n = h2.shape[0]
        # padding costs nothing: only kept rows reach the engine
        h2, y, temperature, self.index, self.computed = _kept_rows(h2, y, temperature, self.keep, mask, index)
        self.hidden, self.labels, self.temperature = h2, y, temperature
        reserve = self.engine.budget_reserve(weight, weight.requires_grad and torch.is_grad_enabled())
        self.plan = plan_chunks(h2.shape[0], weight.shape[0], chunk_size, default_mb=self.engine.default_budget_mb,
                                elem_bytes=self.engine.block_elem_bytes(h2.dtype), reserve_bytes=reserve)

    def logprobs(self, reduce_hidden_grad: bool = True) -> Tuple[Tensor, Tensor]:
        """(logp, entropy) of the kept rows, differentiable."""
        if self.tp_group is not None:
            from .distributed import tp_linear_logprobs

            return tp_linear_logprobs(self.engine, self.hidden, self.weight, self.bias, self.labels,
                                      self.temperature, self.plan, self.tp_group, self.offset, reduce_hidden_grad,
                                      self.softcap)
        return self.engine.linear_logprobs(self.hidden, self.weight, self.bias, self.labels, self.temperature,
                                           self.plan, self.softcap)

    def scatter(self, values: Tensor) -> Tensor:
        """Per-kept-row values back to the caller's shape, zeros at dropped rows."""
        return _scatter_rows(values, self.index, self.n, self.computed).reshape(self.shape)


def fused_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: Temperature = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    mask: Optional[Tensor] = None,
    tp_group=None,
    reduce_hidden_grad: bool = True,
    softcap: Optional[float] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probs (and entropies) of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``,
    without ever holding the ``tokens x vocab`` logits.

    Args:
        hidden: ``(B, T, H)`` or ``(N, H)``, fp32 / bf16 / fp16 / fp64: the final hidden states.
        weight: ``(V, H)``, same dtype and device: the LM-head weight.
        labels: ``(B, T)`` or ``(N,)`` int: the token whose log-prob is wanted at each position (in a causal LM, the
            next token). Must lie in ``[0, V)`` where ``mask`` keeps the position.
        bias: optional ``(V,)`` LM-head bias (may hold ``-inf`` for banned tokens).
        temperature: float > 0 or a per-token tensor shaped like ``labels``: the sampling temperature.
        return_entropy: also return the entropy of the full softmax at each position.
        backend: ``"auto"`` (default), ``"torch"``, ... (see :func:`rlkernels.available_backends`).
        chunk_size: rows per chunk; ``None`` sizes chunks from ``RLKERNELS_MEMORY_BUDGET_MB``.
        mask: optional bool ``(B, T)`` / ``(N,)``: positions where it is False are not computed (they cost nothing)
            and return 0 with zero gradient.
        tp_group: a ``torch.distributed`` group over which the LM head is vocab-sharded: ``weight`` (and ``bias``) is
            this rank's contiguous ``V/W`` rows, labels are global ids, hidden states are replicated. Every rank gets
            the full-vocabulary ``logp``/``entropy``; ``grad_weight`` is this rank's shard. Under
            torch.compile the ranks' shard sizes and errors are not compared (host reads); in a CUDA graph capture:
            ValueError.
        reduce_hidden_grad: with ``tp_group``, all-reduce ``grad_hidden`` over the group (False leaves each rank's
            partial sum, for frameworks that reduce it themselves).
        softcap: float > 0 for a model that caps its final logits, ``softcap * tanh(logits / softcap)`` before the
            softmax and the temperature (Gemma 2 and Gemma 4: ``model.config.final_logit_softcapping``, 30.0);
            ``None`` (default) for the rest.

    Returns:
        ``logp`` shaped like ``labels``, fp32 (fp64 for fp64 inputs); with ``return_entropy``, ``(logp, entropy)``.
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    Equivalent to::

        logits = (hidden @ weight.T + bias).float()
        if softcap: logits = softcap * torch.tanh(logits / softcap)
        logp = (logits / temperature).log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    """
    call = _LinearCall(hidden, weight, labels, mask, bias, temperature, backend, chunk_size, tp_group,
                       softcap=softcap)
    logp, ent = call.checks.launched(lambda: call.logprobs(reduce_hidden_grad))
    if not return_entropy:
        return call.scatter(logp)
    return call.scatter(logp), call.scatter(ent)


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: Temperature = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    mask: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probs (and entropies) from logits you already have, with fp32 math and an out-of-place
    gradient (the caller's logits are never modified, and no fp32 copy of them is kept).

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, any float dtype (may hold ``-inf``).
        labels: ``(B, T)`` / ``(N,)`` int in ``[0, V)`` at kept positions.
        temperature: float > 0 or per-token tensor shaped like ``labels``.
        return_entropy, backend, chunk_size, mask: as in :func:`fused_logprobs`.

    Returns:
        ``logp`` (and ``entropy``) shaped like ``labels``, fp32 (fp64 for fp64 logits).

    Raises:
        ValueError naming the argument for a bad mask or temperature, before returning (before any kernel runs,
        except on the Triton engine, whose statistics kernel stays in bounds for any value: it is queued first, and
        the host waits for the checks while the GPU runs it); for labels outside ``[0, V)`` at kept positions and
        NaN / +inf logits at kept rows, before any kernel runs on the other engines, and on the Triton engine, whose
        statistics kernel finds both (the labels' error first), before returning, or, when the logits' gradient is
        needed, in the backward, once its own kernel is queued: the forward then waits for no kernel, and its
        log-probs are NaN in those rows.

    Equivalent to ``torch.log_softmax(logits.float() / T, -1).gather(-1, labels[..., None]).squeeze(-1)``.
    """
    I.check_backend_args(backend, chunk_size)
    I.require_tensor("logits", logits, dtypes=I.FLOAT_DTYPES, dims=(2, 3))
    V = logits.shape[-1]
    if V == 0:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: the vocabulary is empty")
    shape = logits.shape[:-1]
    # one host wait for the value checks: before any kernel of ours, or, for an engine whose kernel is safe whatever
    # values they reject, once that kernel is queued (the GPU then runs it while the host waits)
    with C.deferred_checks() as checks:
        keep = None if mask is None else I.check_mask(mask, shape, logits)
        try:
            engine = resolve_backend(backend, logits.device)
        except ValueError:  # raised below, after the checks that come before it
            engine = None
        # an engine that flags labels out of range in its kernel (their logp NaN) has them checked by its NaN scan
        # below: no reduction over them, and nothing read back, before its launch
        in_kernel = engine is not None and engine.flags_bad_labels
        # an engine given kept rows only: their count read back now, before any check's reduction is queued
        kept = None if engine is None or engine.logits_in_place else _kept_index(keep, mask)
        labels = I.check_labels(labels, shape, V, keep, logits, range_check=not in_kernel)
        cdt = compute_dtype(logits.dtype)
        temperature = I.check_temperature(temperature, shape, keep, logits, cdt)
        if engine is None:
            engine = resolve_backend(backend, logits.device)
        # the caller's tensor as it is (a view like logits[:, :-1] too: no copy), or flattened once
        z2 = logits if engine.logits_in_place else logits.reshape(-1, V)
        if not engine.scans_logits:  # else the engine's kernel flags them in its one read of the logits (below)
            I.check_finite_rows("logits", z2.reshape(-1, V), None if keep is None else keep.reshape(-1),
                                allow_neg_inf=True)
        y = labels.reshape(-1)
        n = y.shape[0]
        # the engine's NaN scan is read back before returning, or, when the logits' gradient is needed, by the
        # backward pass once its kernel is queued: the forward then holds no host sync after its kernel
        late = None
        if engine.scans_logits and C.value_checks_enabled() and torch.is_grad_enabled() and logits.requires_grad:
            late = C.LateCheck()
        start = None
        if engine.logits_in_place:  # one kernel over the caller's logits: nothing to chunk
            if keep is not None:  # rows the engine never reads (a Python scalar: no fill kernel, no allocation)
                # a kept negative label y, its sign bit cleared, becomes y + 2^63, past any vocabulary: the engine
                # flags it, where as it is it would mark its row as masked out
                y = torch.where(keep.reshape(-1), y & _NON_NEGATIVE if in_kernel else y, -1)
            # negative labels mark the rows the engine skips; without a mask there are none, and its kernels then
            # issue their loads without waiting for the labels'. Everything but the launch is prepared here; the
            # launch is queued before the checks are read back where the engine's kernel is safe whatever values
            # they reject (the GPU computes while the host waits), else after
            start = engine.prepare_logits_logprobs(z2, y, temperature, ChunkPlan(n, V, V), mask is not None, late)
            if engine.safe_for_any_values:
                checks.read_after_launch()
    index = computed = None
    if start is None:
        if keep is not None:
            z2, y, temperature, index, computed = _kept_rows(z2, y, temperature, keep, mask, kept)
        plan = plan_chunks(y.shape[0], V, chunk_size, default_mb=engine.default_budget_mb,
                           elem_bytes=engine.block_elem_bytes(z2.dtype))
        logp, ent = engine.logits_logprobs(z2, y, temperature, plan, False, late)
    else:
        logp, ent = checks.launched(start)
    if engine.scans_logits:
        I.check_scanned_rows("logits", logp, late,
                             (lambda: I.label_range_error(labels, V, keep)) if in_kernel else None)
    logp = _scatter_rows(logp, index, n, computed).reshape(shape)
    if not return_entropy:
        return logp
    return logp, _scatter_rows(ent, index, n, computed).reshape(shape)


_NON_NEGATIVE = 2 ** 63 - 1  # int64 with the sign bit clear: y & _NON_NEGATIVE maps y < 0 to y + 2^63 >= 2^62


def fused_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    config: Union[str, PolicyLossConfig] = "grpo",
    temperature: Temperature = 1.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    single_pass: Optional[bool] = None,
    tp_group=None,
    reduce_hidden_grad: bool = True,
    softcap: Optional[float] = None,
    **overrides: Any,
) -> LossOutput:
    """The policy loss of GRPO-family RL straight from the final hidden states and the LM head, without the
    ``tokens x vocab`` logits.

    Args:
        hidden: ``(B, T, H)`` padded, or ``(N, H)`` packed (then ``cu_seqlens`` gives the sequences); fp32/bf16/fp16.
        weight: ``(V, H)`` LM-head weight, same dtype. ``bias``: optional ``(V,)``.
        labels: ``(B, T)`` / ``(N,)`` int: the sampled tokens (in ``[0, V)`` at kept positions).
        advantages: per sequence ``(B,)`` / ``(S,)`` (or ``(B, 1)`` / ``(S, 1)``) or per token (shaped like
            ``labels``); constants. A packed batch with as many tokens as sequences reads ``(N,)`` per token (with
            a warning): pass ``(S, 1)`` there for one per sequence.
        mask: ``(B, T)`` / ``(N,)`` bool or 0/1: the completion tokens that count. ``None`` keeps all. Masked
            positions may hold anything (NaN included) in every per-token input; they are never computed.
        old_logprobs: fp32 per-token log-probs of the policy that generated the batch's ratio denominator; ``None``
            means on-policy (the detached current log-probs: ratio 1, gradient of logp).
        ref_logprobs: fp32 per-token reference log-probs (required when ``kl_coef > 0``).
        rollout_logprobs: fp32 per-token log-probs reported by the rollout engine (for ``rollout_correction``).
        is_weights: precomputed per-token importance weights (e.g. TRL's ``vllm_is_ratio``), applied as they are.
        cu_seqlens: int32 ``(S+1,)`` sequence boundaries for packed inputs (flash-attn varlen convention).
        normalizer: replaces the denominator of the aggregation (token count for ``token-mean``, sequence count for the
            sequence modes); pass the global value for exact data parallelism (LOSSES.md B §6). A number or a 0-dim
            tensor: on the inputs' device it may change between CUDA graph replays; a CPU one with GPU inputs is read
            as its number (no blocking copy), and refused in a capture.
        config: a preset name (``"grpo"``, ``"dapo"``, ``"gspo"``, ``"cispo"``, ... see ``rlkernels.PRESETS``) or a
            :class:`PolicyLossConfig`; ``**overrides`` change its fields (``clip_high=0.28``, ``kl_coef=0.01``, ...).
        temperature: float > 0 or per-token tensor: the rollout's sampling temperature.
        backend, chunk_size: engine choice and rows per chunk (see :func:`fused_logprobs`).
        single_pass: ``None`` (default) forms the gradients during the forward pass whenever the objective is
            token-separable and gradients are needed (3 GEMMs instead of 4); for sequence-level ratios (GSPO,
            LUSPO) too when every sequence's kept tokens fit in one row chunk (the chunks then end at sequence
            boundaries); not for fp16 inputs, whose dL/dz the single pass forms in fp16 before the loss's scale
            is known (a GradScaler's), where values below 6e-8 flush to zero, while the two-stage path forms them
            scaled, as eager does (V=16384, H=64, 2048 tokens, scale 65536, torch engine on the CPU: grad_weight's
            per-row median error 2.5e-2 and 267 rows zero, against 4.5e-3 and none); ``False`` forces the two-stage
            path; ``True`` requires the single pass (fp16 included). Under ``torch.compile`` the single pass applies
            to token-separable objectives and sequence-level ratios; a sequence longer than a row chunk then takes
            vocabulary blocks (4 GEMMs). In a CUDA graph capture a sequence-level ratio on a packed batch (its
            lengths are device data) takes the two-stage path.
        tp_group, reduce_hidden_grad: a vocab-sharded LM head (see :func:`fused_logprobs`); the objective runs on
            every rank on the merged full-vocabulary log-probs, in the single pass too (each row chunk's statistics
            merged across the group by two small all-reduces before its gradients are formed).
        softcap: the model's final-logit cap (Gemma 2 / Gemma 4: ``model.config.final_logit_softcapping``), or
            ``None``; see :func:`fused_logprobs`.

    Returns:
        :class:`LossOutput` ``(loss, metrics)``: ``loss`` a scalar (fp32) to call ``backward()`` on; ``metrics`` a dict of
        detached fp32 scalars (``pg_loss``, ``kl_loss``, ``entropy_loss``, ``clip_frac``, ``clip_frac_low``,
        ``clip_frac_high``, ``dual_clip_frac``, ``approx_kl``, ``ratio_mean/max/min``, ``entropy``, ``kl``, ...).

    Equivalent to ``rlkernels.reference.linear_policy_loss`` (logits, log-softmax, gather, entropy, then the loss).
    """
    cfg = resolve_config(config, **overrides)

    def token_batch(shape, keep, cdt):
        I.check_config_inputs(cfg, ref_logprobs, rollout_logprobs, is_weights)
        return I.build_token_batch(shape, keep, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                   rollout_logprobs=rollout_logprobs, is_weights=is_weights, cu_seqlens=cu_seqlens,
                                   normalizer=normalizer, cdt=cdt, ref=hidden)

    call = _LinearCall(hidden, weight, labels, mask, bias, temperature, backend, chunk_size, tp_group, token_batch,
                       softcap)
    weight, bias = call.weight, call.bias  # as the call took them (in autocast's dtype inside an autocast region)
    batch = call.extra if call.index is None else call.extra.select(call.index)

    separable = is_token_separable(cfg, batch)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    # under torch.compile the single pass is a custom op (rlkernels._single_pass), which plans the chunks of whole
    # sequences that sequence-level ratios need itself, and with tp_group merges each row chunk's statistics across
    # the group inside it, as eager mode does
    compiling = C.compiling()
    if single_pass and compiling and not _COMPILED_SINGLE_PASS:
        raise ValueError(f"single_pass=True cannot run under torch.compile on torch {torch.__version__} (its "
                         "dispatcher lacks what rlkernels._single_pass needs); leave single_pass=None")
    plan, why_not = call.plan, None
    can = _COMPILED_SINGLE_PASS or not compiling  # here it can run
    # fp16: the single pass would form dL/dz in fp16 at unit scale, before a GradScaler's scale reaches it (see the
    # docstring); the two-stage path forms it with the scale, as eager does
    wanted = single_pass or (single_pass is None and wants_grad and can and call.hidden.dtype != torch.float16)
    if wanted and not separable and is_sequence_separable(cfg, batch):
        if compiling:  # the op cuts chunks of whole sequences (a sequence longer than one: vocabulary blocks)
            separable = True
        else:  # sequence-level ratios: exact chunk by chunk when every chunk holds whole sequences
            # a padded batch with every row computed (all kept, or the dropped ones neutralised): T rows per
            # sequence, known without reading the device
            lengths = (call.shape[1],) * call.shape[0] if len(call.shape) == 2 and call.index is None else None
            if lengths is None and C.capturing():  # a packed batch's lengths are device data: the two-stage path
                separable = False
                why_not = ("a sequence-level ratio needs row chunks that hold whole sequences, and a packed "
                           "batch's sequence lengths cannot be read while a CUDA graph is captured (pass a padded "
                           "batch, or leave single_pass=None for the two-stage path)")
            else:
                aligned, longest = sequence_aligned(call.plan, batch.seq_ids, batch.num_seqs, lengths)
                separable, plan = aligned is not None, aligned or call.plan
                why_not = (f"a sequence-level ratio needs row chunks that hold whole sequences: the longest has "
                           f"{longest} kept tokens, the chunks {call.plan.rows} rows (raise chunk_size or "
                           f"RLKERNELS_MEMORY_BUDGET_MB)")
    error = None
    if single_pass and not separable:
        error = ValueError("single_pass=True cannot apply: " + (why_not or (
            "it needs an objective whose per-token gradients depend only on the token's own sequence (no entropy "
            "quantile, no off-policy sequence mask, old_logprobs when rollout_correction is on)")))
    single_pass = bool(wanted and separable)
    if call.agreed:  # it merges statistics per row chunk: every rank must take it, over the same chunks
        from .distributed import agree

        ranges = plan.ranges(call.hidden.shape[0]) if single_pass else []
        agree(tp_group, error, "the single pass of a tensor-parallel fused_grpo_loss",
              same={"single pass": int(single_pass), "row chunks": len(ranges),
                    "vocabulary block": plan.vocab_block if single_pass else 0,
                    "chunk ends (checksum)": sum((i + 1) * r1 for i, (_, r1) in enumerate(ranges)) % 2**50})
    elif error is not None:
        call.checks.read()  # a failed value check comes first
        raise error

    if not single_pass:
        logp, ent = call.checks.launched(lambda: call.logprobs(reduce_hidden_grad))
        return call.engine.policy_loss_flat(logp, ent, batch, cfg)

    prep = prepare(batch, cfg)

    chunk_loss = ChunkObjective(batch, prep, cfg)
    if compiling:  # the objective travels as its config and per-token tensors (a closure cannot)
        # a padded batch (every row computed under compile): T rows per sequence; packed: the op reads the lengths
        seq_rows = call.shape[1] if len(call.shape) == 2 else -1
        loss, logp, ent = compiled_linear_fused_loss(call.engine.name, call.hidden, weight, bias, call.labels,
                                                     call.temperature, plan, batch, prep, cfg, call.softcap,
                                                     seq_rows, tp_group, call.offset, reduce_hidden_grad)
    elif tp_group is not None:
        from .distributed import tp_linear_fused_loss

        loss, logp, ent = tp_linear_fused_loss(call.engine, call.hidden, weight, bias, call.labels, call.temperature,
                                               plan, chunk_loss, tp_group, call.offset, reduce_hidden_grad,
                                               call.softcap)
    else:
        loss, logp, ent = call.checks.launched(lambda: call.engine.linear_fused_loss(
            call.hidden, weight, bias, call.labels, call.temperature, plan, chunk_loss, call.softcap))
    out = call.engine.objective_metrics(logp, ent, batch, prep, cfg)
    out["loss"] = loss.detach().float()
    return LossOutput(loss, out)


def policy_loss(
    logp: Tensor,
    entropy: Optional[Tensor],
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    normalizer: Optional[Union[float, Tensor]] = None,
    config: Union[str, PolicyLossConfig] = "grpo",
    backend: str = "auto",
    **overrides: Any,
) -> LossOutput:
    """The same objective as :func:`fused_grpo_loss`, from per-token log-probs you computed yourself (with
    :func:`fused_logprobs`, :func:`logprobs_from_logits` or any other way).

    Args:
        logp: ``(B, T)`` or ``(N,)`` fp32/fp64, differentiable. entropy: same shape, or ``None`` when no entropy knob
            is used. The other arguments are those of :func:`fused_grpo_loss`.
        backend: the engine whose objective runs: ``"auto"`` takes the Triton engine's fused objective kernel for
            CUDA tensors (a token-level ratio; the loss's gradient is then once differentiable) and torch ops
            elsewhere; ``"triton"`` asks for it (on CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` for the
            torch ops. Under ``torch.compile`` the torch ops are traced.

    Raises:
        ValueError / TypeError naming the argument, before anything is returned. On CUDA tensors the value checks
        (NaN, 0/1 mask, normalizer) are read once the objective's kernels are queued, so the GPU works while the
        host waits for them; elsewhere before the objective runs.
    """
    cfg = resolve_config(config, **overrides)
    I.require_tensor("logp", logp, dtypes=(torch.float32, torch.float64), dims=(1, 2))
    I.check_backend_args(backend, None)
    shape = logp.shape
    # an engine only where one may fuse the objective: "auto" on CPU tensors resolves none (that would load, or
    # build, the native engine for nothing)
    engine = None
    if not C.compiling() and (backend not in (None, "auto") or logp.is_cuda):
        engine = resolve_backend(backend, logp.device)
    # one host sync for the value checks. On a GPU it comes after the objective is queued: its torch ops index by
    # nothing the checks read (cu_seqlens, which indexing relies on, is read at once), so they stay safe for any
    # values, and where logp comes from a kernel still running (logprobs_from_logits) the checks' copies queue
    # behind it: a sync first would leave the GPU idle while the host then queued the objective op by op. The error
    # is the same and comes before anything is returned
    with C.deferred_checks() as checks:
        if C.runs_async(logp):
            checks.read_after_launch()
        keep = I.check_mask(mask, shape, logp)
        I.check_config_inputs(cfg, ref_logprobs, rollout_logprobs, is_weights, have_entropy=entropy is not None)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        else:
            I.require_tensor("entropy", entropy, dtypes=(torch.float32, torch.float64))
            if entropy.shape != shape:
                raise ValueError(f"entropy has shape {tuple(entropy.shape)}; expected {tuple(shape)} like logp")
        batch = I.build_token_batch(shape, keep, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                    rollout_logprobs=rollout_logprobs, is_weights=is_weights, cu_seqlens=cu_seqlens,
                                    normalizer=normalizer, cdt=logp.dtype, ref=logp)

    def objective() -> LossOutput:
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        flat_logp = torch.where(batch.mask, logp.reshape(-1), zero)
        flat_ent = torch.where(batch.mask, entropy.reshape(-1).to(logp.dtype), zero)
        if engine is None:
            return policy_loss_flat(flat_logp, flat_ent, batch, cfg)
        return engine.policy_loss_flat(flat_logp, flat_ent, batch, cfg)

    return checks.launched(objective)


class GRPOLoss(nn.Module):
    """:func:`fused_grpo_loss` as a module: ``GRPOLoss("dapo", temperature=0.7)(hidden, lm_head.weight, labels,
    advantages, mask, old_logprobs=...)`` returns a :class:`LossOutput`.

    Args:
        config: preset name or :class:`PolicyLossConfig`; ``**overrides`` change its fields (validated here, once).
        temperature, backend, chunk_size, softcap: defaults for every call (a call may override them); ``softcap``
            is the model's final-logit cap (``model.config.final_logit_softcapping`` on Gemma 2 / Gemma 4) or None.
    """

    def __init__(self, config: Union[str, PolicyLossConfig] = "grpo", *, temperature: Temperature = 1.0,
                 backend: str = "auto", chunk_size: Optional[int] = None, softcap: Optional[float] = None,
                 **overrides: Any):
        super().__init__()
        self.config = resolve_config(config, **overrides)
        I.check_softcap(softcap)
        self.temperature = temperature
        self.backend = backend
        self.chunk_size = chunk_size
        self.softcap = softcap

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, advantages: Tensor,
                mask: Optional[Tensor] = None, **kwargs: Any) -> LossOutput:
        kwargs.setdefault("temperature", self.temperature)
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("chunk_size", self.chunk_size)
        kwargs.setdefault("softcap", self.softcap)
        return fused_grpo_loss(hidden, weight, labels, advantages, mask, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        cap = "" if self.softcap is None else f", softcap={self.softcap}"
        return f"config={self.config}, temperature={self.temperature}, backend={self.backend!r}{cap}"
