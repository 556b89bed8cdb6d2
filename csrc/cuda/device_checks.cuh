#pragma once
// Checks of index and value arguments on the device, with no host synchronization.
//
// The host checks only what it knows without reading device memory (shapes, dtypes, devices,
// scalars: checks.h). What only the tensors' contents tell (kv_start and bounds ranges, segment
// ids, sink logits, the decode state) is checked by the small kernels below, launched on the
// op's stream before the kernels that rely on it. A failed check is a device-side assert
// (CUDA_KERNEL_ASSERT_PRINTF prints the op, the offending index and value, then traps): the
// kernels queued after it never run, the next CUDA call of the process reports
// "device-side assert triggered", and the CUDA context is lost, as with an out-of-range index
// in torch's own CUDA kernels (embedding, gather). So a decode step issues no device-to-host
// copy and the ops can be captured in a CUDA graph; the price is that a bad index on the GPU
// ends the process's use of the device instead of raising a Python exception. The Python
// wrappers (stepflow_ext/ops.py) check everything that does not need the values; the CPU
// kernels check the values on the host (free there) and raise RuntimeError with the same text.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace stepflow {
namespace device_checks {

constexpr int kCheckThreads = 256;

// The kernels below are static: this header is included by several .cu files, and each gets its own
// copy (an external definition would be defined once per object file and fail to link).

inline unsigned check_blocks(int64_t n) {
  const int64_t b = (n + kCheckThreads - 1) / kCheckThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 1024 ? 1024 : b));
}

// oeb_attention (backward = 0) / oeb_attention_backward (backward = 1): kv_start[b] in [0, Tk];
// bounds[b, i] = (-1, -1) or 0 <= a <= c <= Tk - Tq + i + 1; sink[h] finite (sink may be null).
static __global__ void __launch_bounds__(kCheckThreads) oeb_inputs_kernel(const int64_t* kv, const int64_t* bounds,
                                                                   const double* sink, int64_t B, int64_t Tq,
                                                                   int64_t Tk, int64_t H, int backward) {
  const int64_t n = B + B * Tq + (sink != nullptr ? H : 0);
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (x < B) {
      const long long v = kv[x];
      CUDA_KERNEL_ASSERT_PRINTF(v >= 0 && v <= Tk, "%s: kv_start[%lld] = %lld is outside [0, %lld]",
                                backward ? "oeb_attention_backward" : "oeb_attention", static_cast<long long>(x), v,
                                static_cast<long long>(Tk));
    } else if (x < B + B * Tq) {
      const int64_t r = x - B, b = r / Tq, i = r % Tq;
      const long long a = bounds[2 * r], c = bounds[2 * r + 1], end = Tk - Tq + i + 1;
      CUDA_KERNEL_ASSERT_PRINTF((a == -1 && c == -1) || (a >= 0 && a <= c && c <= end),
                                "%s: bounds[%lld, %lld] = (%lld, %lld) must be (-1, -1) or satisfy "
                                "0 <= a <= b <= %lld (the query's position + 1)",
                                backward ? "oeb_attention_backward" : "oeb_attention", static_cast<long long>(b),
                                static_cast<long long>(i), a, c, end);
    } else {
      const int64_t h = x - B - B * Tq;
      CUDA_KERNEL_ASSERT_PRINTF(isfinite(sink[h]), "%s: sink[%lld] = %f is not finite",
                                backward ? "oeb_attention_backward" : "oeb_attention", static_cast<long long>(h),
                                sink[h]);
    }
  }
}

inline void check_oeb_inputs(const int64_t* kv, const int64_t* bounds, const double* sink, int64_t B, int64_t Tq,
                             int64_t Tk, int64_t H, bool backward, cudaStream_t stream) {
  const int64_t n = B + B * Tq + (sink != nullptr ? H : 0);
  if (n == 0) return;
  oeb_inputs_kernel<<<check_blocks(n), kCheckThreads, 0, stream>>>(kv, bounds, sink, B, Tq, Tk, H, backward ? 1 : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// step_saliency_pool: seg_ids (B, T) in [-1, S); with OEB (ob != null): oeb_bounds[b, i] = (-1, -1)
// or 0 <= a <= c <= i + 1, and no padding between a row's first and last valid token (rows:
// (B, 2) first valid position, last valid + 1, from the pool's bounds kernel); sink[h] finite.
static __global__ void __launch_bounds__(kCheckThreads) saliency_inputs_kernel(const int64_t* seg, const int32_t* rows,
                                                                        const int64_t* ob, const double* sink,
                                                                        int64_t B, int64_t T, int64_t S, int64_t H) {
  const int64_t n = B * T + (sink != nullptr ? H : 0);
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (x < B * T) {
      const int64_t b = x / T, i = x % T;
      const long long s = seg[x];
      CUDA_KERNEL_ASSERT_PRINTF(s >= -1 && s < S,
                                "step_saliency_pool: seg_ids[%lld, %lld] = %lld must be -1 (padding) or in [0, "
                                "num_segments = %lld)",
                                static_cast<long long>(b), static_cast<long long>(i), s, static_cast<long long>(S));
      if (ob != nullptr) {
        const long long a = ob[2 * x], c = ob[2 * x + 1];
        CUDA_KERNEL_ASSERT_PRINTF((a == -1 && c == -1) || (a >= 0 && a <= c && c <= i + 1),
                                  "step_saliency_pool: oeb_bounds[%lld, %lld] = (%lld, %lld) must be (-1, -1) or "
                                  "satisfy 0 <= a <= b <= %lld",
                                  static_cast<long long>(b), static_cast<long long>(i), a, c,
                                  static_cast<long long>(i + 1));
        const int64_t first = rows[2 * b], last = rows[2 * b + 1];  // [first, last) spans the valid tokens
        CUDA_KERNEL_ASSERT_PRINTF(!(s < 0 && i > first && i < last),
                                  "step_saliency_pool: with oeb_bounds, padding (seg id -1) must be at the ends of "
                                  "a row, but batch row %lld has padding inside it (token %lld)",
                                  static_cast<long long>(b), static_cast<long long>(i));
      }
    } else {
      const int64_t h = x - B * T;
      CUDA_KERNEL_ASSERT_PRINTF(isfinite(sink[h]), "step_saliency_pool: sink[%lld] = %f is not finite",
                                static_cast<long long>(h), sink[h]);
    }
  }
}

inline void check_saliency_inputs(const int64_t* seg, const int32_t* rows, const int64_t* ob, const double* sink,
                                  int64_t B, int64_t T, int64_t S, int64_t H, cudaStream_t stream) {
  const int64_t n = B * T + (sink != nullptr ? H : 0);
  if (n == 0) return;
  saliency_inputs_kernel<<<check_blocks(n), kCheckThreads, 0, stream>>>(seg, rows, ob, sink, B, T, S, H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// step_momentum / step_momentum_decode_: the kernels validate the data while they plan and set
// *err (the decode state is then left as it was); this asserts on the flag.
static __global__ void momentum_error_kernel(const int* err, int decode) {
  CUDA_KERNEL_ASSERT_PRINTF(*err == 0,
                            "%s: invalid seg_ids, seg_kinds or state counters (seg ids must be -1 or in [0, S) "
                            "and must not decrease along a row, nor go back before the state's segment; kinds "
                            "must be 0, 1 or 2; a step in progress must be a step)",
                            decode ? "step_momentum_decode_" : "step_momentum");
}

inline void check_momentum_flag(const int* err, bool decode, cudaStream_t stream) {
  momentum_error_kernel<<<1, 1, 0, stream>>>(err, decode ? 1 : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace device_checks
}  // namespace stepflow
