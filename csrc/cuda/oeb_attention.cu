// Odds-Equal Bridge attention on CUDA (design.md 2.3; backward: docs/method.md section 3.1).
//
// Same semantics and checks as csrc/cpu/oeb_attention.cpp. For one query row (batch b, head h,
// query i at key position Tk - Tq + i) the allowed keys [kv, end) split into three contiguous
// ranges (CPU numbering): group 0 = [kv, a) never rescaled (the sinks; every key when the row is
// not rebalanced), group 1 = [a, bnd) X, group 2 = [bnd, end) C.
//
// Forward (flash-attention style). A CTA owns a block of "packed rows" of one (batch, kv head):
// row r is query i = r % Tq of query head h = kv_head * G + r / Tq, so all query heads that
// share a kv head (GQA) read each K/V tile once. K and V tiles are staged in shared memory. Per
// row the kernel keeps three online-softmax states (running max m_g, sum l_g), one per key
// group, so each group's log-mass L_g = m_g + log l_g is exact even when p_X underflows fp32
// (docs/method.md 3.1.2). Accumulators U_X and U_C live in registers; the sink group (at most
// num_sink keys, the same key range for every row of a batch entry) only keeps (m, l) in the
// loop and its U is recomputed in the epilogue once lse is known. The epilogue is the per-row
// rebalance
//     out = (U_0 + r_X U_X + r_C U_C) / Z,
// done in double from the group log-masses, with each group scaled by
// exp(m_g + log r_g - lse) = p'_g / l_g <= 1, so nothing overflows however large r_X is.
//
// Two implementations of that row kernel:
//   - tensor cores (bf16 / fp16, d <= 128, head dim bucket 64 or 128, 16-byte aligned rows):
//     each warp owns 16 rows, S = Q K^T and P V are warp-level m16n8k16 mma.sync products with
//     fp32 accumulation, P goes from the S accumulators to the A operand in registers (as in
//     flash-attention 2); K / V tiles are double buffered with cp.async; 1 warp per CTA for a
//     few rows (decode), else 4;
//   - scalar FMA (fp32 inputs, whose 2e-5 test tolerance rules out tf32; any dtype with
//     128 < d <= 256 or unaligned rows): fp32 tiles in shared memory, 8 lanes per row, float4
//     dot products.
//
// Decode (few rows against a long KV cache): split-KV. Several CTAs per row block each take a
// contiguous chunk of key tiles and write per-group partial states (m, l, U_X, U_C); a second
// kernel merges them (one warp per row) and runs the same epilogue.
//
// Backward (docs/method.md 3.1.3.4): dS_ij = A'_ij (dP_ij - c~_g), A'_ij = exp(s_ij - shift_g),
// shift_g = lse - log r_g. (1) The row kernel in "rows" mode recomputes the group states and,
// in its epilogue, D_g (mean of dP_j = dO . v_j under A over group g), the rebalance and
// (shift_g, c~_g) per row (6 floats, shift in log2 units). (2) Tensor cores: a kernel per (batch, kv head, block of
// 64 keys) whose warps own 16 keys each and accumulate dK, dV in registers over all query
// blocks of all query heads of the kv head (no atomics); dQ goes through fp32 atomics into a
// (B, H, Tq, d) buffer that is cast at the end. Scalar path: the same dK / dV kernel shape with
// 16 keys per CTA, and dQ from a separate row kernel (no atomics).
//
// Nothing is T x T: shared memory holds tiles, global scratch is O(rows x d).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace stepflow {
namespace {

using at::Tensor;

constexpr unsigned kFull = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.69314718055994530942;
constexpr int kRowFields = 6;  // per-row backward record: shift_g (3, log2 units), c~_g (3)

// Epilogue modes of the row kernel.
constexpr int kModeOut = 0;      // write out, lse, stats
constexpr int kModePartial = 1;  // split-KV: write per-group partial states, merged by oeb_combine_kernel
constexpr int kModeRows = 2;     // backward pass 1: write (shift_g, c~_g) per row

// ------------------------------------------------------------------------- element conversions

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ------------------------------------------------------------------- warp-level matrix products
//
// One m16n8k16 product C (16x8, fp32) += A (16x16) * B (16x8) per warp, with the register layout
// of PTX mma.sync.m16n8k16 (lane = 4 * grp + tig):
//   A: rows grp and grp + 8, columns 2 tig, 2 tig + 1 (regs 0, 1) and 8 + 2 tig, 9 + 2 tig (2, 3)
//   B: rows (k) 2 tig, 2 tig + 1 and 8 + 2 tig, 9 + 2 tig, column (n) grp
//   C: c[0], c[1] = (grp, 2 tig), (grp, 2 tig + 1); c[2], c[3] = (grp + 8, 2 tig), (grp + 8, 2 tig + 1)
// Operands come from shared memory tiles stored row-major with leading dimension ld:
//   load_a(s, row0, k0):         A[r][k] = s[(row0 + r) * ld + k0 + k]
//   load_b_nmajor(s, n0, k0):    B[k][n] = s[(n0 + n) * ld + k0 + k]   (e.g. K for Q K^T)
//   load_b_kmajor(s, k0, n0):    B[k][n] = s[(k0 + k) * ld + n0 + n]   (e.g. V for P V)
// or from two C tiles (a_from_c: the k = 0..7 and k = 8..15 halves), which is how P = exp(S)
// computed in registers becomes the A operand of P V without a trip through shared memory.

template <typename Elem>  // __half or __nv_bfloat16: tensor cores
struct Mma16 {
  static constexpr bool kBf16 = std::is_same_v<Elem, __nv_bfloat16>;
  struct A {
    uint32_t x[4];
  };
  struct B {
    uint32_t x[2];
  };

  static __device__ __forceinline__ uint32_t ld32(const Elem* p) { return *reinterpret_cast<const uint32_t*>(p); }
  static __device__ __forceinline__ uint32_t pack_bits(const Elem* lo, const Elem* hi) {
    const uint32_t l = *reinterpret_cast<const unsigned short*>(lo);
    const uint32_t h = *reinterpret_cast<const unsigned short*>(hi);
    return l | (h << 16);
  }
  static __device__ __forceinline__ uint32_t pack_f(float lo, float hi) {
    uint32_t u;
    if constexpr (kBf16) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
      memcpy(&u, &v, 4);
    } else {
      const __half2 v = __floats2half2_rn(lo, hi);
      memcpy(&u, &v, 4);
    }
    return u;
  }
  static __device__ __forceinline__ void load_a(A& f, const Elem* s, int ld, int row0, int k0) {
    const int lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
    const Elem* p0 = s + (row0 + grp) * ld + k0 + 2 * tig;
    const Elem* p1 = p0 + 8 * ld;
    f.x[0] = ld32(p0);
    f.x[1] = ld32(p1);
    f.x[2] = ld32(p0 + 8);
    f.x[3] = ld32(p1 + 8);
  }
  static __device__ __forceinline__ void load_b_nmajor(B& f, const Elem* s, int ld, int n0, int k0) {
    const int lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
    const Elem* p = s + (n0 + grp) * ld + k0 + 2 * tig;
    f.x[0] = ld32(p);
    f.x[1] = ld32(p + 8);
  }
  static __device__ __forceinline__ void load_b_kmajor(B& f, const Elem* s, int ld, int k0, int n0) {
    const int lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
    const Elem* p = s + (k0 + 2 * tig) * ld + n0 + grp;
    f.x[0] = pack_bits(p, p + ld);
    f.x[1] = pack_bits(p + 8 * ld, p + 9 * ld);
  }
  static __device__ __forceinline__ void a_from_c(A& f, const float lo[4], const float hi[4]) {
    f.x[0] = pack_f(lo[0], lo[1]);
    f.x[1] = pack_f(lo[2], lo[3]);
    f.x[2] = pack_f(hi[0], hi[1]);
    f.x[3] = pack_f(hi[2], hi[3]);
  }
  static __device__ __forceinline__ void mma(float c[4], const A& a, const B& b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kBf16) {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
    } else {
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
          "{%0,%1,%2,%3};\n"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
    }
#elif defined(__CUDA_ARCH__)
    __trap();  // the host refuses devices below sm_80 before launching
#endif
  }
};

