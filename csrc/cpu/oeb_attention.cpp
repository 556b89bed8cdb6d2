// Odds-Equal Bridge attention on the CPU (design.md 2.3; backward: docs/method.md section 3).
//
// For one query row the valid keys [lo, end) (lo = the first valid key, later inside a sliding
// window) split into three contiguous ranges given by the row's bounds (a, b):
//   group 0 = [lo, a)   never rescaled (bridge: O, the other channel; odds: the sinks; every key
//                        when the row is not intervened),
//   group 1 = [a, b)    bridge: B, the bridge channel; odds: X, the context before the step,
//   group 2 = [b, end)  bridge: S, the query's own channel; odds: C, its step.
// Each group keeps its own exact maximum, so its log-mass L_g = m_g + log l_g is exact even
// when a group's mass underflows in float. The rule (csrc/include/oeb_rule.h, shared with the
// CUDA kernels) turns the log-masses into per-group log-factors: A'_j = exp(s_j - lse + log r_g)
// never exceeds 1, and everything is computed in that form. An attention-sink logit, if any,
// only enters the final normalization (inside log r_g).
//
// Work is tiled: the forward and the first backward pass run over (batch, head, query
// block) with a strip of block x keys; the second backward pass runs over (batch, kv head,
// key block) with a strip of queries x block. Matrix products on strips use at::mm (single
// threaded inside at::parallel_for); exponentials use at::exp_ on the whole strip
// (vectorized); the rest are short loops over contiguous key ranges. Nothing is T x T.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "parallel.h"

namespace stepflow {
namespace {

using at::Tensor;

constexpr int64_t kBlockQ = 64;  // query rows per forward / backward-pass-1 tile
constexpr int64_t kBlockK = 64;  // key rows per backward-pass-2 tile
constexpr double kInf = std::numeric_limits<double>::infinity();

// Per-row scalars saved by backward pass 1 for pass 2: for each group g, the shifted
// log-normalizer lse - log r_g (so A'_ij = exp(s_ij - shift_g)) and c~_g.
constexpr int64_t kRowFields = 6;

// Row r of a strip whose column c is key k_lo + c: scale the raw scores, subtract each
// group's max (returned in m[g], -inf for empty groups) and set columns outside the
// allowed keys to -inf, ready for exp.
template <typename acc_t>
void shift_row(acc_t* x, int64_t k_lo, int64_t n, const oeb::Groups& rg, acc_t scale, double m[3]) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  // Columns before the row's first valid key (outside its sliding window) are excluded.
  for (int64_t c = 0; c < std::min<int64_t>(rg.lo[0] - k_lo, n); ++c) x[c] = ninf;
  int64_t done = 0;  // columns [0, done) are written
  for (int g = 0; g < 3; ++g) {
    const int64_t c0 = rg.lo[g] - k_lo, c1 = rg.hi[g] - k_lo;
    m[g] = -kInf;
    if (c1 <= c0) continue;
    acc_t mx = x[c0];
#pragma omp simd reduction(max : mx)
    for (int64_t c = c0; c < c1; ++c) mx = x[c] > mx ? x[c] : mx;  // (std::max does not vectorize)
    const acc_t shift = scale * mx;  // scale > 0, so the max of scaled scores
    m[g] = static_cast<double>(shift);
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) x[c] = scale * x[c] - shift;
    done = c1;
  }
  for (int64_t c = std::max<int64_t>(done, 0); c < n; ++c) x[c] = ninf;
}

template <typename acc_t>
double range_sum(const acc_t* x, int64_t c0, int64_t c1) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = c0; c < c1; ++c) acc += static_cast<double>(x[c]);
  return acc;
}

template <typename acc_t>
double range_dot(const acc_t* x, const acc_t* y, int64_t c0, int64_t c1) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = c0; c < c1; ++c) acc += static_cast<double>(x[c]) * static_cast<double>(y[c]);
  return acc;
}

template <typename acc_t>
void range_scale(acc_t* x, int64_t c0, int64_t c1, acc_t f) {
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) x[c] *= f;
}

