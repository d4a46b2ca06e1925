"""The executable spec: eager, logits-materialising, readable PyTorch for everything rlkernels computes.

This module is the source of truth that the tests and the benchmark's ``eager`` column use. It is written to be
read next to LOSSES.md, on padded ``(B, T)`` batches, with plain loops over sequences and groups where that is
clearer. It is deliberately independent of :mod:`rlkernels.objective` (the production algebra): the two are
compared by the tests, so never import one from the other. Call it with float64 tensors to get the reference
values; call it with the users' dtype to get "what eager PyTorch would have done".

Nothing here is fast, and nothing here avoids the ``N x V`` logits: that is the point.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .config import PolicyLossConfig, resolve_config

__all__ = [
    "logits_from_hidden",
    "logprobs_from_logits",
    "linear_logprobs",
    "kl_penalty",
    "policy_loss",
    "linear_policy_loss",
    "group_advantages",
]


# ------------------------------------------------------------------------------------------------------------------
# 1. Log-probs and entropy (LOSSES.md B §1.1)
# ------------------------------------------------------------------------------------------------------------------
def logits_from_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, upcast: bool = False,
                       softcap: Optional[float] = None) -> Tensor:
    """``hidden @ weight.T + bias`` in the input dtype (as a model's LM head computes it), or in float64; with
    ``softcap``, capped as Gemma 2 / Gemma 4 cap their final logits: ``softcap * tanh(logits / softcap)``."""
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = None if bias is None else bias.double()
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, temperature: Union[float, Tensor] = 1.0, upcast: bool = False
) -> Tuple[Tensor, Tensor]:
    """Per-token ``log softmax(logits / T)[label]`` and the entropy of ``softmax(logits / T)``.

    logits (..., V) any float dtype; labels (...) int. Computes in fp32 (float64 with ``upcast`` or float64 input).
    """
    compute = torch.float64 if (upcast or logits.dtype == torch.float64) else torch.float32
    z = logits.to(compute)
    if isinstance(temperature, Tensor):
        z = z / temperature.to(compute).unsqueeze(-1)
    else:
        z = z / temperature
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    # p log p with p = 0 (a -inf logit) is 0, not 0 * -inf = nan; the inner where keeps the gradient finite too
    safe_log_probs = torch.where(torch.isfinite(log_probs), log_probs, torch.zeros_like(log_probs))
    entropy = -(log_probs.exp() * safe_log_probs).sum(-1)
    return logp, entropy


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    upcast: bool = False,
    softcap: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """``logprobs_from_logits(hidden @ weight.T + bias, labels)`` (logits capped first with ``softcap``):
    materialises the full logits."""
    return logprobs_from_logits(logits_from_hidden(hidden, weight, bias, upcast, softcap), labels, temperature,
                                upcast)


# ------------------------------------------------------------------------------------------------------------------
# 2. KL estimators (B §4)
# ------------------------------------------------------------------------------------------------------------------
def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from d = logp - ref_logp. A trailing ``+`` gives the straight-through
    variant: the value of the estimator with the gradient of k2 (d)."""
    if estimator.endswith("+"):
        base = kl_penalty(logp, ref_logp, estimator[:-1])
        k2 = 0.5 * (logp - ref_logp) ** 2
        return k2 - k2.detach() + base.detach()
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(-d) - 1 + d
    if estimator == "low_var_kl":  # verl: clamp -d to [-20, 20] before exp, and the result to [-10, 10]
        minus_d = torch.clamp(-d, -20, 20)
        return torch.clamp(torch.exp(minus_d) - 1 - minus_d, -10, 10)
    raise ValueError(f"unknown KL estimator {estimator!r}")


# ------------------------------------------------------------------------------------------------------------------
# 3. The policy loss on a padded batch (B §2-§6, §8; conventions of A.3)
# ------------------------------------------------------------------------------------------------------------------
def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / n.clamp(min=1)


def policy_loss(
    logp: Tensor,
    entropy: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    rollout_logprobs: Optional[Tensor] = None,
    is_weights: Optional[Tensor] = None,
    normalizer: Optional[float] = None,
    config: Union[str, PolicyLossConfig] = "grpo",
    **overrides,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The full policy objective on a padded batch, written from LOSSES.md.

    logp, entropy: (B, T) differentiable; advantages (B,) or (B, T); mask (B, T) bool (None = all kept);
    old/ref/rollout log-probs and is_weights (B, T). Returns ``(loss, metrics)``.
    """
    cfg = resolve_config(config, **overrides)
    B, T = logp.shape
    mask = torch.ones(B, T, dtype=torch.bool, device=logp.device) if mask is None else mask.bool()
    zero = torch.zeros_like(logp)

    def clean(x: Optional[Tensor]) -> Optional[Tensor]:  # padded positions may hold garbage (A.3)
        return None if x is None else torch.where(mask, x.to(logp.dtype), zero)

    logp, entropy = clean(logp), clean(entropy)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(B, T)
    A = clean(advantages)
    old = logp.detach() if old_logprobs is None else clean(old_logprobs)
    ref, roll, isw = clean(ref_logprobs), clean(rollout_logprobs), clean(is_weights)
    lengths = mask.sum(1)  # L_i

    # 2.1-2.2: importance ratio, token or sequence level (length-normalised geometric mean, L_i clamped to >= 1)
    token_log_ratio = logp - old
    seq_log_ratio = torch.stack(
        [token_log_ratio[i][mask[i]].sum() / max(int(lengths[i]), 1) for i in range(B)]
    )  # (B,)
    if cfg.ratio_level == "token":
        log_ratio = token_log_ratio
    elif cfg.ratio_level == "sequence":
        log_ratio = seq_log_ratio[:, None].expand(B, T)
    else:  # sequence_token: sg(seq mean) + logp - sg(logp)
        log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    if cfg.log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)

    # 7.10: entropy advantage shaping, A + min(alpha * sg(H), |A| / kappa)
    if cfg.entropy_shaping_alpha > 0:
        A = A + torch.minimum(cfg.entropy_shaping_alpha * entropy.detach(), A.abs() / cfg.entropy_shaping_kappa)

    # 3.1-3.9: surrogate
    low = -math.inf if cfg.clip_low is None else 1.0 - cfg.clip_low
    high = math.inf if cfg.clip_high is None else 1.0 + cfg.clip_high
    clipped_ratio = torch.clamp(ratio, low, high)
    if cfg.policy_loss == "ppo":
        pg = torch.maximum(-ratio * A, -clipped_ratio * A)
        if cfg.dual_clip is not None:
            pg = torch.where(A < 0, torch.minimum(pg, -cfg.dual_clip * A), pg)
    elif cfg.policy_loss == "cispo":
        pg = -clipped_ratio.detach() * A * logp
    elif cfg.policy_loss == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, cfg.sapo_tau_pos), torch.full_like(A, cfg.sapo_tau_neg))
        pg = -torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau) * A
    else:  # reinforce
        pg = -A * logp

    # 3.8: rollout correction weights (constants), from old vs rollout log-probs
    weight = torch.ones_like(logp)
    rejected = torch.zeros_like(mask)
    if is_weights is not None:
        weight = isw
    elif cfg.rollout_correction != "none":
        if cfg.rollout_correction.startswith("token"):
            raw = torch.exp(torch.clamp(old - roll, -20, 20))
        else:
            seq_sum = torch.stack([(old - roll)[i][mask[i]].sum() for i in range(B)])
            raw = torch.exp(torch.clamp(seq_sum, -20, 20))[:, None].expand(B, T)
        inside = (raw >= cfg.rollout_cap_low) & (raw <= cfg.rollout_cap_high)
        if cfg.rollout_correction.endswith("tis"):
            weight = torch.clamp(raw, cfg.rollout_cap_low, cfg.rollout_cap_high)
        else:
            weight = torch.where(inside, raw, torch.zeros_like(raw))
        rejected = ~inside
    weight = weight.detach()

    # 3.8: DeepSeek-V3.2 off-policy sequence mask: drop negative-advantage sequences that drifted too far
    keep_pg = mask.clone()
    if cfg.opsm_delta is not None:
        behaviour = roll if roll is not None else old
        for i in range(B):
            drift = (behaviour[i] - logp[i].detach())[mask[i]].sum() / max(int(lengths[i]), 1)
            if drift > cfg.opsm_delta:
                keep_pg[i] &= A[i] >= 0
    opsm_masked = mask & ~keep_pg

    # 5.1: top-entropy-quantile mask, applied to the policy term and the entropy bonus
    if cfg.top_entropy_quantile < 1.0 and mask.any():
        threshold = torch.quantile(entropy.detach()[mask], 1.0 - cfg.top_entropy_quantile)
        keep_pg = keep_pg & (entropy.detach() >= threshold)
        keep_ent = mask & (entropy.detach() >= threshold)
    else:
        keep_ent = mask

    # 4: KL to the reference, optionally importance-corrected with the differentiable token ratio
    kl = None
    if ref is not None:
        estimator = cfg.kl_estimator + ("+" if cfg.kl_straight_through else "")
        kl = kl_penalty(logp, ref, estimator)
        if cfg.kl_is_corrected:
            tok = token_log_ratio
            if cfg.log_ratio_clamp is not None:
                tok = torch.clamp(tok, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
            kl = torch.exp(tok) * kl

    # 6: aggregation weights omega
    n_tokens = mask.sum()
    if cfg.loss_agg == "token-mean":
        denom = normalizer if normalizer is not None else n_tokens.clamp(min=1)
        omega = torch.ones_like(logp) / denom
    else:
        n_seq = normalizer if normalizer is not None else B
        if cfg.loss_agg == "seq-mean-token-mean":
            omega = 1.0 / (n_seq * lengths.clamp(min=1).to(logp.dtype))[:, None].expand(B, T)
        elif cfg.loss_agg == "seq-mean-token-sum":
            omega = torch.full_like(logp, 1.0 / n_seq)
        else:
            omega = torch.full_like(logp, 1.0 / (n_seq * cfg.norm_length))

    def aggregate(x: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep, omega * x, zero).sum()

    pg_loss = aggregate(weight * pg, keep_pg)
    kl_loss = cfg.kl_coef * aggregate(kl, mask) if (kl is not None and cfg.kl_coef > 0) else zero.sum()
    entropy_loss = -cfg.entropy_coef * aggregate(entropy, keep_ent) if cfg.entropy_coef != 0 else zero.sum()
    loss = pg_loss + kl_loss + entropy_loss

    # A.3 metrics, token-weighted over the kept tokens
    with torch.no_grad():
        f = lambda cond: _masked_mean(cond.to(logp.dtype), mask)  # noqa: E731
        ratio_d = ratio.detach()
        clip_high_hit = (A > 0) & (ratio_d > high)
        clip_low_hit = (A < 0) & (ratio_d < low)
        dual_hit = (A < 0) & (ratio_d > cfg.dual_clip) if cfg.dual_clip is not None else torch.zeros_like(mask)
        if cfg.policy_loss == "ppo":
            clip_any = clip_high_hit | clip_low_hit | dual_hit
        elif cfg.policy_loss == "cispo":
            clip_any = clipped_ratio.detach() != ratio_d
        else:
            clip_any = torch.zeros_like(mask)
        log_ratio_d = log_ratio.detach()
        anyk = bool(mask.any())
        metrics = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "entropy_loss": entropy_loss.detach(),
            "clip_frac_low": f(clip_low_hit),
            "clip_frac_high": f(clip_high_hit),
            "clip_frac": f(clip_any),
            "dual_clip_frac": f(dual_hit),
            "approx_kl": _masked_mean(old - logp.detach(), mask),
            "ratio_mean": _masked_mean(ratio_d, mask),
            "ratio_max": torch.exp(log_ratio_d[mask].max()) if anyk else zero.sum(),
            "ratio_min": torch.exp(log_ratio_d[mask].min()) if anyk else zero.sum(),
            "entropy": _masked_mean(entropy.detach(), mask),
        }
        if kl is not None:
            metrics["kl"] = _masked_mean(kl.detach(), mask)
        if is_weights is not None or cfg.rollout_correction != "none":
            metrics["is_weight_mean"] = _masked_mean(weight, mask)
            metrics["is_weight_max"] = weight[mask].max() if anyk else zero.sum()
            metrics["rollout_masked_frac"] = f(rejected)
        if cfg.opsm_delta is not None:
            metrics["opsm_masked_frac"] = f(opsm_masked)
        metrics = {k: v.float() for k, v in metrics.items()}
    return loss, metrics


def linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    upcast: bool = False,
    softcap: Optional[float] = None,
    **kwargs,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Eager ``fused_grpo_loss`` on a padded batch: logits (capped with ``softcap``), log-softmax, gather, entropy,
    then :func:`policy_loss`.

    hidden (B, T, H), weight (V, H), labels (B, T). This is the benchmark's ``eager`` provider.
    """
    logp, entropy = linear_logprobs(hidden, weight, labels, bias, temperature, upcast, softcap)
    return policy_loss(logp, entropy, advantages, mask, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# 4. Group advantages (B §7; conventions of A.3)
# ------------------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    method: str = "grpo",
    eps: float = 1e-6,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """Per-response advantages from scalar rewards, one plain loop per group.

    rewards (B,) float; groups given by ``group_size`` (contiguous groups) or ``group_ids`` (B,) int.
    NaN rewards are left out of every statistic and get 0; singleton and all-equal groups get 0; std is unbiased.
    """
    r = rewards.double()
    B = r.shape[0]
    if group_ids is None:
        group_ids = torch.arange(B, device=r.device) // group_size
    valid = ~torch.isnan(r)
    out = torch.zeros(B, dtype=torch.float64, device=r.device)
    degenerate = torch.zeros(B, dtype=torch.bool, device=r.device)  # singleton or all-equal: A = 0
    centred = torch.zeros(B, dtype=torch.float64, device=r.device)  # R - group mean
    group_std = torch.zeros(B, dtype=torch.float64, device=r.device)
    for g in torch.unique(group_ids):
        members = (group_ids == g) & valid
        vals = r[members]
        if vals.numel() <= 1 or bool((vals == vals[0]).all()):
            degenerate |= group_ids == g
            continue
        centred[members] = vals - vals.mean()
        group_std[members] = vals.std()  # unbiased
        if method == "passk":
            order = torch.argsort(vals, descending=True, stable=True)
            best = members.nonzero().squeeze(1)[order[0]]
            gap = vals[order[0]] - vals[order[1]]
            out[best] = gap / (vals.std() + eps)
    if method == "grpo":
        out = centred / (group_std + eps)
    elif method == "dr_grpo":
        out = centred
    elif method == "rloo":
        sizes = torch.tensor([float(((group_ids == g) & valid).sum()) for g in group_ids], dtype=torch.float64,
                             device=r.device)  # (an empty batch: no sizes)
        out = torch.where(sizes > 1, centred * sizes / (sizes - 1).clamp(min=1), torch.zeros_like(centred))
    elif method == "lite_ppo":
        out = centred / (r[valid].std() + eps)
    elif method == "rpp_baseline":
        w = torch.ones(B, dtype=torch.float64) if lengths is None else lengths.double()
        w = torch.where(valid, w, torch.zeros_like(w))
        mean = (w * centred).sum() / w.sum()
        var = (w * (centred - mean) ** 2).sum() / (w.sum() - 1)
        out = (centred - mean) / (var.sqrt() + eps)
    elif method != "passk":
        raise ValueError(f"unknown advantage method {method!r}")
    out = torch.where(valid & ~degenerate, out, torch.zeros_like(out))
    return out
