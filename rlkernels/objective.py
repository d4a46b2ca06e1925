"""The policy objective on N-sized per-token tensors: ratios, surrogates, clipping, KL, entropy, aggregation, metrics.

This is the one production implementation of the loss algebra (LOSSES.md, Part A conventions). It never sees the
vocabulary: engines hand it per-token ``logp`` and ``entropy`` as ordinary autograd tensors, so every engine and
any user-built loss share it. :mod:`rlkernels.reference` is the independent, readable spec it is tested against.

Layout: every per-token tensor is flat ``(N,)``; ``TokenBatch.seq_ids`` says which sequence each token belongs to
(``num_seqs`` sequences, empty ones included). Masked tokens hold garbage-free zeros (the input layer sanitises
them with ``where``), and everything here multiplies by weights that are exactly zero off the mask, so padding never
contributes loss or gradient.

The computation is split so that the engine's single-pass mode can reuse it chunk by chunk:

* :func:`prepare` computes the constants of the step: aggregation weights ``omega``, rollout-correction weights and
  the masks that depend on whole sequences or the whole batch (off-policy sequence mask, entropy quantile);
* :func:`token_loss` is purely elementwise in ``logp``/``entropy`` once those constants are fixed;
* :func:`policy_loss` = prepare + token_loss + sum + metrics.

For token-separable configs (:func:`is_token_separable`) ``prepare`` needs no log-probs, so ``token_loss`` applied to a
chunk of rows is exactly that chunk of the full result; for sequence-separable ones (:func:`is_sequence_separable`:
sequence-level ratios) the same holds for chunks of whole sequences.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Dict, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .config import PolicyLossConfig

# rollout-correction log-ratio exponents are clamped to [-20, 20] before exp (verl's SAFETY_BOUND, B §2.4)
ROLLOUT_LOG_RATIO_BOUND = 20.0


class LossOutput(NamedTuple):
    """What :func:`rlkernels.fused_grpo_loss` returns: the scalar loss and a dict of detached fp32 scalar metrics."""

    loss: Tensor
    metrics: Dict[str, Tensor]


@dataclass
class TokenBatch:
    """The rollout data of one call, flattened to tokens. All per-token tensors are ``(N,)`` in the compute dtype
    (fp32, or fp64 for fp64 inputs) and hold 0 at masked positions."""

    mask: Tensor  # (N,) bool
    seq_ids: Tensor  # (N,) int64, values in [0, num_seqs)
    num_seqs: int
    advantages: Tensor  # (N,)
    old_logprobs: Optional[Tensor] = None
    ref_logprobs: Optional[Tensor] = None
    rollout_logprobs: Optional[Tensor] = None
    is_weights: Optional[Tensor] = None
    normalizer: Optional[Union[float, Tensor]] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.advantages.dtype

    def select(self, index: Union[Tensor, slice]) -> "TokenBatch":
        """The tokens at ``index`` (a slice or an index tensor); sequence-level facts are kept."""
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return replace(
            self,
            mask=self.mask[index],
            seq_ids=self.seq_ids[index],
            advantages=self.advantages[index],
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            rollout_logprobs=pick(self.rollout_logprobs),
            is_weights=pick(self.is_weights),
        )


@dataclass
class Prepared:
    """Per-token constants of one step (all sg): aggregation weights and the masks and IS weights of the policy term."""

    omega: Tensor  # (N,) aggregation weight, 0 off the mask
    is_weight: Optional[Tensor]  # (N,) rollout-correction / user IS weight, or None
    rejected: Optional[Tensor]  # (N,) bool: raw rollout ratio outside [cap_low, cap_high]
    pg_keep: Tensor  # (N,) bool: tokens whose policy term counts (mask, OPSM, entropy quantile)
    ent_keep: Tensor  # (N,) bool: tokens whose entropy bonus counts (mask, entropy quantile)
    opsm_masked: Optional[Tensor]  # (N,) bool, when the off-policy sequence mask is on

    def select(self, index: Union[Tensor, slice]) -> "Prepared":
        return Prepared(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                           for f in fields(self)})


# ----------------------------------------------------------------------------------------------------------------
# small shared pieces
# ----------------------------------------------------------------------------------------------------------------
def segment_sum(values: Tensor, seq_ids: Tensor, num_seqs: int) -> Tensor:
    """Sum of ``values`` (N,) per sequence -> (num_seqs,). Differentiable in ``values``."""
    # scatter_reduce rather than index_add: the same sums, and inductor's CPU backend runs it as the ATen kernel
    # (config.cpp.fallback_scatter_reduce_sum) where its vectorised code for index_add failed on the affine index of
    # a padded batch's seq_ids (arange(B).repeat_interleave(T)): torch 2.13, an AssertionError in codegen/cpp.py
    return torch.zeros(num_seqs, dtype=values.dtype, device=values.device).scatter_reduce(0, seq_ids, values, "sum")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _masked_extreme(x: Tensor, mask: Tensor, largest: bool) -> Tensor:
    fill = -math.inf if largest else math.inf
    v = torch.where(mask, x, torch.full_like(x, fill))
    v = torch.cat([v, v.new_full((1,), fill)])  # an empty batch reduces to the fill, then to 0 below
    v = v.max() if largest else v.min()
    return torch.where(mask.any(), v, torch.zeros_like(v))


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL estimate between the policy and a reference from sampled-token log-probs (LOSSES.md B §4).

    Args:
        logp: ``(...)`` float, log-probs of the sampled tokens under the policy (differentiable).
        ref_logp: ``(...)`` float, the same under the reference policy (treated as a constant).
        estimator: ``"k1"`` (d), ``"abs"`` (|d|), ``"k2"`` (d^2/2), ``"k3"`` (exp(-d) - 1 + d, via ``expm1``),
            ``"low_var_kl"`` (k3 with verl's clamps: -d to [-20, 20], the value to [-10, 10]); append ``"+"`` for
            the straight-through variant whose value is the estimator's and whose gradient is k2's (d).

    Returns: ``(...)`` per-token estimates, same dtype as ``logp``. Equivalent to
    ``d = logp - ref_logp; torch.exp(-d) - 1 + d`` for ``"k3"``.
    """
    straight_through = estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    d = logp - ref_logp
    if base == "k1":
        k = d
    elif base == "abs":
        k = d.abs()
    elif base == "k2":
        k = 0.5 * d * d
    elif base == "k3":
        k = torch.expm1(-d) + d
    elif base == "low_var_kl":
        minus_d = d.neg().clamp(-20.0, 20.0)
        k = (torch.expm1(minus_d) - minus_d).clamp(-10.0, 10.0)
    else:
        raise ValueError(f"estimator={estimator!r}: must be one of k1, abs, k2, k3, low_var_kl, optionally with '+'")
    if straight_through:
        half_sq = 0.5 * d * d
        k = half_sq - half_sq.detach() + k.detach()
    return k


