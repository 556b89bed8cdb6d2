// Step Momentum Injection (design.md 2.4), CUDA kernels: prefill and decode.
//
//   mu_k = mean of h over thinking step k (values before injection)
//   m_1 = mu_1,  m_k = beta * m_{k-1} + (1 - beta) * mu_k
//   a token of a step or of the summary, with K >= 1 steps completed before its segment,
//   gets h + gamma * (|h| / |m_K|) * m_K  (nothing when |m_K| == 0).
//
// Same structure and state as the CPU kernel (csrc/cpu/step_momentum.cpp): a chunk of tokens
// continues a per-row state (momentum, step_sum (B, D) fp32; counters (B, 3) int64 = (current
// segment, tokens summed in the current step, completed steps)); the prefill op starts from a
// fresh state and keeps it local.
//
// Exactness. The arithmetic follows the CPU kernel operation for operation, each one rounded
// to nearest with no FMA contraction (__fadd_rn, __fmul_rn, __frcp_rn, __fsqrt_rn, ...):
//   - step sums: every element summed in token order (a left fold, one thread per element and
//     step, starting from the state's step_sum), so any chunking of a sequence gives the same
//     sums bit for bit, like on the CPU;
//   - fold: next = beta * prev + (1 - beta) * (sum * (1 / count));
//   - norms: the CPU's 16-lane order (lane l sums elements l, l + 16, ... in order, then the
//     tail, then the 16 lanes in order), here 16 threads of a half-warp;
//   - inject: y = x + ((gamma * sqrt(|x|^2)) / |m|) * m.
// So on the GPU decode in any chunking equals prefill bit for bit, and both equal the CPU
// kernel bit for bit too as long as no denormal occurs (--use_fast_math flushes denormals to
// zero on the GPU; the CPU keeps them), i.e. agree with it to fp32 rounding in any case.
//
// Work, O(B * T * D):
//   plan  (one CTA per row, a block-wide scan over the tokens): per token the step-sum slot
//         it adds to and the momentum version it is injected with, per slot its token range
//         and count; validates the data (seg ids, kinds, state) into a device error flag;
//   sums  (rows x slots x D): the ordered per-element sums, in parallel over steps and D;
//   fold  (rows x D): the momentum after each step completed in the chunk;
//   norms (rows x versions, a half-warp each) and apply (a half-warp per token).
// A chunk of at most kFusedMaxT tokens (decode) runs all of that in one fused kernel, one CTA
// per row, with the same device functions (same numbers). The decode op writes the new state
// with a second small kernel that does nothing when the error flag is set, so a rejected chunk
// leaves the state untouched; a last one-thread kernel turns a set flag into a device-side
// assert (csrc/cuda/device_checks.cuh): no device-to-host copy per call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cmath>

#include "checks.h"
#include "device_checks.cuh"

