"""Quickstart: the three StepFlow ops on one synthetic reasoning trace, checked against the reference.

Run with `make demo`. It builds a trace of a question, five thinking steps and a summary,
draws attention inputs like one layer of Qwen2-1.5B (12 query heads, 2 kv heads, d = 128),
and prints the Step-Saliency map (row-normalized: the share of each segment's saliency that
comes from each earlier segment), how much the Odds-Equal Bridge moves the output, and the
size of the Step Momentum Injection — each next to its distance from stepflow_ext.reference.
"""
import time

import torch

import stepflow_ext as sf
from stepflow_ext import reference

torch.manual_seed(0)
lengths = [48, 40, 64, 24, 56, 32, 40]                      # question, 5 steps, summary
names = ["Q"] + [f"S{i}" for i in range(1, len(lengths) - 1)] + ["A"]
kinds = torch.tensor([[0] + [1] * (len(lengths) - 2) + [2]])
seg_ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])[None]
T, H, H_kv, d = seg_ids.shape[1], 12, 2, 128
q, grad_out = torch.randn(1, H, T, d), torch.randn(1, H, T, d) * 1e-2
k, v = torch.randn(1, H_kv, T, d), torch.randn(1, H_kv, T, d)
scale = d ** -0.5

t0 = time.perf_counter()
maps = sf.step_saliency_pool(q, k, v, grad_out, seg_ids, len(lengths), scale)
dt = time.perf_counter() - t0
ref = reference.step_saliency_pool(q.double(), k.double(), v.double(), grad_out.double(), seg_ids, len(lengths), scale)
print(f"Step-Saliency map of one layer (T={T}, {dt * 1e3:.1f} ms); "
      f"max rel. error vs reference {((maps - ref).abs().max() / ref.abs().max()).item():.2e}")
share = maps[0] / maps[0].sum(-1, keepdim=True)
print("row share    " + " ".join(f"{n:>6}" for n in names))
for a, name in enumerate(names):
    print(f"{name:>10}   " + " ".join(f"{share[a, c].item():6.3f}" if c <= a else "      " for c in range(len(names))))

kv_start = torch.zeros(1, dtype=torch.long)
bounds = reference.oeb_bounds(seg_ids, kinds, "bridge")       # per query: O | B (bridge) | S (own channel)
off = torch.full_like(bounds, -1)                              # no row intervened: plain attention
plain, _, _ = sf.oeb_attention(q, k, v, kv_start, off, "bridge", scale=scale)
bridged, _, stats = sf.oeb_attention(q, k, v, kv_start, bounds, "bridge", tau_max=0.15, scale=scale)
ref_out, _, _ = reference.oeb_attention(q.double(), k.double(), v.double(), kv_start, bounds, "bridge",
                                        tau_max=0.15, scale=scale)
print(f"\nOdds-Equal Bridge (the paper's bridge rule, tau_max 0.15): it fired on {stats[..., 4].mean().item():.1%} "
      f"of the (head, query) rows; output moved by {(bridged - plain).norm().item() / plain.norm().item():.3f} "
      f"(relative); max error vs reference {(bridged - ref_out).abs().max().item():.2e}")

# Step Momentum Injection, the paper's value rule: the first token of each step k >= 2 gets
# alpha * the mean value of the last 4 tokens of step k - 1 on each head.
closing = torch.tensor([[sum(lengths[:s + 1]) - 1 for s in range(len(lengths))]])  # each closed by its last token
windows = reference.smi_windows(seg_ids, kinds, closing, 4)
attn = bridged.transpose(1, 2)                                 # (B, T, H, d), as HF attention returns it
injected = sf.ops.smi_value(attn, v, windows, 0.06, 4)
ref_inj = reference.smi_value(attn.transpose(1, 2).double(), v.double(), windows, 0.06).transpose(1, 2)
print(f"Step Momentum Injection (alpha 0.06): {int((windows[..., 0] >= 0).sum())} step starts changed, by "
      f"{((injected - attn).norm() / attn.norm()).item():.4f} (relative); "
      f"max error vs reference {(injected - ref_inj).abs().max().item():.2e}")
