// CPU kernel of stepflow::step_saliency_pool (design.md 2.2).
//
//   M[b, a, c] = sum_{i: seg(i)=a} sum_{j <= i: seg(j)=c} I_ij,
//   I_ij = | sum_h A^h_ij (dO^h_i . v^{g(h)}_j) |  ("sum_abs"),   sum_h | ... |  ("abs_sum"),
//   or (1/H) sum_h | ... |  ("abs_mean", the paper's).
//
// sum_abs needs the sum over heads before the abs, so a task is (batch, block of queries) and
// the heads are looped inside it. Per head the task forms, with BLAS, the strips
//   P = exp(scale * q_blk K^T - lse)   and   G = dO_blk V^T
// over the keys up to the block's last query (block_q x T at most) and folds P * G into acc;
// then |acc| is binned by (segment of the query, segment of the key) into the worker's own
// S x S map. Memory is O(block_q * T) per worker: no T x T (let alone H x T x T) buffer exists.
// Without lse the row max / sum come from the strip itself (it is whole in memory).
//
// Attention sinks (GPT-OSS) and sliding windows: A is the model's softmax, with e^{sink_h} in the
// denominator and only the keys inside the window.
//
// Odds-Equal Bridge (design.md 2.3), optional: in a layer where OEB is active the output is
// o_i = sum_j A'_ij v_j, so the saliency is measured on A' (I_ij uses A'^h_ij). A'_ij = A_ij r_g
// with one factor per (row, head) and key group g (csrc/include/oeb_rule.h, the arithmetic the
// OEB attention kernels use). The groups are contiguous key ranges of the row, so the kernel
// sums P over the ranges of the strip it already holds, derives the r_g, and folds the three
// ranges into acc with their factors: three range sums per row and head, no extra GEMM.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"
#include "parallel.h"

namespace stepflow {
namespace {

// Queries per task. 64 x T fp32 strips: three of them (P, G, acc) fit a 2 MiB L2 at T = 2048;
// measured at T = 2048, 12/2 heads, d = 128: 64 and 128 tie, 32 is ~15% and 16 ~60% slower.
constexpr int64_t kBlockQ = 64;

// A maximal run [start, end) of keys in one segment seg >= 0 (padding is not a run).
struct Run {
  int64_t start, end, seg;
};

// Queries [i0, i1) of batch row b.
struct Task {
  int64_t b, i0, i1;
};

// Sum of x[0, n) (or of |x|), returned in double. Eight independent partial sums let -O3
// vectorize the loop without reassociating one accumulator (we build without -ffast-math).
template <bool Abs, typename T>
inline double range_sum(const T* x, int64_t n) {
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) part[l] += Abs ? std::abs(x[j + l]) : x[j + l];
  }
  double s = 0;
  for (int l = 0; l < 8; ++l) s += part[l];
  for (; j < n; ++j) s += Abs ? std::abs(x[j]) : x[j];
  return s;
}

// Per batch row: the span [lo, hi) from the first to the last valid token, the runs of
// segments inside it, and whether padding occurs inside the span (then keys need masking).
struct RowLayout {
  int64_t lo = 0, hi = 0;
  bool holes = false;
  std::vector<Run> runs;
};

RowLayout row_layout(const int64_t* seg, int64_t t) {
  RowLayout r;
  int64_t first = -1, last = -1;
  for (int64_t i = 0; i < t; ++i) {
    if (seg[i] >= 0) {
      if (first < 0) first = i;
      last = i;
    }
  }
  if (first < 0) return r;  // no valid token: nothing to do for this row
  r.lo = first;
  r.hi = last + 1;
  for (int64_t i = r.lo; i < r.hi; ++i) {
    if (seg[i] < 0) {
      r.holes = true;
    } else if (!r.runs.empty() && r.runs.back().seg == seg[i] && r.runs.back().end == i) {
      r.runs.back().end = i + 1;
    } else {
      r.runs.push_back({i, i + 1, seg[i]});
    }
  }
  return r;
}

