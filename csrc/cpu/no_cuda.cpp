// Compiled only when the CUDA sources are not (setup.py drops it from a CUDA build).
#include "stepflow.h"

namespace stepflow {
bool cuda_compiled() { return false; }
}  // namespace stepflow
