// Odds-Equal Bridge attention on CUDA (design.md 2.3; backward: docs/method.md section 3).
//
// Same semantics and checks as csrc/cpu/oeb_attention.cpp, except that the index values
// (kv_start, bounds) and the sink logits are checked on the device (device_checks.cuh: a device-
// side assert, no device-to-host copy), so a call never synchronizes with the host and can be
// captured in a CUDA graph. For one query row (batch b, head h,
// query i at key position p = Tk - Tq + i) oeb::row_groups (csrc/include/oeb_rule.h) turns
// (kv_start[b], bounds[b, i], window) into three contiguous key groups
//   group 0 = [lo, a)   never rescaled   (bridge: O, the "other" channel; odds: the sinks)
//   group 1 = [a, b)                     (bridge: B, the bridge;          odds: X, the context)
//   group 2 = [b, p]                     (bridge: S, the query's channel; odds: C, its step)
// with lo = max(kv_start, p - window + 1); bounds (-1, -1) = not intervened (every key in group 0).
// The per-row arithmetic of both rules (and of an optional per-head sink logit in the final
// softmax) is oeb::row_forward / oeb::row_backward of that header, in double, once per row: the
// CPU and CUDA kernels share it. All a kernel adds is the group log-masses L_g, from which
// row_forward returns log r_g with A'_j = exp(s_j - lse + log r_g) (s_j = scale q . k_j).
//
// Forward (flash-attention style). A CTA owns a block of "packed rows" of one (batch, kv head):
// row r is query i = r % Tq of query head h = kv_head * G + r / Tq, so all query heads that
// share a kv head (GQA) read each K/V tile once. K and V tiles are staged in shared memory. Per
// row the kernel keeps three online-softmax states (running max m_s, sum l_s) and three value
// accumulators U_s, one per accumulation slot s: an intervened row has slot s = group s; a row
// that is not intervened has all its keys (its group 0) in slot 2, so question rows never touch
// slot 0. Each slot has its own max, so L_g = m_s + log l_s is exact even where p_g underflows
// fp32. The epilogue is, per row,
//     out = sum_s exp(m_s + log r_g(s) - lse) U_s,
// each coefficient p'_g / l_s <= 1, so nothing overflows however large r_g is.
//
// Group 0 of an intervened row (bridge rule: the question, for a summary query) is a key range
// like the others, of any length and different per row, so it is accumulated like the others,
// in the same pass over the key tiles (no second pass, no assumption about its size). Where the
// two register accumulators of the tensor-core path already use the register file (255
// registers at d = 128), U_0 lives in shared memory instead: in the mma.sync C-fragment layout
// every element of U_0 belongs to exactly one thread, so it is thread-private storage that needs
// no barrier; a tile that holds slot-0 keys of some row of the warp adds its P_0 V product (one
// 16 x 8 C fragment at a time, 4 registers) into it. The scalar path keeps U_0 in registers.
//
// Sliding window: the key range of a row starts at lo = max(kv_start, p - window + 1), which
// grows with the query. A block's tile loop runs over [lo of its first query, end of its last
// query) and every element is masked by its row's own range, so rows of one block may have
// different windows (and GQA blocks that span two heads cover both ends).
//
// Two implementations of that row kernel:
//   - tensor cores (bf16 / fp16, d <= 128, head dim bucket 64 or 128, 16-byte aligned rows):
//     each warp owns 16 rows, S = Q K^T and P V are warp-level m16n8k16 mma.sync products with
//     fp32 accumulation, P goes from the S accumulators to the A operand in registers (as in
//     flash-attention 2); K / V tiles are double buffered with cp.async; V's B fragments come
//     from ldmatrix.trans; a key tile inside one slot for all 16 rows of a warp skips the
//     per-element slot masks; 64 keys per tile at D = 64, 32 at D = 128 (64 selectable); 1 warp
//     per CTA for a few rows (decode), else 4. ldmatrix, the one-slot step and the tile width
//     are switchable (csrc/include/tuning.h, docs/method_kernels.md section 6);
//   - scalar FMA (fp32 inputs, whose 2e-5 test tolerance rules out tf32; any dtype with
//     128 < d <= 256 or unaligned rows): fp32 tiles in shared memory, 8 lanes per row, float4
//     dot products.
//
// Decode (few rows against a long KV cache): split-KV. Several CTAs per row block each take a
// contiguous chunk of its key tiles and write per-slot partial states (m, l, U_0, U_1, U_2); a
// second kernel merges them (one warp per row, in split order) and runs the same epilogue. The
// plan is sized from the shapes (the key span of a row with kv_start = 0), not from kv_start's
// values: a row that starts later has empty splits (l = 0), which the merge skips.
//
// Backward: dS_ij = A'_ij (dP_ij - ct_g), A'_ij = exp(s_ij - shift_g), shift_g = lse - log r_g,
// ct_g from oeb::row_backward. (1) The row kernel in "rows" mode recomputes the slot states and,
// in its epilogue, D_g (mean of dP_j = dO . v_j under A over group g), row_forward, row_backward
// and (shift_g, ct_g) per row (6 floats, shift in log2 units). (2) Tensor cores: a kernel per
// (batch, kv head, block of 64 keys) whose warps own 16 keys each and accumulate dK, dV in
// registers over the query blocks of all query heads of the kv head that reach the keys (no
// atomics); dQ goes through fp32 atomics into a (B, H, Tq, d) buffer that is cast at the end (so
// the last bits of dq vary from run to run). Scalar path: the same dK / dV kernel shape with 16
// keys per CTA, and dQ from a separate row kernel (no atomics): the backward takes it under
// torch.use_deterministic_algorithms(True). The gradient of the sink logit is computed in Python (stepflow_ext/ops.py)
// from out and stats.
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
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cp_async.cuh"
#include "device_checks.cuh"
#include "oeb_rule.h"
#include "kernel_index.h"
#include "tuning.h"