// Sum over the LANES consecutive lanes that share a row (butterfly: every lane gets the same bits).
template <int LANES>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int o = 1; o < LANES; o <<= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}
template <int LANES>
__device__ __forceinline__ double row_sum(double x) {
#pragma unroll
  for (int o = 1; o < LANES; o <<= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}
template <int LANES>
__device__ __forceinline__ float row_max(float x) {
#pragma unroll
  for (int o = 1; o < LANES; o <<= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ int warp_max(int x) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) x = max(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

// Cooperative copy of `rows` rows of a (.., d) row-major 16-bit tensor into a shared tile with
// leading dimension ld and D >= d columns (tensor-core path). row_ptr(r) gives the global row or
// nullptr; missing rows and the columns [d, D) are zero, so padded products add exact zeros
// (never 0 * garbage).
template <typename Elem, int D, typename RowPtr>
__device__ __forceinline__ void load_tile(Elem* s, int ld, int rows, RowPtr row_ptr, int d, bool vec) {
  if (vec) {  // 16-byte chunks: d * sizeof(Elem) % 16 == 0 and 16-byte aligned rows (host checks)
    constexpr int CH = 16 / sizeof(Elem), CPR = D / CH;
    for (int idx = threadIdx.x; idx < rows * CPR; idx += blockDim.x) {
      const int r = idx / CPR, c = (idx % CPR) * CH;
      const Elem* src = row_ptr(r);
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (src != nullptr && c < d) val = *reinterpret_cast<const uint4*>(src + c);
      *reinterpret_cast<uint4*>(s + r * ld + c) = val;
    }
  } else {
    const Elem zero = from_f<Elem>(0.f);
    for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
      const int r = idx / D, c = idx % D;
      const Elem* src = row_ptr(r);
      s[r * ld + c] = (src != nullptr && c < d) ? src[c] : zero;
    }
  }
}

// Asynchronous 16-byte global -> shared copies (cp.async, sm_80+). A copy with valid = false
// reads nothing and fills 16 zero bytes (src-size 0); gmem must still be a valid address.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Issues the copies of `rows` rows (16-bit elements, 16-byte aligned rows of d elements, d a
// multiple of 8) starting at global row `base` into a shared tile; rows >= valid_rows and
// columns [d, D) are zero filled. Completes at cp_async_wait.
template <typename Elem, int D>
__device__ __forceinline__ void load_tile_async(Elem* s, int ld, int rows, const Elem* base, int valid_rows, int d) {
  constexpr int CH = 16 / sizeof(Elem), CPR = D / CH;
  for (int idx = threadIdx.x; idx < rows * CPR; idx += blockDim.x) {
    const int r = idx / CPR, c = (idx % CPR) * CH;
    const bool ok = r < valid_rows && c < d;
    cp_async_16(s + r * ld + c, ok ? base + static_cast<int64_t>(r) * d + c : base, ok);
  }
}

// The same for the scalar path: rows converted to fp32, columns [d, d4) zero (d4 = d rounded up
// to a multiple of 4, the width the float4 loops read). One warp per row, lanes along it.
template <typename Elem, typename RowPtr>
__device__ __forceinline__ void load_rows_f32(float* s, int sd, int rows, RowPtr row_ptr, int d, int d4) {
  const int nw = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int r = threadIdx.x >> 5; r < rows; r += nw) {
    const Elem* src = row_ptr(r);
    for (int c = lane; c < d4; c += 32) s[r * sd + c] = (src != nullptr && c < d) ? to_f(src[c]) : 0.f;
  }
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

// --------------------------------------------------------------------------- row geometry

struct Range {
  int kv, a, bnd, end;  // CPU groups: 0 = [kv, a), 1 = [a, bnd), 2 = [bnd, end)
  bool reb;             // seg_start >= 0: the row may be rebalanced
};

// Query at key position pos, segment start seg (-1: not rebalanced), first valid key kv
// (row_ranges of the CPU kernel).
__device__ __forceinline__ Range make_range(int kv, int64_t seg, int pos, int num_sink) {
  Range r;
  r.kv = kv;
  r.end = max(pos + 1, kv);
  if (seg >= 0) {
    r.a = kv + min(num_sink, r.end - kv);
    r.bnd = max(r.a, seg < r.end ? static_cast<int>(seg) : r.end);
    r.reb = true;
  } else {
    r.a = r.bnd = r.end;
    r.reb = false;
  }
  return r;
}
__device__ __forceinline__ Range empty_range(int kv) { return Range{kv, kv, kv, kv, false}; }

// Accumulation slots of the forward: 0 = sinks (stats only), 1 = X (U_X), 2 = C (U_C). A row
// that is not rebalanced has r = 1 everywhere, so all its keys go to slot 2 (its group 0).
__device__ __forceinline__ void slot_bounds(const Range& r, int lo[3], int hi[3]) {
  lo[0] = r.kv;
  hi[0] = lo[1] = r.reb ? r.a : r.kv;
  hi[1] = lo[2] = r.reb ? r.bnd : r.kv;
  hi[2] = r.end;
}
__device__ __forceinline__ int slot_of(const Range& r, int j) {
  if (j < r.kv || j >= r.end) return -1;
  if (!r.reb) return 2;
  return j < r.a ? 0 : (j < r.bnd ? 1 : 2);
}

// ------------------------------------------------------------------ rebalance (double, per row)

__device__ __forceinline__ double log_add_exp(double x, double y) {
  if (x == -CUDART_INF) return y;
  if (y == -CUDART_INF) return x;
  const double m = fmax(x, y);
  return m + log1p(exp(-fabs(x - y)));
}
__device__ __forceinline__ double softplus(double x) { return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)); }

struct Rebalance {
  double lse;       // log-sum-exp over all allowed keys
  double log_r[3];  // log(p'_g / p_g); 0 for group 0 and rows not locked
  double s;         // o' / (1 + o')
  bool locked;
};

// From the group log-masses L (natural log, -inf for empty groups); as the CPU kernel.
__device__ __forceinline__ Rebalance rebalance(const double L[3], double strength) {
  Rebalance rb;
  rb.lse = log_add_exp(log_add_exp(L[0], L[1]), L[2]);
  rb.log_r[0] = rb.log_r[1] = rb.log_r[2] = 0.0;
  rb.s = 0.0;
  rb.locked = L[1] > -CUDART_INF && L[2] > L[1];  // p_X > 0 and p_C > p_X
  if (rb.locked) {
    const double t = (1.0 - strength) * (L[2] - L[1]);  // log o'
    const double log_m = log_add_exp(L[1], L[2]);      // log (p_C + p_X)
    rb.s = 1.0 / (1.0 + exp(-t));
    rb.log_r[1] = log_m - softplus(t) - L[1];   // p'_X = M / (1 + o')
    rb.log_r[2] = log_m - softplus(-t) - L[2];  // p'_C = M o' / (1 + o')
  }
  return rb;
}

// c~_g = c_g / r_g (docs/method.md 3.1.3.4) from the group means D_g and rebalanced masses pm_g.
__device__ __forceinline__ void backward_scalars(const Rebalance& rb, const double D[3], const double pm[3],
                                                 double strength, double ct[3]) {
  const double delta = pm[0] * D[0] + pm[1] * D[1] + pm[2] * D[2];  // dO_i . out_i
  ct[0] = ct[1] = ct[2] = delta;
  if (!rb.locked) return;
  const double s = rb.s, lam1 = 1.0 - strength, diff = D[2] - D[1];
  const double mix = s * D[2] + (1.0 - s) * D[1];
  const double inv_rx = exp(-rb.log_r[1]), inv_rc = exp(-rb.log_r[2]);
  ct[1] = D[1] + (delta - mix) * inv_rx + lam1 * s * diff;
  ct[2] = D[2] + (delta - mix) * inv_rc - lam1 * (1.0 - s) * diff;
}

// ------------------------------------------------------------------------------ parameters

struct FwdParams {
  const void *q, *k, *v, *dout;  // q, dout (B, H, Tq, d); k, v (B, Hkv, Tk, d); contiguous
  const int64_t *seg, *kv;       // (B, Tq), (B,)
  void* out;                     // (B, H, Tq, d), q's dtype
  float *lse, *stats;            // (B, H, Tq), (B, H, Tq, 2)
  float* rows;                   // (B, H, Tq, 6) backward records
  float* part;                   // split-KV partial states
  int B, H, Hkv, G, Tq, Tk, d, num_sink;
  int mode, tiles_per_split;
  int vec;  // tensor-core path: 16-byte loads allowed
  int sd;   // scalar path: shared row stride in floats
  float scale, scale_log2;
  double strength;
};

struct RowCtx {
  bool active;  // the packed row exists
  int b, h, hk, i;
  Range rr;
};

// Floats per partial record: m[3], l[3], U_X[d], U_C[d].
__host__ __device__ __forceinline__ int64_t part_fields(int d) { return 6 + 2 * static_cast<int64_t>(d); }

// The epilogue of one row, shared by the row kernel (LANES = 4 lanes per row, as in the mma
// layout) and the split-KV merge (LANES = 32). Every lane of the warp must call it together
// (it shuffles); lanes of rows that do not exist pass active = false. The lanes of a row own
// NC columns each, col_at(n) (>= d: padding). m, l: per-slot running max (log2 units of the
// scaled scores) and sum, already summed over the row's lanes; ax, ac: U_X and U_C on the
// owned columns (ax is overwritten; it holds the output at the end). Rows mode: u, when given,
// holds per slot sum_j exp2(s_j - m) dP_j (the scalar path accumulates it from the same dP_j
// as its backward kernels, in double); otherwise D_g comes from dO . U_g and the sinks loop.
template <typename Elem, int LANES, int NC, typename ColAt>
__device__ __forceinline__ void finish_row(const FwdParams& p, const RowCtx& rc, const float m[3], const float l[3],
                                           float (&ax)[NC], const float (&ac)[NC], ColAt col_at,
                                           const double* u = nullptr) {
  const Range& rr = rc.rr;
  const double kInf = CUDART_INF;
  double Ls[3];
#pragma unroll
  for (int s = 0; s < 3; ++s)
    Ls[s] = l[s] > 0.f ? (static_cast<double>(m[s]) + log2(static_cast<double>(l[s]))) * kLn2 : -kInf;
  // Slots to CPU groups: a row that is not rebalanced keeps everything in its group 0.
  const double Lg[3] = {rr.reb ? Ls[0] : Ls[2], rr.reb ? Ls[1] : -kInf, rr.reb ? Ls[2] : -kInf};
  const Rebalance rb = rebalance(Lg, p.strength);
  const bool has_keys = rc.active && rb.lse > -kInf;
  const int d = p.d;
  const int64_t row = (static_cast<int64_t>(rc.b) * p.H + rc.h) * p.Tq + rc.i;
  const int64_t kvrow0 = (static_cast<int64_t>(rc.b) * p.Hkv + rc.hk) * p.Tk;
  const Elem* q = static_cast<const Elem*>(p.q) + row * d;
  const Elem* gout = static_cast<const Elem*>(p.dout) + row * d;  // only read in rows mode
  const Elem* kb = static_cast<const Elem*>(p.k) + kvrow0 * d;
  const Elem* vb = static_cast<const Elem*>(p.v) + kvrow0 * d;
  const bool rows_mode = p.mode == kModeRows;

  float dx = 0.f, dc = 0.f;  // rows mode: dO . U_X, dO . U_C
  if (rows_mode && u == nullptr) {
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int col = col_at(n);
      if (has_keys && col < d) {
        const float g = to_f(gout[col]);
        dx = fmaf(g, ax[n], dx);
        dc = fmaf(g, ac[n], dc);
      }
    }
    dx = row_sum<LANES>(dx);
    dc = row_sum<LANES>(dc);
  } else if (!rows_mode) {
    // p'_g / l_g = exp(m_g + log r_g - lse) <= 1 (slot 2 of a row that is not rebalanced: log r = 0)
    const float cx = (has_keys && l[1] > 0.f)
                         ? static_cast<float>(exp(static_cast<double>(m[1]) * kLn2 + rb.log_r[1] - rb.lse))
                         : 0.f;
    const float cc = (has_keys && l[2] > 0.f)
                         ? static_cast<float>(exp(static_cast<double>(m[2]) * kLn2 + rb.log_r[2] - rb.lse))
                         : 0.f;
#pragma unroll
    for (int n = 0; n < NC; ++n) ax[n] = fmaf(cx, ax[n], cc * ac[n]);
  }

  // The sink group: recompute s_j = scale q . k_j for its (few) keys now that lse is known.
  // The trip count is the warp's maximum so that every lane takes part in the shuffles; all
  // rows of a warp belong to one batch entry, so they share kv and the keys exist.
  const int nsk = (has_keys && rr.reb && u == nullptr) ? rr.a - rr.kv : 0;
  const int nmax = warp_max(nsk);
  double u0 = 0.0;  // rows mode: sum over sinks of exp(s_j - L_0) dO . v_j = D_0
  for (int jo = 0; jo < nmax; ++jo) {
    const int64_t j = rr.kv + jo;
    float dot = 0.f, dg = 0.f;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int col = col_at(n);
      if (has_keys && col < d) {
        dot = fmaf(to_f(q[col]), to_f(kb[j * d + col]), dot);
        if (rows_mode) dg = fmaf(to_f(gout[col]), to_f(vb[j * d + col]), dg);
      }
    }
    dot = row_sum<LANES>(dot);
    if (rows_mode) dg = row_sum<LANES>(dg);
    if (jo < nsk) {
      const double sj = static_cast<double>(dot) * p.scale;
      if (rows_mode) {
        u0 += exp(sj - Lg[0]) * static_cast<double>(dg);
      } else {
        const float w = static_cast<float>(exp(sj - rb.lse));  // A'_j = A_j for sinks
#pragma unroll
        for (int n = 0; n < NC; ++n) {
          const int col = col_at(n);
          if (col < d) ax[n] = fmaf(w, to_f(vb[j * d + col]), ax[n]);
        }
      }
    }
  }

  const bool leader = (threadIdx.x & (LANES - 1)) == 0;
  if (!rows_mode) {
    if (rc.active) {
      Elem* o = static_cast<Elem*>(p.out) + row * d;
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int col = col_at(n);
        if (col < d) o[col] = from_f<Elem>(has_keys ? ax[n] : 0.f);
      }
      if (leader) {
        p.lse[row] = has_keys ? static_cast<float>(rb.lse) : -CUDART_INF_F;
        p.stats[2 * row] = has_keys ? static_cast<float>(exp(Lg[2] - rb.lse)) : 0.f;
        p.stats[2 * row + 1] = has_keys ? static_cast<float>(exp(Lg[1] - rb.lse)) : 0.f;
      }
    }
  } else if (rc.active && leader) {
    float* rec = p.rows + row * kRowFields;
    if (!has_keys) {
      for (int f = 0; f < kRowFields; ++f) rec[f] = 0.f;
    } else {
      // slot means of dP_j = dO . v_j under A
      const double d1 = l[1] > 0.f ? (u ? u[1] : dx) / static_cast<double>(l[1]) : 0.0;
      const double d2 = l[2] > 0.f ? (u ? u[2] : dc) / static_cast<double>(l[2]) : 0.0;
      if (u) u0 = l[0] > 0.f ? u[0] / static_cast<double>(l[0]) : 0.0;
      const double D[3] = {rr.reb ? u0 : d2, rr.reb ? d1 : 0.0, rr.reb ? d2 : 0.0};
      double pm[3], ct[3];
#pragma unroll
      for (int g = 0; g < 3; ++g) pm[g] = Lg[g] > -kInf ? exp(Lg[g] + rb.log_r[g] - rb.lse) : 0.0;
      backward_scalars(rb, D, pm, p.strength, ct);
#pragma unroll
      for (int g = 0; g < 3; ++g) {
        rec[g] = static_cast<float>((rb.lse - rb.log_r[g]) * kLog2e);  // shift_g, log2 units
        rec[3 + g] = static_cast<float>(ct[g]);
      }
    }
  }
}

