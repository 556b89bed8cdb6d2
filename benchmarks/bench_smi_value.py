"""SMI rule `value` (the paper's) on CPU: its cost next to the attention of the same layer.

The value injection is plain PyTorch (ops.smi_value): a gather of at most w = 4 value rows and a
mean, added to the attention output of step-start rows. This measures it against causal SDPA of the
same layer, Qwen2-1.5B head shapes (B = 1, H = 12, H_kv = 2, d = 128, fp32):
- prefill of T tokens with a step start every 64 tokens;
- one decode step (Tq = 1) against T cached keys, the token being a step start.
extra_info holds smi / sdpa, measured in the same test.

    python -m pytest benchmarks/bench_smi_value.py --benchmark-columns=min,mean,median
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from stepflow_ext import ops

H, HKV, D, W, ALPHA, STEP = 12, 2, 128, 4, 0.06, 64


def _inputs(tq, tk):
    torch.manual_seed(0)
    q = torch.randn(1, H, tq, D)
    k, v = torch.randn(1, HKV, tk, D), torch.randn(1, HKV, tk, D)
    pos = torch.arange(tk - tq, tk)
    windows = torch.full((1, tq, 2), -1, dtype=torch.long)
    starts = (pos % STEP == 0) & (pos >= 2 * STEP)   # a step start every 64 tokens, from step 2 on
    windows[0, starts, 0] = pos[starts] - W
    windows[0, starts, 1] = pos[starts]
    if tq == 1:
        windows[0, 0] = torch.tensor([tk - 1 - W, tk - 1])
    return q, k, v, windows


def _sdpa(q, k, v):
    kk, vv = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    return F.scaled_dot_product_attention(q, kk, vv)


def _best(fn, repeat=7):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("t", [2048, 8192])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_smi_value(benchmark, mode, t):
    tq = t if mode == "prefill" else 1
    if mode == "prefill" and t > 2048:
        pytest.skip("prefill measured at 2048 (SDPA's T x T cost dominates further)")
    q, k, v, windows = _inputs(tq, t)
    out = _sdpa(q, k, v).transpose(1, 2).contiguous()     # (B, Tq, H, d), as HF attention returns it
    smi = lambda: ops.smi_value(out, v, windows, ALPHA, W)  # noqa: E731
    attn = lambda: _sdpa(q, k, v)                           # noqa: E731
    ratio = _best(smi) / _best(attn)
    benchmark.extra_info["smi_over_sdpa"] = round(ratio, 4)
    benchmark.extra_info["step_starts"] = int((windows[..., 0] >= 0).sum())
    benchmark(smi)