namespace stepflow {
namespace {

using at::Tensor;

constexpr unsigned kFull = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.69314718055994530942;
constexpr int kRowFields = 6;  // per-row backward record: shift_g (3, log2 units), ct_g (3)

// Epilogue modes of the row kernel.
constexpr int kModeOut = 0;      // write out, lse, stats
constexpr int kModePartial = 1;  // split-KV: write per-slot partial states, merged by oeb_combine_kernel
constexpr int kModeRows = 2;     // backward pass 1: write (shift_g, ct_g) per row

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
  // load_b_kmajor by ldmatrix.trans (issue 15 item 8): the same B fragments, one instruction for
  // two (x4: column tiles n0 and n0 + 8) or one (x2) instead of 4 (8) scalar 16-bit loads. Matrix
  // q of an ldmatrix is 8 rows of 8 consecutive 16-bit elements whose row addresses come from lanes
  // 8q .. 8q + 7; with .trans lane 4 g + t receives (row 2t, column g) and (row 2t + 1, column g) of
  // matrix q in its register q, the lower-numbered row in the low half. Rows of V are keys (k) and
  // columns are n, so matrix q = keys k0 + 8 (q & 1) + [0, 8) at columns n0 + 8 (q >> 1) + [0, 8)
  // gives lane (g, t) exactly B[2t][g], B[2t + 1][g] (q even) and B[2t + 8][g], B[2t + 9][g] (q odd)
  // of the m16n8k16 B layout. Rows must be 16-byte aligned: ld and n0 multiples of 8 elements
  // (tests/test_cuda_index_emulation.py replays this layout against the scalar loads).
  static __device__ __forceinline__ void load_b_kmajor_x4(B& f0, B& f1, const Elem* s, int ld, int k0, int n0) {
    int row, col;
    index::ldm_x4_trans_row(threadIdx.x & 31, k0, n0, row, col);
    const Elem* p = s + row * ld + col;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(f0.x[0]), "=r"(f0.x[1]), "=r"(f1.x[0]), "=r"(f1.x[1])
                 : "r"(a));
#else
    (void)p;
    f0.x[0] = f0.x[1] = f1.x[0] = f1.x[1] = 0u;
#endif
  }
  static __device__ __forceinline__ void load_b_kmajor_x2(B& f, const Elem* s, int ld, int k0, int n0) {
    int row, col;
    index::ldm_x2_trans_row(threadIdx.x & 31, k0, n0, row, col);
    const Elem* p = s + row * ld + col;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(f.x[0]), "=r"(f.x[1])
                 : "r"(a));
#else
    (void)p;
    f.x[0] = f.x[1] = 0u;
#endif
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

// The key groups of query i (key position Tk - Tq + i) of batch row b, from kv_start, bounds and
// the window by oeb::row_groups: (x, y, z, w) with group 0 = [x, y), group 1 = [y, z), group 2 =
// [z, w). A row that is not intervened has y = z = w (every key in group 0).
__device__ __forceinline__ int4 group_keys(const int64_t* kv, const int64_t* bounds, int Tq, int Tk, int window,
                                           int b, int i, bool& intervened) {
  const int64_t* bd = bounds + (static_cast<int64_t>(b) * Tq + i) * 2;
  const oeb::Groups G = oeb::row_groups(kv[b], bd[0], bd[1], Tk - Tq + i, window);
  intervened = G.intervened;
  return make_int4(static_cast<int>(G.lo[0]), static_cast<int>(G.hi[0]), static_cast<int>(G.hi[1]),
                   static_cast<int>(G.hi[2]));
}

// ------------------------------------------------------------------------------ parameters

struct FwdParams {
  const void *q, *k, *v, *dout;  // q, dout (B, H, Tq, d); k, v (B, Hkv, Tk, d); contiguous
  const int64_t *kv, *bounds;    // (B,), (B, Tq, 2)
  const double* sink;            // (H,) sink logits, or nullptr
  void* out;                     // (B, H, Tq, d), q's dtype
  float *lse, *stats;            // (B, H, Tq), (B, H, Tq, kStatFields)
  float* rows;                   // (B, H, Tq, kRowFields) backward records
  float* part;                   // split-KV partial states
  int B, H, Hkv, G, Tq, Tk, d;
  int window;  // <= 0: full attention
  int mode, tiles_per_split;
  int vec;  // tensor-core path: 16-byte loads allowed
  int tile_fast;  // tensor-core path: the one-slot tile step (kernel_path(kOebTileFast))
  int sd;   // scalar path: shared row stride in floats
  float scale, scale_log2;
  oeb::RuleParams rule;
};

constexpr int kStatFields = 5;  // (p_0, p_1, p_2, p_sink, active)

// One packed row of a forward CTA, by accumulation slot: slot s covers keys [k[s], k[s + 1]).
// Intervened rows: slot s = group s. Rows that are not intervened: slots 0 and 1 are empty and
// slot 2 holds every key (their group 0), so they run on the register accumulators only.
struct RowCtx {
  bool active;  // the packed row exists
  bool inter;   // intervened (bounds != (-1, -1))
  int h, i;
  int k[4];
};

__device__ __forceinline__ RowCtx make_row(const FwdParams& p, int b, int h, int i, bool active) {
  RowCtx c;
  c.active = active, c.inter = false, c.h = h, c.i = i;
  c.k[0] = c.k[1] = c.k[2] = c.k[3] = 0;
  if (active) {
    bool inter;
    const int4 g = group_keys(p.kv, p.bounds, p.Tq, p.Tk, p.window, b, i, inter);
    c.inter = inter;
    c.k[0] = g.x;
    c.k[1] = inter ? g.y : g.x;
    c.k[2] = inter ? g.z : g.x;
    c.k[3] = g.w;
  }
  return c;
}

__device__ __forceinline__ int slot_of(const RowCtx& c, int j) {
  if (j < c.k[0] || j >= c.k[3]) return -1;
  return j < c.k[1] ? 0 : (j < c.k[2] ? 1 : 2);
}

__device__ __forceinline__ int64_t row_index(const FwdParams& p, int b, const RowCtx& c) {
  return (static_cast<int64_t>(b) * p.H + c.h) * p.Tq + c.i;
}

// Floats per partial record: m[3], l[3], U_0[d], U_1[d], U_2[d].
__host__ __device__ __forceinline__ int64_t part_fields(int d) { return 6 + 3 * static_cast<int64_t>(d); }

// ------------------------------------------------------------------- per-row scalars (double)

struct RowScalars {
  float coef[3];          // out = sum_s coef[s] U_s, coef[s] = exp(m_s + log r_g(s) - lse) = p'_g / l_s <= 1
  float lse;              // log-sum-exp over the valid real keys; -inf: the row has no key
  float st[kStatFields];  // (p_0, p_1, p_2, p_sink, active) as oeb::Row gives them
  float rec[kRowFields];  // rows mode: shift_g = (lse - log r_g) in log2 units, ct_g
};

// The rule of one row from its slot states: m[s] the running max (log2 units of the scaled
// logits), l[s] the sum of exp2(x - m[s]) (0: no key in the slot); rows mode: dsum[s] the sum of
// exp2(x - m[s]) dP_j over the slot. The arithmetic is oeb_rule.h's, shared with the CPU kernel.
__device__ __forceinline__ RowScalars row_scalars(const FwdParams& p, const RowCtx& rc, const float m[3],
                                                  const float l[3], const double dsum[3]) {
  const double ninf = -CUDART_INF;
  double Ls[3];  // natural-log mass of each slot
#pragma unroll
  for (int s = 0; s < 3; ++s)
    Ls[s] = l[s] > 0.f ? (static_cast<double>(m[s]) + log2(static_cast<double>(l[s]))) * kLn2 : ninf;
  const bool inter = rc.inter;
  const double L[3] = {inter ? Ls[0] : Ls[2], inter ? Ls[1] : ninf, inter ? Ls[2] : ninf};
  const double n[3] = {static_cast<double>(inter ? rc.k[1] - rc.k[0] : rc.k[3] - rc.k[0]),
                       static_cast<double>(inter ? rc.k[2] - rc.k[1] : 0),
                       static_cast<double>(inter ? rc.k[3] - rc.k[2] : 0)};
  const double sink = (p.sink != nullptr && rc.active) ? p.sink[rc.h] : ninf;
  const oeb::Row row = oeb::row_forward(L, n, sink, inter, p.rule);
  const bool has = rc.active && row.lse > ninf;

  RowScalars o;
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    const double log_r = inter ? row.log_r[s] : row.log_r[0];  // slot s holds group s, or group 0
    o.coef[s] = (has && l[s] > 0.f) ? static_cast<float>(exp(static_cast<double>(m[s]) * kLn2 + log_r - row.lse))
                                    : 0.f;
  }
  o.lse = has ? static_cast<float>(row.lse) : -CUDART_INF_F;
#pragma unroll
  for (int g = 0; g < 3; ++g) o.st[g] = has ? static_cast<float>(row.p[g]) : 0.f;
  o.st[3] = has ? static_cast<float>(row.psink) : 0.f;
  o.st[4] = (has && row.active) ? 1.f : 0.f;
#pragma unroll
  for (int f = 0; f < kRowFields; ++f) o.rec[f] = 0.f;
  if (p.mode == kModeRows && has) {
    // D_g: the mean of dP_j under A over group g (0 for an empty group)
    const double d0 = inter ? (l[0] > 0.f ? dsum[0] / l[0] : 0.0) : (l[2] > 0.f ? dsum[2] / l[2] : 0.0);
    const double d1 = (inter && l[1] > 0.f) ? dsum[1] / l[1] : 0.0;
    const double d2 = (inter && l[2] > 0.f) ? dsum[2] / l[2] : 0.0;
    const double D[3] = {d0, d1, d2};
    double ct[3];
    oeb::row_backward(row, D, p.rule, ct);
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      o.rec[g] = static_cast<float>((row.lse - row.log_r[g]) * kLog2e);
      o.rec[3 + g] = static_cast<float>(ct[g]);
    }
  }
  return o;
}

