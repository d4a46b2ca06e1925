"""Shared ``@triton.jit`` helpers: loading a tile of logits, the online log-sum-exp merge, dL/dz, and the per-token
math of the objective (clipped ratios, KL estimators).

Only Triton features available in 3.6 are used (the GPU machines run 3.6; CI runs 3.9's interpreter).
"""
import math
import struct
from typing import Tuple

import triton
import triton.language as tl

from ..config import KL_ESTIMATORS
from ..engines import torch_engine

# -inf logits are floored here so exp() gives exactly 0 and p * (z - mu) is 0 * finite, never 0 * inf (LOSSES.md
# B §10.5): the torch engine's constant, as a constexpr object (compiled Triton 3.6 reads no other globals).
LOGIT_FLOOR = tl.constexpr(torch_engine.LOGIT_FLOOR)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def logit_floor(ACC: tl.constexpr):
    """LOGIT_FLOOR in ``ACC``, exactly. A bare float literal is compiled as an fp32 constant, so in fp64 it would be
    -1.0000000200408773e20, below the state's fp64 -1e20: a whole -inf row (every logit floored) would then sum to
    exp(-2e12) = 0 instead of V, and its log-prob would be NaN (seen on the H100; the interpreter keeps fp64)."""
    return tl.full((), LOGIT_FLOOR, ACC)


