"""The Triton engine: cuBLAS GEMMs per row chunk, Triton kernels for everything between them.

Per row chunk (and vocabulary block when the budget requires it):

* forward: ``torch.mm`` writes the logits block in the input dtype (bf16 GEMM, fp32 accumulation inside cuBLAS);
  ``logits_stats`` reads it once and returns the online (M, S, C) state and the label logit;
* backward / single pass: ``dlogits`` overwrites that same buffer with dL/dz (the block is never copied to fp32),
  then two GEMMs give grad_hidden and grad_weight (accumulated across chunks in fp32 or the input dtype: see
  GRAD_WEIGHT_ACCUM).

These are the engine primitives; the autograd wiring is shared by every engine (:mod:`rlkernels.engines.autograd`).

The recompute mode costs 4 GEMMs (forward, and forward again in backward); the single pass (token-separable
objectives, and sequence-level ratios over chunks of whole sequences) forms dL/dz right after the statistics, while the block is still in memory: 3 GEMMs.

On CPU tensors this engine runs only under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how the
test suite checks it without a GPU.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from .._checks import compiling
from .._inputs import env_choice
from ..objective import ChunkObjective
from ..triton_ops import objective as fused_objective
from ..triton_ops.logprobs import dlogits, logits_stats, padded_width
from . import Engine
from .chunking import ChunkPlan, memory_budget_bytes
from .torch_engine import chunk_upstream, compute_dtype, forward_rows, fused_outputs, merged_chunk_stats


def _buffer(hidden: Tensor, plan: ChunkPlan) -> Tensor:
    """The logits block buffer, its rows padded to a multiple of ROW_PAD entries (16-byte loads for any V)."""
    return torch.empty(plan.rows, padded_width(plan.vocab_block), dtype=hidden.dtype, device=hidden.device)


def _block(buf: Tensor, r: int, v: int) -> Tensor:
    """r rows x v values of the buffer, at its padded row stride (cuBLAS writes and reads it in place)."""
    return buf[:r, :v]


def _temp_rows(temperature, r0: int, r1: int):
    return temperature[r0:r1] if isinstance(temperature, Tensor) else float(temperature)


def _bias_block(bias: Optional[Tensor], v0: int, v1: int) -> Optional[Tensor]:
    return None if bias is None else bias[v0:v1]


# How grad_weight is accumulated across row chunks for bf16/fp16 inputs (RLKERNELS_GRAD_WEIGHT_ACCUM, read per call):
#   "fp32"  an fp32 V x H accumulator that each chunk's bf16 GEMM adds into (addmm with out_dtype=fp32, no extra
#           pass), rounded once at the end, as eager's single GEMM over all rows;
#   "input" grad_weight itself, in the input dtype, added into by each chunk's GEMM (cuBLAS beta=1, fp32 inside the
#           GEMM): no buffer beyond the gradient, one rounding to bf16 per row chunk (as Liger-Kernel does);
#   "auto"  (default) "fp32" when the accumulator takes at most half the memory budget, which then sizes the logits
#           block from what is left (see TritonEngine.budget_reserve), else "input"; also "input" when the call is
#           one row chunk and one vocabulary block with the whole budget, where both give the same bits (one GEMM,
#           one rounding), so such a call is planned without the reserve.
# Measured on an H100 (bench/gpu_tune.py, qwen2.5-7b LM head, 16k tokens, dapo): against an fp32-input run,
# grad_weight's relative error was 0.02598 with "fp32" (eager bf16 autograd: 0.02598) and 0.02606 with "input", at
# that run's default 512 MiB blocks (10 row chunks); with 1 GiB blocks (5 chunks), "fp32" took 88.4 ms and held
# 3102 MiB beyond the gradients (2.2 GB of it the 152064 x 3584 accumulator), "input" 86.9 ms and 1023 MiB. So
# "auto" keeps the memory budget (the issue's <= 1 GiB beyond inputs and gradients) at the cost of 0.3% of the error
# eager bf16 already has; DESIGN.md "Precision" (fp32 accumulation across chunks) holds whenever the budget allows
# it, and RLKERNELS_GRAD_WEIGHT_ACCUM=fp32 forces it.
GRAD_WEIGHT_ACCUM = ("auto", "fp32", "input")


def _auto_fp32(weight: Tensor) -> bool:
    """Under "auto" (read now), whether the fp32 accumulator is taken: it fits in half the memory budget."""
    auto = env_choice("RLKERNELS_GRAD_WEIGHT_ACCUM", GRAD_WEIGHT_ACCUM) == "auto"
    return auto and weight.numel() * 4 <= memory_budget_bytes(TritonEngine.default_budget_mb) // 2


def grad_weight_accum(weight: Tensor, n_rows: int, plan: ChunkPlan) -> str:
    """"fp32" or "input": the grad_weight accumulation for a call with ``n_rows`` rows under ``plan``."""
    mode = env_choice("RLKERNELS_GRAD_WEIGHT_ACCUM", GRAD_WEIGHT_ACCUM)
    if mode != "auto":
        return mode
    if plan.rows >= n_rows and not plan.vocab_blocked:
        return "input"
    return "fp32" if _auto_fp32(weight) else "input"


_MIXED_GEMM: dict = {}


def _mixed_gemm_works(device: torch.device, add: bool = True) -> bool:
    """Whether a half-precision GEMM writes fp32 here: ``torch.addmm(acc, a, b, out_dtype=fp32, out=acc)`` (``add``)
    or ``torch.mm(a, b, out_dtype=fp32, out=acc)``, with the right sum (CUDA builds of torch >= 2.8; not the CPU
    build). Probed once per device and form on tiny matrices."""
    key = (device.type, device.index, add)
    if key not in _MIXED_GEMM:
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            # a as the engine passes dz^T: the transpose of a block of a row-padded buffer
            a = torch.randn(16, 24, generator=g).to(device, torch.bfloat16)[:, :8].T
            b = torch.randn(16, 8, generator=g).to(device, torch.bfloat16)
            acc = torch.ones(8, 8, device=device)
            if add:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
            want = float(add) + a.double() @ b.double()
            _MIXED_GEMM[key] = bool(torch.allclose(acc.double(), want, rtol=1e-5, atol=1e-5))
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_GEMM[key] = False
    return _MIXED_GEMM[key]


class _Grads:
    """grad_hidden in the input dtype; grad_bias accumulated in fp32 (fp64 for fp64); grad_weight in fp32 or in the
    input dtype (see GRAD_WEIGHT_ACCUM).

    Each row chunk's first vocabulary block writes its rows of grad_hidden, and the first row chunk to add writes
    grad_weight, with plain GEMMs; later ones add into them. So neither starts as zeros: at the qwen2.5-7b LM head a
    zeroed bf16 grad_weight is a 1.09 GB write, and the first chunk's add would read it back (beta = 1): two passes
    over V x H more than the GEMMs need. So does the fp32 accumulator where a mixed-dtype mm can write it (CUDA
    torch >= 2.8); where chunks add into it with a separate add, it starts as zeros. A row chunk without an upstream
    gradient zeroes its rows (:meth:`no_rows`); with no chunk added, :meth:`results` gives zeros."""

    def __init__(self, hidden, weight, bias, need_h, need_w, need_b, plan: ChunkPlan):
        acc = compute_dtype(hidden.dtype)
        self.half = acc != hidden.dtype
        self.w_in_input = self.half and need_w and grad_weight_accum(weight, hidden.shape[0], plan) == "input"
        self.mixed = self.half and need_w and not self.w_in_input and _mixed_gemm_works(hidden.device)
        # the fp32 accumulator's first chunk written by a mixed-dtype mm where there is one
        self.mixed_mm = self.mixed and _mixed_gemm_works(hidden.device, add=False)
        self.h = torch.empty_like(hidden) if need_h else None
        w_dtype = weight.dtype if self.w_in_input else acc
        self.w_written = self.w_in_input or not self.half or self.mixed_mm  # by its first GEMM
        fill = torch.empty if self.w_written else torch.zeros
        self.w = fill(weight.shape, dtype=w_dtype, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
        self.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        self.first_rows: Optional[int] = None  # r0 of the first row chunk that added

    def add(self, dz: Tensor, h: Tensor, weight: Tensor, r0: int, v0: int, v1: int) -> None:
        """dz (rows, v1-v0) in the input dtype: the GEMMs run in that dtype. Called for each row chunk (rows from
        ``r0``) with its vocabulary blocks in order (the first at ``v0`` = 0)."""
        if self.first_rows is None:
            self.first_rows = r0
        w = weight[v0:v1]
        if self.h is not None:
            gh = self.h[r0: r0 + dz.shape[0]]
            if v0 == 0:  # these rows' first block: written
                torch.mm(dz, w, out=gh)
            elif not self.half:
                gh.addmm_(dz, w)
            else:  # a later vocabulary block adds into the same rows
                gh.add_(dz @ w)
        if self.w is not None:
            gw = self.w[v0:v1]
            if self.mixed_mm and r0 == self.first_rows:  # bf16 GEMM writing the fp32 accumulator
                torch.mm(dz.T, h, out_dtype=torch.float32, out=gw)
            elif self.mixed:  # bf16 GEMM adding straight into the fp32 accumulator
                torch.addmm(gw, dz.T, h, out_dtype=torch.float32, out=gw)
            elif self.half and not self.w_in_input:  # fallback: one extra V x H pass per chunk
                gw.add_(dz.T @ h)
            elif r0 == self.first_rows:  # the first row chunk: written
                torch.mm(dz.T, h, out=gw)
            else:
                gw.addmm_(dz.T, h)
        if self.b is not None:
            self.b[v0:v1].add_(dz.sum(0, dtype=self.b.dtype))

    def no_rows(self, r0: int, r1: int) -> None:
        """Rows r0:r1 add nothing (no upstream gradient): their grad_hidden is 0."""
        if self.h is not None:
            self.h[r0:r1].zero_()

    def results(self):
        if self.first_rows is None:  # nothing added: the gradients are zeros
            for g in (self.h, self.w):
                if g is not None:
                    g.zero_()
        w = None if self.w is None else self.w.to(self.dtypes[0])
        b = None if self.b is None else self.b.to(self.dtypes[1])
        return self.h, w, b


def _chunk_stats(buf, h, weight, bias, labels, temperature, plan, offset: Optional[int] = None, merge=None,
                 softcap: float = 0.0):
    """(M, log S, C/S, logp, entropy) of one row chunk over all vocabulary blocks (and shards, with ``merge``)."""

    def block_stats(v0, v1):
        z = _block(buf, h.shape[0], v1 - v0)
        torch.mm(h, weight[v0:v1].T, out=z)
        return logits_stats(z, labels, _bias_block(bias, v0, v1), temperature, (offset or 0) + v0,
                            n_load=padded_width(v1 - v0), masked_rows=False,  # kept rows only: labels >= 0
                            softcap=softcap)

    return merged_chunk_stats(weight.shape[0], plan, block_stats, merge)


def _chunk_backward(buf, grads, h, weight, bias, labels, temperature, plan, m, log_s, cs, g_logp, g_ent, r0,
                    recompute=True, offset: Optional[int] = None, softcap: float = 0.0):
    V = weight.shape[0]
    for v0 in range(0, V, plan.vocab_block):
        v1 = min(v0 + plan.vocab_block, V)
        z = _block(buf, h.shape[0], v1 - v0)
        if recompute:
            torch.mm(h, weight[v0:v1].T, out=z)
        dlogits(z, z, labels, _bias_block(bias, v0, v1), temperature, (offset or 0) + v0, m, log_s, cs, g_logp,
                g_ent, n_load=padded_width(v1 - v0), masked_rows=False, softcap=softcap)
        grads.add(z, h, weight, r0, v0, v1)


def _g(x: Optional[Tensor], r0: int, r1: int) -> Optional[Tensor]:
    return None if x is None else x[r0:r1]  # any layout: the kernel wrappers pass what they read contiguous


def linear_forward(hidden, weight, bias, labels, temperature, plan: ChunkPlan, vocab_offset: Optional[int] = None,
                   softcap: float = 0.0):
    """-> (logp, entropy, M, log S, C/S), each (N,): three numbers per row are all that backward needs."""
    buf = _buffer(hidden, plan)
    return forward_rows(hidden, plan, lambda r0, r1: _chunk_stats(
        buf, hidden[r0:r1], weight, bias, labels[r0:r1], _temp_rows(temperature, r0, r1), plan, vocab_offset,
        softcap=softcap))


def linear_backward(hidden, weight, bias, labels, temperature, plan: ChunkPlan, m, log_s, cs, g_logp, g_ent,
                    need_h: bool, need_w: bool, need_b: bool, vocab_offset: Optional[int] = None,
                    softcap: float = 0.0):
    """Recompute mode backward: each logits block is recomputed (4 GEMMs in all with the forward)."""
    grads = _Grads(hidden, weight, bias, need_h, need_w, need_b, plan)
    buf = _buffer(hidden, plan)
    N = hidden.shape[0]
    for r0, r1 in plan.ranges(N):
        _chunk_backward(buf, grads, hidden[r0:r1], weight, bias, labels[r0:r1], _temp_rows(temperature, r0, r1),
                        plan, m[r0:r1], log_s[r0:r1], cs[r0:r1], _g(g_logp, r0, r1), _g(g_ent, r0, r1), r0,
                        offset=vocab_offset, softcap=softcap)
    return grads.results()


FUSED_OBJECTIVE = ("on", "off")


def _fuse_objective(cfg) -> bool:
    """Whether the objective runs in the fused objective kernel (:mod:`rlkernels.triton_ops.objective`): not while
    torch.compile traces (the torch ops are traced; inside the compiled single pass's custom op, which runs
    untraced, the kernel does run), a config it computes, and ``RLKERNELS_FUSED_OBJECTIVE`` not ``off`` (torch ops
    always: the A/B of bench/gpu_tune.py)."""
    return (not compiling() and fused_objective.fusable(cfg)
            and env_choice("RLKERNELS_FUSED_OBJECTIVE", FUSED_OBJECTIVE) == "on")


def _objective_upstream(chunk_loss):
    """How the single pass takes a chunk's (loss, g_logp, g_ent): the fused objective kernel for an objective it
    computes (one launch instead of autograd over about 70 torch ops per chunk), else autograd over
    ``chunk_loss``."""
    if isinstance(chunk_loss, ChunkObjective) and _fuse_objective(chunk_loss.cfg):
        return fused_objective.chunk_upstream
    return chunk_upstream


def linear_fused(hidden, weight, bias, labels, temperature, plan: ChunkPlan, chunk_loss, need_h: bool,
                 need_w: bool, need_b: bool, vocab_offset: Optional[int] = None, merge=None, softcap: float = 0.0):
    """Single pass (see Engine.linear_fused): (loss, logp, entropy, grad_hidden, grad_weight, grad_bias)."""
    N = hidden.shape[0]
    upstream = _objective_upstream(chunk_loss)
    logp, ent, loss = fused_outputs(hidden)
    grads = _Grads(hidden, weight, bias, need_h, need_w, need_b, plan)
    buf = _buffer(hidden, plan)
    for r0, r1 in plan.ranges(N):
        h, y, temp = hidden[r0:r1], labels[r0:r1], _temp_rows(temperature, r0, r1)
        chunk_merge = None if merge is None else functools.partial(merge, r0, r1)
        m, log_s, cs, lp, en = _chunk_stats(buf, h, weight, bias, y, temp, plan, vocab_offset, chunk_merge, softcap)
        part, g_logp, g_ent = upstream(chunk_loss, r0, r1, lp, en)
        if g_logp is not None or g_ent is not None:
            # unblocked: the buffer still holds this chunk's logits, so no recompute (3 GEMMs in all); the kernel
            # forms p from the raw logits and the (merged) statistics
            _chunk_backward(buf, grads, h, weight, bias, y, temp, plan, m, log_s, cs, g_logp, g_ent, r0,
                            recompute=plan.vocab_blocked, offset=vocab_offset, softcap=softcap)
        else:
            grads.no_rows(r0, r1)
        logp[r0:r1], ent[r0:r1] = lp, en
        loss += part
    return (loss, logp, ent, *grads.results())


def logits_forward(logits, labels, temperature, plan: ChunkPlan, masked_rows: bool):
    """Logits input, (N, V) or (B, T, V) as the caller has them (see ``Engine.logits_in_place``): one kernel over
    all rows (the logits exist already; nothing to chunk). That kernel also flags NaN / +inf (their rows come out
    NaN; see ``Engine.scans_logits``), so the logits are read once, and labels outside [0, V) (logp NaN; see
    ``Engine.flags_bad_labels``). ``masked_rows``: negative labels mark rows never read; without them no load waits
    for a label's."""
    return prepare_logits_forward(logits, labels, temperature, plan, masked_rows)()


