// CUDA kernel of stepflow::step_saliency_pool (design.md 2.2), with the optional OEB rule
// (design.md 2.3) of a layer where the Odds-Equal Bridge is active.
//
//   M[b, a, c] = sum_{i: seg(i)=a} sum_{j <= i: seg(j)=c} I_ij,
//   I_ij = | sum_h A'^h_ij (dO^h_i . v^{g(h)}_j) |  ("sum_abs"),   sum_h | ... |  ("abs_sum"),
//   or (1/H) sum_h | ... |  ("abs_mean", the paper's: abs_sum divided by H at the end).
//
// A is the layer's attention: A_ij = exp(scale q.k_j - lse_i) / (1 + sigma_i) over the causal
// valid keys (inside the sliding window, if any), sigma_i = exp(sink_h - lse_i) with a per-head
// sink logit (GPT-OSS), 0 without; lse_i is the log-sum-exp over the real keys (no sink). With
// OEB (oeb_bounds given), A' is the OEB attention of oeb_attention with kv_start = the row's
// first valid token: A'_ij = exp(s_ij - lse_i + log r_g) for key j in group g of query i, the
// groups [lo, a), [a, b), [b, i] of oeb::row_groups, log r_g from oeb::row_forward (the shared
// per-row arithmetic of csrc/include/oeb_rule.h, sink included). As in oeb_attention (and the
// reference), OEB's keys are the positions [lo, i], padding inside a row included; without OEB
// padding keys are excluded. Padding is never binned.
//
// Flash-attention structure, no T x T buffer:
//
// 1. stats kernel (when lse is not given, or with OEB): CTA = (batch row, head, block of 64
//    queries); over key tiles of 64 it forms S = q K^T (tensor cores for bf16/fp16) and keeps
//    per query online softmax states (running max and sum): one over the valid keys, or with
//    OEB one per key group, so a group far below the row's max (score gaps beyond exp's range,
//    where its mass underflows fp32 but the rule lifts it) is still resolved. It writes lse
//    (unless given) and, with OEB, per (row, head) the exponent shifts shift_g = lse - log r_g
//    (so that A'_ij = exp(scale s_ij - shift_g)). With OEB the given lse is not read: the pass
//    runs anyway for the group masses and takes lse from them.
// 2. main kernel: CTA = (batch row, block of 64 queries, run of its key tiles: see
//    block_key_tiles; by default the causal band is cut into pieces so that T = 8192, B = 1 makes
//    many CTAs of similar work, not 128 of 1 to 128 tiles), 8 warps; for each key tile of 64 the
//    heads are looped inside (the K/V tile of a kv head is loaded once for its group of query
//    heads when d fits one chunk): S = q K^T and G = dO V^T (wmma 16x16x16 bf16/fp16 with fp32
//    accumulation; exact-FMA tiles for fp32 / fp64), then per element P' = exp(scale S - shift)
//    (shift = lse + log(1 + sigma), or the OEB shift of the element's group), times G, summed
//    over heads in registers (sum_abs: signed, abs_sum / abs_mean: |.|).
//    Each warp owns a 16 x 32 strip of the 64 x 64 tile; each lane one row and 2 x 8 columns.
//    bf16 / fp16 with one head-dim chunk: the (tile, head) steps are pipelined, the next step's
//    tiles copied by cp.async into a double buffer while this one multiplies. The split and the
//    pipeline are switchable back to the old grid and loop (csrc/include/tuning.h,
//    docs/method_kernels.md section 6).
// 3. binning: query rows and key columns of the tile are split into runs of one segment
//    (usually one or two); each lane merges its columns by run, a warp whose lanes all hold the
//    same (row run, column run) pair reduces with shuffles, and the (row run x column run) bins
//    of the tile are summed in shared memory (fp32, fp64 for fp64) before one fp64 atomicAdd per
//    non-zero bin into the (B, S, S) fp64 map, converted to fp32 at the end. The order of those
//    atomics varies from run to run (so may the last bits); under
//    torch.use_deterministic_algorithms(True) the op runs the CPU kernel on host copies instead.
//
// Checks: seg id values, oeb_bounds, padding only at a row's ends (with OEB) and finite sinks are
// checked on the device (device_checks.cuh: a device-side assert, no device-to-host copy).
//
// Key tiles start at the block's first key: the row's first valid token, or with a sliding
// window w the window start of the block's first query (i0 - w + 1); elements are masked per row.
//
// Head dims: any d; the smem tile holds DC columns (64 or 128 for bf16/fp16, 64 for fp32, 32
// for fp64), zero-padded, and larger d runs in chunks of DC (accumulating S and G in the
// fragments). d = 64 and d = 128 run in one chunk with compile-time trip counts.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cfloat>
#include <climits>
#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <type_traits>

#include "checks.h"
#include "cp_async.cuh"
#include "device_checks.cuh"
#include "oeb_rule.h"
#include "kernel_index.h"
#include "tuning.h"