// lse and stats (out mode) or the backward record (rows mode) of one row.
__device__ __forceinline__ void store_row_scalars(const FwdParams& p, int64_t row, const RowScalars& rs) {
  if (p.mode == kModeRows) {
#pragma unroll
    for (int f = 0; f < kRowFields; ++f) p.rows[row * kRowFields + f] = rs.rec[f];
  } else {
    p.lse[row] = rs.lse;
#pragma unroll
    for (int f = 0; f < kStatFields; ++f) p.stats[row * kStatFields + f] = rs.st[f];
  }
}

// The epilogue of one row whose LANES consecutive lanes each own NC columns col_at(n) (>= d:
// padding) and hold U_s on them as u_at(s, n). Every lane of the row has computed rs.
template <typename Elem, int LANES, int NC, typename ColAt, typename UAt>
__device__ __forceinline__ void write_row(const FwdParams& p, int b, const RowCtx& rc, const RowScalars& rs,
                                          ColAt col_at, UAt u_at) {
  if (!rc.active) return;
  const int64_t row = row_index(p, b, rc);
  if ((threadIdx.x & (LANES - 1)) == 0) store_row_scalars(p, row, rs);
  if (p.mode != kModeOut) return;
  Elem* o = static_cast<Elem*>(p.out) + row * p.d;
#pragma unroll
  for (int n = 0; n < NC; ++n) {
    const int col = col_at(n);
    if (col < p.d) o[col] = from_f<Elem>(fmaf(rs.coef[0], u_at(0, n), fmaf(rs.coef[1], u_at(1, n), rs.coef[2] * u_at(2, n))));
  }
}

// --------------------------------------------------------------------- forward row kernels

// The packed rows of a block and the keys they need. Row r of (batch, kv head) is query
// r % Tq of head kv_head * G + r / Tq. A row's keys [lo, end) move right with its query
// position (lo = max(kv, p - window + 1), end = max(p + 1, kv)), so the block needs
// [lo of its first query, end of its last query); a block that spans two heads holds query 0
// of one and query Tq - 1 of the other.
struct BlockRows {
  int b, hk, bk, r0, R, kstart, kend;
};
__device__ __forceinline__ BlockRows block_rows(const FwdParams& p, int bm) {
  BlockRows br;
  br.R = p.G * p.Tq;
  const int nrb = (br.R + bm - 1) / bm;
  br.bk = blockIdx.x / nrb;
  br.r0 = (nrb - 1 - static_cast<int>(blockIdx.x % nrb)) * bm;  // long (late) blocks first
  br.b = br.bk / p.Hkv, br.hk = br.bk % p.Hkv;
  const int r_last = min(br.r0 + bm, br.R) - 1;
  const bool one_head = br.r0 / p.Tq == r_last / p.Tq;
  const int i_min = one_head ? br.r0 % p.Tq : 0, i_max = one_head ? r_last % p.Tq : p.Tq - 1;
  const int64_t kv = p.kv[br.b], off = p.Tk - p.Tq;
  br.kstart = static_cast<int>(oeb::row_groups(kv, -1, -1, off + i_min, p.window).lo[0]);
  br.kend = static_cast<int>(oeb::row_groups(kv, -1, -1, off + i_max, p.window).hi[0]);
  return br;
}
__device__ __forceinline__ RowCtx row_ctx(const FwdParams& p, const BlockRows& br, int r) {
  const bool active = r < br.R;
  return make_row(p, br.b, br.hk * p.G + (active ? r / p.Tq : 0), active ? r % p.Tq : 0, active);
}
// Key tiles [t_begin, t_end) of this CTA (all of them, or its split-KV chunk); tile t covers
// keys kstart + t * bn + [0, bn).
__device__ __forceinline__ void tile_range(const FwdParams& p, const BlockRows& br, int bn, int& t_begin, int& t_end) {
  const int ntiles = (br.kend - br.kstart + bn - 1) / bn;
  t_begin = 0, t_end = ntiles;
  if (p.mode == kModePartial) {
    t_begin = blockIdx.y * p.tiles_per_split;
    t_end = min(ntiles, t_begin + p.tiles_per_split);
  }
}
// Split-KV record of one row: m[3], l[3], then U_0, U_1, U_2 (d floats each).
__device__ __forceinline__ float* part_record(const FwdParams& p, const BlockRows& br, int r) {
  return p.part + ((static_cast<int64_t>(blockIdx.y) * p.B * p.Hkv + br.bk) * br.R + r) * part_fields(p.d);
}

// Tensor-core path (bf16 / fp16, head dim bucket D = 64 or 128, 16-byte aligned rows). blockDim =
// 32 nw, nw = 1 (few rows: decode) or 4; each warp owns 16 packed rows. K and V tiles are double
// buffered: the copies of tile t + 1 (cp.async) run while tile t is multiplied.
// Keys per tile by default: 64, or 32 at D = 128 (keeps two U's in registers). BN = 64 at D = 128
// is the STEPFLOW_OEB_BN=64 variant, to be measured against it on a GPU (more registers).
template <int D>
constexpr int kDefaultBN = D <= 64 ? 64 : 32;

template <int D, int BN_ = kDefaultBN<D>>
struct MmaFwdCfg {
  static constexpr int BN = BN_;                // keys per tile
  static constexpr int LD = D + 8;              // padded rows: conflict-free fragment loads (and 16-byte
                                                // aligned ones for ldmatrix: (D + 8) * 2 bytes)
  static constexpr int kMinBlocks = 2;
  // Q, then K and V twice (16-bit elements); then U_0, 16 rows x D fp32 per warp.
  static size_t smem(int nw) { return size_t(16 * nw + 4 * BN) * LD * 2 + size_t(nw) * 16 * D * sizeof(float); }
};

