#pragma once
// Argument checks that the CPU and CUDA kernels of an op share: shapes, dtypes and scalars, and
// that every tensor sits on the device of the first one. Each backend adds what is its own (the
// device type it accepts, index ranges read on the host or on the device, launch limits).
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>

#include "oeb_rule.h"
#include "stepflow.h"

namespace stepflow {

// Every tensor must be on `first`'s device (names in the same order, for the message).
inline void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> xs) {
  const auto& [first_name, first] = *xs.begin();
  for (const auto& [name, x] : xs) {
    TORCH_CHECK(x->device() == first->device(), op, ": ", name, " must be on ", first->device(), " with ",
                first_name, ", got ", x->device());
  }
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// ------------------------------------------------------------------------------- oeb_attention

// The rule name of the op schema -> oeb::RuleCode.
inline int oeb_rule_code(const char* op, const std::string& rule) {
  TORCH_CHECK(rule == "bridge" || rule == "odds", op, ": rule must be 'bridge' or 'odds', got '", rule, "'");
  return rule == "bridge" ? oeb::kBridge : oeb::kOdds;
}

inline oeb::RuleParams check_oeb_rule(const char* op, const std::string& rule, double strength, double tau_max,
                                      double eps) {
  oeb::RuleParams R{};
  R.rule = oeb_rule_code(op, rule);
  TORCH_CHECK(strength >= 0.0 && strength <= 1.0, op, ": strength must be in [0, 1], got ", strength);
  TORCH_CHECK(tau_max > 0.0 && tau_max <= 1.0, op, ": tau_max must be in (0, 1], got ", tau_max);
  TORCH_CHECK(eps > 0.0 && eps < 0.5, op, ": eps must be in (0, 0.5), got ", eps);
  R.strength = strength, R.tau_max = tau_max, R.eps = eps;
  return R;
}

// sink: optional per-head logits (H,), any float dtype, on q's device.
inline void check_sink(const char* op, const c10::optional<at::Tensor>& sink, const at::Tensor& q) {
  if (!sink.has_value()) return;
  const at::Tensor& s = *sink;
  TORCH_CHECK(s.dim() == 1 && s.size(0) == q.size(1), op, ": sink must have shape (H,) = (", q.size(1), ",), got ",
              s.sizes());
  TORCH_CHECK(is_supported_float(s.scalar_type()), op, ": sink must be a float tensor, got ", s.scalar_type());
  check_same_device(op, {{"q", &q}, {"sink", &s}});
}

constexpr int64_t kHeadDimMax = 256;  // oeb_attention's largest head dim (ops.HEAD_DIM_MAX)

struct OebSizes {
  int64_t B, H, Hkv, G, Tq, Tk, d, window;  // window <= 0: full attention
  double scale;
  oeb::RuleParams rule;
};

// bounds (B, Tq, 2) int64: per query (a, b), the starts of groups 1 and 2 (key positions; (-1, -1):
// the row is not intervened). kv_start (B,) int64: the first valid key of each row.
inline OebSizes check_oeb_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& kv_start, const at::Tensor& bounds, const std::string& rule,
                                    double strength, double tau_max, double eps,
                                    const c10::optional<at::Tensor>& sink, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "oeb_attention: q, k, v must be 4-d (B, H, T, d), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_same_device("oeb_attention", {{"q", &q}, {"k", &k}, {"v", &v}, {"kv_start", &kv_start},
                                      {"bounds", &bounds}});
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "oeb_attention: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(is_supported_float(q.scalar_type()), "oeb_attention: q must be float32, float64, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "oeb_attention: k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  OebSizes P{};
  P.B = q.size(0), P.H = q.size(1), P.Tq = q.size(2), P.d = q.size(3);
  P.Hkv = k.size(1), P.Tk = k.size(2);
  TORCH_CHECK(k.size(0) == P.B, "oeb_attention: k has batch ", k.size(0), " but q has batch ", P.B);
  TORCH_CHECK(k.size(3) == P.d, "oeb_attention: k has head dim ", k.size(3), " but q has head dim ", P.d);
  TORCH_CHECK(P.Hkv > 0 && P.H % P.Hkv == 0, "oeb_attention: query heads (", P.H,
              ") must be a multiple of kv heads (", P.Hkv, ")");
  TORCH_CHECK(P.Tq <= P.Tk, "oeb_attention: q has ", P.Tq, " tokens but k only ", P.Tk);
  // The CUDA kernels' limit, on every device, so that the CPU and the GPU accept the same inputs.
  TORCH_CHECK(P.d <= kHeadDimMax, "oeb_attention: head dim must be at most ", kHeadDimMax, ", got ", P.d);
  TORCH_CHECK(bounds.scalar_type() == at::kLong && bounds.dim() == 3 && bounds.size(0) == P.B &&
                  bounds.size(1) == P.Tq && bounds.size(2) == 2,
              "oeb_attention: bounds must be int64 of shape (", P.B, ", ", P.Tq, ", 2), got ", bounds.scalar_type(),
              " ", bounds.sizes());
  TORCH_CHECK(kv_start.scalar_type() == at::kLong && kv_start.dim() == 1 && kv_start.size(0) == P.B,
              "oeb_attention: kv_start must be int64 of shape (", P.B, "), got ", kv_start.scalar_type(), " ",
              kv_start.sizes());
  check_sink("oeb_attention", sink, q);
  TORCH_CHECK(window >= -1 && window != 0, "oeb_attention: window must be -1 (full attention) or >= 1, got ", window);
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "oeb_attention: scale must be a positive number, got ", scale);
  P.rule = check_oeb_rule("oeb_attention", rule, strength, tau_max, eps);
  P.G = P.H / P.Hkv;
  P.scale = scale;
  P.window = window;
  return P;
}

