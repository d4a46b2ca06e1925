// Row kernels of the native CPU engine: per-row softmax statistics of a block of logits, and dL/dz formed in place.
//
// Both kernels run over the rows of a block in parallel (at::parallel_for) and over the vocabulary with
// at::vec::Vectorized<acc_t> (16 fp32 lanes with AVX-512, 8 with AVX2), two vectors per step so that a bf16 step is
// one full Vectorized<BFloat16> load. Bytes per logit (fp32 input, no bias):
//   block_stats: reads 4, writes 0  (torch engine: clamp_, amax, sub_, exp, sum, row dot: 6 passes, 3 writing)
//   dlogits:     reads 4, writes 4  (torch engine: clamp_, sub_, sub, exp_, sub_, mul_, add_, mul_, neg_, div_:
//                                    10 read-write passes over two fp32 blocks)
// Statistics use one streaming pass per row: the row is cut into L1-sized segments; a max sweep reads a segment
// from memory, an exp sweep re-reads it from L1, and the segment's (max, sum, C) is merged into the row's state with
// the online rule of LOSSES.md B §1.2, so exp() runs once per logit. The alternative, an online max per vector lane
// rescaled at every step, needs a second exp() per logit for the rescale factor: measured on 4096 x 32000 fp32
// (2-core AVX-512 machine of this project, other jobs running) it took 111-116 ms against 69-85 ms for the
// segmented sweep; Sleef's 1-ulp expf instead of exp_u20 took 130-135 ms.
#include "row_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