namespace stepflow {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBlock = 64;    // queries per CTA and keys per tile
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStageLd = 20;  // fp32 staging tile of one warp: 16 x 16, leading dim 20
constexpr int kStageFloats = 16 * kStageLd;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
constexpr bool kWmma = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Raw bits of one element (tiles are copied and zero-filled bit-wise).
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

// Dynamic shared memory layouts (every region a multiple of 128 bytes). Main kernel: (Q, dO, K, V
// tiles) x NBUF (2: the pipelined loop's double buffer) | staging (wmma) | bins | per-row shift_0,
// shift_1, shift_2 | ints.
template <typename T, int DC, int NBUF = 1>
struct MainLayout {
  using A = typename Acc<T>::type;
  static constexpr int kLd = DC + 16 / static_cast<int>(sizeof(T));  // +16 bytes per row: fewer bank conflicts
  static constexpr size_t kTile = size_t(kBlock) * kLd * sizeof(T);
  static constexpr size_t kStage = 4 * NBUF * kTile;
  static constexpr size_t kStageBytes = kWmma<T> ? size_t(kWarps) * 2 * kStageFloats * sizeof(float) : 0;
  static constexpr size_t kBins = kStage + kStageBytes;
  static constexpr size_t kRowA = kBins + size_t(kBlock) * kBlock * sizeof(A);
  static constexpr size_t kInts = kRowA + 3 * kBlock * sizeof(A);
  static constexpr size_t kMainBytes = kInts + (6 * kBlock + 4) * sizeof(int);
  static_assert(kTile % 128 == 0 && kStageBytes % 128 == 0, "alignment");
};
// Both kernels' (the main kernel's with single tiles). Stats kernel: Q, K tiles | staging (wmma) |
// combine buffer | ints.
template <typename T, int DC>
struct Layout : MainLayout<T, DC, 1> {
  using Base = MainLayout<T, DC, 1>;
  using A = typename Base::A;
  static constexpr size_t kSStage = 2 * Base::kTile;
  static constexpr size_t kSStageBytes = kWmma<T> ? size_t(kWarps) * kStageFloats * sizeof(float) : 0;
  static constexpr size_t kSComb = kSStage + kSStageBytes;
  static constexpr size_t kSInts = kSComb + 6 * kBlock * sizeof(A);
  static constexpr size_t kStatsBytes = kSInts + 2 * kBlock * sizeof(int);
  static_assert(kSStageBytes % 128 == 0, "alignment");
};

// The main kernel's CTAs per SM (its register cap): two for the tensor-core path, except the
// pipelined one at DC = 128, whose double buffer leaves shared memory for one.
template <typename T, int DC, bool kPipe>
struct MainCfg {
  static constexpr int kMinCTAs = kWmma<T> ? ((kPipe && DC == 128) ? 1 : 2) : 1;
};

template <typename E, typename A>  // E: element type of q, k, v, dO
struct Params {
  const E* q;             // (B, H, T, d)
  const E* k;             // (B, Hkv, T, d)
  const E* v;             // (B, Hkv, T, d)
  const E* o;             // grad_out (B, H, T, d)
  const int32_t* seg;     // (B, T)
  const int64_t* ob;      // OEB bounds (B, T, 2), or null (no OEB)
  const int32_t* bounds;  // (B, 2): first valid position, last valid position + 1
  const A* lse;           // (B, H, T): the given lse, or the stats kernel's output
  A* lse_out;             // stats kernel: where lse goes (null when given)
  A* shift;               // (B, H, T, 3) OEB exponent shifts shift_g = lse - log r_g, or null
  const A* sink;          // (H,) sink logits, or null
  double* M;              // (B, S, S)
  int64_t B, H, Hkv, T, d, S;
  int64_t window;         // <= 0: full attention
  int nchunks;            // ceil(d / DC)
  int tiles_per_split;    // main kernel: key tiles per CTA (blockIdx.y: which run of them); 0: all
  bool vec;               // 16-byte loads allowed
  bool sum_abs;
  A scale;
  oeb::RuleParams rule;
};

// ---------------------------------------------------------------- device helpers

// Rows [0, 64) x columns [col0, col0 + DC) of a (rows_avail x d) row-major matrix into smem
// (ld Ld), zero outside.
template <typename T, int DC, int Ld>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int64_t rows_avail,
                                          int64_t d, int64_t col0, bool vec) {
  if (vec) {
    constexpr int V = 16 / sizeof(T), VPR = DC / V;
    for (int idx = threadIdx.x; idx < kBlock * VPR; idx += kThreads) {
      const int r = idx / VPR, cv = (idx % VPR) * V;
      const int64_t col = col0 + cv;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < rows_avail && col < d) val = *reinterpret_cast<const uint4*>(src + r * d + col);
      *reinterpret_cast<uint4*>(dst + r * Ld + cv) = val;
    }
  } else {
    const Bits<T>* s = reinterpret_cast<const Bits<T>*>(src);
    Bits<T>* t = reinterpret_cast<Bits<T>*>(dst);
    for (int idx = threadIdx.x; idx < kBlock * DC; idx += kThreads) {
      const int r = idx / DC, c = idx % DC;
      const int64_t col = col0 + c;
      t[r * Ld + c] = (r < rows_avail && col < d) ? s[r * d + col] : Bits<T>(0);
    }
  }
}

// load_tile's vec path by cp.async (one chunk: d <= DC, d a multiple of 16 / sizeof(T), 16-byte
// aligned rows): rows [0, 64) of a (rows_avail x d) matrix, zero outside. Completes at cp_async_wait.
template <typename T, int DC, int Ld>
__device__ __forceinline__ void load_tile_async(T* __restrict__ dst, const T* __restrict__ src, int64_t rows_avail,
                                                int64_t d) {
  constexpr int V = 16 / sizeof(T), VPR = DC / V;
  for (int idx = threadIdx.x; idx < kBlock * VPR; idx += kThreads) {
    const int r = idx / VPR, cv = (idx % VPR) * V;
    const bool ok = r < rows_avail && cv < d;
    cp_async_16(dst + r * Ld + cv, ok ? src + r * d + cv : src, ok);
  }
}

// Runs of one segment along 64 positions (by one warp): run[x] = index of x's run (-1 for
// padding), run_seg[run] = its segment, *count = number of runs. Padding splits runs.
__device__ __forceinline__ void runs64(const int* seg, int* run, int* run_seg, int* count) {
  const int lane = threadIdx.x & 31;
  int base = 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int x = half * 32 + lane;
    const int s = seg[x], prev = x > 0 ? seg[x - 1] : -1;
    const bool start = s >= 0 && s != prev;
    const unsigned bal = __ballot_sync(0xffffffffu, start);
    const int idx = base + __popc(bal & ((2u << lane) - 1u)) - 1;  // starts at or before x, minus 1
    run[x] = s >= 0 ? idx : -1;
    if (start) run_seg[idx] = s;
    base += __popc(bal);
  }
  if (lane == 0) *count = base;
}

__device__ __forceinline__ float exp_a(float x) { return __expf(x); }
__device__ __forceinline__ double exp_a(double x) { return exp(x); }
__device__ __forceinline__ float log_a(float x) { return __logf(x); }
__device__ __forceinline__ double log_a(double x) { return log(x); }

// Online softmax state: running max m (-inf: empty) and sum l of exp(s - m).
template <typename A>
struct Soft {
  A m, l;
  __device__ Soft() : m(-INFINITY), l(0) {}
  // Adds the elements of x selected by mask.
  __device__ __forceinline__ void add(const A (&x)[16], uint32_t mask) {
    A mx = -INFINITY;
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      if ((mask >> e) & 1u) mx = x[e] > mx ? x[e] : mx;
    }
    if (mx > m) {  // rescale to the new max (m = -inf: l is 0, exp(-inf) = 0)
      l *= exp_a(m - mx);
      m = mx;
    }
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      if ((mask >> e) & 1u) l += exp_a(x[e] - m);
    }
  }
  __device__ __forceinline__ void merge(A m2, A l2) {
    const A mm = m > m2 ? m : m2;
    if (mm == -INFINITY) return;  // both empty
    l = l * exp_a(m - mm) + l2 * exp_a(m2 - mm);
    m = mm;
  }
  __device__ __forceinline__ void merge_lane_xor1() {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, 1), l2 = __shfl_xor_sync(0xffffffffu, l, 1);
    merge(m2, l2);
  }
  // log of the group's sum of exp(s) (-inf when empty), in double.
  __device__ __forceinline__ double log_sum() const {
    return m == -INFINITY ? -HUGE_VAL : static_cast<double>(m) + log(static_cast<double>(l));
  }
};

