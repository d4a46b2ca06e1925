"""How many rows (and vocabulary entries) an engine processes at a time.

The budget is the size of one logits block, ``rows x vocab_block x elem_bytes`` bytes, where ``elem_bytes`` is what
the engine counts per logit: 4 for the torch and native engines (the torch engine works on fp32 blocks; the native
engine keeps its block in the input dtype but is budgeted as fp32, so a bf16 block takes half the budget), the
input dtype's size for the Triton engine (its block is the bf16 GEMM output itself). An engine holds a small
multiple of it (the block, its exponentials, and in bf16 the GEMM output) at any moment, and never ``N x V``.
Set it with ``RLKERNELS_MEMORY_BUDGET_MB`` (read at each call) or per call with ``chunk_size=`` (rows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

# Default budget per logits block. Measured on the 2-core CPU machine of this project (torch 2.13, fp32, H=1024,
# V=32000): 256-512-row chunks reach ~90% of whole-batch GEMM speed; 64 MiB gives 512 rows at V=32000 and
# 96 rows at V=152064. GPU engines pick their own, larger default.
DEFAULT_BUDGET_MB = 64.0
ROW_MULTIPLE = 16  # GEMM-friendly row counts
MIN_ROWS = 16  # below this, block the vocabulary instead of shrinking the row chunk
MIN_VOCAB_BLOCK = 256
# a vocabulary block is a multiple of this (when the vocabulary is blocked at all): its rows then start 16-byte
# aligned in the block buffer, and the Triton kernels read them in 16-byte vectors (rlkernels.triton_ops.aot)
VOCAB_MULTIPLE = 128


@dataclass(frozen=True)
class ChunkPlan:
    rows: int  # rows per chunk (the most, when bounds are given)
    vocab_block: int  # vocabulary entries per block
    vocab: int  # the whole vocabulary V
    # row chunk boundaries (0, ..., N) when the chunks must hold whole sequences (see sequence_aligned), else None:
    # chunks of ``rows`` rows. Only the single pass reads them.
    bounds: Optional[Tuple[int, ...]] = None

    @property
    def vocab_blocked(self) -> bool:
        return self.vocab_block < self.vocab

    def ranges(self, n_rows: int) -> List[Tuple[int, int]]:
        """``(r0, r1)`` of each row chunk of ``n_rows`` rows."""
        if self.bounds is None:
            return [(r0, min(r0 + self.rows, n_rows)) for r0 in range(0, n_rows, self.rows)]
        if self.bounds[-1] != n_rows:
            raise RuntimeError(f"internal: a sequence-aligned plan for {self.bounds[-1]} rows used on {n_rows}")
        return list(zip(self.bounds[:-1], self.bounds[1:]))


def sequence_aligned(plan: ChunkPlan, seq_ids: Tensor, num_seqs: int,
                     lengths: Optional[Tuple[int, ...]] = None) -> Tuple[Optional[ChunkPlan], int]:
    """``(plan with row chunks that end only where a sequence ends, longest sequence's rows)``: each chunk packs as
    many whole sequences as fit in ``plan.rows`` rows (greedily, in order); the plan is None when one sequence alone
    has more rows than that, or when ``seq_ids`` (N,) (the sequence of each row, in ``[0, num_seqs)``) is not
    non-decreasing, so that a sequence's rows are not contiguous. One host sync.

    With such chunks, an objective whose tokens are coupled only within a sequence (sequence-level ratios: GSPO,
    LUSPO) gets its exact per-token gradients chunk by chunk, so the single pass (3 GEMMs) applies to it too.

    ``lengths``: the rows of each sequence, in order, where the caller knows them without reading the device (a
    padded ``(B, T)`` batch with every row kept: T each); ``seq_ids`` is then not read.
    """
    if seq_ids.numel() == 0:
        return replace(plan, bounds=(0,)), 0
    if lengths is not None:
        counts, unordered = list(lengths), False
    else:
        counts = torch.zeros(num_seqs + 1, dtype=torch.long, device=seq_ids.device)
        counts.index_add_(0, seq_ids, torch.ones_like(seq_ids, dtype=torch.long))
        counts[num_seqs] = (seq_ids[1:] < seq_ids[:-1]).any()  # the order flag rides on the same read
        *counts, unordered = counts.tolist()
    longest = max(counts)
    if unordered or longest > plan.rows:
        return None, longest
    bounds, start, end = [0], 0, 0
    for length in counts:
        if length == 0:
            continue
        if end + length - start > plan.rows:
            bounds.append(end)
            start = end
        end += length
    bounds.append(end)
    return replace(plan, bounds=tuple(bounds)), longest


def memory_budget_bytes(default_mb: float = DEFAULT_BUDGET_MB) -> int:
    """The logits-block budget in bytes: ``RLKERNELS_MEMORY_BUDGET_MB`` if set, else ``default_mb``."""
    raw = os.environ.get("RLKERNELS_MEMORY_BUDGET_MB")
    if raw is None or raw == "":
        return int(default_mb * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"RLKERNELS_MEMORY_BUDGET_MB={raw!r} is not a number of MiB") from None
    if mb <= 0:
        raise ValueError(f"RLKERNELS_MEMORY_BUDGET_MB={raw!r} must be > 0")
    return int(mb * 2**20)


def plan_chunks(n_rows: int, vocab: int, chunk_size: Optional[int] = None, budget_bytes: Optional[int] = None,
                default_mb: float = DEFAULT_BUDGET_MB, elem_bytes: int = 4, reserve_bytes: int = 0) -> ChunkPlan:
    """Rows per chunk and vocabulary per block such that ``rows * vocab_block * elem_bytes <= budget`` where
    possible. ``reserve_bytes``: what an engine needs besides the block to add results up across blocks (the Triton
    engine's fp32 grad_weight accumulator), at most half the budget, taken from it only when the call does not fit
    one block without it (one block adds nothing up).

    ``chunk_size`` fixes the rows; the vocabulary is then blocked only if that many full rows exceed the budget.
    """
    budget = memory_budget_bytes(default_mb) if budget_bytes is None else int(budget_bytes)
    n_rows = max(int(n_rows), 1)
    plan = _plan(n_rows, vocab, chunk_size, budget, elem_bytes)
    if reserve_bytes and (plan.rows < n_rows or plan.vocab_blocked):
        plan = _plan(n_rows, vocab, chunk_size, budget - min(int(reserve_bytes), budget // 2), elem_bytes)
    return plan


def _plan(n_rows: int, vocab: int, chunk_size: Optional[int], budget: int, elem_bytes: int) -> ChunkPlan:
    if chunk_size is not None:
        rows = int(chunk_size)
    else:
        rows = budget // (elem_bytes * vocab)
        if rows >= ROW_MULTIPLE:
            rows -= rows % ROW_MULTIPLE
        rows = max(rows, MIN_ROWS)
    rows = max(1, min(rows, n_rows))
    vocab_block = vocab
    if rows * vocab * elem_bytes > budget:
        vocab_block = budget // (elem_bytes * rows)
        vocab_block = max(MIN_VOCAB_BLOCK, vocab_block - vocab_block % VOCAB_MULTIPLE)
        vocab_block = min(vocab_block, vocab)
    return ChunkPlan(rows=rows, vocab_block=vocab_block, vocab=vocab)