def is_token_separable(cfg: PolicyLossConfig, batch: TokenBatch) -> bool:
    """Whether ``prepare`` can run without the current log-probs (then the single-pass engine mode applies).

    Besides a token-separable config, rollout correction must not need the current log-probs: with
    ``old_logprobs`` absent its weights are built from ``sg(logp)``, known only after the forward pass.
    """
    return cfg.token_separable and not _rollout_needs_logp(cfg, batch)


def is_sequence_separable(cfg: PolicyLossConfig, batch: TokenBatch) -> bool:
    """Whether ``prepare`` can run without the current log-probs and ``token_loss`` couples tokens only within a
    sequence (sequence-level ratios): then ``token_loss`` on rows holding whole sequences is exactly those rows of
    the full result, and the single pass applies with sequence-aligned row chunks."""
    return cfg.sequence_separable and not _rollout_needs_logp(cfg, batch)


def _rollout_needs_logp(cfg: PolicyLossConfig, batch: TokenBatch) -> bool:
    return cfg.rollout_correction != "none" and batch.is_weights is None and batch.old_logprobs is None


# ----------------------------------------------------------------------------------------------------------------
# step constants
# ----------------------------------------------------------------------------------------------------------------
def _device_scalar(x: Union[Tensor, float, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A number (or a scalar tensor) as a 0-dim ``dtype`` tensor on ``device``, a number by a fill: ``torch.tensor``
    / ``as_tensor`` of host data copies it to a GPU with a stream sync (and fails in a CUDA graph capture)."""
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.full((), x, dtype=dtype, device=device)


def aggregation_weights(batch: TokenBatch, cfg: PolicyLossConfig) -> Tensor:
    """omega of B §6 with the A.3 denominators: loss = sum_n omega_n * loss_n. Zero off the mask."""
    mask, dtype = batch.mask, batch.dtype
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    if cfg.loss_agg == "token-mean":
        denom = batch.normalizer if batch.normalizer is not None else mask.sum().clamp(min=1).to(dtype)
        return torch.where(mask, 1.0 / _device_scalar(denom, dtype, mask.device), zero)
    n_seq = batch.normalizer if batch.normalizer is not None else batch.num_seqs
    n_seq = _device_scalar(n_seq, dtype, mask.device)
    if cfg.loss_agg == "seq-mean-token-mean":
        lengths = segment_sum(mask.to(dtype), batch.seq_ids, batch.num_seqs).clamp(min=1)
        per_token = 1.0 / (n_seq * lengths[batch.seq_ids])
    elif cfg.loss_agg == "seq-mean-token-sum":
        per_token = (1.0 / n_seq).expand(mask.shape)
    else:  # seq-mean-token-sum-norm: Dr. GRPO's constant normaliser, 1 / (B * C)
        per_token = (1.0 / (n_seq * cfg.norm_length)).expand(mask.shape)
    return torch.where(mask, per_token, zero)


def _sequence_mean(x: Tensor, batch: TokenBatch) -> Tensor:
    """Per-token broadcast of the mean of ``x`` over the kept tokens of each token's sequence (L clamped >= 1)."""
    lengths = segment_sum(batch.mask.to(x.dtype), batch.seq_ids, batch.num_seqs).clamp(min=1)
    return (segment_sum(torch.where(batch.mask, x, torch.zeros_like(x)), batch.seq_ids, batch.num_seqs)
            / lengths)[batch.seq_ids]


def _old(logp: Optional[Tensor], batch: TokenBatch) -> Tensor:
    """Old log-probs; absent means the detached current ones (A.3: ratio 1 in value)."""
    if batch.old_logprobs is not None:
        return batch.old_logprobs
    if logp is None:
        raise RuntimeError("internal: old_logprobs are absent and the step constants need the current log-probs")
    return logp.detach()


def _masked_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """``torch.quantile(x[mask], q)`` (linear interpolation) without its 2^24 size limit and without a data-dependent
    size, so that torch.compile traces it: the dropped values sort last as +inf, and the two order statistics are
    gathered at positions computed from the kept count, a tensor (no host sync). -inf when nothing is kept."""
    if x.numel() == 0:
        return torch.full((), -math.inf, dtype=x.dtype, device=x.device)
    kept = mask.sum()
    ordered = torch.sort(torch.where(mask, x, torch.full_like(x, math.inf))).values
    pos = (kept - 1).clamp(min=0).double() * q  # in float64, as torch.quantile's position
    lo, hi = pos.floor(), pos.ceil()
    a, b = ordered.gather(0, lo.long().view(1)), ordered.gather(0, hi.long().view(1))
    value = (a + (b - a) * (pos - lo).to(x.dtype)).squeeze(0)
    return torch.where(kept > 0, value, torch.full_like(value, -math.inf))


def prepare(
    batch: TokenBatch, cfg: PolicyLossConfig, logp: Optional[Tensor] = None, entropy: Optional[Tensor] = None
) -> Prepared:
    """The step's stop-gradient constants. ``logp``/``entropy`` (detached use only) are needed unless the config is
    token separable (:func:`is_token_separable`)."""
    mask = batch.mask
    omega = aggregation_weights(batch, cfg)

    # B §3.8: rollout correction, from old vs rollout log-probs, or the caller's precomputed weights
    is_weight, rejected = batch.is_weights, None
    if is_weight is None and cfg.rollout_correction != "none":
        diff = _old(logp, batch) - batch.rollout_logprobs
        if cfg.rollout_correction.startswith("seq"):
            diff = segment_sum(torch.where(mask, diff, torch.zeros_like(diff)), batch.seq_ids, batch.num_seqs)
            diff = diff[batch.seq_ids]
        raw = torch.exp(diff.clamp(-ROLLOUT_LOG_RATIO_BOUND, ROLLOUT_LOG_RATIO_BOUND))
        inside = (raw >= cfg.rollout_cap_low) & (raw <= cfg.rollout_cap_high)
        if cfg.rollout_correction.endswith("tis"):
            is_weight = raw.clamp(cfg.rollout_cap_low, cfg.rollout_cap_high)
        else:
            is_weight = torch.where(inside, raw, torch.zeros_like(raw))
        rejected = mask & ~inside
    if is_weight is not None:
        is_weight = is_weight.detach()

    pg_keep, ent_keep, opsm_masked = mask, mask, None
    # B §3.8: DeepSeek-V3.2 off-policy sequence mask on negative-advantage sequences that drifted past delta
    if cfg.opsm_delta is not None:
        behaviour = batch.rollout_logprobs if batch.rollout_logprobs is not None else _old(logp, batch)
        drift = _sequence_mean(behaviour - logp.detach(), batch)
        opsm_masked = mask & (drift > cfg.opsm_delta) & (batch.advantages < 0)
        pg_keep = pg_keep & ~opsm_masked
    # B §5.1: keep the top fraction of kept tokens by entropy (policy term and entropy bonus)
    if cfg.top_entropy_quantile < 1.0:
        ent = entropy.detach()
        high_entropy = ent >= _masked_quantile(ent, mask, 1.0 - cfg.top_entropy_quantile)
        pg_keep, ent_keep = pg_keep & high_entropy, ent_keep & high_entropy
    return Prepared(omega, is_weight, rejected, pg_keep, ent_keep, opsm_masked)


# ----------------------------------------------------------------------------------------------------------------
# per-token algebra
# ----------------------------------------------------------------------------------------------------------------
def _clamp_log_ratio(x: Tensor, cfg: PolicyLossConfig) -> Tensor:
    c = cfg.log_ratio_clamp
    return x if c is None else x.clamp(-c, c)


def log_ratios(logp: Tensor, batch: TokenBatch, cfg: PolicyLossConfig):
    """(policy log-ratio, token log-ratio), both clamped and differentiable (B §2.1-2.2).

    The policy log-ratio is per token (``"token"``), the length-normalised sequence mean broadcast to its tokens
    (``"sequence"``, GSPO), or ``sg(sequence mean) + logp - sg(logp)`` (``"sequence_token"``, GSPO-token).
    """
    token = logp - _old(logp, batch)
    if cfg.ratio_level == "token":
        policy = token
    elif cfg.ratio_level == "sequence":
        policy = _sequence_mean(token, batch)
    else:
        policy = _sequence_mean(token, batch).detach() + logp - logp.detach()
    return _clamp_log_ratio(policy, cfg), _clamp_log_ratio(token, cfg)


def _clip_bounds(cfg: PolicyLossConfig):
    low = -math.inf if cfg.clip_low is None else 1.0 - cfg.clip_low
    high = math.inf if cfg.clip_high is None else 1.0 + cfg.clip_high
    return low, high


class TokenTerms(NamedTuple):
    pg: Tensor  # (N,) omega-weighted policy term, 0 where not kept
    kl: Tensor  # (N,) omega-weighted kl_coef * k
    entropy_bonus: Tensor  # (N,) omega-weighted -entropy_coef * H
    ratio: Tensor  # (N,) the policy ratio (rho or s)
    kl_value: Optional[Tensor]  # (N,) unweighted estimator values, when ref_logprobs are given
    advantages: Tensor  # (N,) after entropy shaping

    @property
    def total(self) -> Tensor:
        return self.pg + self.kl + self.entropy_bonus


def token_loss(
    logp: Tensor, entropy: Tensor, batch: TokenBatch, prep: Prepared, cfg: PolicyLossConfig
) -> TokenTerms:
    """The weighted per-token loss terms; ``sum(total)`` is the loss. Elementwise for token-separable configs."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio, token_log_ratio = log_ratios(logp, batch, cfg)
    ratio = torch.exp(log_ratio)

    A = batch.advantages
    if cfg.entropy_shaping_alpha > 0:  # B §7.10, entropy is sg
        A = A + torch.minimum(cfg.entropy_shaping_alpha * entropy.detach(), A.abs() / cfg.entropy_shaping_kappa)

    low, high = _clip_bounds(cfg)
    if cfg.policy_loss == "ppo":
        # closed form of B §3.3: A > 0 -> -A min(r, 1+eh); A < 0 -> |A| min(max(r, 1-el), c); inclusive bounds
        upper = cfg.dual_clip if cfg.dual_clip is not None else math.inf
        pos = -A * ratio.clamp(max=high)
        neg = -A * ratio.clamp(min=low, max=upper)
        pg = torch.where(A > 0, pos, torch.where(A < 0, neg, zero))
    elif cfg.policy_loss == "cispo":
        pg = -ratio.detach().clamp(low, high) * A * logp
    elif cfg.policy_loss == "sapo":
        tau = torch.where(A > 0, zero + cfg.sapo_tau_pos, zero + cfg.sapo_tau_neg)
        pg = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * A
    else:  # reinforce: -A logp (times the IS weight below)
        pg = -A * logp
    if prep.is_weight is not None:
        pg = prep.is_weight * pg
    pg = torch.where(prep.pg_keep, prep.omega * pg, zero)

    kl_value, kl = None, zero.expand_as(logp)
    if batch.ref_logprobs is not None:
        kl_value = kl_penalty(logp, batch.ref_logprobs, cfg.kl_estimator + ("+" if cfg.kl_straight_through else ""))
        if cfg.kl_is_corrected:  # DeepSeek-V3.2: rho * k with rho differentiable
            kl_value = torch.exp(token_log_ratio) * kl_value
        if cfg.kl_coef > 0:
            kl = torch.where(batch.mask, (cfg.kl_coef * prep.omega) * kl_value, zero)
    bonus = zero.expand_as(logp)
    if cfg.entropy_coef != 0:
        bonus = torch.where(prep.ent_keep, (-cfg.entropy_coef * prep.omega) * entropy, zero)
    return TokenTerms(pg, kl, bonus, ratio, kl_value, A)


class ChunkObjective:
    """The single pass's objective on a row chunk, ``chunk_loss(r0, r1, logp_c, entropy_c) -> (r1 - r0,)`` per-token
    loss (``token_loss(...).total`` on rows [r0, r1)), kept as data: an engine with a fused kernel for it (the
    Triton engine, for a token-level ratio: :mod:`rlkernels.triton_ops.objective`) reads ``batch``, ``prep`` and
    ``cfg`` instead of running its torch ops."""

    __slots__ = ("batch", "prep", "cfg")

    def __init__(self, batch: TokenBatch, prep: Prepared, cfg: PolicyLossConfig):
        self.batch, self.prep, self.cfg = batch, prep, cfg

    def __call__(self, r0: int, r1: int, logp: Tensor, entropy: Tensor) -> Tensor:
        rows = slice(r0, r1)
        return token_loss(logp, entropy, self.batch.select(rows), self.prep.select(rows), self.cfg).total


# ----------------------------------------------------------------------------------------------------------------
# the whole objective
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def metrics(terms: TokenTerms, logp: Tensor, entropy: Tensor, batch: TokenBatch, prep: Prepared,
            cfg: PolicyLossConfig) -> Dict[str, Tensor]:
    """A.3 metrics as detached fp32 scalars, token-weighted over the kept tokens; all 0 for an empty batch."""
    mask = batch.mask
    frac = lambda cond: _masked_mean(cond.to(logp.dtype), mask)  # noqa: E731
    ratio, A = terms.ratio.detach(), terms.advantages
    log_ratio = torch.log(ratio)
    low, high = _clip_bounds(cfg)
    clip_high = (A > 0) & (ratio > high)
    clip_low = (A < 0) & (ratio < low)
    dual = (A < 0) & (ratio > cfg.dual_clip) if cfg.dual_clip is not None else torch.zeros_like(mask)
    if cfg.policy_loss == "ppo":
        clip_any = clip_high | clip_low | dual
    elif cfg.policy_loss == "cispo":
        clip_any = ratio.clamp(low, high) != ratio
    else:
        clip_any = torch.zeros_like(mask)
    pg_loss, kl_loss, ent_loss = terms.pg.detach().sum(), terms.kl.detach().sum(), terms.entropy_bonus.detach().sum()
    out = {
        "loss": pg_loss + kl_loss + ent_loss,
        "pg_loss": pg_loss,
        "kl_loss": kl_loss,
        "entropy_loss": ent_loss,
        "clip_frac_low": frac(clip_low),
        "clip_frac_high": frac(clip_high),
        "clip_frac": frac(clip_any),
        "dual_clip_frac": frac(dual),
        "approx_kl": _masked_mean(_old(logp, batch) - logp.detach(), mask),
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_max": torch.exp(_masked_extreme(log_ratio, mask, largest=True)) * mask.any(),
        "ratio_min": torch.exp(_masked_extreme(log_ratio, mask, largest=False)) * mask.any(),
        "entropy": _masked_mean(entropy.detach(), mask),
    }
    if terms.kl_value is not None:
        out["kl"] = _masked_mean(terms.kl_value.detach(), mask)
    if prep.is_weight is not None:
        out["is_weight_mean"] = _masked_mean(prep.is_weight, mask)
        out["is_weight_max"] = _masked_extreme(prep.is_weight, mask, largest=True)
        out["rollout_masked_frac"] = frac(prep.rejected) if prep.rejected is not None else frac(mask & False)
    if prep.opsm_masked is not None:
        out["opsm_masked_frac"] = frac(prep.opsm_masked)
    return {k: v.detach().float() for k, v in out.items()}


def policy_loss_flat(logp: Tensor, entropy: Tensor, batch: TokenBatch, cfg: PolicyLossConfig) -> LossOutput:
    """The objective on flat per-token tensors (the engines' output): ``(loss, metrics)``."""
    prep = prepare(batch, cfg, logp.detach(), entropy.detach())
    terms = token_loss(logp, entropy, batch, prep, cfg)
    loss = terms.total.sum()
    return LossOutput(loss, metrics(terms, logp, entropy, batch, prep, cfg))
