"""Group advantages in one launch: one program per group of responses, segmented by group (LOSSES.md B §7, A.3).

Each program reads its group's rewards three times (they are a few to a few hundred numbers) in fp64:

1. count, sum, max and min of the valid (non-NaN) rewards -> the mean;
2. the sum of squared deviations (-> the unbiased std), how many rewards hold the maximum, the first index holding
   it and the largest reward below it (-> pass@k's runner-up);
3. the advantage of every response, 0 for NaN rewards and for singleton and all-equal groups.

Groups are contiguous runs ``[start, start + count)`` of the reward vector: ``group_size`` fixes them (``start =
g * G``), else the caller sorts the rewards by group id (stably) and passes each group's start and count. The
batch-level methods (``lite_ppo``, ``rpp_baseline``) take the group-centred rewards from here (METHOD 1) and
finish in torch, on device, without a host sync.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch, next_pow2

# METHOD codes of the kernel; lite_ppo and rpp_baseline use CENTRED and are finished by the caller
GRPO, CENTRED, RLOO, PASSK = 0, 1, 2, 3
METHOD_CODES = {"grpo": GRPO, "dr_grpo": CENTRED, "rloo": RLOO, "passk": PASSK, "lite_ppo": CENTRED,
                "rpp_baseline": CENTRED}
MAX_BLOCK = 256


@triton.jit(do_not_specialize=["group_size"])
def _group_advantages_kernel(
    r_ptr, start_ptr, count_ptr, group_size, out_ptr, keep_ptr, eps,
    METHOD: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    if CONTIGUOUS:
        start = g.to(tl.int64) * group_size
        n_all = group_size
    else:
        start = tl.load(start_ptr + g)
        n_all = tl.load(count_ptr + g)
    lanes = tl.arange(0, BLOCK)
    big = n_all + 1  # "no index" for the first-at-max search

    cnt = tl.zeros((), tl.float64)
    tot = tl.zeros((), tl.float64)
    mx = tl.full((), float("-inf"), tl.float64)
    mn = tl.full((), float("inf"), tl.float64)
    for off in range(0, n_all, BLOCK):
        idx = off + lanes
        r = tl.load(r_ptr + start + idx, mask=idx < n_all, other=float("nan")).to(tl.float64)
        valid = r == r  # NaN (and the lanes past the group) are not
        cnt += tl.sum(valid.to(tl.float64), axis=0)
        tot += tl.sum(tl.where(valid, r, 0.0), axis=0)
        mx = tl.maximum(mx, tl.max(tl.where(valid, r, float("-inf")), axis=0))
        mn = tl.minimum(mn, tl.min(tl.where(valid, r, float("inf")), axis=0))
    mean = tot / tl.maximum(cnt, 1.0)

    ss = tl.zeros((), tl.float64)
    n_max = tl.zeros((), tl.float64)
    first = big
    below = tl.full((), float("-inf"), tl.float64)
    for off in range(0, n_all, BLOCK):
        idx = off + lanes
        r = tl.load(r_ptr + start + idx, mask=idx < n_all, other=float("nan")).to(tl.float64)
        valid = r == r
        d = tl.where(valid, r - mean, 0.0)
        ss += tl.sum(d * d, axis=0)
        at_max = valid & (r == mx)
        n_max += tl.sum(at_max.to(tl.float64), axis=0)
        first = tl.minimum(first, tl.min(tl.where(at_max, idx, big), axis=0))
        below = tl.maximum(below, tl.max(tl.where(valid & (r < mx), r, float("-inf")), axis=0))
    std = tl.sqrt(ss / tl.maximum(cnt - 1.0, 1.0))
    runner_up = tl.where(n_max >= 2.0, mx, below)
    live = (cnt > 1.0) & (mx != mn)  # A.3: singleton and all-equal groups carry no signal

    for off in range(0, n_all, BLOCK):
        idx = off + lanes
        in_group = idx < n_all
        r = tl.load(r_ptr + start + idx, mask=in_group, other=float("nan")).to(tl.float64)
        valid = r == r
        centred = r - mean
        if METHOD == 0:
            adv = centred / (std + eps)
        elif METHOD == 1:
            adv = centred
        elif METHOD == 2:
            adv = centred * cnt / tl.maximum(cnt - 1.0, 1.0)
        else:
            adv = tl.where(idx == first, (mx - runner_up) / (std + eps), 0.0)
        keep = tl.where(live, valid, False)  # (not `valid & live`: the interpreter cannot and a 0-d flag)
        tl.store(out_ptr + start + idx, tl.where(keep, adv, 0.0), mask=in_group)
        tl.store(keep_ptr + start + idx, keep.to(tl.int8), mask=in_group)


def group_advantages_rows(r: Tensor, method: str, eps: float, group_size: Optional[int] = None,
                          starts: Optional[Tensor] = None, counts: Optional[Tensor] = None):
    """Run the kernel on fp64 rewards ``r`` (B,) laid out in contiguous groups.

    Either ``group_size`` (groups ``[g G, (g+1) G)``) or ``starts``/``counts`` (int64, one per group). Returns
    ``(adv, keep)``: (B,) fp64 advantages (the group-centred rewards for ``lite_ppo``/``rpp_baseline``), 0 where not
    kept, and the (B,) bool mask of responses that carry signal (valid reward, live group).
    """
    r = r.contiguous()  # the kernel indexes the rewards by pointer, with unit stride
    B = r.shape[0]
    out = torch.empty_like(r)
    keep = torch.empty(B, dtype=torch.int8, device=r.device)
    if B == 0:
        return out, keep.bool()
    contiguous = group_size is not None
    if contiguous:
        n_groups, block = B // group_size, min(MAX_BLOCK, next_pow2(group_size))
        starts = counts = r  # unused pointers
    else:  # group lengths vary: one tile size for all (no host read of the longest, no recompiles)
        n_groups, block = starts.shape[0], MAX_BLOCK
    launch(  # on the rewards' device, through the kept compiled kernel after the first call
        _group_advantages_kernel, (n_groups,), r, starts, counts, group_size or 0, out, keep, float(eps),
        METHOD=METHOD_CODES[method], CONTIGUOUS=contiguous, BLOCK=block, num_warps=4 if block >= 128 else 1,
    )
    return out, keep.bool()
