"""The portable engine: chunked PyTorch that never holds more than one block of logits.

Per row chunk (and per vocabulary block when a row chunk of the full vocabulary would exceed the memory budget):

* forward: one GEMM to the block of logits, then the online log-sum-exp state ``(M, S, C)`` of LOSSES.md B §1.2 with
  the cancellation-free entropy ``H = log S - C / S`` (B §1.1); only ``M``, ``log S`` and ``C / S`` are saved per row;
* backward: recompute the block, form ``dL/dz = [g_logp (1_y - p) - g_H p (z~ - mu)] / T`` (B §1.3) in place, two GEMMs
  for the hidden and weight gradients, ``grad_weight`` accumulated in fp32;
* single pass (token-separable objectives, and sequence-level ratios over row chunks of whole sequences): the forward asks the objective for the per-token upstream gradients of the
  chunk right away and forms ``dL/dz`` while the logits are still in memory: 3 GEMMs instead of 4.

These are plain functions (the engine primitives of :class:`rlkernels.engines.Engine`); the autograd wiring and the
``torch.library`` ops that call them live in :mod:`rlkernels.engines.autograd`, shared by every engine.

Workspaces are allocated once per call and reused across chunks with ``out=`` ops: on CPU a fresh 64 MiB tensor
costs page faults worth ~3 elementwise passes (measured: ``torch.exp`` 30 ms allocating vs 8.6 ms into a buffer at
512 x 32000 fp32 on this project's 2-core machine).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from .chunking import ChunkPlan

# -inf logits (masked vocabulary) are floored here so that exp() gives exactly 0 and p * (z - mu) gives 0 * finite
# instead of 0 * inf = nan (B §10.5). No real logit comes near it; labels are gathered before the floor, so a -inf
# label logit still gives logp = -inf.
LOGIT_FLOOR = -1e20

Temperature = Union[float, Tensor]  # python float, or (N,) tensor in the compute dtype
ChunkLoss = Callable[[int, int, Tensor, Tensor], Tensor]
# (M, S, C, z~_y) of a row chunk on this tensor-parallel shard -> the same over the whole vocabulary
ChunkMerge = Callable[[Tensor, Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor, Tensor]]
# the same for rows r0:r1 of the call: (r0, r1, M, S, C, z~_y) -> (M, S, C, z~_y)
RowsMerge = Callable[[int, int, Tensor, Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor, Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic runs in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Workspace:
    """Reusable block buffers: ``z`` (logits in the compute dtype), ``p`` (exponentials), for half inputs of the
    GEMM path a GEMM output block and a weight-gradient block in the input dtype, and for a softcap's gradient the
    block of its derivatives ``1 - tanh^2`` (``cap_grad``: a third compute-dtype block)."""

    def __init__(self, plan: ChunkPlan, like: Tensor, gemm: bool = True, need_wgrad: bool = False,
                 cap_grad: bool = False):
        rows, vb = plan.rows, plan.vocab_block
        dev, dt = like.device, like.dtype
        self.cdt = compute_dtype(dt)
        self.half = self.cdt != dt
        self.z = torch.empty(rows, vb, dtype=self.cdt, device=dev)
        self.p = torch.empty(rows, vb, dtype=self.cdt, device=dev)
        self.zh = torch.empty(rows, vb, dtype=dt, device=dev) if (self.half and gemm) else None
        self.gw = torch.empty(vb, like.shape[1], dtype=dt, device=dev) if (self.zh is not None and need_wgrad) else None
        self.f = torch.empty(rows, vb, dtype=self.cdt, device=dev) if cap_grad else None


def _block(buf: Tensor, r: int, v: int) -> Tensor:
    """A contiguous (r, v) view at the start of a (rows, vocab_block) workspace buffer."""
    return buf[:r] if v == buf.shape[1] else buf.view(-1)[: r * v].view(r, v)


def _rows(x: Temperature, r0: int, r1: int) -> Temperature:
    return x if not isinstance(x, Tensor) else x[r0:r1, None]


def _logits_block(ws: _Workspace, h: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int,
                  temperature: Temperature, softcap: float = 0.0, cap_grad: bool = False) -> Tensor:
    """z~ = (h @ W[v0:v1].T + b) / T into the workspace, in the compute dtype (GEMM in the input dtype); with a
    ``softcap`` s > 0, z~ = s tanh((h @ W.T + b) / s) / T, and with ``cap_grad`` the block of dz~/d(raw logit) T =
    1 - tanh^2 into ``ws.f`` (see :func:`_dlogits_`)."""
    z = _block(ws.z, h.shape[0], v1 - v0)
    w = weight[v0:v1]
    if ws.half:
        zh = _block(ws.zh, h.shape[0], v1 - v0)
        torch.mm(h, w.T, out=zh)
        z.copy_(zh)
        if bias is not None:
            z.add_(bias[v0:v1])
    elif bias is not None:
        torch.addmm(bias[v0:v1].to(z.dtype), h, w.T, out=z)
    else:
        torch.mm(h, w.T, out=z)
    if softcap:
        z.div_(softcap).tanh_()  # -inf (a banned token's bias) -> -1: the capped logit is -s, finite
        if cap_grad:
            f = _block(ws.f, *z.shape)
            torch.mul(z, z, out=f).neg_().add_(1.0)
        z.mul_(softcap)
    if not (isinstance(temperature, float) and temperature == 1.0):
        z.div_(temperature)
    return z


def _shift_(z: Tensor, labels_local: Tensor, in_block: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Gather the label logit (before the floor), floor -inf, subtract the row max in place. Returns (M, z~_y)."""
    zy = z.gather(1, labels_local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    if in_block is not None:
        zy = torch.where(in_block, zy, torch.full_like(zy, -torch.inf))
    z.clamp_(min=LOGIT_FLOOR)
    m = z.amax(1)
    z.sub_(m[:, None])
    return m, zy


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    # batched 1 x V @ V x 1 products: 4x faster than (a * b).sum(1), which allocates a block (512 x 32000 fp32, CPU)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _block_state(ws: _Workspace, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """For t = z~ - M: p-buffer <- exp(t); returns (exp buffer, S = sum exp(t), C = sum exp(t) * t)."""
    e = _block(ws.p, *t.shape)
    torch.exp(t, out=e)
    return e, e.sum(1), _rowdot(e, t)


def _merge(state, m_b: Tensor, s_b: Tensor, c_b: Tensor):
    """Online merge of (M, S, C) states, C taken relative to M (B §1.2)."""
    if state is None:
        return m_b, s_b, c_b
    m, s, c = state
    m_new = torch.maximum(m, m_b)
    a, a_b = torch.exp(m - m_new), torch.exp(m_b - m_new)
    return m_new, a * s + a_b * s_b, a * (c + (m - m_new) * s) + a_b * (c_b + (m_b - m_new) * s_b)


def _dlogits_(t: Tensor, p: Tensor, cs: Tensor, g_logp: Optional[Tensor], g_ent: Optional[Tensor],
              labels_local: Tensor, in_block: Optional[Tensor], temperature: Temperature,
              cap_grad: Optional[Tensor] = None) -> Tensor:
    """dL/dz = [g_logp (1_y - p) - g_H p (t - C/S)] / T, with t = z~ - M and p the probabilities, formed in place in
    ``t`` (or ``p`` when there is no entropy gradient). Both buffers may be overwritten; returns the one holding it.
    ``cap_grad``: a softcap's 1 - tanh^2 of each logit (the chain rule through s tanh(z / s)), multiplied in."""
    if g_ent is not None:
        dz = t.sub_(cs[:, None]).mul_(g_ent[:, None])
        if g_logp is not None:
            dz.add_(g_logp[:, None])
        dz.mul_(p).neg_()
    else:
        dz = p.mul_(g_logp.neg()[:, None])
    if g_logp is not None:
        add = g_logp if in_block is None else torch.where(in_block, g_logp, torch.zeros_like(g_logp))
        dz.scatter_add_(1, labels_local.clamp(0, dz.shape[1] - 1)[:, None], add[:, None])
    if not (isinstance(temperature, float) and temperature == 1.0):
        dz.div_(temperature)
    if cap_grad is not None:
        dz.mul_(cap_grad)
    return dz


class _Grads:
    """Gradient accumulators: grad_hidden in the input dtype, grad_weight / grad_bias in fp32 (or fp64)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_h: bool, need_w: bool,
                 need_b: bool):
        cdt = compute_dtype(hidden.dtype)
        self.h = torch.zeros_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if (need_b and bias is not None) else None
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype

    def add_block(self, ws: _Workspace, dz: Tensor, h: Tensor, weight: Tensor, r0: int, v0: int, v1: int,
                  blocked: bool) -> None:
        w = weight[v0:v1]
        if ws.half:
            dzh = _block(ws.zh, *dz.shape)
            dzh.copy_(dz)
            if self.h is not None:
                gh = self.h[r0: r0 + dz.shape[0]]
                if blocked:  # accumulate across vocab blocks in the compute dtype, rounded once per block
                    gh.add_(dzh @ w)
                else:
                    torch.mm(dzh, w, out=gh)
            if self.w is not None:
                gw = ws.gw[: v1 - v0]
                torch.mm(dzh.T, h, out=gw)
                self.w[v0:v1].add_(gw)
        else:
            if self.h is not None:
                self.h[r0: r0 + dz.shape[0]].addmm_(dz, w)
            if self.w is not None:
                self.w[v0:v1].addmm_(dz.T, h)
        if self.b is not None:
            self.b[v0:v1].add_(dz.sum(0))

    def results(self):
        w = None if self.w is None else self.w.to(self.weight_dtype)
        b = None if self.b is None else self.b.to(self.bias_dtype)
        return self.h, w, b


# ----------------------------------------------------------------------------------------------------------------
# row-chunk passes shared by the three autograd functions
# ----------------------------------------------------------------------------------------------------------------
def merged_chunk_stats(V: int, plan: ChunkPlan, block_stats, merge: Optional[ChunkMerge] = None):
    """Run ``block_stats(v0, v1) -> (M_b, S_b, C_b, z~_y or -inf)`` over the vocabulary blocks of one row chunk, merge
    the states online (B §1.2), merge them across tensor-parallel shards with ``merge`` when given, and finish:
    (M, log S, C/S, logp, entropy). Shared by the engines whose kernels return one block's state at a time."""
    state, zy = None, None
    for v0 in range(0, V, plan.vocab_block):
        v1 = min(v0 + plan.vocab_block, V)
        m_b, s_b, c_b, zy_b = block_stats(v0, v1)
        state = _merge(state, m_b, s_b, c_b)
        zy = zy_b if zy is None else torch.maximum(zy, zy_b)  # exactly one block holds the label
    m, s, c = state
    if merge is not None:
        m, s, c, zy = merge(m, s, c, zy)
    return (m, *finish_stats(m, s, c, zy))


def finish_stats(m: Tensor, s: Tensor, c: Tensor, zy: Tensor):
    """(log S, C/S, logp, entropy) from a row's merged state (M, S, C) and its label logit z~_y (B §1.1):
    logp = (z~_y - M) - log S, entropy = log S - C/S. Every engine finishes here. (z~_y - M) first: exact when z~_y is
    near M, so logp keeps its accuracy when |logits| ~ 1e4, where z~_y - (M + log S) would round M + log S to
    ulp(1e4) = 1e-3 in fp32."""
    log_s = torch.log(s)
    cs = c / s
    return log_s, cs, (zy - m) - log_s, log_s - cs


def forward_rows(hidden: Tensor, plan: ChunkPlan, chunk_stats):
    """The row-chunk loop of ``linear_forward``: ``chunk_stats(r0, r1) -> (M, log S, C/S, logp, entropy)`` per chunk,
    gathered into (logp, entropy, M, log S, C/S), each (N,) in the compute dtype."""
    N = hidden.shape[0]
    out = [torch.empty(N, dtype=compute_dtype(hidden.dtype), device=hidden.device) for _ in range(5)]
    for r0, r1 in plan.ranges(N):
        m, log_s, cs, logp, ent = chunk_stats(r0, r1)
        for i, x in enumerate((logp, ent, m, log_s, cs)):
            out[i][r0:r1] = x
    return tuple(out)


def _chunk_stats(ws, h, weight, bias, labels, temperature, plan, offset: Optional[int] = None,
                 merge: Optional[ChunkMerge] = None, softcap: float = 0.0):
    """Forward statistics of one row chunk over all vocabulary blocks (and shards, with ``merge``):
    (M, log S, C/S, logp, entropy)."""

    def block_stats(v0, v1):
        z = _logits_block(ws, h, weight, bias, v0, v1, temperature, softcap)
        local, in_block = _locate(labels, (offset or 0) + v0, v1 - v0, plan.vocab_blocked or offset is not None)
        m_b, zy_b = _shift_(z, local, in_block)
        _, s_b, c_b = _block_state(ws, z)
        return m_b, s_b, c_b, zy_b

    return merged_chunk_stats(weight.shape[0], plan, block_stats, merge)


def _chunk_backward(ws, grads, h, weight, bias, labels, temperature, plan, m, log_s, cs, g_logp, g_ent, r0,
                    offset: Optional[int] = None, softcap: float = 0.0):
    """Recompute each vocabulary block of a row chunk and accumulate its gradients."""
    V = weight.shape[0]
    for v0 in range(0, V, plan.vocab_block):
        v1 = min(v0 + plan.vocab_block, V)
        t = _logits_block(ws, h, weight, bias, v0, v1, temperature, softcap, cap_grad=bool(softcap))
        t.clamp_(min=LOGIT_FLOOR).sub_(m[:, None])
        p = _block(ws.p, *t.shape)
        torch.sub(t, log_s[:, None], out=p).exp_()
        local, in_block = _locate(labels, (offset or 0) + v0, v1 - v0, plan.vocab_blocked or offset is not None)
        dz = _dlogits_(t, p, cs, g_logp, g_ent, local, in_block, temperature, _cap_grad(ws, t, softcap))
        grads.add_block(ws, dz, h, weight, r0, v0, v1, plan.vocab_blocked)


def _cap_grad(ws: _Workspace, t: Tensor, softcap: float) -> Optional[Tensor]:
    """The block of 1 - tanh^2 that :func:`_logits_block` wrote for a softcap, shaped like ``t``, or None."""
    return _block(ws.f, *t.shape) if softcap else None


def _locate(labels: Tensor, first: int, width: int, partial: bool):
    """Labels relative to a block of the vocabulary starting at global id ``first``, and (when the block is not the
    whole vocabulary: a vocab block, or a tensor-parallel shard) which rows' labels fall inside it."""
    local = labels - first
    return local, ((local >= 0) & (local < width)) if partial else None


def _as_temperature(temperature: Temperature, r0: int, r1: int) -> Temperature:
    return _rows(temperature, r0, r1) if isinstance(temperature, Tensor) else float(temperature)


def linear_forward(hidden, weight, bias, labels, temperature, plan: ChunkPlan, vocab_offset: Optional[int] = None,
                   softcap: float = 0.0):
    """(hidden (N,H), weight (V,H), bias (V,)|None, labels (N,) int64, temperature float|(N,)) ->
    (logp, entropy, M, log S, C/S), each (N,) in the compute dtype. The last three are all backward needs.

    ``vocab_offset``: None for the whole vocabulary; for a tensor-parallel shard, the global id of weight row 0
    (labels outside the shard then give logp = -inf, to be merged across shards by :mod:`rlkernels.distributed`).
    ``softcap``: s > 0 caps the logits to s tanh(logits / s) before the temperature; 0 leaves them."""
    ws = _Workspace(plan, hidden)
    return forward_rows(hidden, plan, lambda r0, r1: _chunk_stats(
        ws, hidden[r0:r1], weight, bias, labels[r0:r1], _as_temperature(temperature, r0, r1), plan, vocab_offset,
        softcap=softcap))


def linear_backward(hidden, weight, bias, labels, temperature, plan: ChunkPlan, m, log_s, cs, g_logp, g_ent,
                    need_h: bool, need_w: bool, need_b: bool, vocab_offset: Optional[int] = None,
                    softcap: float = 0.0):
    """Recompute each logits block and accumulate (grad_hidden, grad_weight, grad_bias); None where not needed.
    ``g_logp``/``g_ent`` may be None (that term is skipped)."""
    grads = _Grads(hidden, weight, bias, need_h, need_w, need_b)
    ws = _Workspace(plan, hidden, need_wgrad=need_w, cap_grad=bool(softcap))
    N = hidden.shape[0]
    for r0, r1 in plan.ranges(N):
        sl = slice(r0, r1)
        _chunk_backward(ws, grads, hidden[sl], weight, bias, labels[sl], _as_temperature(temperature, r0, r1),
                        plan, m[sl], log_s[sl], cs[sl], None if g_logp is None else g_logp[sl],
                        None if g_ent is None else g_ent[sl], r0, vocab_offset, softcap)
    return grads.results()


def chunk_upstream(chunk_loss: ChunkLoss, r0: int, r1: int, logp: Tensor, ent: Tensor):
    """Per-token loss of the chunk and its gradients w.r.t. (logp, entropy), from the objective itself."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_()
        en = ent.detach().requires_grad_()
        per_token = chunk_loss(r0, r1, lp, en)
        total = per_token.sum()
        if total.requires_grad:
            g_logp, g_ent = torch.autograd.grad(total, (lp, en), allow_unused=True)
        else:
            g_logp = g_ent = None
    return total.detach(), g_logp, g_ent


def fused_outputs(hidden: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The single pass's (logp, entropy, loss) buffers: (N,), (N,) and a zero scalar, in the compute dtype."""
    cdt = compute_dtype(hidden.dtype)
    logp = torch.empty(hidden.shape[0], dtype=cdt, device=hidden.device)
    return logp, torch.empty_like(logp), torch.zeros((), dtype=cdt, device=hidden.device)


def linear_fused(hidden, weight, bias, labels, temperature, plan: ChunkPlan, chunk_loss: ChunkLoss,
                 need_h: bool, need_w: bool, need_b: bool, vocab_offset: Optional[int] = None,
                 merge: Optional[RowsMerge] = None, softcap: float = 0.0):
    """Single pass: (loss, logp, entropy, grad_hidden, grad_weight, grad_bias) with the gradients formed chunk by
    chunk from ``chunk_loss(r0, r1, logp_chunk, entropy_chunk) -> per-token loss``. Only valid when a chunk's
    gradients do not depend on other chunks: token-separable objectives, or sequence-separable ones with
    ``plan.bounds`` at sequence boundaries. ``vocab_offset``, ``merge``: a tensor-parallel shard of the LM head
    (``vocab_offset`` the global id of weight row 0), whose per-chunk state ``merge(r0, r1, M, S, C, z~_y)`` turns
    into the whole vocabulary's (collectives, once per chunk), so the gradients are this shard's. ``softcap``: as in
    :func:`linear_forward`."""
    N, V = hidden.shape[0], weight.shape[0]
    logp, ent, loss = fused_outputs(hidden)
    grads = _Grads(hidden, weight, bias, need_h, need_w, need_b)
    ws = _Workspace(plan, hidden, need_wgrad=need_w, cap_grad=bool(softcap))
    for r0, r1 in plan.ranges(N):
        h, y, temp = hidden[r0:r1], labels[r0:r1], _as_temperature(temperature, r0, r1)
        chunk_merge = None if merge is None else functools.partial(merge, r0, r1)
        if plan.vocab_blocked:  # statistics first, then a recompute pass per block
            m, log_s, cs, lp, en = _chunk_stats(ws, h, weight, bias, y, temp, plan, vocab_offset, chunk_merge,
                                                softcap)
            part, g_logp, g_ent = chunk_upstream(chunk_loss, r0, r1, lp, en)
            if g_logp is not None or g_ent is not None:
                _chunk_backward(ws, grads, h, weight, bias, y, temp, plan, m, log_s, cs, g_logp, g_ent, r0,
                                vocab_offset, softcap)
        else:  # the logits block stays in memory between statistics and gradient
            t = _logits_block(ws, h, weight, bias, 0, V, temp, softcap, cap_grad=bool(softcap))
            local, in_block = _locate(y, vocab_offset or 0, V, vocab_offset is not None)
            m_local, zy = _shift_(t, local, in_block)
            e, s, c = _block_state(ws, t)
            m = m_local
            if chunk_merge is not None:
                m, s, c, zy = chunk_merge(m_local, s, c, zy)
            log_s, cs, lp, en = finish_stats(m, s, c, zy)
            part, g_logp, g_ent = chunk_upstream(chunk_loss, r0, r1, lp, en)
            if g_logp is not None or g_ent is not None:
                if chunk_merge is None:
                    p = e.div_(s[:, None])
                else:  # t and e are relative to this shard's max: p = exp(t - (M - m) - log S), t - C/S likewise
                    p = e.mul_(torch.exp(m_local - m - log_s)[:, None])
                    cs = cs + (m - m_local)
                dz = _dlogits_(t, p, cs, g_logp, g_ent, local, in_block, temp, _cap_grad(ws, t, softcap))
                grads.add_block(ws, dz, h, weight, r0, 0, V, False)
        logp[r0:r1], ent[r0:r1] = lp, en
        loss += part
    return (loss, logp, ent, *grads.results())


def logits_forward(logits, labels, temperature, plan: ChunkPlan, masked_rows: bool):
    """(logits (N,V), labels (N,) int64, temperature float|(N,)) -> (logp, entropy, M, log S, C/S), each (N,).
    Kept rows only (not ``logits_in_place``): ``masked_rows`` is always False here."""
    N = logits.shape[0]
    out = [torch.empty(N, dtype=compute_dtype(logits.dtype), device=logits.device) for _ in range(5)]
    ws = _Workspace(_full_vocab(plan), logits, gemm=False)
    for r0, r1 in plan.ranges(N):
        z = _load_logits(ws, logits, r0, r1, _as_temperature(temperature, r0, r1))
        m, zy = _shift_(z, labels[r0:r1], None)
        _, s, c = _block_state(ws, z)
        log_s, cs, lp, en = finish_stats(m, s, c, zy)
        for i, x in enumerate((lp, en, m, log_s, cs)):
            out[i][r0:r1] = x
    return tuple(out)


def logits_backward(logits, labels, temperature, plan: ChunkPlan, masked_rows: bool, m, log_s, cs, g_logp, g_ent):
    """dL/dlogits as a new tensor in the logits' dtype: the caller's logits are never modified."""
    N = logits.shape[0]
    grad = torch.empty_like(logits)
    ws = _Workspace(_full_vocab(plan), logits, gemm=False)
    for r0, r1 in plan.ranges(N):
        sl = slice(r0, r1)
        temp = _as_temperature(temperature, r0, r1)
        t = _load_logits(ws, logits, r0, r1, temp)
        t.clamp_(min=LOGIT_FLOOR).sub_(m[sl, None])
        p = _block(ws.p, *t.shape)
        torch.sub(t, log_s[sl, None], out=p).exp_()
        dz = _dlogits_(t, p, cs[sl], None if g_logp is None else g_logp[sl],
                       None if g_ent is None else g_ent[sl], labels[sl], None, temp)
        grad[sl].copy_(dz)
    return grad


def _full_vocab(plan: ChunkPlan) -> ChunkPlan:
    # the logits path reads whole rows: the caller's logits already exist, so only the row count is budgeted
    return ChunkPlan(rows=plan.rows, vocab_block=plan.vocab, vocab=plan.vocab)


def _load_logits(ws: _Workspace, logits: Tensor, r0: int, r1: int, temperature: Temperature) -> Tensor:
    z = _block(ws.z, r1 - r0, logits.shape[1])
    z.copy_(logits[r0:r1])
    if not (isinstance(temperature, float) and temperature == 1.0):
        z.div_(temperature)
    return z