// ----------------------------------------------------------------- fp32 exp, fused with the passes
//
// For fp32 the strip's max-shift, exp and group sums are one pass per group (instead of a shift
// pass, at::exp_ over the strip and a sum pass): exp_nonpos is a vectorizable exp (Cephes' expf
// reduction and polynomial, ~1 ulp) for the arguments that occur: scores minus their group's max
// (<= 0) in the forward and pass 1, s - (lse - log r_g) (<= 0 up to rounding) in pass 2. Within 1 ulp
// of exp on [-87, 1] (checked on every 64th float there), it gives 0 below -87: e^-87 of the group's
// max, far below fp32 resolution of the group's mass. The loops are compiled twice, for AVX2 + FMA
// and for the baseline ISA, and picked at run time.

// Branch-free so that it vectorizes without -fno-trapping-math: no float select, 2^n built from the
// bits of the rounding sum; x < -87 (where 2^n would leave the normal range) and -inf are masked to 0.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;   // 1.5 * 2^23 + x / ln 2: rounds to an integer n
  const float nf = t - 12582912.0f;
  float r = x - nf * 0.693359375f;                           // x - n ln 2, ln 2 in two parts
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n = std::bit_cast<int32_t>(t) - 0x4B400000;  // the integer n from t's mantissa
  const float y = p * std::bit_cast<float>((n + 127) << 23);
  const int32_t keep = -static_cast<int32_t>(x >= -87.0f);   // all ones, or 0 (also for -inf, nan)
  return std::bit_cast<float>(std::bit_cast<int32_t>(y) & keep);
}

// x[0, n) <- exp(scale * x - shift); returns the sum of the new values (accumulated in double).
__attribute__((always_inline)) inline double exp_shift_sum_body(float* x, int64_t n, float scale, float shift) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const float e = exp_nonpos(scale * x[c] - shift);
    x[c] = e;
    sum += static_cast<double>(e);
  }
  return sum;
}

// x[0, n) <- exp(scale * x - shift), no sum (backward pass 2).
__attribute__((always_inline)) inline void exp_shift_body(float* x, int64_t n, float scale, float shift) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) x[c] = exp_nonpos(scale * x[c] - shift);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) double exp_shift_sum_avx2(float* x, int64_t n, float scale, float shift) {
  return exp_shift_sum_body(x, n, scale, shift);
}
__attribute__((target("avx2,fma"))) void exp_shift_avx2(float* x, int64_t n, float scale, float shift) {
  exp_shift_body(x, n, scale, shift);
}
// (__builtin_cpu_init first: this may run from a static initializer before libgcc's own.)
bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

double exp_shift_sum(float* x, int64_t n, float scale, float shift) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return exp_shift_sum_avx2(x, n, scale, shift);
#endif
  return exp_shift_sum_body(x, n, scale, shift);
}

void exp_shift(float* x, int64_t n, float scale, float shift) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (has_avx2()) return exp_shift_avx2(x, n, scale, shift);
#endif
  exp_shift_body(x, n, scale, shift);
}

// The raw strip S (nr x n; column c is key k_lo + c) -> E: per row r and group g,
// E_j = exp(scale s_j - m_g) with m_g the group's scaled max (m[3 r + g], -inf if empty), 0 outside
// the row's valid keys, and the group sums l[3 r + g] = sum_{j in g} E_j. Shared by the forward
// and backward pass 1. fp32: one fused pass per group; fp64: shift, at::exp_, sum.
template <typename acc_t>
void strip_exp(Tensor& S, int64_t k_lo, const std::vector<oeb::Groups>& rgs, acc_t scale, double* m, double* l) {
  const int64_t nr = S.size(0), n = S.size(1);
  acc_t* s = S.data_ptr<acc_t>();
  if constexpr (std::is_same_v<acc_t, float>) {
    for (int64_t r = 0; r < nr; ++r) {
      float* x = s + r * n;
      const oeb::Groups& rg = rgs[r];
      const int64_t first = std::clamp<int64_t>(rg.lo[0] - k_lo, 0, n);
      std::fill(x, x + first, 0.0f);
      int64_t done = first;  // columns [0, done) are written
      for (int g = 0; g < 3; ++g) {
        const int64_t c0 = rg.lo[g] - k_lo, c1 = rg.hi[g] - k_lo;
        m[3 * r + g] = -kInf;
        l[3 * r + g] = 0.0;
        if (c1 <= c0) continue;
        float mx = x[c0];
#pragma omp simd reduction(max : mx)
        for (int64_t c = c0; c < c1; ++c) mx = x[c] > mx ? x[c] : mx;  // (std::max does not vectorize)
        const float shift = scale * mx;  // scale > 0: the max of the scaled scores
        m[3 * r + g] = static_cast<double>(shift);
        l[3 * r + g] = exp_shift_sum(x + c0, c1 - c0, scale, shift);
        done = c1;
      }
      std::fill(x + done, x + n, 0.0f);
    }
  } else {
    for (int64_t r = 0; r < nr; ++r) shift_row(s + r * n, k_lo, n, rgs[r], scale, m + 3 * r);
    S.exp_();
    for (int64_t r = 0; r < nr; ++r)
      for (int g = 0; g < 3; ++g)
        l[3 * r + g] = rgs[r].hi[g] > rgs[r].lo[g] ? range_sum(s + r * n, rgs[r].lo[g] - k_lo, rgs[r].hi[g] - k_lo)
                                                   : 0.0;
  }
}