namespace rlk {
namespace {

using at::vec::Vectorized;

// Logits per segment of the statistics pass: 2048 fp32 = 8 KiB, so the exp sweep re-reads the segment from L1
// (32-48 KiB on current x86 cores) and the segment merge (2 scalar exp) costs < 1% of the segment's work.
constexpr int64_t kSegment = 2048;
// Blocks with fewer logits than this run on one thread: block_stats takes ~0.40 ns per fp32 logit per thread
// (measured, 4096 x 32000: 52.6 ms on 1 thread, 27.0 ms on 2), so this is ~13 us of work, a few OpenMP fork/joins.
// (The module is built with -fopenmp, rlkernels/native/builder.py: without it at::parallel_for runs serially.)
constexpr int64_t kMinParallelLogits = 32768;

// A per-row input (labels, temperatures, upstream gradients): any 1-D stride (autograd hands back expanded, stride-0
// gradients for sums), or absent.
template <typename T>
struct RowVec {
  const T* p = nullptr;
  int64_t stride = 0;
  T at(int64_t r) const { return p[r * stride]; }
  explicit operator bool() const { return p != nullptr; }
};

template <typename T>
RowVec<T> row_vec(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  return {t->data_ptr<T>(), t->stride(0)};
}

template <typename T>
T hsum(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = 0;
  for (int64_t k = 0; k < Vectorized<T>::size(); ++k) s += buf[k];
  return s;
}

template <typename T>
T hmax(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  T m = buf[0];
  for (int64_t k = 1; k < Vectorized<T>::size(); ++k) m = std::max(m, buf[k]);
  return m;
}

template <typename T>
Vectorized<T> vexp(const Vectorized<T>& x) {
  // fp32: ATen's polynomial exp (<= 20 ulp, ~2.4e-6 relative): the statistics pass runs 1.6-1.9x faster than
  // with Sleef's 1-ulp expf (see the top of this file), well inside the fp32 tolerances. fp64, the precision the
  // tests compare in: Sleef's 1-ulp exp.
  if constexpr (std::is_same_v<T, double>) {
    return x.exp();
  } else {
    return x.exp_u20();
  }
}

// tanh for the softcap. fp32: 1 - 2 / (e^(2x) + 1) on Sleef's 1-ulp exp (within about one ulp of 1 of tanh: 6e-8,
// times s = 30 a tenth of a logit's own fp32 spacing there; exactly +-1 at +-inf, NaN kept), about twice as fast as
// Sleef's tanhf on the 2-core AVX-512 machine. fp64, the precision the tests compare in: Sleef's tanh.
template <typename T>
Vectorized<T> vtanh(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, double>) {
    return x.tanh();
  } else {
    const Vectorized<T> one(T(1)), two(T(2));
    return one - two / ((x * two).exp() + one);
  }
}

// Loads, transforms and stores of one block row, for one input dtype, bias-or-not and softcap-or-not. With kCap the
// logit is capped before the temperature, z~ = s tanh((z + b) / s) / T (Gemma 2 and Gemma 4's final-logit cap),
// through `cap` = (s, 1 / s) of the row pass.
template <typename scalar_t, bool kBias, bool kCap = false>
struct Row {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      at::vec::load_to_float(p, a, b);  // one Vectorized<BFloat16|Half> = two fp32 vectors
    }
  }

  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }

  // (s, 1 / s) of a softcap s, as vectors (unused without kCap)
  struct Cap {
    acc_t s = 1, inv = 1;
    Vec vs{acc_t(1)}, vinv{acc_t(1)};
    explicit Cap(double softcap) {
      if (kCap) s = static_cast<acc_t>(softcap), inv = static_cast<acc_t>(1.0 / softcap), vs = Vec(s), vinv = Vec(inv);
    }
  };

  // z + b for kStep logits from index i. The max sweep reads these under a cap: s tanh(x / s) / T and the floor are
  // increasing, so the row's capped maximum is the cap of its raw maximum (one tanh per segment, not per logit).
  static void raw(const scalar_t* z, const scalar_t* bias, int64_t i, Vec& x0, Vec& x1) {
    load(z + i, x0, x1);
    if constexpr (kBias) {
      Vec b0, b1;
      load(bias + i, b0, b1);
      x0 = x0 + b0;
      x1 = x1 + b1;
    }
  }

  // z~ = max((z + b) / T, floor) for kStep logits from index i; `it` = 1 / T. With kCap the logits are capped first
  // and th0, th1 receive tanh((z + b) / s) (for the cap's derivative 1 - tanh^2).
  static void logits(const scalar_t* z, const scalar_t* bias, int64_t i, const Vec& it, const Vec& floor,
                     const Cap& cap, Vec& x0, Vec& x1, Vec& th0, Vec& th1) {
    raw(z, bias, i, x0, x1);
    if constexpr (kCap) {  // tanh(-inf) = -1: a banned token's capped logit is -s, finite
      th0 = vtanh(x0 * cap.vinv);
      th1 = vtanh(x1 * cap.vinv);
      x0 = th0 * cap.vs;
      x1 = th1 * cap.vs;
    }
    x0 = at::vec::clamp_min(x0 * it, floor);  // clamp_min propagates NaN, like torch.clamp
    x1 = at::vec::clamp_min(x1 * it, floor);
  }

  static void logits(const scalar_t* z, const scalar_t* bias, int64_t i, const Vec& it, const Vec& floor,
                     const Cap& cap, Vec& x0, Vec& x1) {
    Vec th0, th1;
    logits(z, bias, i, it, floor, cap, x0, x1, th0, th1);
  }

  // the same for one logit, without the floor; `th` receives tanh((z + b) / s) with kCap
  static acc_t logit(const scalar_t* z, const scalar_t* bias, int64_t i, acc_t it, const Cap& cap, acc_t* th) {
    acc_t x = static_cast<acc_t>(z[i]);
    if constexpr (kBias) x += static_cast<acc_t>(bias[i]);
    if constexpr (kCap) {
      const acc_t t = std::tanh(x * cap.inv);
      if (th != nullptr) *th = t;
      x = t * cap.s;
    }
    return x * it;
  }

  static acc_t logit(const scalar_t* z, const scalar_t* bias, int64_t i, acc_t it, const Cap& cap) {
    return logit(z, bias, i, it, cap, nullptr);
  }

  static acc_t floored(acc_t x) { return std::isnan(x) ? x : std::max(x, static_cast<acc_t>(kLogitFloor)); }

  // Merges the row z[0:n) (vocabulary v0 + [0, n)) into the state st = (M, S, C, z~_y); j = label - v0.
  static void stats(const scalar_t* z, const scalar_t* bias, int64_t n, int64_t j, acc_t it, const Cap& cap, acc_t* st,
                    bool first) {
    // merge arithmetic in fp64: 2 scalar exp per 2048 logits, and no rounding builds up across segments
    double M = first ? 0.0 : st[0], S = first ? 0.0 : st[1], C = first ? 0.0 : st[2];
    bool have = !first;
    acc_t zy = first ? -std::numeric_limits<acc_t>::infinity() : st[3];
    if (0 <= j && j < n) zy = logit(z, bias, j, it, cap);  // before the floor: a -inf label logit gives logp = -inf
    const Vec vit(it), vfloor(static_cast<acc_t>(kLogitFloor));
    for (int64_t s0 = 0; s0 < n; s0 += kSegment) {
      const int64_t s1 = std::min(n, s0 + kSegment);
      const int64_t sv = s0 + (s1 - s0) / kStep * kStep;
      Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0, x0, x1;
      for (int64_t i = s0; i < sv; i += kStep) {
        if constexpr (kCap) {
          raw(z, bias, i, x0, x1);
        } else {
          logits(z, bias, i, vit, vfloor, cap, x0, x1);
        }
        m0 = at::vec::maximum(m0, x0);  // propagates NaN
        m1 = at::vec::maximum(m1, x1);
      }
      acc_t ms = hmax(at::vec::maximum(m0, m1));
      if constexpr (kCap) {  // the capped, scaled, floored maximum (no whole vectors: -inf, capped to -s)
        ms = sv > s0 ? floored(std::tanh(ms * cap.inv) * cap.s * it) : -std::numeric_limits<acc_t>::infinity();
      }
      for (int64_t i = sv; i < s1; ++i) ms = std::max(ms, floored(logit(z, bias, i, it, cap)));
      const Vec vm(ms);
      Vec sa(0), sb(0), ca(0), cb(0);
      for (int64_t i = s0; i < sv; i += kStep) {
        logits(z, bias, i, vit, vfloor, cap, x0, x1);
        const Vec t0 = x0 - vm, t1 = x1 - vm;
        const Vec e0 = vexp(t0), e1 = vexp(t1);
        sa = sa + e0;
        sb = sb + e1;
        ca = at::vec::fmadd(e0, t0, ca);
        cb = at::vec::fmadd(e1, t1, cb);
      }
      double ss = hsum(sa + sb), cc = hsum(ca + cb);
      for (int64_t i = sv; i < s1; ++i) {
        const double t = static_cast<double>(floored(logit(z, bias, i, it, cap))) - ms;
        const double e = std::exp(t);
        ss += e;
        cc += e * t;
      }
      if (!have) {
        M = ms, S = ss, C = cc, have = true;
      } else {  // B §1.2; both differences are finite (floored logits), so no 0 * inf
        const double Mn = std::max(M, static_cast<double>(ms)), da = M - Mn, db = ms - Mn;
        const double a = std::exp(da), b = std::exp(db);
        C = a * (C + da * S) + b * (cc + db * ss);
        S = a * S + b * ss;
        M = Mn;
      }
    }
    st[0] = static_cast<acc_t>(M);
    // a NaN or +inf logit makes t NaN (NaN - M, inf - inf), so C is NaN, but exp_u20 returns a number for NaN and S
    // would stay finite: S is made NaN too, so that logp is NaN like entropy (and eager's), never a finite value
    st[1] = std::isnan(C) ? std::numeric_limits<acc_t>::quiet_NaN() : static_cast<acc_t>(S);
    st[2] = static_cast<acc_t>(C);
    st[3] = zy;
  }

  // out[0:n) = [g_logp (1_y - p) - g_ent p (t - C/S)] / T with t = z~ - M, p = exp(t - log S), times the cap's
  // derivative 1 - tanh^2 with kCap (dL/d(raw logit)); out may alias z.
  static void dlogits(const scalar_t* z, scalar_t* out, const scalar_t* bias, int64_t n, int64_t j, acc_t it,
                      const Cap& cap, acc_t M, acc_t log_s, acc_t cs, acc_t gl, acc_t ge, bool label_term) {
    const bool label_here = label_term && 0 <= j && j < n;
    acc_t thy = 0;
    const acc_t ty = label_here ? floored(logit(z, bias, j, it, cap, &thy)) - M : 0;  // read before an in-place sweep
    const Vec vit(it), vfloor(static_cast<acc_t>(kLogitFloor)), vM(M), vls(log_s), vcs(cs), vgl(gl), vge(ge);
    const Vec vnit(-it), vone(acc_t(1));
    const int64_t nv = n / kStep * kStep;
    Vec x0, x1, th0, th1;
    for (int64_t i = 0; i < nv; i += kStep) {
      logits(z, bias, i, vit, vfloor, cap, x0, x1, th0, th1);
      const Vec t0 = x0 - vM, t1 = x1 - vM;
      const Vec p0 = vexp(t0 - vls), p1 = vexp(t1 - vls);
      // p (t - mu) first: for floored logits it is 0 * -1e20 = 0, never g_ent * -1e20 = inf
      Vec d0 = at::vec::fmadd(p0 * (t0 - vcs), vge, p0 * vgl) * vnit;
      Vec d1 = at::vec::fmadd(p1 * (t1 - vcs), vge, p1 * vgl) * vnit;
      if constexpr (kCap) {
        d0 = d0 * (vone - th0 * th0);
        d1 = d1 * (vone - th1 * th1);
      }
      store(out + i, d0, d1);
    }
    for (int64_t i = nv; i < n; ++i) {
      acc_t th = 0;
      const acc_t t = floored(logit(z, bias, i, it, cap, &th)) - M;
      const acc_t p = std::exp(t - log_s);
      out[i] = static_cast<scalar_t>(-(p * (t - cs) * ge + p * gl) * it * cap_grad(th));
    }
    if (label_here) {
      const acc_t p = std::exp(ty - log_s);
      out[j] = static_cast<scalar_t>((gl - (p * (ty - cs) * ge + p * gl)) * it * cap_grad(thy));
    }
  }

  static acc_t cap_grad(acc_t th) { return kCap ? acc_t(1) - th * th : acc_t(1); }
};

