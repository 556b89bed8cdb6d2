// Build facts of the CUDA part of the extension. The CUDA kernels of the ops land next to
// this file (one .cu per op) and register under TORCH_LIBRARY_IMPL(stepflow, CUDA, ...).
#include "stepflow.h"

namespace stepflow {
bool cuda_compiled() { return true; }
}  // namespace stepflow