namespace stepflow {
namespace {

constexpr int kFusedMaxT = 64;     // chunks up to this long run in the fused one-CTA-per-row kernel
constexpr int kFusedThreads = 256;
constexpr int kPlanThreads = 1024;  // one CTA per row scans the tokens in tiles of this many
constexpr int kThreads = 256;       // element-parallel kernels
constexpr int kHalfWarps = kThreads / 16;

// Per-row plan summary (int64 each).
enum Info : int {
  kCont = 0,       // 1 when slot 0 continues the state's step sum
  kSlots,          // step-sum slots used
  kFolds,          // steps completed (folded into the momentum) in this chunk
  kCurSlot,        // slot of the step in progress at the end, or -1
  kEndSeg,         // new counters: current segment,
  kEndTokens,      //   tokens in the current step,
  kEndCompleted,   //   completed steps
  kCompleted0,     // completed steps before the chunk
  kInfoLen
};

// ---------------------------------------------------------------- exact arithmetic helpers

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float rcp_rn(float a) { return __frcp_rn(a); }
__device__ __forceinline__ double rcp_rn(double a) { return __drcp_rn(a); }

// ---------------------------------------------------------------- arguments

template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* h;
  scalar_t* out;
  const int64_t* seg;    // (B, T)
  const int64_t* kinds;  // (B, S)
  int64_t B, T, D, S;
  const float* state_m;    // (B, D) or null (prefill: fresh state)
  const float* state_s;    // (B, D) or null
  const int64_t* state_c;  // (B, 3) or null
  acc_t beta, one_minus_beta, gamma;
  // scratch
  int64_t ns_max;          // slots per row (versions per row: ns_max + 1)
  int64_t* info;           // (B, kInfoLen)
  int64_t* slot_count;     // (B, ns_max)
  int32_t* slot_first;     // (B, ns_max)
  int32_t* slot_last;      // (B, ns_max)
  int32_t* tok_slot;       // (B, T)
  int32_t* tok_ver;        // (B, T)
  acc_t* sums;             // (B, ns_max, D)
  acc_t* moms;             // (B, ns_max + 1, D)
  acc_t* mom_norm;         // (B, ns_max + 1)
  int* err;                // device error flag
};

// ---------------------------------------------------------------- block scan

struct MaxOp {
  __device__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};
struct SumOp {
  __device__ long long operator()(long long a, long long b) const { return a + b; }
};

// Inclusive and exclusive scans of x over the N threads of the block, and the block total.
// All threads must call it; buf holds 32 entries of shared memory.
template <int N, typename Op>
__device__ void block_scan(long long x, long long identity, Op op, long long* buf, long long& incl,
                           long long& excl, long long& total) {
  static_assert(N % 32 == 0 && N <= 1024, "block size");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long v = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long y = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v = op(y, v);
  }
  long long ex = __shfl_up_sync(0xffffffffu, v, 1);
  if (lane == 0) ex = identity;
  if (lane == 31) buf[warp] = v;
  __syncthreads();
  if (warp == 0) {
    long long w = lane < N / 32 ? buf[lane] : identity;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w = op(y, w);
    }
    if (lane < N / 32) buf[lane] = w;
  }
  __syncthreads();
  const long long prefix = warp > 0 ? buf[warp - 1] : identity;
  incl = op(prefix, v);
  excl = op(prefix, ex);
  total = buf[N / 32 - 1];
  __syncthreads();  // buf is reused by the next scan
}

// ---------------------------------------------------------------- plan (one CTA per row)

