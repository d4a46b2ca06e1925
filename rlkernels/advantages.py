"""Group-relative advantages from scalar outcome rewards (LOSSES.md B §7 with the conventions of A.3).

Two implementations of the same function, both in float64 internally (reward vectors are small, and the
differences ``R - mean`` of near-equal rewards are exactly where fp32 loses digits):

* torch: vectorised segment reductions (no Python loop over groups), on any device;
* triton: one kernel launch, one program per group (:mod:`rlkernels.triton_ops.advantages`), the default for CUDA
  tensors; on CPU tensors it runs under ``TRITON_INTERPRET=1`` (the tests).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks as C
from . import _inputs as I
from .objective import segment_sum

METHODS = ("grpo", "dr_grpo", "rloo", "lite_ppo", "rpp_baseline", "passk")


def _segment_extreme(values: Tensor, ids: Tensor, n: int, largest: bool) -> Tensor:
    fill = -torch.inf if largest else torch.inf
    out = torch.full((n,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, ids, values, "amax" if largest else "amin", include_self=True)


def group_advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    method: str = "grpo",
    *,
    eps: float = 1e-6,
    lengths: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Per-response advantages from scalar rewards, normalised within groups of responses to the same prompt.

    Args:
        rewards: ``(B,)`` float. NaN marks an unscorable response: it is left out of every statistic and gets 0.
        group_size: responses per prompt G, groups contiguous (``B % G == 0``). Or:
        group_ids: ``(B,)`` int, any labels; groups may have different sizes and need not be contiguous.
        method:
            ``"grpo"``: ``(R - mean_g) / (std_g + eps)`` (std unbiased, n-1);
            ``"dr_grpo"``: ``R - mean_g``;
            ``"rloo"``: ``R - mean of the others = n/(n-1) (R - mean_g)``;
            ``"lite_ppo"``: ``(R - mean_g) / (std_batch + eps)``;
            ``"rpp_baseline"``: ``R - mean_g``, then whitened over the batch (token-weighted with ``lengths``);
            ``"passk"``: the best response of a group gets ``(R_1st - R_2nd) / (std_g + eps)``, the others 0.
        eps: added to the std (after the square root).
        lengths: ``(B,)`` response lengths, for ``"rpp_baseline"`` token weighting.
        backend: ``"auto"`` (the Triton kernel where the Triton engine runs: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``; else torch), ``"torch"`` or ``"triton"``. Under ``torch.compile`` (``fullgraph=True``
            included) the torch implementation runs, traced by the compiler.

    Returns: ``(B,)`` advantages, fp32 (fp64 for fp64 rewards). Singleton groups, groups whose valid rewards are
    all equal, and NaN rewards get exactly 0.

    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, ``method``, ``group_size`` or ``eps``, and
        ValueError for an inf reward: that one check reads the device (one host wait); it is skipped, as every value
        check, with ``RLKERNELS_CHECK_VALUES=0``, under ``torch.compile`` and in a CUDA graph capture, where nothing
        here waits for the device.

    Equivalent (for ``"grpo"`` with full groups) to
    ``r = rewards.view(-1, G); ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).flatten()``.
    """
    I.require_tensor("rewards", rewards, dtypes=I.FLOAT_DTYPES, dims=(1,))
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {METHODS}")
    B = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size= (contiguous groups) and group_ids= (a group label per "
                         "response)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size={group_size!r}: must be a positive int")
        if B % group_size:
            raise ValueError(f"rewards has shape ({B},), not a multiple of group_size={group_size}")
        ids = torch.arange(B, device=rewards.device) // group_size
        n_groups = B // group_size
    else:
        I.require_tensor("group_ids", group_ids, dims=(1,))
        if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids has dtype {group_ids.dtype}; expected an integer dtype")
        if group_ids.shape != rewards.shape:
            raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}; expected ({B},) like rewards")
        ids = _dense_ids(group_ids.to(rewards.device))
        n_groups = B  # the k <= B groups are 0..k-1, and k stays on the device: the empty groups past it give nothing
    if lengths is not None:
        I.require_tensor("lengths", lengths, dims=(1,))
        if lengths.shape != rewards.shape:
            raise ValueError(f"lengths has shape {tuple(lengths.shape)}; expected ({B},) like rewards")
    if not (eps >= 0):
        raise ValueError(f"eps={eps}: must be >= 0")

    # under torch.compile the torch implementation runs, traced with the rest (a Triton launch of ours is no op the
    # compiler knows)
    use_triton = _use_triton(backend, rewards.device) and not C.compiling()
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.double()
    valid = ~torch.isnan(r)
    if C.value_checks_enabled():  # a host read: skipped as every value check is (compile, capture, the variable)
        C.fail_if(torch.isinf(r), lambda: "rewards holds inf; use NaN for unscorable responses")
    if use_triton:
        adv, keep = _triton_advantages(r, ids if group_size is None else None, n_groups, group_size, method, eps)
    else:
        adv, keep = _torch_advantages(r, valid, ids, n_groups, method, eps)
    if method in ("lite_ppo", "rpp_baseline"):  # adv holds the group-centred rewards: scale them over the batch
        adv = torch.where(keep, _batch_scaled(method, adv, valid, r, lengths, eps), torch.zeros_like(adv))
    return adv.to(out_dtype)