// --------------------------------------------------------------------- forward row kernels

// The packed rows of a block and the keys they need. Row r of (batch, kv head) is query
// r % Tq of head kv_head * G + r / Tq; the keys needed are [kv, kend), kend one past the
// largest query position of the block.
struct BlockRows {
  int b, hk, bk, r0, R, kvb, kend;
};
__device__ __forceinline__ BlockRows block_rows(const FwdParams& p, int bm) {
  BlockRows br;
  br.R = p.G * p.Tq;
  const int nrb = (br.R + bm - 1) / bm;
  br.bk = blockIdx.x / nrb;
  br.r0 = (nrb - 1 - static_cast<int>(blockIdx.x % nrb)) * bm;  // long (late) blocks first
  br.b = br.bk / p.Hkv, br.hk = br.bk % p.Hkv;
  br.kvb = static_cast<int>(p.kv[br.b]);
  const int r_last = min(br.r0 + bm, br.R) - 1;
  const int i_max = (br.r0 / p.Tq == r_last / p.Tq) ? r_last % p.Tq : p.Tq - 1;
  br.kend = max(p.Tk - p.Tq + i_max + 1, br.kvb);
  return br;
}
__device__ __forceinline__ RowCtx row_ctx(const FwdParams& p, const BlockRows& br, int r) {
  RowCtx c;
  c.active = r < br.R;
  c.b = br.b, c.hk = br.hk;
  c.h = br.hk * p.G + (c.active ? r / p.Tq : 0);
  c.i = c.active ? r % p.Tq : 0;
  c.rr = c.active ? make_range(br.kvb, p.seg[static_cast<int64_t>(br.b) * p.Tq + c.i], p.Tk - p.Tq + c.i, p.num_sink)
                  : empty_range(br.kvb);
  return c;
}
// Key tiles [t_begin, t_end) of this CTA (all of them, or its split-KV chunk).
__device__ __forceinline__ void tile_range(const FwdParams& p, const BlockRows& br, int bn, int& t_begin, int& t_end) {
  const int ntiles = (br.kend - br.kvb + bn - 1) / bn;
  t_begin = 0, t_end = ntiles;
  if (p.mode == kModePartial) {
    t_begin = blockIdx.y * p.tiles_per_split;
    t_end = min(ntiles, t_begin + p.tiles_per_split);
  }
}
// Split-KV record of one row: m[3], l[3], then U_X and U_C on the columns this lane owns.
__device__ __forceinline__ float* part_record(const FwdParams& p, const BlockRows& br, int r) {
  return p.part + ((static_cast<int64_t>(blockIdx.y) * p.B * p.Hkv + br.bk) * br.R + r) * part_fields(p.d);
}

// Tensor-core path (bf16 / fp16, head dim bucket D = 64 or 128, 16-byte aligned rows). blockDim =
// 32 nw, nw = 1 (few rows: decode) or 4; each warp owns 16 packed rows. K and V tiles are double
// buffered: the copies of tile t + 1 (cp.async) run while tile t is multiplied.
template <int D>
struct MmaFwdCfg {
  static constexpr int BN = D <= 64 ? 64 : 32;  // keys per tile (32 at D = 128 keeps two U's in registers)
  static constexpr int LD = D + 8;              // padded rows: conflict-free fragment loads
  static constexpr int kMinBlocks = 2;
  static size_t smem(int nw) { return size_t(16 * nw + 4 * BN) * LD * 2; }  // Q, then K, V twice
};

// acc[n] += P_slot V over one K/V tile, P_slot = the tile's probabilities masked to one slot
// (bit nt * 4 + e of mask: element e of column tile nt).
template <typename Elem, int D, int BN>
__device__ __forceinline__ void pv_accumulate(float (&acc)[D / 8][4], const float (&pr)[BN / 8][4], uint32_t mask,
                                              const Elem* sV, int ld) {
  using O = Mma16<Elem>;
#pragma unroll
  for (int kc = 0; kc < BN / 16; ++kc) {
    float lo[4], hi[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      lo[e] = (mask >> (8 * kc + e)) & 1u ? pr[2 * kc][e] : 0.f;
      hi[e] = (mask >> (8 * kc + 4 + e)) & 1u ? pr[2 * kc + 1][e] : 0.f;
    }
    typename O::A fa;
    O::a_from_c(fa, lo, hi);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      typename O::B fb;
      O::load_b_kmajor(fb, sV, ld, kc * 16, n * 8);
      O::mma(acc[n], fa, fb);
    }
  }
}

template <typename Elem, int D>
__global__ void __launch_bounds__(128, MmaFwdCfg<D>::kMinBlocks) oeb_fwd_mma_kernel(const FwdParams p) {
  using O = Mma16<Elem>;
  using Cfg = MmaFwdCfg<D>;
  constexpr int BN = Cfg::BN, LD = Cfg::LD, NTN = BN / 8, ND = D / 8;
  static_assert(NTN * 4 <= 32, "the slot masks hold one bit per score of a thread");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int BM = 16 * static_cast<int>(blockDim.x >> 5);
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* sKV = sQ + BM * LD;  // buffer b: K at sKV + 2 b BN LD, V right after it

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  const BlockRows br = block_rows(p, BM);
  int t_begin, t_end;
  tile_range(p, br, BN, t_begin, t_end);
  const RowCtx rc[2] = {row_ctx(p, br, br.r0 + warp * 16 + grp), row_ctx(p, br, br.r0 + warp * 16 + grp + 8)};

  const Elem* q = static_cast<const Elem*>(p.q);
  const Elem* kbase = static_cast<const Elem*>(p.k) + static_cast<int64_t>(br.bk) * p.Tk * p.d;
  const Elem* vbase = static_cast<const Elem*>(p.v) + static_cast<int64_t>(br.bk) * p.Tk * p.d;
  const int d = p.d, kend = br.kend;
  load_tile<Elem, D>(
      sQ, LD, BM,
      [&](int rr) -> const Elem* {
        const int r = br.r0 + rr;
        if (r >= br.R) return nullptr;
        const int64_t h = static_cast<int64_t>(br.hk) * p.G + r / p.Tq;
        return q + ((static_cast<int64_t>(br.b) * p.H + h) * p.Tq + r % p.Tq) * d;
      },
      d, /*vec=*/true);
  auto issue_tile = [&](int tile, int buf) {
    const int j0 = br.kvb + tile * BN;
    Elem* sKb = sKV + 2 * buf * BN * LD;
    load_tile_async<Elem, D>(sKb, LD, BN, kbase + static_cast<int64_t>(j0) * d, kend - j0, d);
    load_tile_async<Elem, D>(sKb + BN * LD, LD, BN, vbase + static_cast<int64_t>(j0) * d, kend - j0, d);
    cp_async_commit();
  };

  float m[2][3], l[2][3];
#pragma unroll
  for (int rho = 0; rho < 2; ++rho)
#pragma unroll
    for (int s = 0; s < 3; ++s) m[rho][s] = -CUDART_INF_F, l[rho][s] = 0.f;
  float accX[ND][4], accC[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) accX[n][e] = accC[n][e] = 0.f;

  if (t_begin < t_end) issue_tile(t_begin, 0);
  for (int tile = t_begin; tile < t_end; ++tile) {
    const int j0 = br.kvb + tile * BN, buf = (tile - t_begin) & 1;
    if (tile + 1 < t_end) {
      issue_tile(tile + 1, buf ^ 1);  // its buffer was released by the barrier ending the last step
      cp_async_wait<1>();             // this thread's copies of `tile` are done
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // everyone's copies of `tile` (and sQ, first time) are visible
    const Elem* sK = sKV + 2 * buf * BN * LD;
    const Elem* sV = sK + BN * LD;

    // Which slots does this tile touch for any row of the warp (warp-uniform)?
    bool has[3] = {false, false, false};
#pragma unroll
    for (int rho = 0; rho < 2; ++rho) {
      int lo[3], hi[3];
      slot_bounds(rc[rho].rr, lo, hi);
#pragma unroll
      for (int s = 0; s < 3; ++s) has[s] = has[s] || (max(lo[s], j0) < min(hi[s], j0 + BN));
    }
    const bool any0 = __any_sync(kFull, has[0]), any1 = __any_sync(kFull, has[1]), any2 = __any_sync(kFull, has[2]);
    if (any0 || any1 || any2) {  // else e.g. above the causal diagonal for this warp
      const bool any[3] = {any0, any1, any2};

      // S = Q K^T for the warp's 16 rows, then in log2 units of the scaled scores.
      float sc[NTN][4];
#pragma unroll
      for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        typename O::A fa;
        O::load_a(fa, sQ, LD, warp * 16, kk * 16);
#pragma unroll
        for (int nt = 0; nt < NTN; ++nt) {
          typename O::B fb;
          O::load_b_nmajor(fb, sK, LD, nt * 8, kk * 16);
          O::mma(sc[nt], fa, fb);
        }
      }
      // Slot of every score: bit nt * 4 + e of mask[slot]; element e is row grp + 8 (e >> 1),
      // key j0 + nt * 8 + 2 tig + (e & 1).
      uint32_t mask[3] = {0u, 0u, 0u};
#pragma unroll
      for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[nt][e] *= p.scale_log2;
          const int s = slot_of(rc[e >> 1].rr, j0 + nt * 8 + 2 * tig + (e & 1));
          const uint32_t bit = 1u << (nt * 4 + e);
          if (s == 0) mask[0] |= bit;
          if (s == 1) mask[1] |= bit;
          if (s == 2) mask[2] |= bit;
        }
      // Online softmax per slot: new running max, rescale what was accumulated under the old one.
#pragma unroll
      for (int rho = 0; rho < 2; ++rho)
#pragma unroll
        for (int s = 0; s < 3; ++s) {
          if (!any[s]) continue;  // warp-uniform
          float mx = -CUDART_INF_F;
#pragma unroll
          for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2)
              if ((mask[s] >> (nt * 4 + 2 * rho + e2)) & 1u) mx = fmaxf(mx, sc[nt][2 * rho + e2]);
          mx = row_max<4>(mx);
          const float m_new = fmaxf(m[rho][s], mx);
          const float alpha = m[rho][s] == -CUDART_INF_F ? 0.f : exp2f(m[rho][s] - m_new);
          m[rho][s] = m_new;
          l[rho][s] *= alpha;
          if (s == 1) {
#pragma unroll
            for (int n = 0; n < ND; ++n) accX[n][2 * rho] *= alpha, accX[n][2 * rho + 1] *= alpha;
          }
          if (s == 2) {
#pragma unroll
            for (int n = 0; n < ND; ++n) accC[n][2 * rho] *= alpha, accC[n][2 * rho + 1] *= alpha;
          }
        }
      // P = exp2(s - m_slot) in place (0 outside the allowed keys); per-lane partial sums.
#pragma unroll
      for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rho = e >> 1;
          const uint32_t bit = 1u << (nt * 4 + e);
          const bool in0 = mask[0] & bit, in1 = mask[1] & bit, in2 = mask[2] & bit;
          const float mm = in0 ? m[rho][0] : (in1 ? m[rho][1] : m[rho][2]);
          const float pv = (in0 || in1 || in2) ? exp2f(sc[nt][e] - mm) : 0.f;
          l[rho][0] += in0 ? pv : 0.f;
          l[rho][1] += in1 ? pv : 0.f;
          l[rho][2] += in2 ? pv : 0.f;
          sc[nt][e] = pv;
        }
      // U_X += P_X V, U_C += P_C V (the sinks' U is recomputed in the epilogue).
      if (any1) pv_accumulate<Elem, D, BN>(accX, sc, mask[1], sV, LD);
      if (any2) pv_accumulate<Elem, D, BN>(accC, sc, mask[2], sV, LD);
    }
    __syncthreads();  // everyone is done with `buf` before the next step refills it
  }