// The group log-masses L_g = m_g + log l_g of a row of E and the rule's outcome. Shared by the
// forward and backward pass 1.
inline oeb::Row row_rule(const oeb::Groups& rg, const double m[3], const double l[3], double sink,
                         const oeb::RuleParams& rule) {
  double L[3], n[3];
  for (int g = 0; g < 3; ++g) {
    L[g] = l[g] > 0 ? m[g] + std::log(l[g]) : -kInf;
    n[g] = rg.count(g);
  }
  return oeb::row_forward(L, n, sink, rg.intervened, rule);
}

struct Problem : OebSizes {
  const int64_t* bounds;  // (B, Tq, 2)
  const int64_t* kv;      // (B,)
  const double* sink;     // (H,) or nullptr
  oeb::Groups groups(int64_t b, int64_t i) const {
    const int64_t* ab = bounds + (b * Tq + i) * 2;
    return oeb::row_groups(kv[b], ab[0], ab[1], Tk - Tq + i, window);
  }
  double sink_logit(int64_t h) const { return sink ? sink[h] : -kInf; }
  // The first key any query of rows [i0, i0 + nr) can see (the window moves the start up).
  int64_t first_key(int64_t b, int64_t i0) const {
    int64_t lo = kv[b];
    if (window > 0) lo = std::max(lo, Tk - Tq + i0 - window + 1);
    return std::min(lo, Tk);
  }
};

// ---------------------------------------------------------------------------------- forward

constexpr int kStats = 5;  // p_0, p_1, p_2, p_sink, active

template <typename acc_t>
void forward_impl(const Problem& P, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                  float* lse, float* stats) {
  const int64_t nqb = (P.Tq + kBlockQ - 1) / kBlockQ;
  // Tasks are head-major (block fastest) so a static split gives each thread whole heads,
  // which balances the causal triangle.
  stepflow::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, b = bh / P.H, h = bh % P.H, hk = h / P.G;
      const int64_t i0 = (t % nqb) * kBlockQ, nr = std::min(kBlockQ, P.Tq - i0);
      // keys [k_lo, last query + 1): k_lo is the first key the block's first row sees
      const int64_t k_lo = P.first_key(b, i0), n = P.Tk - P.Tq + i0 + nr - k_lo;
      float* lse_blk = lse + bh * P.Tq + i0;
      float* st_blk = stats + (bh * P.Tq + i0) * kStats;
      if (n <= 0) {  // no query of the block sees a key: out stays 0
        std::fill(lse_blk, lse_blk + nr, -std::numeric_limits<float>::infinity());
        continue;
      }
      Tensor S = at::mm(q[b][h].narrow(0, i0, nr), k[b][hk].narrow(0, k_lo, n).t());
      acc_t* s = S.data_ptr<acc_t>();
      std::vector<oeb::Groups> rgs(nr);
      std::vector<double> m(3 * nr), ls(3 * nr);
      for (int64_t r = 0; r < nr; ++r) rgs[r] = P.groups(b, i0 + r);
      strip_exp(S, k_lo, rgs, static_cast<acc_t>(P.scale), m.data(), ls.data());
      for (int64_t r = 0; r < nr; ++r) {
        acc_t* e = s + r * n;
        const double* l = &ls[3 * r];
        const oeb::Row rb = row_rule(rgs[r], &m[3 * r], l, P.sink_logit(h), P.rule);
        if (!rgs[r].any()) {
          lse_blk[r] = -std::numeric_limits<float>::infinity();
          continue;  // the row is all zeros already
        }
        // A'_j = E_j exp(m_g + log r_g - lse) = E_j p'_g / l_g <= 1.
        for (int g = 0; g < 3; ++g)
          if (l[g] > 0)
            range_scale(e, rgs[r].lo[g] - k_lo, rgs[r].hi[g] - k_lo,
                        static_cast<acc_t>(std::exp(m[3 * r + g] + rb.log_r[g] - rb.lse)));
        lse_blk[r] = static_cast<float>(rb.lse);
        float* st = st_blk + kStats * r;
        for (int g = 0; g < 3; ++g) st[g] = static_cast<float>(rb.p[g]);
        st[3] = static_cast<float>(rb.psink);
        st[4] = rb.active ? 1.0f : 0.0f;
      }
      Tensor o = out[b][h].narrow(0, i0, nr);
      at::mm_out(o, S, v[b][hk].narrow(0, k_lo, n));
    }
  });
}

