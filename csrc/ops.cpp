// The stepflow op schemas and the Python module that carries them.
//
// Schemas live here, once; each backend registers its kernels in its own file
// (csrc/cpu/*.cpp under TORCH_LIBRARY_IMPL(stepflow, CPU, ...), csrc/cuda/*.cu under CUDA).
// Fake (meta) kernels and autograd are registered from Python (stepflow_ext/ops.py).
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "stepflow.h"
#include "tuning.h"

namespace stepflow {
namespace {

struct PathSpec {
  const char* name;  // as _C._set_kernel_path and stepflow_ext.ops.kernel_paths spell it
  const char* env;
  int initial;       // without the variable
  int lo, hi;        // allowed values
};
constexpr std::array<PathSpec, kNumKernelPaths> kPathSpecs = {{
    {"pool_split", "STEPFLOW_POOL_SPLIT", -1, -1, 1 << 20},
    {"pool_pipeline", "STEPFLOW_POOL_PIPELINE", 1, 0, 1},
    {"oeb_ldmatrix", "STEPFLOW_OEB_LDMATRIX", 1, 0, 1},
    {"oeb_tile_fast", "STEPFLOW_OEB_TILE_FAST", 1, 0, 1},
    {"oeb_bn", "STEPFLOW_OEB_BN", 0, 0, 64},
}};

bool valid_path_value(int which, int value) {
  const PathSpec& s = kPathSpecs[which];
  if (value < s.lo || value > s.hi) return false;
  return which != kOebBn || value == 0 || value == 32 || value == 64;
}

// The environment's value of a switch, read once; a value that does not parse or is out of range
// is an error at import (a silently ignored switch would make a comparison meaningless).
int initial_path_value(int which) {
  const PathSpec& s = kPathSpecs[which];
  const char* env = std::getenv(s.env);
  if (env == nullptr || *env == '\0') return s.initial;
  const std::string text(env);
  if (which == kPoolSplit && text == "auto") return -1;
  try {
    size_t used = 0;
    const int v = std::stoi(text, &used);
    if (used == text.size() && valid_path_value(which, v)) return v;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument(std::string(s.env) + "=" + text + " is not a valid value (docs/method_kernels.md)");
}

struct PathValues {
  std::array<std::atomic<int>, kNumKernelPaths> v;
  PathValues() {
    for (int i = 0; i < kNumKernelPaths; ++i) v[i].store(initial_path_value(i));
  }
};
std::array<std::atomic<int>, kNumKernelPaths>& path_values() {
  static PathValues values;  // thread-safe, on first use (the module's load)
  return values.v;
}

int path_index(const std::string& name) {
  for (int i = 0; i < kNumKernelPaths; ++i)
    if (name == kPathSpecs[i].name) return i;
  throw std::invalid_argument("unknown kernel path '" + name + "'");
}

}  // namespace

int kernel_path(KernelPath which) { return path_values()[which].load(std::memory_order_relaxed); }

}  // namespace stepflow

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
  // Kernel path switches (csrc/include/tuning.h); stepflow_ext.ops.kernel_paths wraps them.
  stepflow::path_values();  // read the environment now: a bad value fails the import
  m.def(
      "_kernel_paths",
      [] {
        pybind11::dict d;
        for (int i = 0; i < stepflow::kNumKernelPaths; ++i)
          d[stepflow::kPathSpecs[i].name] = stepflow::kernel_path(static_cast<stepflow::KernelPath>(i));
        return d;
      },
      "The kernel path switches and their current values.");
  m.def(
      "_set_kernel_path",
      [](const std::string& name, int value) {
        const int i = stepflow::path_index(name);
        if (!stepflow::valid_path_value(i, value))
          throw std::invalid_argument("kernel path " + name + ": " + std::to_string(value) + " is out of range");
        return stepflow::path_values()[i].exchange(value);
      },
      "Set a kernel path switch; returns its previous value.");
}
