// Step Momentum Injection (design.md 2.4), CPU kernels: prefill and decode.
//
//   mu_k = mean of h over thinking step k (values before injection)
//   m_1 = mu_1,  m_k = beta * m_{k-1} + (1 - beta) * mu_k
//   a token of a step or of the summary, with K >= 1 steps completed before its segment,
//   gets h + gamma * (|h| / |m_K|) * m_K  (nothing when |m_K| == 0).
//
// Segments are taken in the order tokens arrive: along the valid tokens of a row the segment
// ids must never decrease (checked). A step is "completed" once a token of a later segment
// arrives, so a step's own tokens only ever see the momentum of earlier steps.
//
// Both ops run one routine, `run_chunk`, that continues a per-row state
// (momentum, step_sum, counters = (current segment, tokens in the current step, K)):
// the prefill op starts it from a fresh state and keeps it local, the decode op loads it
// from and stores it back into the caller's tensors. The same code, summing in token order
// per element, makes any chunking of a sequence give bit-identical results in fp32 / fp16 /
// bf16 (fp64 input accumulates in fp64, but the decode state is fp32 and rounds in between).
//
// Work per chunk of T tokens, O(B * T * D), in three passes:
//   plan   (serial, O(B*T) integers): per token, which step sum it adds to and which momentum
//          version it is injected with; validates segment ids on the way;
//   sums   (parallel over rows x D slices): step sums in token order, vectorized over D;
//   fold   (parallel over rows): the momentum after each step completed in the chunk;
//   apply  (parallel over tokens): the injection, one read and one write of h.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "checks.h"
#include "parallel.h"