#pragma unroll
  for (int rho = 0; rho < 2; ++rho)
#pragma unroll
    for (int s = 0; s < 3; ++s) l[rho][s] = row_sum<4>(l[rho][s]);

  if (p.mode == kModePartial) {
#pragma unroll
    for (int rho = 0; rho < 2; ++rho) {
      if (!rc[rho].active) continue;
      float* rec = part_record(p, br, br.r0 + warp * 16 + grp + 8 * rho);
      if (tig == 0) {
#pragma unroll
        for (int s = 0; s < 3; ++s) rec[s] = m[rho][s], rec[3 + s] = l[rho][s];
      }
#pragma unroll
      for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int col = 8 * n + 2 * tig + e2;
          if (col < d) {
            rec[6 + col] = accX[n][2 * rho + e2];
            rec[6 + d + col] = accC[n][2 * rho + e2];
          }
        }
    }
    return;
  }

#pragma unroll
  for (int rho = 0; rho < 2; ++rho) {
    float ax[D / 4], ac[D / 4];
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) ax[2 * n + e2] = accX[n][2 * rho + e2], ac[2 * n + e2] = accC[n][2 * rho + e2];
    finish_row<Elem, 4, D / 4>(p, rc[rho], m[rho], l[rho], ax, ac,
                               [&](int n) { return 8 * (n >> 1) + 2 * tig + (n & 1); });
  }
}

// Scalar path (fp32 inputs, and any dtype with 128 < d <= 256): 128 threads, 16 packed rows per
// CTA, 8 consecutive lanes per row. Tiles are fp32 in shared memory with row stride p.sd; lane
// l8 of a row scores keys l8 + 8 e of a 32-key tile and owns the output columns 4 (l8 + 8 g) + c.
constexpr int kGenRows = 16, kGenKeys = 32, kGenKeysBwd = 16, kGenCols = 32;

__device__ __forceinline__ int gen_col(int l8, int n) { return 4 * (l8 + 8 * (n >> 2)) + (n & 3); }

// acc += sum over the tile's keys of prow[kk] * V[kk] on the lane's columns.
__device__ __forceinline__ void gen_pv(float (&acc)[kGenCols], const float* prow, const float* sV, int sd, int l8,
                                       int d4) {
  for (int kk = 0; kk < kGenKeys; ++kk) {
    const float pk = prow[kk];
    if (pk == 0.f) continue;
    const float* vr = sV + kk * sd;
#pragma unroll
    for (int g = 0; g < 8; ++g) {
      const int col = 4 * (l8 + 8 * g);
      if (col < d4) {
        const float4 v4 = ld4(vr + col);
        acc[4 * g] = fmaf(pk, v4.x, acc[4 * g]);
        acc[4 * g + 1] = fmaf(pk, v4.y, acc[4 * g + 1]);
        acc[4 * g + 2] = fmaf(pk, v4.z, acc[4 * g + 2]);
        acc[4 * g + 3] = fmaf(pk, v4.w, acc[4 * g + 3]);
      }
    }
  }
}

__device__ __forceinline__ float gen_dot(const float* a, const float* b, int d4) {
  float acc = 0.f;
  for (int c = 0; c < d4; c += 4) acc = dot4(ld4(a + c), ld4(b + c), acc);
  return acc;
}

template <typename Elem>
__global__ void __launch_bounds__(128) oeb_fwd_generic_kernel(const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int sd = p.sd, d = p.d, d4 = (d + 3) & ~3;
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + kGenRows * sd;
  float* sV = sK + kGenKeys * sd;
  float* sPX = sV + kGenKeys * sd;
  float* sPC = sPX + kGenRows * kGenKeys;
  float* sG = sPC + kGenRows * kGenKeys;  // rows mode: dO
  const int rl = threadIdx.x >> 3, l8 = threadIdx.x & 7;
  const bool rows_mode = p.mode == kModeRows;

  const BlockRows br = block_rows(p, kGenRows);
  int t_begin, t_end;
  tile_range(p, br, kGenKeys, t_begin, t_end);
  const RowCtx rc = row_ctx(p, br, br.r0 + rl);
  const Elem* q = static_cast<const Elem*>(p.q);
  const Elem* kbase = static_cast<const Elem*>(p.k) + static_cast<int64_t>(br.bk) * p.Tk * d;
  const Elem* vbase = static_cast<const Elem*>(p.v) + static_cast<int64_t>(br.bk) * p.Tk * d;
  const int kend = br.kend;
  auto packed_row = [&](const Elem* base) {
    return [&, base](int rr) -> const Elem* {
      const int r = br.r0 + rr;
      if (r >= br.R) return nullptr;
      const int64_t h = static_cast<int64_t>(br.hk) * p.G + r / p.Tq;
      return base + ((static_cast<int64_t>(br.b) * p.H + h) * p.Tq + r % p.Tq) * d;
    };
  };
  load_rows_f32<Elem>(sQ, sd, kGenRows, packed_row(q), d, d4);
  if (rows_mode) load_rows_f32<Elem>(sG, sd, kGenRows, packed_row(static_cast<const Elem*>(p.dout)), d, d4);

  float m[3] = {-CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F}, l[3] = {0.f, 0.f, 0.f};
  double u[3] = {0.0, 0.0, 0.0};  // rows mode: per slot sum of exp2(s - m) dP
  float ax[kGenCols], ac[kGenCols];
#pragma unroll
  for (int n = 0; n < kGenCols; ++n) ax[n] = ac[n] = 0.f;
  int lo[3], hi[3];
  slot_bounds(rc.rr, lo, hi);

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int j0 = br.kvb + tile * kGenKeys;
    __syncthreads();
    load_rows_f32<Elem>(
        sK, sd, kGenKeys, [&](int rr) -> const Elem* { return j0 + rr < kend ? kbase + static_cast<int64_t>(j0 + rr) * d : nullptr; },
        d, d4);
    load_rows_f32<Elem>(
        sV, sd, kGenKeys, [&](int rr) -> const Elem* { return j0 + rr < kend ? vbase + static_cast<int64_t>(j0 + rr) * d : nullptr; },
        d, d4);
    __syncthreads();
    bool any[3];
#pragma unroll
    for (int s = 0; s < 3; ++s) any[s] = __any_sync(kFull, max(lo[s], j0) < min(hi[s], j0 + kGenKeys));
    if (!(any[0] || any[1] || any[2])) continue;

    float sc[4];
    int code[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sc[e] = gen_dot(sQ + rl * sd, sK + (l8 + 8 * e) * sd, d4) * p.scale_log2;
      code[e] = slot_of(rc.rr, j0 + l8 + 8 * e);
    }
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      if (!any[s]) continue;  // warp-uniform
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (code[e] == s) mx = fmaxf(mx, sc[e]);
      mx = row_max<8>(mx);
      const float m_new = fmaxf(m[s], mx);
      const float alpha = m[s] == -CUDART_INF_F ? 0.f : exp2f(m[s] - m_new);
      m[s] = m_new;
      l[s] *= alpha;
      u[s] *= alpha;
      if (s == 1) {
#pragma unroll
        for (int n = 0; n < kGenCols; ++n) ax[n] *= alpha;
      }
      if (s == 2) {
#pragma unroll
        for (int n = 0; n < kGenCols; ++n) ac[n] *= alpha;
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float mm = code[e] == 0 ? m[0] : (code[e] == 1 ? m[1] : m[2]);
      const float pv = code[e] >= 0 ? exp2f(sc[e] - mm) : 0.f;
      l[0] += code[e] == 0 ? pv : 0.f;
      l[1] += code[e] == 1 ? pv : 0.f;
      l[2] += code[e] == 2 ? pv : 0.f;
      if (rows_mode) {
        // dP_j exactly as the backward kernels compute it (same function, same operands)
        const double w = code[e] >= 0 ? static_cast<double>(pv) * gen_dot(sG + rl * sd, sV + (l8 + 8 * e) * sd, d4) : 0.0;
        u[0] += code[e] == 0 ? w : 0.0;
        u[1] += code[e] == 1 ? w : 0.0;
        u[2] += code[e] == 2 ? w : 0.0;
      } else {
        sPX[rl * kGenKeys + l8 + 8 * e] = code[e] == 1 ? pv : 0.f;
        sPC[rl * kGenKeys + l8 + 8 * e] = code[e] == 2 ? pv : 0.f;
      }
    }
    if (rows_mode) continue;  // the rows pass needs no P V
    __syncwarp();  // a row's probabilities are written and read by its own 8 lanes
    if (any[1]) gen_pv(ax, sPX + rl * kGenKeys, sV, sd, l8, d4);
    if (any[2]) gen_pv(ac, sPC + rl * kGenKeys, sV, sd, l8, d4);
  }