// Mirrors plan_row of the CPU kernel with scans instead of a serial walk. For token i (valid:
// 0 <= seg < S): prev = the last valid segment before it (or the state's current segment);
// a new segment starts at i when seg(i) != prev; it folds the previous step when that one has
// a slot (a step with tokens: a step of the chunk, or the state's step when step_tokens > 0);
// a slot starts at i when seg(i) is a step and a new segment starts (or i is the chunk's first
// valid token, continues the state's segment and the state holds no step sum). Slots close in
// creation order, so fold v closes slot v. F(i), N(i) = folds, slot starts up to i:
//   slot(i) = cont + N(i) - 1 (steps),  version(i) = F(i) (non-question, K >= 1).
template <int N, typename scalar_t, typename acc_t>
__device__ void plan_row(const Args<scalar_t, acc_t>& a, int64_t b) {
  __shared__ long long buf[32];
  const int tid = threadIdx.x;
  const int64_t T = a.T, S = a.S, ns_max = a.ns_max;
  const int64_t* seg = a.seg + b * T;
  const int64_t* kinds = a.kinds + b * S;
  int64_t st_cur = -1, st_tok = 0, st_done = 0;
  if (a.state_c != nullptr) {
    st_cur = a.state_c[b * 3 + 0];
    st_tok = a.state_c[b * 3 + 1];
    st_done = a.state_c[b * 3 + 2];
  }
  bool bad = st_cur < -1 || st_tok < 0 || st_done < 0 || (st_cur < 0 && st_tok != 0);
  const long long cont = st_tok > 0 ? 1 : 0;
  for (int64_t j = tid; j < S; j += N) {
    const int64_t k = kinds[j];
    if (k != kQuestion && k != kStep && k != kSummary) bad = true;
  }
  int64_t* count = a.slot_count + b * ns_max;
  int32_t* first = a.slot_first + b * ns_max;
  int32_t* last = a.slot_last + b * ns_max;
  for (int64_t s = tid; s < ns_max; s += N) {
    count[s] = (s == 0 && cont) ? st_tok : 0;
    first[s] = INT_MAX;
    last[s] = -1;
  }
  __syncthreads();

  long long carry_max = st_cur, carry_valid = 0, carry_f = 0, carry_n = 0;
  for (int64_t base = 0; base < T; base += N) {
    const int64_t i = base + tid;
    const bool in = i < T;
    const long long sid = in ? seg[i] : -1;
    if (sid < -1 || sid >= S) bad = true;
    const bool valid = sid >= 0 && sid < S;
    long long in_max, ex_max, tot_max, in_cnt, ex_cnt, tot_cnt;
    block_scan<N>(valid ? sid : -1LL, -1LL, MaxOp(), buf, in_max, ex_max, tot_max);
    block_scan<N>(valid ? 1LL : 0LL, 0LL, SumOp(), buf, in_cnt, ex_cnt, tot_cnt);
    const long long prev = carry_max > ex_max ? carry_max : ex_max;
    const bool any_before = carry_valid + ex_cnt > 0;
    const long long kind = valid ? kinds[sid] : -1;
    if (valid && sid < prev) bad = true;  // segment ids must not decrease
    const bool seg_start = valid && sid != prev;
    const bool first_valid = valid && !any_before;
    if (first_valid && cont && sid == st_cur && kind != kStep) bad = true;  // state's step is no step
    bool prev_has_slot;
    if (any_before) {
      prev_has_slot = prev >= 0 && prev < S && kinds[prev] == kStep;
    } else {
      prev_has_slot = cont != 0;
    }
    const bool fold = seg_start && prev_has_slot;
    const bool slot_start = valid && kind == kStep && (seg_start || (first_valid && !cont));
    long long in_p, ex_p, tot_p;
    block_scan<N>((static_cast<long long>(fold) << 32) | static_cast<long long>(slot_start), 0LL, SumOp(), buf,
                  in_p, ex_p, tot_p);
    if (in) {
      const long long f = carry_f + (in_p >> 32), n = carry_n + (in_p & 0xffffffffLL);
      int32_t slot = -1, ver = -1;
      if (valid && kind == kStep) {
        const long long s = cont + n - 1;
        if (s >= 0 && s < ns_max) {
          slot = static_cast<int32_t>(s);
        } else {
          bad = true;
        }
      }
      if (valid && kind != kQuestion && st_done + f >= 1) {
        if (f > ns_max) bad = true;
        ver = static_cast<int32_t>(f < ns_max ? f : ns_max);
      }
      a.tok_slot[b * T + i] = slot;
      a.tok_ver[b * T + i] = ver;
      if (slot >= 0) {
        atomicAdd(reinterpret_cast<unsigned long long*>(count + slot), 1ull);
        atomicMin(first + slot, static_cast<int32_t>(i));
        atomicMax(last + slot, static_cast<int32_t>(i));
      }
    }
    carry_max = carry_max > tot_max ? carry_max : tot_max;
    carry_valid += tot_cnt;
    carry_f += tot_p >> 32;
    carry_n += tot_p & 0xffffffffLL;
  }
  if (bad) atomicOr(a.err, 1);
  __syncthreads();  // slot counts / ranges complete
  if (tid == 0) {
    long long ns = cont + carry_n, nf = carry_f;
    if (ns > ns_max || nf > ns_max) {
      atomicOr(a.err, 1);
      ns = ns < ns_max ? ns : ns_max;
      nf = nf < ns_max ? nf : ns_max;
    }
    long long cur_slot;
    if (carry_valid == 0) {
      cur_slot = cont ? 0 : -1;
    } else {
      cur_slot = (carry_max >= 0 && carry_max < S && kinds[carry_max] == kStep) ? ns - 1 : -1;
    }
    int64_t* info = a.info + b * kInfoLen;
    info[kCont] = cont;
    info[kSlots] = ns;
    info[kFolds] = nf;
    info[kCurSlot] = cur_slot;
    info[kEndSeg] = carry_max;
    info[kEndTokens] = cur_slot >= 0 ? count[cur_slot] : 0;
    info[kEndCompleted] = st_done + nf;
    info[kCompleted0] = st_done;
  }
  __syncthreads();  // the summary is visible to the whole block
}