// --------------------------------------------------------------------------------- backward

// Pass 1: dQ and the per-row scalars (shift_g = lse - log r_g, ct_g) for pass 2.
template <typename acc_t>
void backward_rows(const Problem& P, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   Tensor& dq, acc_t* rows) {
  const int64_t nqb = (P.Tq + kBlockQ - 1) / kBlockQ;
  stepflow::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, b = bh / P.H, h = bh % P.H, hk = h / P.G;
      const int64_t i0 = (t % nqb) * kBlockQ, nr = std::min(kBlockQ, P.Tq - i0);
      const int64_t k_lo = P.first_key(b, i0), n = P.Tk - P.Tq + i0 + nr - k_lo;
      if (n <= 0) {  // dq stays 0; pass 2 never reads these rows (they see no key)
        continue;
      }
      Tensor kb = k[b][hk].narrow(0, k_lo, n);
      Tensor S = at::mm(q[b][h].narrow(0, i0, nr), kb.t());
      Tensor dP = at::mm(dout[b][h].narrow(0, i0, nr), v[b][hk].narrow(0, k_lo, n).t());
      acc_t* s = S.data_ptr<acc_t>();
      acc_t* dp = dP.data_ptr<acc_t>();
      std::vector<oeb::Groups> rgs(nr);
      std::vector<double> m(3 * nr), ls(3 * nr);
      for (int64_t r = 0; r < nr; ++r) rgs[r] = P.groups(b, i0 + r);
      strip_exp(S, k_lo, rgs, static_cast<acc_t>(P.scale), m.data(), ls.data());
      for (int64_t r = 0; r < nr; ++r) {
        acc_t* e = s + r * n;
        acc_t* g_row = dp + r * n;  // dP on entry, dS on exit
        const oeb::Groups& rg = rgs[r];
        const double* l = &ls[3 * r];
        double D[3], ct[3];
        const oeb::Row rb = row_rule(rg, &m[3 * r], l, P.sink_logit(h), P.rule);
        if (!rg.any()) {
          std::fill(g_row, g_row + n, acc_t(0));
          continue;
        }
        for (int g = 0; g < 3; ++g) {
          const int64_t c0 = rg.lo[g] - k_lo, c1 = rg.hi[g] - k_lo;
          D[g] = l[g] > 0 ? range_dot(e, g_row, c0, c1) / l[g] : 0.0;  // sum_j A_j dP_j / p_g
        }
        oeb::row_backward(rb, D, P.rule, ct);
        acc_t* row_out = rows + ((b * P.H + h) * P.Tq + i0 + r) * kRowFields;
        std::fill(g_row, g_row + std::max<int64_t>(rg.lo[0] - k_lo, 0), acc_t(0));
        for (int g = 0; g < 3; ++g) {
          row_out[g] = static_cast<acc_t>(rb.lse - rb.log_r[g]);
          row_out[3 + g] = static_cast<acc_t>(ct[g]);
          const int64_t c0 = rg.lo[g] - k_lo, c1 = rg.hi[g] - k_lo;
          if (c1 <= c0) continue;
          const acc_t coef = static_cast<acc_t>(std::exp(m[3 * r + g] + rb.log_r[g] - rb.lse));
          const acc_t c = static_cast<acc_t>(ct[g]);
#pragma omp simd
          for (int64_t j = c0; j < c1; ++j) g_row[j] = e[j] * coef * (g_row[j] - c);  // dS = A'(dP - ct)
        }
        std::fill(g_row + std::max<int64_t>(rg.hi[2] - k_lo, 0), g_row + n, acc_t(0));
      }
      Tensor dq_blk = dq[b][h].narrow(0, i0, nr);
      at::mm_out(dq_blk, dP, kb);
      dq_blk.mul_(P.scale);
    }
  });
}

