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
#include <cmath>
#include <limits>
#include <type_traits>

#include "checks.h"

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

// The exponentiated strip E (E_j = exp(s_j - m_g), 0 outside the valid keys) gives, per row,
// the group log-masses and the rule's outcome. Shared by the forward and backward pass 1.
template <typename acc_t>
oeb::Row row_rule(const acc_t* e, int64_t k_lo, const oeb::Groups& rg, const double m[3], double sink,
                  const oeb::RuleParams& rule, double L[3], double l[3]) {
  double n[3];
  for (int g = 0; g < 3; ++g) {
    l[g] = rg.hi[g] > rg.lo[g] ? range_sum(e, rg.lo[g] - k_lo, rg.hi[g] - k_lo) : 0.0;
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
  at::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t begin, int64_t end) {
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
      std::vector<double> m(3 * nr);
      for (int64_t r = 0; r < nr; ++r) {
        rgs[r] = P.groups(b, i0 + r);
        shift_row(s + r * n, k_lo, n, rgs[r], static_cast<acc_t>(P.scale), &m[3 * r]);
      }
      S.exp_();
      for (int64_t r = 0; r < nr; ++r) {
        acc_t* e = s + r * n;
        double L[3], l[3];
        const oeb::Row rb = row_rule(e, k_lo, rgs[r], &m[3 * r], P.sink_logit(h), P.rule, L, l);
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
  at::parallel_for(0, P.B * P.H * nqb, 1, [&](int64_t begin, int64_t end) {
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
      std::vector<double> m(3 * nr);
      for (int64_t r = 0; r < nr; ++r) {
        rgs[r] = P.groups(b, i0 + r);
        shift_row(s + r * n, k_lo, n, rgs[r], static_cast<acc_t>(P.scale), &m[3 * r]);
      }
      S.exp_();
      for (int64_t r = 0; r < nr; ++r) {
        acc_t* e = s + r * n;
        acc_t* g_row = dp + r * n;  // dP on entry, dS on exit
        const oeb::Groups& rg = rgs[r];
        double L[3], l[3], D[3], ct[3];
        const oeb::Row rb = row_rule(e, k_lo, rg, &m[3 * r], P.sink_logit(h), P.rule, L, l);
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
  at::parallel_for(0, P.B * P.Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
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
        for (int64_t r = 0; r < nq; ++r) {
          const oeb::Groups rg = P.groups(b, i_lo + r);
          const acc_t* row = rows + ((b * P.H + h) * P.Tq + i_lo + r) * kRowFields;
          acc_t* x = s + r * nk;
          // The groups cover [rg.lo[0], rg.hi[2]) contiguously; columns outside get A' = 0.
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
        for (int64_t r = 0; r < nq; ++r) {
          const oeb::Groups rg = P.groups(b, i_lo + r);
          const acc_t* row = rows + ((b * P.H + h) * P.Tq + i_lo + r) * kRowFields;
          const acc_t* a = s + r * nk;
          acc_t* g_row = dp + r * nk;
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
  Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
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
