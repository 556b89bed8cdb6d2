#pragma once
// The per-row arithmetic of the Odds-Equal Bridge (design.md 2.3; docs/method.md section 3), shared
// by every kernel that applies it: the CPU and CUDA oeb_attention (forward and backward) and the
// OEB-aware step_saliency_pool. A kernel reduces one query row to its three contiguous key groups
//   group 0 = [lo, a)    never rescaled  (bridge: O, the "other" channel; odds: the sinks)
//   group 1 = [a, b)                     (bridge: B, the bridge channel;  odds: X, the context)
//   group 2 = [b, end)                   (bridge: S, the query's channel; odds: C, its step)
// and hands over each group's log-mass L_g = log sum_{j in g} exp(s_j) (s_j the scaled logits; any
// common offset; -inf for an empty group) and key count n_g. row_forward returns the per-group
// log-factors log r_g with A'_j = exp(s_j - lse + log r_g), so the kernel never materializes a
// T x T matrix: out = sum_g r_g U_g with U_g = sum_{j in g} A_j v_j.
//
// All arithmetic is in double; it runs once per row (and head), not per key.
#include <cmath>

#if defined(__CUDACC__)
#define STEPFLOW_HD __host__ __device__ __forceinline__
#else
#define STEPFLOW_HD inline
#endif