#pragma unroll
  for (int s = 0; s < 3; ++s) l[s] = row_sum<8>(l[s]);
  if (p.mode == kModePartial) {
    if (rc.active) {
      float* rec = part_record(p, br, br.r0 + rl);
      if (l8 == 0) {
#pragma unroll
        for (int s = 0; s < 3; ++s) rec[s] = m[s], rec[3 + s] = l[s];
      }
#pragma unroll
      for (int n = 0; n < kGenCols; ++n) {
        const int col = gen_col(l8, n);
        if (col < d) rec[6 + col] = ax[n], rec[6 + d + col] = ac[n];
      }
    }
    return;
  }
#pragma unroll
  for (int s = 0; s < 3; ++s) u[s] = row_sum<8>(u[s]);
  finish_row<Elem, 8, kGenCols>(p, rc, m, l, ax, ac, [&](int n) { return gen_col(l8, n); }, rows_mode ? u : nullptr);
}

// Split-KV merge: one warp per packed row; lane owns columns lane + 32 n (d <= 256).
template <typename Elem>
__global__ void __launch_bounds__(128) oeb_combine_kernel(const FwdParams p, int num_splits) {
  const int lane = threadIdx.x & 31;
  const int R = p.G * p.Tq;
  const int64_t grow = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (grow >= static_cast<int64_t>(p.B) * p.Hkv * R) return;  // whole warp
  const int bk = static_cast<int>(grow / R), r = static_cast<int>(grow % R);
  RowCtx rc;
  rc.active = true;
  rc.b = bk / p.Hkv, rc.hk = bk % p.Hkv;
  rc.h = rc.hk * p.G + r / p.Tq, rc.i = r % p.Tq;
  const int kvb = static_cast<int>(p.kv[rc.b]);
  rc.rr = make_range(kvb, p.seg[static_cast<int64_t>(rc.b) * p.Tq + rc.i], p.Tk - p.Tq + rc.i, p.num_sink);

  const int64_t pf = part_fields(p.d), stride = static_cast<int64_t>(p.B) * p.Hkv * R * pf;
  const float* base = p.part + (static_cast<int64_t>(bk) * R + r) * pf;
  float M[3] = {-CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F}, L[3] = {0.f, 0.f, 0.f};
  for (int sp = 0; sp < num_splits; ++sp) {
    const float* rec = base + sp * stride;
#pragma unroll
    for (int s = 0; s < 3; ++s)
      if (rec[3 + s] > 0.f) M[s] = fmaxf(M[s], rec[s]);
  }
  float ax[8], ac[8];
#pragma unroll
  for (int n = 0; n < 8; ++n) ax[n] = ac[n] = 0.f;
  for (int sp = 0; sp < num_splits; ++sp) {
    const float* rec = base + sp * stride;
    float w[3];
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      w[s] = rec[3 + s] > 0.f ? exp2f(rec[s] - M[s]) : 0.f;
      L[s] = fmaf(rec[3 + s], w[s], L[s]);
    }
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int col = lane + 32 * n;
      if (col < p.d) {
        if (w[1] > 0.f) ax[n] = fmaf(w[1], rec[6 + col], ax[n]);
        if (w[2] > 0.f) ac[n] = fmaf(w[2], rec[6 + p.d + col], ac[n]);
      }
    }
  }
  finish_row<Elem, 32, 8>(p, rc, M, L, ax, ac, [&](int n) { return lane + 32 * n; });
}

// ------------------------------------------------------------------------- backward kernels

struct BwdParams {
  const void *q, *k, *v, *dout;  // as FwdParams
  const int64_t *seg, *kv;
  const float* rows;             // (B, H, Tq, 6) from the rows pass
  float* dq_acc;                 // tensor-core path: (B, H, Tq, d) fp32, zero on entry, atomics
  void* dq;                      // scalar path: (B, H, Tq, d) in q's dtype, written by oeb_bwd_q_generic_kernel
  void *dk, *dv;                 // (B, Hkv, Tk, d), zero on entry
  int B, H, Hkv, G, Tq, Tk, d, num_sink;
  int vec, sd;
  float scale, scale_log2;
};

// The per-query backward scalars of a step, staged in shared memory: key range (kv, a, bnd,
// end) in CPU groups, shift_g in log2 units and c~_g (4 slots each, the 4th unused).
__device__ __forceinline__ void stage_row_scalars(const BwdParams& p, int b, int64_t bh, int i0, int nq, int4* sRg,
                                                  float* sSh, float* sCt) {
  const int kvb = static_cast<int>(p.kv[b]);
  for (int rr = threadIdx.x; rr < nq; rr += blockDim.x) {
    const int i = i0 + rr;
    int4 rg = make_int4(kvb, kvb, kvb, kvb);  // no keys
    float sh[3] = {0.f, 0.f, 0.f}, ct[3] = {0.f, 0.f, 0.f};
    if (i < p.Tq) {
      const Range x = make_range(kvb, p.seg[static_cast<int64_t>(b) * p.Tq + i], p.Tk - p.Tq + i, p.num_sink);
      rg = make_int4(x.kv, x.a, x.bnd, x.end);
      const float* rec = p.rows + (bh * p.Tq + i) * kRowFields;
#pragma unroll
      for (int g = 0; g < 3; ++g) sh[g] = rec[g], ct[g] = rec[3 + g];
    }
    sRg[rr] = rg;
#pragma unroll
    for (int g = 0; g < 3; ++g) sSh[4 * rr + g] = sh[g], sCt[4 * rr + g] = ct[g];
  }
}

// Three per-group scalars held in registers (a select, not a runtime-indexed local array).
struct Three {
  float v[3];
  __device__ __forceinline__ float operator[](int g) const { return g == 0 ? v[0] : (g == 1 ? v[1] : v[2]); }
};

// A' = exp(s - shift_g) and dS = A' (dP - c~_g) for key j of a query with key range rg and
// per-group shift (log2 units) and c~ (s in raw units).
template <typename Vals>
__device__ __forceinline__ void adjoint(const BwdParams& p, int j, int4 rg, const Vals& sh, const Vals& ct, float s,
                                        float dp, float& a, float& ds) {
  a = 0.f, ds = 0.f;
  if (j >= rg.x && j < rg.w) {
    const int g = j < rg.y ? 0 : (j < rg.z ? 1 : 2);
    a = exp2f(s * p.scale_log2 - sh[g]);
    ds = a * (dp - ct[g]);
  }
}

// Tensor-core path: a CTA per (batch, kv head, block of 64 keys), 4 warps of 16 keys each.
template <int D>
struct MmaBwdCfg {
  static constexpr int NW = 4, BN = 64;
  static constexpr int BM = D <= 64 ? 64 : 32;  // queries per step
  static constexpr int LD = D + 8, LDS = BN + 8;
  static constexpr size_t smem() {
    return size_t(BM) * (sizeof(int4) + 8 * sizeof(float)) + (size_t(2 * BN + 2 * BM) * LD + size_t(BM) * LDS) * 2;
  }
};