// ---------------------------------------------------------------- per-element pieces

// Sum of h[b, t, d] over the tokens t of slot s, in token order (the CPU's order).
template <typename scalar_t, typename acc_t>
__device__ acc_t slot_sum(const Args<scalar_t, acc_t>& a, int64_t b, int64_t s, int64_t d, bool cont) {
  acc_t acc = (s == 0 && cont) ? static_cast<acc_t>(a.state_s[b * a.D + d]) : acc_t(0);
  const int32_t first = a.slot_first[b * a.ns_max + s], last = a.slot_last[b * a.ns_max + s];
  const int32_t* tok_slot = a.tok_slot + b * a.T;
  const scalar_t* x = a.h + b * a.T * a.D + d;
  constexpr int U = 8;  // loads issued ahead; the adds stay in order
  for (int64_t i = first; i <= last; i += U) {
    acc_t v[U];
    bool take[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = i + u;
      take[u] = t <= last && tok_slot[t] == s;
      v[u] = take[u] ? static_cast<acc_t>(x[t * a.D]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (take[u]) acc = add_rn(acc, v[u]);
    }
  }
  return acc;
}

// The momentum versions of element d: moms[b, 0] = state (or 0), moms[b, v + 1] = fold of slot v.
template <typename scalar_t, typename acc_t>
__device__ void fold_element(const Args<scalar_t, acc_t>& a, int64_t b, int64_t d, int64_t nf, int64_t completed0) {
  const int64_t nv = a.ns_max + 1;
  acc_t m = a.state_m != nullptr ? static_cast<acc_t>(a.state_m[b * a.D + d]) : acc_t(0);
  acc_t* moms = a.moms + b * nv * a.D + d;
  moms[0] = m;
  for (int64_t v = 0; v < nf; ++v) {
    const acc_t inv = rcp_rn(static_cast<acc_t>(a.slot_count[b * a.ns_max + v]));
    const acc_t mean = mul_rn(a.sums[(b * a.ns_max + v) * a.D + d], inv);
    m = (completed0 + v == 0) ? mean : add_rn(mul_rn(a.beta, m), mul_rn(a.one_minus_beta, mean));
    moms[(v + 1) * a.D] = m;
  }
}

// Sum of squares of x[0, n) in the CPU kernel's order (sum_squares with 16 lanes), by the 16
// threads of a half-warp (l = 0..15); every one of them returns the total.
template <typename T, typename acc_t>
__device__ acc_t sum_squares_16(const T* x, int64_t n, int l) {
  const unsigned mask = 0xffffu << (threadIdx.x & 16);
  const int64_t full = (n / 16) * 16;
  acc_t part = 0;
  for (int64_t i = l; i < full; i += 16) {
    const acc_t v = static_cast<acc_t>(x[i]);
    part = add_rn(part, mul_rn(v, v));
  }
  acc_t total = 0;
  for (int64_t i = full; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    total = add_rn(total, mul_rn(v, v));
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) total = add_rn(total, __shfl_sync(mask, part, k, 16));
  return total;
}

template <typename scalar_t, typename acc_t>
__device__ void norm_version(const Args<scalar_t, acc_t>& a, int64_t b, int64_t v, int l) {
  const int64_t nv = a.ns_max + 1;
  const acc_t ss = sum_squares_16<acc_t, acc_t>(a.moms + (b * nv + v) * a.D, a.D, l);
  if (l == 0) a.mom_norm[b * nv + v] = sqrt_rn(ss);
}

// Token i of row b, by a half-warp (l = 0..15).
template <typename scalar_t, typename acc_t>
__device__ void apply_token(const Args<scalar_t, acc_t>& a, int64_t b, int64_t i, int l) {
  const int64_t D = a.D, nv = a.ns_max + 1;
  const scalar_t* x = a.h + (b * a.T + i) * D;
  scalar_t* y = a.out + (b * a.T + i) * D;
  const int32_t v = a.tok_ver[b * a.T + i];
  const acc_t mn = v >= 0 ? a.mom_norm[b * nv + v] : acc_t(0);
  if (v < 0 || !(mn > acc_t(0)) || a.gamma == acc_t(0)) {
    for (int64_t j = l; j < D; j += 16) y[j] = x[j];
    return;
  }
  const acc_t coef = div_rn(mul_rn(a.gamma, sqrt_rn(sum_squares_16<scalar_t, acc_t>(x, D, l))), mn);
  const acc_t* m = a.moms + (b * nv + v) * D;
  for (int64_t j = l; j < D; j += 16) {
    y[j] = static_cast<scalar_t>(add_rn(static_cast<acc_t>(x[j]), mul_rn(coef, m[j])));
  }
}

// ---------------------------------------------------------------- kernels

// Whole chunk of one row per CTA (chunks of at most kFusedMaxT tokens: decode).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFusedThreads) fused_kernel(Args<scalar_t, acc_t> a) {
  const int64_t b = blockIdx.x;
  plan_row<kFusedThreads>(a, b);
  const int64_t* info = a.info + b * kInfoLen;
  const int64_t ns = info[kSlots], nf = info[kFolds], completed0 = info[kCompleted0];
  const bool cont = info[kCont] != 0;
  for (int64_t d = threadIdx.x; d < a.D; d += kFusedThreads) {
    for (int64_t s = 0; s < ns; ++s) a.sums[(b * a.ns_max + s) * a.D + d] = slot_sum(a, b, s, d, cont);
    fold_element(a, b, d, nf, completed0);  // reads only this thread's sums
  }
  __syncthreads();
  const int hw = threadIdx.x / 16, l = threadIdx.x % 16;
  for (int64_t v = hw; v <= nf; v += kFusedThreads / 16) norm_version(a, b, v, l);
  __syncthreads();
  for (int64_t i = hw; i < a.T; i += kFusedThreads / 16) apply_token(a, b, i, l);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(Args<scalar_t, acc_t> a) {
  plan_row<kPlanThreads>(a, blockIdx.x);
}

// grid.x = B * d_blocks, grid.y strides over the slots.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sums_kernel(Args<scalar_t, acc_t> a, int64_t d_blocks) {
  if (*a.err) return;
  const int64_t b = blockIdx.x / d_blocks, d = (blockIdx.x % d_blocks) * kThreads + threadIdx.x;
  if (d >= a.D) return;
  const int64_t* info = a.info + b * kInfoLen;
  const int64_t ns = info[kSlots];
  const bool cont = info[kCont] != 0;
  for (int64_t s = blockIdx.y; s < ns; s += gridDim.y) a.sums[(b * a.ns_max + s) * a.D + d] = slot_sum(a, b, s, d, cont);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fold_kernel(Args<scalar_t, acc_t> a, int64_t d_blocks) {
  if (*a.err) return;
  const int64_t b = blockIdx.x / d_blocks, d = (blockIdx.x % d_blocks) * kThreads + threadIdx.x;
  if (d >= a.D) return;
  const int64_t* info = a.info + b * kInfoLen;
  fold_element(a, b, d, info[kFolds], info[kCompleted0]);
}

// A half-warp per (row, version).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) norms_kernel(Args<scalar_t, acc_t> a) {
  if (*a.err) return;
  const int64_t nv = a.ns_max + 1;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kHalfWarps + threadIdx.x / 16;
  if (w >= a.B * nv) return;
  const int64_t b = w / nv, v = w % nv;
  if (v > a.info[b * kInfoLen + kFolds]) return;
  norm_version(a, b, v, threadIdx.x % 16);
}

