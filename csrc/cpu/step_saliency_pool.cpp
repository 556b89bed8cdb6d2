// CPU kernel of stepflow::step_saliency_pool (design.md 2.2).
//
//   M[b, a, c] = sum_{i: seg(i)=a} sum_{j <= i: seg(j)=c} I_ij,
//   I_ij = | sum_h A^h_ij (dO^h_i . v^{g(h)}_j) |  ("sum_abs")   or   sum_h | ... |  ("abs_sum").
//
// sum_abs needs the sum over heads before the abs, so a task is (batch, block of queries) and
// the heads are looped inside it. Per head the task forms, with BLAS, the strips
//   P = exp(scale * q_blk K^T - lse)   and   G = dO_blk V^T
// over the keys up to the block's last query (block_q x T at most) and folds P * G into acc;
// then |acc| is binned by (segment of the query, segment of the key) into the worker's own
// S x S map. Memory is O(block_q * T) per worker: no T x T (let alone H x T x T) buffer exists.
// Without lse the row max / sum come from the strip itself (it is whole in memory).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "stepflow.h"

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

// T is the compute type: float (fp32/fp16/bf16 inputs, converted once) or double (fp64).
// Returns the (B, S, S) map in double.
template <typename T>
at::Tensor saliency_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& dout, const at::Tensor& seg_ids, int64_t num_segments,
                         double scale, bool sum_abs, const at::Tensor& lse /* undefined: none */) {
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

  // Key mask (0 or -inf) for rows with padding inside their span; only the path without lse
  // needs it (it normalizes the softmax itself), binning skips padding keys anyway.
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

  auto worker = [&](int64_t w) {
    const int64_t strip = kBlockQ * std::max<int64_t>(max_keys, 1);
    at::Tensor p_buf = at::empty({strip}, opts), g_buf = at::empty({strip}, opts);
    at::Tensor row_buf = at::empty({kBlockQ, 1}, opts), sum_buf = at::empty({kBlockQ, 1}, opts);
    std::vector<T> acc(strip), row_fac(kBlockQ);
    double* map_w = maps[w].data_ptr<double>();

    for (size_t ti; (ti = next_task.fetch_add(1)) < tasks.size();) {
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
          P.exp_();
          std::fill(row_fac.begin(), row_fac.begin() + nq, T(1));
        } else {
          // The softmax of the strip itself: mask the keys after each query and padding keys,
          // then exp(s - rowmax); the 1 / rowsum factor is applied when folding into acc.
          at::addmm_out(P, P, qb, kt, /*beta=*/0, /*alpha=*/scale);
          for (int64_t r = 0; r + 1 < nq; ++r) {
            T* row = Pp + r * nk;
            std::fill(row + (i0 + r - lo + 1), row + nk, -std::numeric_limits<T>::infinity());
          }
          if (lay.holes) P.add_(key_bias[b].narrow(0, lo, nk));
          at::amax_out(rowv, P, {1}, /*keepdim=*/true);
          P.sub_(rowv).exp_();
          at::sum_out(rows_sum, P, {1}, /*keepdim=*/true);
          const T* sp = rows_sum.data_ptr<T>();
          for (int64_t r = 0; r < nq; ++r) row_fac[r] = T(1) / sp[r];
        }
        at::mm_out(G, ob, vt);

        // acc += P * G on the causal part of each valid query row (the rest is never binned).
        for (int64_t r = 0; r < nq; ++r) {
          if (seg_b[i0 + r] < 0) continue;
          const int64_t n = i0 + r - lo + 1;
          const T f = row_fac[r];
          T* a = acc.data() + r * nk;
          const T* p = Pp + r * nk;
          const T* gg = Gp + r * nk;
          if (sum_abs) {
            for (int64_t c = 0; c < n; ++c) a[c] += f * p[c] * gg[c];
          } else {
            for (int64_t c = 0; c < n; ++c) a[c] += std::abs(f * p[c] * gg[c]);
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
  at::parallel_for(0, num_workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) worker(w);
  });
  return maps.sum(0);
}

at::Tensor step_saliency_pool_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& grad_out, const at::Tensor& seg_ids, int64_t num_segments,
                                  double scale, c10::string_view head_reduction,
                                  const std::optional<at::Tensor>& lse) {
  const std::string reduction(head_reduction);
  TORCH_CHECK(reduction == "sum_abs" || reduction == "abs_sum",
              "step_saliency_pool: head_reduction must be 'sum_abs' or 'abs_sum', got '", reduction, "'");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && grad_out.dim() == 4,
              "step_saliency_pool: q, k, v, grad_out must be 4-D (B, H, T, d), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes(), ", ", grad_out.sizes());
  for (const at::Tensor* x : {&q, &k, &v, &grad_out, &seg_ids}) {
    TORCH_CHECK(x->device().is_cpu(), "step_saliency_pool (CPU kernel): all tensors must be on the CPU, got ",
                x->device());
  }
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "step_saliency_pool: q must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && grad_out.scalar_type() == dtype,
              "step_saliency_pool: q, k, v, grad_out must share one dtype, got ", dtype, ", ", k.scalar_type(), ", ",
              v.scalar_type(), ", ", grad_out.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3), Hkv = k.size(1);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "step_saliency_pool: grad_out must have the shape of q ", q.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "step_saliency_pool: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "step_saliency_pool: k must be (", B, ", H_kv, T, ", D,
              ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k.size(2) == Tn, "step_saliency_pool: needs Tq == Tk, got q with ", Tn, " tokens and k with ",
              k.size(2));
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "step_saliency_pool: the query heads (", H,
              ") must be a multiple of the kv heads (", Hkv, ")");
  TORCH_CHECK(D > 0, "step_saliency_pool: head dim must be positive");
  TORCH_CHECK(num_segments >= 1, "step_saliency_pool: num_segments must be >= 1, got ", num_segments);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "step_saliency_pool: scale must be a positive number, got ",
              scale);
  TORCH_CHECK(seg_ids.scalar_type() == at::kLong || seg_ids.scalar_type() == at::kInt,
              "step_saliency_pool: seg_ids must be int64 (or int32), got ", seg_ids.scalar_type());
  TORCH_CHECK(seg_ids.dim() == 2 && seg_ids.size(0) == B && seg_ids.size(1) == Tn,
              "step_saliency_pool: seg_ids must have shape (", B, ", ", Tn, "), got ", seg_ids.sizes());
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

  // Whole tensors are converted to the compute type once (a no-op for contiguous fp32).
  const at::Tensor qc = q.to(compute).contiguous(), kc = k.to(compute).contiguous();
  const at::Tensor vc = v.to(compute).contiguous(), oc = grad_out.to(compute).contiguous();
  const bool sum_abs = reduction == "sum_abs";
  at::Tensor maps = compute == at::kDouble
                        ? saliency_maps<double>(qc, kc, vc, oc, seg, num_segments, scale, sum_abs, lse_c)
                        : saliency_maps<float>(qc, kc, vc, oc, seg, num_segments, scale, sum_abs, lse_c);
  return maps.to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(stepflow, CPU, m) {
  m.impl("step_saliency_pool", &step_saliency_pool_cpu);
}

}  // namespace stepflow
