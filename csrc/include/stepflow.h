#pragma once
// Shared declarations and argument checks for the stepflow kernels.
#include <torch/types.h>

#ifndef STEPFLOW_VERSION
#define STEPFLOW_VERSION "0.0.0"
#endif
#ifndef STEPFLOW_CUDA_ARCHS
#define STEPFLOW_CUDA_ARCHS ""
#endif

namespace stepflow {

// True when the extension was compiled with its CUDA sources (defined in csrc/cuda when
// they are built, in csrc/cpu/no_cuda.cpp otherwise).
bool cuda_compiled();

// Segment kinds, as coded in seg_kinds tensors.
enum SegmentKind : int64_t { kQuestion = 0, kStep = 1, kSummary = 2 };

}  // namespace stepflow
