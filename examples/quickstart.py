"""Quickstart: the three StepFlow ops on one synthetic reasoning trace, checked against the reference.

Run with `make demo`. It builds a trace of a question, five thinking steps and a summary,
draws attention inputs like one layer of Qwen2-1.5B (12 query heads, 2 kv heads, d = 128),
and prints the Step-Saliency map (row-normalized: the share of each segment's saliency that
comes from each earlier segment), how much the Odds-Equal Bridge moves the output, and the
size of the Step Momentum residual — each next to its distance from stepflow_ext.reference.
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

seg_start = reference.seg_start_from_seg_ids(seg_ids, kinds)
kv_start = torch.zeros(1, dtype=torch.long)
plain, _, _ = sf.oeb_attention(q, k, v, seg_start, kv_start, strength=0.0, num_sink=1, scale=scale)
bridged, _, stats = sf.oeb_attention(q, k, v, seg_start, kv_start, strength=0.5, num_sink=1, scale=scale)
ref_out, _, _ = reference.oeb_attention(q.double(), k.double(), v.double(), seg_start, kv_start, 0.5, 1, scale)
locked = (stats[..., 0] > stats[..., 1]) & (stats[..., 1] > 0)
print(f"\nOdds-Equal Bridge (strength 0.5): {locked.float().mean().item():.1%} of query rows were locked in; "
      f"output moved by {(bridged - plain).norm().item() / plain.norm().item():.3f} (relative); "
      f"max error vs reference {(bridged - ref_out).abs().max().item():.2e}")

h = torch.randn(1, T, 1536)
h_new = sf.step_momentum(h, seg_ids, kinds, beta=0.9, gamma=0.05)
ref_h = reference.step_momentum(h.double(), seg_ids, kinds, 0.9, 0.05)
print(f"Step Momentum Injection (gamma 0.05): residual/hidden = "
      f"{((h_new - h).norm(dim=-1) / h.norm(dim=-1)).max().item():.3f} at most; "
      f"max error vs reference {(h_new - ref_h).abs().max().item():.2e}")