// Pass 2: dK and dV per key block, summed over the query heads of its kv head.
template <typename acc_t>
void backward_keys(const Problem& P, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                   Tensor& dk, Tensor& dv, const acc_t* rows) {
  const int64_t nkb = (P.Tk + kBlockK - 1) / kBlockK;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  stepflow::parallel_for(0, P.B * P.Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bk = t / nkb, b = bk / P.Hkv, hk = bk % P.Hkv;
      const int64_t j0 = std::max((t % nkb) * kBlockK, P.kv[b]), j1 = std::min((t % nkb + 1) * kBlockK, P.Tk);
      if (j1 <= j0) continue;  // only padding keys: dk, dv stay 0
      const int64_t nk = j1 - j0;
      const int64_t i_lo = std::max<int64_t>(0, j0 - (P.Tk - P.Tq));  // queries that reach j0
      // With a sliding window, queries past the block's last key + window see none of it.
      int64_t i_hi = P.Tq;
      if (P.window > 0) i_hi = std::min<int64_t>(P.Tq, j1 - 1 + P.window - (P.Tk - P.Tq));
      const int64_t nq = i_hi - i_lo;
      if (nq <= 0) continue;
      Tensor kb = k[b][hk].narrow(0, j0, nk), vb = v[b][hk].narrow(0, j0, nk);
      Tensor dk_blk = dk[b][hk].narrow(0, j0, nk), dv_blk = dv[b][hk].narrow(0, j0, nk);
      for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h) {
        Tensor qh = q[b][h].narrow(0, i_lo, nq), doh = dout[b][h].narrow(0, i_lo, nq);
        Tensor S = at::mm(qh, kb.t());   // (nq, nk), becomes A'
        Tensor dP = at::mm(doh, vb.t());  // becomes dS
        acc_t* s = S.data_ptr<acc_t>();
        acc_t* dp = dP.data_ptr<acc_t>();
        const acc_t scale = static_cast<acc_t>(P.scale);
        // dS = A' (dP - c~_g) on the groups of a row whose A' is in a; 0 outside its valid keys.
        auto ds_row = [&](const oeb::Groups& rg, const acc_t* row, const acc_t* a, acc_t* g_row) {
          const int64_t first = std::clamp<int64_t>(rg.lo[0] - j0, 0, nk);
          const int64_t last = std::clamp<int64_t>(rg.hi[2] - j0, first, nk);
          std::fill(g_row, g_row + first, acc_t(0));
          for (int g = 0; g < 3; ++g) {
            const int64_t c0 = std::max<int64_t>(rg.lo[g], j0) - j0, c1 = std::min<int64_t>(rg.hi[g], j1) - j0;
            if (c1 <= c0) continue;
            const acc_t c = row[3 + g];
#pragma omp simd
            for (int64_t j = c0; j < c1; ++j) g_row[j] = a[j] * (g_row[j] - c);
          }
          std::fill(g_row + last, g_row + nk, acc_t(0));
        };
        if constexpr (std::is_same_v<acc_t, float>) {
          // One pass per row: A' = exp(scale s - shift_g) (fused, 0 outside the groups), then dS.
          for (int64_t r = 0; r < nq; ++r) {
            const oeb::Groups rg = P.groups(b, i_lo + r);
            const float* row = rows + ((b * P.H + h) * P.Tq + i_lo + r) * kRowFields;
            float* x = s + r * nk;
            // The groups cover [rg.lo[0], rg.hi[2]) contiguously; columns outside get A' = 0.
            const int64_t first = std::clamp<int64_t>(rg.lo[0] - j0, 0, nk);
            const int64_t last = std::clamp<int64_t>(rg.hi[2] - j0, first, nk);
            std::fill(x, x + first, 0.0f);
            for (int g = 0; g < 3; ++g) {
              const int64_t c0 = std::max<int64_t>(rg.lo[g], j0) - j0, c1 = std::min<int64_t>(rg.hi[g], j1) - j0;
              if (c1 > c0) exp_shift(x + c0, c1 - c0, scale, row[g]);
            }
            std::fill(x + last, x + nk, 0.0f);
            ds_row(rg, row, x, dp + r * nk);
          }
        } else {
          for (int64_t r = 0; r < nq; ++r) {
            const oeb::Groups rg = P.groups(b, i_lo + r);
            const acc_t* row = rows + ((b * P.H + h) * P.Tq + i_lo + r) * kRowFields;
            acc_t* x = s + r * nk;
            const int64_t first = std::clamp<int64_t>(rg.lo[0] - j0, 0, nk);
            const int64_t last = std::clamp<int64_t>(rg.hi[2] - j0, first, nk);
            for (int64_t c = 0; c < first; ++c) x[c] = ninf;
            for (int g = 0; g < 3; ++g) {
              const int64_t c0 = std::max<int64_t>(rg.lo[g], j0) - j0, c1 = std::min<int64_t>(rg.hi[g], j1) - j0;
              if (c1 <= c0) continue;
              const acc_t shift = row[g];
#pragma omp simd
              for (int64_t c = c0; c < c1; ++c) x[c] = scale * x[c] - shift;
            }
            for (int64_t c = last; c < nk; ++c) x[c] = ninf;
          }
          S.exp_();
          for (int64_t r = 0; r < nq; ++r)
            ds_row(P.groups(b, i_lo + r), rows + ((b * P.H + h) * P.Tq + i_lo + r) * kRowFields, s + r * nk,
                   dp + r * nk);
        }
        dv_blk.addmm_(S.t(), doh);
        dk_blk.addmm_(dP.t(), qh, 1.0, P.scale);
      }
    }
  });
}