// Per-lane ownership of the 64 x 64 tile: warp w has rows 16 (w / 2) .. + 16 and the two 16-col
// sub-tiles 2 (w % 2) and 2 (w % 2) + 1; lane l has row l / 2 of them and columns 8 (l % 2) ..
// + 8 of each sub-tile: element e = 8 t + u <-> (row, col_of(t, u)).
struct Owner {
  int warp, lane, sr, sc0, r, lc;
  __device__ Owner() {
    warp = threadIdx.x >> 5;
    lane = threadIdx.x & 31;
    sr = warp >> 1;
    sc0 = (warp & 1) * 2;
    r = sr * 16 + (lane >> 1);
    lc = (lane & 1) * 8;
  }
  __device__ int col(int t, int u) const { return (sc0 + t) * 16 + lc + u; }
};

// Accumulates the lane's S (and G) values over one chunk: exact FMA tiles (fp32 / fp64).
template <typename T, int DC, int Ld, bool WithG>
__device__ __forceinline__ void fma_chunk(const Owner& w, const T* Qs, const T* Ks, const T* Os, const T* Vs,
                                          int kend, T (&S)[16], T (&G)[16]) {
  constexpr int VK = 16 / sizeof(T);
  for (int k = 0; k < kend; k += VK) {
    T qv[VK], ov[VK];
#pragma unroll
    for (int x = 0; x < VK; ++x) {
      qv[x] = Qs[w.r * Ld + k + x];
      if constexpr (WithG) ov[x] = Os[w.r * Ld + k + x];
    }
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int c = w.col(t, u);
#pragma unroll
        for (int x = 0; x < VK; ++x) {
          S[t * 8 + u] = fma(qv[x], Ks[c * Ld + k + x], S[t * 8 + u]);
          if constexpr (WithG) G[t * 8 + u] = fma(ov[x], Vs[c * Ld + k + x], G[t * 8 + u]);
        }
      }
    }
  }
}

// The tensor-core path: one warp's two 16 x 16 sub-tiles of S (and G) over one chunk.
template <typename T, int DC, int Ld, bool WithG>
__device__ __forceinline__ void wmma_chunk(const Owner& w, const T* Qs, const T* Ks, const T* Os, const T* Vs,
                                           int kend,
                                           wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&fs)[2],
                                           wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&fg)[2]) {
#pragma unroll
  for (int kk = 0; kk < DC / 16; ++kk) {
    if (kk * 16 >= kend) break;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, Qs + (w.sr * 16) * Ld + kk * 16, Ld);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      wmma::load_matrix_sync(fb, Ks + ((w.sc0 + t) * 16) * Ld + kk * 16, Ld);  // K row-major = K^T col-major
      wmma::mma_sync(fs[t], fa, fb, fs[t]);
    }
    if constexpr (WithG) {
      wmma::load_matrix_sync(fa, Os + (w.sr * 16) * Ld + kk * 16, Ld);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        wmma::load_matrix_sync(fb, Vs + ((w.sc0 + t) * 16) * Ld + kk * 16, Ld);
        wmma::mma_sync(fg[t], fa, fb, fg[t]);
      }
    }
  }
}

// The lane's 16 values of fragment pair t from the warp's staging area (ld kStageLd).
__device__ __forceinline__ void unstage(const Owner& w, const float* st, int t, float (&out)[16]) {
#pragma unroll
  for (int u = 0; u < 8; ++u) out[t * 8 + u] = st[(w.r % 16) * kStageLd + w.lc + u];
}

__device__ __forceinline__ double log_add(double x, double y) {
  const double m = fmax(x, y);
  return m + log1p(exp(-fabs(x - y)));
}
__device__ __forceinline__ float log_add(float x, float y) {
  const float m = fmaxf(x, y);
  return m + log1pf(expf(-fabsf(x - y)));
}

// The OEB key groups of query i (a valid token, so i >= lo, the row's first valid token): (x, y,
// z, w) with group 0 = [x, y), group 1 = [y, z), group 2 = [z, w) (oeb::row_groups, as in
// oeb_attention with kv_start = lo). intervened: bounds != (-1, -1).
__device__ __forceinline__ int4 oeb_row_keys(const int64_t* ob, int64_t T, int64_t b, int64_t i, int lo,
                                             int64_t window, bool& intervened) {
  const int64_t* bd = ob + (b * T + i) * 2;
  const oeb::Groups G = oeb::row_groups(lo, bd[0], bd[1], i, window);
  intervened = G.intervened;
  return make_int4(static_cast<int>(G.lo[0]), static_cast<int>(G.hi[0]), static_cast<int>(G.hi[1]),
                   static_cast<int>(G.hi[2]));
}

// The keys of the lane's 16 elements (row i, keys j0 + col) that a query sees: with OEB its
// group ranges gk (padding keys included), else j <= i inside the window. Bits of vmask: keys
// the query sees that are not padding (the binned ones), with OEB g1mask / g2mask: the keys in
// groups 1 / 2 (all groups, padding included, when all_keys is set: the stats pass).
__device__ __forceinline__ void element_masks(const Owner& w, int64_t i, bool row_ok, int64_t j0, const int* colseg,
                                              bool oeb, int4 gk, int64_t window, bool all_keys, uint32_t& vmask,
                                              uint32_t& g1mask, uint32_t& g2mask) {
  vmask = g1mask = g2mask = 0;
  if (!row_ok) return;
#pragma unroll
  for (int t = 0; t < 2; ++t) {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int c = w.col(t, u);
      const int64_t j = j0 + c;
      const uint32_t bit = 1u << (t * 8 + u);
      const bool sees = oeb ? (j >= gk.x && j < gk.w) : (j <= i && (window <= 0 || j > i - window));
      if (sees && (all_keys || colseg[c] >= 0)) {
        vmask |= bit;
        if (oeb && j >= gk.z) {
          g2mask |= bit;
        } else if (oeb && j >= gk.y) {
          g1mask |= bit;
        }
      }
    }
  }
}

// The key tiles of the main kernel's CTA for the query block at i0 (index::pool_block_key_tiles,
// split blockIdx.y). Every (query block, key tile) pair of the causal band is taken by exactly one
// CTA (tests/test_cuda_index_emulation.py), and since each tile's bins go to the map by their own
// atomics, how a block's tiles are shared out does not change what is summed.
template <typename P>
__device__ __forceinline__ void block_key_tiles(const P& p, int64_t i0, int lo, int hi, int64_t& kt_begin,
                                                int64_t& kt_end) {
  index::pool_block_key_tiles(i0, lo, hi, p.window, kBlock, p.tiles_per_split, blockIdx.y, kt_begin, kt_end);
}

// ---------------------------------------------------------------- kernels