// A half-warp per token.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) apply_kernel(Args<scalar_t, acc_t> a) {
  if (*a.err) return;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kHalfWarps + threadIdx.x / 16;
  if (w >= a.B * a.T) return;
  apply_token(a, w / a.T, w % a.T, threadIdx.x % 16);
}

// Decode: the new state (last momentum version, the current step's sum, counters), written
// only when no row of the call failed a check.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) commit_kernel(Args<scalar_t, acc_t> a, int64_t d_blocks, float* m_out,
                                                          float* s_out, int64_t* c_out) {
  if (*a.err) return;
  const int64_t b = blockIdx.x / d_blocks, d = (blockIdx.x % d_blocks) * kThreads + threadIdx.x;
  const int64_t* info = a.info + b * kInfoLen;
  if (blockIdx.x % d_blocks == 0 && threadIdx.x == 0) {
    c_out[b * 3 + 0] = info[kEndSeg];
    c_out[b * 3 + 1] = info[kEndTokens];
    c_out[b * 3 + 2] = info[kEndCompleted];
  }
  if (d >= a.D) return;
  const int64_t nf = info[kFolds], cur = info[kCurSlot];
  m_out[b * a.D + d] = static_cast<float>(a.moms[(b * (a.ns_max + 1) + nf) * a.D + d]);
  s_out[b * a.D + d] = cur >= 0 ? static_cast<float>(a.sums[(b * a.ns_max + cur) * a.D + d]) : 0.f;
}