// ------------------------------------------------------------------------------ entry points

// The problem with its index tensors made contiguous; the pointers stay valid while P.keep lives.
struct CpuProblem : Problem {
  Tensor bounds_t, kv_t, sink_t;
};

CpuProblem check_problem(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv_start,
                         const Tensor& bounds, const std::string& rule, double strength, double tau_max, double eps,
                         const c10::optional<Tensor>& sink, int64_t window, double scale) {
  TORCH_CHECK(q.device().is_cpu(), op, " (CPU kernel): all tensors must be on the CPU, got ", q.device());
  CpuProblem P{};
  static_cast<OebSizes&>(P) =
      check_oeb_arguments(q, k, v, kv_start, bounds, rule, strength, tau_max, eps, sink, window, scale);
  P.bounds_t = bounds.contiguous();
  P.kv_t = kv_start.contiguous();
  P.bounds = P.bounds_t.data_ptr<int64_t>();
  P.kv = P.kv_t.data_ptr<int64_t>();
  P.sink = nullptr;
  if (sink.has_value()) {
    P.sink_t = sink->detach().to(at::kDouble).contiguous();
    P.sink = P.sink_t.data_ptr<double>();
    for (int64_t h = 0; h < P.H; ++h)
      TORCH_CHECK(std::isfinite(P.sink[h]), op, ": sink[", h, "] = ", P.sink[h], " is not finite");
  }
  // The index values: kv_start in [0, Tk]; bounds (-1, -1) or 0 <= a <= b <= the query's position + 1.
  for (int64_t b = 0; b < P.B; ++b) {
    TORCH_CHECK(P.kv[b] >= 0 && P.kv[b] <= P.Tk, op, ": kv_start[", b, "] = ", P.kv[b], " is outside [0, ", P.Tk,
                "]");
    for (int64_t i = 0; i < P.Tq; ++i) {
      const int64_t a = P.bounds[(b * P.Tq + i) * 2], c = P.bounds[(b * P.Tq + i) * 2 + 1];
      const int64_t end = P.Tk - P.Tq + i + 1;
      TORCH_CHECK((a == -1 && c == -1) || (a >= 0 && a <= c && c <= end), op, ": bounds[", b, ", ", i, "] = (", a,
                  ", ", c, ") must be (-1, -1) or satisfy 0 <= a <= b <= ", end, " (the query's position + 1)");
    }
  }
  return P;
}