// Row bounds: first valid position (T if none) and last valid position + 1 (0 if none).
__global__ void __launch_bounds__(kThreads) bounds_kernel(const int32_t* seg, int64_t T, int32_t* bounds) {
  __shared__ int lo, hi;
  if (threadIdx.x == 0) lo = INT_MAX, hi = -1;
  __syncthreads();
  const int32_t* s = seg + blockIdx.x * T;
  for (int64_t i = threadIdx.x; i < T; i += kThreads) {
    if (s[i] >= 0) {
      atomicMin(&lo, static_cast<int>(i));
      atomicMax(&hi, static_cast<int>(i));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    bounds[2 * blockIdx.x] = hi < 0 ? static_cast<int32_t>(T) : lo;
    bounds[2 * blockIdx.x + 1] = hi + 1;
  }
}

// Pass 1: lse and the OEB shifts. Grid (query blocks, H, B).
template <typename T, int DC>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Params<T, typename Acc<T>::type> p) {
  using A = typename Acc<T>::type;
  using L = Layout<T, DC>;
  constexpr int Ld = L::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + L::kTile);
  float* stage = reinterpret_cast<float*>(smem + L::kSStage);
  A* comb = reinterpret_cast<A*>(smem + L::kSComb);
  int* s_rowseg = reinterpret_cast<int*>(smem + L::kSInts);
  int* s_colseg = s_rowseg + kBlock;

  const int64_t T_ = p.T, b = blockIdx.z, h = blockIdx.y;
  const int64_t i0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlock;  // costliest blocks first
  const int lo = p.bounds[2 * b], hi = p.bounds[2 * b + 1];
  if (i0 >= hi || i0 + kBlock <= lo) return;
  const int64_t g = h / (p.H / p.Hkv);
  const int32_t* seg = p.seg + b * T_;
  if (threadIdx.x < kBlock) {
    const int64_t i = i0 + threadIdx.x;
    s_rowseg[threadIdx.x] = i < T_ ? seg[i] : -1;
  }
  __syncthreads();
  const Owner w;
  const int64_t i = i0 + w.r;
  const bool row_ok = i < T_ && s_rowseg[w.r] >= 0;
  const bool oeb = p.ob != nullptr;
  bool inter = false;
  const int4 gk = (oeb && row_ok) ? oeb_row_keys(p.ob, T_, b, i, lo, p.window, inter) : make_int4(0, 0, 0, 0);
  // The block's keys: from the window start of its first query (or the first valid token) to its last query.
  const int64_t key_lo = p.window > 0 ? (i0 - p.window + 1 > lo ? i0 - p.window + 1 : lo) : lo;
  const int64_t kt_begin = key_lo / kBlock, kt_end = (i0 + kBlock - 1 < hi - 1 ? i0 + kBlock - 1 : hi - 1) / kBlock;
  const T* qbase = p.q + ((b * p.H + h) * T_ + i0) * p.d;
  // Without OEB st[0] is the softmax over the valid keys; with OEB st[g] is key group g.
  Soft<A> st[3];

  for (int64_t kt = kt_begin; kt <= kt_end; ++kt) {
    const int64_t j0 = kt * kBlock;
    const T* kbase = p.k + ((b * p.Hkv + g) * T_ + j0) * p.d;
    float sv[16];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fs[2], fg[2];
    T S[16], G[16];
    if constexpr (kWmma<T>) {
      wmma::fill_fragment(fs[0], 0.f);
      wmma::fill_fragment(fs[1], 0.f);
    } else {
#pragma unroll
      for (int e = 0; e < 16; ++e) S[e] = T(0);
    }
    for (int c = 0; c < p.nchunks; ++c) {
      const int64_t col0 = static_cast<int64_t>(c) * DC;
      __syncthreads();  // the previous step's readers of the tiles are done
      if (p.nchunks > 1 || kt == kt_begin) load_tile<T, DC, Ld>(Qs, qbase, T_ - i0, p.d, col0, p.vec);
      load_tile<T, DC, Ld>(Ks, kbase, T_ - j0, p.d, col0, p.vec);
      if (c == 0 && threadIdx.x < kBlock) {
        const int64_t j = j0 + threadIdx.x;
        s_colseg[threadIdx.x] = j < T_ ? seg[j] : -1;
      }
      __syncthreads();
      const int64_t left = p.d - col0;
      const int kend = static_cast<int>(left < DC ? left : DC);
      if constexpr (kWmma<T>) {
        wmma_chunk<T, DC, Ld, false>(w, Qs, Ks, nullptr, nullptr, kend, fs, fg);
      } else {
        fma_chunk<T, DC, Ld, false>(w, Qs, Ks, nullptr, nullptr, (kend + 16 / int(sizeof(T)) - 1) /
                                    (16 / int(sizeof(T))) * (16 / int(sizeof(T))), S, G);
      }
    }
    if constexpr (kWmma<T>) {
      float* stg = stage + w.warp * kStageFloats;
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        wmma::store_matrix_sync(stg, fs[t], kStageLd, wmma::mem_row_major);
        __syncwarp();
        unstage(w, stg, t, sv);
        __syncwarp();
      }
    }
    uint32_t vmask, g1mask, g2mask;
    element_masks(w, i, row_ok, j0, s_colseg, oeb, gk, p.window, /*all_keys=*/oeb, vmask, g1mask, g2mask);
    A s[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      if constexpr (kWmma<T>) {
        s[e] = static_cast<A>(sv[e]) * p.scale;
      } else {
        s[e] = static_cast<A>(S[e]) * p.scale;
      }
    }
    if (oeb) {
      st[0].add(s, vmask & ~(g1mask | g2mask));
      st[1].add(s, g1mask);
      st[2].add(s, g2mask);
    } else {
      st[0].add(s, vmask);
    }
  }

  // Four threads hold parts of each row: lanes 2k, 2k + 1 of warps 2q, 2q + 1.
#pragma unroll
  for (int x = 0; x < 3; ++x) st[x].merge_lane_xor1();
  if ((w.warp & 1) && !(w.lane & 1)) {
    A* c6 = comb + 6 * w.r;
#pragma unroll
    for (int x = 0; x < 3; ++x) c6[2 * x] = st[x].m, c6[2 * x + 1] = st[x].l;
  }
  __syncthreads();
  if ((w.warp & 1) || (w.lane & 1)) return;
  {
    const A* c6 = comb + 6 * w.r;
#pragma unroll
    for (int x = 0; x < 3; ++x) st[x].merge(c6[2 * x], c6[2 * x + 1]);
  }
  if (!row_ok) return;
  const int64_t idx = (b * p.H + h) * T_ + i;
  if (!oeb) {
    if (p.lse_out != nullptr) p.lse_out[idx] = st[0].m + log_a(st[0].l);
    return;
  }
  // The OEB rule of the row (oeb_rule.h, in double), from the group log-masses.
  const double Lg[3] = {st[0].log_sum(), st[1].log_sum(), st[2].log_sum()};
  const double n[3] = {static_cast<double>(gk.y - gk.x), static_cast<double>(gk.z - gk.y),
                       static_cast<double>(gk.w - gk.z)};
  const double sink = p.sink != nullptr ? static_cast<double>(p.sink[h]) : -HUGE_VAL;
  const oeb::Row row = oeb::row_forward(Lg, n, sink, inter, p.rule);
  if (p.lse_out != nullptr) p.lse_out[idx] = static_cast<A>(row.lse);