int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, kMinParallelLogits / std::max<int64_t>(n, 1)); }

// The row loop both kernels share: body(RowT{}, cap, r, 1 / T of row r) for every row r of an R x n block, in
// parallel, with the row pass RowT = Row<scalar_t, bias?, cap?> (and its Cap) chosen once for the block.
template <typename scalar_t, typename F>
void for_each_row(bool bias, double softcap, int64_t R, int64_t n, const std::optional<at::Tensor>& temp_rows,
                  double temperature, F&& body) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowVec<acc_t> trow = row_vec<acc_t>(temp_rows);
  const acc_t it = static_cast<acc_t>(1.0 / temperature);
  auto run = [&](auto has_bias, auto has_cap) {
    using RowT = Row<scalar_t, decltype(has_bias)::value, decltype(has_cap)::value>;
    const typename RowT::Cap cap(softcap);
    at::parallel_for(0, R, grain_rows(n), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) body(RowT{}, cap, r, trow ? acc_t(1) / trow.at(r) : it);
    });
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (bias) {
    softcap > 0 ? run(yes{}, yes{}) : run(yes{}, no{});
  } else {
    softcap > 0 ? run(no{}, yes{}) : run(no{}, no{});
  }
}

void check_cap(double softcap, const char* op) {
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0 (0: none), got ",
              softcap);
}