namespace stepflow {
namespace {

// Columns of the counters state tensor.
constexpr int64_t kCurSeg = 0, kStepTokens = 1, kCompleted = 2;
// Narrowest D slice of the step-sum pass (rows x slices give the parallelism when B is small).
constexpr int64_t kMinDSlice = 128;
// Elements of h a thread should get at least: a decode step of one token stays on the calling
// thread instead of paying an OpenMP fork/join (which costs far more than the work).
constexpr int64_t kGrainElements = 32768;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct CounterState {
  int64_t cur_seg = -1, step_tokens = 0, completed = 0;
};

// What a chunk does to one row, decided from the segment ids alone.
struct RowPlan {
  std::vector<int32_t> slot;     // per token: step-sum slot it adds to, or -1
  std::vector<int32_t> version;  // per token: momentum version it is injected with, or -1
  std::vector<int64_t> slot_tokens;  // tokens per slot (slot 0 may continue the state's step)
  std::vector<int32_t> fold_slot;    // version v + 1 = version v folded with slot fold_slot[v]
  bool continues_step = false;       // slot 0 starts from the state's step_sum
  int32_t cur_slot = -1;             // slot of the current step at the end, -1 if none
  CounterState end;
};

RowPlan plan_row(const int64_t* seg, const int64_t* kinds, int64_t t, int64_t s, CounterState st,
                 int64_t row) {
  RowPlan p;
  p.slot.assign(t, -1);
  p.version.assign(t, -1);
  int32_t cur_slot = -1;
  if (st.step_tokens > 0) {  // the state holds a step in progress: slot 0 continues it
    p.continues_step = true;
    p.slot_tokens.push_back(st.step_tokens);
    cur_slot = 0;
  }
  int64_t cur = st.cur_seg, completed = st.completed;
  int32_t version = 0;
  int64_t kind = -1;
  for (int64_t i = 0; i < t; ++i) {
    const int64_t sid = seg[i];
    if (sid < 0) {
      TORCH_CHECK(sid == -1, "step_momentum: seg_ids must be >= -1 (-1 marks padding), row ", row,
                  " token ", i, " has ", sid);
      continue;  // padding: skipped, left unchanged
    }
    TORCH_CHECK(sid < s, "step_momentum: seg_ids row ", row, " token ", i, " has segment id ", sid,
                " but seg_kinds has only ", s, " segments");
    TORCH_CHECK(sid >= cur, "step_momentum: segment ids must not decrease along a row (segments are "
                "taken in the order tokens arrive), but row ", row, " token ", i, " has segment ", sid,
                " after segment ", cur);
    if (sid != cur || kind < 0) {
      if (sid != cur) {
        // A new segment: the current step, if any, is complete; fold it into the momentum.
        if (cur_slot >= 0) {
          p.fold_slot.push_back(cur_slot);
          ++version;
          ++completed;
        }
        cur_slot = -1;
        cur = sid;
      }
      kind = kinds[sid];
      TORCH_CHECK(!(sid == st.cur_seg && st.step_tokens > 0 && kind != kStep),
                  "step_momentum_decode_: the state has step tokens summed for segment ", sid,
                  " of row ", row, " but seg_kinds says that segment is not a step (kind ", kind, ")");
      if (kind == kStep && cur_slot < 0) {
        cur_slot = static_cast<int32_t>(p.slot_tokens.size());
        p.slot_tokens.push_back(0);
      }
    }
    if (kind == kStep) {
      p.slot[i] = cur_slot;
      ++p.slot_tokens[cur_slot];
    }
    if (kind != kQuestion && completed >= 1) p.version[i] = version;
  }
  p.cur_slot = cur_slot;
  p.end.cur_seg = cur;
  p.end.step_tokens = cur_slot >= 0 ? p.slot_tokens[cur_slot] : 0;
  p.end.completed = completed;
  return p;
}

// Sum of squares with independent lane accumulators, so the compiler vectorizes it without
// -ffast-math; the fixed order keeps it deterministic (prefill and decode must agree bitwise).
template <typename scalar_t, typename acc_t>
acc_t sum_squares(const scalar_t* x, int64_t n) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t v = static_cast<acc_t>(x[i + l]);
      part[l] += v * v;
    }
  }
  acc_t total = 0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    total += v * v;
  }
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// One chunk for all rows. h (B, T, D) contiguous; state_m / state_s (B, D) fp32 or null (fresh
// state); counters in/out per row. Writes out (B, T, D) and, when given, the new state.
template <typename scalar_t>
void run_chunk(const at::Tensor& h, const at::Tensor& seg_ids, const at::Tensor& seg_kinds, double beta,
               double gamma, at::Tensor& out, std::vector<CounterState>& counters, float* state_m,
               float* state_s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = h.size(0), t = h.size(1), d = h.size(2), s = seg_kinds.size(1);
  const scalar_t* hp = h.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t* segp = seg_ids.data_ptr<int64_t>();
  const int64_t* kindp = seg_kinds.data_ptr<int64_t>();

  // plan (serial: integer work only, and the TORCH_CHECKs are raised before any parallel pass)
  std::vector<RowPlan> plans;
  plans.reserve(b);
  for (int64_t r = 0; r < b; ++r) plans.push_back(plan_row(segp + r * t, kindp + r * s, t, s, counters[r], r));

  // per-row buffers: step sums (slots x D) and momentum versions (versions x D) with norms
  std::vector<std::vector<acc_t>> sums(b), moms(b), mom_norm(b);
  for (int64_t r = 0; r < b; ++r) {
    const RowPlan& p = plans[r];
    sums[r].assign(p.slot_tokens.size() * d, acc_t(0));
    moms[r].assign((p.fold_slot.size() + 1) * d, acc_t(0));
    mom_norm[r].assign(p.fold_slot.size() + 1, acc_t(0));
    if (state_m != nullptr) {
      for (int64_t j = 0; j < d; ++j) moms[r][j] = static_cast<acc_t>(state_m[r * d + j]);
      if (p.continues_step)
        for (int64_t j = 0; j < d; ++j) sums[r][j] = static_cast<acc_t>(state_s[r * d + j]);
    }
  }

  // sums: each (row, D slice) walks the row's tokens in order, so every element is summed in
  // token order whatever the chunking. Rows first; a row is split into D slices only as far as
  // threads are left over (a thread then streams one slice of every token, which is kinder to the
  // prefetcher than one thread walking many narrow slices).
  const int64_t slices = std::clamp<int64_t>(ceil_div(at::get_num_threads(), std::max<int64_t>(b, 1)), 1,
                                             std::max<int64_t>(1, ceil_div(d, kMinDSlice)));
  const int64_t slice_len = ceil_div(ceil_div(d, slices), 16) * 16;
  stepflow::parallel_for(0, b * slices, ceil_div(kGrainElements, std::max<int64_t>(1, t * slice_len)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / slices, d0 = std::min(d, (w % slices) * slice_len), d1 = std::min(d, d0 + slice_len);
      const RowPlan& p = plans[r];
      for (int64_t i = 0; i < t; ++i) {
        const int32_t slot = p.slot[i];
        if (slot < 0) continue;
        acc_t* acc = sums[r].data() + slot * d;
        const scalar_t* x = hp + (r * t + i) * d;
        for (int64_t j = d0; j < d1; ++j) acc[j] += static_cast<acc_t>(x[j]);
      }
    }
  });

  // fold: momentum after each step completed in this chunk
  const acc_t beta_a = static_cast<acc_t>(beta), one_minus_beta = acc_t(1) - beta_a;
  int64_t versions = 0;
  for (const RowPlan& p : plans) versions += p.fold_slot.size() + 1;
  const int64_t row_work = std::max<int64_t>(1, d * versions / std::max<int64_t>(b, 1));
  stepflow::parallel_for(0, b, ceil_div(kGrainElements, row_work), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowPlan& p = plans[r];
      acc_t* m = moms[r].data();
      for (size_t v = 0; v < p.fold_slot.size(); ++v) {
        const int32_t slot = p.fold_slot[v];
        const acc_t inv = acc_t(1) / static_cast<acc_t>(p.slot_tokens[slot]);
        const acc_t* sum = sums[r].data() + slot * d;
        const acc_t* prev = m + v * d;
        acc_t* next = m + (v + 1) * d;
        if (counters[r].completed + static_cast<int64_t>(v) == 0) {
          for (int64_t j = 0; j < d; ++j) next[j] = sum[j] * inv;  // m_1 = mu_1
        } else {
          for (int64_t j = 0; j < d; ++j) next[j] = beta_a * prev[j] + one_minus_beta * (sum[j] * inv);
        }
      }
      for (size_t v = 0; v <= p.fold_slot.size(); ++v)
        mom_norm[r][v] = std::sqrt(sum_squares<acc_t, acc_t>(m + v * d, d));
    }
  });

  // apply: tokens are independent now
  const acc_t gamma_a = static_cast<acc_t>(gamma);
  stepflow::parallel_for(0, b * t, ceil_div(kGrainElements, std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / t, i = w % t;
      const scalar_t* x = hp + w * d;
      scalar_t* y = op + w * d;
      const int32_t v = plans[r].version[i];
      const acc_t mn = v >= 0 ? mom_norm[r][v] : acc_t(0);
      if (v < 0 || !(mn > acc_t(0)) || gamma_a == acc_t(0)) {
        std::memcpy(y, x, d * sizeof(scalar_t));
        continue;
      }
      const acc_t coef = gamma_a * std::sqrt(sum_squares<scalar_t, acc_t>(x, d)) / mn;
      const acc_t* m = moms[r].data() + v * d;
      for (int64_t j = 0; j < d; ++j) y[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) + coef * m[j]);
    }
  });

  // new state: the last momentum version and the running sum of the current step
  for (int64_t r = 0; r < b; ++r) {
    const RowPlan& p = plans[r];
    counters[r] = p.end;
    if (state_m == nullptr) continue;
    const acc_t* m = moms[r].data() + p.fold_slot.size() * d;
    for (int64_t j = 0; j < d; ++j) state_m[r * d + j] = static_cast<float>(m[j]);
    if (p.cur_slot >= 0) {
      const acc_t* sum = sums[r].data() + p.cur_slot * d;
      for (int64_t j = 0; j < d; ++j) state_s[r * d + j] = static_cast<float>(sum[j]);
    } else {
      std::fill(state_s + r * d, state_s + (r + 1) * d, 0.f);
    }
  }
}