// -------------------------------------------------------------------------- step_saliency_pool

struct SaliencySizes {
  int64_t B, H, Hkv, T, d;
};

inline SaliencySizes check_saliency_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& grad_out, const at::Tensor& seg_ids,
                                              int64_t num_segments, double scale, const std::string& reduction) {
  TORCH_CHECK(reduction == "sum_abs" || reduction == "abs_sum" || reduction == "abs_mean",
              "step_saliency_pool: head_reduction must be 'sum_abs', 'abs_sum' or 'abs_mean', got '", reduction, "'");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && grad_out.dim() == 4,
              "step_saliency_pool: q, k, v, grad_out must be 4-D (B, H, T, d), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes(), ", ", grad_out.sizes());
  check_same_device("step_saliency_pool",
                    {{"q", &q}, {"k", &k}, {"v", &v}, {"grad_out", &grad_out}, {"seg_ids", &seg_ids}});
  const auto dtype = q.scalar_type();
  TORCH_CHECK(is_supported_float(dtype), "step_saliency_pool: q must be float32, float16, bfloat16 or float64, got ",
              dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && grad_out.scalar_type() == dtype,
              "step_saliency_pool: q, k, v, grad_out must share one dtype, got ", dtype, ", ", k.scalar_type(), ", ",
              v.scalar_type(), ", ", grad_out.scalar_type());
  const SaliencySizes s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "step_saliency_pool: grad_out must have the shape of q ", q.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "step_saliency_pool: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.d, "step_saliency_pool: k must be (", s.B, ", H_kv, T, ", s.d,
              ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(k.size(2) == s.T, "step_saliency_pool: needs Tq == Tk, got q with ", s.T, " tokens and k with ",
              k.size(2));
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, "step_saliency_pool: the query heads (", s.H,
              ") must be a multiple of the kv heads (", s.Hkv, ")");
  TORCH_CHECK(s.d > 0, "step_saliency_pool: head dim must be positive");
  TORCH_CHECK(num_segments >= 1, "step_saliency_pool: num_segments must be >= 1, got ", num_segments);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "step_saliency_pool: scale must be a positive number, got ",
              scale);
  TORCH_CHECK(seg_ids.scalar_type() == at::kLong || seg_ids.scalar_type() == at::kInt,
              "step_saliency_pool: seg_ids must be int64 (or int32), got ", seg_ids.scalar_type());
  TORCH_CHECK(seg_ids.dim() == 2 && seg_ids.size(0) == s.B && seg_ids.size(1) == s.T,
              "step_saliency_pool: seg_ids must have shape (", s.B, ", ", s.T, "), got ", seg_ids.sizes());
  return s;
}

// ------------------------------------------------------------------------------- step_momentum

inline void check_momentum_arguments(const char* op, const at::Tensor& h, const at::Tensor& seg_ids,
                                     const at::Tensor& seg_kinds, double beta, double gamma) {
  TORCH_CHECK(h.dim() == 3, op, ": h must be a 3-D (B, T, D) tensor, got shape ", h.sizes());
  TORCH_CHECK(is_supported_float(h.scalar_type()), op, ": h must be float32, float64, float16 or bfloat16, got ",
              h.scalar_type());
  TORCH_CHECK(seg_ids.dim() == 2 && seg_ids.size(0) == h.size(0) && seg_ids.size(1) == h.size(1), op,
              ": seg_ids must have shape (B, T) = (", h.size(0), ", ", h.size(1), "), got ", seg_ids.sizes());
  TORCH_CHECK(seg_ids.scalar_type() == at::kLong, op, ": seg_ids must be int64, got ", seg_ids.scalar_type());
  TORCH_CHECK(seg_kinds.dim() == 2 && seg_kinds.size(0) == h.size(0), op,
              ": seg_kinds must have shape (B, S) with B = ", h.size(0), ", got ", seg_kinds.sizes());
  TORCH_CHECK(seg_kinds.scalar_type() == at::kLong, op, ": seg_kinds must be int64, got ",
              seg_kinds.scalar_type());
  check_same_device(op, {{"h", &h}, {"seg_ids", &seg_ids}, {"seg_kinds", &seg_kinds}});
  TORCH_CHECK(beta >= 0.0 && beta < 1.0, op, ": beta must be in [0, 1), got ", beta);
  TORCH_CHECK(gamma >= 0.0 && std::isfinite(gamma), op, ": gamma must be a finite number >= 0, got ", gamma);
}

// The decode state next to the KV cache: momentum and step_sum (B, D) float32, counters (B, 3) int64.
inline void check_momentum_state(const at::Tensor& h, const at::Tensor& momentum, const at::Tensor& step_sum,
                                 const at::Tensor& counters) {
  const int64_t b = h.size(0), d = h.size(2);
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor&>{"momentum", momentum},
                                {"step_sum", step_sum}}) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == b && x.size(1) == d, "step_momentum_decode_: state ", name,
                " must have shape (B, D) = (", b, ", ", d, "), got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "step_momentum_decode_: state ", name, " must be float32, got ",
                x.scalar_type());
  }
  TORCH_CHECK(counters.dim() == 2 && counters.size(0) == b && counters.size(1) == 3,
              "step_momentum_decode_: state counters must have shape (B, 3) = (", b, ", 3), got ", counters.sizes());
  TORCH_CHECK(counters.scalar_type() == at::kLong, "step_momentum_decode_: state counters must be int64, got ",
              counters.scalar_type());
  check_same_device("step_momentum_decode_",
                    {{"h", &h}, {"momentum", &momentum}, {"step_sum", &step_sum}, {"counters", &counters}});
}

}  // namespace stepflow