void check_block(const at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& temp_rows, const char* op) {
  TORCH_CHECK(z.device().is_cpu(), op, ": expected CPU tensors, got ", z.device());
  TORCH_CHECK(z.dim() == 2, op, ": logits block must be 2-D, got shape ", z.sizes());
  TORCH_CHECK(z.size(1) <= 1 || z.stride(1) == 1, op, ": logits rows must be contiguous, got strides ", z.strides());
  const auto acc = at::toOpMathType(z.scalar_type());
  const int64_t R = z.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == R && labels.scalar_type() == at::kLong, op,
              ": labels must be int64 of shape (", R, ",), got ", labels.scalar_type(), " ", labels.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == z.size(1) && bias->is_contiguous() &&
                    bias->scalar_type() == z.scalar_type(),
                op, ": bias must be contiguous ", z.scalar_type(), " of shape (", z.size(1), ",), got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  if (temp_rows.has_value()) {
    TORCH_CHECK(temp_rows->dim() == 1 && temp_rows->size(0) == R && temp_rows->scalar_type() == acc, op,
                ": per-row temperature must be ", acc, " of shape (", R, ",), got ", temp_rows->scalar_type(), " ",
                temp_rows->sizes());
  }
}

void check_state(const at::Tensor& state, int64_t R, at::ScalarType acc, const char* op) {
  TORCH_CHECK(state.dim() == 2 && state.size(0) == R && state.size(1) == 4 && state.is_contiguous() &&
                  state.scalar_type() == acc,
              op, ": state must be contiguous ", acc, " of shape (", R, ", 4), got ", state.scalar_type(), " ",
              state.sizes());
}