// ---------------------------------------------------------------- host side

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

void check_inputs(const char* op, const at::Tensor& h, const at::Tensor& seg_ids, const at::Tensor& seg_kinds,
                  double beta, double gamma) {
  TORCH_CHECK(h.dim() == 3 && h.is_cuda(), op, ": the CUDA kernel got h of shape ", h.sizes(), " on ", h.device());
  check_momentum_arguments(op, h, seg_ids, seg_kinds, beta, gamma);
  // positions and slots are int32 on the device
  TORCH_CHECK(h.size(1) < INT_MAX && seg_kinds.size(1) < INT_MAX, op, ": at most ", INT_MAX - 1,
              " tokens and segments per call, got T = ", h.size(1), ", S = ", seg_kinds.size(1));
}

// One chunk for all rows; state tensors (contiguous, fp32 / int64) are null for the prefill op.
template <typename scalar_t>
void run_chunk(const at::Tensor& h, const at::Tensor& seg_ids, const at::Tensor& seg_kinds, double beta,
               double gamma, at::Tensor& out, at::Tensor* m, at::Tensor* s, at::Tensor* c, at::Tensor& err) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2), S = seg_kinds.size(1);
  const int64_t ns_max = 1 + std::min(T, S);
  const int64_t nv = ns_max + 1;
  auto stream = at::cuda::getCurrentCUDAStream();

  // int scratch in one allocation: info, slot counts (int64), slot ranges and per-token plan (int32)
  const int64_t n64 = B * kInfoLen + B * ns_max, n32 = 2 * B * ns_max + 2 * B * T;
  at::Tensor ibuf = at::empty({n64 + ceil_div(n32, 2)}, h.options().dtype(at::kLong));
  at::Tensor fbuf = at::empty({B * ns_max * D + B * nv * D + B * nv},
                              h.options().dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
  Args<scalar_t, acc_t> a;
  a.h = h.data_ptr<scalar_t>();
  a.out = out.data_ptr<scalar_t>();
  a.seg = seg_ids.data_ptr<int64_t>();
  a.kinds = seg_kinds.data_ptr<int64_t>();
  a.B = B, a.T = T, a.D = D, a.S = S;
  a.state_m = m != nullptr ? m->data_ptr<float>() : nullptr;
  a.state_s = s != nullptr ? s->data_ptr<float>() : nullptr;
  a.state_c = c != nullptr ? c->data_ptr<int64_t>() : nullptr;
  // the CPU kernel's scalars: beta, 1 - beta and gamma rounded to acc_t first
  a.beta = static_cast<acc_t>(beta);
  a.one_minus_beta = acc_t(1) - a.beta;
  a.gamma = static_cast<acc_t>(gamma);
  a.ns_max = ns_max;
  int64_t* i64 = ibuf.data_ptr<int64_t>();
  a.info = i64;
  a.slot_count = i64 + B * kInfoLen;
  int32_t* i32 = reinterpret_cast<int32_t*>(i64 + n64);
  a.slot_first = i32;
  a.slot_last = i32 + B * ns_max;
  a.tok_slot = i32 + 2 * B * ns_max;
  a.tok_ver = i32 + 2 * B * ns_max + B * T;
  acc_t* f = fbuf.data_ptr<acc_t>();
  a.sums = f;
  a.moms = f + B * ns_max * D;
  a.mom_norm = f + B * ns_max * D + B * nv * D;
  a.err = err.data_ptr<int>();

  if (T <= kFusedMaxT) {
    fused_kernel<scalar_t, acc_t><<<B, kFusedThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    plan_kernel<scalar_t, acc_t><<<B, kPlanThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t d_blocks = ceil_div(D, kThreads);
    if (D > 0) {
      const dim3 grid(B * d_blocks, std::min<int64_t>(ns_max, 65535));
      sums_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(a, d_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fold_kernel<scalar_t, acc_t><<<B * d_blocks, kThreads, 0, stream>>>(a, d_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    norms_kernel<scalar_t, acc_t><<<ceil_div(B * nv, kHalfWarps), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    apply_kernel<scalar_t, acc_t><<<ceil_div(B * T, kHalfWarps), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (m != nullptr) {
    const int64_t d_blocks = std::max<int64_t>(1, ceil_div(D, kThreads));  // >= 1: counters even when D = 0
    commit_kernel<scalar_t, acc_t><<<B * d_blocks, kThreads, 0, stream>>>(a, d_blocks, m->data_ptr<float>(),
                                                                          s->data_ptr<float>(),
                                                                          c->data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor run(const at::Tensor& h_in, const at::Tensor& seg_in, const at::Tensor& kinds_in,
               double beta, double gamma, at::Tensor* momentum, at::Tensor* step_sum, at::Tensor* counters) {
  const at::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous(), seg_ids = seg_in.contiguous(), seg_kinds = kinds_in.contiguous();
  at::Tensor out = at::empty_like(h, at::MemoryFormat::Contiguous);
  const int64_t B = h.size(0);
  if (B == 0) return out;
  // Work on contiguous state; copied back at the end when the caller's tensors are strided.
  at::Tensor m, s, c;
  if (momentum != nullptr) m = momentum->contiguous(), s = step_sum->contiguous(), c = counters->contiguous();
  at::Tensor err = at::zeros({1}, h.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "step_momentum_cuda", [&] {
    run_chunk<scalar_t>(h, seg_ids, seg_kinds, beta, gamma, out, momentum ? &m : nullptr,
                        momentum ? &s : nullptr, momentum ? &c : nullptr, err);
  });
  // Bad data is a device-side assert (after the commit kernel left the state as it was): no
  // device-to-host copy per call (device_checks.cuh).
  device_checks::check_momentum_flag(err.data_ptr<int>(), momentum != nullptr, at::cuda::getCurrentCUDAStream());
  if (momentum != nullptr) {
    if (!m.is_same(*momentum)) momentum->copy_(m);
    if (!s.is_same(*step_sum)) step_sum->copy_(s);
    if (!c.is_same(*counters)) counters->copy_(c);
  }
  return out;
}

at::Tensor step_momentum_cuda(const at::Tensor& h, const at::Tensor& seg_ids, const at::Tensor& seg_kinds,
                              double beta, double gamma) {
  check_inputs("step_momentum", h, seg_ids, seg_kinds, beta, gamma);
  return run(h, seg_ids, seg_kinds, beta, gamma, nullptr, nullptr, nullptr);
}

at::Tensor step_momentum_decode_cuda(const at::Tensor& h, const at::Tensor& seg_ids, const at::Tensor& seg_kinds,
                                     at::Tensor& momentum, at::Tensor& step_sum, at::Tensor& counters, double beta,
                                     double gamma) {
  check_inputs("step_momentum_decode_", h, seg_ids, seg_kinds, beta, gamma);
  check_momentum_state(h, momentum, step_sum, counters);
  return run(h, seg_ids, seg_kinds, beta, gamma, &momentum, &step_sum, &counters);
}

}  // namespace

TORCH_LIBRARY_IMPL(stepflow, CUDA, m) {
  m.impl("step_momentum", &step_momentum_cuda);
  m.impl("step_momentum_decode_", &step_momentum_decode_cuda);
}

}  // namespace stepflow