// Keys of a strip row (strip position c = key lo + c) in [from, to): acc += f * P * G, or
// acc += |f * P * G| (abs_sum). f folds the softmax normalization and the OEB group factor.
template <bool SumAbs, typename T>
inline void fold(T* acc, const T* p, const T* g, int64_t from, int64_t to, T f) {
  for (int64_t c = from; c < to; ++c) {
    if constexpr (SumAbs) {
      acc[c] += f * p[c] * g[c];
    } else {
      acc[c] += std::abs(f * p[c] * g[c]);
    }
  }
}

// The attention's extras: OEB bounds (B, T, 2) int64 contiguous (nullptr when OEB is off) with
// its rule, the sink logits (H,) in double (nullptr: none) and the sliding window (<= 0: none).
struct Extras {
  const int64_t* bounds = nullptr;
  oeb::RuleParams rule{};
  const double* sink = nullptr;
  int64_t window = -1;
};

// Strip rows hold P <= 1 (exp(s - lse) or exp(s - rowmax)). Entries below T's smallest normal
// number have underflowed; a group whose strip mass is below min * 2^40 may have lost up to
// n * 2^-40 of it, or all of it. The rule would then amplify that error (it lifts a tiny bridge
// by up to 1/eps, a tiny context by M / (2 p_X) in the odds rule), so such rows take the exact
// path below.
template <typename T>
constexpr double kUnderflowGuard = std::numeric_limits<T>::min() * 1099511627776.0;  // 2^40

// Exact A' on the keys of the groups G of one strip row (strip column c = key lo + c), written
// over the row. For rows with score gaps beyond exp's range (~87 in fp32): recompute their scores
// s_j = scale q.k_j and take each group's log-mass with its own max, L_g = m_g + log Z_g with
// Z_g = sum_j exp(s_j - m_g); then A'_j = exp(s_j - lse + log r_g).
template <typename T>
void oeb_row_exact(T* p, const T* q, const T* k, int64_t lo, int64_t d, double scale, const oeb::Groups& G,
                   double sink, const oeb::RuleParams& rule) {
  constexpr double ninf = -std::numeric_limits<double>::infinity();
  std::vector<double> s(G.hi[2] - G.lo[0]);
  for (int64_t j = G.lo[0]; j < G.hi[2]; ++j) {
    double dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += double(q[c]) * double(k[(j - lo) * d + c]);
    s[j - G.lo[0]] = scale * dot;
  }
  double L[3], n[3];
  for (int g = 0; g < 3; ++g) {
    double m = ninf, z = 0;
    for (int64_t j = G.lo[g]; j < G.hi[g]; ++j) m = std::max(m, s[j - G.lo[0]]);
    for (int64_t j = G.lo[g]; j < G.hi[g]; ++j) z += std::exp(s[j - G.lo[0]] - m);
    L[g] = m == ninf ? ninf : m + std::log(z);
    n[g] = G.count(g);
  }
  const oeb::Row rb = oeb::row_forward(L, n, sink, G.intervened, rule);
  for (int g = 0; g < 3; ++g)
    for (int64_t j = G.lo[g]; j < G.hi[g]; ++j)
      p[j - lo] = static_cast<T>(std::exp(s[j - G.lo[0]] - rb.lse + rb.log_r[g]));
}