// acc[n] += P_slot V over one K/V tile, P_slot = the tile's probabilities masked to one slot
// (bit nt * 4 + e of mask: element e of column tile nt).
// kLdm: V fragments by ldmatrix.trans (two column tiles per instruction at D = 64, one at
// D = 128), else scalar loads.
template <typename Elem, int D, int BN, bool kLdm>
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
    if constexpr (kLdm && D <= 64) {
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        typename O::B f0, f1;
        O::load_b_kmajor_x4(f0, f1, sV, ld, kc * 16, n * 8);
        O::mma(acc[n], fa, f0);
        O::mma(acc[n + 1], fa, f1);
      }
    } else if constexpr (kLdm) {
      // D = 128: one column tile per ldmatrix (x2); x4's two extra live registers cost spills
      // next to the two 16 x 128 accumulators (ptxas, sm_90).
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        typename O::B fb;
        O::load_b_kmajor_x2(fb, sV, ld, kc * 16, n * 8);
        O::mma(acc[n], fa, fb);
      }
    } else {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        typename O::B fb;
        O::load_b_kmajor(fb, sV, ld, kc * 16, n * 8);
        O::mma(acc[n], fa, fb);
      }
    }
  }
}

// The same product for slot 0, whose accumulator is in shared memory: u0[(4 n + e) * 32] is this
// thread's element e of column tile n (the C-fragment layout, so it is private to the thread).
// U_0 <- alpha U_0 + P_0 V, alpha[rho] the rescale of row half rho to the slot's new running max;
// one 16 x 8 fragment at a time (4 accumulator registers).
template <typename Elem, int D, int BN, bool kLdm>
__device__ __forceinline__ void pv_accumulate_smem(float* u0, const float (&pr)[BN / 8][4], uint32_t mask,
                                                   const float (&alpha)[2], const Elem* sV, int ld) {
  using O = Mma16<Elem>;
#pragma unroll 2
  for (int n = 0; n < D / 8; ++n) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
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
      typename O::B fb;
      if constexpr (kLdm) {
        O::load_b_kmajor_x2(fb, sV, ld, kc * 16, n * 8);
      } else {
        O::load_b_kmajor(fb, sV, ld, kc * 16, n * 8);
      }
      O::mma(c, fa, fb);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float& x = u0[(4 * n + e) * 32];
      x = fmaf(x, alpha[e >> 1], c[e]);
    }
  }
}

// Template arguments: BN keys per tile (kDefaultBN<D> or 64), kLdm V fragments by ldmatrix.trans.
// p.tile_fast: tiles inside one slot for all rows of a warp skip the per-element slot masks.
template <typename Elem, int D, int BN, bool kLdm>
__global__ void __launch_bounds__(128, MmaFwdCfg<D, BN>::kMinBlocks) oeb_fwd_mma_kernel(const FwdParams p) {
  using O = Mma16<Elem>;
  using Cfg = MmaFwdCfg<D, BN>;
  constexpr int LD = Cfg::LD, NTN = BN / 8, ND = D / 8;
  static_assert(NTN * 4 <= 32, "the slot masks hold one bit per score of a thread");
  static_assert(ND % 2 == 0 && LD % 8 == 0, "ldmatrix: pairs of column tiles, 16-byte aligned rows");
  constexpr uint32_t kAllBits = NTN * 4 == 32 ? 0xffffffffu : ((1u << (NTN * 4)) - 1u);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nw = static_cast<int>(blockDim.x >> 5);
  const int BM = 16 * nw;
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* sKV = sQ + BM * LD;  // buffer b: K at sKV + 2 b BN LD, V right after it
  float* sU0 = reinterpret_cast<float*>(sKV + 4 * BN * LD);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, tig = lane & 3;
  float* u0 = sU0 + warp * 16 * D + lane;  // this thread's U_0: u0[(4 n + e) * 32]
#pragma unroll
  for (int x = 0; x < 4 * ND; ++x) u0[x * 32] = 0.f;
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
    const int j0 = br.kstart + tile * BN;
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
  float acc1[ND][4], acc2[ND][4];  // U_1, U_2 (U_0 is in shared memory)
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc1[n][e] = acc2[n][e] = 0.f;

  if (t_begin < t_end) issue_tile(t_begin, 0);
  for (int tile = t_begin; tile < t_end; ++tile) {
    const int j0 = br.kstart + tile * BN, buf = (tile - t_begin) & 1;
    if (tile + 1 < t_end) {
      issue_tile(tile + 1, buf ^ 1);  // its buffer was released by the barrier ending the last step
      cp_async_wait<1>();             // this thread's copies of `tile` are done
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // everyone's copies of `tile` (and sQ, first time) are visible
    const Elem* sK = sKV + 2 * buf * BN * LD;
    const Elem* sV = sK + BN * LD;

    // The tile's work for the warp's 16 rows. U = -1: the general step, every score's slot from
    // its row's key ranges; U = 0, 1, 2: every row of the warp has all BN keys of the tile in slot
    // U (the tile lies inside one group: below the diagonal, past the window start), so the slot
    // masks are compile-time constants and the per-element tests fold away. The same arithmetic
    // in the same order either way.
    auto step = [&](auto uni) {
      constexpr int U = decltype(uni)::value;
      bool any[3];
      if constexpr (U < 0) {
        // Which slots does this tile touch for any row of the warp (warp-uniform)?
        bool has[3] = {false, false, false};
#pragma unroll
        for (int rho = 0; rho < 2; ++rho)
#pragma unroll
          for (int s = 0; s < 3; ++s) has[s] = has[s] || (max(rc[rho].k[s], j0) < min(rc[rho].k[s + 1], j0 + BN));
        any[0] = __any_sync(kFull, has[0]), any[1] = __any_sync(kFull, has[1]), any[2] = __any_sync(kFull, has[2]);
        if (!(any[0] || any[1] || any[2])) return;  // e.g. above the causal diagonal or left of the window
      } else {
        any[0] = U == 0, any[1] = U == 1, any[2] = U == 2;
      }
      const bool any0 = any[0], any1 = any[1], any2 = any[2];

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
      if constexpr (U >= 0) mask[U] = kAllBits;
#pragma unroll
      for (int nt = 0; nt < NTN; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sc[nt][e] *= p.scale_log2;
          if constexpr (U < 0) {
            const int s = slot_of(rc[e >> 1], j0 + nt * 8 + 2 * tig + (e & 1));
            const uint32_t bit = 1u << (nt * 4 + e);
            if (s == 0) mask[0] |= bit;
            if (s == 1) mask[1] |= bit;
            if (s == 2) mask[2] |= bit;
          }
        }
      // Online softmax per slot: new running max, rescale what was accumulated under the old one.
      float alpha0[2] = {1.f, 1.f};  // slot 0's rescale, applied where U_0 is updated
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
          if (s == 0) alpha0[rho] = alpha;
          if (s == 1) {
#pragma unroll
            for (int n = 0; n < ND; ++n) acc1[n][2 * rho] *= alpha, acc1[n][2 * rho + 1] *= alpha;
          }
          if (s == 2) {
#pragma unroll
            for (int n = 0; n < ND; ++n) acc2[n][2 * rho] *= alpha, acc2[n][2 * rho + 1] *= alpha;
          }
        }
      // P = exp2(s - m_slot) in place (0 outside the row's keys); per-lane partial sums.
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
      // U_s += P_s V per slot.
      if (any0) pv_accumulate_smem<Elem, D, BN, kLdm>(u0, sc, mask[0], alpha0, sV, LD);
      if (any1) pv_accumulate<Elem, D, BN, kLdm>(acc1, sc, mask[1], sV, LD);
      if (any2) pv_accumulate<Elem, D, BN, kLdm>(acc2, sc, mask[2], sV, LD);
    };
    // The slot that holds the whole tile for both of this thread's rows (-1: none), agreed by the warp.
    int uni = -1;
    if (p.tile_fast) {
      const int s0 = index::tile_slot(rc[0].active, rc[0].k, j0, BN);
      const int s1 = index::tile_slot(rc[1].active, rc[1].k, j0, BN);
      const int me = s0 == s1 ? s0 : -1;
      const int lead = __shfl_sync(kFull, me, 0);
      uni = __all_sync(kFull, me == lead) ? lead : -1;
    }
    if (uni == 2) {
      step(std::integral_constant<int, 2>{});
    } else if (uni == 0) {
      step(std::integral_constant<int, 0>{});
    } else if (uni == 1) {
      step(std::integral_constant<int, 1>{});
    } else {
      step(std::integral_constant<int, -1>{});
    }
    __syncthreads();  // everyone is done with `buf` before the next step refills it
  }

#pragma unroll
  for (int rho = 0; rho < 2; ++rho)
#pragma unroll
    for (int s = 0; s < 3; ++s) l[rho][s] = row_sum<4>(l[rho][s]);
  // U_s on this thread's element (n, 2 rho + e2): row half rho, column 8 n + 2 tig + e2.
  auto U = [&](int s, int rho, int n, int e2) -> float {
    return s == 0 ? u0[(4 * n + 2 * rho + e2) * 32] : (s == 1 ? acc1[n][2 * rho + e2] : acc2[n][2 * rho + e2]);
  };

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
#pragma unroll
            for (int s = 0; s < 3; ++s) rec[6 + s * d + col] = U(s, rho, n, e2);
          }
        }
    }
    return;
  }

  // Rows mode: dsum[rho][s] = sum over slot s of exp2(x - m) dP_j = dO . U_s.
  double dsum[2][3] = {{0.0, 0.0, 0.0}, {0.0, 0.0, 0.0}};
  if (p.mode == kModeRows) {
#pragma unroll
    for (int rho = 0; rho < 2; ++rho) {
      const Elem* g = rc[rho].active ? static_cast<const Elem*>(p.dout) + row_index(p, br.b, rc[rho]) * d : nullptr;
      float dot[3] = {0.f, 0.f, 0.f};
#pragma unroll
      for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          const int col = 8 * n + 2 * tig + e2;
          if (g != nullptr && col < d) {
            const float gv = to_f(g[col]);
#pragma unroll
            for (int s = 0; s < 3; ++s) dot[s] = fmaf(gv, U(s, rho, n, e2), dot[s]);
          }
        }
#pragma unroll
      for (int s = 0; s < 3; ++s) dsum[rho][s] = static_cast<double>(row_sum<4>(dot[s]));
    }
  }

  // The per-row scalars once per row and lane pair: lanes tig = 0, 2 take row half 0, lanes
  // 1, 3 row half 1 (one inlined copy of the double arithmetic); the coefficients then go to
  // the other lanes of the row by shuffles.
  const int me = tig & 1;
  const RowCtx rme = me ? rc[1] : rc[0];
  float mme[3], lme[3];
  double dme[3];
