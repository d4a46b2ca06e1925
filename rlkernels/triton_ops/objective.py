"""The single pass's per-token objective in one launch: loss and its gradients w.r.t. log-prob and entropy.

The single pass (3 GEMMs, DESIGN.md) needs, for each row chunk, the chunk's summed loss and ``g_logp = dL/dlogp``,
``g_ent = dL/dH`` per token, to form dL/dz. Taken from :func:`rlkernels.objective.token_loss` by autograd, that is
about 70 small torch ops per chunk (the ratio, its clips, the KL estimator, the weights, then their backward): 272 of
the 708 ops of a 4-chunk grpo call, counted with a dispatch mode on the CPU; on the H100 a grpo call launched 488
kernels and its GPU idled 4.4 ms (77.9 ms busy; bench/results/gpu-h100/s18). Here it is one kernel, one program per
block of tokens, reading each per-token input once and writing ``g_logp``, ``g_ent`` and the block's partial loss
(the partials are summed in torch, in a fixed order: deterministic).

It computes what ``token_loss(logp, entropy, batch, prep, cfg).total.sum()`` and its autograd gradients compute, in
the same dtype (fp32; fp64 for fp64 inputs), for a token-level ratio (``ratio_level="token"``: every single-pass
config but the sequence-level ratios, which keep the torch path), per token n (B §2-4, §6):

    r = exp(clamp(logp - old, -c, c))            (old absent: logp - sg(logp), value 0, gradient 1)
    A' = A + min(alpha sg(H), |A| / kappa)        (entropy shaping, alpha > 0)
    pg = ppo / cispo / sapo / reinforce of (r, A', logp), times the IS weight, times omega where pg_keep
    kl = kl_coef omega k(logp - ref) [r_tok k with kl_is_corrected] where mask
    bonus = -entropy_coef omega H where ent_keep
    loss_n = pg + kl + bonus

The same kernel, in its METRICS mode, gives :func:`rlkernels.objective.metrics` of the whole step (the clip
fractions, ratio mean and extremes, approx_kl, entropy, KL, IS-weight and loss-term sums) as per-block partials that
a few torch reductions finish (:func:`token_metrics`), where the torch metrics took about 135 ops after the last
chunk.

The float hyperparameters are runtime arguments (two fp32 each, rebuilt in fp64 launches:
:func:`~rlkernels.triton_ops.tl_utils.split_f64`); the choices (policy loss, estimator, which inputs exist) are
constexprs, a handful of variants per run.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import KL_ESTIMATORS, POLICY_LOSSES, PolicyLossConfig
from ..objective import LossOutput, Prepared, TokenBatch, prepare
from .launch import cdiv, launch
from .tl_utils import clamp_grad, div_rn, join_f64, kl_estimate, split_f64

# POLICY constexpr codes, in config.POLICY_LOSSES' order
PPO, CISPO, SAPO, REINFORCE = (POLICY_LOSSES.index(p) for p in ("ppo", "cispo", "sapo", "reinforce"))
_PPO, _CISPO, _SAPO = tl.constexpr(PPO), tl.constexpr(CISPO), tl.constexpr(SAPO)  # (compiled Triton reads these)
BLOCK = 1024  # tokens per program: a 4096-row chunk is 4 programs (not tuned; README: the whole call on an H100)
NUM_WARPS = 4


# the METRICS launch's per-block partials, one row per program: sums over the block's kept tokens, then maxima
SUMS = ("pg_loss", "kl_loss", "entropy_loss", "kept", "clip_frac_low", "clip_frac_high", "clip_frac",
        "dual_clip_frac", "approx_kl", "ratio_mean", "entropy", "kl", "is_weight_mean", "rollout_masked_frac")
MAXES = ("ratio_max", "-ratio_min", "is_weight_max")
NUM_METRICS = len(SUMS) + len(MAXES)
_NUM_METRICS = tl.constexpr(NUM_METRICS)  # (compiled Triton reads no other globals)


@triton.jit(do_not_specialize=["n"])
def _token_objective_kernel(
    logp_ptr, ent_ptr, adv_ptr, old_ptr, ref_ptr, omega_ptr, isw_ptr, mask_ptr, pg_keep_ptr, ent_keep_ptr,
    rejected_ptr, g_logp_ptr, g_ent_ptr, part_ptr, n,
    low, low_lo, high, high_lo, upper, upper_lo, clamp, clamp_lo, alpha, alpha_lo, kappa, kappa_lo,
    tau_pos, tau_pos_lo, tau_neg, tau_neg_lo, kl_coef, kl_coef_lo, ent_coef, ent_coef_lo,
    POLICY: tl.constexpr, HAS_OLD: tl.constexpr, CLAMP: tl.constexpr, SHAPING: tl.constexpr,
    HAS_ISW: tl.constexpr, HAS_REF: tl.constexpr, KL_TERM: tl.constexpr, KL_EST: tl.constexpr,
    KL_ST: tl.constexpr, KL_CORR: tl.constexpr, ENT_TERM: tl.constexpr, METRICS: tl.constexpr,
    HAS_REJ: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of tokens. METRICS=False: g_logp, g_ent (ENT_TERM) and the block's loss into ``part_ptr[pid]``.
    METRICS=True: no gradients; the block's row of partials (SUMS then MAXES) into ``part_ptr[pid, :]``."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = idx < n
    lp = tl.load(logp_ptr + idx, mask=live, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + idx, mask=live, other=0.0).to(ACC)
    omega = tl.load(omega_ptr + idx, mask=live, other=0.0).to(ACC)
    pg_keep = tl.load(pg_keep_ptr + idx, mask=live, other=0).to(tl.int1)
    ent = tl.zeros_like(lp)
    if SHAPING or ENT_TERM or METRICS:
        ent = tl.load(ent_ptr + idx, mask=live, other=0.0).to(ACC)
    msk = tl.zeros_like(pg_keep)
    if KL_TERM or METRICS:
        msk = tl.load(mask_ptr + idx, mask=live, other=0).to(tl.int1)

    # the token log-ratio (B §2.1) and its derivative w.r.t. logp
    log_ratio = tl.zeros_like(lp)
    if HAS_OLD:
        log_ratio = lp - tl.load(old_ptr + idx, mask=live, other=0.0).to(ACC)
    old_gap = -log_ratio  # old - logp, before the clamp (approx_kl)
    d_log_ratio = tl.full(lp.shape, 1.0, ACC)
    if CLAMP:
        c = join_f64(clamp, clamp_lo, ACC)
        log_ratio, d_log_ratio = clamp_grad(log_ratio, -c, c)
    ratio = tl.exp(log_ratio)
    d_ratio = ratio * d_log_ratio

    if SHAPING:  # B §7.10: the entropy is sg, so A' carries no gradient
        bonus_a = join_f64(alpha, alpha_lo, ACC) * ent
        cap_a = div_rn(tl.abs(adv), tl.zeros_like(adv) + join_f64(kappa, kappa_lo, ACC))
        adv = adv + tl.minimum(bonus_a, cap_a, propagate_nan=tl.PropagateNan.ALL)

    # the policy term pg and d pg / d logp (B §3), before the weights
    lo_b = join_f64(low, low_lo, ACC)
    hi_b = join_f64(high, high_lo, ACC)
    dual = join_f64(upper, upper_lo, ACC)
    if POLICY == _PPO:  # ppo, closed form: A > 0 -> -A min(r, 1+eh); A < 0 -> -A clamp(r, 1-el, dual); inclusive
        r_pos, d_pos = clamp_grad(ratio, float("-inf"), hi_b)
        r_neg, d_neg = clamp_grad(ratio, lo_b, dual)
        pg = tl.where(adv > 0, -adv * r_pos, tl.where(adv < 0, -adv * r_neg, 0.0))
        d_pg = tl.where(adv > 0, -adv * d_pos, tl.where(adv < 0, -adv * d_neg, 0.0)) * d_ratio
    elif POLICY == _CISPO:  # cispo: -sg(clamp(r, 1-el, 1+eh)) A logp
        w, _unused = clamp_grad(ratio, lo_b, hi_b)
        d_pg = -w * adv
        pg = d_pg * lp
    elif POLICY == _SAPO:  # sapo: -sigmoid(tau (r - 1)) (4 / tau) A, tau by the sign of A
        tau = tl.where(adv > 0, join_f64(tau_pos, tau_pos_lo, ACC), join_f64(tau_neg, tau_neg_lo, ACC))
        gate = tl.sigmoid(tau * (ratio - 1.0))
        scale = div_rn(tl.full(lp.shape, 4.0, ACC), tau) * adv
        pg = -gate * scale
        d_pg = -(gate * (1.0 - gate)) * tau * scale * d_ratio
    else:  # reinforce: -A logp
        d_pg = -adv
        pg = d_pg * lp
    isw = tl.zeros_like(lp)
    if HAS_ISW:
        isw = tl.load(isw_ptr + idx, mask=live, other=0.0).to(ACC)
        pg = isw * pg
        d_pg = isw * d_pg
    loss_pg = tl.where(pg_keep, omega * pg, 0.0)
    g_logp = tl.where(pg_keep, omega * d_pg, 0.0)

    # B §4: the estimator k(logp - ref) [DeepSeek-V3.2's r_tok k with KL_CORR; r_tok is the ratio itself here];
    # the loss term kl_coef omega k on the mask
    kl_value = tl.zeros_like(lp)
    loss_kl = tl.zeros_like(lp)
    if HAS_REF:
        k, dk = kl_estimate(lp - tl.load(ref_ptr + idx, mask=live, other=0.0).to(ACC), KL_EST, KL_ST)
        if KL_CORR:
            dk = d_ratio * k + ratio * dk
            k = ratio * k
        kl_value = k
        if KL_TERM:
            w_kl = join_f64(kl_coef, kl_coef_lo, ACC) * omega
            loss_kl = tl.where(msk, w_kl * k, 0.0)
            g_logp += tl.where(msk, w_kl * dk, 0.0)
    loss_ent = tl.zeros_like(lp)
    w_ent = tl.zeros_like(lp)
    if ENT_TERM:  # B §5: -entropy_coef omega H on ent_keep
        ent_keep = tl.load(ent_keep_ptr + idx, mask=live, other=0).to(tl.int1)
        w_ent = tl.where(ent_keep, -join_f64(ent_coef, ent_coef_lo, ACC) * omega, 0.0)
        loss_ent = w_ent * ent

    if METRICS:  # objective.metrics' sums and extremes over this block's kept tokens (A.3)
        kept = msk & live
        clip_high = kept & (adv > 0) & (ratio > hi_b)
        clip_low = kept & (adv < 0) & (ratio < lo_b)
        clip_dual = kept & (adv < 0) & (ratio > dual)  # dual is inf when off: never
        if POLICY == _PPO:
            clip_any = clip_high | clip_low | clip_dual
        elif POLICY == _CISPO:
            clip_any = kept & (tl.minimum(tl.maximum(ratio, lo_b), hi_b) != ratio)
        else:
            clip_any = kept & (ratio != ratio)  # none
        rejected = tl.zeros_like(kept)
        if HAS_REJ:
            rejected = kept & tl.load(rejected_ptr + idx, mask=live, other=0).to(tl.int1)
        row = part_ptr + pid.to(tl.int64) * _NUM_METRICS  # in SUMS, then MAXES order
        tl.store(row + 0, tl.sum(loss_pg, axis=0))  # (0 off pg_keep, within the mask)
        tl.store(row + 1, tl.sum(loss_kl, axis=0))
        tl.store(row + 2, tl.sum(loss_ent, axis=0))
        tl.store(row + 3, tl.sum(kept.to(ACC), axis=0))
        tl.store(row + 4, tl.sum(clip_low.to(ACC), axis=0))
        tl.store(row + 5, tl.sum(clip_high.to(ACC), axis=0))
        tl.store(row + 6, tl.sum(clip_any.to(ACC), axis=0))
        tl.store(row + 7, tl.sum(clip_dual.to(ACC), axis=0))
        tl.store(row + 8, tl.sum(tl.where(kept, old_gap, 0.0), axis=0))
        tl.store(row + 9, tl.sum(tl.where(kept, ratio, 0.0), axis=0))
        tl.store(row + 10, tl.sum(tl.where(kept, ent, 0.0), axis=0))
        tl.store(row + 11, tl.sum(tl.where(kept, kl_value, 0.0), axis=0))
        tl.store(row + 12, tl.sum(tl.where(kept, isw, 0.0), axis=0))
        tl.store(row + 13, tl.sum(rejected.to(ACC), axis=0))
        tl.store(row + 14, tl.max(tl.where(kept, ratio, float("-inf")), axis=0))
        tl.store(row + 15, tl.max(tl.where(kept, -ratio, float("-inf")), axis=0))
        tl.store(row + 16, tl.max(tl.where(kept, isw, float("-inf")), axis=0))
    else:
        if ENT_TERM:
            tl.store(g_ent_ptr + idx, w_ent, mask=live)
        tl.store(g_logp_ptr + idx, g_logp, mask=live)
        tl.store(part_ptr + pid, tl.sum(tl.where(live, loss_pg + loss_kl + loss_ent, 0.0), axis=0))


def fusable(cfg: PolicyLossConfig) -> bool:
    """Whether the kernel computes ``cfg``'s objective: a token-level ratio (sequence-level ones couple a sequence's
    tokens through its mean log-ratio and keep the torch path)."""
    return cfg.ratio_level == "token"


def _float_args(cfg: PolicyLossConfig) -> Tuple[float, ...]:
    """The launch's float arguments, each as (hi, lo) (:func:`split_f64`), in the kernel's order."""
    low = -math.inf if cfg.clip_low is None else 1.0 - cfg.clip_low
    high = math.inf if cfg.clip_high is None else 1.0 + cfg.clip_high
    upper = math.inf if cfg.dual_clip is None else cfg.dual_clip
    clamp = 0.0 if cfg.log_ratio_clamp is None else cfg.log_ratio_clamp
    values = (low, high, upper, clamp, cfg.entropy_shaping_alpha, cfg.entropy_shaping_kappa, cfg.sapo_tau_pos,
              cfg.sapo_tau_neg, cfg.kl_coef, cfg.entropy_coef)
    return tuple(x for v in values for x in split_f64(float(v)))


def _launch(logp: Tensor, entropy: Tensor, batch: TokenBatch, prep: Prepared, rows: slice, cfg: PolicyLossConfig,
            metrics: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Run the kernel on rows ``rows`` of the step -> (partials, g_logp, g_ent): partials (grid,) of the loss and
    the gradients, or with ``metrics`` (grid, NUM_METRICS) partials and no gradients."""
    if not fusable(cfg):
        raise ValueError(f"cfg.ratio_level={cfg.ratio_level!r}: the fused objective takes token-level ratios")
    pick = lambda x: None if x is None else x[rows].contiguous()  # noqa: E731 (views of 1-D tensors: no copy)
    logp, entropy = logp.detach().contiguous(), entropy.detach().contiguous()
    old, ref, isw, rej = pick(batch.old_logprobs), pick(batch.ref_logprobs), pick(prep.is_weight), pick(prep.rejected)
    n = logp.shape[0]
    kl_term = ref is not None and cfg.kl_coef > 0
    ent_term = cfg.entropy_coef != 0
    grads = not metrics
    g_logp = torch.empty_like(logp) if grads else None
    g_ent = torch.empty_like(logp) if grads and ent_term else None
    grid = max(cdiv(n, BLOCK), 1)
    part = torch.empty((grid, NUM_METRICS) if metrics else grid, dtype=logp.dtype, device=logp.device)
    unused = logp  # the pointer for an absent input (its constexpr flag leaves it unread)
    or_unused = lambda x: unused if x is None else x  # noqa: E731
    launch(_token_objective_kernel, (grid,), logp, entropy, pick(batch.advantages), or_unused(old), or_unused(ref),
           pick(prep.omega), or_unused(isw), pick(batch.mask), pick(prep.pg_keep), pick(prep.ent_keep),
           or_unused(rej), or_unused(g_logp), or_unused(g_ent), part, n, *_float_args(cfg),
           POLICY=POLICY_LOSSES.index(cfg.policy_loss), HAS_OLD=old is not None,
           CLAMP=cfg.log_ratio_clamp is not None, SHAPING=cfg.entropy_shaping_alpha > 0, HAS_ISW=isw is not None,
           HAS_REF=ref is not None and (kl_term or metrics), KL_TERM=kl_term,
           KL_EST=KL_ESTIMATORS.index(cfg.kl_estimator), KL_ST=cfg.kl_straight_through, KL_CORR=cfg.kl_is_corrected,
           ENT_TERM=ent_term, METRICS=metrics, HAS_REJ=metrics and rej is not None,
           ACC=tl.float64 if logp.dtype == torch.float64 else tl.float32, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return part, g_logp, g_ent


def token_objective(logp: Tensor, entropy: Tensor, batch: TokenBatch, prep: Prepared, cfg: PolicyLossConfig,
                    rows: slice = slice(None)) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(loss, g_logp, g_ent) of the per-token objective on rows ``rows`` of a step.

    Args:
        logp, entropy: ``(n,)`` fp32 (fp64) log-probs and entropies of the current policy on those rows.
        batch, prep: the step's per-token data (:class:`~rlkernels.objective.TokenBatch`, ``(N,)`` tensors in the
            same dtype, bool masks) and constants (:class:`~rlkernels.objective.Prepared`), sliced by ``rows``.
        cfg: a config with a token-level ratio (:func:`fusable`).

    Returns: ``loss`` (0-dim, the sum over the rows), ``g_logp`` (n,) and ``g_ent`` (n,) or None when the loss does
    not depend on the entropy (``entropy_coef == 0``), in ``logp``'s dtype. Equivalent to::

        total = token_loss(logp, entropy, batch.select(rows), prep.select(rows), cfg).total.sum()
        g_logp, g_ent = torch.autograd.grad(total, (logp, entropy), allow_unused=True)
    """
    part, g_logp, g_ent = _launch(logp, entropy, batch, prep, rows, cfg, metrics=False)
    return part.sum(), g_logp, g_ent


def token_metrics(logp: Tensor, entropy: Tensor, batch: TokenBatch, prep: Prepared,
                  cfg: PolicyLossConfig) -> Dict[str, Tensor]:
    """:func:`rlkernels.objective.metrics` of the whole step (``(N,)`` ``logp``/``entropy``, fp32 or fp64) in one
    launch and a few reductions, instead of its ~110 torch ops and ``token_loss``'s ~25: the same keys, as detached
    fp32 scalars. Equivalent to::

        metrics(token_loss(logp, entropy, batch, prep, cfg), logp, entropy, batch, prep, cfg)
    """
    part, _, _ = _launch(logp, entropy, batch, prep, slice(None), cfg, metrics=True)
    n_sums = len(SUMS)
    sums, maxes = part[:, :n_sums].sum(0), part[:, n_sums:].amax(0)
    kept = sums[3]
    means = sums[4:] / kept.clamp(min=1)  # clip fractions ... rollout_masked_frac
    # an empty batch: every extreme is 0 (objective._masked_extreme), not -inf; ratio_min = -max(-ratio) (negated
    # in place: a tensor of signs made from a list would be a copy from the host)
    maxes = torch.where(kept > 0, maxes, torch.zeros_like(maxes))
    maxes[1:2].neg_()
    values = torch.cat([sums[:3].sum().view(1), sums[:3], means, maxes]).float().unbind()
    names = ("loss",) + SUMS[:3] + SUMS[4:] + ("ratio_max", "ratio_min", "is_weight_max")
    out = dict(zip(names, values))
    if batch.ref_logprobs is None:
        del out["kl"]
    if prep.is_weight is None:
        for name in ("is_weight_mean", "is_weight_max", "rollout_masked_frac"):
            del out[name]
    if prep.opsm_masked is not None:  # (a subset of the mask)
        out["opsm_masked_frac"] = (prep.opsm_masked.sum() / kept.clamp(min=1)).float()
    return out


class _FusedTokenLoss(torch.autograd.Function):
    """sum_n loss_n of :func:`token_objective` on every row, its gradients formed in forward and scaled by the
    upstream gradient in backward. Once differentiable: a backward that builds a graph (``create_graph=True``, for
    a second derivative) raises, instead of a graph with the second derivative missing."""

    @staticmethod
    def forward(ctx, logp, entropy, batch, prep, cfg):
        loss, g_logp, g_ent = token_objective(logp, entropy, batch, prep, cfg)
        ctx.has_ent = g_ent is not None
        ctx.save_for_backward(g_logp, *((g_ent,) if ctx.has_ent else ()))
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("the fused objective's loss is once differentiable (its gradients are formed in "
                               "forward): for create_graph=True take the torch ops (policy_loss(backend='torch'), "
                               "or RLKERNELS_FUSED_OBJECTIVE=off)")
        saved = ctx.saved_tensors
        return saved[0] * g_loss, saved[1] * g_loss if ctx.has_ent else None, None, None, None


def policy_loss_flat(logp: Tensor, entropy: Tensor, batch: TokenBatch, cfg: PolicyLossConfig) -> LossOutput:
    """:func:`rlkernels.objective.policy_loss_flat` (the objective on flat ``(N,)`` ``logp``/``entropy``, the
    two-stage path's and :func:`rlkernels.policy_loss`'s) with the per-token loss and its gradients from one launch
    and the metrics from another, for a :func:`fusable` config: (loss, metrics), ``loss`` differentiable w.r.t.
    ``logp`` and ``entropy`` (once). The step constants may need the log-probs here (entropy quantile, off-policy
    sequence mask): :func:`~rlkernels.objective.prepare` takes them detached, then every term is per token."""
    prep = prepare(batch, cfg, logp.detach(), entropy.detach())
    loss = _FusedTokenLoss.apply(logp, entropy, batch, prep, cfg)
    out = token_metrics(logp.detach(), entropy.detach(), batch, prep, cfg)
    out["loss"] = loss.detach().float()
    return LossOutput(loss, out)


def chunk_upstream(objective, r0: int, r1: int, logp: Tensor, entropy: Tensor
                   ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``torch_engine.chunk_upstream`` for an :class:`rlkernels.objective.ChunkObjective` whose config is
    :func:`fusable`: (the chunk's loss, g_logp, g_ent) of rows [r0, r1) by :func:`token_objective`."""
    return token_objective(logp, entropy, objective.batch, objective.prep, objective.cfg, slice(r0, r1))