namespace stepflow {
namespace oeb {

// Rule codes, as the kernels receive them (the op schema takes the names "bridge" and "odds").
enum RuleCode : int { kOdds = 0, kBridge = 1 };

struct RuleParams {
  int rule;        // kOdds | kBridge
  double strength;  // odds: lambda in [0, 1]
  double tau_max;   // bridge: the cap of the bridge target mass
  double eps;       // bridge: the epsilon of the paper's logit shifts (1e-6)
};

STEPFLOW_HD double neg_inf() { return -INFINITY; }

STEPFLOW_HD double log_add_exp(double x, double y) {
  if (x == -INFINITY) return y;
  if (y == -INFINITY) return x;
  const double m = x > y ? x : y;
  return m + log1p(exp(-fabs(x - y)));
}

STEPFLOW_HD double softplus(double x) { return x > 0 ? x + log1p(exp(-x)) : log1p(exp(x)); }

// Everything the forward needs of a row, and what the backward needs to differentiate it.
struct Row {
  double lse;       // log sum_j exp(s_j) over the valid real keys (the offset of L): A_j = exp(s_j - lse)
  double p[3];      // group masses under A (softmax over the real keys, no sink)
  double logp[3];   // log p_g = L_g - lse, exact where p_g underflows a double (-inf: empty group)
  double log_r[3];  // A'_j = A_j * exp(log_r[g]); includes the sink's share of the final softmax
  double psink;     // weight of the sink in A' (0 without a sink)
  bool active;      // the rule changed the row (bridge: p_B < tau_B and feasible; odds: locked)
  // Backward internals.
  double sigma;     // exp(sink - lse), 0 without a sink
  double den;       // Z + sigma, Z = sum_g p_g rho_g (the rule's factors before normalization)
  double log_rho[3];
  double odds_s;    // odds: o' / (1 + o')
  double dtauB_dpO; // bridge: d tau_B / d p_O through the clamps (0 or -1)
  double tauB, tauS;
};

// One row. intervened = false (a question row, padding, or bounds (-1, -1)): A' is the model's
// own softmax (with its sink, if any). sink_logit: the sink's logit with the same offset as L
// (-inf without a sink).
STEPFLOW_HD Row row_forward(const double L[3], const double n[3], double sink_logit, bool intervened,
                            const RuleParams& P) {
  Row r;
  r.lse = log_add_exp(log_add_exp(L[0], L[1]), L[2]);
  r.active = false;
  r.odds_s = 0.0;
  r.dtauB_dpO = 0.0;
  r.tauB = r.tauS = 0.0;
  for (int g = 0; g < 3; ++g) {
    r.logp[g] = (r.lse == -INFINITY || L[g] == -INFINITY) ? -INFINITY : L[g] - r.lse;
    r.p[g] = exp(r.logp[g]);
    r.log_rho[g] = 0.0;
  }
  double Z = 1.0;  // sum_g p_g rho_g; exactly 1 unless the bridge rule fires
  if (intervened && r.lse != -INFINITY) {
    if (P.rule == kOdds) {
      // p_X > 0 and p_C > p_X, read on the log-masses (exact where p_X underflows).
      if (L[1] > -INFINITY && L[2] > L[1]) {
        r.active = true;
        const double t = (1.0 - P.strength) * (L[2] - L[1]);  // log o'
        const double log_m = log_add_exp(L[1], L[2]);           // log (p_C + p_X)
        r.odds_s = 1.0 / (1.0 + exp(-t));
        r.log_rho[1] = log_m - softplus(t) - L[1];  // p'_X = M / (1 + o')
        r.log_rho[2] = log_m - softplus(-t) - L[2]; // p'_C = M o' / (1 + o')
      }
    } else {
      // Bridge: groups 0 = O, 1 = B, 2 = S (design.md 2.3, the paper's Eq. 5-8 with its epsilon).
      const double eps = P.eps, pO = r.p[0], pB = r.p[1], pS = r.p[2];
      if (n[1] > 0 && n[2] > 0) {
        double tau = sqrt(n[1] / (n[1] + n[2] + eps));
        tau = tau < P.tau_max ? tau : P.tau_max;
        const double avail = 1.0 - pO;
        if (pB < tau && avail > eps && pS > eps) {
          r.active = true;
          // tau_B <- max(min(tau_B, 1 - p_O - eps), eps): the min clamp makes tau_B follow p_O.
          if (tau > avail - eps) {
            tau = avail - eps;
            r.dtauB_dpO = -1.0;
          }
          if (tau < eps) {
            tau = eps;
            r.dtauB_dpO = 0.0;
          }
          r.tauB = tau;
          r.tauS = avail - tau;
          r.log_rho[1] = log((r.tauB + eps) / (pB + eps));
          r.log_rho[2] = log((r.tauS + eps) / (pS + eps));
          Z = pO + pB * exp(r.log_rho[1]) + pS * exp(r.log_rho[2]);
        }
      }
    }
  }
  r.sigma = (sink_logit == -INFINITY || r.lse == -INFINITY) ? 0.0 : exp(sink_logit - r.lse);
  r.den = Z + r.sigma;
  const double log_den = log(r.den);
  for (int g = 0; g < 3; ++g) r.log_r[g] = r.log_rho[g] - log_den;
  r.psink = r.sigma / r.den;
  return r;
}

// The backward of one row (docs/method.md 3.x): with dP_j = dO . v_j and D[g] the mean of dP_j
// under A over group g (0 for an empty group), returns ct[g] such that the gradient of the loss
// with respect to the scaled logit s_j of a key j in group g is
//     dS_j = A'_j (dP_j - ct[g]).
STEPFLOW_HD void row_backward(const Row& r, const double D[3], const RuleParams& P, double ct[3]) {
  if (r.lse == -INFINITY) {
    ct[0] = ct[1] = ct[2] = 0.0;
    return;
  }
  double pm[3];  // final group masses p'_g = p_g r_g
  for (int g = 0; g < 3; ++g) pm[g] = exp(r.logp[g] + r.log_r[g]);
  const double delta = pm[0] * D[0] + pm[1] * D[1] + pm[2] * D[2];  // dO . out
  if (!r.active) {
    // A' = A / (1 + sigma): plain (sink) attention, dS_j = A'_j (dP_j - dO . out).
    ct[0] = ct[1] = ct[2] = delta;
    return;
  }
  if (P.rule == kOdds) {
    // The odds rebalance keeps sum_g p_g rho_g = 1, so A' = A rho / (1 + sigma); its backward is
    // the odds backward (computed in the log form that stays bounded where rho_X is huge) on
    // dO / (1 + sigma), plus the sink's dependence on lse.
    const double s = r.odds_s, lam1 = 1.0 - P.strength, diff = D[2] - D[1];
    const double delta_rho = r.p[0] * D[0] + exp(r.logp[1] + r.log_rho[1]) * D[1] +
                             exp(r.logp[2] + r.log_rho[2]) * D[2];  // dO . (sum_g rho_g U_g)
    const double mix = s * D[2] + (1.0 - s) * D[1];
    const double inv_rx = exp(-r.log_rho[1]), inv_rc = exp(-r.log_rho[2]);
    ct[0] = delta_rho;
    ct[1] = D[1] + (delta_rho - mix) * inv_rx + lam1 * s * diff;
    ct[2] = D[2] + (delta_rho - mix) * inv_rc - lam1 * (1.0 - s) * diff;
    // d lse: dS_j += A_j * delta * sigma / (1 + sigma) = A'_j * delta_rho * psink / rho_g.
    for (int g = 0; g < 3; ++g) ct[g] -= delta_rho * r.psink * exp(-r.log_rho[g]);
    return;
  }
  // Bridge. With w_g = rho_g = exp(lambda_g), r_g = w_g / den, y_g = p_g D_g (= dO . U_g):
  //   beta_k = sum_g y_g r_g J[g][k] - (delta / den) (w_k + sum_h p_h w_h J[h][k])
  //   gamma  = delta sigma / den
  //   ct_g   = (delta + sum_h p_h beta_h - gamma - beta_g) / r_g
  // where J[g][k] = d lambda_g / d p_k (lambda_O = 0).
  const double eps = P.eps;
  double w[3], rr[3], y[3];
  for (int g = 0; g < 3; ++g) {
    w[g] = exp(r.log_rho[g]);
    rr[g] = exp(r.log_r[g]);
    y[g] = r.p[g] * D[g];
  }
  double J[3][3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
  J[1][1] = -1.0 / (r.p[1] + eps);
  J[1][0] = r.dtauB_dpO / (r.tauB + eps);
  J[2][2] = -1.0 / (r.p[2] + eps);
  J[2][0] = (-1.0 - r.dtauB_dpO) / (r.tauS + eps);
  double beta[3];
  for (int k = 0; k < 3; ++k) {
    double a = 0.0, b = w[k];
    for (int g = 0; g < 3; ++g) {
      a += y[g] * rr[g] * J[g][k];
      b += r.p[g] * w[g] * J[g][k];
    }
    beta[k] = a - delta / r.den * b;
  }
  const double gamma = delta * r.sigma / r.den;
  const double common = delta + r.p[0] * beta[0] + r.p[1] * beta[1] + r.p[2] * beta[2] - gamma;
  for (int g = 0; g < 3; ++g) ct[g] = (common - beta[g]) / rr[g];
}

// The groups of one query row at key position pos, from the op's inputs: kv = the row's first
// valid key, (a, b) = its bounds (a < 0: not intervened), window = the sliding window (<= 0: none).
// Keys [lo[g], hi[g]) form group g; a row that is not intervened has everything in group 0.
struct Groups {
  long long lo[3], hi[3];
  bool intervened;
  STEPFLOW_HD bool any() const { return hi[2] > lo[0]; }
  STEPFLOW_HD double count(int g) const { return hi[g] > lo[g] ? double(hi[g] - lo[g]) : 0.0; }
};

STEPFLOW_HD Groups row_groups(long long kv, long long a, long long b, long long pos, long long window) {
  const long long end = pos + 1 > kv ? pos + 1 : kv;  // keys [lo, end)
  long long lo = kv;
  if (window > 0 && pos - window + 1 > lo) lo = pos - window + 1;
  if (lo > end) lo = end;
  Groups G;
  G.intervened = a >= 0;
  long long ca = end, cb = end;
  if (G.intervened) {
    ca = a < lo ? lo : (a > end ? end : a);
    cb = b < ca ? ca : (b > end ? end : b);
  }
  G.lo[0] = lo, G.hi[0] = ca;
  G.lo[1] = ca, G.hi[1] = cb;
  G.lo[2] = cb, G.hi[2] = end;
  return G;
}

}  // namespace oeb
}  // namespace stepflow