#pragma unroll
  for (int s = 0; s < 3; ++s) {
    mme[s] = me ? m[1][s] : m[0][s];
    lme[s] = me ? l[1][s] : l[0][s];
    dme[s] = me ? dsum[1][s] : dsum[0][s];
  }
  const RowScalars rs = row_scalars(p, rme, mme, lme, dme);
  if (tig < 2 && rme.active) store_row_scalars(p, row_index(p, br.b, rme), rs);
  if (p.mode != kModeOut) return;
#pragma unroll
  for (int rho = 0; rho < 2; ++rho) {
    const int src = (lane & ~3) | rho;
    const float c0 = __shfl_sync(kFull, rs.coef[0], src), c1 = __shfl_sync(kFull, rs.coef[1], src),
                c2 = __shfl_sync(kFull, rs.coef[2], src);
    if (!rc[rho].active) continue;
    Elem* o = static_cast<Elem*>(p.out) + row_index(p, br.b, rc[rho]) * d;
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int col = 8 * n + 2 * tig + e2;
        if (col < d) o[col] = from_f<Elem>(fmaf(c0, U(0, rho, n, e2), fmaf(c1, U(1, rho, n, e2), c2 * U(2, rho, n, e2))));
      }
  }
}

// Scalar path (fp32 inputs, and any dtype with 128 < d <= 256): 128 threads, 16 packed rows per
// CTA, 8 consecutive lanes per row. Tiles are fp32 in shared memory with row stride p.sd; lane
// l8 of a row scores keys l8 + 8 e of a 32-key tile and owns the output columns 4 (l8 + 8 g) + c.
// U_0, U_1, U_2 are in registers (32 columns each per lane).
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

// Shared memory of the scalar forward kernel, in floats: Q, dO (rows mode), K, V tiles, then the
// tile's probabilities of each slot.
__host__ __device__ constexpr size_t gen_fwd_smem_floats(int sd) {
  return size_t(2 * kGenRows + 2 * kGenKeys) * sd + 3 * kGenRows * kGenKeys;
}

template <typename Elem>
__global__ void __launch_bounds__(128) oeb_fwd_generic_kernel(const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int sd = p.sd, d = p.d, d4 = (d + 3) & ~3;
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sG = sQ + kGenRows * sd;  // rows mode: dO
  float* sK = sG + kGenRows * sd;
  float* sV = sK + kGenKeys * sd;
  float* sP = sV + kGenKeys * sd;  // slot s: sP + s * kGenRows * kGenKeys, (row, key)
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
  float a0[kGenCols], a1[kGenCols], a2[kGenCols];
#pragma unroll
  for (int n = 0; n < kGenCols; ++n) a0[n] = a1[n] = a2[n] = 0.f;

  for (int tile = t_begin; tile < t_end; ++tile) {
    const int j0 = br.kstart + tile * kGenKeys;
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
    for (int s = 0; s < 3; ++s) any[s] = __any_sync(kFull, max(rc.k[s], j0) < min(rc.k[s + 1], j0 + kGenKeys));
    if (!(any[0] || any[1] || any[2])) continue;

    float sc[4];
    int code[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sc[e] = gen_dot(sQ + rl * sd, sK + (l8 + 8 * e) * sd, d4) * p.scale_log2;
      code[e] = slot_of(rc, j0 + l8 + 8 * e);
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
      if (s == 0) {
#pragma unroll
        for (int n = 0; n < kGenCols; ++n) a0[n] *= alpha;
      }
      if (s == 1) {
#pragma unroll
        for (int n = 0; n < kGenCols; ++n) a1[n] *= alpha;
      }
      if (s == 2) {
#pragma unroll
        for (int n = 0; n < kGenCols; ++n) a2[n] *= alpha;
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
#pragma unroll
        for (int s = 0; s < 3; ++s) sP[(s * kGenRows + rl) * kGenKeys + l8 + 8 * e] = code[e] == s ? pv : 0.f;
      }
    }
    if (rows_mode) continue;  // the rows pass needs no P V
    __syncwarp();  // a row's probabilities are written and read by its own 8 lanes
    if (any[0]) gen_pv(a0, sP + (0 * kGenRows + rl) * kGenKeys, sV, sd, l8, d4);
    if (any[1]) gen_pv(a1, sP + (1 * kGenRows + rl) * kGenKeys, sV, sd, l8, d4);
    if (any[2]) gen_pv(a2, sP + (2 * kGenRows + rl) * kGenKeys, sV, sd, l8, d4);
  }

#pragma unroll
  for (int s = 0; s < 3; ++s) l[s] = row_sum<8>(l[s]);
  auto u_at = [&](int s, int n) { return s == 0 ? a0[n] : (s == 1 ? a1[n] : a2[n]); };
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
        if (col < d) {
#pragma unroll
          for (int s = 0; s < 3; ++s) rec[6 + s * d + col] = u_at(s, n);
        }
      }
    }
    return;
  }