at::ScalarType acc_type(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// The kernel's working copy of an input: accumulation dtype, contiguous, and detached, so
// that the at:: calls inside (some on OpenMP worker threads, which do not inherit dispatch
// guards) never see a tensor that requires grad when the op runs under autograd.
Tensor working(const Tensor& x, at::ScalarType acc) { return x.detach().to(acc).contiguous(); }

std::tuple<Tensor, Tensor, Tensor> oeb_attention_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                     const Tensor& kv_start, const Tensor& bounds,
                                                     c10::string_view rule, double strength, double tau_max,
                                                     double eps, const c10::optional<Tensor>& sink, int64_t window,
                                                     double scale) {
  const CpuProblem P = check_problem("oeb_attention", q_in, k_in, v_in, kv_start, bounds, std::string(rule),
                                     strength, tau_max, eps, sink, window, scale);
  const auto acc = acc_type(q_in.scalar_type());
  const Tensor q = working(q_in, acc), k = working(k_in, acc), v = working(v_in, acc);
  Tensor out = at::zeros({P.B, P.H, P.Tq, P.d}, q.options());
  Tensor lse = at::empty({P.B, P.H, P.Tq}, q.options().dtype(at::kFloat));
  Tensor stats = at::zeros({P.B, P.H, P.Tq, kStats}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    if (acc == at::kDouble)
      forward_impl<double>(P, q, k, v, out, lse.data_ptr<float>(), stats.data_ptr<float>());
    else
      forward_impl<float>(P, q, k, v, out, lse.data_ptr<float>(), stats.data_ptr<float>());
  } else {
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  return {out.to(q_in.scalar_type()), lse, stats};
}

// lse and stats are part of the schema so a GPU backward can reuse them; this kernel checks
// them and recomputes the per-group log-masses it needs (in the accumulation precision, and
// exact where a group's mass underflows float), so it does not read their values.
std::tuple<Tensor, Tensor, Tensor> oeb_attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& lse,
    const Tensor& stats, const Tensor& kv_start, const Tensor& bounds, c10::string_view rule, double strength,
    double tau_max, double eps, const c10::optional<Tensor>& sink, int64_t window, double scale) {
  const CpuProblem P = check_problem("oeb_attention_backward", q_in, k_in, v_in, kv_start, bounds,
                                     std::string(rule), strength, tau_max, eps, sink, window, scale);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && grad_out.scalar_type() == q_in.scalar_type() &&
                  grad_out.device().is_cpu(),
              "oeb_attention_backward: grad_out must be a CPU tensor of q's shape ", q_in.sizes(), " and dtype ",
              q_in.scalar_type(), ", got ", grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == P.B && lse.size(1) == P.H &&
                  lse.size(2) == P.Tq,
              "oeb_attention_backward: lse must be float32 of shape (", P.B, ", ", P.H, ", ", P.Tq, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 4 && stats.size(0) == P.B &&
                  stats.size(1) == P.H && stats.size(2) == P.Tq && stats.size(3) == kStats,
              "oeb_attention_backward: stats must be float32 of shape (", P.B, ", ", P.H, ", ", P.Tq, ", ", kStats,
              "), got ", stats.scalar_type(), " ", stats.sizes());
  const auto acc = acc_type(q_in.scalar_type());
  const Tensor q = working(q_in, acc), k = working(k_in, acc), v = working(v_in, acc);
  const Tensor dout = working(grad_out, acc);
  // Contiguous gradients whatever the strides of the inputs (the fake kernel in ops.py says so too).
  Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
         dv = at::zeros(v.sizes(), v.options());
  if (q.numel() > 0 && k.numel() > 0) {
    Tensor rows = at::empty({P.B, P.H, P.Tq, kRowFields}, q.options());
    if (acc == at::kDouble) {
      backward_rows<double>(P, dout, q, k, v, dq, rows.data_ptr<double>());
      backward_keys<double>(P, dout, q, k, v, dk, dv, rows.data_ptr<double>());
    } else {
      backward_rows<float>(P, dout, q, k, v, dq, rows.data_ptr<float>());
      backward_keys<float>(P, dout, q, k, v, dk, dv, rows.data_ptr<float>());
    }
  }
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dv.to(v_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepflow, CPU, m) {
  m.impl("oeb_attention", &oeb_attention_cpu);
  m.impl("oeb_attention_backward", &oeb_attention_backward_cpu);
}

}  // namespace stepflow