// T is the compute type: float (fp32/fp16/bf16 inputs, converted once) or double (fp64).
// Returns the (B, S, S) map in double.
template <typename T>
at::Tensor saliency_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& dout, const at::Tensor& seg_ids, int64_t num_segments,
                         double scale, bool sum_abs, const at::Tensor& lse /* undefined: none */,
                         const Extras& ex) {
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t group = H / Hkv;
  const int64_t S = num_segments;
  const bool has_lse = lse.defined();
  const int64_t* seg = seg_ids.data_ptr<int64_t>();
  const T* lse_p = has_lse ? lse.data_ptr<T>() : nullptr;
  // from_blob wants non-const pointers; the tiles are only read.
  T* q_p = const_cast<T*>(q.const_data_ptr<T>());
  T* k_p = const_cast<T*>(k.const_data_ptr<T>());
  T* v_p = const_cast<T*>(v.const_data_ptr<T>());
  T* o_p = const_cast<T*>(dout.const_data_ptr<T>());

  std::vector<RowLayout> rows(B);
  std::vector<Task> tasks;
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    rows[b] = row_layout(seg + b * Tn, Tn);
    const RowLayout& r = rows[b];
    max_keys = std::max(max_keys, r.hi - r.lo);
    for (int64_t i0 = r.lo; i0 < r.hi; i0 += kBlockQ) tasks.push_back({b, i0, std::min(i0 + kBlockQ, r.hi)});
  }
  // Causal strips grow with the query position: hand the costliest tasks out first (with
  // dynamic scheduling below this balances the workers, also on a noisy shared machine).
  auto cost = [&](const Task& t) { return (t.i1 - t.i0) * (t.i1 - rows[t.b].lo); };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& x, const Task& y) { return cost(x) > cost(y); });

  // Key mask (0 or -inf) for rows with padding inside their span: P must be 0 on padding keys
  // wherever its rows are summed (the softmax normalization without lse, the OEB group
  // masses); binning skips padding keys anyway.
  const auto opts = q.options();
  at::Tensor key_bias = at::zeros({B, Tn}, opts);
  {
    T* kb = key_bias.data_ptr<T>();
    for (int64_t i = 0; i < B * Tn; ++i)
      if (seg[i] < 0) kb[i] = -std::numeric_limits<T>::infinity();
  }

  const int64_t num_workers =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size())));
  at::Tensor maps = at::zeros({num_workers, B, S, S}, q.options().dtype(at::kDouble));
  std::atomic<size_t> next_task{0};
  // Each worker sums its tasks into its own map, and the maps are added in worker order. With
  // dynamic scheduling which worker gets which task varies from run to run (so do the last bits
  // of the fp64 sums); under torch.use_deterministic_algorithms(True) worker w takes tasks
  // w, w + W, w + 2W, ... instead (the same result on every run with the same thread count).
  const bool deterministic = at::globalContext().deterministicAlgorithms();

  auto worker = [&](int64_t w) {
    const int64_t strip = kBlockQ * std::max<int64_t>(max_keys, 1);
    at::Tensor p_buf = at::empty({strip}, opts), g_buf = at::empty({strip}, opts);
    at::Tensor row_buf = at::empty({kBlockQ, 1}, opts), sum_buf = at::empty({kBlockQ, 1}, opts);
    std::vector<T> acc(strip);
    // Per strip row: P_j = exp(s_j - off) over its valid keys, and the row's log-sum-exp lse.
    std::vector<double> off(kBlockQ), log_norm(kBlockQ);
    double* map_w = maps[w].data_ptr<double>();

    size_t mine = static_cast<size_t>(w);
    auto next = [&]() -> size_t {
      if (!deterministic) return next_task.fetch_add(1);
      const size_t ti = mine;
      mine += static_cast<size_t>(num_workers);
      return ti;
    };
    for (size_t ti; (ti = next()) < tasks.size();) {
      const Task& task = tasks[ti];
      const RowLayout& lay = rows[task.b];
      const int64_t b = task.b, i0 = task.i0, nq = task.i1 - task.i0;
      const int64_t lo = lay.lo, nk = task.i1 - lo;  // keys lo .. i1-1
      const int64_t* seg_b = seg + b * Tn;
      at::Tensor P = p_buf.narrow(0, 0, nq * nk).view({nq, nk});
      at::Tensor G = g_buf.narrow(0, 0, nq * nk).view({nq, nk});
      at::Tensor rowv = row_buf.narrow(0, 0, nq);
      at::Tensor rows_sum = sum_buf.narrow(0, 0, nq);
      T* Pp = P.data_ptr<T>();
      const T* Gp = G.data_ptr<T>();
      T* rv = rowv.data_ptr<T>();
      std::fill(acc.begin(), acc.begin() + nq * nk, T(0));

      for (int64_t h = 0; h < H; ++h) {
        const int64_t g = h / group;
        // Tile views straight from the contiguous buffers (cheaper than select/narrow chains):
        // q, dO rows i0.. of head h (nq x D); K^T, V^T of kv head g over keys lo.. (D x nk).
        const int64_t q_off = ((b * H + h) * Tn + i0) * D, k_off = ((b * Hkv + g) * Tn + lo) * D;
        at::Tensor qb = at::from_blob(q_p + q_off, {nq, D}, opts), ob = at::from_blob(o_p + q_off, {nq, D}, opts);
        at::Tensor kt = at::from_blob(k_p + k_off, {D, nk}, {1, D}, opts);
        at::Tensor vt = at::from_blob(v_p + k_off, {D, nk}, {1, D}, opts);
        if (has_lse) {
          // P = exp(scale q K^T - lse): the bias rides in the GEMM's C (beta = 1).
          const T* l = lse_p + (b * H + h) * Tn + i0;
          for (int64_t r = 0; r < nq; ++r) rv[r] = -l[r];
          at::addmm_out(P, rowv.expand({nq, nk}), qb, kt, /*beta=*/1, /*alpha=*/scale);
          if (lay.holes && ex.bounds) P.add_(key_bias[b].narrow(0, lo, nk));
          P.exp_();
          for (int64_t r = 0; r < nq; ++r) off[r] = log_norm[r] = l[r];
        } else {
          // The softmax of the strip itself: mask the keys after each query and padding keys,
          // then exp(s - rowmax); the 1 / rowsum factor is applied when folding into acc.
          at::addmm_out(P, P, qb, kt, /*beta=*/0, /*alpha=*/scale);
          for (int64_t r = 0; r < nq; ++r) {
            T* row = Pp + r * nk;
            std::fill(row + (i0 + r - lo + 1), row + nk, -std::numeric_limits<T>::infinity());
            if (ex.window > 0)  // keys before the row's sliding window
              std::fill(row, row + std::clamp<int64_t>(i0 + r - ex.window + 1 - lo, 0, nk),
                        -std::numeric_limits<T>::infinity());
          }
          if (lay.holes) P.add_(key_bias[b].narrow(0, lo, nk));
          at::amax_out(rowv, P, {1}, /*keepdim=*/true);
          P.sub_(rowv).exp_();
          at::sum_out(rows_sum, P, {1}, /*keepdim=*/true);
          const T* sp = rows_sum.data_ptr<T>();
          for (int64_t r = 0; r < nq; ++r) off[r] = double(rv[r]), log_norm[r] = off[r] + std::log(double(sp[r]));
        }
        at::mm_out(G, ob, vt);

        // acc += P' * G on the valid keys [G.lo[0], i] of each valid query row i (the rest is
        // never binned), group by group, each with its own factor: A'_j = P_j f_g with
        // f_g = exp(off - lse + log r_g) (log r_g also carries the sink's share; 0 without OEB
        // and sink).
        const double sink = ex.sink ? ex.sink[h] : -std::numeric_limits<double>::infinity();
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t i = i0 + r;
          if (seg_b[i] < 0) continue;
          T* a = acc.data() + r * nk;
          T* p = Pp + r * nk;
          const T* gg = Gp + r * nk;
          const int64_t* ab = ex.bounds ? ex.bounds + (b * Tn + i) * 2 : nullptr;
          const oeb::Groups G = oeb::row_groups(lo, ab ? ab[0] : -1, ab ? ab[1] : -1, i, ex.window);
          T f[3];
          if (!G.intervened) {
            // No rule: A' = A / (1 + sigma).
            double L[3] = {log_norm[r], -std::numeric_limits<double>::infinity(),
                           -std::numeric_limits<double>::infinity()};
            const double n3[3] = {G.count(0), 0, 0};
            const oeb::Row rb = oeb::row_forward(L, n3, sink, false, ex.rule);
            f[0] = f[1] = f[2] = static_cast<T>(std::exp(off[r] - rb.lse + rb.log_r[0]));
          } else {
            double L[3], n3[3];
            bool exact = false;
            for (int g = 0; g < 3; ++g) {
              n3[g] = G.count(g);
              const double mass = range_sum<false>(p + (G.lo[g] - lo), G.hi[g] - G.lo[g]);
              if (n3[g] > 0 && mass < kUnderflowGuard<T>) exact = true;
              L[g] = mass > 0 ? off[r] + std::log(mass) : -std::numeric_limits<double>::infinity();
            }
            if (exact) {
              // Rare: a group's mass is not resolved by the strip; p now holds A' on the groups.
              oeb_row_exact(p, q_p + q_off + r * D, k_p + k_off, lo, D, scale, G, sink, ex.rule);
              f[0] = f[1] = f[2] = T(1);
            } else {
              const oeb::Row rb = oeb::row_forward(L, n3, sink, true, ex.rule);
              for (int g = 0; g < 3; ++g) f[g] = static_cast<T>(std::exp(off[r] - rb.lse + rb.log_r[g]));
            }
          }
          for (int g = 0; g < 3; ++g) {
            const int64_t c0 = G.lo[g] - lo, c1 = G.hi[g] - lo;
            if (c1 <= c0) continue;
            if (sum_abs) fold<true>(a, p, gg, c0, c1, f[g]);
            else fold<false>(a, p, gg, c0, c1, f[g]);
          }
        }
      }

      // Bin the causal part of each valid row by the key runs: map[seg(i), run.seg] += sum.
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r, a_seg = seg_b[i];
        if (a_seg < 0) continue;
        const T* a = acc.data() + r * nk;
        double* mrow = map_w + (b * S + a_seg) * S;
        for (const Run& run : lay.runs) {
          if (run.start > i) break;
          const int64_t end = std::min(run.end, i + 1);
          mrow[run.seg] += sum_abs ? range_sum<true>(a + (run.start - lo), end - run.start)
                                   : range_sum<false>(a + (run.start - lo), end - run.start);
        }
      }
    }
  };

  // One index per worker; each worker pulls tasks until none are left. If this runs nested
  // in a parallel region (single-threaded), worker 0 simply does everything.
  stepflow::parallel_for(0, num_workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) worker(w);
  });
  return maps.sum(0);
}