#pragma unroll
  for (int s = 0; s < 3; ++s) u[s] = row_sum<8>(u[s]);
  const RowScalars rs = row_scalars(p, rc, m, l, u);
  write_row<Elem, 8, kGenCols>(p, br.b, rc, rs, [&](int n) { return gen_col(l8, n); }, u_at);
}

// Split-KV merge: one warp per packed row; lane owns columns lane + 32 n (d <= 256).
template <typename Elem>
__global__ void __launch_bounds__(128) oeb_combine_kernel(const FwdParams p, int num_splits) {
  const int lane = threadIdx.x & 31;
  const int R = p.G * p.Tq;
  const int64_t grow = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (grow >= static_cast<int64_t>(p.B) * p.Hkv * R) return;  // whole warp
  const int bk = static_cast<int>(grow / R), r = static_cast<int>(grow % R);
  const int b = bk / p.Hkv, hk = bk % p.Hkv;
  const RowCtx rc = make_row(p, b, hk * p.G + r / p.Tq, r % p.Tq, true);

  const int64_t pf = part_fields(p.d), stride = static_cast<int64_t>(p.B) * p.Hkv * R * pf;
  const float* base = p.part + (static_cast<int64_t>(bk) * R + r) * pf;
  float M[3] = {-CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F}, L[3] = {0.f, 0.f, 0.f};
  for (int sp = 0; sp < num_splits; ++sp) {
    const float* rec = base + sp * stride;
#pragma unroll
    for (int s = 0; s < 3; ++s)
      if (rec[3 + s] > 0.f) M[s] = fmaxf(M[s], rec[s]);
  }
  float a0[8], a1[8], a2[8];
#pragma unroll
  for (int n = 0; n < 8; ++n) a0[n] = a1[n] = a2[n] = 0.f;
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
        if (w[0] > 0.f) a0[n] = fmaf(w[0], rec[6 + col], a0[n]);
        if (w[1] > 0.f) a1[n] = fmaf(w[1], rec[6 + p.d + col], a1[n]);
        if (w[2] > 0.f) a2[n] = fmaf(w[2], rec[6 + 2 * p.d + col], a2[n]);
      }
    }
  }
  const double no_dsum[3] = {0.0, 0.0, 0.0};
  const RowScalars rs = row_scalars(p, rc, M, L, no_dsum);
  write_row<Elem, 32, 8>(p, b, rc, rs, [&](int n) { return lane + 32 * n; },
                         [&](int s, int n) { return s == 0 ? a0[n] : (s == 1 ? a1[n] : a2[n]); });
}
// ------------------------------------------------------------------------- backward kernels

struct BwdParams {
  const void *q, *k, *v, *dout;  // as FwdParams
  const int64_t *kv, *bounds;    // (B,), (B, Tq, 2)
  const float* rows;             // (B, H, Tq, 6) from the rows pass
  float* dq_acc;                 // tensor-core path: (B, H, Tq, d) fp32, zero on entry, atomics
  void* dq;                      // scalar path: (B, H, Tq, d) in q's dtype, written by oeb_bwd_q_generic_kernel
  void *dk, *dv;                 // (B, Hkv, Tk, d), zero on entry
  int B, H, Hkv, G, Tq, Tk, d, window;
  int vec, sd;
  float scale, scale_log2;
};

// The per-query backward scalars of a step, staged in shared memory: the key groups (x, y, z, w)
// of group_keys, shift_g in log2 units and ct_g (4 slots each, the 4th unused).
__device__ __forceinline__ void stage_row_scalars(const BwdParams& p, int b, int64_t bh, int i0, int nq, int4* sRg,
                                                  float* sSh, float* sCt) {
  for (int rr = threadIdx.x; rr < nq; rr += blockDim.x) {
    const int i = i0 + rr;
    int4 rg = make_int4(0, 0, 0, 0);  // no keys
    float sh[3] = {0.f, 0.f, 0.f}, ct[3] = {0.f, 0.f, 0.f};
    if (i < p.Tq) {
      bool inter;
      rg = group_keys(p.kv, p.bounds, p.Tq, p.Tk, p.window, b, i, inter);
      const float* rec = p.rows + (bh * p.Tq + i) * kRowFields;
#pragma unroll
      for (int g = 0; g < 3; ++g) sh[g] = rec[g], ct[g] = rec[3 + g];
    }
    sRg[rr] = rg;
#pragma unroll
    for (int g = 0; g < 3; ++g) sSh[4 * rr + g] = sh[g], sCt[4 * rr + g] = ct[g];
  }
}

// Queries [i_lo, i_hi) that can reach some key of [j0, j1): causally p_i >= j0 and, with a window
// w, lo_i = p_i - w + 1 <= j1 - 1 (p_i = Tk - Tq + i). The others have A' = 0 on these keys.
__device__ __forceinline__ void query_range(const BwdParams& p, int j0, int j1, int& i_lo, int& i_hi) {
  const int off = p.Tk - p.Tq;
  i_lo = max(0, j0 - off);
  i_hi = p.window > 0 ? min(p.Tq, j1 - 1 + p.window - off) : p.Tq;
}

// Three per-group scalars held in registers (a select, not a runtime-indexed local array).
struct Three {
  float v[3];
  __device__ __forceinline__ float operator[](int g) const { return g == 0 ? v[0] : (g == 1 ? v[1] : v[2]); }
};

