"""The native CPU engine: ATen GEMMs on row chunks around the C++ row kernels of ``csrc/``.

Same contract and chunking as :mod:`rlkernels.engines.torch_engine` (read it first); what changes is the per-block
work. Per row chunk (and vocabulary block):

* one GEMM ``z = h @ W[v0:v1].T`` into a reused workspace block in the input dtype (no bias, no temperature, no
  fp32 copy: the kernels apply ``(z + b) / T`` and the -inf floor as they read);
* ``rlkernels::block_stats``: one streaming pass for the per-row state (M, S, C, z~_y) (LOSSES.md B §1.1-1.2);
* backward / single pass: ``rlkernels::dlogits_`` forms dL/dz (B §1.3) over the block in place, in the input dtype,
  ready for the two gradient GEMMs (``grad_hidden = dz @ W``, ``grad_weight += dz.T @ h`` in fp32).

The torch engine holds two fp32 blocks (logits and exponentials) and makes ~16 elementwise passes over them per
block; this engine holds one block in the input dtype and reads it twice (forward) or once (backward). The chunk
loop stays in Python: 3-4 op calls of 10-40 us each per chunk, against ~200 ms per GEMM of a 512 x 1024 x 32000
chunk (2-core machine), and the single pass must call back into the Python objective per chunk anyway. Profiled
on the grpo op (M=2048, H=1024, V=32000, fp32, single pass): GEMMs 2.49 s of 2.73 s, the row kernels 54 ms.

The engine is the five primitives of :class:`rlkernels.engines.Engine` (``linear_forward``, ``linear_backward``,
``linear_fused``, ``logits_forward``, ``logits_backward``); the autograd wiring and the engine-level
``torch.library`` ops around them are shared by all engines (:mod:`rlkernels.engines.autograd`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import Engine
from .chunking import ChunkPlan
from .torch_engine import Temperature, _block, chunk_upstream, compute_dtype, fused_outputs


def _ops():
    from ..native import ops  # registers the custom ops (the extension is loaded by then)

    return ops


class _Workspace:
    """The reused GEMM output block ``z`` (rows x vocab_block, input dtype) and, for half inputs that need the weight
    gradient, a (vocab_block x H) block for ``dz.T @ h`` before it is added to the fp32 accumulator."""

    def __init__(self, plan: ChunkPlan, hidden: Tensor, need_wgrad: bool = False):
        dt, dev = hidden.dtype, hidden.device
        self.half = compute_dtype(dt) != dt
        self.z = torch.empty(plan.rows, plan.vocab_block, dtype=dt, device=dev)
        self.gw = (torch.empty(plan.vocab_block, hidden.shape[1], dtype=dt, device=dev)
                   if (self.half and need_wgrad) else None)


def _temp(temperature: Temperature, r0: int, r1: int) -> Tuple[float, Optional[Tensor]]:
    """(scalar temperature, per-row temperatures or None) for rows r0:r1, as the kernels take them."""
    if isinstance(temperature, Tensor):
        return 1.0, temperature[r0:r1]
    return float(temperature), None


def _bias(bias: Optional[Tensor], v0: int, v1: int) -> Optional[Tensor]:
    return None if bias is None else bias[v0:v1].contiguous()  # the row kernels take it with unit stride


def _rows(x: Optional[Tensor], r0: int, r1: int, dtype: torch.dtype) -> Optional[Tensor]:
    return None if x is None else x[r0:r1].to(dtype)


def _logits_block(ws: _Workspace, h: Tensor, weight: Tensor, v0: int, v1: int) -> Tensor:
    z = _block(ws.z, h.shape[0], v1 - v0)
    torch.mm(h, weight[v0:v1].T, out=z)
    return z


class _Grads:
    """grad_hidden in the input dtype, grad_weight / grad_bias accumulated in fp32 (fp64 for fp64 inputs).

    Nothing is zero-filled: the first block to reach a row chunk of grad_hidden (a vocabulary block of grad_weight)
    writes it with ``mm(out=)``, later ones accumulate with ``addmm_``; whatever no block reached is zeroed in
    :meth:`results`. This saves a 125 MiB fill and one read of grad_weight per call at V=32000, H=1024.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_h: bool, need_w: bool,
                 need_b: bool):
        cdt = compute_dtype(hidden.dtype)
        self.h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        self.w = torch.empty(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if (need_b and bias is not None) else None
        self.rows_done, self.vocab_done = set(), set()  # row chunks (r0) and vocab blocks (v0) written once
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype

    def add_block(self, ws: _Workspace, dz: Tensor, h: Tensor, weight: Tensor, r0: int, v0: int, v1: int) -> None:
        """Accumulate the gradients of one (rows, v0:v1) block from dL/dz (input dtype)."""
        w = weight[v0:v1]
        first_h, first_w = r0 not in self.rows_done, v0 not in self.vocab_done
        self.rows_done.add(r0)
        self.vocab_done.add(v0)
        if self.h is not None:
            gh = self.h[r0: r0 + dz.shape[0]]
            if first_h:
                torch.mm(dz, w, out=gh)
            elif ws.half:  # accumulate across vocab blocks in the input dtype, as the torch engine does
                gh.add_(dz @ w)
            else:
                gh.addmm_(dz, w)
        if self.w is not None:
            gw_block = self.w[v0:v1]
            if ws.half:
                gw = ws.gw[: v1 - v0]
                torch.mm(dz.T, h, out=gw)
                if first_w:
                    gw_block.copy_(gw)
                else:
                    gw_block.add_(gw)
            elif first_w:
                torch.mm(dz.T, h, out=gw_block)
            else:
                gw_block.addmm_(dz.T, h)
        if self.b is not None:
            self.b[v0:v1].add_(dz.sum(0, dtype=self.b.dtype))

    def results(self, plan: ChunkPlan):
        """(grad_hidden, grad_weight, grad_bias) after all blocks of ``plan``'s row chunks."""
        if self.h is not None:
            for r0, r1 in plan.ranges(self.h.shape[0]):
                if r0 not in self.rows_done:
                    self.h[r0:r1].zero_()
        if self.w is not None and not self.vocab_done:
            self.w.zero_()  # no chunk had an upstream gradient
        w = None if self.w is None else self.w.to(self.weight_dtype)
        b = None if self.b is None else self.b.to(self.bias_dtype)
        return self.h, w, b


def _chunk_state(ws, h, weight, bias, labels, temp, plan, offset: int = 0,
                 softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    """The (rows, 4) state of one row chunk over all vocabulary blocks, and the last block's logits. ``offset`` is
    the global id of weight row 0 (a tensor-parallel shard): the kernels compare labels with ``offset + v0``."""
    ops, (t, t_rows) = _ops(), temp
    state, z = None, None
    V = weight.shape[0]
    for v0 in range(0, V, plan.vocab_block):
        v1 = min(v0 + plan.vocab_block, V)
        z = _logits_block(ws, h, weight, v0, v1)
        state = ops.block_stats(z, labels, offset + v0, _bias(bias, v0, v1), t, t_rows, softcap, state)
    return state, z


def _chunk_grads(ws, grads, h, weight, bias, labels, temp, plan, stats, g_logp, g_ent, r0, z=None,
                 offset: int = 0, softcap: float = 0.0) -> None:
    """dL/dz of each vocabulary block of a row chunk (recomputing its logits unless ``z`` holds them), then the
    block's gradient GEMMs. ``stats`` = (M, log S, C/S) of the chunk's rows."""
    ops, (t, t_rows) = _ops(), temp
    V = weight.shape[0]
    for v0 in range(0, V, plan.vocab_block):
        v1 = min(v0 + plan.vocab_block, V)
        if z is None or plan.vocab_blocked:
            z = _logits_block(ws, h, weight, v0, v1)
        ops.dlogits_(z, labels, offset + v0, _bias(bias, v0, v1), t, t_rows, softcap, *stats, g_logp, g_ent)
        grads.add_block(ws, z, h, weight, r0, v0, v1)


# ----------------------------------------------------------------------------------------------------------------
# the primitives
# ----------------------------------------------------------------------------------------------------------------
def linear_forward(hidden, weight, bias, labels, temperature, plan: ChunkPlan, vocab_offset: Optional[int] = None,
                   softcap: float = 0.0):
    """-> (logp, entropy, M, log S, C/S), each (N,) in the compute dtype. ``vocab_offset``: None for the whole
    vocabulary, else the global id of weight row 0 of a tensor-parallel shard (labels outside it give -inf)."""
    N = hidden.shape[0]
    state = torch.empty(N, 4, dtype=compute_dtype(hidden.dtype), device=hidden.device)
    ws = _Workspace(plan, hidden)
    for r0, r1 in plan.ranges(N):
        state[r0:r1] = _chunk_state(ws, hidden[r0:r1], weight, bias, labels[r0:r1], _temp(temperature, r0, r1),
                                    plan, vocab_offset or 0, softcap)[0]
    return _ops().finish(state)


def linear_backward(hidden, weight, bias, labels, temperature, plan: ChunkPlan, m, log_s, cs, g_logp, g_ent,
                    need_h: bool, need_w: bool, need_b: bool, vocab_offset: Optional[int] = None,
                    softcap: float = 0.0):
    """-> (grad_hidden, grad_weight, grad_bias), None where not needed; a None upstream skips its term."""
    N, cdt = hidden.shape[0], compute_dtype(hidden.dtype)
    grads = _Grads(hidden, weight, bias, need_h, need_w, need_b)
    if (g_logp is None and g_ent is None) or not (need_h or need_w or (need_b and bias is not None)):
        return grads.results(plan)
    ws = _Workspace(plan, hidden, need_wgrad=need_w)
    for r0, r1 in plan.ranges(N):
        stats = tuple(_rows(x, r0, r1, cdt) for x in (m, log_s, cs))
        _chunk_grads(ws, grads, hidden[r0:r1], weight, bias, labels[r0:r1], _temp(temperature, r0, r1), plan, stats,
                     _rows(g_logp, r0, r1, cdt), _rows(g_ent, r0, r1, cdt), r0, offset=vocab_offset or 0,
                     softcap=softcap)
    return grads.results(plan)


def linear_fused(hidden, weight, bias, labels, temperature, plan: ChunkPlan, chunk_loss, need_h: bool, need_w: bool,
                 need_b: bool, vocab_offset: Optional[int] = None, merge=None, softcap: float = 0.0):
    """Single pass (see Engine.linear_fused) -> (loss, logp, entropy, grad_hidden, grad_weight, grad_bias): per row
    chunk, the objective's upstream gradients are asked for right away and dL/dz is formed while the logits block is
    still in memory (3 GEMMs per chunk instead of 4)."""
    N, cdt = hidden.shape[0], compute_dtype(hidden.dtype)
    logp, ent, loss = fused_outputs(hidden)
    grads = _Grads(hidden, weight, bias, need_h, need_w, need_b)
    any_grad = need_h or need_w or (need_b and bias is not None)
    ws = _Workspace(plan, hidden, need_wgrad=need_w)
    for r0, r1 in plan.ranges(N):
        h, y, temp = hidden[r0:r1], labels[r0:r1], _temp(temperature, r0, r1)
        state, z = _chunk_state(ws, h, weight, bias, y, temp, plan, vocab_offset or 0, softcap)
        if merge is not None:  # this shard's (M, S, C, z~_y) -> the whole vocabulary's; z stays the raw logits
            state = torch.stack(merge(r0, r1, *state.unbind(1)), 1)
        lp, en, *stats = _ops().finish(state)
        part, g_logp, g_ent = chunk_upstream(chunk_loss, r0, r1, lp, en)
        if (g_logp is not None or g_ent is not None) and any_grad:
            _chunk_grads(ws, grads, h, weight, bias, y, temp, plan, stats, _rows(g_logp, 0, r1 - r0, cdt),
                         _rows(g_ent, 0, r1 - r0, cdt), r0, z=None if plan.vocab_blocked else z,
                         offset=vocab_offset or 0, softcap=softcap)
        logp[r0:r1], ent[r0:r1] = lp, en
        loss += part
    return (loss, logp, ent, *grads.results(plan))


def logits_forward(logits, labels, temperature, plan: ChunkPlan, masked_rows: bool):
    """-> (logp, entropy, M, log S, C/S) from logits (N, V): one kernel call reads the caller's logits in place.
    Kept rows only (not ``logits_in_place``): ``masked_rows`` is always False here."""
    ops, N = _ops(), logits.shape[0]
    state = torch.empty(N, 4, dtype=compute_dtype(logits.dtype), device=logits.device)
    for r0, r1, z in _row_chunks(logits, plan):
        t, t_rows = _temp(temperature, r0, r1)
        state[r0:r1] = ops.block_stats(z, labels[r0:r1], 0, None, t, t_rows, 0.0, None)
    return ops.finish(state)


def logits_backward(logits, labels, temperature, plan: ChunkPlan, masked_rows: bool, m, log_s, cs, g_logp,
                    g_ent) -> Tensor:
    """-> dL/dlogits, a new tensor in the logits' dtype (the caller's logits are never modified)."""
    ops, (N, V), cdt = _ops(), logits.shape, compute_dtype(logits.dtype)
    grad = None
    for r0, r1, z in _row_chunks(logits, plan):
        t, t_rows = _temp(temperature, r0, r1)
        dz = ops.dlogits(z, labels[r0:r1], 0, None, t, t_rows, 0.0, *(_rows(x, r0, r1, cdt) for x in (m, log_s, cs)),
                         _rows(g_logp, r0, r1, cdt), _rows(g_ent, r0, r1, cdt))
        if r0 == 0 and r1 == N:
            return dz
        if grad is None:
            grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
        grad[r0:r1] = dz
    return torch.zeros_like(logits) if grad is None else grad


def _row_chunks(logits: Tensor, plan: ChunkPlan):
    """(r0, r1, rows with unit inner stride): the whole tensor at once when its rows are contiguous (the kernels need
    no workspace), else chunks of ``plan.rows`` copied one at a time (never the whole logits)."""
    N, V = logits.shape
    if V <= 1 or logits.stride(1) == 1:
        yield 0, N, logits
        return
    for r0, r1 in plan.ranges(N):
        yield r0, r1, logits[r0:r1].contiguous()


class NativeEngine(Engine):
    """The engine of ``backend="native"``: CPU tensors, every float dtype (fp32/bf16/fp16 with fp32 math, fp64)."""

    name = "native"
    default_budget_mb = 64.0  # counted in fp32 (Engine.block_elem_bytes): a bf16 block is 32 MiB; see
    # chunking.DEFAULT_BUDGET_MB for how the rows were chosen

    linear_forward = staticmethod(linear_forward)
    linear_backward = staticmethod(linear_backward)
    linear_fused = staticmethod(linear_fused)
    logits_forward = staticmethod(logits_forward)
    logits_backward = staticmethod(logits_backward)

    def __init__(self, module):
        self.module = module  # the loaded extension (rlkernels.native.load())
        _ops()  # register the custom ops now, so the first call pays nothing

    def supports(self, device: torch.device) -> Optional[str]:
        kind = torch.device(device).type
        if kind != "cpu":
            return f"the native engine runs on CPU tensors only (got {kind}); use backend='torch' or 'triton'"
        return None