@triton.jit
def fast_exp(x):
    """e^x. fp32: 2^(x log2 e) on ``ex2.approx.ftz``, the hardware exponential that ``tl.exp`` also ends in, minus
    the range fix-up that its non-ftz form costs (a compare and two multiplies per element on sm_90): results below
    2^-126 (1.2e-38) flush to 0, which no sum here can see (each row's largest term is 1) and no gradient entry
    needs. fp64: ``tl.exp``, full precision (log2 e as an fp32 constant would keep 8 of its 16 digits)."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    return tl.exp2(x * LOG2E)


@triton.jit
def div_rn(a, b):
    """a / b rounded as IEEE division (torch's): Triton's fp32 ``/`` compiles to the approximate ``div.full.f32`` (up
    to 2 ulp); fp64 ``/`` is IEEE already (``tl.math.div_rn`` takes fp32 only). An if/else, not an early return:
    the compiler still builds the code after a return, and div_rn of fp64 would not compile (the interpreter
    never sees it)."""
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def row_offset(row, stride, stride_outer, rows_inner, ROWS_3D: tl.constexpr):
    """Element offset (int64) of row ``row``: ``row * stride``, or for a (B, T, V) tensor with rows b T + t,
    ``b * stride_outer + t * stride``."""
    r = row.to(tl.int64)
    if ROWS_3D:
        return (r // rows_inner) * stride_outer + (r % rows_inner) * stride
    return r * stride


# how a launch scales logits by 1/T (the TEMP constexpr): not at all (T = 1, the usual case: one multiply per logit
# less), by one scalar, or by each row's own temperature
TEMP_NONE = tl.constexpr(0)
TEMP_SCALAR = tl.constexpr(1)
TEMP_ROW = tl.constexpr(2)


@triton.jit
def row_inv_temperature(temp_ptr, inv_t_scalar, row, TEMP: tl.constexpr, ACC: tl.constexpr):
    """1/T for row ``row``: its own (TEMP_ROW, read from ``temp_ptr``), the launch's scalar, or 1."""
    if TEMP == TEMP_ROW:
        return 1.0 / tl.load(temp_ptr + row).to(ACC)
    if TEMP == TEMP_SCALAR:
        return inv_t_scalar
    return tl.full((), 1.0, ACC)


@triton.jit
def row_kept(label, MASKED_ROWS: tl.constexpr):
    """Whether a row is computed: its label is not negative (MASKED_ROWS), or always (a constant the compiler folds
    away, so that nothing waits for the label's load)."""
    if MASKED_ROWS:
        return label >= 0
    return tl.full((), 1, tl.int1)


def split_f64(x: float) -> Tuple[float, float]:
    """(hi, lo): ``x`` as two fp32 kernel arguments, hi = x rounded to fp32 and lo = the rest (rounded to fp32
    too), so that an fp64 launch rebuilds x to 48 of its 53 bits (:func:`join_f64`). A float kernel argument is fp32:
    an fp64 launch would otherwise carry fp32's rounding into fp64 results (a softcap of 30 put a loss of 1.67 off by
    8e-8, seen on an H100). hi is rounded here, not by the launch: the interpreter would hand on the Python float.
    Past fp32's range (and for inf): (x, 0.0), the fp32 argument inf as it would be anyway."""
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        hi = math.inf
    if math.isinf(hi):
        return x, 0.0
    return hi, x - hi


@triton.jit
def join_f64(hi, lo, ACC: tl.constexpr):
    """The constant hi + lo of :func:`split_f64` in the accumulation dtype: fp64 launches add the two, fp32 launches
    take ``hi``."""
    if ACC == tl.float64:  # (an if/else: code after a return is still built, and its fp32 would clash, see div_rn)
        x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = hi
    return x


@triton.jit
def full_softcap(hi, lo, ACC: tl.constexpr):
    """The cap s in the accumulation dtype, from a launch's two fp32 arguments s = hi + lo
    (``logprobs.softcap_args``, :func:`join_f64`)."""
    return join_f64(hi, lo, ACC)


@triton.jit
def cap_logits(z, softcap, SOFTCAP: tl.constexpr):
    """s tanh(z / s) with s = ``softcap`` (SOFTCAP; else z as it is; in z's dtype: :func:`full_softcap`): a model's
    final-logit cap (Gemma 2, Gemma 4), as s - 2 s / (e^(2 z / s) + 1), one exponential per logit: exactly -s at
    z = -inf and s at +inf, NaN kept; within about one ulp of 1, times s, of the true value (fp32: 2e-6 at s = 30,
    the spacing of fp32 logits near 30 itself)."""
    if SOFTCAP:
        e = fast_exp(z * (2.0 / softcap))
        z = softcap - (2.0 * softcap) / (e + 1.0)
    return z


@triton.jit
def cap_grad(z, k):
    """d(s tanh(x / s))/dx = 1 - tanh^2 at each logit of a tile of z~ = s tanh(x / s) / T, with k = T / s per row
    (tanh = z~ k, its size held to 1: a floored column, -1e20 of padding, gives 0, with no overflow on the way; its
    dL/dz~ is 0 already)."""
    th = tl.minimum(tl.abs(z * k), 1.0)
    return 1.0 - th * th


@triton.jit
def load_scaled_logits(z_row_ptr, bias_ptr, cols, load_mask, col_mask, inv_t, softcap, HAS_BIAS: tl.constexpr,
                       TEMP: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """One tile of z~ = (z + b) * (1/T) in the accumulation dtype ACC (fp32; fp64 for fp64 inputs), with -inf
    floored; with SOFTCAP, z~ = s tanh((z + b) / s) * (1/T) (:func:`cap_logits`). MASKED=False: a whole tile of values, no masks (the loop body). MASKED=True (a row's last, partial
    tile): columns outside ``col_mask`` (``cols < n_cols``) come back as the floor; ``load_mask`` (``cols <
    n_load``) may reach past the row's values into padding that the caller owns, a bound divisible by 16 that keeps
    the loads 16 bytes wide when V is not. A NaN stays NaN (the floor's max propagates it: one instruction, as the
    plain max that would turn it into the floor), so a row holding one gets NaN sums, logp and entropy."""
    if MASKED:
        z = tl.load(z_row_ptr + cols, mask=load_mask, other=float("-inf"))
    else:
        z = tl.load(z_row_ptr + cols)
    return scale_logits(z, bias_ptr, cols, col_mask, inv_t, softcap, HAS_BIAS, TEMP, ACC, MASKED, SOFTCAP)


@triton.jit
def scale_logits(z, bias_ptr, cols, col_mask, inv_t, softcap, HAS_BIAS: tl.constexpr, TEMP: tl.constexpr,
                 ACC: tl.constexpr, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """:func:`load_scaled_logits` after its load: a tile of raw logits ``z`` (as loaded, input dtype) -> z~."""
    z = z.to(ACC)
    if MASKED:
        z = tl.where(col_mask, z, float("-inf"))
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    elif HAS_BIAS:
        z += tl.load(bias_ptr + cols).to(ACC)
    if SOFTCAP:
        z = cap_logits(z, softcap, SOFTCAP)
        if MASKED:  # the cap took the columns outside the row to -s: back to -inf, outside the softmax
            z = tl.where(col_mask, z, float("-inf"))
    if TEMP != TEMP_NONE:
        z = z * inv_t
    return tl.maximum(z, logit_floor(ACC), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def online_lse_update(m, s, c, z, col_mask, MASKED: tl.constexpr):
    """Merge one tile into the running (M, S, C) state of B §1.2, C = sum exp(z - M) (z - M).

    The state starts at (LOGIT_FLOOR, 0, 0): finite, so the first rescale is exp(floor - M') * 0 = 0 without nan.
    MASKED: only the columns in ``col_mask`` count (a floored column would add exp(0) = 1 to a row of -inf).
    """
    if MASKED:
        tile_max = tl.max(tl.where(col_mask, z, logit_floor(z.dtype)), axis=0)
    else:
        tile_max = tl.max(z, axis=0)
    m_new = tl.maximum(m, tile_max)
    alpha = fast_exp(m - m_new)
    shifted = z - m_new
    e = fast_exp(shifted)
    if MASKED:
        e = tl.where(col_mask, e, 0.0)
    # both sums in one reduction of the joined pair: 6 barriers per tile on sm_90 instead of 9 (tl.reduce with a
    # combine function would do the same compiled, but the interpreter runs that one element at a time in Python)
    tile_s, tile_c = tl.split(tl.sum(tl.join(e, e * shifted), axis=0))
    c = alpha * (c + (m - m_new) * s) + tile_c
    s = alpha * s + tile_s
    return m_new, s, c


@triton.jit
def online_lse_lanes_update(m, s, c, z, col_mask, MASKED: tl.constexpr):
    """The same merge kept per lane (m, s, c are BLOCK_V vectors; each lane sees every BLOCK_V-th column): no
    reduction inside the loop, one exp per element. With e = exp(-|z - m|):
    z > m: (m, s, c) <- (z, s e + 1, e (c + (m - z) s)); else (m, s + e, c + e (z - m)). MASKED: columns outside
    ``col_mask`` keep the state."""
    up = z > m
    e = fast_exp(tl.where(up, m - z, z - m))
    s_new = tl.where(up, s * e + 1.0, s + e)
    c_new = tl.where(up, e * (c + (m - z) * s), c + e * (z - m))
    m_new = tl.maximum(m, z)
    if MASKED:
        return tl.where(col_mask, m_new, m), tl.where(col_mask, s_new, s), tl.where(col_mask, c_new, c)
    return m_new, s_new, c_new


@triton.jit
def online_lse_step(m, s, c, z, col_mask, MASKED: tl.constexpr, LANES: tl.constexpr):
    """One tile into the running state: per lane (LANES: m, s, c are BLOCK_V vectors) or merged (scalars)."""
    if LANES:
        m, s, c = online_lse_lanes_update(m, s, c, z, col_mask, MASKED)
    else:
        m, s, c = online_lse_update(m, s, c, z, col_mask, MASKED)
    return m, s, c


@triton.jit
def merge_lanes(m, s, c):
    """(M, S, C) of the whole row from the per-lane states: alpha_i = exp(m_i - M), S = sum alpha_i s_i,
    C = sum alpha_i (c_i + (m_i - M) s_i). Lanes that saw nothing hold (LOGIT_FLOOR, 0, 0) and add 0."""
    row_m = tl.max(m, axis=0)
    alpha = fast_exp(m - row_m)
    return row_m, tl.sum(alpha * s, axis=0), tl.sum(alpha * (c + (m - row_m) * s), axis=0)


@triton.jit
def finish_row(m, s, c, zy):
    """(log S, C/S, logp, entropy) of a row from its merged state and label logit z~_y (B §1.1), the arithmetic of
    ``torch_engine.finish_stats`` (logp = (z~_y - M) - log S, entropy = log S - C/S), rounded as torch rounds it:
    ``tl.log`` compiles to libdevice's logf (log in fp64), as torch.log on CUDA, and the division is IEEE."""
    log_s = tl.log(s)
    cs = div_rn(c, s)
    return log_s, cs, (zy - m) - log_s, log_s - cs


@triton.jit
def dlogits_tile(z, cols, label_local, m, log_s, cs, g_logp, g_ent, inv_t, HAS_GLOGP: tl.constexpr,
                 HAS_GENT: tl.constexpr, TEMP: tl.constexpr):
    """dL/dz = [g_logp (1_y - p) - g_H p (z~ - mu)] / T for one tile (B §1.3), with t = z~ - M, p = exp(t - log S),
    z~ - mu = t - C/S: per element -p (a t + b) with a = g_H and b = g_logp - g_H C/S formed once per row (one
    multiply-add), plus g_logp at the label (``label_local``, int32), then / T. (Folding 1/T into a and b saves one
    more multiply but took 39 registers instead of 32 on Triton 3.6: 48 resident warps per SM instead of 64.)"""
    t = z - m
    p = fast_exp(t - log_s)
    a = tl.zeros_like(m)
    b = tl.zeros_like(m)
    if HAS_GENT:
        a = g_ent
        b = -g_ent * cs
    if HAS_GLOGP:
        b += g_logp
    dz = -p * (a * t + b)
    if HAS_GLOGP:
        dz += tl.where(cols == label_local, g_logp, 0.0)
    if TEMP != TEMP_NONE:
        dz = dz * inv_t
    return dz


# ----------------------------------------------------------------------------------------------------------------
# the objective's per-token math (rlkernels.objective.token_loss, LOSSES.md B §2-4): values and derivatives
# ----------------------------------------------------------------------------------------------------------------
# KL estimator codes (the KL_EST constexpr): positions in config.KL_ESTIMATORS, as the launch passes them
KL_K1, KL_ABS, KL_K2, KL_K3, KL_LOW_VAR = (tl.constexpr(KL_ESTIMATORS.index(name))
                                          for name in ("k1", "abs", "k2", "k3", "low_var_kl"))


@triton.jit
def expm1(x):
    """e^x - 1 without the cancellation of ``exp(x) - 1`` near 0 (``torch.expm1``): Kahan's (u - 1) x / log u with
    u = e^x for |x| < 0.5, where the rounding of u cancels between u - 1 (exact there) and log u; u - 1 elsewhere
    (no cancellation: |e^x - 1| > 0.39). x where u rounds to 1; -1 at -inf, inf at inf, NaN kept. (libdevice's
    expm1 is not in Triton's interpreter, which runs the CPU tests.)"""
    u = tl.exp(x)
    near = (tl.abs(x) < 0.5) & (u != 1.0)
    u_near = tl.where(near, u, 2.0)  # elsewhere a u whose log is neither 0 nor -inf: no 0 / 0 to mask afterwards
    y = tl.where(near, div_rn((u_near - 1.0) * x, tl.log(u_near)), u - 1.0)
    return tl.where(u == 1.0, x, y)


@triton.jit
def clamp_grad(x, lo, hi):
    """(clamp(x, lo, hi), d/dx): ``torch.clamp`` and its backward, which passes the gradient where lo <= x <= hi
    (both inclusive) and gives 0 elsewhere. lo = -inf / hi = inf for a one-sided clamp; NaN stays NaN, with
    gradient 0."""
    y = tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
    return y, tl.where((x >= lo) & (x <= hi), 1.0, 0.0).to(x.dtype)


@triton.jit
def kl_estimate(d, EST: tl.constexpr, STRAIGHT: tl.constexpr):
    """(k, dk/dd) of the per-token KL estimator at d = logp - ref_logp (``objective.kl_penalty``, B §4): k1 d, abs
    |d|, k2 d^2/2, k3 e^-d - 1 + d (via expm1), low_var_kl k3 with -d clamped to [-20, 20] and the value to
    [-10, 10] (gradient 0 where a clamp bites). STRAIGHT: the value is the estimator's, the gradient k2's (d)."""
    one = tl.full(d.shape, 1.0, d.dtype)
    if EST == KL_K1:
        k = d
        dk = one
    elif EST == KL_ABS:
        k = tl.abs(d)
        dk = tl.where(d > 0, one, tl.where(d < 0, -one, 0.0 * one))
    elif EST == KL_K2:
        k = 0.5 * d * d
        dk = d
    elif EST == KL_K3:
        em = expm1(-d)
        k = em + d
        dk = -em
    else:
        minus_d, pass_d = clamp_grad(-d, -20.0, 20.0)
        em = expm1(minus_d)
        k, pass_k = clamp_grad(em - minus_d, -10.0, 10.0)
        dk = -em * (pass_d * pass_k)
    if STRAIGHT:
        dk = d
    return k, dk