def prepare_logits_forward(logits, labels, temperature, plan: ChunkPlan, masked_rows: bool):
    """:func:`logits_forward` in two steps: the outputs allocated and the launch prepared now, the kernel queued by
    the returned function (which returns the outputs)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    # the kernel finishes the statistics itself (finish_stats' arithmetic): no elementwise launches after it
    (m, log_s, cs, logp, ent), start = logits_stats(logits, labels, None, temperature, masked_rows=masked_rows,
                                                    finish=True, prepare=True)

    def queued():
        start()
        return logp, ent, m, log_s, cs

    return queued


def logits_backward(logits, labels, temperature, plan: ChunkPlan, masked_rows: bool, m, log_s, cs, g_logp, g_ent):
    """dL/dlogits written into a new (row-major) tensor: the caller's logits are never modified."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return dlogits(logits, grad, labels, None, temperature, 0, m, log_s, cs, g_logp, g_ent, masked_rows=masked_rows)


# read once, as Triton reads it once when it is imported (setting it later changes nothing in Triton either), not
# on every call's engine check
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreting() -> bool:
    return _INTERPRETING


class TritonEngine(Engine):
    name = "triton"
    # one logits block in the input dtype (the GEMM output itself). Measured on an H100 (bench/gpu_tune.py, qwen2.5-7b
    # LM head, 16k tokens, bf16, dapo; the three GEMMs alone took 73.3 ms): fwd+bwd took 88.4 ms with 1 GiB blocks,
    # 99.9 ms with 512 MiB blocks, and 87.1 ms with 2 GiB blocks (fp32 grad_weight accumulation in all three).
    default_budget_mb = 1024.0
    scans_logits = True
    logits_in_place = True
    # the statistics kernel reads a label's logit only where the label lies in the block, and the gradient kernel
    # compares labels with columns, reading none (test_triton.py: test_logits_kernels_stay_in_bounds_for_any_label)
    safe_for_any_values = True
    # the statistics kernel's logits path (finish=True) writes NaN logp for a label outside [0, V)
    flags_bad_labels = True

    def block_elem_bytes(self, dtype: torch.dtype) -> int:
        return dtype.itemsize

    def budget_reserve(self, weight: Tensor, need_weight_grad: bool) -> int:
        if not (need_weight_grad and compute_dtype(weight.dtype) != weight.dtype):
            return 0
        if not _auto_fp32(weight):
            return 0  # "input", or a forced mode: the whole budget for the block
        return weight.numel() * 4

    def supports(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda" or _interpreting():
            return None
        return f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing triton " \
               "to run them on CPU (slow, for tests)"

    def policy_loss_flat(self, logp, entropy, batch, cfg):
        """The objective by the fused objective kernel (loss and gradients in one launch, metrics in another) where
        it computes it and ``RLKERNELS_FUSED_OBJECTIVE`` is on; else the torch ops."""
        if _fuse_objective(cfg):
            return fused_objective.policy_loss_flat(logp, entropy, batch, cfg)
        return super().policy_loss_flat(logp, entropy, batch, cfg)

    def objective_metrics(self, logp, entropy, batch, prep, cfg):
        """The step's metrics in one launch of the fused objective kernel (its METRICS mode) where it computes the
        objective and ``RLKERNELS_FUSED_OBJECTIVE`` is on; else the torch ops."""
        if _fuse_objective(cfg):
            return fused_objective.token_metrics(logp, entropy, batch, prep, cfg)
        return super().objective_metrics(logp, entropy, batch, prep, cfg)

    linear_forward = staticmethod(linear_forward)
    linear_backward = staticmethod(linear_backward)
    linear_fused = staticmethod(linear_fused)
    logits_forward = staticmethod(logits_forward)
    prepare_logits_forward = staticmethod(prepare_logits_forward)
    logits_backward = staticmethod(logits_backward)