template <typename Elem, int D>
__global__ void __launch_bounds__(128) oeb_bwd_mma_kernel(const BwdParams p) {
  using O = Mma16<Elem>;
  using Cfg = MmaBwdCfg<D>;
  constexpr int NW = Cfg::NW, BN = Cfg::BN, BM = Cfg::BM, LD = Cfg::LD, LDS = Cfg::LDS;
  constexpr int NQT = BM / 8, ND = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int4* sRg = reinterpret_cast<int4*>(smem_raw);
  float* sSh = reinterpret_cast<float*>(sRg + BM);
  float* sCt = sSh + 4 * BM;
  Elem* sK = reinterpret_cast<Elem*>(sCt + 4 * BM);
  Elem* sV = sK + BN * LD;
  Elem* sQ = sV + BN * LD;
  Elem* sG = sQ + BM * LD;  // dO
  Elem* sS = sG + BM * LD;  // dS as (query, key)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  const int nkb = (p.Tk + BN - 1) / BN;
  const int bk = blockIdx.x / nkb, j0 = static_cast<int>(blockIdx.x % nkb) * BN;
  const int b = bk / p.Hkv, hk = bk % p.Hkv;
  const int kvb = static_cast<int>(p.kv[b]);
  const int i_lo = max(0, j0 - (p.Tk - p.Tq));  // first query that reaches the block
  if (j0 + BN <= kvb || i_lo >= p.Tq) return;    // padding keys only, or no query reaches them: dk, dv stay 0

  const bool vec = p.vec != 0;
  const int Tk = p.Tk, Tq = p.Tq, d = p.d;
  const Elem* kbase = static_cast<const Elem*>(p.k) + static_cast<int64_t>(bk) * Tk * d;
  const Elem* vbase = static_cast<const Elem*>(p.v) + static_cast<int64_t>(bk) * Tk * d;
  auto key_row = [=](const Elem* base) {
    return [=](int rr) -> const Elem* {
      const int j = j0 + rr;
      return (j >= kvb && j < Tk) ? base + static_cast<int64_t>(j) * d : nullptr;
    };
  };
  load_tile<Elem, D>(sK, LD, BN, key_row(kbase), d, vec);
  load_tile<Elem, D>(sV, LD, BN, key_row(vbase), d, vec);

  float dk[ND][4], dv[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  const int kw = warp * 16;  // the warp's keys: j0 + kw + [0, 16)

  for (int hh = 0; hh < p.G; ++hh) {
    const int64_t bh = static_cast<int64_t>(b) * p.H + hk * p.G + hh;
    const Elem* qbase = static_cast<const Elem*>(p.q) + bh * Tq * d;
    const Elem* gbase = static_cast<const Elem*>(p.dout) + bh * Tq * d;
    float* dqbase = p.dq_acc + bh * Tq * d;
    for (int i0 = i_lo; i0 < Tq; i0 += BM) {
      __syncthreads();  // the previous step is done with sQ, sG, sS and the row scalars
      auto query_row = [=](const Elem* base) {
        return [=](int rr) -> const Elem* { return i0 + rr < Tq ? base + static_cast<int64_t>(i0 + rr) * d : nullptr; };
      };
      load_tile<Elem, D>(sQ, LD, BM, query_row(qbase), d, vec);
      load_tile<Elem, D>(sG, LD, BM, query_row(gbase), d, vec);
      stage_row_scalars(p, b, bh, i0, BM, sRg, sSh, sCt);
      __syncthreads();

      // S^T and dP^T for the warp's 16 keys x BM queries.
      float st[NQT][4], dp[NQT][4];
#pragma unroll
      for (int nt = 0; nt < NQT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        typename O::A fa;
        O::load_a(fa, sK, LD, kw, kk * 16);
#pragma unroll
        for (int nt = 0; nt < NQT; ++nt) {
          typename O::B fb;
          O::load_b_nmajor(fb, sQ, LD, nt * 8, kk * 16);
          O::mma(st[nt], fa, fb);
        }
        O::load_a(fa, sV, LD, kw, kk * 16);
#pragma unroll
        for (int nt = 0; nt < NQT; ++nt) {
          typename O::B fb;
          O::load_b_nmajor(fb, sG, LD, nt * 8, kk * 16);
          O::mma(dp[nt], fa, fb);
        }
      }
      // Element e: key kw + grp + 8 (e >> 1), query nt * 8 + 2 tig + (e & 1).
#pragma unroll
      for (int nt = 0; nt < NQT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kr = kw + grp + 8 * (e >> 1);
          const int qc = nt * 8 + 2 * tig + (e & 1);
          float a, ds;
          const float* sh = sSh + 4 * qc;
          const float* ct = sCt + 4 * qc;
          adjoint(p, j0 + kr, sRg[qc], sh, ct, st[nt][e], dp[nt][e], a, ds);
          st[nt][e] = a;
          dp[nt][e] = ds;
          sS[qc * LDS + kr] = from_f<Elem>(ds);
        }
      // dV += A'^T dO, dK += dS^T Q (scale applied at the end).
#pragma unroll
      for (int kc = 0; kc < BM / 16; ++kc) {
        typename O::A fa;
        O::a_from_c(fa, st[2 * kc], st[2 * kc + 1]);
#pragma unroll
        for (int n = 0; n < ND; ++n) {
          typename O::B fb;
          O::load_b_kmajor(fb, sG, LD, kc * 16, n * 8);
          O::mma(dv[n], fa, fb);
        }
      }
#pragma unroll
      for (int kc = 0; kc < BM / 16; ++kc) {
        typename O::A fa;
        O::a_from_c(fa, dp[2 * kc], dp[2 * kc + 1]);
#pragma unroll
        for (int n = 0; n < ND; ++n) {
          typename O::B fb;
          O::load_b_kmajor(fb, sQ, LD, kc * 16, n * 8);
          O::mma(dk[n], fa, fb);
        }
      }
      __syncthreads();  // sS is complete
      // dQ += scale dS K for the step's queries: (16-query tile, 8-column tile) items over the warps.
      for (int item = warp; item < (BM / 16) * ND; item += NW) {
        const int mt = item / ND, n = item % ND;
        float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
          typename O::A fa;
          typename O::B fb;
          O::load_a(fa, sS, LDS, mt * 16, kc * 16);
          O::load_b_kmajor(fb, sK, LD, kc * 16, n * 8);
          O::mma(c, fa, fb);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + mt * 16 + grp + 8 * (e >> 1), col = n * 8 + 2 * tig + (e & 1);
          if (i < Tq && col < d && c[e] != 0.f) atomicAdd(dqbase + static_cast<int64_t>(i) * d + col, c[e] * p.scale);
        }
      }
    }
  }

  Elem* dkb = static_cast<Elem*>(p.dk) + static_cast<int64_t>(bk) * Tk * d;
  Elem* dvb = static_cast<Elem*>(p.dv) + static_cast<int64_t>(bk) * Tk * d;
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = j0 + kw + grp + 8 * (e >> 1), col = n * 8 + 2 * tig + (e & 1);
      if (j < Tk && col < d) {
        dkb[static_cast<int64_t>(j) * d + col] = from_f<Elem>(dk[n][e] * p.scale);
        dvb[static_cast<int64_t>(j) * d + col] = from_f<Elem>(dv[n][e]);
      }
    }
}

// Scalar path, dK and dV: a CTA per (batch, kv head, block of 16 keys), 128 threads. In the
// score phase lane l8 of query row rl = tid / 8 takes keys l8 and l8 + 8; in the accumulation
// phase key tid / 8 is owned by 8 lanes, each with the columns gen_col(l8, n).
template <typename Elem>
__global__ void __launch_bounds__(128) oeb_bwd_kv_generic_kernel(const BwdParams p) {
  constexpr int BK = kGenKeysBwd, BQ = kGenRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int sd = p.sd, d = p.d, d4 = (d + 3) & ~3, Tk = p.Tk, Tq = p.Tq;
  int4* sRg = reinterpret_cast<int4*>(smem_raw);
  float* sSh = reinterpret_cast<float*>(sRg + BQ);
  float* sCt = sSh + 4 * BQ;
  float* sK = sCt + 4 * BQ;
  float* sV = sK + BK * sd;
  float* sQ = sV + BK * sd;
  float* sG = sQ + BQ * sd;
  float* sA = sG + BQ * sd;  // A' as (query, key)
  float* sD = sA + BQ * BK;  // dS as (query, key)
  const int rl = threadIdx.x >> 3, l8 = threadIdx.x & 7;

  const int nkb = (Tk + BK - 1) / BK;
  const int bk = blockIdx.x / nkb, j0 = static_cast<int>(blockIdx.x % nkb) * BK;
  const int b = bk / p.Hkv, hk = bk % p.Hkv;
  const int kvb = static_cast<int>(p.kv[b]);
  const int i_lo = max(0, j0 - (Tk - Tq));
  if (j0 + BK <= kvb || i_lo >= Tq) return;

  const Elem* kbase = static_cast<const Elem*>(p.k) + static_cast<int64_t>(bk) * Tk * d;
  const Elem* vbase = static_cast<const Elem*>(p.v) + static_cast<int64_t>(bk) * Tk * d;
  auto key_row = [=](const Elem* base) {
    return [=](int rr) -> const Elem* {
      const int j = j0 + rr;
      return (j >= kvb && j < Tk) ? base + static_cast<int64_t>(j) * d : nullptr;
    };
  };
  load_rows_f32<Elem>(sK, sd, BK, key_row(kbase), d, d4);
  load_rows_f32<Elem>(sV, sd, BK, key_row(vbase), d, d4);

  float dk[kGenCols], dv[kGenCols];
#pragma unroll
  for (int n = 0; n < kGenCols; ++n) dk[n] = dv[n] = 0.f;
  for (int hh = 0; hh < p.G; ++hh) {
    const int64_t bh = static_cast<int64_t>(b) * p.H + hk * p.G + hh;
    const Elem* qbase = static_cast<const Elem*>(p.q) + bh * Tq * d;
    const Elem* gbase = static_cast<const Elem*>(p.dout) + bh * Tq * d;
    for (int i0 = i_lo; i0 < Tq; i0 += BQ) {
      __syncthreads();
      auto query_row = [=](const Elem* base) {
        return [=](int rr) -> const Elem* { return i0 + rr < Tq ? base + static_cast<int64_t>(i0 + rr) * d : nullptr; };
      };
      load_rows_f32<Elem>(sQ, sd, BQ, query_row(qbase), d, d4);
      load_rows_f32<Elem>(sG, sd, BQ, query_row(gbase), d, d4);
      stage_row_scalars(p, b, bh, i0, BQ, sRg, sSh, sCt);
      __syncthreads();
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int kk = l8 + 8 * e;
        const float s = gen_dot(sQ + rl * sd, sK + kk * sd, d4);
        const float dpv = gen_dot(sG + rl * sd, sV + kk * sd, d4);
        float a, ds;
        const float* sh = sSh + 4 * rl;
        const float* ct = sCt + 4 * rl;
        adjoint(p, j0 + kk, sRg[rl], sh, ct, s, dpv, a, ds);
        sA[rl * BK + kk] = a;
        sD[rl * BK + kk] = ds;
      }
      __syncthreads();
      const int kr = rl;  // accumulation: this lane's key
      for (int qq = 0; qq < BQ; ++qq) {
        const float a = sA[qq * BK + kr], ds = sD[qq * BK + kr];
        if (a == 0.f) continue;  // not an allowed key of that query (then dS = 0 too)
#pragma unroll
        for (int g = 0; g < 8; ++g) {
          const int col = 4 * (l8 + 8 * g);
          if (col < d4) {
            const float4 g4 = ld4(sG + qq * sd + col), q4 = ld4(sQ + qq * sd + col);
            dv[4 * g] = fmaf(a, g4.x, dv[4 * g]);
            dv[4 * g + 1] = fmaf(a, g4.y, dv[4 * g + 1]);
            dv[4 * g + 2] = fmaf(a, g4.z, dv[4 * g + 2]);
            dv[4 * g + 3] = fmaf(a, g4.w, dv[4 * g + 3]);
            dk[4 * g] = fmaf(ds, q4.x, dk[4 * g]);
            dk[4 * g + 1] = fmaf(ds, q4.y, dk[4 * g + 1]);
            dk[4 * g + 2] = fmaf(ds, q4.z, dk[4 * g + 2]);
            dk[4 * g + 3] = fmaf(ds, q4.w, dk[4 * g + 3]);
          }
        }
      }
    }
  }
  const int j = j0 + rl;
  if (j < Tk) {
    Elem* dkr = static_cast<Elem*>(p.dk) + (static_cast<int64_t>(bk) * Tk + j) * d;
    Elem* dvr = static_cast<Elem*>(p.dv) + (static_cast<int64_t>(bk) * Tk + j) * d;
#pragma unroll
    for (int n = 0; n < kGenCols; ++n) {
      const int col = gen_col(l8, n);
      if (col < d) dkr[col] = from_f<Elem>(dk[n] * p.scale), dvr[col] = from_f<Elem>(dv[n]);
    }
  }
}

