"""Log-probs and entropy over a block of logits: the forward statistics kernel and the dL/dz kernel.

Both read a row-major block of logits ``z`` (the GEMM output for the hidden+W path, or the caller's logits) in any
float dtype and do all arithmetic in fp32 (fp64 for fp64 inputs).

* ``logits_stats``: one program per row streams the block's vocabulary in ``BLOCK_V`` tiles, keeping the online
  state (M, S, C), and reads the label logit with one scalar load. Bytes: the block is read once (2 B/entry in bf16).
* ``dlogits``: a (row, vocabulary-tile) grid recomputes p from the saved (M, log S, C/S) and writes dL/dz, in place
  (hidden+W path: the GEMM output buffer becomes the gradient buffer) or into a new tensor (logits path: the
  caller's logits are never modified). Bytes: the block is read once and written once.

A negative label marks a masked-out row (the logits path passes the caller's whole tensor and a mask that way, so
nothing is gathered or copied): its logits are never read, logp and entropy come out 0 and its gradient row 0. The
hidden+W path's blocks hold kept rows only and say so (``masked_rows=False``): its kernels then issue their loads
without waiting for the label's.

Sequence lengths, row counts, temperatures and offsets are runtime arguments; only the tile size and feature flags
are ``constexpr``, so a new completion length does not recompile.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._inputs import env_choice
from . import autotune
from .launch import launch as fast_launch
from .launch import cdiv, next_pow2
from .launch import prepare as prepare_launch
from .tl_utils import (LOGIT_FLOOR, TEMP_NONE, TEMP_ROW, TEMP_SCALAR, cap_grad, cap_logits, dlogits_tile, finish_row,
                       full_softcap, load_scaled_logits, merge_lanes, online_lse_step, row_inv_temperature, row_kept,
                       row_offset, scale_logits, split_f64)

# Tiles and warps from the H100 sweeps (bench/gpu_tune.py; bench/results/gpu-h100/). The statistics kernel: 4096 x 4
# warps, first chosen from session 2's sweep (1600 GB/s, its best; 1275 at the former 2048 x 8); in session 7's two
# sweeps over a 4096 x 152064 bf16 block (each launch timed alone) it read 2401 and 2445 GB/s, 87-94% of torch.amax's
# read of the block, and no launch led it by 5% in both. The dL/dz kernel: 8192 x 8 warps with every tile masked
# (SPLIT_TAIL_BWD = False) moved 2672 and 2642 GB/s in those sweeps against 2532 and 2489 for the former 4096 x 8
# with the split tail: a 5.8% lead on the mean, ahead in both runs (`python bench/pick_defaults.py` with --also).
BLOCK_V_FWD = 4096
NUM_WARPS_FWD = 4
BLOCK_V_BWD = 8192
NUM_WARPS_BWD = 8
# The lanes loop keeps three fp32 vectors of BLOCK_V lanes: at 4096 x 4 warps the sm_90 compile
# (rlkernels.triton_ops.aot, Triton 3.9) needed 127 registers per thread with every tile masked (16 resident warps per
# SM) and 134 with SPLIT_TAIL (12 warps, under the 16 that tests/test_triton_aot.py asks for); 1024 x 4 needs 40
# (48 warps; bench/results/aot-sm90-triton*.txt). Its loop issues 17.6 instructions per logit against the tile
# loop's 10.8 (T = 1, Triton 3.6: one exponential per element, but selects in place of reductions).
BLOCK_V_LANES = 1024
NUM_WARPS_LANES = 4
# Software pipelining of the statistics loop (tl.range num_stages): 1 = none, the measured default; 2-3 stream the
# next tiles through shared memory with cp.async while this one is reduced (8-16 KiB per program at 4096 columns).
# On the H100 (session 7) the whole loss took 83.2 ms at 1 and at 3 stages, and the kernel sweeps put 2 and 3 stages
# ahead in one run and behind in the other: 1 stays.
STATS_STAGES = 1
# Register prefetch of the statistics loop's whole tiles (with SPLIT_TAIL, instead of stages): each iteration issues
# the next tile's loads, then reduces this one, so a program keeps a tile's reads in flight through its 6 barriers
# per tile, where the plain loop has none in flight while it reduces (and no shared memory, unlike stages). Built in
# session 8 without a GPU: the sm_90 compile (rlkernels.triton_ops.aot, Triton 3.6) is in
# bench/results/aot-sm90-triton3.6.txt; not yet timed, so off (bench/gpu_tune.py sweeps it).
STATS_PREFETCH = False
# Whole tiles read and reduced without masks, the row's partial last tile with them (True), or every tile masked
# as first measured (False). Compiled for sm_90 (bench/results/aot-sm90-triton3.9.txt and -3.6.txt), the split has
# two loop bodies (twice the 16-byte load instructions in the code, the same loads per row at run time), the
# whole-tile one without per-element masks: at T = 1 the statistics loop issues 10.8 instructions per logit against
# 13.8 masked on Triton 3.6 (11.1 against 13.9 on 3.9), with 48 registers either way on 3.6, 56 against 48 on 3.9
# (V odd: 72-80). The 16-byte loads for V odd come from the padded block rows, with or without it.
# bench/gpu_tune.py times both.
SPLIT_TAIL = True
# The same choice for the dL/dz kernel (one tile per program: the split there saves the masks of whole tiles, not a
# second loop body); measured above: every tile masked at 8192 x 8.
SPLIT_TAIL_BWD = False
# Streaming cache hints for the dL/dz kernel: its logits loads marked evict_first and its stores .cs (evict-first,
# streamed), as each byte is touched once and the block (a GiB) is far larger than L2. On the H100 the kernel moved
# about 2830 GB/s in every launch swept (session 9) against 3013 for torch's copy_ of the block: whether L2 traffic is
# the rest is what bench/gpu_tune.py's kernel sweep times (each launch with and without the hints). Built in session
# 16 without a GPU, not yet timed: off.
STREAM_BWD = False

# The statistics kernel's loop (RLKERNELS_STATS_KERNEL, read per call): "tile" merges each tile into one running
# (M, S, C) with three block reductions per tile (measured above); "lanes" keeps the state per lane and reduces once
# per row, one exp per element, no reduction in the loop: built for bandwidth, tested against "tile" under the
# interpreter. On the H100 (session 7) its best launch read 2232 and 2325 GB/s in two sweeps against the tile loop's
# 2578 and 2553 (it led only at 1024 x 4, the tile loop's weakest tile), and the whole loss took 86.0 ms against
# 83.2: "tile" stays the default.
STATS_KERNELS = ("tile", "lanes")


def stats_kernel() -> str:
    return env_choice("RLKERNELS_STATS_KERNEL", STATS_KERNELS)


# Per-row vectors (labels, temperatures, the saved statistics, the upstream gradients) are read one scalar per
# program, so their alignment buys nothing; not specialising on it keeps one compiled kernel when row slices start
# at other offsets (a new completion length, the next row chunk). v_offset varies with the vocabulary block.
# rows_inner (the completion length T of a (B, T, V) tensor) too.
_ROW_ARGS = ["temp_ptr", "labels_ptr", "v_offset", "rows_inner"]


@triton.jit(do_not_specialize=_ROW_ARGS + ["m_out", "s_out", "c_out", "zy_out", "ent_out"])
def _logits_stats_kernel(
    z_ptr, stride_z, stride_outer, rows_inner, bias_ptr, temp_ptr, inv_t_scalar, softcap, softcap_lo, labels_ptr,
    v_offset, n_cols, n_load, m_out, s_out, c_out, zy_out, ent_out,
    HAS_BIAS: tl.constexpr, TEMP: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr, LANES: tl.constexpr,
    ROWS_3D: tl.constexpr, STAGES: tl.constexpr, SPLIT_TAIL: tl.constexpr, MASKED_ROWS: tl.constexpr,
    PREFETCH: tl.constexpr, FINISH: tl.constexpr, SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = z_ptr + row_offset(row, stride_z, stride_outer, rows_inner, ROWS_3D)
    inv_t = row_inv_temperature(temp_ptr, inv_t_scalar, row, TEMP, ACC)
    softcap = full_softcap(softcap, softcap_lo, ACC)
    # MASKED_ROWS: a negative label marks a masked-out row: never read, (M, S, C, z~_y) = (0, 1, 0, 0), so logp =
    # entropy = 0. Else every row is read, and the first tiles' loads need not wait for the label's.
    label = tl.load(labels_ptr + row)
    row_ok = row_kept(label, MASKED_ROWS)
    n_vals = tl.where(row_ok, n_cols, 0)
    n_full = (n_vals // BLOCK_V) * BLOCK_V  # whole tiles, read without masks; then the partial one with masks
    if not SPLIT_TAIL:
        n_full = n_full * 0  # every tile masked (the loop as first measured)
    # the label logit, read before the floor so that a -inf label logit gives logp = -inf
    label_local = label - v_offset
    in_block = (label_local >= 0) & (label_local < n_cols)
    safe_label = tl.where(in_block, label_local, 0)
    zy = tl.load(z_row + safe_label, mask=row_ok, other=0.0).to(ACC)
    if HAS_BIAS:
        zy += tl.load(bias_ptr + safe_label).to(ACC)
    zy = cap_logits(zy, softcap, SOFTCAP)
    zy = tl.where(in_block, zy * inv_t, float("-inf"))
    zy = tl.where(row_ok, zy, 0.0)

    if LANES:  # per-lane state, merged once at the end (see online_lse_lanes_update)
        m = tl.full((BLOCK_V,), LOGIT_FLOOR, ACC)
        s = tl.zeros((BLOCK_V,), ACC)
        c = tl.zeros((BLOCK_V,), ACC)
    else:  # one running state, merged tile by tile
        m = tl.full((), LOGIT_FLOOR, ACC)
        s = tl.zeros((), ACC)
        c = tl.zeros((), ACC)
    if PREFETCH:  # the next whole tile's loads issued before this one is reduced: in flight through its barriers
        tile = tl.arange(0, BLOCK_V)
        # one predicate per tile: a compare of a splat, which keeps the loads 16 bytes wide (tl.broadcast_to of the
        # scalar compare would do the same compiled, but the interpreter turns it into an int32 mask it rejects)
        splat = tl.zeros((BLOCK_V,), tl.int32)
        z_next = tl.load(z_row + tile, mask=splat < n_full)
        for start in tl.range(0, n_full, BLOCK_V):
            z_raw = z_next
            z_next = tl.load(z_row + (start + BLOCK_V) + tile, mask=splat + (start + BLOCK_V) < n_full)
            z = scale_logits(z_raw, bias_ptr, start + tile, None, inv_t, softcap, HAS_BIAS, TEMP, ACC, False,
                             SOFTCAP)
            m, s, c = online_lse_step(m, s, c, z, None, False, LANES)
    else:
        for start in tl.range(0, n_full, BLOCK_V, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK_V)
            z = load_scaled_logits(z_row, bias_ptr, cols, None, None, inv_t, softcap, HAS_BIAS, TEMP, ACC, False,
                                   SOFTCAP)
            m, s, c = online_lse_step(m, s, c, z, None, False, LANES)
    for start in tl.range(n_full, n_vals, BLOCK_V, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < n_cols
        z = load_scaled_logits(z_row, bias_ptr, cols, cols < n_load, col_mask, inv_t, softcap, HAS_BIAS, TEMP, ACC,
                               True, SOFTCAP)
        m, s, c = online_lse_step(m, s, c, z, col_mask, True, LANES)
    if LANES:
        m, s, c = merge_lanes(m, s, c)
    # the value check (see logits_stats): a NaN has made S NaN already; a +inf makes M = +inf, and S NaN in the tile
    # loop (inf - inf) but not in the lanes loop, so it is flagged here, once per row
    s = tl.where(m == float("inf"), float("nan"), s)
    m = tl.where(row_ok, m, 0.0)
    s = tl.where(row_ok, s, 1.0)
    c = tl.where(row_ok, c, 0.0)
    tl.store(m_out + row, m)
    if FINISH:  # the block is the whole vocabulary: (M, log S, C/S, logp, entropy)
        log_s, cs, logp, ent = finish_row(m, s, c, zy)
        # a computed row whose label lies outside [0, V): logp NaN, so the caller's NaN scan of logp finds it (the
        # logits op's label range check rides on it: no reduction over the labels before this launch)
        logp = tl.where(row_ok & ~in_block, float("nan"), logp)
        tl.store(s_out + row, log_s)
        tl.store(c_out + row, cs)
        tl.store(zy_out + row, logp)
        tl.store(ent_out + row, ent)
    else:
        tl.store(s_out + row, s)
        tl.store(c_out + row, c)
        tl.store(zy_out + row, zy)


@triton.jit(do_not_specialize=_ROW_ARGS + ["m_ptr", "log_s_ptr", "cs_ptr", "g_logp_ptr", "g_ent_ptr"])
def _dlogits_kernel(
    z_ptr, stride_z, stride_outer, rows_inner, out_ptr, stride_out, bias_ptr, temp_ptr, inv_t_scalar, softcap,
    softcap_lo, labels_ptr, v_offset, n_cols, n_load, m_ptr, log_s_ptr, cs_ptr, g_logp_ptr, g_ent_ptr,
    HAS_BIAS: tl.constexpr, TEMP: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr, ROWS_3D: tl.constexpr, SPLIT_TAIL: tl.constexpr,
    MASKED_ROWS: tl.constexpr, SOFTCAP: tl.constexpr, STREAM: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inv_t = row_inv_temperature(temp_ptr, inv_t_scalar, row, TEMP, ACC)
    softcap = full_softcap(softcap, softcap_lo, ACC)
    # STREAM: the logits' loads evict_first and the stores .cs (streamed): each byte is touched once (STREAM_BWD).
    # MASKED_ROWS: a negative label marks a masked-out row, its gradient 0 and its logits never read, so the tile's
    # loads wait for the label's (one memory round trip before another, in a program that reads one tile). Else
    # they are issued at once.
    label = tl.load(labels_ptr + row)
    row_ok = row_kept(label, MASKED_ROWS)
    z_row = z_ptr + row_offset(row, stride_z, stride_outer, rows_inner, ROWS_3D)
    out_row = out_ptr + row.to(tl.int64) * stride_out
    g_logp = tl.zeros((), ACC)
    g_ent = tl.zeros((), ACC)
    if HAS_GLOGP:
        g_logp = tl.load(g_logp_ptr + row).to(ACC)
    if HAS_GENT:
        g_ent = tl.load(g_ent_ptr + row).to(ACC)
    # compared with the int32 columns (one compare per element, not two). A label that int32 cannot hold (past 2^31,
    # which the cast would wrap into the block: only with the value checks off) becomes -1 first, once per row.
    # (Checking [0, n_cols) here instead took 80 registers for V odd on the sm_90 compile, against 40 for this.)
    label_local = label - v_offset
    label32 = label_local.to(tl.int32)
    label_local = tl.where(label32.to(tl.int64) == label_local, label32, -1)
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    cs = tl.load(cs_ptr + row)
    n_unmasked = tl.where(row_ok, n_cols, 0)
    if not SPLIT_TAIL:
        n_unmasked = n_unmasked * 0  # every tile masked (the kernel as first measured)
    if SOFTCAP:  # tanh = z~ T / s, for the cap's derivative 1 - tanh^2
        cap_k = 1.0 / (softcap * inv_t)
    evict: tl.constexpr = "evict_first" if STREAM else ""  # ("": Triton's defaults)
    store_cache: tl.constexpr = ".cs" if STREAM else ""
    if (tl.program_id(1) + 1) * BLOCK_V <= n_unmasked:  # a whole tile of values: no masks
        z = tl.load(z_row + cols, eviction_policy=evict)
        z = scale_logits(z, bias_ptr, cols, None, inv_t, softcap, HAS_BIAS, TEMP, ACC, False, SOFTCAP)
        dz = dlogits_tile(z, cols, label_local, m, log_s, cs, g_logp, g_ent, inv_t, HAS_GLOGP, HAS_GENT, TEMP)
        if SOFTCAP:
            dz = dz * cap_grad(z, cap_k)
        tl.store(out_row + cols, dz.to(out_ptr.dtype.element_ty), cache_modifier=store_cache)
    else:  # the row's last tile (its padding written with 0), or a masked-out row (zeros, nothing read)
        col_mask = cols < n_cols
        z = tl.load(z_row + cols, mask=cols < tl.where(row_ok, n_load, 0), other=float("-inf"),
                    eviction_policy=evict)
        z = scale_logits(z, bias_ptr, cols, col_mask, inv_t, softcap, HAS_BIAS, TEMP, ACC, True, SOFTCAP)
        dz = dlogits_tile(z, cols, label_local, m, log_s, cs, g_logp, g_ent, inv_t, HAS_GLOGP, HAS_GENT, TEMP)
        if SOFTCAP:
            dz = dz * cap_grad(z, cap_k)
        dz = tl.where(row_ok, dz, 0.0)  # (outside col_mask z is the floor: p = 0, dz = 0)
        tl.store(out_row + cols, dz.to(out_ptr.dtype.element_ty), mask=cols < n_load, cache_modifier=store_cache)


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (the float64 test suite runs every engine)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_stride(*vectors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """The kernels read these (labels, bias, temperatures, per-row vectors) by pointer with unit stride: a strided
    view (a caller's ``x[::2]``, an upstream gradient's layout) is copied; a contiguous one is passed as it is."""
    return tuple(v if v is None else v.contiguous() for v in vectors)


def _temperature_args(temperature, z: Tensor) -> Tuple[Optional[Tensor], float]:
    """(per-row tensor or None, scalar 1/T) for a launch (its TEMP: :func:`_temp_mode`). Scalar kernel arguments are
    fp32, so an fp64 block with a temperature other than 1 takes the per-row path to keep full precision."""
    if isinstance(temperature, Tensor):
        return _unit_stride(temperature)[0], 1.0
    if z.dtype == torch.float64 and float(temperature) != 1.0:
        return torch.full((_rows(z)[0],), float(temperature), dtype=torch.float64, device=z.device), 1.0
    return None, 1.0 / float(temperature)


def softcap_args(softcap: Optional[float]) -> Tuple[float, float]:
    """(hi, lo), the launch arguments that carry the cap s (1.0 for none: the kernel's SOFTCAP leaves it unread),
    split by :func:`~rlkernels.triton_ops.tl_utils.split_f64`: an fp64 launch rebuilds s to 48 of its 53 bits
    (``full_softcap``)."""
    return split_f64(float(softcap or 1.0))


def _temp_mode(temp: Optional[Tensor], inv_t: float) -> int:
    """The TEMP constexpr of a launch: per-row temperatures, a scalar, or none (T = 1: no multiply per logit)."""
    if temp is not None:
        return TEMP_ROW.value
    return TEMP_NONE.value if inv_t == 1.0 else TEMP_SCALAR.value


def _rows(z: Tensor) -> Tuple[int, int, int, int, bool]:
    """(rows, row stride, outer stride, rows per outer index, 3-D?) of a (rows, n_cols) or (B, T, n_cols) tensor with
    unit stride along the vocabulary: row r = b T + t of a 3-D tensor lies at b * outer + t * row stride, so a
    (B, T, V) view such as ``logits[:, :-1]`` is read where it lies, never flattened into a copy."""
    assert z.stride(-1) == 1, "logits must have unit stride along the vocabulary"
    if z.dim() == 2:
        return z.shape[0], z.stride(0), 0, 1, False
    B, T, _ = z.shape
    return B * T, z.stride(1), z.stride(0), max(T, 1), True


# Rows of the engine's own logits blocks are padded to a multiple of this many entries: a row stride and a read
# bound divisible by 16 are what let the compiler issue 16-byte loads (rlkernels.triton_ops.aot); without them a V
# such as 50257 is read one bf16 at a time.
ROW_PAD = 16


def padded_width(n_cols: int) -> int:
    """Row length of a block buffer for ``n_cols`` values: a multiple of ROW_PAD."""
    return -(-n_cols // ROW_PAD) * ROW_PAD


def _n_load(z: Tensor, n_load: Optional[int]) -> int:
    n_cols = z.shape[-1]
    if n_load is None:
        return n_cols
    assert n_cols <= n_load <= z.stride(-2) and z.dim() == 2, "padding needs a 2-D block with room in each row"
    return n_load


@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched: vocabulary tile, warps, pipeline stages of the statistics loop, whether whole
    tiles are read without masks, and whether the statistics loop issues the next whole tile's loads before it
    reduces this one (``prefetch``, with ``split_tail``), and whether the dL/dz kernel's loads and stores carry
    streaming cache hints (``stream``); see the module constants for the measured defaults."""
    block_v: int
    num_warps: int
    stages: int = 1
    split_tail: bool = True
    prefetch: bool = False
    stream: bool = False


def stats_launch(lanes: bool) -> LaunchConfig:
    """The default launch of the statistics kernel (the module constants, read now)."""
    if lanes:
        return LaunchConfig(BLOCK_V_LANES, NUM_WARPS_LANES, STATS_STAGES, SPLIT_TAIL, STATS_PREFETCH)
    return LaunchConfig(BLOCK_V_FWD, NUM_WARPS_FWD, STATS_STAGES, SPLIT_TAIL, STATS_PREFETCH)


def dlogits_launch() -> LaunchConfig:
    """The default launch of the dL/dz kernel (the module constants, read now)."""
    return LaunchConfig(BLOCK_V_BWD, NUM_WARPS_BWD, 1, SPLIT_TAIL_BWD, stream=STREAM_BWD)


# the module constants above that bench/gpu_tune.py may change for a while (override_defaults)
_TUNABLE = ("BLOCK_V_FWD", "NUM_WARPS_FWD", "BLOCK_V_BWD", "NUM_WARPS_BWD", "BLOCK_V_LANES", "NUM_WARPS_LANES",
            "STATS_STAGES", "SPLIT_TAIL", "SPLIT_TAIL_BWD", "STATS_PREFETCH", "STREAM_BWD")


@contextlib.contextmanager
def override_defaults(**changes):
    """Other launch defaults inside the ``with`` block, restored on exit even when it raises: how bench/gpu_tune.py
    times a whole ``fused_grpo_loss`` with one default changed (a single kernel takes ``launch=`` instead). Names
    not in the tunable set raise ``KeyError``."""
    unknown = sorted(set(changes) - set(_TUNABLE))
    if unknown:
        raise KeyError(f"not a tunable launch default: {unknown}; these are: {_TUNABLE}")
    module = globals()
    saved = {k: module[k] for k in changes}
    module.update(changes)
    try:
        yield
    finally:
        module.update(saved)


def _row_sample(z: Tensor, rows: int) -> Tuple[Tensor, int]:
    """A leading slice of ``z`` with about autotune.SAMPLE_ROWS rows (whole batches of a 3-D tensor), and its rows."""
    if z.dim() == 2:
        k = min(z.shape[0], autotune.SAMPLE_ROWS)
        return z[:k], k
    T = max(z.shape[1], 1)
    b = min(z.shape[0], max(1, autotune.SAMPLE_ROWS // T))
    return z[:b], b * z.shape[1]


def logits_stats(z: Tensor, labels: Tensor, bias: Optional[Tensor], temperature, v_offset: int = 0,
                 n_load: Optional[int] = None, masked_rows: bool = True, launch: Optional[LaunchConfig] = None,
                 finish: bool = False, prepare: bool = False, softcap: float = 0.0):
    """Per-row (M, S, C, z~_y) of the block ``z`` (rows, n_cols), or (B, T, n_cols) with rows b T + t, whose column 0
    is vocabulary entry ``v_offset``.

    ``labels`` (rows,) are global ids; ``bias`` is the block's slice or None; ``temperature`` a float or a (rows,)
    tensor. Returns four (rows,) fp32 (fp64) tensors; z~_y is -inf where the label lies outside the block.
    The value check rides on this one read of the block: S is NaN in every row holding a NaN or +inf (-inf is a
    value). The caller decides whether that is an error.
    ``n_load``: how far each row may be read (default: its n_cols values), for a block whose rows are padded in
    memory that the caller owns (see :func:`padded_width`); the padding's contents are ignored.
    ``masked_rows``: labels may be negative (masked-out rows, skipped); False promises they are not.
    ``launch``: this launch instead of the default (and of autotuning): bench/gpu_tune.py's sweep.
    ``finish``: the block is the whole vocabulary; return what ``finish_stats`` makes of the state instead,
    (M, log S, C/S, logp, entropy), five separate tensors written by the kernel itself (the logits path: five
    elementwise launches and a copy fewer after the kernel). A computed row whose label lies outside ``[0, n_cols)``
    then gets logp NaN (its entropy is the row's own): the logits op's label check reads that with its NaN scan.
    ``prepare``: return ``(outputs, start)`` with nothing queued yet: the outputs allocated and the launch prepared,
    ``start()`` queues the kernel (the logits op calls it once its value checks' copies are queued).
    ``softcap``: s > 0 caps each logit (plus bias) to s tanh(z / s) before the temperature; 0 leaves them. It
    travels as two fp32 kernel arguments (:func:`softcap_args`): an fp64 block computes with s to 48 bits.
    """
    rows = _rows(z)[0]
    acc = _acc(z.dtype)
    outs = _stats_outputs(rows, acc, z.device, finish)
    if rows == 0:
        return (outs, lambda: None) if prepare else outs
    labels, bias = _unit_stride(labels, bias)
    temp, inv_t = _temperature_args(temperature, z)
    lanes = stats_kernel() == "lanes"
    n_load = _n_load(z, n_load)
    cfg = launch or stats_launch(lanes)
    if launch is None and autotune.enabled():  # timing candidates launches kernels: only once the call is queued
        def start():
            key = ("stats", z.device, z.dtype, autotune.bucket(z.shape[-1]), lanes, bias is not None,
                   _temp_mode(temp, inv_t), z.dim(), masked_rows, finish, bool(softcap))
            zs, k = _row_sample(z, rows)
            scratch = _stats_outputs(k, acc, z.device, finish)
            tuned = autotune.pick(key, autotune.stats_candidates(lanes), lambda c: _launch_stats(
                zs, labels[:k], bias, None if temp is None else temp[:k], inv_t, v_offset, n_load, lanes,
                masked_rows, c, scratch, softcap=softcap))
            _launch_stats(z, labels, bias, temp, inv_t, v_offset, n_load, lanes, masked_rows, tuned, outs,
                          softcap=softcap)
    else:
        start = _launch_stats(z, labels, bias, temp, inv_t, v_offset, n_load, lanes, masked_rows, cfg, outs,
                              prepare=True, softcap=softcap)
    if prepare:
        return outs, start
    start()
    return outs


def _stats_outputs(rows: int, acc: torch.dtype, device, finish: bool) -> Tuple[Tensor, ...]:
    # finished: five tensors of their own (they are returned as they are; views of one buffer would be copied by the
    # op's output rule); else four rows of one buffer
    if finish:
        return tuple(torch.empty(rows, dtype=acc, device=device) for _ in range(5))
    return torch.empty(4, rows, dtype=acc, device=device).unbind(0)


def _launch_stats(z, labels, bias, temp, inv_t, v_offset, n_load, lanes, masked_rows, cfg: LaunchConfig, outs,
                  prepare: bool = False, softcap: float = 0.0):
    """Queue the statistics kernel, or with ``prepare`` return the function that queues it."""
    rows, stride, outer, inner, rows_3d = _rows(z)
    n_cols = z.shape[-1]
    return (prepare_launch if prepare else fast_launch)(
        _logits_stats_kernel, (rows,),
        z, stride, outer, inner, bias if bias is not None else z, temp if temp is not None else z, inv_t,
        *softcap_args(softcap), labels, v_offset, n_cols, n_load, outs[0], outs[1], outs[2], outs[3], outs[-1],
        HAS_BIAS=bias is not None, TEMP=_temp_mode(temp, inv_t), ACC=_TL[_acc(z.dtype)],
        BLOCK_V=min(cfg.block_v, next_pow2(n_cols)), LANES=lanes,
        ROWS_3D=rows_3d, STAGES=cfg.stages, SPLIT_TAIL=cfg.split_tail, MASKED_ROWS=masked_rows,
        PREFETCH=cfg.prefetch and cfg.split_tail, FINISH=len(outs) == 5, SOFTCAP=bool(softcap),
        num_warps=cfg.num_warps,
    )


def dlogits(z: Tensor, out: Tensor, labels: Tensor, bias: Optional[Tensor], temperature, v_offset: int,
            m: Tensor, log_s: Tensor, cs: Tensor, g_logp: Optional[Tensor], g_ent: Optional[Tensor],
            n_load: Optional[int] = None, masked_rows: bool = True, launch: Optional[LaunchConfig] = None,
            softcap: float = 0.0) -> Tensor:
    """Write dL/dz of the block ``z`` (2-D or 3-D, as in :func:`logits_stats`) into ``out``, a row-major tensor of
    the same shape (may be ``z`` itself: each element is read before it is written by the same program). Returns
    ``out``. ``n_load``, ``masked_rows``, ``launch`` and ``softcap`` as in :func:`logits_stats` (with a cap, dL/dz is
    with respect to the raw logits: the cap's derivative 1 - tanh^2 is applied); the padding of ``out`` (then ``z``
    itself) is written with 0."""
    rows = _rows(z)[0]
    assert out.shape == z.shape and out.stride(-1) == 1 and (out.dim() == 2 or out.is_contiguous())
    if rows == 0:
        return out
    labels, bias, m, log_s, cs, g_logp, g_ent = _unit_stride(labels, bias, m, log_s, cs, g_logp, g_ent)
    temp, inv_t = _temperature_args(temperature, z)
    n_load = _n_load(z, n_load)
    vectors = (m, log_s, cs, g_logp, g_ent)
    cfg = launch or dlogits_launch()
    if launch is None and autotune.enabled():  # timed out of place on a slice: the block itself may be ``out``
        key = ("dlogits", z.device, z.dtype, autotune.bucket(z.shape[-1]), bias is not None,
               _temp_mode(temp, inv_t),
               g_logp is not None, g_ent is not None, z.dim(), masked_rows, bool(softcap))
        zs, k = _row_sample(z, rows)
        scratch = torch.empty(zs.shape[:-1] + (n_load,), dtype=out.dtype, device=z.device)[..., : z.shape[-1]]
        sliced = tuple(None if v is None else v[:k] for v in vectors)
        cfg = autotune.pick(key, autotune.dlogits_candidates(), lambda c: _launch_dlogits(
            zs, scratch, labels[:k], bias, None if temp is None else temp[:k], inv_t, v_offset, n_load, sliced,
            masked_rows, c, softcap))
    _launch_dlogits(z, out, labels, bias, temp, inv_t, v_offset, n_load, vectors, masked_rows, cfg, softcap)
    return out


def _launch_dlogits(z, out, labels, bias, temp, inv_t, v_offset, n_load, vectors, masked_rows, cfg: LaunchConfig,
                    softcap: float = 0.0):
    rows, stride, outer, inner, rows_3d = _rows(z)
    m, log_s, cs, g_logp, g_ent = vectors
    block = min(cfg.block_v, next_pow2(n_load))
    fast_launch(
        _dlogits_kernel, (rows, cdiv(n_load, block)),
        z, stride, outer, inner, out, out.stride(-2), bias if bias is not None else z,
        temp if temp is not None else z, inv_t, *softcap_args(softcap), labels, v_offset, z.shape[-1], n_load, m,
        log_s, cs,
        g_logp if g_logp is not None else m, g_ent if g_ent is not None else m,
        HAS_BIAS=bias is not None, TEMP=_temp_mode(temp, inv_t), HAS_GLOGP=g_logp is not None,
        HAS_GENT=g_ent is not None, ACC=_TL[_acc(z.dtype)], BLOCK_V=block, ROWS_3D=rows_3d,
        SPLIT_TAIL=cfg.split_tail, MASKED_ROWS=masked_rows, SOFTCAP=bool(softcap), STREAM=cfg.stream,
        num_warps=cfg.num_warps,
    )