// A' = exp(s - shift_g) and dS = A' (dP - ct_g) for key j of a query with key groups rg and
// per-group shift (log2 units) and ct (s in raw units).
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
  int i_lo, i_hi;  // the queries that reach the block
  query_range(p, j0, min(j0 + BN, p.Tk), i_lo, i_hi);
  if (j0 + BN <= kvb || i_lo >= i_hi) return;  // padding keys only, or no query reaches them: dk, dv stay 0

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
    for (int i0 = i_lo; i0 < i_hi; i0 += BM) {
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
  int i_lo, i_hi;
  query_range(p, j0, min(j0 + BK, Tk), i_lo, i_hi);
  if (j0 + BK <= kvb || i_lo >= i_hi) return;

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
    for (int i0 = i_lo; i0 < i_hi; i0 += BQ) {
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
  const int ntiles = (br.kend - br.kstart + kGenKeys - 1) / kGenKeys;
  const RowCtx rc = row_ctx(p, br, br.r0 + rl);
  const int64_t row = row_index(p, br.b, rc);
  bool inter;
  const int4 rg = rc.active ? group_keys(p.kv, p.bounds, p.Tq, p.Tk, p.window, br.b, rc.i, inter) : make_int4(0, 0, 0, 0);
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
    const int j0 = br.kstart + tile * kGenKeys;
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

Problem check_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv_start, const Tensor& bounds,
                      const std::string& rule, double strength, double tau_max, double eps,
                      const std::optional<Tensor>& sink, int64_t window, double scale) {
  TORCH_CHECK(q.is_cuda(), "oeb_attention (CUDA kernel): q must be on a CUDA device, got ", q.device());
  return check_oeb_arguments(q, k, v, kv_start, bounds, rule, strength, tau_max, eps, sink, window, scale);
}

// The window as the kernels take it: <= 0 for full attention (also for windows that reach every
// key, which keeps the index arithmetic in int).
int kernel_window(const Problem& P) { return (P.window <= 0 || P.window >= P.Tk) ? -1 : static_cast<int>(P.window); }

// The largest number of keys a block of rows can need, (end of the last query) - (lo of the
// first query), which sizes the split-KV plan. From the shapes alone (no device-to-host copy):
// the bound of a row whose kv_start is 0; a row that starts later just has empty splits (the
// merge kernel skips them), as rows of one batch with different kv_start always had.
int64_t span_bound(const Problem& P) {
  if (P.B == 0 || P.Tq == 0) return 0;
  const int window = kernel_window(P);
  const int64_t lo = oeb::row_groups(0, -1, -1, P.Tk - P.Tq, window).lo[0];
  const int64_t end = oeb::row_groups(0, -1, -1, P.Tk - 1, window).hi[0];
  return end - lo;
}

void check_device_and_sizes(const Problem& P, const Tensor& q) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(prop->major >= 8, "oeb_attention (CUDA kernel): needs compute capability 8.0 or newer, device ",
              q.device(), " has ", prop->major, ".", prop->minor);
  TORCH_CHECK(P.d <= kHeadDimMax, "oeb_attention (CUDA kernel): head dim up to ", kHeadDimMax, " is supported, got ", P.d);
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
  bool ldm;  // tensor-core path: V by ldmatrix.trans (kernel_path(kOebLdmatrix))
  int BN;    // tensor-core path: keys per tile (kDefaultBN, or 64 at Dp = 128 by kernel_path(kOebBn))
  int Dp, nw, splits, tiles_per_split;
  int64_t blocks;
  size_t smem;
};

RowPlan plan_rows(const Problem& P, at::ScalarType dt, bool vec, int64_t max_span, bool allow_split, int num_sms) {
  RowPlan pl{};
  // Tensor cores for bf16 / fp16 with d <= 128 and 16-byte aligned rows (cp.async); else scalar.
  pl.mma = dt != at::kFloat && P.d <= 128 && vec;
  pl.Dp = P.d <= 64 ? 64 : 128;
  const int64_t R = P.G * P.Tq;
  pl.nw = pl.mma ? (R <= 16 ? 1 : 4) : 4;
  const int64_t BM = pl.mma ? 16 * pl.nw : kGenRows;
  pl.ldm = kernel_path(kOebLdmatrix) != 0;
  pl.BN = pl.Dp == 64 ? kDefaultBN<64> : (kernel_path(kOebBn) == 64 ? 64 : kDefaultBN<128>);
  const int64_t BN = pl.mma ? pl.BN : kGenKeys;
  pl.smem = pl.mma ? (pl.Dp == 64        ? MmaFwdCfg<64>::smem(pl.nw)
                      : pl.BN == 64      ? MmaFwdCfg<128, 64>::smem(pl.nw)
                                         : MmaFwdCfg<128>::smem(pl.nw))
                   : gen_fwd_smem_floats(generic_stride(P.d)) * sizeof(float);
  pl.blocks = P.B * P.Hkv * ((R + BM - 1) / BM);
  pl.splits = 1;
  pl.tiles_per_split = 0;
  const int64_t max_tiles = (max_span + BN - 1) / BN;
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
      // The old path (scalar V loads) is kept at the default tile widths only.
      auto kernel = pl.Dp == 64 ? (pl.ldm ? oeb_fwd_mma_kernel<Elem, 64, kDefaultBN<64>, true>
                                          : oeb_fwd_mma_kernel<Elem, 64, kDefaultBN<64>, false>)
                    : pl.BN == 64 ? oeb_fwd_mma_kernel<Elem, 128, 64, true>
                    : pl.ldm      ? oeb_fwd_mma_kernel<Elem, 128, kDefaultBN<128>, true>
                                  : oeb_fwd_mma_kernel<Elem, 128, kDefaultBN<128>, false>;
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

// sink_d: the sink logits as float64 on the device (undefined: no sink).
FwdParams make_fwd_params(const Problem& P, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv,
                          const Tensor& bounds, const Tensor& sink_d) {
  FwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr(), p.dout = q.data_ptr();
  p.kv = kv.data_ptr<int64_t>(), p.bounds = bounds.data_ptr<int64_t>();
  p.sink = sink_d.defined() ? sink_d.data_ptr<double>() : nullptr;
  p.B = static_cast<int>(P.B), p.H = static_cast<int>(P.H), p.Hkv = static_cast<int>(P.Hkv);
  p.G = static_cast<int>(P.G), p.Tq = static_cast<int>(P.Tq), p.Tk = static_cast<int>(P.Tk);
  p.d = static_cast<int>(P.d), p.window = kernel_window(P);
  p.scale = static_cast<float>(P.scale);
  p.scale_log2 = static_cast<float>(P.scale * 1.4426950408889634);
  p.rule = P.rule;
  p.vec = (P.d * q.element_size()) % 16 == 0 && aligned16(q) && aligned16(k) && aligned16(v);
  p.tile_fast = kernel_path(kOebTileFast) != 0;
  p.sd = generic_stride(P.d);
  return p;
}

std::optional<Tensor> sink_on(const std::optional<Tensor>& sink, const at::Device& dev) {
  if (!sink.has_value()) return std::nullopt;
  return sink->to(dev);
}

// The sink logits as float64 on the device (undefined without a sink). Their finiteness is
// checked on the device with the indices (device_checks.cuh).
Tensor sink_values(const std::optional<Tensor>& sink) {
  if (!sink.has_value()) return Tensor();
  return sink->to(at::kDouble).contiguous();
}

// The index values (kv_start, bounds) and the sink logits, checked on the device: no sync.
void check_values_on_device(const Problem& P, const Tensor& kv, const Tensor& bounds, const Tensor& sink_d,
                            bool backward, cudaStream_t stream) {
  device_checks::check_oeb_inputs(kv.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(),
                                  sink_d.defined() ? sink_d.data_ptr<double>() : nullptr, P.B, P.Tq, P.Tk, P.H,
                                  backward, stream);
}

// float64 has no CUDA kernel: it runs the CPU kernel on host copies (exact CPU semantics; the
// dispatcher picks the CPU kernel from the tensors' device).
std::tuple<Tensor, Tensor, Tensor> forward_on_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kv,
                                                  const Tensor& bounds, c10::string_view rule, double strength,
                                                  double tau_max, double eps, const std::optional<Tensor>& sink,
                                                  int64_t window, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stepflow::oeb_attention", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view,
                           double, double, double, const std::optional<Tensor>&, int64_t, double)>();
  // sync-ok: float64 runs the CPU kernel on host copies (a synchronizing path, docs/method_kernels.md)
  const auto r = op.call(q.cpu(), k.cpu(), v.cpu(), kv.cpu(), bounds.cpu(), rule, strength, tau_max, eps,
                         sink_on(sink, at::kCPU), window, scale);
  const auto dev = q.device();
  return {std::get<0>(r).to(dev), std::get<1>(r).to(dev), std::get<2>(r).to(dev)};
}