void check_rows(const std::optional<at::Tensor>& g, int64_t R, at::ScalarType acc, const char* name) {
  if (!g.has_value()) return;
  TORCH_CHECK(g->dim() == 1 && g->size(0) == R && g->scalar_type() == acc, "dlogits: ", name, " must be ", acc,
              " of shape (", R, ",), got ", g->scalar_type(), " ", g->sizes());
}

}  // namespace

at::Tensor block_stats(const at::Tensor& z, const at::Tensor& labels, int64_t v0,
                       const std::optional<at::Tensor>& bias, double temperature,
                       const std::optional<at::Tensor>& temp_rows, double softcap,
                       const std::optional<at::Tensor>& state) {
  check_block(z, labels, bias, temp_rows, "block_stats");
  check_cap(softcap, "block_stats");
  const int64_t R = z.size(0), n = z.size(1);
  const auto acc = at::toOpMathType(z.scalar_type());
  at::Tensor out;
  if (state.has_value()) {
    check_state(*state, R, acc, "block_stats");
    out = state->clone();
  } else {
    out = at::empty({R, 4}, z.options().dtype(acc));
  }
  const bool first = !state.has_value();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "block_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int64_t* yp = labels.const_data_ptr<int64_t>();
    const int64_t ys = labels.stride(0), ld = z.stride(0);
    acc_t* sp = out.data_ptr<acc_t>();
    for_each_row<scalar_t>(bp != nullptr, softcap, R, n, temp_rows, temperature,
                           [&](auto row, const auto& cap, int64_t r, acc_t itr) {
      decltype(row)::stats(zp + r * ld, bp, n, yp[r * ys] - v0, itr, cap, sp + 4 * r, first);
    });
  });
  return out;
}

void dlogits_out(const at::Tensor& z, const at::Tensor& labels, int64_t v0, const std::optional<at::Tensor>& bias,
                 double temperature, const std::optional<at::Tensor>& temp_rows, double softcap, const at::Tensor& m,
                 const at::Tensor& log_s, const at::Tensor& cs, const std::optional<at::Tensor>& g_logp,
                 const std::optional<at::Tensor>& g_ent, at::Tensor& out) {
  check_block(z, labels, bias, temp_rows, "dlogits");
  check_cap(softcap, "dlogits");
  const int64_t R = z.size(0), n = z.size(1);
  const auto acc = at::toOpMathType(z.scalar_type());
  check_rows(m, R, acc, "m");
  check_rows(log_s, R, acc, "log_s");
  check_rows(cs, R, acc, "cs");
  check_rows(g_logp, R, acc, "g_logp");
  check_rows(g_ent, R, acc, "g_ent");
  TORCH_CHECK(out.sizes() == z.sizes() && out.scalar_type() == z.scalar_type() && (n <= 1 || out.stride(1) == 1),
              "dlogits: out must be ", z.scalar_type(), " of shape ", z.sizes(), " with contiguous rows, got ",
              out.scalar_type(), " ", out.sizes(), " strides ", out.strides());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "dlogits", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const int64_t* yp = labels.const_data_ptr<int64_t>();
    const int64_t ys = labels.stride(0), ld = z.stride(0), ldo = out.stride(0);
    const RowVec<acc_t> gl = row_vec<acc_t>(g_logp), ge = row_vec<acc_t>(g_ent);
    const RowVec<acc_t> mv = row_vec<acc_t>(m), lsv = row_vec<acc_t>(log_s), csv = row_vec<acc_t>(cs);
    for_each_row<scalar_t>(bp != nullptr, softcap, R, n, temp_rows, temperature,
                           [&](auto row, const auto& cap, int64_t r, acc_t itr) {
      const acc_t g1 = gl ? gl.at(r) : acc_t(0), g2 = ge ? ge.at(r) : acc_t(0);
      decltype(row)::dlogits(zp + r * ld, op + r * ldo, bp, n, yp[r * ys] - v0, itr, cap, mv.at(r), lsv.at(r),
                             csv.at(r), g1, g2, static_cast<bool>(gl));
    });
  });
}

const char* capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace rlk