// Scalar path, dQ: the row kernel's geometry (16 packed rows, 32-key tiles), dQ_i = scale
// sum_j dS_ij k_j accumulated in registers and written once (no atomics).
template <typename Elem>
__global__ void __launch_bounds__(128) oeb_bwd_q_generic_kernel(const BwdParams bp, const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int sd = p.sd, d = p.d, d4 = (d + 3) & ~3;
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sG = sQ + kGenRows * sd;
  float* sK = sG + kGenRows * sd;
  float* sV = sK + kGenKeys * sd;
  float* sD = sV + kGenKeys * sd;  // dS of the tile, (row, key)
  const int rl = threadIdx.x >> 3, l8 = threadIdx.x & 7;

  const BlockRows br = block_rows(p, kGenRows);
  const int ntiles = (br.kend - br.kvb + kGenKeys - 1) / kGenKeys;
  const RowCtx rc = row_ctx(p, br, br.r0 + rl);
  const int64_t row = (static_cast<int64_t>(rc.b) * p.H + rc.h) * p.Tq + rc.i;
  const int4 rg = make_int4(rc.rr.kv, rc.rr.a, rc.rr.bnd, rc.rr.end);
  Three sh{{0.f, 0.f, 0.f}}, ct{{0.f, 0.f, 0.f}};
  if (rc.active) {
#pragma unroll
    for (int g = 0; g < 3; ++g)
      sh.v[g] = bp.rows[row * kRowFields + g], ct.v[g] = bp.rows[row * kRowFields + 3 + g];
  }
  const Elem* kbase = static_cast<const Elem*>(p.k) + static_cast<int64_t>(br.bk) * p.Tk * d;
  const Elem* vbase = static_cast<const Elem*>(p.v) + static_cast<int64_t>(br.bk) * p.Tk * d;
  const int kend = br.kend;
  auto packed_row = [&](const Elem* base) {
    return [&, base](int rr) -> const Elem* {
      const int r = br.r0 + rr;
      if (r >= br.R) return nullptr;
      const int64_t h = static_cast<int64_t>(br.hk) * p.G + r / p.Tq;
      return base + ((static_cast<int64_t>(br.b) * p.H + h) * p.Tq + r % p.Tq) * d;
    };
  };
  load_rows_f32<Elem>(sQ, sd, kGenRows, packed_row(static_cast<const Elem*>(p.q)), d, d4);
  load_rows_f32<Elem>(sG, sd, kGenRows, packed_row(static_cast<const Elem*>(p.dout)), d, d4);

  float dq[kGenCols];
#pragma unroll
  for (int n = 0; n < kGenCols; ++n) dq[n] = 0.f;
  for (int tile = 0; tile < ntiles; ++tile) {
    const int j0 = br.kvb + tile * kGenKeys;
    __syncthreads();
    load_rows_f32<Elem>(
        sK, sd, kGenKeys, [&](int rr) -> const Elem* { return j0 + rr < kend ? kbase + static_cast<int64_t>(j0 + rr) * d : nullptr; },
        d, d4);
    load_rows_f32<Elem>(
        sV, sd, kGenKeys, [&](int rr) -> const Elem* { return j0 + rr < kend ? vbase + static_cast<int64_t>(j0 + rr) * d : nullptr; },
        d, d4);
    __syncthreads();
    if (!__any_sync(kFull, max(rg.x, j0) < min(rg.w, j0 + kGenKeys))) continue;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int kk = l8 + 8 * e;
      const float s = gen_dot(sQ + rl * sd, sK + kk * sd, d4);
      const float dpv = gen_dot(sG + rl * sd, sV + kk * sd, d4);
      float a, ds;
      adjoint(bp, j0 + kk, rg, sh, ct, s, dpv, a, ds);
      sD[rl * kGenKeys + kk] = ds;
    }
    __syncwarp();
    for (int kk = 0; kk < kGenKeys; ++kk) {
      const float ds = sD[rl * kGenKeys + kk];
      if (ds == 0.f) continue;
      const float* kr = sK + kk * sd;
#pragma unroll
      for (int g = 0; g < 8; ++g) {
        const int col = 4 * (l8 + 8 * g);
        if (col < d4) {
          const float4 k4 = ld4(kr + col);
          dq[4 * g] = fmaf(ds, k4.x, dq[4 * g]);
          dq[4 * g + 1] = fmaf(ds, k4.y, dq[4 * g + 1]);
          dq[4 * g + 2] = fmaf(ds, k4.z, dq[4 * g + 2]);
          dq[4 * g + 3] = fmaf(ds, k4.w, dq[4 * g + 3]);
        }
      }
    }
  }
  if (rc.active) {
    Elem* out = static_cast<Elem*>(bp.dq) + row * d;
#pragma unroll
    for (int n = 0; n < kGenCols; ++n) {
      const int col = gen_col(l8, n);
      if (col < d) out[col] = from_f<Elem>(dq[n] * p.scale);
    }
  }
}

// ------------------------------------------------------------------------------------- host

using Problem = OebSizes;

Problem check_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seg_start,
                      const Tensor& kv_start, double strength, int64_t num_sink, double scale) {
  TORCH_CHECK(q.is_cuda(), "oeb_attention (CUDA kernel): q, k, v, seg_start and kv_start must be on one CUDA "
              "device, got q on ", q.device());
  return check_oeb_arguments(q, k, v, seg_start, kv_start, strength, num_sink, scale);
}

// Validates the index values as the CPU kernel does (one device-to-host copy, so one sync; the
// wrapper in ops.py reads them on the host as well) and returns the smallest kv_start, which
// sizes the split-KV plan.
int64_t check_indices(const Problem& P, const Tensor& seg, const Tensor& kv) {
  if (P.B == 0) return 0;
  const Tensor host = at::cat({seg.reshape({-1}), kv.reshape({-1})}).to(at::kCPU);
  const int64_t* s = host.data_ptr<int64_t>();
  const int64_t* kvp = s + P.B * P.Tq;
  int64_t min_kv = P.Tk;
  for (int64_t b = 0; b < P.B; ++b) {
    TORCH_CHECK(kvp[b] >= 0 && kvp[b] <= P.Tk, "oeb_attention: kv_start[", b, "] = ", kvp[b], " is outside [0, ",
                P.Tk, "]");
    min_kv = std::min(min_kv, kvp[b]);
    for (int64_t i = 0; i < P.Tq; ++i) {
      const int64_t v = s[b * P.Tq + i];
      TORCH_CHECK(v >= -1 && v <= P.Tk - P.Tq + i, "oeb_attention: seg_start[", b, ", ", i, "] = ", v,
                  " must be -1 or a key position <= the query's own position ", P.Tk - P.Tq + i);
    }
  }
  return min_kv;
}

void check_device_and_sizes(const Problem& P, const Tensor& q) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(prop->major >= 8, "oeb_attention (CUDA kernel): needs compute capability 8.0 or newer, device ",
              q.device(), " has ", prop->major, ".", prop->minor);
  TORCH_CHECK(P.d <= 256, "oeb_attention (CUDA kernel): head dim up to 256 is supported, got ", P.d);
  const int64_t lim = std::numeric_limits<int>::max() / 2;
  TORCH_CHECK(P.Tk < lim && P.G * P.Tq < lim && P.B * P.H < lim,
              "oeb_attention (CUDA kernel): sizes too large for 32-bit row indices");
}

bool aligned16(const Tensor& x) { return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0; }

// Scalar path: shared row stride (floats) >= d rounded up to 4, with an odd number of 16-byte
// chunks so that eight lanes reading eight rows hit different banks.
int generic_stride(int64_t d) {
  const int d4 = static_cast<int>((d + 3) & ~int64_t(3));
  return d4 + ((d4 / 4) % 2 == 0 ? 4 : 8);
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "oeb_attention (CUDA kernel): needs ", bytes,
              " bytes of shared memory per block, the device allows ", optin);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// How the row kernel runs: tensor cores (bf16 / fp16 with d <= 128, head dim bucket 64 or 128)
// or the scalar path; warps per CTA, CTAs, split-KV chunks.
struct RowPlan {
  bool mma;
  int Dp, nw, splits, tiles_per_split;
  int64_t blocks;
  size_t smem;
};

RowPlan plan_rows(const Problem& P, at::ScalarType dt, bool vec, int64_t min_kv, bool allow_split, int num_sms) {
  RowPlan pl{};
  // Tensor cores for bf16 / fp16 with d <= 128 and 16-byte aligned rows (cp.async); else scalar.
  pl.mma = dt != at::kFloat && P.d <= 128 && vec;
  pl.Dp = P.d <= 64 ? 64 : 128;
  const int64_t R = P.G * P.Tq;
  pl.nw = pl.mma ? (R <= 16 ? 1 : 4) : 4;
  const int64_t BM = pl.mma ? 16 * pl.nw : kGenRows;
  const int64_t BN = pl.mma ? (pl.Dp == 64 ? MmaFwdCfg<64>::BN : MmaFwdCfg<128>::BN) : kGenKeys;
  pl.smem = pl.mma ? (pl.Dp == 64 ? MmaFwdCfg<64>::smem(pl.nw) : MmaFwdCfg<128>::smem(pl.nw))
                   : (size_t(2 * kGenRows + 2 * kGenKeys) * generic_stride(P.d) + 2 * kGenRows * kGenKeys) * sizeof(float);
  pl.blocks = P.B * P.Hkv * ((R + BM - 1) / BM);
  pl.splits = 1;
  pl.tiles_per_split = 0;
  const int64_t max_tiles = (P.Tk - min_kv + BN - 1) / BN;
  // Split the keys when the row blocks alone cannot fill the GPU (decode, short chunks): aim at
  // about four CTAs per SM, at least two tiles per split.
  if (allow_split && pl.blocks < num_sms && max_tiles >= 4) {
    const int64_t want = (4 * static_cast<int64_t>(num_sms) + pl.blocks - 1) / pl.blocks;
    const int64_t splits = std::min<int64_t>({want, max_tiles / 2, 1024});
    if (splits > 1) {
      pl.tiles_per_split = static_cast<int>((max_tiles + splits - 1) / splits);
      pl.splits = static_cast<int>((max_tiles + pl.tiles_per_split - 1) / pl.tiles_per_split);
    }
  }
  return pl;
}