void check_inputs(const char* op, const at::Tensor& h, const at::Tensor& seg_ids, const at::Tensor& seg_kinds,
                  double beta, double gamma) {
  TORCH_CHECK(h.device().is_cpu(), op, ": the CPU kernel got h on ", h.device());
  check_momentum_arguments(op, h, seg_ids, seg_kinds, beta, gamma);
  const auto kinds = seg_kinds.contiguous();
  const int64_t* k = kinds.data_ptr<int64_t>();
  for (int64_t i = 0; i < kinds.numel(); ++i)
    TORCH_CHECK(k[i] == kQuestion || k[i] == kStep || k[i] == kSummary, op,
                ": seg_kinds must hold 0 (question), 1 (step) or 2 (summary), found ", k[i]);
}

at::Tensor step_momentum_cpu(const at::Tensor& h_in, const at::Tensor& seg_ids_in, const at::Tensor& seg_kinds_in,
                             double beta, double gamma) {
  check_inputs("step_momentum", h_in, seg_ids_in, seg_kinds_in, beta, gamma);
  const auto h = h_in.contiguous();
  const auto seg_ids = seg_ids_in.contiguous();
  const auto seg_kinds = seg_kinds_in.contiguous();
  auto out = at::empty_like(h, at::MemoryFormat::Contiguous);
  std::vector<CounterState> counters(h.size(0));  // fresh state, kept local: the op is functional
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "step_momentum_cpu", [&] {
    run_chunk<scalar_t>(h, seg_ids, seg_kinds, beta, gamma, out, counters, nullptr, nullptr);
  });
  return out;
}