#pragma unroll
  for (int x = 0; x < 3; ++x) p.shift[3 * idx + x] = static_cast<A>(row.lse - row.log_r[x]);
}

// Pass 2: the map. Grid (query blocks, key-tile splits, B): see block_key_tiles.
// Two CTAs per SM for the tensor-core path (<= 128 registers; 2 x ~109 KB of smem fit an H100):
// one CTA's tile loads overlap the other's math (the loads are synchronous, not pipelined).
// This costs ~100 bytes of register spills per thread (sm_90); without the 2 the kernel uses
// ~172 registers, no spills, one CTA per SM. Which is faster is to be measured on the GPU.
//
// kPipe (bf16 / fp16, one head-dim chunk, 16-byte rows; kernel_path(kPoolPipeline)): the (key
// tile, head) steps are software pipelined: the Q, dO tiles of the next step (and its K, V tiles
// when it starts a kv head) are copied by cp.async into the other half of a double buffer while
// this step multiplies. The arithmetic and its order are those of the synchronous loop. At
// DC = 128 the double buffer (~178 KB) leaves room for one CTA per SM, so that variant asks for
// one (no register cap, no spills); at DC = 64 two still fit (~112 KB each).
template <typename T, int DC, bool kPipe>
__global__ void __launch_bounds__(kThreads, MainCfg<T, DC, kPipe>::kMinCTAs)
    saliency_kernel(const Params<T, typename Acc<T>::type> p) {
  using A = typename Acc<T>::type;
  using L = MainLayout<T, DC, kPipe ? 2 : 1>;
  constexpr int Ld = L::kLd;
  static_assert(!kPipe || kWmma<T>, "the pipelined loop is the tensor-core path's");
  extern __shared__ __align__(128) unsigned char smem[];
  // Q, dO, K, V tiles: buffer x of each at + x * 4 kTile (kPipe: x = 0, 1; else 0)
  T* Qs0 = reinterpret_cast<T*>(smem);
  T* Os0 = reinterpret_cast<T*>(smem + L::kTile);
  T* Ks0 = reinterpret_cast<T*>(smem + 2 * L::kTile);
  T* Vs0 = reinterpret_cast<T*>(smem + 3 * L::kTile);
  constexpr int kBufStride = 4 * static_cast<int>(L::kTile / sizeof(T));  // elements between buffers
  float* stage = reinterpret_cast<float*>(smem + L::kStage);
  A* bins = reinterpret_cast<A*>(smem + L::kBins);
  A* s_sh0 = reinterpret_cast<A*>(smem + L::kRowA);  // per row of the current head: the shift of group
  A* s_sh1 = s_sh0 + kBlock;                           // 0, 1, 2 (OEB), or of every key (s_sh0)
  A* s_sh2 = s_sh1 + kBlock;
  int* s_rowseg = reinterpret_cast<int*>(smem + L::kInts);
  int* s_rowrun = s_rowseg + kBlock;
  int* s_rrseg = s_rowrun + kBlock;
  int* s_colseg = s_rrseg + kBlock;
  int* s_colrun = s_colseg + kBlock;
  int* s_crseg = s_colrun + kBlock;
  int* s_cnt = s_crseg + kBlock;  // [0] row runs, [1] column runs

  const int64_t T_ = p.T, b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlock;  // costliest blocks first
  const int lo = p.bounds[2 * b], hi = p.bounds[2 * b + 1];
  if (i0 >= hi || i0 + kBlock <= lo) return;
  int64_t kt_begin, kt_end;
  block_key_tiles(p, i0, lo, hi, kt_begin, kt_end);
  if (kt_begin > kt_end) return;  // this split lies past the block's last key tile
  const int64_t group = p.H / p.Hkv;
  const int32_t* seg = p.seg + b * T_;
  if (threadIdx.x < kBlock) {
    const int64_t i = i0 + threadIdx.x;
    s_rowseg[threadIdx.x] = i < T_ ? seg[i] : -1;
  }
  __syncthreads();
  if (threadIdx.x < 32) runs64(s_rowseg, s_rowrun, s_rrseg, &s_cnt[0]);

  const Owner w;
  const int64_t i = i0 + w.r;
  const bool row_ok = i < T_ && s_rowseg[w.r] >= 0;
  const bool oeb = p.shift != nullptr;
  bool inter = false;
  const int4 gk = (oeb && row_ok) ? oeb_row_keys(p.ob, T_, b, i, lo, p.window, inter) : make_int4(0, 0, 0, 0);

  // The column information of key tile kt (its segments, and their runs by warp 0, which the
  // binning reads after later barriers) and the lane's element masks. Callers: after a barrier
  // that ends the previous tile's binning.
  uint32_t vmask = 0, g1mask = 0, g2mask = 0;
  auto begin_tile = [&](int64_t j0) {
    if (threadIdx.x < kBlock) {
      const int64_t j = j0 + threadIdx.x;
      s_colseg[threadIdx.x] = j < T_ ? seg[j] : -1;
    }
    __syncthreads();
    if (threadIdx.x < 32) runs64(s_colseg, s_colrun, s_crseg, &s_cnt[1]);  // read after later barriers
    element_masks(w, i, row_ok, j0, s_colseg, oeb, gk, p.window, /*all_keys=*/false, vmask, g1mask, g2mask);
  };
  // Per row of head h: the exponent shifts (threads < 64; read after the next barrier).
  auto load_shifts = [&](int64_t h) {
    if (threadIdx.x < kBlock) {
      // Rows that are not binned (padding, past T) may hold anything: they are never read.
      const int64_t ii = i0 + threadIdx.x;
      const int64_t idx = (b * p.H + h) * T_ + ii;
      A sh0 = 0, sh1 = 0, sh2 = 0;
      if (ii < T_ && oeb) {
        sh0 = p.shift[3 * idx], sh1 = p.shift[3 * idx + 1], sh2 = p.shift[3 * idx + 2];
      } else if (ii < T_) {
        // A_ij = exp(s - lse) / (1 + exp(sink - lse)) = exp(s - log(e^lse + e^sink))
        sh0 = p.sink != nullptr ? log_add(p.lse[idx], p.sink[h]) : p.lse[idx];
      }
      s_sh0[threadIdx.x] = sh0, s_sh1[threadIdx.x] = sh1, s_sh2[threadIdx.x] = sh2;
    }
  };
  // acc += P' * G for the lane's elements (P' = exp(scale S - shift)): sum_abs signed, else |.|.
  // (Zeroed again at every key tile.)
  A acc[16];
#pragma unroll
  for (int e = 0; e < 16; ++e) acc[e] = 0;
  auto add = [&](int e, A sv, A g, A sh0, A sh1, A sh2) {
    if (!((vmask >> e) & 1u)) return;
    const A shift = ((g2mask >> e) & 1u) ? sh2 : (((g1mask >> e) & 1u) ? sh1 : sh0);
    const A x = exp_a(sv * p.scale - shift) * g;
    acc[e] += p.sum_abs ? x : fabs(x);
  };
  // The tensor-core products of one head, one 16 x 16 sub-tile at a time through the warp's
  // staging area (fewer live registers).
  auto add_fragments = [&](wmma::fragment<wmma::accumulator, 16, 16, 16, float>(&fs)[2],
                           wmma::fragment<wmma::accumulator, 16, 16, 16, float>(&fg)[2]) {
    const A sh0 = s_sh0[w.r], sh1 = s_sh1[w.r], sh2 = s_sh2[w.r];
    float* st = stage + w.warp * 2 * kStageFloats;
    const float* mine = st + (w.r % 16) * kStageLd + w.lc;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      wmma::store_matrix_sync(st, fs[t], kStageLd, wmma::mem_row_major);
      wmma::store_matrix_sync(st + kStageFloats, fg[t], kStageLd, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int u = 0; u < 8; ++u) add(t * 8 + u, mine[u], mine[kStageFloats + u], sh0, sh1, sh2);
      __syncwarp();
    }
  };
  // Binning: bins[row run][column run] of this tile in smem, then one atomic per bin.
  auto bin_tile = [&]() {
    __syncthreads();  // the column runs (warp 0) are visible
    const int n_rr = s_cnt[0], n_cr = s_cnt[1];
    for (int x = threadIdx.x; x < n_rr * n_cr; x += kThreads) bins[x] = 0;
    __syncthreads();
    const int rr = s_rowrun[w.r];
    int key = -1;
    A sum = 0;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int e = t * 8 + u;
        if (!((vmask >> e) & 1u)) continue;
        const int k = rr * n_cr + s_colrun[w.col(t, u)];
        const A val = p.sum_abs ? fabs(acc[e]) : acc[e];
        if (k == key) {
          sum += val;
        } else {
          if (key >= 0) atomicAdd(&bins[key], sum);
          key = k, sum = val;
        }
      }
    }
    // The usual case: the whole warp is left with one (row run, column run) pair.
    const unsigned has = __ballot_sync(0xffffffffu, key >= 0);
    if (has != 0u) {
      const int leader_key = __shfl_sync(0xffffffffu, key, __ffs(has) - 1);
      if (__all_sync(0xffffffffu, key < 0 || key == leader_key)) {
        A s = key >= 0 ? sum : A(0);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (w.lane == 0) atomicAdd(&bins[leader_key], s);
      } else if (key >= 0) {
        atomicAdd(&bins[key], sum);
      }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < n_rr * n_cr; x += kThreads) {
      const A val = bins[x];
      if (val != A(0)) {
        atomicAdd(p.M + (b * p.S + s_rrseg[x / n_cr]) * p.S + s_crseg[x % n_cr], static_cast<double>(val));
      }
    }
  };

  if constexpr (kPipe) {
    // Steps st = (kt - kt_begin) H + h; step st reads Q, dO from buffer st & 1 and K, V from
    // buffer (st / group) & 1 (one per kv head and key tile: H = Hkv group steps per tile).
    const int64_t nsteps = (kt_end - kt_begin + 1) * p.H;
    auto issue = [&](int64_t st) {
      const int64_t kt = kt_begin + st / p.H, h = st % p.H, g = h / group, j0 = kt * kBlock;
      const int qb = static_cast<int>(st & 1) * kBufStride, kb = static_cast<int>((st / group) & 1) * kBufStride;
      load_tile_async<T, DC, Ld>(Qs0 + qb, p.q + ((b * p.H + h) * T_ + i0) * p.d, T_ - i0, p.d);
      load_tile_async<T, DC, Ld>(Os0 + qb, p.o + ((b * p.H + h) * T_ + i0) * p.d, T_ - i0, p.d);
      if (h % group == 0) {
        load_tile_async<T, DC, Ld>(Ks0 + kb, p.k + ((b * p.Hkv + g) * T_ + j0) * p.d, T_ - j0, p.d);
        load_tile_async<T, DC, Ld>(Vs0 + kb, p.v + ((b * p.Hkv + g) * T_ + j0) * p.d, T_ - j0, p.d);
      }
      cp_async_commit();
    };
    issue(0);
    for (int64_t st = 0; st < nsteps; ++st) {
      const int64_t kt = kt_begin + st / p.H, h = st % p.H;
      if (h == 0) {
        begin_tile(kt * kBlock);  // after the barrier that ended the previous tile's binning
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[e] = 0;
      }
      // The buffers of st + 1 were last read by step st - 1 (or st + 1 - 2 group for K, V),
      // which the barrier at the end of the previous step closed.
      if (st + 1 < nsteps) {
        issue(st + 1);
        cp_async_wait<1>();  // this thread's copies of step st are done
      } else {
        cp_async_wait<0>();
      }
      load_shifts(h);
      __syncthreads();  // everyone's copies of step st and the shifts are visible
      const int qb = static_cast<int>(st & 1) * kBufStride, kb = static_cast<int>((st / group) & 1) * kBufStride;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> fs[2], fg[2];
#pragma unroll
      for (int t = 0; t < 2; ++t) wmma::fill_fragment(fs[t], 0.f), wmma::fill_fragment(fg[t], 0.f);
      wmma_chunk<T, DC, Ld, true>(w, Qs0 + qb, Ks0 + kb, Os0 + qb, Vs0 + kb, static_cast<int>(p.d), fs, fg);
      add_fragments(fs, fg);
      if (h == p.H - 1) bin_tile();
      __syncthreads();  // the step's readers of its buffers and of the shifts are done
    }
  } else {
    T* Qs = Qs0;
    T* Os = Os0;
    T* Ks = Ks0;
    T* Vs = Vs0;
    for (int64_t kt = kt_begin; kt <= kt_end; ++kt) {
      const int64_t j0 = kt * kBlock;
      __syncthreads();  // the previous tile's binning is done with the column info and the bins
      begin_tile(j0);
#pragma unroll
      for (int e = 0; e < 16; ++e) acc[e] = 0;

      for (int64_t h = 0; h < p.H; ++h) {
        const int64_t g = h / group;
        const T* qbase = p.q + ((b * p.H + h) * T_ + i0) * p.d;
        const T* obase = p.o + ((b * p.H + h) * T_ + i0) * p.d;
        const T* kbase = p.k + ((b * p.Hkv + g) * T_ + j0) * p.d;
        const T* vbase = p.v + ((b * p.Hkv + g) * T_ + j0) * p.d;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> fs[2], fg[2];
        T S[16], G[16];
        if constexpr (kWmma<T>) {
#pragma unroll
          for (int t = 0; t < 2; ++t) wmma::fill_fragment(fs[t], 0.f), wmma::fill_fragment(fg[t], 0.f);
        } else {
#pragma unroll
          for (int e = 0; e < 16; ++e) S[e] = T(0), G[e] = T(0);
        }
        for (int c = 0; c < p.nchunks; ++c) {
          const int64_t col0 = static_cast<int64_t>(c) * DC;
          __syncthreads();  // the previous step's readers of the tiles (and of s_sh0, s_sh1, s_sh2) are done
          if (p.nchunks > 1 || h % group == 0) {  // one chunk: K, V stay for the whole kv group
            load_tile<T, DC, Ld>(Ks, kbase, T_ - j0, p.d, col0, p.vec);
            load_tile<T, DC, Ld>(Vs, vbase, T_ - j0, p.d, col0, p.vec);
          }
          load_tile<T, DC, Ld>(Qs, qbase, T_ - i0, p.d, col0, p.vec);
          load_tile<T, DC, Ld>(Os, obase, T_ - i0, p.d, col0, p.vec);
          if (c == 0) load_shifts(h);
          __syncthreads();
          const int64_t left = p.d - col0;
          const int kend = static_cast<int>(left < DC ? left : DC);
          if constexpr (kWmma<T>) {
            wmma_chunk<T, DC, Ld, true>(w, Qs, Ks, Os, Vs, kend, fs, fg);
          } else {
            constexpr int VK = 16 / sizeof(T);
            fma_chunk<T, DC, Ld, true>(w, Qs, Ks, Os, Vs, (kend + VK - 1) / VK * VK, S, G);
          }
        }
        // P' * G for the lane's elements, summed over heads
        if constexpr (kWmma<T>) {
          add_fragments(fs, fg);
        } else {
          const A sh0 = s_sh0[w.r], sh1 = s_sh1[w.r], sh2 = s_sh2[w.r];
#pragma unroll
          for (int e = 0; e < 16; ++e) add(e, S[e], G[e], sh0, sh1, sh2);
        }
      }
      bin_tile();
    }
  }
}