template <typename Elem>
void launch_rows(const FwdParams& p, const RowPlan& pl, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(pl.blocks), static_cast<unsigned>(pl.splits));
  if constexpr (!std::is_same_v<Elem, float>) {
    if (pl.mma) {
      auto kernel = pl.Dp == 64 ? oeb_fwd_mma_kernel<Elem, 64> : oeb_fwd_mma_kernel<Elem, 128>;
      set_smem(kernel, pl.smem);
      kernel<<<grid, pl.nw * 32, pl.smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto kernel = oeb_fwd_generic_kernel<Elem>;
  set_smem(kernel, pl.smem);
  kernel<<<grid, 128, pl.smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Elem>
void launch_combine(const FwdParams& p, int splits, cudaStream_t stream) {
  const int64_t rows = p.B * static_cast<int64_t>(p.Hkv) * p.G * p.Tq;
  oeb_combine_kernel<Elem><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p, splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Elem>
void launch_backward(const BwdParams& bp, const FwdParams& fp, const RowPlan& pl, cudaStream_t stream) {
  if constexpr (!std::is_same_v<Elem, float>) {
    if (pl.mma) {
      auto kernel = pl.Dp == 64 ? oeb_bwd_mma_kernel<Elem, 64> : oeb_bwd_mma_kernel<Elem, 128>;
      const size_t smem = pl.Dp == 64 ? MmaBwdCfg<64>::smem() : MmaBwdCfg<128>::smem();
      set_smem(kernel, smem);
      const int64_t blocks = static_cast<int64_t>(bp.B) * bp.Hkv * ((bp.Tk + 63) / 64);
      kernel<<<static_cast<unsigned>(blocks), 128, smem, stream>>>(bp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const size_t sd = static_cast<size_t>(bp.sd);
  const size_t kv_smem = size_t(kGenRows) * (sizeof(int4) + 8 * sizeof(float)) +
                         (size_t(2 * kGenKeysBwd + 2 * kGenRows) * sd + 2 * kGenRows * kGenKeysBwd) * sizeof(float);
  auto kv_kernel = oeb_bwd_kv_generic_kernel<Elem>;
  set_smem(kv_kernel, kv_smem);
  const int64_t kv_blocks = static_cast<int64_t>(bp.B) * bp.Hkv * ((bp.Tk + kGenKeysBwd - 1) / kGenKeysBwd);
  kv_kernel<<<static_cast<unsigned>(kv_blocks), 128, kv_smem, stream>>>(bp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t q_smem = (size_t(2 * kGenRows + 2 * kGenKeys) * sd + kGenRows * kGenKeys) * sizeof(float);
  auto q_kernel = oeb_bwd_q_generic_kernel<Elem>;
  set_smem(q_kernel, q_smem);
  q_kernel<<<static_cast<unsigned>(pl.blocks), 128, q_smem, stream>>>(bp, fp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  if (dt == at::kFloat) f(float{});
  else if (dt == at::kHalf) f(__half{});
  else f(__nv_bfloat16{});
}

FwdParams make_fwd_params(const Problem& P, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& seg,
                          const Tensor& kv) {
  FwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.dout = q.data_ptr();
  p.seg = seg.data_ptr<int64_t>(), p.kv = kv.data_ptr<int64_t>();
  p.B = static_cast<int>(P.B), p.H = static_cast<int>(P.H), p.Hkv = static_cast<int>(P.Hkv);
  p.G = static_cast<int>(P.G), p.Tq = static_cast<int>(P.Tq), p.Tk = static_cast<int>(P.Tk);
  p.d = static_cast<int>(P.d), p.num_sink = static_cast<int>(P.num_sink);
  p.scale = static_cast<float>(P.scale);
  p.scale_log2 = static_cast<float>(P.scale * 1.4426950408889634);
  p.strength = P.strength;
  p.vec = (P.d * q.element_size()) % 16 == 0 && aligned16(q) && aligned16(k) && aligned16(v);
  p.sd = generic_stride(P.d);
  return p;
}

// float64 has no CUDA kernel: it runs the CPU kernel on host copies (exact CPU semantics; the
// dispatcher picks the CPU kernel from the tensors' device).
std::tuple<Tensor, Tensor, Tensor> forward_on_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& seg, const Tensor& kv, double strength,
                                                  int64_t num_sink, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stepflow::oeb_attention", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&, double, int64_t,
                                                                 double)>();
  const auto r = op.call(q.cpu(), k.cpu(), v.cpu(), seg.cpu(), kv.cpu(), strength, num_sink, scale);
  const auto dev = q.device();
  return {std::get<0>(r).to(dev), std::get<1>(r).to(dev), std::get<2>(r).to(dev)};
}

std::tuple<Tensor, Tensor, Tensor> backward_on_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& lse, const Tensor& stats,
                                                   const Tensor& seg, const Tensor& kv, double strength,
                                                   int64_t num_sink, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stepflow::oeb_attention_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&, double, int64_t,
                                                                 double)>();
  const auto r = op.call(grad_out.cpu(), q.cpu(), k.cpu(), v.cpu(), lse.cpu(), stats.cpu(), seg.cpu(), kv.cpu(),
                         strength, num_sink, scale);
  const auto dev = q.device();
  return {std::get<0>(r).to(dev), std::get<1>(r).to(dev), std::get<2>(r).to(dev)};
}

std::tuple<Tensor, Tensor, Tensor> oeb_attention_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                      const Tensor& seg_start, const Tensor& kv_start,
                                                      double strength, int64_t num_sink, double scale) {
  const Problem P = check_problem(q_in, k_in, v_in, seg_start, kv_start, strength, num_sink, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor seg = seg_start.contiguous(), kv = kv_start.contiguous();
  const int64_t min_kv = check_indices(P, seg, kv);
  if (q_in.scalar_type() == at::kDouble) return forward_on_cpu(q_in, k_in, v_in, seg, kv, strength, num_sink, scale);
  check_device_and_sizes(P, q_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({P.B, P.H, P.Tq}, q.options().dtype(at::kFloat));
  Tensor stats = at::empty({P.B, P.H, P.Tq, 2}, q.options().dtype(at::kFloat));
  if (P.B * P.H * P.Tq == 0) return {out, lse, stats};

  FwdParams p = make_fwd_params(P, q, k, v, seg, kv);
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>(), p.stats = stats.data_ptr<float>();
  const int num_sms = at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount;
  const RowPlan pl = plan_rows(P, q.scalar_type(), p.vec != 0, min_kv, /*allow_split=*/true, num_sms);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Tensor part;
  if (pl.splits > 1) {
    part = at::empty({pl.splits * P.B * P.Hkv * P.G * P.Tq * part_fields(static_cast<int>(P.d))},
                     q.options().dtype(at::kFloat));
    p.part = part.data_ptr<float>();
    p.mode = kModePartial;
    p.tiles_per_split = pl.tiles_per_split;
  } else {
    p.mode = kModeOut;
  }
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using Elem = decltype(tag);
    launch_rows<Elem>(p, pl, stream);
    if (pl.splits > 1) {
      FwdParams pc = p;
      pc.mode = kModeOut;
      launch_combine<Elem>(pc, pl.splits, stream);
    }
  });
  return {out, lse, stats};
}

// lse and stats are checked for shape only, as in the CPU kernel: the rows pass recomputes the
// group log-masses per group (exact where p_X underflows fp32), which lse and stats cannot give.
std::tuple<Tensor, Tensor, Tensor> oeb_attention_backward_cuda(const Tensor& grad_out, const Tensor& q_in,
                                                               const Tensor& k_in, const Tensor& v_in,
                                                               const Tensor& lse, const Tensor& stats,
                                                               const Tensor& seg_start, const Tensor& kv_start,
                                                               double strength, int64_t num_sink, double scale) {
  const Problem P = check_problem(q_in, k_in, v_in, seg_start, kv_start, strength, num_sink, scale);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && grad_out.scalar_type() == q_in.scalar_type() &&
                  grad_out.device() == q_in.device(),
              "oeb_attention_backward: grad_out must be a tensor of q's shape ", q_in.sizes(), ", dtype ",
              q_in.scalar_type(), " and device ", q_in.device(), ", got ", grad_out.sizes(), " ",
              grad_out.scalar_type(), " on ", grad_out.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == P.B && lse.size(1) == P.H &&
                  lse.size(2) == P.Tq && lse.device() == q_in.device(),
              "oeb_attention_backward: lse must be float32 of shape (", P.B, ", ", P.H, ", ", P.Tq,
              ") on q's device, got ", lse.scalar_type(), " ", lse.sizes(), " on ", lse.device());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 4 && stats.size(0) == P.B &&
                  stats.size(1) == P.H && stats.size(2) == P.Tq && stats.size(3) == 2 &&
                  stats.device() == q_in.device(),
              "oeb_attention_backward: stats must be float32 of shape (", P.B, ", ", P.H, ", ", P.Tq,
              ", 2) on q's device, got ", stats.scalar_type(), " ", stats.sizes(), " on ", stats.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor seg = seg_start.contiguous(), kv = kv_start.contiguous();
  const int64_t min_kv = check_indices(P, seg, kv);
  if (q_in.scalar_type() == at::kDouble)
    return backward_on_cpu(grad_out, q_in, k_in, v_in, lse, stats, seg, kv, strength, num_sink, scale);
  check_device_and_sizes(P, q_in);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), dout = grad_out.contiguous();
  Tensor dk = at::zeros(k.sizes(), k.options()), dv = at::zeros(v.sizes(), v.options());
  if (P.B * P.H * P.Tq == 0) return {at::zeros(q.sizes(), q.options()), dk, dv};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int num_sms = at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount;
  Tensor rows = at::empty({P.B, P.H, P.Tq, kRowFields}, q.options().dtype(at::kFloat));
  FwdParams fp = make_fwd_params(P, q, k, v, seg, kv);
  fp.dout = dout.data_ptr();
  fp.vec = fp.vec && aligned16(dout);
  fp.rows = rows.data_ptr<float>();
  fp.mode = kModeRows;
  const RowPlan pl = plan_rows(P, q.scalar_type(), fp.vec != 0, min_kv, /*allow_split=*/false, num_sms);

  Tensor dq, dq_acc;
  if (pl.mma) dq_acc = at::zeros({P.B, P.H, P.Tq, P.d}, q.options().dtype(at::kFloat));
  else dq = at::empty(q.sizes(), q.options());
  BwdParams bp{};
  bp.q = fp.q, bp.k = fp.k, bp.v = fp.v, bp.dout = fp.dout;
  bp.seg = fp.seg, bp.kv = fp.kv;
  bp.rows = rows.data_ptr<float>();
  bp.dq_acc = pl.mma ? dq_acc.data_ptr<float>() : nullptr;
  bp.dq = pl.mma ? nullptr : dq.data_ptr();
  bp.dk = dk.data_ptr(), bp.dv = dv.data_ptr();
  bp.B = fp.B, bp.H = fp.H, bp.Hkv = fp.Hkv, bp.G = fp.G, bp.Tq = fp.Tq, bp.Tk = fp.Tk, bp.d = fp.d;
  bp.num_sink = fp.num_sink, bp.vec = fp.vec, bp.sd = fp.sd;
  bp.scale = fp.scale, bp.scale_log2 = fp.scale_log2;

  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using Elem = decltype(tag);
    launch_rows<Elem>(fp, pl, stream);
    launch_backward<Elem>(bp, fp, pl, stream);
  });
  if (pl.mma) dq = dq_acc.to(q.scalar_type());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepflow, CUDA, m) {
  m.impl("oeb_attention", &oeb_attention_cuda);
  m.impl("oeb_attention_backward", &oeb_attention_backward_cuda);
}

}  // namespace stepflow