def _dense_ids(group_ids: Tensor) -> Tensor:
    """Group labels -> 0..k-1 in the order of the labels' values (``torch.unique``'s inverse), without reading k
    back (unique's output size is data): sort, mark where the label changes, count the marks."""
    if group_ids.numel() == 0:
        return group_ids.long()
    sorted_ids, order = torch.sort(group_ids)
    new = torch.zeros_like(sorted_ids, dtype=torch.long)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    dense = torch.cumsum(new, 0)
    return torch.empty_like(dense).scatter_(0, order, dense)


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend={backend!r}: choose 'auto', 'torch' or 'triton'")
    if backend == "torch":
        return False
    from .engines import BackendUnavailable, load_engine

    try:
        reason = load_engine("triton").supports(device)
    except BackendUnavailable as exc:
        reason = str(exc)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot run on {device}: {reason}")
    return reason is None


# Both implementations return (adv, keep): the per-group advantages (the group-centred rewards for lite_ppo and
# rpp_baseline), 0 where not kept, and the mask of responses that carry signal (valid reward, live group).
def _triton_advantages(r: Tensor, ids: Optional[Tensor], n_groups: int, group_size: Optional[int], method: str,
                       eps: float) -> Tuple[Tensor, Tensor]:
    from .triton_ops.advantages import group_advantages_rows

    if ids is None:  # contiguous groups of group_size
        return group_advantages_rows(r, method, eps, group_size=group_size)
    # sort by group (stably: pass@k's "first" is the first in the caller's order), run, scatter back
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(n_groups, dtype=torch.long, device=r.device).index_add_(0, ids, torch.ones_like(ids))
    starts = torch.cumsum(counts, 0) - counts
    adv_sorted, keep_sorted = group_advantages_rows(r[order].contiguous(), method, eps, starts=starts, counts=counts)
    adv, keep = torch.empty_like(adv_sorted), torch.empty_like(keep_sorted)
    adv[order], keep[order] = adv_sorted, keep_sorted
    return adv, keep


def _torch_advantages(r: Tensor, valid: Tensor, ids: Tensor, n_groups: int, method: str,
                      eps: float) -> Tuple[Tensor, Tensor]:
    B = r.shape[0]
    rv = torch.where(valid, r, torch.zeros_like(r))
    count = segment_sum(valid.double(), ids, n_groups)
    mean = segment_sum(rv, ids, n_groups) / count.clamp(min=1)
    centred = torch.where(valid, r - mean[ids], torch.zeros_like(r))
    std = (segment_sum(centred * centred, ids, n_groups) / (count - 1).clamp(min=1)).sqrt()
    gmax = _segment_extreme(torch.where(valid, r, torch.full_like(r, -torch.inf)), ids, n_groups, largest=True)
    gmin = _segment_extreme(torch.where(valid, r, torch.full_like(r, torch.inf)), ids, n_groups, largest=False)
    degenerate = (count <= 1) | (gmax == gmin)  # per group: no learning signal (A.3)
    keep = valid & ~degenerate[ids]

    if method == "grpo":
        adv = centred / (std[ids] + eps)
    elif method == "rloo":
        n = count[ids]
        adv = centred * n / (n - 1).clamp(min=1)
    elif method == "passk":  # the first index holding the group maximum gets the gap to the runner-up
        index = torch.arange(B, device=r.device, dtype=torch.long)
        at_max = valid & (r == gmax[ids])
        first = _segment_extreme(torch.where(at_max, index, torch.full_like(index, B)).double(), ids, n_groups,
                                 largest=False).long()
        is_best = index == first[ids]
        runner_up = _segment_extreme(torch.where(valid & ~is_best, r, torch.full_like(r, -torch.inf)), ids,
                                     n_groups, largest=True)
        adv = torch.where(is_best, (gmax - runner_up)[ids] / (std[ids] + eps), torch.zeros_like(r))
    else:  # dr_grpo, and the group-centred rewards that lite_ppo / rpp_baseline scale over the batch
        adv = centred
    return torch.where(keep, adv, torch.zeros_like(adv)), keep


def _batch_scaled(method: str, centred: Tensor, valid: Tensor, r: Tensor, lengths: Optional[Tensor],
                  eps: float) -> Tensor:
    """lite_ppo: centred / (batch std of the valid rewards + eps); rpp_baseline: centred whitened over the batch
    (token-weighted with ``lengths``). Masked sums, no host sync."""
    if method == "lite_ppo":
        n = valid.sum().double()
        mu = torch.where(valid, r, torch.zeros_like(r)).sum() / n.clamp(min=1)
        var = torch.where(valid, (r - mu) ** 2, torch.zeros_like(r)).sum() / (n - 1).clamp(min=1)
        return centred / (var.sqrt() + eps)
    w = torch.ones_like(r) if lengths is None else lengths.to(r)
    w = torch.where(valid, w, torch.zeros_like(w))
    total = w.sum()
    mu = (w * centred).sum() / total.clamp(min=1e-12)
    var = (w * (centred - mu) ** 2).sum() / (total - 1).clamp(min=1e-12)
    return (centred - mu) / (var.sqrt() + eps)