at::Tensor step_saliency_pool_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& grad_out, const at::Tensor& seg_ids, int64_t num_segments,
                                  double scale, c10::string_view head_reduction,
                                  const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& sink,
                                  int64_t window, const std::optional<at::Tensor>& oeb_bounds,
                                  c10::string_view oeb_rule, double oeb_strength, double oeb_tau_max,
                                  double oeb_eps) {
  const std::string reduction(head_reduction);
  TORCH_CHECK(q.device().is_cpu(), "step_saliency_pool (CPU kernel): all tensors must be on the CPU, got ",
              q.device());
  const SaliencySizes sizes = check_saliency_arguments(q, k, v, grad_out, seg_ids, num_segments, scale, reduction);
  const int64_t B = sizes.B, H = sizes.H, Tn = sizes.T;
  const auto dtype = q.scalar_type();
  const at::Tensor seg = seg_ids.to(at::kLong).contiguous();
  if (seg.numel() > 0) {
    const int64_t lo = seg.min().item<int64_t>(), hi = seg.max().item<int64_t>();
    TORCH_CHECK(lo >= -1, "step_saliency_pool: seg_ids must be >= -1 (-1 marks padding), found ", lo);
    TORCH_CHECK(hi < num_segments, "step_saliency_pool: seg_ids has segment id ", hi, " but num_segments is ",
                num_segments);
  }
  const auto compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse_c;
  if (lse.has_value()) {
    TORCH_CHECK(lse->device().is_cpu(), "step_saliency_pool (CPU kernel): lse must be on the CPU, got ",
                lse->device());
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "step_saliency_pool: lse must be float32, got ",
                lse->scalar_type());
    TORCH_CHECK(lse->dim() == 3 && lse->size(0) == B && lse->size(1) == H && lse->size(2) == Tn,
                "step_saliency_pool: lse must have shape (", B, ", ", H, ", ", Tn, "), got ", lse->sizes());
    lse_c = lse->to(compute).contiguous();
  }
  Extras ex;
  ex.rule = check_oeb_rule("step_saliency_pool", std::string(oeb_rule), oeb_strength, oeb_tau_max, oeb_eps);
  TORCH_CHECK(window >= -1 && window != 0, "step_saliency_pool: window must be -1 (full attention) or >= 1, got ",
              window);
  ex.window = window;
  check_sink("step_saliency_pool", sink, q);
  at::Tensor sink_d;
  if (sink.has_value()) {
    sink_d = sink->detach().to(at::kDouble).contiguous();
    ex.sink = sink_d.data_ptr<double>();
    for (int64_t h = 0; h < H; ++h)
      TORCH_CHECK(std::isfinite(ex.sink[h]), "step_saliency_pool: sink[", h, "] = ", ex.sink[h], " is not finite");
  }
  at::Tensor bounds_c;
  if (oeb_bounds.has_value()) {
    const at::Tensor& x = *oeb_bounds;
    TORCH_CHECK(x.device().is_cpu(), "step_saliency_pool (CPU kernel): oeb_bounds must be on the CPU, got ",
                x.device());
    TORCH_CHECK(x.scalar_type() == at::kLong, "step_saliency_pool: oeb_bounds must be int64, got ",
                x.scalar_type());
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && x.size(1) == Tn && x.size(2) == 2,
                "step_saliency_pool: oeb_bounds must have shape (", B, ", ", Tn, ", 2), got ", x.sizes());
    bounds_c = x.contiguous();
    const int64_t* bd = bounds_c.data_ptr<int64_t>();
    const int64_t* sg = seg.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      bool seen = false, after = false;
      for (int64_t i = 0; i < Tn; ++i) {
        const int64_t a = bd[(b * Tn + i) * 2], c = bd[(b * Tn + i) * 2 + 1];
        TORCH_CHECK((a == -1 && c == -1) || (a >= 0 && a <= c && c <= i + 1), "step_saliency_pool: oeb_bounds[", b,
                    ", ", i, "] = (", a, ", ", c, ") must be (-1, -1) or satisfy 0 <= a <= b <= ", i + 1);
        // OEB counts keys by position: padding may only sit at the ends of a row.
        if (sg[b * Tn + i] >= 0) {
          TORCH_CHECK(!after, "step_saliency_pool: with oeb_bounds, padding (seg id -1) must be at the ends of a "
                      "row, but batch row ", b, " has padding inside it");
          seen = true;
        } else if (seen) {
          after = true;
        }
      }
    }
    ex.bounds = bd;
  }
  // Whole tensors are converted to the compute type once (a no-op for contiguous fp32).
  const at::Tensor qc = q.to(compute).contiguous(), kc = k.to(compute).contiguous();
  const at::Tensor vc = v.to(compute).contiguous(), oc = grad_out.to(compute).contiguous();
  const bool sum_abs = reduction == "sum_abs";
  at::Tensor maps = compute == at::kDouble
                        ? saliency_maps<double>(qc, kc, vc, oc, seg, num_segments, scale, sum_abs, lse_c, ex)
                        : saliency_maps<float>(qc, kc, vc, oc, seg, num_segments, scale, sum_abs, lse_c, ex);
  if (reduction == "abs_mean") maps.div_(static_cast<double>(H));
  return maps.to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(stepflow, CPU, m) {
  m.impl("step_saliency_pool", &step_saliency_pool_cpu);
}

}  // namespace stepflow