at::Tensor step_momentum_decode_cpu(const at::Tensor& h_in, const at::Tensor& seg_ids_in,
                                    const at::Tensor& seg_kinds_in, at::Tensor& momentum, at::Tensor& step_sum,
                                    at::Tensor& counters, double beta, double gamma) {
  check_inputs("step_momentum_decode_", h_in, seg_ids_in, seg_kinds_in, beta, gamma);
  check_momentum_state(h_in, momentum, step_sum, counters);
  const int64_t b = h_in.size(0);

  const auto h = h_in.contiguous();
  const auto seg_ids = seg_ids_in.contiguous();
  const auto seg_kinds = seg_kinds_in.contiguous();
  // Work on contiguous state; copied back at the end when the caller's tensors are strided.
  auto m = momentum.contiguous(), s = step_sum.contiguous(), c = counters.contiguous();
  std::vector<CounterState> st(b);
  const int64_t* cp = c.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) {
    st[r] = {cp[r * 3 + kCurSeg], cp[r * 3 + kStepTokens], cp[r * 3 + kCompleted]};
    TORCH_CHECK(st[r].cur_seg >= -1 && st[r].step_tokens >= 0 && st[r].completed >= 0 &&
                    (st[r].cur_seg >= 0 || st[r].step_tokens == 0),
                "step_momentum_decode_: state counters row ", r, " = (", st[r].cur_seg, ", ", st[r].step_tokens,
                ", ", st[r].completed, ") is not a valid (current segment >= -1, step tokens >= 0, "
                "completed steps >= 0) state");
  }
  auto out = at::empty_like(h, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "step_momentum_decode_cpu", [&] {
    run_chunk<scalar_t>(h, seg_ids, seg_kinds, beta, gamma, out, st, m.data_ptr<float>(), s.data_ptr<float>());
  });
  int64_t* cw = c.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) {
    cw[r * 3 + kCurSeg] = st[r].cur_seg;
    cw[r * 3 + kStepTokens] = st[r].step_tokens;
    cw[r * 3 + kCompleted] = st[r].completed;
  }
  if (!m.is_same(momentum)) momentum.copy_(m);
  if (!s.is_same(step_sum)) step_sum.copy_(s);
  if (!c.is_same(counters)) counters.copy_(c);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stepflow, CPU, m) {
  m.impl("step_momentum", &step_momentum_cpu);
  m.impl("step_momentum_decode_", &step_momentum_decode_cpu);
}

}  // namespace stepflow