// ---------------------------------------------------------------- host side

template <typename T> struct DeviceType { using type = T; };
template <> struct DeviceType<at::Half> { using type = __half; };
template <> struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// How the main kernel's key tiles are shared out: index::pool_plan_split, from the shapes and
// the SM count (kernel_path(kPoolSplit): -1 auto, 0 off = one CTA per query block, n > 0).
struct SplitPlan {
  int tiles_per_split, splits;
};
SplitPlan plan_split(int64_t T, int64_t B, int64_t window, int path, int num_sms) {
  const index::PoolSplit sp = index::pool_plan_split(T, B, window, kBlock, path, num_sms);
  TORCH_CHECK(sp.splits <= 65535 && sp.tiles_per_split < INT_MAX, "step_saliency_pool (CUDA): too many key splits (",
              sp.splits, ")");
  return {static_cast<int>(sp.tiles_per_split), static_cast<int>(sp.splits)};
}

template <typename T, int DC, bool kPipe>
void launch_main(const Params<T, typename Acc<T>::type>& p, int splits, cudaStream_t stream) {
  using L = MainLayout<T, DC, kPipe ? 2 : 1>;
  const int64_t nqb = (p.T + kBlock - 1) / kBlock;
  const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(L::kMainBytes <= static_cast<size_t>(optin), "step_saliency_pool (CUDA): needs ", L::kMainBytes,
              " bytes of shared memory per block, the device allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(saliency_kernel<T, DC, kPipe>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(L::kMainBytes)));
  saliency_kernel<T, DC, kPipe><<<dim3(nqb, splits, p.B), kThreads, L::kMainBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DC>
void launch(Params<T, typename Acc<T>::type> p, bool stats, cudaStream_t stream) {
  using L = Layout<T, DC>;
  const int64_t nqb = (p.T + kBlock - 1) / kBlock;
  const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(L::kMainBytes <= static_cast<size_t>(optin), "step_saliency_pool (CUDA): needs ", L::kMainBytes,
              " bytes of shared memory per block, the device allows ", optin);
  if (stats) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(stats_kernel<T, DC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(L::kStatsBytes)));
    stats_kernel<T, DC><<<dim3(nqb, p.H, p.B), kThreads, L::kStatsBytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const SplitPlan sp = plan_split(p.T, p.B, p.window, kernel_path(kPoolSplit),
                                  at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  p.tiles_per_split = sp.tiles_per_split;
  if constexpr (kWmma<T>) {
    // The pipelined loop: one head-dim chunk of 16-byte rows (cp.async), and the switch on.
    if (p.nchunks == 1 && p.vec && kernel_path(kPoolPipeline) != 0) {
      launch_main<T, DC, true>(p, sp.splits, stream);
      return;
    }
  }
  launch_main<T, DC, false>(p, sp.splits, stream);
}

// The tile width DC for the dtype and head dim (a template, so that only these are instantiated).
template <typename T>
void run_typed(Params<T, typename Acc<T>::type> p, bool stats, cudaStream_t stream) {
  if constexpr (kWmma<T>) {
    if (p.d <= 64) {
      p.nchunks = 1;
      launch<T, 64>(p, stats, stream);
    } else {
      p.nchunks = static_cast<int>((p.d + 127) / 128);
      launch<T, 128>(p, stats, stream);
    }
  } else if constexpr (std::is_same_v<T, float>) {
    p.nchunks = static_cast<int>((p.d + 63) / 64);
    launch<T, 64>(p, stats, stream);
  } else {
    p.nchunks = static_cast<int>((p.d + 31) / 32);
    launch<T, 32>(p, stats, stream);
  }
}

at::Tensor step_saliency_pool_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                   const at::Tensor& o_in, const at::Tensor& seg_ids, int64_t num_segments,
                                   double scale, c10::string_view head_reduction, const std::optional<at::Tensor>& lse,
                                   const std::optional<at::Tensor>& sink, int64_t window,
                                   const std::optional<at::Tensor>& oeb_bounds, c10::string_view oeb_rule,
                                   double oeb_strength, double oeb_tau_max, double oeb_eps) {
  const std::string reduction(head_reduction);
  const auto device = q_in.device();
  TORCH_CHECK(device.is_cuda(), "step_saliency_pool (CUDA kernel): q must be on a CUDA device, got ", device);
  const SaliencySizes sizes = check_saliency_arguments(q_in, k_in, v_in, o_in, seg_ids, num_segments, scale,
                                                           reduction);
  const int64_t B = sizes.B, H = sizes.H, Hkv = sizes.Hkv, Tn = sizes.T, D = sizes.d;
  const auto dtype = q_in.scalar_type();
  check_sink("step_saliency_pool", sink, q_in);
  TORCH_CHECK(window >= -1 && window != 0, "step_saliency_pool: window must be -1 (full attention) or >= 1, got ",
              window);
  const oeb::RuleParams rule = check_oeb_rule("step_saliency_pool", std::string(oeb_rule), oeb_strength, oeb_tau_max,
                                              oeb_eps);
  TORCH_CHECK(Tn < INT_MAX / 2 && num_segments < INT_MAX, "step_saliency_pool (CUDA): T and num_segments must be < ",
              INT_MAX / 2);
  TORCH_CHECK(B <= 65535 && H <= 65535, "step_saliency_pool (CUDA): at most 65535 batch rows and heads, got B = ",
              B, ", H = ", H);
  const at::cuda::CUDAGuard guard(device);
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse_c;
  if (lse.has_value()) {
    TORCH_CHECK(lse->device() == device, "step_saliency_pool (CUDA kernel): lse must be on ", device, ", got ",
                lse->device());
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "step_saliency_pool: lse must be float32, got ",
                lse->scalar_type());
    TORCH_CHECK(lse->dim() == 3 && lse->size(0) == B && lse->size(1) == H && lse->size(2) == Tn,
                "step_saliency_pool: lse must have shape (", B, ", ", H, ", ", Tn, "), got ", lse->sizes());
    lse_c = lse->to(acc_dtype).contiguous();
  }
  at::Tensor ob;
  if (oeb_bounds.has_value()) {
    const at::Tensor& x = *oeb_bounds;
    TORCH_CHECK(x.device() == device, "step_saliency_pool (CUDA kernel): oeb_bounds must be on ", device, ", got ",
                x.device());
    TORCH_CHECK(x.scalar_type() == at::kLong, "step_saliency_pool: oeb_bounds must be int64, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && x.size(1) == Tn && x.size(2) == 2,
                "step_saliency_pool: oeb_bounds must have shape (", B, ", ", Tn, ", 2), got ", x.sizes());
    ob = x.contiguous();
  }
  // torch.use_deterministic_algorithms(True): the CPU kernel on host copies (in that mode it
  // hands its tasks to its workers in a fixed order). This kernel sums the bins with atomics
  // (fp32 in shared memory, fp64 into the map), in an order that varies from run to run.
  if (at::globalContext().deterministicAlgorithms()) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("stepflow::step_saliency_pool", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, int64_t, double,
                                                 c10::string_view, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, int64_t,
                                                 const std::optional<at::Tensor>&, c10::string_view, double, double,
                                                 double)>();
    auto host = [](const std::optional<at::Tensor>& x) -> std::optional<at::Tensor> {
      if (!x.has_value()) return std::nullopt;
      return x->cpu();  // sync-ok: the deterministic mode runs the CPU kernel
    };
    // sync-ok: the deterministic mode runs the CPU kernel on host copies
    return op.call(q_in.cpu(), k_in.cpu(), v_in.cpu(), o_in.cpu(), seg_ids.cpu(), num_segments, scale,
                   head_reduction, host(lse), host(sink), window, host(oeb_bounds), oeb_rule, oeb_strength,
                   oeb_tau_max, oeb_eps)
        .to(device);
  }

  at::Tensor M = at::zeros({B, num_segments, num_segments}, q_in.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor seg32 = seg_ids.to(at::kInt).contiguous();
  at::Tensor bounds = at::empty({B, 2}, seg32.options());
  if (B > 0) {
    bounds_kernel<<<B, kThreads, 0, stream>>>(seg32.data_ptr<int32_t>(), Tn, bounds.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The values (seg id range, OEB bounds, padding only at the ends of a row with OEB, finite
  // sink logits), checked on the device: no device-to-host copy (device_checks.cuh).
  const at::Tensor seg64 = seg_ids.to(at::kLong).contiguous();
  const at::Tensor sink_d = sink.has_value() ? sink->to(at::kDouble).contiguous() : at::Tensor();
  device_checks::check_saliency_inputs(seg64.data_ptr<int64_t>(), bounds.data_ptr<int32_t>(),
                                       ob.defined() ? ob.data_ptr<int64_t>() : nullptr,
                                       sink_d.defined() ? sink_d.data_ptr<double>() : nullptr, B, Tn, num_segments,
                                       H, stream);
  if (B == 0 || H == 0 || Tn == 0) return M.to(at::kFloat);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), o = o_in.contiguous();
  const bool oeb = ob.defined();
  const bool stats = !lse_c.defined() || oeb;
  at::Tensor lse_buf = lse_c.defined() ? lse_c : at::empty({B, H, Tn}, q.options().dtype(acc_dtype));
  at::Tensor shift_buf = oeb ? at::empty({B, H, Tn, 3}, q.options().dtype(acc_dtype)) : at::Tensor();
  const at::Tensor sink_c = sink.has_value() ? sink->to(acc_dtype).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "step_saliency_pool_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using A = typename Acc<T>::type;
    Params<T, A> p;
    p.q = reinterpret_cast<const T*>(q.data_ptr<scalar_t>());
    p.k = reinterpret_cast<const T*>(k.data_ptr<scalar_t>());
    p.v = reinterpret_cast<const T*>(v.data_ptr<scalar_t>());
    p.o = reinterpret_cast<const T*>(o.data_ptr<scalar_t>());
    p.seg = seg32.data_ptr<int32_t>();
    p.ob = oeb ? ob.data_ptr<int64_t>() : nullptr;
    p.bounds = bounds.data_ptr<int32_t>();
    p.lse = lse_buf.data_ptr<A>();
    p.lse_out = lse_c.defined() ? nullptr : lse_buf.data_ptr<A>();
    p.shift = oeb ? shift_buf.data_ptr<A>() : nullptr;
    p.sink = sink_c.defined() ? sink_c.data_ptr<A>() : nullptr;
    p.M = M.data_ptr<double>();
    p.B = B, p.H = H, p.Hkv = Hkv, p.T = Tn, p.d = D, p.S = num_segments;
    p.window = (window <= 0 || window >= Tn) ? -1 : window;  // a window over every key is full attention
    p.vec = D % (16 / sizeof(T)) == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.o);
    p.sum_abs = reduction == "sum_abs";
    p.scale = static_cast<A>(scale);
    p.rule = rule;
    p.tiles_per_split = 0;  // launch() plans the main kernel's split
    run_typed<T>(p, stats, stream);
  });
  if (reduction == "abs_mean") M.div_(static_cast<double>(H));  // the mean over heads of |A' dL/dA'|
  return M.to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(stepflow, CUDA, m) {
  m.impl("step_saliency_pool", &step_saliency_pool_cuda);
}

}  // namespace stepflow
