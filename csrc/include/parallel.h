#pragma once
// at::parallel_for that carries the caller's thread-local state (inference mode, grad mode, dispatch
// key sets) into its worker threads. at::parallel_for's OpenMP workers start without it, so ATen calls
// inside a chunk (at::mm_out, at::exp_ on tiles) made under torch.inference_mode() on tensors created
// in it fail with "Inplace update to inference tensor outside InferenceMode" (vLLM runs the model under
// inference mode; so may a user's generate).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace stepflow {

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

}  // namespace stepflow
