// The stepflow op schemas and the Python module that carries them.
//
// Schemas live here, once; each backend registers its kernels in its own file
// (csrc/cpu/*.cpp under TORCH_LIBRARY_IMPL(stepflow, CPU, ...), csrc/cuda/*.cu under CUDA).
// Fake (meta) kernels and autograd are registered from Python (stepflow_ext/ops.py).
#include <torch/extension.h>

#include "stepflow.h"

TORCH_LIBRARY(stepflow, m) {
  // M[b, a, c] of design.md 2.2 for one layer, raw sums, fp32 (B, S, S). sink: per-head logits (H,)
  // in the softmax denominator (GPT-OSS); window: sliding window (-1: full attention); oeb_bounds:
  // (B, T, 2) group bounds of the OEB layer whose A' the saliency is measured on (as oeb_attention).
  m.def(
      "step_saliency_pool(Tensor q, Tensor k, Tensor v, Tensor grad_out, Tensor seg_ids, "
      "int num_segments, float scale, str head_reduction=\"sum_abs\", Tensor? lse=None, "
      "Tensor? sink=None, int window=-1, Tensor? oeb_bounds=None, str oeb_rule=\"bridge\", "
      "float oeb_strength=0.0, float oeb_tau_max=0.15, float oeb_eps=1e-6) -> Tensor");
  // Odds-Equal Bridge attention (design.md 2.3): three contiguous key groups per query row,
  // [lo, a), [a, b), [b, i] with (a, b) = bounds[b, i] ((-1, -1): not intervened), a rule
  // ("bridge" | "odds"), an optional per-head sink logit and sliding window.
  // Returns (out, lse, stats): lse over the valid real keys before the rule (fp32 (B, H, Tq));
  // stats fp32 (B, H, Tq, 5) = (p_0, p_1, p_2, p_sink, active): the group masses under the model's
  // real-key softmax, the sink's weight in the final softmax, and 1.0 where the rule changed the row.
  m.def(
      "oeb_attention(Tensor q, Tensor k, Tensor v, Tensor kv_start, Tensor bounds, str rule, "
      "float strength, float tau_max, float eps, Tensor? sink, int window, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "oeb_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor stats, "
      "Tensor kv_start, Tensor bounds, str rule, float strength, float tau_max, float eps, Tensor? sink, "
      "int window, float scale) -> (Tensor, Tensor, Tensor)");
  // Step Momentum Injection (design.md 2.4): prefill from an empty state ...
  m.def("step_momentum(Tensor h, Tensor seg_ids, Tensor seg_kinds, float beta, float gamma) -> Tensor");
  // ... and the incremental form that carries the per-layer state across calls.
  // momentum, step_sum: (B, D) fp32; counters: (B, 3) int64 = (current segment id,
  // tokens summed in the current step, completed steps).
  m.def(
      "step_momentum_decode_(Tensor h, Tensor seg_ids, Tensor seg_kinds, Tensor(a!) momentum, "
      "Tensor(b!) step_sum, Tensor(c!) counters, float beta, float gamma) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "StepFlow kernels: Step-Saliency pooling, Odds-Equal Bridge attention, Step Momentum Injection";
  m.attr("__version__") = STEPFLOW_VERSION;
  m.attr("cuda_compiled") = stepflow::cuda_compiled();
  m.attr("cuda_archs") = std::string(STEPFLOW_CUDA_ARCHS);
  // The torch this module was compiled against (setup.py / CMake pass torch.__version__);
  // stepflow_ext/__init__.py refuses to import under another one. The marker string carries the
  // same fact for when the module cannot even load (undefined symbols of another torch): the
  // package then reads it from the binary's bytes.
#ifndef STEPFLOW_TORCH_VERSION
#define STEPFLOW_TORCH_VERSION ""
#endif
  m.attr("torch_version") = STEPFLOW_TORCH_VERSION;
  m.attr("build_marker") = "stepflow-build-torch=" STEPFLOW_TORCH_VERSION;  // a const char*: whole in .rodata
}