std::tuple<Tensor, Tensor, Tensor> backward_on_cpu(const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& lse, const Tensor& stats,
                                                   const Tensor& kv, const Tensor& bounds, c10::string_view rule,
                                                   double strength, double tau_max, double eps,
                                                   const std::optional<Tensor>& sink, int64_t window, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("stepflow::oeb_attention_backward", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, c10::string_view, double, double, double,
                           const std::optional<Tensor>&, int64_t, double)>();
  // sync-ok: float64 runs the CPU kernel on host copies
  const auto r = op.call(grad_out.cpu(), q.cpu(), k.cpu(), v.cpu(), lse.cpu(), stats.cpu(), kv.cpu(), bounds.cpu(),
                         rule, strength, tau_max, eps, sink_on(sink, at::kCPU), window, scale);
  const auto dev = q.device();
  return {std::get<0>(r).to(dev), std::get<1>(r).to(dev), std::get<2>(r).to(dev)};
}

std::tuple<Tensor, Tensor, Tensor> oeb_attention_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                      const Tensor& kv_start, const Tensor& bounds_in,
                                                      c10::string_view rule, double strength, double tau_max,
                                                      double eps, const std::optional<Tensor>& sink, int64_t window,
                                                      double scale) {
  const Problem P = check_problem(q_in, k_in, v_in, kv_start, bounds_in, std::string(rule), strength, tau_max, eps,
                                  sink, window, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor kv = kv_start.contiguous(), bounds = bounds_in.contiguous();
  // float64: the CPU kernel on host copies (it checks the values on the host; a synchronizing path).
  if (q_in.scalar_type() == at::kDouble)
    return forward_on_cpu(q_in, k_in, v_in, kv, bounds, rule, strength, tau_max, eps, sink, window, scale);
  check_device_and_sizes(P, q_in);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor sink_d = sink_values(sink);
  check_values_on_device(P, kv, bounds, sink_d, /*backward=*/false, stream);
  const int64_t max_span = span_bound(P);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({P.B, P.H, P.Tq}, q.options().dtype(at::kFloat));
  Tensor stats = at::empty({P.B, P.H, P.Tq, kStatFields}, q.options().dtype(at::kFloat));
  if (P.B * P.H * P.Tq == 0) return {out, lse, stats};

  FwdParams p = make_fwd_params(P, q, k, v, kv, bounds, sink_d);
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>(), p.stats = stats.data_ptr<float>();
  const int num_sms = at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount;
  const RowPlan pl = plan_rows(P, q.scalar_type(), p.vec != 0, max_span, /*allow_split=*/true, num_sms);
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
// group log-masses per group (exact where a group's mass underflows fp32), which lse and stats
// cannot give.
std::tuple<Tensor, Tensor, Tensor> oeb_attention_backward_cuda(const Tensor& grad_out, const Tensor& q_in,
                                                               const Tensor& k_in, const Tensor& v_in,
                                                               const Tensor& lse, const Tensor& stats,
                                                               const Tensor& kv_start, const Tensor& bounds_in,
                                                               c10::string_view rule, double strength, double tau_max,
                                                               double eps, const std::optional<Tensor>& sink,
                                                               int64_t window, double scale) {
  const Problem P = check_problem(q_in, k_in, v_in, kv_start, bounds_in, std::string(rule), strength, tau_max, eps,
                                  sink, window, scale);
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
                  stats.size(1) == P.H && stats.size(2) == P.Tq && stats.size(3) == kStatFields &&
                  stats.device() == q_in.device(),
              "oeb_attention_backward: stats must be float32 of shape (", P.B, ", ", P.H, ", ", P.Tq, ", ",
              kStatFields, ") on q's device, got ", stats.scalar_type(), " ", stats.sizes(), " on ", stats.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor kv = kv_start.contiguous(), bounds = bounds_in.contiguous();
  if (q_in.scalar_type() == at::kDouble)
    return backward_on_cpu(grad_out, q_in, k_in, v_in, lse, stats, kv, bounds, rule, strength, tau_max, eps, sink,
                           window, scale);
  check_device_and_sizes(P, q_in);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Tensor sink_d = sink_values(sink);
  check_values_on_device(P, kv, bounds, sink_d, /*backward=*/true, stream);
  const int64_t max_span = span_bound(P);
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), dout = grad_out.contiguous();
  Tensor dk = at::zeros(k.sizes(), k.options()), dv = at::zeros(v.sizes(), v.options());
  if (P.B * P.H * P.Tq == 0) return {at::zeros(q.sizes(), q.options()), dk, dv};

  // torch.use_deterministic_algorithms(True): the scalar path, whose dQ kernel owns its rows (the
  // tensor-core path adds dQ with fp32 atomics, in an order that varies from run to run).
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int num_sms = at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount;
  Tensor rows = at::empty({P.B, P.H, P.Tq, kRowFields}, q.options().dtype(at::kFloat));
  FwdParams fp = make_fwd_params(P, q, k, v, kv, bounds, sink_d);
  fp.dout = dout.data_ptr();
  fp.vec = fp.vec && aligned16(dout);
  fp.rows = rows.data_ptr<float>();
  fp.mode = kModeRows;
  const RowPlan pl = plan_rows(P, q.scalar_type(), fp.vec != 0 && !deterministic, max_span, /*allow_split=*/false,
                               num_sms);

  Tensor dq, dq_acc;
  if (pl.mma) dq_acc = at::zeros({P.B, P.H, P.Tq, P.d}, q.options().dtype(at::kFloat));
  else dq = at::empty(q.sizes(), q.options());
  BwdParams bp{};
  bp.q = fp.q, bp.k = fp.k, bp.v = fp.v, bp.dout = fp.dout;
  bp.kv = fp.kv, bp.bounds = fp.bounds;
  bp.rows = rows.data_ptr<float>();
  bp.dq_acc = pl.mma ? dq_acc.data_ptr<float>() : nullptr;
  bp.dq = pl.mma ? nullptr : dq.data_ptr();
  bp.dk = dk.data_ptr(), bp.dv = dv.data_ptr();
  bp.B = fp.B, bp.H = fp.H, bp.Hkv = fp.Hkv, bp.G = fp.G, bp.Tq = fp.Tq, bp.Tk = fp.Tk, bp.d = fp.d;
  bp.window = fp.window, bp.vec = fp.vec, bp.sd = fp.sd;
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
